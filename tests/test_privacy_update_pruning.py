"""Mechanism 2: the mask zeroes exactly the smallest |noisy gradient| coordinates (never the clean ones),
the clean sum is gone after the noise, "freeze" leaves pruned coordinates and their Adam state untouched,
"advance" moves the state."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from toolkit.privacy.update_pruning import UpdatePruningDPOptimizer, noisy_gradient_mask

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")




# ---------------------------------------------------------------- the mask function

def test_mask_zeroes_the_smallest_magnitudes_globally():
    g = [torch.tensor([[0.5, -0.1], [3.0, 0.2]]), torch.tensor([-0.05, 1.0, -0.3])]
    masks = noisy_gradient_mask(g, 3 / 7, scope="global")
    assert [m.dtype for m in masks] == [torch.bool, torch.bool]
    assert [m.shape for m in masks] == [g[0].shape, g[1].shape]
    assert masks[0].tolist() == [[True, False], [True, False]]
    assert masks[1].tolist() == [False, True, True]


def test_per_tensor_scope_prunes_each_tensor_alone():
    g = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 30.0, 40.0])]
    glob = noisy_gradient_mask(g, 0.5, scope="global")
    per = noisy_gradient_mask(g, 0.5, scope="per-tensor")
    assert glob[0].tolist() == [False] * 4 and glob[1].tolist() == [True] * 4
    assert per[0].tolist() == [False, False, True, True] and per[1].tolist() == [False, False, True, True]


def test_ties_are_broken_by_position_and_ratio_zero_keeps_all():
    g = [torch.tensor([1.0, -1.0, 1.0, 1.0, 2.0])]
    assert noisy_gradient_mask(g, 0.4)[0].tolist() == [False, False, True, True, True]
    assert noisy_gradient_mask(g, 0.0)[0].all()
    # floor(ratio * n): 0.3 * 10 is 3.0000000000000004 in floats, still 3 coordinates
    assert (~noisy_gradient_mask([torch.arange(10.0)], 0.3)[0]).sum() == 3


def test_mask_matches_a_full_sort_on_random_data():
    torch.manual_seed(0)
    g = [torch.randn(30, 7), torch.randn(5), torch.randn(2, 3, 4)]
    flat = torch.cat([t.reshape(-1) for t in g])
    k = int(0.37 * flat.numel())
    expected = torch.ones(flat.numel(), dtype=torch.bool)
    expected[flat.abs().argsort(stable=True)[:k]] = False
    got = torch.cat([m.reshape(-1) for m in noisy_gradient_mask(g, 0.37)])
    assert torch.equal(got, expected)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, True, "0.2"])
def test_bad_ratio_is_a_value_error(ratio):
    with pytest.raises(ValueError, match="grad_prune_ratio"):
        noisy_gradient_mask([torch.ones(3)], ratio)


def test_bad_scope_is_a_value_error():
    with pytest.raises(ValueError, match="prune_scope"):
        noisy_gradient_mask([torch.ones(3)], 0.2, scope="layer")


# ---------------------------------------------------------------- the optimizer

def _setup(sigma=3.0, ratio=0.5, inner="sgd", pruned_state="advance", seed=7):
    from opacus import GradSampleModule

    torch.manual_seed(0)
    net = nn.Linear(20, 10).double()
    gsm = GradSampleModule(net)
    inner_opt = (torch.optim.SGD(net.parameters(), lr=1.0) if inner == "sgd"
                 else torch.optim.Adam(net.parameters(), lr=0.1))
    opt = UpdatePruningDPOptimizer(inner_opt, noise_multiplier=sigma, max_grad_norm=1.0, expected_batch_size=4,
                                   grad_prune_ratio=ratio, pruned_state=pruned_state,
                                   generator=torch.Generator().manual_seed(seed))
    x = torch.randn(4, 20, dtype=torch.float64)
    y = torch.randn(4, 10, dtype=torch.float64)
    return net, gsm, opt, x, y


def _backward(gsm, x, y):
    ((gsm(x) - y) ** 2).sum(dim=1).mean().backward()


def test_mask_is_computed_from_the_noisy_gradient_not_the_clean_one():
    net, gsm, opt, x, y = _setup(sigma=3.0, ratio=0.5)
    theta0 = [p.detach().clone() for p in net.parameters()]
    _backward(gsm, x, y)
    # The clean clipped sum, recomputed independently from Opacus' per-example gradients ...
    gs = [p.grad_sample.detach().clone() for p in net.parameters()]
    norms = torch.stack([g.reshape(4, -1).norm(dim=1) for g in gs], dim=1).norm(dim=1)
    factor = (1.0 / (norms + 1e-6)).clamp(max=1.0)
    clean = [torch.einsum("i,i...->...", factor, g) for g in gs]
    # ... and the noisy gradient, replaying the noise generator (same seed, same draw order).
    gen = torch.Generator().manual_seed(7)
    noisy = [(c + torch.normal(0.0, 3.0, c.shape, generator=gen, dtype=c.dtype)) / 4 for c in clean]
    opt.step()
    update = torch.cat([(t0 - p.detach()).reshape(-1) for t0, p in zip(theta0, net.parameters())])  # lr = 1
    flat_noisy = torch.cat([n.reshape(-1) for n in noisy])
    flat_clean = torch.cat([c.reshape(-1) for c in clean])
    k = flat_noisy.numel() // 2
    smallest_noisy = set(flat_noisy.abs().argsort()[:k].tolist())
    smallest_clean = set(flat_clean.abs().argsort()[:k].tolist())
    zeroed = set((update == 0).nonzero().reshape(-1).tolist())
    assert zeroed == smallest_noisy
    assert len(smallest_noisy & smallest_clean) < 0.75 * k  # the test can tell the two apart
    kept = update != 0
    assert torch.allclose(update[kept], flat_noisy[kept], atol=1e-12)
    assert opt.last_kept_fraction == pytest.approx((flat_noisy.numel() - k) / flat_noisy.numel())
    assert all(p.summed_grad is None for p in net.parameters())  # the clean sum is gone after the noise


def test_mask_function_only_ever_sees_noisy_gradients(monkeypatch):
    import toolkit.privacy.update_pruning as up

    seen = []
    real = up.noisy_gradient_mask
    monkeypatch.setattr(up, "noisy_gradient_mask", lambda grads, *a, **k: seen.append(
        [g.detach().clone() for g in grads]) or real(grads, *a, **k))
    net, gsm, opt, x, y = _setup(sigma=0.0, ratio=0.3)
    _backward(gsm, x, y)
    gs = [p.grad_sample.detach().clone() for p in net.parameters()]
    opt.step()
    # σ = 0: the "noisy" gradient equals the clipped mean, so what the mask saw is exactly p.grad after scaling
    norms = torch.stack([g.reshape(4, -1).norm(dim=1) for g in gs], dim=1).norm(dim=1)
    factor = (1.0 / (norms + 1e-6)).clamp(max=1.0)
    expected = [torch.einsum("i,i...->...", factor, g) / 4 for g in gs]
    assert len(seen) == 1 and all(torch.allclose(s, e) for s, e in zip(seen[0], expected))


def _adam_two_steps(pruned_state):
    net, gsm, opt, x, y = _setup(sigma=1.0, ratio=0.5, inner="adam", pruned_state=pruned_state)
    opt.grad_prune_ratio = 0.0  # first step: every coordinate gets Adam state
    _backward(gsm, x, y)
    opt.step()
    opt.zero_grad()
    opt.grad_prune_ratio = 0.5
    before = {id(p): (p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone())
              for p in net.parameters()}
    _backward(gsm, x, y)
    seen = []   # the masked noisy gradient the inner optimizer gets: 0 exactly where pruned (noise is never 0)
    opt.original_optimizer.register_step_pre_hook(lambda o, args, kwargs: seen.extend(p.grad != 0 for p in opt.params))
    opt.step()
    return net, opt, before, seen


def test_freeze_leaves_pruned_coordinates_and_their_adam_state_untouched():
    net, opt, before, masks = _adam_two_steps("freeze")
    for p, keep in zip(net.parameters(), masks):
        theta, m, v = before[id(p)]
        pruned = ~keep
        assert pruned.any() and keep.any()
        assert torch.equal(p.detach()[pruned], theta[pruned])
        assert torch.equal(opt.state[p]["exp_avg"][pruned], m[pruned])
        assert torch.equal(opt.state[p]["exp_avg_sq"][pruned], v[pruned])
        assert not torch.equal(p.detach()[keep], theta[keep])  # kept coordinates do move


def test_advance_moves_pruned_coordinates_state():
    net, opt, before, masks = _adam_two_steps("advance")
    for p, keep in zip(net.parameters(), masks):
        theta, m, v = before[id(p)]
        pruned = ~keep
        # gradient 0 at pruned coordinates: Adam's moments decay, and momentum still moves the weight
        assert torch.allclose(opt.state[p]["exp_avg"][pruned], 0.9 * m[pruned])
        assert torch.allclose(opt.state[p]["exp_avg_sq"][pruned], 0.999 * v[pruned])
        assert (p.detach()[pruned] != theta[pruned]).all()


def test_optimizer_rejects_bad_options():
    net = nn.Linear(2, 1)
    for kwargs in [dict(grad_prune_ratio=1.0), dict(prune_scope="layer"), dict(pruned_state="skip")]:
        with pytest.raises(ValueError):
            UpdatePruningDPOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), noise_multiplier=1.0,
                                     max_grad_norm=1.0, expected_batch_size=2, **kwargs)
