"""The DP training engine: Opacus per-sample gradients + :mod:`update_pruning`'s optimizer + an accountant.

One call of :meth:`DPEngine.step` on the per-example losses ``L_i`` of a Poisson batch does::

    backward of mean_i L_i          -> Opacus: per-example gradients g_i = ∇L_i (hooks/functorch),
                                       or per-example norms only (ghost clipping, second backward)
    clip, sum, + N(0, σ²C² I)       -> norms, clipping factors, sum and noise in ≥ fp32 (bf16 params too)
    divide by expected_batch_size   -> B_expected = q·N, NOT the realised batch size (Poisson)
    update-pruning mask (M2)        -> from the noisy gradient only
    inner optimizer step, zero grads, accountant records (σ, q)

Per-sample-gradient modes (``grad_sample_mode``):

* ``"hooks"`` (default): Opacus' per-layer formulas (Linear, Embedding, ...); layers without one
  (``LlamaRMSNorm``) fall back to per-layer ``torch.func``. Memory: one ``[B, *param]`` tensor per
  trainable parameter, small for LoRA.
* ``"functorch"``: every layer through per-layer ``torch.func.vmap`` (a cross-check of ``hooks``).
* ``"ghost"``: Opacus ghost clipping: per-example gradient *norms* without instantiating per-example
  gradients, then a second backward of ``Σ_i c_i L_i`` with the clipping factors ``c_i`` (fp32 parameters only).
* ``"ghost-fp32"``: ghost clipping whose norms and clipped sum are computed in ≥ fp32 inside the hooks
  (:mod:`toolkit.privacy.ghost_fp32`): exact with bf16 parameters, no per-example gradient held; trainable
  nn.Linear layers only. The lean mode of the 7B preset.
* ``"ghost-fp32-bk"``: the same arithmetic in ONE backward (book-keeping: each layer's input and output gradient
  are kept from the norms' pass for the clipped sum): faster, at the memory of holding them.

A logical batch too large for the device is given as a list of chunk closures (physical batches): each chunk's
per-example gradients are clipped and added to an fp32 sum, and only the last chunk adds the noise and takes the
step (:meth:`DPEngine.step`), so the accountant sees one step at the logical batch's rate q.

Evaluate with ``torch.no_grad()`` (hooks capture nothing then) and keep the module in train mode for
steps (Opacus captures activations only in train mode; dropout is 0 in these models).

Checkpoints: :meth:`DPEngine.state_dict` holds the noise generator's state so that a resumed run is
bit-identical to an uninterrupted one. That state is SECRET (it determines the noise): keep it with
private data, never release it with the model.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from toolkit.privacy import make_private
    >>> net = nn.Linear(3, 1)
    >>> engine = make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), noise_multiplier=1.0,
    ...                       max_grad_norm=1.0, expected_batch_size=4, sample_rate=0.04, noise_seed=0)
    >>> x, y = torch.randn(4, 3), torch.randn(4)
    >>> loss = engine.step((engine.module(x).squeeze(1) - y) ** 2)
    >>> engine.steps_taken, round(engine.epsilon(1e-5), 1) > 0
    (1, True)
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn

from toolkit.compat import opacus_captured_batch_size, opacus_forget_captures, opacus_reset_accumulation
from toolkit.secret_random import restore_generator_state, seeded_generator

from .accounting import accountant_state, check_sampled_step, epsilon_spent, make_accountant, resume_accountant
from .engine_checks import check_parameters, check_precision, positive_number
from .update_masks import PreNoiseMask, check_ratio, check_scope
from .ghost_fp32 import GhostFp32Module
from .update_pruning import (
    PRUNED_STATES, UpdatePruningDPOptimizer, UpdatePruningDPOptimizerFastGradientClipping,
    UpdatePruningDPOptimizerGhostFp32,
)

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost", "ghost-fp32", "ghost-fp32-bk")
# modes that never materialise per-example gradients (norms only)
GHOST_MODES = ("ghost", "ghost-fp32", "ghost-fp32-bk")
# modes whose clipped sum the hooks compute in ≥ fp32 (toolkit.privacy.ghost_fp32)
FP32_GHOST_MODES = ("ghost-fp32", "ghost-fp32-bk")


class DPEngine:
    """DP-SGD (+ update pruning) on an ``nn.Module``; build it with :func:`make_private`.

    Attributes:
        module: the Opacus GradSampleModule wrapping the user's module; forward through it.
        optimizer: the DP optimizer (wraps the user's optimizer).
        accountant: the Opacus accountant; ``epsilon(delta)`` reads it.
        noise_multiplier, max_grad_norm, expected_batch_size, sample_rate, steps_taken, grad_sample_mode.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: int, sample_rate: float, accountant: str = "prv",
                 grad_prune_ratio: float = 0.0, prune_scope: str = "global", pruned_state: str = "advance",
                 grad_sample_mode: str = "hooks", noise_seed: int | None = None, secure_mode: bool = False,
                 pre_noise_mask: PreNoiseMask | None = None, distributed: bool = False):
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if isinstance(module, AbstractGradSampleModule):
            raise ValueError("module is already wrapped by Opacus; pass the plain module")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.noise_multiplier = positive_number("noise_multiplier", noise_multiplier, allow_zero=True)
        self.max_grad_norm = positive_number("max_grad_norm", max_grad_norm)
        self.expected_batch_size, self.sample_rate = check_sampled_step(expected_batch_size, sample_rate, accountant)
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"unknown grad_sample_mode {grad_sample_mode!r}; choose one of {GRAD_SAMPLE_MODES}")
        check_ratio(grad_prune_ratio)
        check_scope(prune_scope)
        if pre_noise_mask is not None and grad_sample_mode in GHOST_MODES:
            raise ValueError("a pre-noise update mask needs per-example gradients to mask before clipping; ghost "
                             "clipping never materialises them: use grad_sample_mode='hooks'")
        if pruned_state not in PRUNED_STATES:
            raise ValueError(f"unknown pruned_state {pruned_state!r}; choose one of {PRUNED_STATES}")
        check_parameters(module, optimizer)
        check_precision(optimizer, grad_sample_mode)
        self.grad_sample_mode = grad_sample_mode

        module.train()  # Opacus records activations only in train mode
        if grad_sample_mode == "ghost":
            self.module = GradSampleModuleFastGradientClipping(
                module, batch_first=True, loss_reduction="mean", max_grad_norm=self.max_grad_norm,
                use_ghost_clipping=True)
            optimizer_cls = UpdatePruningDPOptimizerFastGradientClipping
        elif grad_sample_mode in FP32_GHOST_MODES:
            self.module = GhostFp32Module(module, bookkeeping=grad_sample_mode == "ghost-fp32-bk")
            optimizer_cls = UpdatePruningDPOptimizerGhostFp32
        else:
            self.module = GradSampleModule(module, batch_first=True, loss_reduction="mean",
                                           force_functorch=grad_sample_mode == "functorch")
            optimizer_cls = UpdatePruningDPOptimizer
        # Two backwards without a step in between would stack per-example gradients (Opacus then divides by
        # the number of backwards and the accountant multiplies q by it): refused. Physical chunks of one
        # logical batch go through step(list of chunks), which clips each chunk and accumulates the clipped sum.
        if grad_sample_mode not in FP32_GHOST_MODES:   # (ghost-fp32 consumes each backward's sums in the same step)
            self.module.forbid_grad_accumulation()

        device = next(p for g in optimizer.param_groups for p in g["params"]).device
        if noise_seed is not None and secure_mode:
            raise ValueError("secure_mode draws every noise sample from fresh OS randomness: a noise_seed is "
                             "refused (it would make the noise re-creatable)")
        # 128 bits of OS entropy in the whole generator state (torch's own seed() keeps 32 bits)
        self.noise_seed = noise_seed
        self.generator = seeded_generator(device) if noise_seed is None \
            else torch.Generator(device=device).manual_seed(int(noise_seed))
        self.optimizer = optimizer_cls(
            optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.expected_batch_size, grad_prune_ratio=grad_prune_ratio,
            prune_scope=prune_scope, pruned_state=pruned_state, loss_reduction="mean",
            generator=self.generator, secure_mode=secure_mode, distributed=distributed,
            **({"pre_noise_mask": pre_noise_mask} if pre_noise_mask is not None else {}))
        self.accountant = make_accountant(accountant)
        # Accounting happens inside the optimizer, right after the noise is added: a noised step is
        # never unaccounted, whoever calls optimizer.step().
        self.optimizer.attach_step_hook(self._account)
        self.steps_taken = 0
        self.group_rows = None   # issue 22: per-user averaging before clipping (toolkit.privacy.user_level)
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------ checks

    def _check_per_sample_gradients(self, batch_size: int) -> None:
        if self.grad_sample_mode in GHOST_MODES:
            return
        missing = [p for p in self.optimizer.params if getattr(p, "grad_sample", None) is None]
        if missing:
            raise RuntimeError(
                f"{len(missing)} trainable parameter(s) got no per-example gradient: the losses must come from a "
                "forward through engine.module with grad enabled and the module in train mode, every trainable "
                "parameter must take part in the forward (freeze unused ones), and no other forward with grad "
                "enabled may run between the step's forward and engine.step (evaluate under torch.no_grad())")
        got = self.optimizer.params[0].grad_sample.shape[0]
        if got != batch_size:
            raise ValueError(f"per_example_losses has {batch_size} entries but the forward saw a batch of {got}")

    @staticmethod
    def _check_losses(per_example_losses) -> None:
        if not torch.is_tensor(per_example_losses) or per_example_losses.dim() != 1:
            raise ValueError("per_example_losses must be a 1-D tensor [batch] (one loss per example; "
                             "do not reduce over the batch)")
        if per_example_losses.shape[0] == 0:
            raise ValueError("empty batch: call engine.empty_step() for an empty Poisson batch")
        if not per_example_losses.requires_grad:
            raise ValueError("per_example_losses does not require grad: compute it from a forward through "
                             "engine.module with grad enabled")

    def _check_captured_batch(self, batch_size: int) -> None:
        """Before backward: the forward the hooks captured must have the losses' batch size (Opacus would
        otherwise fail deep inside a broadcast, or mix up examples)."""
        got = opacus_captured_batch_size(self.module)
        if got is not None and got != batch_size:
            raise ValueError(f"per_example_losses has {batch_size} entries but the forward through "
                             f"engine.module saw a batch of {got}")

    def _reset_captured(self) -> None:
        """Forget what Opacus' hooks captured in forwards that were never (successfully) backpropagated."""
        if isinstance(self.module, GhostFp32Module):
            self.module.forget()
        else:
            opacus_forget_captures(self.module, self.optimizer.params)

    def _account(self, optimizer) -> None:
        self.accountant.step(noise_multiplier=optimizer.noise_multiplier,
                             sample_rate=self.sample_rate * optimizer.accumulated_iterations)

    # ------------------------------------------------------------ steps

    def step(self, per_example_losses: torch.Tensor | Callable[[], torch.Tensor] | Sequence[Callable[[], torch.Tensor]]
             ) -> float:
        """One private step on a non-empty Poisson (logical) batch; returns its mean loss (not private).

        ``per_example_losses`` is ``[B]`` (e.g. :func:`toolkit.forward.per_example_loss` of a forward through
        :attr:`module`), a function returning it (the protocol of :mod:`toolkit.optimizers`), or a list of such
        functions, one per *physical chunk* of the logical batch (each runs its own forward). Chunks are
        processed one at a time: forward, backward, per-example clipping, clipped sum added to an fp32
        accumulator, activations freed; after the last chunk the noise is drawn ONCE, the noisy sum is divided
        by ``B_expected`` once, and ONE optimizer step and ONE accountant step are taken (Opacus'
        ``BatchMemoryManager`` semantics). The update is the same as one pass over the whole batch (up to the
        summation order). For an empty Poisson batch call :meth:`empty_step` instead.
        """
        chunks = list(per_example_losses) if isinstance(per_example_losses, (list, tuple)) else [per_example_losses]
        if not chunks:
            raise ValueError("no chunks: call engine.empty_step() for an empty Poisson batch")
        loss_sum, count = 0.0, 0
        try:
            for k, chunk in enumerate(chunks):
                last = k == len(chunks) - 1
                losses = chunk() if callable(chunk) else chunk
                self._check_losses(losses)
                batch_size = losses.shape[0]
                self._check_captured_batch(batch_size)
                self._backward(losses, last)
                if self.grad_sample_mode not in GHOST_MODES:
                    self._check_per_sample_gradients(batch_size)
                    if self.group_rows is not None:   # issue 22: user-level DP clips one unit per user
                        self.group_rows(self.optimizer.params)
                if not last:
                    # Opacus: this step() only clips and adds to p.summed_grad (no noise, no accountant step);
                    # the following zero_grad keeps the sum and frees the chunk's per-example gradients.
                    self.optimizer.signal_skip_step(True)
                self.optimizer.step()
                loss_sum += float(losses.detach().double().sum())
                count += batch_size
                if not last:
                    self.optimizer.zero_grad(set_to_none=True)
            self.steps_taken += 1
        except BaseException:
            # A refused or failed step must leave nothing behind: neither activations captured by the hooks
            # (the next backward would pair them with the wrong forward) nor a partial clipped sum (it would
            # enter the next step's update, unaccounted).
            self._reset_captured()
            opacus_reset_accumulation(self.optimizer)
            raise
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / count

    def _backward(self, per_example_losses: torch.Tensor, last: bool) -> None:
        with warnings.catch_warnings():
            # Opacus' full backward hooks warn when the module's inputs need no grad (frozen features).
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            if self.grad_sample_mode == "ghost":
                DPTensorFastGradientClipping(self.module, self.optimizer, per_example_losses, "mean").backward()
            elif self.grad_sample_mode in FP32_GHOST_MODES:
                # the step's last chunk is noised block by block inside the hooks (no whole-model fp32 sum)
                self.module.clipped_backward(per_example_losses, self.max_grad_norm,
                                             sink=self.optimizer.noise_sink() if last else None)
            else:
                per_example_losses.mean().backward()

    def empty_step(self) -> None:
        """The step of an empty Poisson batch: the update is pure noise N(0, σ²C²)/B_expected (pruned by M2
        like any other), and the accountant still records the step."""
        params = self.optimizer.params
        try:
            for p in params:
                if self.grad_sample_mode == "ghost":
                    p.grad = torch.zeros_like(p)
                elif self.grad_sample_mode in FP32_GHOST_MODES:
                    p.clipped_sum = torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
                else:
                    p.grad_sample = p.new_zeros((0, *p.shape))  # Opacus clips an empty batch to a zero sum
            self.optimizer.step()
            self.steps_taken += 1
        finally:
            self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------ reporting

    def epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta`` (0.0 before the first step, ∞ if σ = 0)."""
        return epsilon_spent(self.accountant, delta)

    @property
    def last_kept_fraction(self) -> float:
        """Fraction of gradient coordinates kept by update pruning at the last step (1.0 without pruning)."""
        return self.optimizer.last_kept_fraction

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Inner optimizer state, accountant history, steps taken and the (secret) noise generator state.

        Model weights are not included: save the module's own ``state_dict`` alongside.
        """
        return {
            "optimizer": self.optimizer.state_dict(),
            "accountant": accountant_state(self.accountant),
            "steps_taken": self.steps_taken,
            "noise_generator": self.generator.get_state(),
            "update_mask": (self.optimizer.pre_noise_mask.state_dict()
                            if self.optimizer.pre_noise_mask is not None else None),
            "config": {"noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm,
                       "expected_batch_size": self.expected_batch_size, "sample_rate": self.sample_rate,
                       "grad_sample_mode": self.grad_sample_mode,
                       "grad_prune_ratio": self.optimizer.grad_prune_ratio,
                       "prune_scope": self.optimizer.prune_scope, "pruned_state": self.optimizer.pruned_state},
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`. Must be called before the first step, so no step is ever dropped
        from the accounting (the saved history is the whole past)."""
        accountant = resume_accountant(self.accountant, state, ("optimizer", "accountant", "steps_taken"), "engine")
        self.optimizer.load_state_dict(state["optimizer"])
        self.accountant = accountant
        self.steps_taken = int(state["steps_taken"])
        if state.get("noise_generator") is not None:   # saved on another device type: see the function
            restore_generator_state(self.generator, state["noise_generator"], seeded=self.noise_seed is not None)
        if state.get("update_mask") is not None and self.optimizer.pre_noise_mask is not None:
            self.optimizer.pre_noise_mask.load_state_dict(state["update_mask"])

    def close(self) -> nn.Module:
        """Remove Opacus' hooks and return the plain module (the engine is unusable afterwards)."""
        return self.module.to_standard_module()


PrivateTrainer = DPEngine


def make_private(module: nn.Module, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: int, sample_rate: float, accountant: str = "prv",
                 grad_prune_ratio: float = 0.0, prune_scope: str = "global", pruned_state: str = "advance",
                 grad_sample_mode: str = "hooks", noise_seed: int | None = None,
                 secure_mode: bool = False, pre_noise_mask: PreNoiseMask | None = None,
                 distributed: bool = False) -> DPEngine:
    """Wrap ``module`` and ``optimizer`` for DP training (see :class:`DPEngine` and the module docstring).

    Args:
        module: the model (e.g. :class:`toolkit.forward.LlavaLM`); its trainable parameters must all be in
            ``optimizer``.
        optimizer: any torch optimizer over those parameters.
        noise_multiplier: σ (from :func:`toolkit.privacy.calibrate_noise`); 0 gives no privacy (ε = ∞).
        max_grad_norm: C, the per-example clipping norm.
        expected_batch_size: q·N; gradients are divided by it.
        sample_rate: q, the Poisson sampling rate the accountant records.
        accountant: ``"prv"`` or ``"rdp"``.
        grad_prune_ratio, prune_scope, pruned_state: mechanism 2 (:mod:`toolkit.privacy.update_pruning`).
        grad_sample_mode: ``"hooks"`` (default), ``"functorch"``, ``"ghost"``, ``"ghost-fp32"`` or ``"ghost-fp32-bk"``.
        noise_seed: seed of the noise generator, for reproducible experiments and tests ONLY: whoever knows it
            can regenerate the noise and subtract it, so a model trained with a known (e.g. config-derived)
            seed has no privacy guarantee. None (default): seeded from OS entropy.
        secure_mode: Opacus' floating-point-attack-resistant noise (slower).
        pre_noise_mask: fix the update's support before the noise (:mod:`toolkit.privacy.update_masks`).
        distributed: this process is one rank of a data-parallel run (:mod:`toolkit.distributed`): it clips its
            share of the Poisson batch; rank 0 alone adds the noise; one all-reduce combines the noisy sum before
            mechanism 2's mask, so every rank takes the same step. Every rank's accountant records the step.
    """
    return DPEngine(module, optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                    expected_batch_size=expected_batch_size, sample_rate=sample_rate, accountant=accountant,
                    grad_prune_ratio=grad_prune_ratio, prune_scope=prune_scope, pruned_state=pruned_state,
                    grad_sample_mode=grad_sample_mode, noise_seed=noise_seed, secure_mode=secure_mode,
                    pre_noise_mask=pre_noise_mask, distributed=distributed)
