"""DP-AdamBC: with no noise variance it is Adam; with Φ it removes the noise from the second moment."""
import pytest
import torch

from toolkit.privacy.adam_bc import DPAdamBC, noise_variance


def test_zero_noise_variance_is_adam():
    torch.manual_seed(0)
    a, b = torch.randn(50, requires_grad=True), None
    b = a.detach().clone().requires_grad_(True)
    bc, adam = DPAdamBC([a], lr=0.01, gamma=1e-16), torch.optim.Adam([b], lr=0.01, eps=0.0)
    for _ in range(5):
        g = torch.randn(50)
        a.grad, b.grad = g.clone(), g.clone()
        bc.step(), adam.step()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_noise_variance_is_subtracted_from_the_second_moment():
    phi = noise_variance(1.0, 1.0, 4)  # (σC/B)² = 1/16
    w = torch.zeros(1, requires_grad=True)
    opt = DPAdamBC([w], lr=1.0, betas=(0.0, 0.0), noise_variance=phi)
    w.grad = torch.tensor([0.5])  # v̂ = 0.25, corrected 0.25 - 0.0625
    opt.step()
    assert float(w) == pytest.approx(-0.5 / (0.25 - phi) ** 0.5)


def test_bad_arguments_are_refused():
    w = torch.zeros(1, requires_grad=True)
    for kwargs in [dict(lr=0), dict(noise_variance=-1.0), dict(betas=(1.0, 0.9)), dict(gamma=0.0)]:
        with pytest.raises(ValueError):
            DPAdamBC([w], **kwargs)
