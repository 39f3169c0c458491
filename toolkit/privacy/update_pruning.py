"""Mechanism 2: gradient-update pruning of the *noisy* DP gradient, as an Opacus ``DPOptimizer``.

One step of :class:`UpdatePruningDPOptimizer`::

    g_i   = per-example gradient                      (Opacus GradSampleModule)
    ḡ_i   = g_i · min(1, C / ‖g_i‖)                   (clip, Opacus)
    s     = Σ_i ḡ_i                                   (sum, Opacus)
    g̃     = (s + N(0, σ²C² I)) / B_expected           (noise drawn in ≥ fp32, then scale)
    m     = noisy_gradient_mask(g̃, p)                 (keep all but the fraction p of smallest |g̃_j|)
    θ     ← inner_optimizer.step(g̃ ⊙ m)

``m`` is computed from ``g̃`` alone, so it is post-processing of the Gaussian mechanism's output and
costs no privacy. The clean sum ``s`` (``p.summed_grad`` in Opacus) is discarded right after the
noise is added: nothing after that point can read it.

What happens to a pruned coordinate (the paper does not say; ``pruned_state``):

* ``"advance"`` (default): the inner optimizer steps with gradient 0 there. Its state still advances:
  Adam's moments decay (m ← β₁m, v ← β₂v) and the coordinate still moves by the decayed momentum;
  SGD momentum still moves it; decoupled weight decay (AdamW) still shrinks it.
* ``"freeze"``: the coordinate is untouched this step: after the inner step its parameter value and
  every per-parameter state tensor of the parameter's shape (Adam's ``exp_avg``/``exp_avg_sq``, SGD's
  ``momentum_buffer``) are restored at the pruned positions. Scalar/shared state (Adam's ``step``
  count, used for bias correction) is per tensor and still advances.

Example::

    >>> import torch
    >>> from toolkit.privacy.update_pruning import noisy_gradient_mask
    >>> g = [torch.tensor([0.3, -0.1, 2.0, 0.05])]
    >>> noisy_gradient_mask(g, 0.5)[0].tolist()
    [True, False, True, False]
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

from toolkit.compat import opacus_check_unprocessed, opacus_mark_processed, opacus_noise
from toolkit.privacy.update_masks import PRUNE_SCOPES, PreNoiseMask, check_ratio, check_scope, magnitude_mask

PRUNED_STATES = ("advance", "freeze")


def noisy_gradient_mask(noisy_grads: list[torch.Tensor], grad_prune_ratio: float,
                        scope: str = "global") -> list[torch.Tensor]:
    """Keep-masks (True = keep) that zero the ``grad_prune_ratio`` fraction of smallest-|g| coordinates.

    Args:
        noisy_grads: the noisy (post-noise) gradient tensors; this function must never see clean ones.
        grad_prune_ratio: fraction in [0, 1) to zero; 0 keeps everything. ``floor(ratio · n)`` coordinates
            are pruned (n = all coordinates for ``global``, each tensor's own size for ``per-tensor``).
        scope: ``"global"`` ranks all coordinates of all tensors together; ``"per-tensor"`` ranks each
            tensor on its own (every tensor loses the same fraction).

    Ties are broken by position (flattened, in list order): the mask is deterministic.
    Magnitudes are compared in at least fp32.
    """
    if not isinstance(noisy_grads, (list, tuple)) or not all(torch.is_tensor(g) for g in noisy_grads):
        raise TypeError("noisy_grads must be a list of tensors")
    return magnitude_mask(list(noisy_grads), grad_prune_ratio, scope)


class _UpdatePruningMixin:
    """Shared by the per-sample-gradient and the ghost-clipping optimizers (see the module docstring)."""

    def _init_pruning(self, grad_prune_ratio: float, prune_scope: str, pruned_state: str,
                      pre_noise_mask: PreNoiseMask | None = None) -> None:
        self.grad_prune_ratio = check_ratio(grad_prune_ratio)
        self.prune_scope = check_scope(prune_scope)
        if pruned_state not in PRUNED_STATES:
            raise ValueError(f"unknown pruned_state {pruned_state!r}; choose one of {PRUNED_STATES}")
        if pre_noise_mask is not None and not isinstance(pre_noise_mask, PreNoiseMask):
            raise TypeError("pre_noise_mask must be a toolkit.privacy.update_masks.PreNoiseMask")
        self.pruned_state = pruned_state
        self.pre_noise_mask = pre_noise_mask
        self.last_kept_fraction = 1.0
        self._masks: list[torch.Tensor] | None = None
        self._step_mask: list[torch.Tensor] | None = None

    def _pre_noise_masks(self) -> list[torch.Tensor] | None:
        """The step's pre-noise mask, fixed once per (logical) step from public information only."""
        if self.pre_noise_mask is None:
            return None
        if self._step_mask is None:
            self._step_mask = self.pre_noise_mask.mask(self.params)
        return self._step_mask

    def clip_and_accumulate(self) -> None:
        """With a pre-noise mask, per-example gradients are masked BEFORE clipping, so C bounds what is released."""
        masks = self._pre_noise_masks()
        if masks is not None:
            for p, keep in zip(self.params, masks):
                p.grad_sample = p.grad_sample * keep.to(p.grad_sample.dtype)
        super().clip_and_accumulate()

    def add_noise(self) -> None:
        """``p.grad = s + N(0, σ²C²)`` with the noise drawn and added in at least fp32 (bf16 params too)."""
        sigma = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        masks = self._pre_noise_masks() or [None] * len(self.params)
        for p, keep in zip(self.params, masks):
            opacus_check_unprocessed(p.summed_grad)
            summed = p.summed_grad.to(torch.promote_types(p.summed_grad.dtype, torch.float32))
            noise = opacus_noise(std=sigma * self.max_grad_norm, reference=summed,
                                    generator=self.generator, secure_mode=self.secure_mode)
            if keep is not None:
                noise = noise * keep  # noise only where the update may go (the mask is public)
            p.grad = (summed + noise).to(p.dtype).view_as(p)
            opacus_mark_processed(p.summed_grad)

    def pre_step(self, closure: Optional[Callable[[], float]] = None) -> Optional[bool]:
        """Opacus' clip -> sum -> noise -> scale (-> accountant hook), then the noisy-gradient mask."""
        self._masks = None
        if not super().pre_step(closure):
            return False  # a skipped (accumulating) step: nothing noised yet, keep the clean sum for later
        params = self.params
        # The noise is in p.grad now; drop the clean sum so nothing below (or any hook) can read it.
        for p in params:
            p.summed_grad = None
        if self.pre_noise_mask is not None:
            masks, self._step_mask = self._step_mask, None
            kept = sum(int(m.sum()) for m in masks) if masks is not None else sum(p.numel() for p in params)
            self.last_kept_fraction = kept / max(sum(p.numel() for p in params), 1)
            self._masks = masks
            self.pre_noise_mask.observe([p.grad for p in params])  # the released update: public from now on
            return True
        if self.grad_prune_ratio == 0.0:
            self.last_kept_fraction = 1.0
            return True
        masks = noisy_gradient_mask([p.grad for p in params], self.grad_prune_ratio, self.prune_scope)
        kept = total = 0
        for p, mask in zip(params, masks):
            p.grad.mul_(mask)
            kept += int(mask.sum())
            total += mask.numel()
        self.last_kept_fraction = kept / max(total, 1)
        self._masks = masks
        return True

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        if closure is not None:
            with torch.enable_grad():
                closure()
        if not self.pre_step():
            return None
        if self.pruned_state == "advance" or self._masks is None:
            return self.original_optimizer.step()
        saved = self._save_pruned()
        out = self.original_optimizer.step()
        self._restore_pruned(saved)
        return out

    # "freeze": remember the pruned coordinates of each parameter and of its same-shape state tensors.
    def _save_pruned(self) -> list:
        saved = []
        for p, keep in zip(self.params, self._masks):
            pruned = ~keep
            if not bool(pruned.any()):
                saved.append(None)
                continue
            state = self.original_optimizer.state.get(p, {})
            tensors = {k: v[pruned].clone() for k, v in state.items()
                       if torch.is_tensor(v) and v.shape == p.shape}
            saved.append((pruned, p.detach()[pruned].clone(), tensors))
        return saved

    def _restore_pruned(self, saved: list) -> None:
        with torch.no_grad():
            for p, item in zip(self.params, saved):
                if item is None:
                    continue
                pruned, values, tensors = item
                p[pruned] = values
                state = self.original_optimizer.state.get(p, {})
                for k, v in tensors.items():
                    state[k][pruned] = v


class UpdatePruningDPOptimizer(_UpdatePruningMixin, DPOptimizer):
    """Opacus ``DPOptimizer`` (per-sample gradients: hooks / functorch) + update pruning of the noisy gradient.

    Args:
        optimizer: the inner optimizer (SGD, Adam, AdamW, ...) over the module's trainable parameters.
        noise_multiplier: σ; noise std is σ·C on the summed clipped gradient.
        max_grad_norm: C, the per-example L2 clipping norm.
        expected_batch_size: q·N; the noisy sum is divided by it (not by the realised batch size).
        grad_prune_ratio: fraction of smallest-|noisy grad| coordinates zeroed each step, in [0, 1).
        prune_scope: ``"global"`` or ``"per-tensor"`` (see :func:`noisy_gradient_mask`).
        pruned_state: ``"advance"`` or ``"freeze"`` (see the module docstring).
        pre_noise_mask: a :class:`toolkit.privacy.update_masks.PreNoiseMask` fixing the update's support before
            the noise (per-example gradients masked before clipping, noise only on kept coordinates); None: the
            paper's post-noise mask from ``grad_prune_ratio``.
        Other keyword arguments go to Opacus' ``DPOptimizer`` (``generator``, ``secure_mode``, ...).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: int, grad_prune_ratio: float = 0.0, prune_scope: str = "global",
                 pruned_state: str = "advance", loss_reduction: str = "mean",
                 pre_noise_mask: PreNoiseMask | None = None, **kwargs):
        self._init_pruning(grad_prune_ratio, prune_scope, pruned_state, pre_noise_mask)
        super().__init__(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, loss_reduction=loss_reduction, **kwargs)


class UpdatePruningDPOptimizerFastGradientClipping(_UpdatePruningMixin, DPOptimizerFastGradientClipping):
    """The same for Opacus ghost clipping (``DPOptimizerFastGradientClipping``): ``p.grad`` arrives clipped
    and summed from the second backward pass; noise, scaling and the mask then follow as above."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: int, grad_prune_ratio: float = 0.0, prune_scope: str = "global",
                 pruned_state: str = "advance", loss_reduction: str = "mean", **kwargs):
        self._init_pruning(grad_prune_ratio, prune_scope, pruned_state)
        super().__init__(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, loss_reduction=loss_reduction, **kwargs)
