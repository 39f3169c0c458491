"""The checks :class:`toolkit.privacy.DPEngine` runs on what it is given, before it wraps anything: positive
numbers, the optimizer's parameters against the module's trainable ones, and the precision a clipping mode needs.
Each raises ``ValueError`` naming the problem."""
from __future__ import annotations

import math

import torch
from torch import nn


def positive_number(name: str, value, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value) \
        and (value >= 0 if allow_zero else value > 0) and not math.isinf(value)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


def check_parameters(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    names = {id(p): n for n, p in module.named_parameters()}
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    in_optimizer = [p for g in optimizer.param_groups for p in g["params"]]
    if not in_optimizer:
        raise ValueError("the optimizer has no parameters")
    foreign = [p for p in in_optimizer if id(p) not in names]
    if foreign:
        raise ValueError(f"{len(foreign)} optimizer parameter(s) do not belong to the module: Opacus computes "
                         "per-example gradients only for the module's parameters")
    frozen = [names[id(p)] for p in in_optimizer if not p.requires_grad]
    if frozen:
        raise ValueError(f"optimizer holds frozen parameters (requires_grad=False): {frozen[:5]}")
    missing = [names[i] for i in trainable - {id(p) for p in in_optimizer}]
    if missing:
        raise ValueError(
            f"trainable parameters missing from the optimizer: {sorted(missing)[:5]}"
            f"{' ...' if len(missing) > 5 else ''}; freeze them or give them to the optimizer "
            "(their per-example gradients would be computed and never cleared)")

def check_precision(optimizer: torch.optim.Optimizer, grad_sample_mode: str) -> None:
    low = sorted({str(p.dtype) for g in optimizer.param_groups for p in g["params"]
                  if p.dtype not in (torch.float32, torch.float64)})
    if low and grad_sample_mode == "ghost":
        raise ValueError(
            f"ghost clipping with {', '.join(low)} parameters: its clipped sum comes from a backward pass in the "
            "parameter dtype, so the per-example bound C would hold only to that precision; use "
            "grad_sample_mode='hooks' (clips in fp32 whatever the dtype) or float32 parameters")
