"""Per-example products of an nn.Linear from its input A ``[B, T, d_in]`` and output gradient G ``[B, T, d_out]``:
the norms ‖G_iᵀA_i‖, the clipped sum Σ_i c_i G_iᵀA_i a block of rows at a time, and the per-example gradients
themselves, each in ≥ fp32 and a chunk of examples at a time so that the transient stays bounded. The arithmetic
of :mod:`toolkit.privacy.ghost_fp32`, which decides when each runs.

Example::

    >>> import torch
    >>> a, g = torch.randn(3, 5, 4), torch.randn(3, 5, 2)
    >>> direct = torch.einsum("bto,bti->boi", g, a).pow(2).sum((1, 2))
    >>> torch.allclose(linear_norms_sq(a, g, True, False, torch.float32), direct, rtol=1e-4)
    True
"""
from __future__ import annotations

import torch


def tokens_view(t: torch.Tensor) -> torch.Tensor:
    """``[B, ..., d]`` -> ``[B, T, d]`` (T = 1 for a 2-D input)."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


# Examples go through the norm and sum products a chunk at a time, each chunk's ≥ fp32 copies and products under a
# budget, so the transient stays bounded at any batch size. On a GPU the budget is CHUNK_BYTES: one batched kernel
# per chunk rather than a loop over examples (at 7B and batch 16 such a loop launches ~10^5 small kernels per step,
# which a GPU waits on). On a CPU it is one example: at 7B's LoRA and projector shapes chunks took 0.75-1.63x the
# one-at-a-time time on one thread (benchmarks/ghost_chunks.py, benchmarks/RESULTS.md): no gain to pay a larger
# transient for.
CHUNK_BYTES = 32 << 20


def chunk_budget(device: torch.device) -> int:
    """The bytes a chunk of examples may take on ``device``: :data:`CHUNK_BYTES` on CUDA, one example elsewhere.

    >>> chunk_budget(torch.device("cuda")) == CHUNK_BYTES, chunk_budget(torch.device("cpu"))
    (True, 0)
    """
    return CHUNK_BYTES if device.type == "cuda" else 0


def example_chunks(batch: int, per_example_bytes: int, budget: int = CHUNK_BYTES) -> list[slice]:
    """Consecutive slices of ``range(batch)``, as many examples each as fit ``budget`` (at least one).

    >>> example_chunks(5, 10, budget=25)
    [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    size = max(1, budget // max(1, per_example_bytes))
    return [slice(start, min(start + size, batch)) for start in range(0, batch, size)]


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def direct_route(tokens: int, d_in: int, d_out: int) -> bool:
    """Whether an example's weight gradient ``G_iᵀA_i`` itself is the cheaper way to its norm: it takes
    ``T·d_in·d_out`` multiply-adds against the ghost norm's ``T²·(d_in + d_out)``, and it is then no larger than
    the example's A and G together (``T·(d_in + d_out)`` values). LoRA's factors take it (rank 8 against 77-589
    tokens); a wide layer over few tokens (the 7B projector over 64 kept tokens) takes the ghost norm.

    >>> direct_route(77, 4096, 8), direct_route(77, 1024, 4096)
    (True, False)
    """
    return d_in * d_out <= tokens * (d_in + d_out)


def linear_norms_sq(activation: torch.Tensor, output_grad: torch.Tensor, weight: bool, bias: bool,
                    dtype: torch.dtype, budget: int = CHUNK_BYTES, direct: bool | None = None) -> torch.Tensor:
    """Per-example ``‖∂L_i/∂W‖² (+ ‖∂L_i/∂b‖²)`` of an nn.Linear from its input and output gradient, in ``dtype``,
    a chunk of examples at a time (:func:`example_chunks`): each example's gradient ``G_iᵀA_i`` itself where
    :func:`direct_route` says so (or ``direct``, when given), otherwise the ghost norm ``Σ (A_iA_iᵀ)⊙(G_iG_iᵀ)``.

    >>> a, g = torch.randn(3, 5, 3), torch.randn(3, 5, 4)
    >>> direct = torch.einsum("bto,bti->boi", g, a).pow(2).sum((1, 2))
    >>> torch.allclose(linear_norms_sq(a, g, True, False, torch.float64, budget=1), direct.double())
    True
    """
    a, g = tokens_view(activation), tokens_view(output_grad)
    batch, tokens, d_in = a.shape
    d_out = g.shape[2]
    ghost = not (direct_route(tokens, d_in, d_out) if direct is None else direct)
    products = (2 * tokens * tokens if ghost else d_out * d_in) if weight else 0
    per_example = itemsize(dtype) * (tokens * (d_in + d_out) + products)
    total = torch.zeros(batch, dtype=dtype, device=a.device)
    for chunk in example_chunks(batch, per_example, budget):
        g32 = g[chunk].to(dtype)
        if weight:
            a32 = a[chunk].to(dtype)
            if ghost:   # [T, T] products instead of [d_out, d_in]
                total[chunk] += ((a32 @ a32.mT) * (g32 @ g32.mT)).sum((1, 2)).clamp(min=0)
            else:       # small layer, many tokens: the examples' gradients themselves
                total[chunk] += (g32.mT @ a32).pow(2).sum((1, 2))
        if bias:
            total[chunk] += g32.sum(1).pow(2).sum(1)
    return total


# A weight's clipped sum is produced a block of rows at a time (<= 2**20 values = 4 MiB in fp32), so neither the
# whole fp32 sum of a large layer nor its noise ever exists at once when the sink noises and rounds each block.
BLOCK_ELEMENTS = 1 << 20


def linear_clipped_sum_blocks(activation: torch.Tensor, output_grad: torch.Tensor, factors: torch.Tensor,
                              weight: bool, bias: bool, dtype: torch.dtype, block_elements: int = BLOCK_ELEMENTS,
                              budget: int = CHUNK_BYTES):
    """Yield ``(which, rows, block)``: ``Σ_i c_i G_iᵀA_i`` (``which="weight"``) a block of output rows at a time,
    then ``Σ_i c_i Σ_t G_i,t`` (``"bias"``), in ``dtype``; only the trainable ones. Each block is one product per
    chunk of examples, ``(c ⊙ G)ᵀA`` over the chunk's tokens.

    >>> a, g, c = torch.randn(2, 5, 3), torch.randn(2, 5, 4), torch.tensor([1.0, 0.5])
    >>> blocks = list(linear_clipped_sum_blocks(a, g, c, True, True, torch.float32, block_elements=6))
    >>> [(which, rows) for which, rows, _ in blocks]
    [('weight', slice(0, 2, None)), ('weight', slice(2, 4, None)), ('bias', slice(None, None, None))]
    >>> w = torch.cat([b for which, _, b in blocks if which == "weight"])
    >>> torch.allclose(w, g[0].T @ a[0] + 0.5 * g[1].T @ a[1], atol=1e-5)
    True
    """
    a, g = tokens_view(activation), tokens_view(output_grad)
    factors = factors.to(device=g.device, dtype=dtype)
    batch, tokens, d_in = a.shape
    d_out = g.shape[2]
    if weight:
        step = max(1, block_elements // d_in)
        chunks = example_chunks(batch, itemsize(dtype) * tokens * (d_in + min(step, d_out)), budget)
        for start in range(0, d_out, step):
            rows = slice(start, min(start + step, d_out))
            block = torch.zeros(rows.stop - rows.start, d_in, dtype=dtype, device=g.device)
            for chunk in chunks:
                scaled = g[chunk, :, rows].to(dtype) * factors[chunk, None, None]
                block.addmm_(scaled.reshape(-1, rows.stop - rows.start).mT, a[chunk].to(dtype).reshape(-1, d_in))
            yield "weight", rows, block
    if bias:
        yield "bias", slice(None), (g.to(dtype).sum(1) * factors[:, None]).sum(0)


def linear_example_grads(activation: torch.Tensor, output_grad: torch.Tensor, bias: bool, dtype: torch.dtype,
                         budget: int = CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each example's weight gradient ``G_iᵀA_i`` ``[B, d_out, d_in]`` (and bias gradient ``Σ_t G_i,t``
    ``[B, d_out]``, or None) in ``dtype``, a chunk of examples at a time: what book-keeping keeps for a layer on
    :func:`direct_route`, instead of its A and G.

    >>> a, g = torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    >>> w, b = linear_example_grads(a, g, True, torch.float32)
    >>> w.shape, b.shape, torch.allclose(w[1], g[1].T @ a[1], atol=1e-5)
    (torch.Size([2, 4, 3]), torch.Size([2, 4]), True)
    """
    a, g = tokens_view(activation), tokens_view(output_grad)
    batch, tokens, d_in = a.shape
    d_out = g.shape[2]
    weight_grads = torch.empty(batch, d_out, d_in, dtype=dtype, device=g.device)
    for chunk in example_chunks(batch, itemsize(dtype) * (tokens * (d_in + d_out) + d_out * d_in), budget):
        torch.matmul(g[chunk].to(dtype).mT, a[chunk].to(dtype), out=weight_grads[chunk])
    return weight_grads, (g.to(dtype).sum(1) if bias else None)


def example_grads_clipped_sum_blocks(weight_grads: torch.Tensor | None, bias_grads: torch.Tensor | None,
                                     factors: torch.Tensor, block_elements: int = BLOCK_ELEMENTS):
    """:func:`linear_clipped_sum_blocks` for kept per-example gradients: ``Σ_i c_i g_i``, a block of output rows
    at a time, then the bias.

    >>> w, c = torch.ones(2, 4, 3), torch.tensor([1.0, 0.5])
    >>> [(which, rows, float(block.sum())) for which, rows, block in example_grads_clipped_sum_blocks(w, None, c, 6)]
    [('weight', slice(0, 2, None), 9.0), ('weight', slice(2, 4, None), 9.0)]
    """
    if weight_grads is not None:
        factors = factors.to(device=weight_grads.device, dtype=weight_grads.dtype)
        d_out, d_in = weight_grads.shape[1:]
        step = max(1, block_elements // d_in)
        for start in range(0, d_out, step):
            rows = slice(start, min(start + step, d_out))
            yield "weight", rows, torch.einsum("b,boi->oi", factors, weight_grads[:, rows])
    if bias_grads is not None:
        yield "bias", slice(None), factors.to(device=bias_grads.device, dtype=bias_grads.dtype) @ bias_grads
