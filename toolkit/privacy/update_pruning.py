"""Mechanism 2: gradient-update pruning of the *noisy* DP gradient, as an Opacus ``DPOptimizer``.

One step of :class:`UpdatePruningDPOptimizer`::

    g_i   = per-example gradient                      (Opacus GradSampleModule, in the parameter dtype)
    ḡ_i   = g_i · min(1, C / (‖g_i‖ + 1e-6))          (clip: norms, factors and products in ≥ fp32)
    s     = Σ_i ḡ_i                                   (sum in ≥ fp32, kept across physical chunks)
    g̃     = (s + N(0, σ²C² I)) / B_expected           (noise drawn and added in ≥ fp32, scaled, rounded once)
    m     = noisy_gradient_mask(g̃, p)                 (keep all but the fraction p of smallest |g̃_j|)
    θ     ← inner_optimizer.step(g̃ ⊙ m)

Precision: with bf16 parameters Opacus' own ``clip_and_accumulate`` computes the norms, casts the clipping
factors to bf16 and sums in bf16, so a clipped example could weigh up to ~0.5 % more than C (measured: 1.0052·C)
and ε was under-reported. Here everything from the per-example norm to the noisy mean is computed in
``promote_types(param dtype, float32)`` and only the final noisy mean ``g̃`` is rounded to the parameter dtype
(post-processing: it costs no privacy). ``s`` therefore lives in fp32 for bf16 parameters.

Physical chunks (Opacus' ``BatchMemoryManager`` mechanism): a Poisson logical batch may be processed in several
backward passes; each pass's per-example gradients are clipped and added to ``s`` (``signal_skip_step`` makes
``step`` stop after the clipping), and the last pass adds the noise ONCE and takes ONE optimizer and accountant
step. :meth:`toolkit.privacy.DPEngine.step` drives it.

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

import math
from typing import Callable, Optional

import torch
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

from toolkit.compat import opacus_check_unprocessed, opacus_mark_processed, opacus_noise, opacus_release_grad_sample
from toolkit.distributed import all_reduce_sum
from toolkit.secret_random import reseed_from_os
from toolkit.privacy.update_masks import (PRUNE_SCOPES, PreNoiseMask, check_ratio, check_scope, kept_count,
                                         magnitude_mask)

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
                      pre_noise_mask: PreNoiseMask | None = None, distributed: bool = False) -> None:
        if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError("distributed=True needs an initialised torch.distributed process group")
        self.distributed = bool(distributed)
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

    def add_noise(self) -> None:
        """``p.grad = round_to_param_dtype((s + N(0, σ²C²)) / (B_expected · accumulated))``.

        The noise is drawn in ``promote_types(param dtype, float32)`` (never in bf16: a bf16 draw is a
        coarser, different mechanism), added to the ≥ fp32 clipped sum, divided by the expected batch size
        in that precision, and rounded to the parameter dtype once. The division is done here rather than in
        Opacus' ``scale_grad`` (a no-op below), which would divide the already-rounded bf16 value.

        Distributed (``distributed=True``, see :mod:`toolkit.distributed`): ``s`` is this rank's clipped sum;
        only rank 0 adds the noise, then ONE all-reduce (SUM, ≥ fp32) gives every rank ``Σ_ranks s + noise``
        before the division, the rounding and the mask, so every rank computes the same mask and update.
        """
        sigma = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        divisor = self._mean_divisor()
        add_noise_here = not self.distributed or torch.distributed.get_rank() == 0
        masks = self._pre_noise_masks() or [None] * len(self.params)
        noisy = []
        for p, keep in zip(self.params, masks):
            opacus_check_unprocessed(p.summed_grad)
            summed = p.summed_grad.to(_exact_dtype(p))   # the same tensor when already ≥ fp32
            if add_noise_here:
                noise = self._draw_noise(sigma * self.max_grad_norm, summed)
                if keep is not None:
                    noise.mul_(keep)  # noise only where the update may go (the mask is public)
                # in place: the clean sum is overwritten (nothing can read it afterwards) and no third copy exists
                summed.add_(noise)
                del noise
            opacus_mark_processed(p.summed_grad)
            if self.distributed:
                noisy.append(summed)  # reduced below, all tensors in one call
            else:
                p.grad = summed.div_(divisor).to(p.dtype).view_as(p)
        if self.distributed:
            for p, total in zip(self.params, all_reduce_sum(noisy)):
                p.grad = (total / divisor).to(p.dtype).view_as(p)

    def _draw_noise(self, std: float, reference: torch.Tensor) -> torch.Tensor:
        """N(0, std²) shaped like ``reference`` (≥ fp32), from the engine's generator; in secure mode the whole
        generator state comes from the OS before every draw."""
        if self.secure_mode:
            reseed_from_os(self.generator)
        return opacus_noise(std=std, reference=reference, generator=self.generator, secure_mode=self.secure_mode)

    def _mean_divisor(self) -> float:
        if self.loss_reduction == "mean":
            return float(self.expected_batch_size * self.accumulated_iterations)
        return 1.0

    def scale_grad(self) -> None:
        """Nothing: :meth:`add_noise` already divided by ``B_expected`` before rounding (see there)."""

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
            kept = kept_count(masks) if masks is not None else sum(p.numel() for p in params)
            self.last_kept_fraction = kept / max(sum(p.numel() for p in params), 1)
            self._masks = masks
            self.pre_noise_mask.observe([p.grad for p in params])  # the released update: public from now on
            return True
        if self.grad_prune_ratio == 0.0:
            self.last_kept_fraction = 1.0
            return True
        masks = noisy_gradient_mask([p.grad for p in params], self.grad_prune_ratio, self.prune_scope)
        for p, mask in zip(params, masks):
            # (not mul_(mask) or mask.sum(): they copy the mask to the gradient's dtype / int64, up to 8 B a value)
            p.grad.masked_fill_(~mask, 0)
        self.last_kept_fraction = kept_count(masks) / max(sum(mask.numel() for mask in masks), 1)
        self._masks = masks if self.pruned_state == "freeze" else None   # only "freeze" reads them after the step
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


def _exact_dtype(p: torch.Tensor) -> torch.dtype:
    """The precision of every privacy-relevant quantity for parameter ``p``: at least fp32 (fp64 stays fp64)."""
    return torch.promote_types(p.dtype, torch.float32)


# Low-precision per-example gradients are promoted to fp32 a block of columns at a time, so the fp32 transient is
# bounded (B x block <= 2**24 elements = 64 MiB) instead of a full [B, P] fp32 copy of every parameter's gradients.
_BLOCK_ELEMENTS = 1 << 24


def _column_blocks(flat: torch.Tensor):
    width = max(1, _BLOCK_ELEMENTS // max(1, flat.shape[0]))
    for start in range(0, flat.shape[1], width):
        yield slice(start, start + width)


def per_example_clip_factors(grad_samples: list[torch.Tensor], max_grad_norm: float) -> torch.Tensor:
    """``c_i = min(1, C / (‖g_i‖ + 1e-6))`` with ``‖g_i‖`` the norm over every parameter, all in ≥ fp32.

    ``grad_samples``: one ``[B, *param.shape]`` tensor per parameter (any float dtype). The squares are summed in
    ≥ fp32 (block by block, never in bf16). Returns ``[B]`` in ``promote_types(float32, every grad dtype)``.
    """
    dtype = torch.float32
    for g in grad_samples:
        dtype = torch.promote_types(dtype, g.dtype)
    device = grad_samples[0].device
    if len(grad_samples[0]) == 0:
        return torch.zeros((0,), device=device, dtype=dtype)
    squares = torch.zeros(len(grad_samples[0]), device=device, dtype=dtype)
    for g in grad_samples:
        flat = g.reshape(g.shape[0], math.prod(g.shape[1:]))
        for cols in _column_blocks(flat):
            squares += flat[:, cols].to(dtype).pow(2).sum(dim=1).to(device)
    return (max_grad_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)


def clipped_sum(grad_sample: torch.Tensor, factors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``Σ_i c_i g_i`` in ``dtype`` (≥ fp32), shaped like one example's gradient; blockwise (see above)."""
    # explicit width: an empty batch (Poisson) has 0 rows, where reshape(0, -1) is ambiguous
    flat = grad_sample.reshape(grad_sample.shape[0], math.prod(grad_sample.shape[1:]))
    factors = factors.to(device=flat.device, dtype=dtype)
    out = torch.empty(flat.shape[1], device=flat.device, dtype=dtype)
    for cols in _column_blocks(flat):
        out[cols] = factors @ flat[:, cols].to(dtype)
    return out.view(grad_sample.shape[1:])


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
        distributed: data-parallel ranks: noise on rank 0 only, one all-reduce before the mask (:meth:`add_noise`).
        Other keyword arguments go to Opacus' ``DPOptimizer`` (``generator``, ``secure_mode``, ...).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: int, grad_prune_ratio: float = 0.0, prune_scope: str = "global",
                 pruned_state: str = "advance", loss_reduction: str = "mean",
                 pre_noise_mask: PreNoiseMask | None = None, distributed: bool = False, **kwargs):
        self._init_pruning(grad_prune_ratio, prune_scope, pruned_state, pre_noise_mask, distributed)
        super().__init__(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, loss_reduction=loss_reduction, **kwargs)

    def clip_and_accumulate(self) -> None:
        """``p.summed_grad += Σ_i c_i g_i`` in ≥ fp32 (Opacus' version rounds ``c_i`` and the sum to the
        parameter dtype). Called once per physical chunk; the sum carries over until the noise is added.
        With a pre-noise mask, per-example gradients are masked BEFORE clipping, so C bounds what is released."""
        grad_samples = self.grad_samples
        masks = self._pre_noise_masks()
        if masks is not None:
            grad_samples = [g * keep.to(g.dtype) for g, keep in zip(grad_samples, masks)]
        factors = per_example_clip_factors(grad_samples, self.max_grad_norm)
        for i, p in enumerate(self.params):
            opacus_check_unprocessed(p.grad_sample)
            grad = clipped_sum(grad_samples[i], factors, _exact_dtype(p))
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad
            opacus_mark_processed(p.grad_sample)
            # Consumed: this chunk's per-example gradients and autograd's raw (unclipped, un-noised) gradient.
            # Freed now, not at zero_grad, so they never coexist with the noise below (the step's memory peak).
            grad_samples[i] = None
            opacus_release_grad_sample(p)
            p.grad = None


class UpdatePruningDPOptimizerFastGradientClipping(_UpdatePruningMixin, DPOptimizerFastGradientClipping):
    """The same for Opacus ghost clipping (``DPOptimizerFastGradientClipping``): ``p.grad`` arrives clipped
    and summed from the second backward pass; noise, scaling and the mask then follow as above.

    The clipped sum comes from autograd in the parameter dtype, so ghost clipping is exact only with ≥ fp32
    parameters (:class:`toolkit.privacy.DPEngine` refuses it with bf16 ones)."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: int, grad_prune_ratio: float = 0.0, prune_scope: str = "global",
                 pruned_state: str = "advance", loss_reduction: str = "mean", distributed: bool = False, **kwargs):
        self._init_pruning(grad_prune_ratio, prune_scope, pruned_state, distributed=distributed)
        super().__init__(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, loss_reduction=loss_reduction, **kwargs)

    def accumulate(self) -> None:
        """``p.summed_grad += p.grad`` (one physical chunk's clipped sum) in ≥ fp32."""
        for p in self.params:
            grad = p.grad.detach().to(_exact_dtype(p))
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad.clone()


class UpdatePruningDPOptimizerGhostFp32(UpdatePruningDPOptimizerFastGradientClipping):
    """The optimizer of ``grad_sample_mode="ghost-fp32"`` (:mod:`toolkit.privacy.ghost_fp32`).

    Earlier physical chunks of a step leave their ≥ fp32 clipped sums in ``p.clipped_sum`` (:meth:`accumulate`
    adds them to ``p.summed_grad``). The step's last chunk runs with :meth:`noise_sink`: each block of the clipped
    sum gets the earlier chunks' sum, its share of N(0, σ²C²) (drawn in ≥ fp32), the division by ``B_expected`` and
    the rounding to the parameter dtype the moment the hooks produce it, into ``p.noisy_grad``; :meth:`add_noise`
    then only hands those to ``p.grad``. The same arithmetic as :meth:`_UpdatePruningMixin.add_noise`, block by
    block, so no whole-model fp32 sum or noise tensor ever exists. Data-parallel ranks use the accumulate path
    (the noisy sum must be all-reduced before the division and the mask)."""

    def noise_sink(self) -> Callable[[torch.Tensor, slice, torch.Tensor], None] | None:
        """The sink of a step's last chunk (None when distributed); see the class docstring."""
        if self.distributed:
            return None
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
        divisor = self._mean_divisor()

        def sink(p: torch.Tensor, rows: slice, block: torch.Tensor) -> None:
            if p.summed_grad is not None:   # the earlier chunks of this step
                block += p.summed_grad[rows]
            block += self._draw_noise(std, block)
            if getattr(p, "noisy_grad", None) is None:
                p.noisy_grad = torch.empty_like(p, memory_format=torch.contiguous_format)
            p.noisy_grad[rows] = block.div_(divisor).to(p.dtype)

        return sink

    def accumulate(self) -> None:
        """``p.summed_grad += p.clipped_sum`` (≥ fp32) for a chunk that was not noised in the hooks."""
        if self._noised_in_hooks():
            return
        for p in self.params:
            chunk = getattr(p, "clipped_sum", None)
            if chunk is None:
                raise RuntimeError("no clipped sum on a trainable parameter: step through DPEngine.step (ghost-fp32)")
            p.summed_grad = chunk if p.summed_grad is None else p.summed_grad.add_(chunk)
            p.clipped_sum = None

    def add_noise(self) -> None:
        """Hand the noisy gradients the sink wrote to ``p.grad`` (or noise the accumulated sum as the mixin does)."""
        if not self._noised_in_hooks():
            super().add_noise()
            return
        for p in self.params:
            p.grad, p.noisy_grad, p.summed_grad = p.noisy_grad, None, None

    def _noised_in_hooks(self) -> bool:
        noised = [getattr(p, "noisy_grad", None) is not None for p in self.params]
        if any(noised) and not all(noised):
            raise RuntimeError(f"{noised.count(False)} trainable parameter(s) got no noisy gradient from the hooks")
        return all(noised)
