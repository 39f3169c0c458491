"""Ghost clipping in fp32: the per-example bound C holds to fp32 precision whatever the parameter dtype, and no
per-example gradient is ever held for more than one layer (``grad_sample_mode="ghost-fp32"``).

Why: per-example gradients (``hooks``) of a bf16 LLaVA-7B with LoRA + projector cost B x 41 M values, all held
until every norm is known (the gap that kept Dual-Priv above DP-ZO's memory, issue 23); Opacus' ghost clipping
avoids them but its clipped sum comes from a backward of ``Σ_i c_i L_i`` in the parameter dtype, so in bf16 an
example could weigh up to ~0.5 % more than C. Here the clipping factors are applied in fp32 inside the hooks.

One step on per-example losses ``L_i``, two backward passes of ``Σ_i L_i`` through the same graph::

    pass 1 (norms)  every trainable nn.Linear hook gets its input A [B, T, d_in] and output gradient G [B, T, d_out]
                    and adds ‖G_iᵀA_i‖² (+ ‖Σ_t G_i,t‖² for a bias) to n_i², in ≥ fp32: from G_iᵀA_i itself
                    where d_in·d_out ≤ T·(d_in + d_out) (fewer products), else the ghost norm Σ (A_iA_iᵀ)⊙(G_iG_iᵀ)
                    (:mod:`toolkit.privacy.linear_grads`)
    c_i = min(1, C / (n_i·(1 + NORM_TOLERANCE) + 1e-6))
    pass 2 (sum)    every hook adds Σ_i c_i G_iᵀA_i (and Σ_i c_i Σ_t G_i,t), computed in ≥ fp32 from the same A and G,
                    to the parameter's ``clipped_sum``; it also recomputes n_i², and the step is refused if a pass-2
                    norm exceeds n_i·(1 + NORM_TOLERANCE) (a non-deterministic backward), so c_i·‖g_i‖ ≤ C always

Pass 2 backpropagates the same unweighted ``Σ_i L_i`` as pass 1 rather than ``Σ_i c_i L_i``: in bf16 the backward
of ``c_i L_i`` is not ``c_i`` times the backward of ``L_i`` (every layer rounds), so scaling G in fp32 inside the
hook is what keeps the bound exact. Autograd's own weight gradients (parameter dtype, never used) are dropped as
soon as they are accumulated. Only trainable ``nn.Linear`` weights and biases are supported (LoRA's A and B, the
projector, an LM head); anything else is refused with the parameter's name.

Cost: a second backward (checkpointed layers are recomputed again) plus the norm products; memory: one ≥ fp32
clipped sum per trainable parameter instead of B per-example gradients.

Book-keeping (``bookkeeping=True``, ``grad_sample_mode="ghost-fp32-bk"``; Bu et al., 2023): pass 1 also keeps, for
each layer, whichever is smaller: its A and G (in their own dtype), or its per-example gradients in ≥ fp32 (LoRA's
factors: rank 8 against 77-589 tokens); the clipped sum is computed from them once the factors are known, without
a second backward. The norms and the sum then come from the very same record, so no drift check is needed; the
price is holding every trainable layer's record until the end of the backward, which with checkpointing undoes
part of what the recomputation saved. A choice of speed against memory, not the 7B preset's default.

The optimizer side (noise, mechanism 2, accountant) is :class:`toolkit.privacy.update_pruning.UpdatePruningDPOptimizerGhostFp32`.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from toolkit.privacy.ghost_fp32 import GhostFp32Module
    >>> net = GhostFp32Module(nn.Linear(3, 2))
    >>> losses = net(torch.randn(4, 3)).pow(2).sum(dim=1)
    >>> factors = net.clipped_backward(losses, max_grad_norm=1.0)
    >>> net._module.weight.clipped_sum.shape, bool((factors <= 1).all())
    (torch.Size([2, 3]), True)
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from toolkit.privacy.linear_grads import (chunk_budget, direct_route, example_grads_clipped_sum_blocks, itemsize,
                                          linear_clipped_sum_blocks, linear_example_grads, linear_norms_sq,
                                          tokens_view)

# Relative slack between the norms of the two passes: the factors are computed from n_i·(1 + NORM_TOLERANCE), and a
# pass-2 norm above that is an error, so c_i·‖g_i‖ ≤ C holds for the gradient that is actually summed. 1e-3 leaves
# room for a GPU kernel whose backward rounds differently from one pass to the next (an atomics-based attention
# backward moves a norm by far less) and costs at most 0.1 % of a clipped example's weight.
NORM_TOLERANCE = 1e-3


def accumulate_sink(p: torch.Tensor, rows: slice, block: torch.Tensor) -> None:
    """The default sink: add a block of the clipped sum to ``p.clipped_sum`` (≥ fp32, zero-initialised)."""
    if getattr(p, "clipped_sum", None) is None:
        p.clipped_sum = torch.zeros_like(p, dtype=block.dtype)
    p.clipped_sum[rows] += block


@contextlib.contextmanager
def full_fp32_products():
    """fp32 matrix products in full fp32 while a hook computes norms and clipped sums: a user's TF32 setting
    (``torch.set_float32_matmul_precision("high")``, or bf16 products for fp32 on some CPUs) would round them by
    about 1e-3, the size of ``NORM_TOLERANCE``, and the bound C would hold only approximately."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def trainable_linears(module: nn.Module) -> list[nn.Linear]:
    """Every nn.Linear holding a trainable parameter; raises (naming it) on a trainable parameter elsewhere."""
    layers, covered = [], set()
    for layer in module.modules():
        if isinstance(layer, nn.Linear) and any(p is not None and p.requires_grad for p in (layer.weight, layer.bias)):
            layers.append(layer)
            covered.update(id(p) for p in (layer.weight, layer.bias) if p is not None)
    other = [name for name, p in module.named_parameters() if p.requires_grad and id(p) not in covered]
    if other:
        raise ValueError(f"grad_sample_mode='ghost-fp32' supports trainable nn.Linear layers only (LoRA, projector, "
                         f"LM head); these trainable parameters are elsewhere: {other[:5]}"
                         f"{' ...' if len(other) > 5 else ''}; use grad_sample_mode='hooks'")
    if not layers:
        raise ValueError("the module has no trainable parameter")
    return layers


class GhostFp32Module(nn.Module):
    """Wraps a module; :meth:`clipped_backward` leaves ``p.clipped_sum = Σ_i c_i g_i`` (≥ fp32) on every trainable
    parameter. Forward through this wrapper (it calls the wrapped module); see the module docstring."""

    def __init__(self, module: nn.Module, bookkeeping: bool = False):
        super().__init__()
        self._module = module   # Opacus' name for the wrapped module
        self.bookkeeping = bool(bookkeeping)
        self._kept: list[tuple] = []   # book-keeping: (layer, A, G, weight?, bias?) of pass 1
        self.layers = trainable_linears(module)
        self.params = [p for layer in self.layers for p in (layer.weight, layer.bias) if p is not None and p.requires_grad]
        self._trainable = {id(p) for p in self.params}
        self.dtype = torch.float32
        for p in self.params:
            self.dtype = torch.promote_types(self.dtype, p.dtype)
        self._pass: str | None = None
        self._fired: set[int] = set()
        self._norms_sq: torch.Tensor | None = None
        self._factors: torch.Tensor | None = None
        self._check_sq: torch.Tensor | None = None
        self._sink = accumulate_sink
        self._handles = [layer.register_forward_pre_hook(self._input_needs_grad) for layer in self.layers]
        self._handles += [layer.register_forward_hook(self._capture) for layer in self.layers]
        self._handles += [p.register_post_accumulate_grad_hook(self._drop_autograd_grad) for p in self.params]

    def forward(self, *args, **kwargs):
        with self._weights_frozen():
            return self._module(*args, **kwargs)

    @contextlib.contextmanager
    def _weights_frozen(self):
        """The trainable weights do not require grad while the graph is built (the forward, and the recomputation
        of checkpointed layers inside each backward): autograd then never computes their gradients, which the
        hooks replace (for the 7B projector that is a 32 MB bf16 gradient per pass, computed and thrown away)."""
        flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in zip(self.params, flags):
                p.requires_grad_(flag)

    # ------------------------------------------------------------ hooks

    @staticmethod
    def _input_needs_grad(layer: nn.Linear, inputs):
        # with the weights frozen, a layer whose input needs no grad (the projector on frozen vision features) would
        # get no output gradient: give it a fresh leaf that does (nothing upstream needs a gradient anyway)
        if layer.training and torch.is_grad_enabled() and torch.is_tensor(inputs[0]) and not inputs[0].requires_grad \
                and inputs[0].is_floating_point():
            return (inputs[0].detach().requires_grad_(True), *inputs[1:])
        return None

    def _capture(self, layer: nn.Linear, inputs, output) -> None:
        # Only a forward that will be backpropagated (with re-entrant checkpointing the first, no-grad forward of
        # a checkpointed layer is skipped and its recomputation in each backward pass is the one captured).
        if not (layer.training and torch.is_grad_enabled() and torch.is_tensor(output) and output.requires_grad):
            return
        activation = inputs[0].detach()
        output.register_hook(lambda grad: self._on_output_grad(layer, activation, grad))

    def _on_output_grad(self, layer: nn.Linear, activation: torch.Tensor, grad: torch.Tensor) -> None:
        if self._pass is None:
            raise RuntimeError("a backward through a ghost-fp32 module outside DPEngine.step: its gradients are "
                               "neither clipped nor noised; step with the engine")
        if id(layer) in self._fired:
            raise RuntimeError("an nn.Linear ran twice in one forward: its per-example gradient is a sum over both "
                               "uses, which ghost-fp32 cannot clip; use grad_sample_mode='hooks'")
        self._fired.add(id(layer))
        if activation.shape[0] != self._norms_sq.shape[0]:
            raise ValueError(f"the losses hold {self._norms_sq.shape[0]} examples but a layer saw a batch of "
                             f"{activation.shape[0]}")
        weight = id(layer.weight) in self._trainable   # (requires_grad is off while the passes run)
        bias = layer.bias is not None and id(layer.bias) in self._trainable
        budget = chunk_budget(grad.device)
        with full_fp32_products():
            if self._pass == "norms" and self.bookkeeping and weight and self._keeps_example_grads(activation, grad):
                weight_grads, bias_grads = linear_example_grads(activation, grad, bias, self.dtype, budget)
                norms_sq = weight_grads.pow(2).sum((1, 2))
                self._norms_sq += norms_sq if bias_grads is None else norms_sq + bias_grads.pow(2).sum(1)
                self._kept.append((layer, "example-grads", weight_grads, bias_grads))
                return
            norms_sq = linear_norms_sq(activation, grad, weight, bias, self.dtype, budget)
            if self._pass == "norms":
                self._norms_sq += norms_sq
                if self.bookkeeping:
                    self._kept.append((layer, "inputs", activation, grad, weight, bias))
                return
            self._check_sq += norms_sq
            for which, rows, block in linear_clipped_sum_blocks(activation, grad, self._factors, weight, bias,
                                                                self.dtype, budget=budget):
                self._sink(layer.weight if which == "weight" else layer.bias, rows, block)

    def _keeps_example_grads(self, activation: torch.Tensor, grad: torch.Tensor) -> bool:
        """Book-keeping keeps a layer's per-example gradients (≥ fp32) rather than its A and G (the model's or
        peft's dtype) when they take fewer bytes: LoRA's factors, by 5-70x at the 7B shape (77-589 tokens)."""
        a, g = tokens_view(activation), tokens_view(grad)
        tokens, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
        kept_inputs = tokens * (d_in * a.element_size() + d_out * g.element_size())
        return direct_route(tokens, d_in, d_out) and d_in * d_out * itemsize(self.dtype) < kept_inputs

    def _drop_autograd_grad(self, p: torch.Tensor) -> None:
        # autograd's own gradient (parameter dtype, unclipped) is never used: free it as soon as it exists
        if self._pass is not None:
            p.grad = None

    # ------------------------------------------------------------ the step's backward

    def clipped_backward(self, per_example_losses: torch.Tensor, max_grad_norm: float,
                         sink: Callable[[torch.Tensor, slice, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Two passes (see the module docstring); returns the clipping factors ``c`` ``[B]``.

        Each block of each parameter's clipped sum goes to ``sink(param, rows, block)`` as the second pass produces
        it: by default (None) :func:`accumulate_sink` (``p.clipped_sum``, which a caller takes and sets to None); the
        optimizer's ``noise_sink`` instead noises, scales and rounds each block at once, so no whole-model fp32 sum
        is ever held (:class:`toolkit.privacy.update_pruning.UpdatePruningDPOptimizerGhostFp32`)."""
        self._sink = sink if sink is not None else accumulate_sink
        losses = per_example_losses.sum()
        self._norms_sq = torch.zeros(per_example_losses.shape[0], dtype=self.dtype, device=per_example_losses.device)
        try:
            with self._weights_frozen():   # (checkpointed layers rebuild their graph inside each pass)
                self._run_pass("norms", losses, retain_graph=not self.bookkeeping)
            norms = self._norms_sq.sqrt()
            self._factors = (max_grad_norm / (norms * (1 + NORM_TOLERANCE) + 1e-6)).clamp(max=1.0)
            if self.bookkeeping:
                self._sum_kept()
                return self._factors
            self._check_sq = torch.zeros_like(self._norms_sq)
            with self._weights_frozen():
                self._run_pass("sum", losses, retain_graph=False)
            drift = self._check_sq.sqrt() > norms * (1 + NORM_TOLERANCE)
            if bool(drift.any()):
                raise RuntimeError(
                    f"{int(drift.sum())} example(s) had a larger gradient norm in the second backward than in the "
                    "first (a non-deterministic backward, e.g. an atomics-based attention kernel): the clipping bound "
                    "would not hold, so the step is refused; use deterministic kernels or grad_sample_mode='hooks'")
            return self._factors
        except BaseException:
            self.forget()
            raise
        finally:
            self._pass, self._fired, self._kept = None, set(), []

    def _sum_kept(self) -> None:
        """Book-keeping: every kept layer's clipped sum from the A and G its norms were computed from."""
        factors = self._factors
        while self._kept:
            layer, kind, *kept = self._kept.pop()   # each layer's record freed once summed
            with full_fp32_products():
                if kind == "example-grads":
                    blocks = example_grads_clipped_sum_blocks(*kept, factors)
                else:
                    activation, grad, weight, bias = kept
                    blocks = linear_clipped_sum_blocks(activation, grad, factors, weight, bias, self.dtype,
                                                       budget=chunk_budget(grad.device))
                for which, rows, block in blocks:
                    self._sink(layer.weight if which == "weight" else layer.bias, rows, block)

    def _run_pass(self, name: str, losses: torch.Tensor, retain_graph: bool) -> None:
        self._pass, self._fired = name, set()
        losses.backward(retain_graph=retain_graph)
        missing = [layer for layer in self.layers if id(layer) not in self._fired]
        if missing:
            raise RuntimeError(
                f"{len(missing)} trainable nn.Linear layer(s) got no gradient: the losses must come from a forward "
                "through engine.module with grad enabled and the module in train mode, and every trainable "
                "parameter must take part in it (freeze unused ones)")

    def forget(self) -> None:
        """Drop a half-computed clipped (or noised) sum: a refused or failed step leaves nothing behind."""
        self._kept = []
        for p in self.params:
            p.clipped_sum = None
            p.noisy_grad = None

    def to_standard_module(self) -> nn.Module:
        """Remove the hooks and return the wrapped module."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.forget()
        return self._module
