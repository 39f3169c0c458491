"""Data-parallel training over several processes (``torchrun --nproc-per-node N -m toolkit train ...``).

What each of the N ranks does, and why the privacy analysis is the one of a single process:

* **Sampling.** Every rank draws the *same* global Poisson batch (each record in with probability q, from a sampler
  generator whose secret seed rank 0 draws and broadcasts) and keeps its share ``batch[rank::N]``. The union of
  the shares is one Poisson sample of the whole data set at rate q, so the accountant records the global q (not
  q/N, not N steps). A rank whose share is empty still takes part in the step (it contributes a zero sum).
* **Clipping** is per example, on the rank that holds the example, in ≥ fp32 (:mod:`toolkit.privacy.update_pruning`).
* **Noise ONCE.** Rank 0 adds N(0, σ²C²) to its clipped sum, the other ranks add nothing, and one all-reduce (SUM,
  in ≥ fp32) gives every rank ``Σ_all ḡ_i + noise``: Opacus' ``DistributedDPOptimizer`` scheme. Unlike that class,
  the reduction happens *before* the division by ``B_expected`` (the global q·N), the rounding to the parameter
  dtype and mechanism 2's mask: the mask must be computed from the combined noisy gradient (Opacus reduces after
  ``pre_step``, where a mask would be computed from each rank's partial, noise-free sum). Every rank then holds the
  same noisy gradient, computes the same mask and takes the same optimizer step: replicas stay identical
  (:func:`check_replicas_identical` verifies it at the end of a run).
* **Accounting.** Every rank's accountant records the same steps; ε is reported by rank 0.

Non-private runs all-reduce the summed gradients and divide by the global batch size. DP-ZO is not distributed
(refused with an error). Ranks start from identical trainable parameters (broadcast from rank 0).

Example (one process: nothing distributed)::

    >>> from toolkit.distributed import context
    >>> context().world_size
    1
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from toolkit.secret_random import ENTROPY_BITS, os_entropy, secret_generator, seeded_generator


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether the environment of a multi-process launch (torchrun sets ``WORLD_SIZE`` > 1) is present."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def context() -> DistributedContext:
    """This process's rank and the world size (1 process when no process group is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistributedContext(0, 1, 0)


def init_from_env(device_type: str) -> DistributedContext:
    """Join the process group torchrun describes (``gloo`` on CPU, ``nccl`` on CUDA); no-op for one process."""
    if not launched_by_torchrun():
        return context()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        if device_type == "cuda":  # NCCL needs each process bound to its own GPU before the group forms
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return context()


def local_device(device: torch.device, ctx: DistributedContext) -> torch.device:
    """One GPU per process: ``cuda:LOCAL_RANK`` when the run is on CUDA."""
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def shared_secret_entropy(ctx: DistributedContext, bits: int = ENTROPY_BITS) -> list[int]:
    """``bits`` (≥ 128) of OS entropy drawn on rank 0 and broadcast, as 32-bit words every rank agrees on."""
    words = torch.tensor(os_entropy(bits) if ctx.is_main else [0] * (-(-bits // 32)), dtype=torch.int64)
    if ctx.enabled:
        words = words.to(collective_device(ctx))
        dist.broadcast(words, src=0)
    return [int(w) for w in words.cpu().tolist()]


def collective_device(ctx: DistributedContext) -> torch.device:
    """Where a tensor must be for this group's collectives: NCCL moves CUDA tensors only (a CPU tensor is
    refused), gloo moves CPU tensors."""
    if ctx.enabled and dist.get_backend() == "nccl":
        return torch.device("cuda", ctx.local_rank)
    return torch.device("cpu")


def shared_secret_generator(noise_seed: int | None, stream: int, ctx: DistributedContext) -> torch.Generator:
    """A generator every rank agrees on: its whole state from 128 bits of entropy drawn on rank 0 and broadcast
    (secret: it decides which records join each batch), or derived from ``noise_seed`` (reproducible, NOT
    private)."""
    if noise_seed is not None:
        return secret_generator(noise_seed, stream)
    return seeded_generator(entropy=shared_secret_entropy(ctx) + [int(stream)])


def share(idx: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """This rank's share of a global batch: ``idx[rank::world_size]`` (balanced within one record)."""
    return idx[ctx.rank::ctx.world_size] if ctx.enabled else idx


def broadcast_trainable(module: nn.Module, ctx: DistributedContext) -> None:
    """Make every rank start from rank 0's trainable parameters."""
    if not ctx.enabled:
        return
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)


def all_reduce_sum(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """SUM over ranks of each tensor, in one all-reduce per dtype (flattened, so hundreds of LoRA tensors cost
    one collective; identity for one process)."""
    out = list(tensors)
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return out
    for dtype in sorted({t.dtype for t in tensors}, key=str):  # the same order on every rank
        where = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        flat = torch.cat([tensors[i].reshape(-1) for i in where])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for i, piece in zip(where, flat.split([tensors[i].numel() for i in where])):
            out[i] = piece.view_as(tensors[i])
    return out


def check_replicas_identical(module: nn.Module, ctx: DistributedContext) -> None:
    """Raise if any rank's trainable parameters differ from the others' (the updates must be identical)."""
    if not ctx.enabled:
        return
    flat = torch.cat([p.detach().float().reshape(-1) for p in module.parameters() if p.requires_grad])
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    if not torch.equal(high, low):
        raise RuntimeError(f"replicas diverged: trainable parameters differ across ranks by up to "
                           f"{float((high - low).abs().max()):.3g}")


def shutdown(ctx: DistributedContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
