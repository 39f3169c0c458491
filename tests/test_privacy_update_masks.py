"""Update masks fixed before the noise: noise lands only on kept coordinates with std σC, per-example gradients
are masked before clipping (so C bounds what is released), and the mask of step t depends on public data and
on the releases of steps < t only."""
from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from scipy import stats
from torch import nn

from toolkit.privacy import make_private
from toolkit.privacy.update_masks import (PastNoisyMask, PublicGradientMask, RandomMask, magnitude_mask,
                                          make_pre_noise_mask)
from toolkit.privacy.update_pruning import UpdatePruningDPOptimizer

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")
B = 4


def _optimizer(mask, sigma=0.0, C=1.0, seed=7, width=(20, 10)):
    torch.manual_seed(0)
    net = nn.Linear(*width).double()
    gsm = GradSampleModule(net)
    opt = UpdatePruningDPOptimizer(torch.optim.SGD(net.parameters(), lr=1.0), noise_multiplier=sigma,
                                   max_grad_norm=C, expected_batch_size=B, pre_noise_mask=mask,
                                   generator=torch.Generator().manual_seed(seed))
    return net, gsm, opt


def _params(net):
    return [p.detach().clone() for p in net.parameters()]


def _update(before, net):
    return [b - p.detach() for b, p in zip(before, net.parameters())]  # SGD, lr = 1: the released update


def test_noise_lands_only_on_kept_coordinates_with_std_sigma_C():
    sigma, C = 2.0, 0.5
    net, gsm, opt = _optimizer(RandomMask(0.6, seed=3), sigma=sigma, C=C, width=(300, 40))
    before = _params(net)
    for p in net.parameters():  # an empty Poisson batch: the update is pure (masked) noise
        p.grad_sample = p.new_zeros((0, *p.shape))
    opt.step()
    update = torch.cat([u.reshape(-1) for u in _update(before, net)]) * B
    keep = torch.cat([m.reshape(-1) for m in opt._masks])
    assert keep.float().mean() == pytest.approx(0.4, abs=1e-3)
    assert torch.all(update[~keep] == 0)
    kept = update[keep] / (sigma * C)
    assert stats.kstest(kept.numpy(), "norm").pvalue > 1e-3
    assert abs(float(kept.std()) - 1) < 0.03


def test_per_example_gradients_are_masked_before_clipping():
    C = 0.05  # small: every example is clipped
    mask = RandomMask(0.5, seed=1)
    net, gsm, opt = _optimizer(mask, sigma=0.0, C=C)
    x, y = torch.randn(B, 20, dtype=torch.float64), torch.randn(B, 10, dtype=torch.float64)
    before = _params(net)
    ((gsm(x) - y) ** 2).sum(dim=1).mean().backward()
    grads = [p.grad_sample.detach().clone() for p in net.parameters()]
    keeps = RandomMask(0.5, seed=1).mask(list(net.parameters()))  # the same draw
    opt.step()
    masked = [g * k for g, k in zip(grads, keeps)]
    norms = torch.stack([g.reshape(B, -1).norm(dim=1) for g in masked], dim=1).norm(dim=1)
    factor = (C / (norms + 1e-6)).clamp(max=1.0)
    expected = [torch.einsum("i,i...->...", factor, g) / B for g in masked]
    for got, want in zip(_update(before, net), expected):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-9)


def _two_steps(second_batch_seed: int):
    net, gsm, opt = _optimizer(PastNoisyMask(0.5), sigma=1.0, seed=5)
    torch.manual_seed(100)
    x1, y1 = torch.randn(B, 20, dtype=torch.float64), torch.randn(B, 10, dtype=torch.float64)
    before = _params(net)
    ((gsm(x1) - y1) ** 2).sum(dim=1).mean().backward()
    opt.step()
    opt.zero_grad()
    first_release = _update(before, net)
    torch.manual_seed(second_batch_seed)
    x2, y2 = torch.randn(B, 20, dtype=torch.float64) * 10, torch.randn(B, 10, dtype=torch.float64)
    ((gsm(x2) - y2) ** 2).sum(dim=1).mean().backward()
    opt.step()
    return opt._masks, first_release


def test_past_noisy_mask_of_step_t_depends_only_on_earlier_releases():
    masks_a, release = _two_steps(second_batch_seed=1)
    masks_b, _ = _two_steps(second_batch_seed=2)
    assert all(torch.equal(a, b) for a, b in zip(masks_a, masks_b))  # the current batch does not leak in
    expected = magnitude_mask(release, 0.5)  # EMA after one release = that release
    assert all(torch.equal(a, e) for a, e in zip(masks_a, expected))


def test_public_mask_is_the_top_of_the_public_gradient_and_ignores_the_batch():
    torch.manual_seed(0)
    public = [torch.randn(10, 20, dtype=torch.float64), torch.randn(10, dtype=torch.float64)]
    net, gsm, opt = _optimizer(PublicGradientMask(0.7, public), sigma=1.0)
    for step in range(2):
        x, y = torch.randn(B, 20, dtype=torch.float64), torch.randn(B, 10, dtype=torch.float64)
        ((gsm(x) - y) ** 2).sum(dim=1).mean().backward()
        opt.step()
        opt.zero_grad()
        assert all(torch.equal(m, e) for m, e in zip(opt._masks, magnitude_mask(public, 0.7)))


def test_unknown_update_mask_and_ghost_clipping_are_refused():
    with pytest.raises(ValueError, match="unknown update_mask"):
        make_pre_noise_mask("oracle", 0.5)
    with pytest.raises(ValueError, match="public data"):
        make_pre_noise_mask("public", 0.5)
    net = nn.Linear(3, 1)
    with pytest.raises(ValueError, match="ghost"):
        make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                     expected_batch_size=2, sample_rate=0.1, grad_sample_mode="ghost",
                     pre_noise_mask=RandomMask(0.5))
