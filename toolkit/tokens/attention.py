"""Attention scores recomputed from a layer's own modules, so the tower can keep running with SDPA.

Under SDPA, transformers returns no attention weights. Instead of patching the attention classes, we recompute
the part we need from the scoring layer's ``layer_norm1``, ``self_attn.q_proj`` and ``self_attn.k_proj``,
applied to ``hidden_states[layer]`` (the *input* of encoder layer ``layer``), exactly as the layer does:

    x = LayerNorm1(h),  Q_h = (x W_q + b_q)_h,  K_h = (x W_k + b_k)_h,
    A_h = softmax(Q_h K_h^T / sqrt(d_head)) ,                         d_head = hidden_size / n_heads

* [CLS] row (CLIP):   s_j = mean_h A_h[cls, 1 + j]        for patch j (column 0 is [CLS] itself; not renormalised)
* mean received:      s_j = mean_h mean_i A_h[i, off + j] over every query i (towers without [CLS], e.g. SigLIP)

Only the [CLS] query is projected for the [CLS] row (one query row instead of T). Works on ``[T, d]`` or
``[B, T, d]``; every row of a batch is computed independently.
"""
from __future__ import annotations

import torch
from torch import nn


def encoder_layers(tower: nn.Module) -> nn.ModuleList:
    """The vision tower's transformer layers, found by structure (not by a hard-coded path).

    The layers are the ``nn.ModuleList`` whose children all have ``layer_norm1`` and a ``self_attn`` with
    ``q_proj``/``k_proj`` (CLIP and SigLIP share this structure). SigLIP's pooling head uses another structure,
    so it is not picked up.
    """
    found = []
    for name, module in tower.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(
            hasattr(layer, "layer_norm1") and hasattr(getattr(layer, "self_attn", None), "q_proj")
            and hasattr(getattr(layer, "self_attn", None), "k_proj")
            for layer in module
        ):
            found.append((name, module))
    if not found:
        raise ValueError(
            f"could not find encoder layers with layer_norm1/self_attn.q_proj/k_proj in {type(tower).__name__}: "
            "attention-based token scores need a CLIP/SigLIP-style tower"
        )
    # One stack in CLIP/SigLIP; if a tower ever nests several, the longest is the encoder.
    return max(found, key=lambda item: len(item[1]))[1]


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[..., T, d] -> [..., n_heads, T, d_head]."""
    *lead, tokens, width = x.shape
    return x.reshape(*lead, tokens, n_heads, width // n_heads).transpose(-3, -2)


def attention_probs(layer: nn.Module, hidden: torch.Tensor, n_heads: int,
                    query_rows: slice | None = None) -> torch.Tensor:
    """Softmax attention of ``layer`` on its input ``hidden`` ([..., T, d]): [..., n_heads, Q, T] in float32.

    ``query_rows`` restricts the queries (e.g. ``slice(0, 1)`` for the [CLS] row only); keys are always all T.
    """
    attn = layer.self_attn
    width = hidden.shape[-1]
    if width % n_heads:
        raise ValueError(f"hidden size {width} is not divisible by {n_heads} attention heads")
    scale = (width // n_heads) ** -0.5
    x = layer.layer_norm1(hidden)
    queries = attn.q_proj(x if query_rows is None else x[..., query_rows, :])
    keys = attn.k_proj(x)
    # float32 softmax: the ranking of small attention values must not depend on a bf16 rounding.
    logits = _heads(queries, n_heads).float() @ _heads(keys, n_heads).float().transpose(-1, -2) * scale
    return logits.softmax(dim=-1)


def cls_attention(layer: nn.Module, hidden: torch.Tensor, n_heads: int) -> torch.Tensor:
    """s_j = mean_h softmax(Q_h K_h^T / sqrt(d_head))[cls, 1 + j]: [..., n_patches] (token 0 is [CLS])."""
    row = attention_probs(layer, hidden, n_heads, query_rows=slice(0, 1))  # [..., H, 1, T]
    return row[..., 0, 1:].mean(dim=-2)


def mean_received_attention(layer: nn.Module, hidden: torch.Tensor, n_heads: int, n_patches: int) -> torch.Tensor:
    """s_j = mean over heads and queries of the attention patch j receives: [..., n_patches].

    The patches are the last ``n_patches`` tokens (a [CLS] token, if any, is a query but gets no score).
    """
    probs = attention_probs(layer, hidden, n_heads)  # [..., H, T, T]
    received = probs.mean(dim=(-3, -2))               # mean over heads and queries -> [..., T]
    return received[..., received.shape[-1] - n_patches:]
