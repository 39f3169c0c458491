"""DP-AdamBC: Adam whose second moment is corrected for the variance the DP noise adds.

Under DP-SGD every coordinate of the privatized gradient carries N(0, Φ) noise with Φ = (σ·C / B_expected)².
Adam's second moment then estimates E[g²] + Φ, and once Φ dominates, Adam's step m̂ / √v̂ degenerates into
SGD scaled by 1/√Φ. DP-AdamBC (Tang et al., AAAI 2024) subtracts the known Φ::

    m_t = β₁ m_{t-1} + (1 - β₁) g_t                 v_t = β₂ v_{t-1} + (1 - β₂) g_t²
    m̂_t = m_t / (1 - β₁ᵗ)                           v̂_t = v_t / (1 - β₂ᵗ)
    θ_t = θ_{t-1} - lr · m̂_t / √max(v̂_t - Φ, γ)

It only post-processes the privatized gradient, so it costs no privacy. ``Φ = 0`` is Adam with ε-root γ.

Example::

    >>> import torch
    >>> from toolkit.privacy.adam_bc import DPAdamBC, noise_variance
    >>> w = torch.zeros(3, requires_grad=True)
    >>> opt = DPAdamBC([w], lr=0.1, noise_variance=noise_variance(1.0, 1.0, 64))
    >>> w.grad = torch.ones(3); opt.step(); bool((w < 0).all())
    True
"""
from __future__ import annotations

import math

import torch


def noise_variance(noise_multiplier: float, max_grad_norm: float, expected_batch_size: int) -> float:
    """Φ = (σ·C / B_expected)², the per-coordinate variance of the noise in the averaged DP gradient."""
    return (float(noise_multiplier) * float(max_grad_norm) / float(expected_batch_size)) ** 2


class DPAdamBC(torch.optim.Optimizer):
    """Adam with the DP noise variance ``noise_variance`` (Φ) removed from the second moment (see module doc).

    Args:
        params: parameters to optimise.
        lr, betas: as Adam.
        noise_variance: Φ = (σC/B)² (:func:`noise_variance`); 0 gives Adam.
        gamma: floor γ of the corrected second moment (keeps the step finite when v̂ ≤ Φ). Default ``Φ / 10``
            (+1e-12): relative to the noise, so a coordinate whose v̂ is all noise moves at most about √10 times
            as far as plain Adam would move it; the paper tunes γ as a hyper-parameter.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 noise_variance: float = 0.0, gamma: float | None = None):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if not (noise_variance >= 0 and math.isfinite(noise_variance)):
            raise ValueError(f"noise_variance must be a finite number >= 0, got {noise_variance!r}")
        if gamma is None:
            gamma = noise_variance / 10 + 1e-12
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma!r}")
        super().__init__(params, dict(lr=lr, betas=betas, noise_variance=noise_variance, gamma=gamma))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                grad = p.grad
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                m_hat = state["exp_avg"] / (1 - beta1 ** t)
                v_hat = state["exp_avg_sq"] / (1 - beta2 ** t)
                denominator = (v_hat - group["noise_variance"]).clamp(min=group["gamma"]).sqrt()
                p.addcdiv_(m_hat, denominator, value=-group["lr"])
        return loss
