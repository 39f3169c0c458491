"""Contextual fusion (Dual-Priv step 4, VisionZip's merge) of one example's remaining tokens.

Given the R tokens left after the dominant ones are taken (in ascending patch order) and a count k:

1. centres: a uniform stride over the remaining tokens, positions 0, s, 2s, ... (k of them), s = max(1, R // k)
   (the paper does not say how centres are picked; this is VisionZip's choice);
2. every other remaining token (a *member*) joins the centre it is most cosine-similar to
   (ties -> the lowest centre index);
3. c_i = centre_i + mean(members of cluster i); a cluster without members gives c_i = centre_i.

The centre itself is counted once (as ``centre_i``), not again among the members, as in VisionZip.
Deterministic: the assignment is an argmax and the means are a one-hot matrix product (no atomic adds).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def uniform_centres(n_remaining: int, n_contextual: int, device=None) -> torch.Tensor:
    """Positions (within the remaining tokens) of the k centres: 0, s, 2s, ..., s = max(1, R // k)."""
    if not 1 <= n_contextual <= n_remaining:
        raise ValueError(f"cannot pick {n_contextual} centres among {n_remaining} remaining tokens")
    step = max(1, n_remaining // n_contextual)
    return torch.arange(0, n_remaining, step, device=device)[:n_contextual]


def fuse_contextual(tokens: torch.Tensor, n_contextual: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fuse ``tokens`` [R, d] into ``n_contextual`` tokens.

    Returns:
        fused [k, d]: c_i = centre_i + mean(members of cluster i);
        assignment [R]: the cluster of every remaining token (a centre is in its own cluster);
        centre_positions [k]: positions of the centres within ``tokens``.
    """
    n_remaining = tokens.shape[0]
    centres = uniform_centres(n_remaining, n_contextual, device=tokens.device)
    is_centre = torch.zeros(n_remaining, dtype=torch.bool, device=tokens.device)
    is_centre[centres] = True
    members = tokens[~is_centre]
    unit = F.normalize(tokens.float(), dim=-1)  # cosine similarity = dot product of unit vectors
    similarity = unit[~is_centre] @ unit[centres].T               # [M, k]
    member_cluster = similarity.argmax(dim=1)                      # first maximum on ties
    one_hot = F.one_hot(member_cluster, n_contextual).to(tokens.dtype)  # [M, k]
    counts = one_hot.sum(dim=0).clamp(min=1)                       # empty cluster: mean of nothing = 0
    member_mean = (one_hot.T @ members) / counts[:, None]
    fused = tokens[centres] + member_mean
    assignment = torch.empty(n_remaining, dtype=torch.long, device=tokens.device)
    assignment[centres] = torch.arange(n_contextual, device=tokens.device)
    assignment[~is_centre] = member_cluster
    return fused, assignment, centres
