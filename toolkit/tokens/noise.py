"""Heuristic fusion noise (Dual-Priv step 5): Gaussian noise on the fused (contextual) tokens only.

**This noise is outside the differential-privacy guarantee.** The (ε, δ) guarantee of a run comes from DP-SGD
on the per-example gradient (per-example clipping + Gaussian noise, tracked by the accountant), which already
covers everything computed from an example in the forward pass, fused tokens included. Fusion noise is a
heuristic regulariser the paper adds on top; it neither adds to nor is needed for the guarantee, and no ε is
ever computed from it.
"""
from __future__ import annotations

import math

import torch


def _check_sigma(sigma: float) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"fusion noise std must be a finite number >= 0, got {sigma!r}")
    return float(sigma)


def fusion_noise(output_or_shape, sigma: float, generator: torch.Generator | None = None,
                 contextual_slots: torch.Tensor | None = None, device=None, dtype=None) -> torch.Tensor:
    """Per-example Gaussian noise N(0, σ² I) on the contextual slots, zero elsewhere: ``[B, n_out, d]``.

    Args:
        output_or_shape: a :class:`~toolkit.tokens.PruneOutput` (shape, slots, device and dtype are taken from
            it), or a shape ``(B, n_out, d)`` together with ``contextual_slots``.
        sigma: the noise std σ_fuse (see :func:`matched_fusion_sigma`); 0 gives zeros.
        generator: a ``torch.Generator`` for reproducible draws (its device is where the draw happens).
        contextual_slots: positions within the ``n_out`` tokens that hold fused tokens (shape form only).

    Each example's rows are independent draws. Pass the result as ``lm(features, ids, mask, fusion_noise=noise)``.
    Heuristic: outside the DP guarantee (see the module docstring).
    """
    sigma = _check_sigma(sigma)
    if hasattr(output_or_shape, "features") and hasattr(output_or_shape, "contextual_slots"):
        shape = tuple(output_or_shape.features.shape)
        slots = output_or_shape.contextual_slots
        device = device or output_or_shape.features.device
        dtype = dtype or output_or_shape.features.dtype
    else:
        shape = tuple(int(s) for s in output_or_shape)
        if len(shape) != 3:
            raise ValueError(f"fusion noise shape must be (batch, n_out, d), got {shape}")
        if contextual_slots is None:
            raise ValueError("give contextual_slots (e.g. pruner.contextual_slots) with a shape, or pass a PruneOutput")
        slots = contextual_slots
    slots = torch.as_tensor(slots, dtype=torch.long)
    if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= shape[1]):
        raise ValueError(f"contextual slots {slots.tolist()} fall outside the {shape[1]} visual tokens")
    dtype = dtype or torch.float32
    noise = torch.zeros(shape, device=device, dtype=dtype)
    if sigma == 0 or slots.numel() == 0:
        return noise
    draw_device = generator.device if generator is not None else noise.device
    draw = torch.randn((shape[0], slots.numel(), shape[2]), generator=generator, device=draw_device)
    noise[:, slots.to(noise.device)] = (draw * sigma).to(device=noise.device, dtype=dtype)
    return noise


def matched_fusion_sigma(noise_multiplier: float, max_grad_norm: float, expected_batch_size: float,
                         feature_scale: float = 1.0) -> float:
    """σ_fuse = feature_scale · noise_multiplier · max_grad_norm / expected_batch_size  (a heuristic).

    Reasoning: DP-SGD adds N(0, σ² C² I) to the *sum* of clipped per-example gradients and divides by the
    expected batch size B, so each coordinate of the averaged update carries noise of std σ·C/B. "Matching the
    fusion noise to the DP noise" (the paper's wording, without a formula) is read here as giving each
    coordinate of a fused token that same std. Features and gradients live in different units, so the match is
    only in magnitude: ``feature_scale`` lets a sweep rescale it (e.g. by the features' RMS). It has no privacy
    meaning: the DP guarantee comes from DP-SGD alone.
    """
    values = dict(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                  expected_batch_size=expected_batch_size, feature_scale=feature_scale)
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    if expected_batch_size <= 0:
        raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
    if feature_scale < 0:
        raise ValueError(f"feature_scale must be >= 0, got {feature_scale}")
    return float(feature_scale * noise_multiplier * max_grad_norm / expected_batch_size)
