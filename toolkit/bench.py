"""Side-by-side peak memory and step time of non-private, DP-SGD, Dual-Priv and DP-ZO on one model and batch.

Every method takes the same batch of ``batch_size`` records through the *whole* step: frozen vision tower
(``tower_in_step=True``, no gradient) -> token pruning -> projector + LLM -> the LM head at the answer positions
-> the method's update. Step 1 is a warm-up (lazy allocations, optimizer state), step 2 is profiled for peak memory
(see :mod:`toolkit.metering`), the remaining steps are timed. With ``isolate=True`` each method runs in a fresh
Python subprocess so one method's allocations cannot inflate another's. Ratios are computed from numbers measured
in the same run. ``tokens_per_s`` counts every non-padding token the LLM sees (prompt, visual tokens, answer).

Scale options: ``device`` ("auto": CUDA when available), ``dtype`` ("auto": bf16 on CUDA, fp32 on CPU; see
:mod:`toolkit.precision`), ``lm_layers`` / ``vision_layers`` (a preset's widths at another depth, for per-layer
measurements; ``benchmarks/paper_shape.py``), ``activation_checkpointing``.

Example::

    >>> from toolkit.bench import run_bench
    >>> table = run_bench(methods=("dp-sgd", "dual-priv"), preset="tiny", batch_size=2, steps=3,
    ...                   isolate=False)                                   # doctest: +SKIP
    >>> list(table.columns)[:4]                                            # doctest: +SKIP
    ['method', 'visual_tokens', 'peak_memory_mb', 'step_time_s']
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import deque
from typing import Callable

import pandas as pd
import torch

from toolkit.config import TrainConfig, resolve_device
from toolkit.data import Collator, make_vqa, preprocess_images
from toolkit.features import make_pruner_for
from toolkit.forward import LlavaLM, answer_losses, tower_hidden_states
from toolkit.metering import StepTimer, live_training_tensors, measure_peak
from toolkit.models import (PRESETS, apply_trainable, build_model, enable_activation_checkpointing, preset_spec,
                            spec_patches)
from toolkit.optimizers import make_optimizer
from toolkit.precision import cast_for_training, resolve_dtype
from toolkit.tokens import resolve_keep
from toolkit.vocabulary import METHODS

DEFAULT_METHODS = METHODS
COLUMNS = ["method", "visual_tokens", "peak_memory_mb", "step_time_s", "tokens_per_s", "memory_vs_dp_sgd",
           "memory_vs_dp_zo", "memory_vs_non_private", "time_vs_dp_sgd", "time_vs_non_private",
           "throughput_vs_non_private", "trainable_params", "tokens_per_step", "batch_size", "preset", "lm_layers",
           "vision_layers", "dtype", "trainable_dtype", "activation_checkpointing", "tower_in_step", "optimizer", "lora_variant",
           "grad_sample_mode", "memory_method", "device"]
# a line of the isolated worker's stderr that starts with this is a phase of its measurement, not a message
PHASE_PREFIX = "[bench phase] "


def bench_config(method: str, *, preset: str, batch_size: int, steps: int, token_strategy: str,
                 keep_tokens: int | None, token_prune_ratio: float | None, grad_prune_ratio: float, trainable: str,
                 grad_sample_mode: str, prune_tokens_for_all: bool = False, seed: int = 0, device: str = "auto",
                 dtype: str = "auto", lm_layers: int | None = None, vision_layers: int | None = None,
                 activation_checkpointing: bool = False, optimizer: str = "adam", lora_variant: str = "standard",
                 trainable_dtype: str = "float32") -> TrainConfig:
    """The run one method's measurement stands for, with every argument checked (``ValueError`` naming it): the
    bench checks them all before a model is built or a worker started, not an hour into the 7B shape."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 3:
        raise ValueError(f"steps must be an integer >= 3 (warm-up, profiled, timed), got {steps!r}")
    prune = method == "dual-priv" or prune_tokens_for_all
    config = TrainConfig(method=method, preset=preset, steps=steps, expected_batch_size=batch_size,
                         token_strategy=token_strategy if prune else "none", keep_tokens=keep_tokens,
                         token_prune_ratio=token_prune_ratio if prune else None,
                         grad_prune_ratio=grad_prune_ratio if method == "dual-priv" else 0.0,
                         trainable=trainable, grad_sample_mode=grad_sample_mode, seed=seed, device=device,
                         dtype=dtype, activation_checkpointing=activation_checkpointing, optimizer=optimizer,
                         lora_variant=lora_variant, trainable_dtype=trainable_dtype).resolved()
    spec = preset_spec(preset, lm_layers, vision_layers)
    if prune:
        resolve_keep(config.token_strategy, spec_patches(spec), config.keep_tokens, config.token_prune_ratio)
    resolve_dtype(config.dtype, resolve_device(config))
    return config


def measure_method(method: str, preset: str = "tiny", batch_size: int = 8, steps: int = 4,
                   token_strategy: str = "dual-priv", keep_tokens: int | None = None,
                   token_prune_ratio: float | None = 0.75, grad_prune_ratio: float = 0.2, trainable: str = "lora+head",
                   grad_sample_mode: str = "hooks", prune_tokens_for_all: bool = False, tower_in_step: bool = True,
                   seed: int = 0, device: str = "auto", dtype: str = "auto", lm_layers: int | None = None,
                   vision_layers: int | None = None, activation_checkpointing: bool = False,
                   optimizer: str = "adam", lora_variant: str = "standard", trainable_dtype: str = "float32",
                   on_phase: Callable[[str], None] | None = None) -> dict:
    """Measure one method in this process; returns one record of the table. ``optimizer``, ``lora_variant`` and
    ``trainable_dtype`` are the run's (``TrainConfig``): Adam's two moments, LoRA's A matrices and fp32 trained
    weights are part of a method's memory. ``on_phase(text)`` is told each phase as it starts (model built,
    warm-up, profiled and timed steps): at the 7B shape on a CPU one step takes minutes."""
    phase = on_phase or (lambda text: None)
    config = bench_config(method, preset=preset, batch_size=batch_size, steps=steps, token_strategy=token_strategy,
                          keep_tokens=keep_tokens, token_prune_ratio=token_prune_ratio,
                          grad_prune_ratio=grad_prune_ratio, trainable=trainable, grad_sample_mode=grad_sample_mode,
                          prune_tokens_for_all=prune_tokens_for_all, seed=seed, device=device, dtype=dtype,
                          lm_layers=lm_layers, vision_layers=vision_layers,
                          activation_checkpointing=activation_checkpointing, optimizer=optimizer,
                          lora_variant=lora_variant, trainable_dtype=trainable_dtype)
    device = resolve_device(config)
    torch_dtype = resolve_dtype(config.dtype, device)
    dtype_name = str(torch_dtype).split(".")[-1]
    # weights do not change memory or time: random ones, no warm start, created on the device in the dtype
    bundle = build_model(preset, seed=seed, dtype=torch_dtype, lm_layers=lm_layers, vision_layers=vision_layers,
                         device=device)
    phase(f"model built ({bundle.info['lm_layers']} LM / {bundle.info['vision_layers']} vision layers, "
          f"{dtype_name}, {device})")
    torch.manual_seed(seed)
    n_trainable = apply_trainable(bundle, config.trainable, config.lora_rank, lora_variant=config.lora_variant)
    cast_for_training(bundle.model, torch_dtype, config.trainable_dtype)
    if activation_checkpointing and method != "dp-zo":  # DP-ZO has no backward: nothing to recompute
        enable_activation_checkpointing(bundle)
    pruner = make_pruner_for(bundle, config)
    records = make_vqa("digit", "private", bundle.image_size, limit=batch_size).records
    pixels = preprocess_images([r.image for r in records], bundle.image_size, bundle.image_mean, bundle.image_std)
    pixels = pixels.to(device)
    collator = Collator(bundle.tokenizer, pruner.n_out, bundle.image_token_id, bundle.prompt_template)
    batch = {k: v.to(device) for k, v in collator(records).items()}
    lm = LlavaLM(bundle).bind_collator(collator).train()
    stepper = make_optimizer(config, lm, noise_multiplier=1.0, sample_rate=min(1.0, batch_size / 700))
    cached = None if tower_in_step else pruner(tower_hidden_states(bundle, pixels)).features

    def losses() -> torch.Tensor:
        feats = pruner(tower_hidden_states(bundle, pixels)).features if tower_in_step else cached
        return answer_losses(stepper.module, feats, batch)

    phase(f"step 1 of {steps} (warm-up)")
    stepper.step(losses)
    baseline = live_training_tensors(bundle.model, getattr(stepper, "optimizer", None)) + [pixels]
    phase(f"step 2 of {steps} (peak memory)")
    peak = measure_peak(lambda: stepper.step(losses), baseline, device=device)
    timer = StepTimer(skip=0, device=device)
    for step in range(3, steps + 1):
        phase(f"step {step} of {steps} (timed)")
        timer.time(lambda: stepper.step(losses))
    tokens = int(batch["attention_mask"].sum())
    spec = bundle.info
    return dict(method=method, visual_tokens=pruner.n_out, peak_memory_mb=round(peak.peak_mb, 2),
                step_time_s=round(timer.median, 4), tokens_per_s=round(tokens / timer.median, 2),
                trainable_params=n_trainable, tokens_per_step=tokens, batch_size=batch_size, preset=preset,
                lm_layers=spec["lm_layers"], vision_layers=spec["vision_layers"], dtype=dtype_name,
                activation_checkpointing=activation_checkpointing, tower_in_step=tower_in_step,
                optimizer=config.optimizer if method != "dp-zo" else "zo-sgd", lora_variant=config.lora_variant,
                trainable_dtype=config.trainable_dtype,
                grad_sample_mode=config.grad_sample_mode if method in ("dp-sgd", "dual-priv") else None,
                memory_method=peak.method, device=str(device))


def _measure_isolated(kwargs: dict, on_phase: Callable[[str], None] | None = None) -> dict:
    """One method in a fresh subprocess; its phase lines are passed on as they come, the rest kept for an error."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    tail: deque[str] = deque(maxlen=200)
    # stdout to a file: whatever else the child prints there cannot fill a pipe while stderr is read
    with tempfile.TemporaryFile("w+") as out:
        with subprocess.Popen([sys.executable, "-m", "toolkit.bench", json.dumps(kwargs)], stdout=out,
                              stderr=subprocess.PIPE, text=True, env=env) as proc:
            for line in proc.stderr:
                if line.startswith(PHASE_PREFIX):
                    if on_phase is not None:
                        on_phase(line[len(PHASE_PREFIX):].rstrip("\n"))
                else:
                    tail.append(line)
        out.seek(0)
        printed = out.read()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark of {kwargs['method']} failed:\n{''.join(tail)[-2000:]}")
    return json.loads(printed.strip().splitlines()[-1])


def add_ratios(table: pd.DataFrame) -> pd.DataFrame:
    """Ratios to DP-SGD, DP-ZO and non-private, from numbers of the same run (NaN when absent)."""
    def ratio(column: str, method: str) -> pd.Series:
        ref = table.loc[table.method == method, column]
        return table[column] / float(ref.iloc[0]) if len(ref) else float("nan")

    table = table.copy()
    table["memory_vs_dp_sgd"] = ratio("peak_memory_mb", "dp-sgd")
    table["memory_vs_dp_zo"] = ratio("peak_memory_mb", "dp-zo")
    table["memory_vs_non_private"] = ratio("peak_memory_mb", "non-private")
    table["time_vs_dp_sgd"] = ratio("step_time_s", "dp-sgd")
    table["time_vs_non_private"] = ratio("step_time_s", "non-private")
    if "tokens_per_s" in table.columns:
        table["throughput_vs_non_private"] = ratio("tokens_per_s", "non-private")
    return table[[c for c in COLUMNS if c in table.columns]].round(4)


# What a preset's bench measures when no flag says otherwise. The llava-7b-shape preset names its own lean settings
# (toolkit.models.PRESETS[...]["bench"]): the paper's LoRA and 576 -> 64 tokens, checkpointing, ghost-fp32, and
# SGD with momentum (one state tensor; DP-ZO's update has none, Adam's two bf16 moments are 156 MB at 7B). Trained
# weights are fp32 for every preset, as training keeps them (TrainConfig.trainable_dtype).
BENCH_DEFAULTS = dict(trainable="lora+head", keep_tokens=None, activation_checkpointing=False,
                      grad_sample_mode="hooks", optimizer="adam", trainable_dtype="float32")


def bench_defaults(preset: str) -> dict:
    """The settings the bench uses for ``preset`` when none is given: :data:`BENCH_DEFAULTS` updated by the preset's.

    >>> bench_defaults("llava-7b-shape")["grad_sample_mode"], bench_defaults("tiny")["grad_sample_mode"]
    ('ghost-fp32', 'hooks')
    """
    return BENCH_DEFAULTS | PRESETS.get(preset, {}).get("bench", {})


def run_bench(methods=DEFAULT_METHODS, preset: str = "tiny", batch_size: int = 8, steps: int = 4,
              token_strategy: str = "dual-priv", keep_tokens: int | None = None, token_prune_ratio: float | None = 0.75,
              grad_prune_ratio: float = 0.2, trainable: str = "lora+head", grad_sample_mode: str | None = None,
              prune_tokens_for_all: bool = False, tower_in_step: bool = True, isolate: bool = True,
              progress: Callable[[str, int, int], None] | None = None, device: str = "auto", dtype: str = "auto",
              lm_layers: int | None = None, vision_layers: int | None = None,
              activation_checkpointing: bool | None = None, optimizer: str | None = None,
              lora_variant: str = "standard", trainable_dtype: str | None = None,
              on_phase: Callable[[str, str], None] | None = None) -> pd.DataFrame:
    """Measure every method on the same model and batch; one row per method, with ratios.

    ``progress(method, index, total)`` is called before each method (the dashboard uses it), ``on_phase(method,
    text)`` at each phase of its measurement (the command line prints it: a 7B-shape step takes minutes on a CPU).
    ``activation_checkpointing`` / ``grad_sample_mode`` / ``optimizer`` = None: :func:`bench_defaults` of the preset
    (``llava-7b-shape``: checkpointing on, ghost-fp32 clipping, SGD with momentum; else off / ``hooks`` / Adam).
    """
    lean = bench_defaults(preset)
    if activation_checkpointing is None:
        activation_checkpointing = bool(lean["activation_checkpointing"])
    if grad_sample_mode is None:
        grad_sample_mode = lean["grad_sample_mode"]
    if optimizer is None:
        optimizer = lean["optimizer"]
    if trainable_dtype is None:
        trainable_dtype = lean["trainable_dtype"]
    methods = list(methods)
    unknown = [m for m in methods if m not in DEFAULT_METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown methods {unknown}; choose among {DEFAULT_METHODS}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    shared = dict(preset=preset, batch_size=batch_size, steps=steps, token_strategy=token_strategy,
                  keep_tokens=keep_tokens, token_prune_ratio=token_prune_ratio, grad_prune_ratio=grad_prune_ratio,
                  trainable=trainable, grad_sample_mode=grad_sample_mode, prune_tokens_for_all=prune_tokens_for_all,
                  device=device, dtype=dtype, lm_layers=lm_layers, vision_layers=vision_layers,
                  activation_checkpointing=activation_checkpointing, optimizer=optimizer, lora_variant=lora_variant,
                  trainable_dtype=trainable_dtype)
    for method in methods:      # every method's arguments, before the first one runs
        bench_config(method, **shared)
    rows = []
    for i, method in enumerate(methods):
        if progress is not None:
            progress(method, i, len(methods))
        kwargs = dict(method=method, tower_in_step=tower_in_step, **shared)
        tell = None if on_phase is None else (lambda text, method=method: on_phase(method, text))
        rows.append(_measure_isolated(kwargs, tell) if isolate else measure_method(**kwargs, on_phase=tell))
    return add_ratios(pd.DataFrame(rows))


def format_table(table: pd.DataFrame) -> str:
    shown = ["method", "visual_tokens", "peak_memory_mb", "step_time_s", "tokens_per_s", "memory_vs_dp_sgd",
             "memory_vs_dp_zo", "memory_vs_non_private", "time_vs_dp_sgd", "throughput_vs_non_private"]
    return table[[c for c in shown if c in table.columns]].to_string(index=False)


def _tell_parent(text: str) -> None:
    print(PHASE_PREFIX + text, file=sys.stderr, flush=True)


if __name__ == "__main__":  # worker mode for isolate=True: one method, one JSON line on stdout, phases on stderr
    print(json.dumps(measure_method(**json.loads(sys.argv[1]), on_phase=_tell_parent)))
