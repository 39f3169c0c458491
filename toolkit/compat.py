"""Every use of a library's private (underscored or undocumented) attribute, in one place.

When Opacus, the torch profiler or tqdm change their internals, this is the one module to fix; each function
says what it relies on. Nothing else in the toolkit reaches into a library's private names.
"""
from __future__ import annotations

import torch
from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed

# Per-module attributes Opacus' GradSampleModule hooks set during a forward (capture_activations_hook).
_OPACUS_MODULE_CAPTURES = ("activations", "max_batch_len")
# Per-parameter attributes Opacus sets while computing per-sample gradients or norms.
_OPACUS_PARAM_CAPTURES = ("_current_grad_sample", "_norm_sample")


def opacus_noise(std: float, reference: torch.Tensor, generator, secure_mode: bool) -> torch.Tensor:
    """Opacus' Gaussian noise shaped like ``reference`` (``secure_mode``: its floating-point-attack-safe draw)."""
    return _generate_noise(std=std, reference=reference, generator=generator, secure_mode=secure_mode)


def opacus_check_unprocessed(summed_grad: torch.Tensor) -> None:
    """Opacus' guard against noising the same clipped sum twice (raises if it was already noised)."""
    _check_processed_flag(summed_grad)


def opacus_mark_processed(summed_grad: torch.Tensor) -> None:
    _mark_as_processed(summed_grad)


def opacus_release_grad_sample(p: torch.Tensor) -> None:
    """Free ``p.grad_sample`` (already clipped and summed) before Opacus' ``zero_grad`` would: each per-example
    tensor becomes an empty placeholder, marked processed, so that ``DPOptimizer.accumulated_iterations`` (it
    counts one per tensor, or the list's length) still sees the chunks this step accumulated."""
    def placeholder(g: torch.Tensor) -> torch.Tensor:
        empty = g.new_empty((0,))
        _mark_as_processed(empty)
        return empty

    grad_sample = p.grad_sample
    p.grad_sample = [placeholder(g) for g in grad_sample] if isinstance(grad_sample, list) else placeholder(grad_sample)


def opacus_captured_batch_size(module: torch.nn.Module) -> int | None:
    """Batch size of the last forward Opacus' hooks captured anywhere under ``module`` (None if none)."""
    for m in module.modules():
        captured = m.__dict__.get("activations")
        if captured:
            return captured[-1][0].shape[0] if captured[-1] else None
    return None


def opacus_forget_captures(module: torch.nn.Module, params) -> None:
    """Drop what Opacus' hooks captured in forwards that were never (successfully) backpropagated."""
    for m in module.modules():
        for attr in _OPACUS_MODULE_CAPTURES:
            if attr in m.__dict__:
                delattr(m, attr)
    for p in params:
        if hasattr(p, "_forward_counter"):
            p._forward_counter = 0
        for attr in _OPACUS_PARAM_CAPTURES:
            if hasattr(p, attr):
                delattr(p, attr)


def opacus_reset_accumulation(optimizer) -> None:
    """Forget a logical batch left half-processed: pending skip signals (``_step_skip_queue``), the "last step
    was skipped" flag (``_is_last_step_skipped``, which makes ``zero_grad`` keep the clipped sum) and the clipped
    sum itself (``p.summed_grad``)."""
    optimizer._step_skip_queue.clear()
    optimizer._is_last_step_skipped = False
    for p in optimizer.params:
        p.summed_grad = None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX tiles), from torch's private probes
    ``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported`` (True when torch lacks them: no warning
    is better than a wrong one)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    probes = [probe for probe in probes if probe is not None]
    return not probes or any(probe() for probe in probes)


def profiler_memory_events(prof) -> list[tuple[int, int]]:
    """``(start_ns, nbytes)`` of every allocation/free the torch profiler recorded (its kineto results)."""
    return sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
