"""Peak memory and step time, measured the same way for every method.

- CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``max_memory_allocated`` (and ``max_memory_reserved``)
  over the measured steps.
- CPU: the tensor-byte peak from the torch profiler's allocation events: the running sum of every allocation
  and free during the measured steps, plus the bytes of tensors already alive when the step starts (model
  parameters, gradients and optimizer state). glibc's RSS is not used by default because it was measured off
  by up to 45% on these machines (freed arenas are not returned). For a side-by-side comparison each
  configuration runs in a fresh subprocess (``toolkit.bench``) so nothing leaks between methods.

Example::

    >>> import torch
    >>> from toolkit.metering import measure_peak
    >>> peak = measure_peak(lambda: torch.ones(1024, 1024).sum(), baseline_tensors=[])
    >>> peak.peak_mb >= 4.0
    True
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch.profiler import ProfilerActivity, profile

from toolkit.compat import profiler_memory_events

MB = 1024 * 1024


@dataclass
class PeakMemory:
    peak_mb: float          # the report: peak tensor bytes (CPU) or max_memory_allocated (CUDA)
    baseline_mb: float      # tensors alive before the step (CPU), or allocated before the step (CUDA)
    reserved_mb: float | None
    device: str
    method: str             # how it was measured, in words


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct tensor storages (shared storages counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def live_training_tensors(module: torch.nn.Module, optimizer=None) -> list[torch.Tensor]:
    """Parameters, buffers, gradients and optimizer state: what is alive before a training step."""
    tensors = list(module.parameters()) + list(module.buffers())
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    if optimizer is not None:
        for state in getattr(optimizer, "state", {}).values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


def measure_peak(step: Callable[[], object], baseline_tensors: Iterable[torch.Tensor],
                 device: str | torch.device = "cpu") -> PeakMemory:
    """Run ``step()`` once and return its peak memory (see the module docstring for the method). On CUDA, the
    counters of ``device`` itself (``cuda:1`` is not the current device unless someone made it so)."""
    if torch.device(device).type == "cuda":
        gpu = torch.device(device)
        torch.cuda.synchronize(gpu)
        torch.cuda.reset_peak_memory_stats(gpu)
        before = torch.cuda.memory_allocated(gpu)
        step()
        torch.cuda.synchronize(gpu)
        return PeakMemory(torch.cuda.max_memory_allocated(gpu) / MB, before / MB,
                          torch.cuda.max_memory_reserved(gpu) / MB, str(device), "cuda max_memory_allocated")
    baseline = tensor_bytes(baseline_tensors)
    # kineto prints "profiler_start/stop" lines on stderr for every session unless its log level is raised (6;
    # that hides its error lines too). It reads the variable when the profiler first starts in a process, so it is
    # set only around that start: child processes and a user's own setting are left alone.
    quieted = "KINETO_LOG_LEVEL" not in os.environ
    if quieted:
        os.environ["KINETO_LOG_LEVEL"] = "6"
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    finally:
        if quieted:
            os.environ.pop("KINETO_LOG_LEVEL", None)
    events = profiler_memory_events(prof)
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return PeakMemory((baseline + peak) / MB, baseline / MB, None, "cpu",
                      "cpu tensor bytes (profiler allocation events + live parameters/state)")


class StepTimer:
    """Wall time per step; ``median`` over the recorded steps (the first ``skip`` are warm-up)."""

    def __init__(self, skip: int = 1, device: str | torch.device | None = None):
        self.skip = skip
        self.device = None if device is None else torch.device(device)
        self.times: list[float] = []

    def _wait_for_device(self) -> None:
        """A GPU runs asynchronously: wait for the step's device (any GPU when none was named) before reading
        the clock."""
        if self.device is None and torch.cuda.is_available():
            torch.cuda.synchronize()
        elif self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, step: Callable[[], object]):
        self._wait_for_device()
        started = time.perf_counter()
        out = step()
        self._wait_for_device()
        self.times.append(time.perf_counter() - started)
        return out

    @property
    def median(self) -> float:
        kept = self.times[self.skip:] or self.times
        return float(statistics.median(kept)) if kept else float("nan")
