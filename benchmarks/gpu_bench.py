"""The GPU table in one command: 7B-shape peak memory and step time of the four methods at batch 4/8/16, bf16.

    make gpu-bench            # CUDA, >= 80 GB: llava-7b-shape at full depth, <= 8 min wall
    make gpu-bench-smoke      # the same code path on a CPU, tiny preset, 1 batch size (CI: tests/test_gpu_bench.py)

One cell = one method at one batch size, measured by :func:`toolkit.bench.measure_method` in a fresh subprocess
(its own ``max_memory_allocated`` / reserved; an OOM kills only that cell, which is recorded as ``oom`` and the
run goes on). First the bf16 checks (a shallow copy of the preset, same widths; first, so the cells cannot use up
their time; at most ``check_limit_s``, 120 s, so they cannot use up the cells'): the per-example gradient norms of
the bf16 model against the same weights in fp32, each example's clipped sum and its dtype (≥ fp32), and the noise
added in fp32 (its measured std against σ·C). Then the cells, batch by batch (the batch-4 row is complete first);
a cell is started only if the time left before ``--time-limit`` covers it (a cell is given at most the time left,
then recorded as ``timeout``), so the run stops cleanly before the limit. After the whole table, while time is
left, the ``EXTRA_CELLS``: DP-SGD with book-keeping (``ghost-fp32-bk``, one backward pass) at each batch size.
Progress: a line when a cell starts and
when it ends; the files are rewritten after each cell, so a run killed from outside keeps what it measured.

The smoke mode runs the GPU run's settings (``llava-7b-shape``'s lean defaults: LoRA, activation checkpointing,
ghost-fp32 clipping, SGD; 16 of the tiny preset's 64 visual tokens) in one process; the subprocess path of a
cell and of the checks is tested on its own (tests/test_gpu_bench.py). On a machine without internet whose
python3 holds CUDA torch: ``make gpu-wheels`` here, then ``bash benchmarks/gpu_device.sh`` there.

Writes ``<out>/gpu-<date>.json`` (every cell, the checks, the settings) and ``<out>/gpu-<date>.md`` (the table
with DP-SGD / non-private throughput and Dual-Priv / DP-ZO, Dual-Priv / DP-SGD memory per batch size).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from toolkit.bench import bench_defaults, measure_method
from toolkit.data import Collator, make_vqa, preprocess_images
from toolkit.forward import LlavaLM, answer_losses, select_features, tower_hidden_states
from toolkit.models import apply_trainable, build_model
from toolkit.privacy import make_private
from toolkit.privacy.ghost_fp32 import GhostFp32Module

warnings.filterwarnings("ignore", message="Full backward hook is firing")
METHODS = ("non-private", "dp-sgd", "dual-priv", "dp-zo")
# Cells run after the whole table, while time is left: DP-SGD with ghost-fp32's one-backward book-keeping, the lever
# for the DP-SGD / non-private throughput target (a second backward costs about one more backward; measured only on
# a CPU so far, tiny preset: 0.47 with two passes, 0.67 with one, benchmarks/step_cost.py).
EXTRA_CELLS = (("dp-sgd-bk", dict(method="dp-sgd", grad_sample_mode="ghost-fp32-bk")),)
# steps: one warm-up, one profiled (peak memory), the median of the rest timed (4: two timed steps, so all 12 cells
# fit the 7.5 minutes; a GPU step varies little once warm)
FULL = dict(preset="llava-7b-shape", batches=(4, 8, 16), steps=4, device="cuda", dtype="bfloat16", lm_layers=None,
            vision_layers=None, check_layers=(1, 2), time_limit=450.0, min_cell_s=20.0, isolate=True,
            settings_of="llava-7b-shape", keep_tokens=None, check_limit_s=120.0)
SMOKE = dict(preset="tiny", batches=(2,), steps=3, device="cpu", dtype="bfloat16", lm_layers=None,
             vision_layers=None, check_layers=(None, None), time_limit=55.0, min_cell_s=1.0, isolate=False,
             settings_of="llava-7b-shape", keep_tokens=16, check_limit_s=55.0)
# what a failed allocation says on CUDA (the caching allocator, cuBLAS, cuDNN) and on a CPU
OOM_MARKERS = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed", "cannot allocate memory")


def _lean_settings(mode: dict) -> dict:
    """The bench settings of ``mode["settings_of"]`` (llava-7b-shape: LoRA, 576 -> 64 tokens, activation
    checkpointing, ghost-fp32, SGD with momentum; toolkit.bench.bench_defaults), ``mode["keep_tokens"]`` if set."""
    bench = bench_defaults(mode["settings_of"])
    keep = mode["keep_tokens"] or bench["keep_tokens"]
    return dict(trainable=bench["trainable"], keep_tokens=keep, token_prune_ratio=None if keep else 0.75,
                activation_checkpointing=bool(bench["activation_checkpointing"]),
                grad_sample_mode=bench["grad_sample_mode"], optimizer=bench["optimizer"],
                trainable_dtype=bench["trainable_dtype"])


def _failure(message: str) -> str:
    return "oom" if any(marker in message.lower() for marker in OOM_MARKERS) else "error"


def _in_process(fn, kwargs: dict) -> tuple[str, dict | None, str]:
    """The smoke mode's cell: the same measurement without the subprocess (whose imports cost ~15 s each)."""
    try:
        return "ok", fn(**kwargs), ""
    except Exception as err:  # recorded, the run goes on
        return _failure(str(err)), None, repr(err)[-1500:]


def _cell(kwargs: dict) -> dict:
    record = measure_method(**kwargs)
    if kwargs["device"].startswith("cuda"):
        record["reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2 ** 20, 1)
    return record


def _child(args: list[str], timeout: float) -> tuple[str, dict | None, str]:
    """Run ``python <this file> <args>`` with a timeout; (status, record or None, error tail)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    try:
        proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env,
                              timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        return "timeout", None, f"killed after {timeout:.0f} s"
    if proc.returncode == 0:
        return "ok", json.loads(proc.stdout.strip().splitlines()[-1]), ""
    tail = proc.stderr[-1500:]
    return _failure(tail), None, tail


def bf16_checks(preset: str, device: str, lm_layers: int | None, vision_layers: int | None) -> dict:
    """Per-example norms bf16 vs fp32 (same weights), clipping and noise in ≥ fp32 with bf16 parameters."""
    bundle = build_model(preset, seed=0, device=device, lm_layers=lm_layers, vision_layers=vision_layers)
    torch.manual_seed(0)
    apply_trainable(bundle, "lora", lora_rank=8)
    with torch.no_grad():  # peft zero-inits lora_B, which would make every lora_A gradient 0
        for name, p in bundle.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    records = make_vqa("parity", "private", bundle.image_size, limit=4).records
    pixels = preprocess_images([r.image for r in records], bundle.image_size, bundle.image_mean, bundle.image_std)
    out, grads = {}, {}
    models = {torch.bfloat16: copy.deepcopy(bundle.model).to(torch.bfloat16), torch.float32: bundle.model}
    for dtype in (torch.float32, torch.bfloat16):
        b = copy.copy(bundle)
        b.model = models[dtype]
        with torch.no_grad():
            feats = select_features(b, tower_hidden_states(b, pixels.to(device, dtype)))[:, :16].detach()
        collator = Collator(b.tokenizer, feats.shape[1], b.image_token_id, b.prompt_template)
        batch = {k: v.to(device) for k, v in collator(records).items()}
        lm = LlavaLM(b).bind_collator(collator).train()
        params = [p for p in lm.parameters() if p.requires_grad]
        engine = make_private(lm, torch.optim.SGD(params, lr=0.0), noise_multiplier=1.0, max_grad_norm=1e6,
                              expected_batch_size=4, sample_rate=0.01, noise_seed=0)
        answer_losses(engine.module, feats, batch).mean().backward()
        opt = engine.optimizer
        gs = [p.grad_sample.detach() for p in opt.params]
        grads[dtype] = torch.stack([torch.cat([g[i].double().reshape(-1) for g in gs]).norm() for i in range(4)])
        if dtype == torch.bfloat16:
            C = 0.3 * float(grads[dtype].min())
            opt.max_grad_norm = C
            worst = 0.0
            for i in range(4):
                for p, g in zip(opt.params, gs):
                    p.grad_sample, p.summed_grad = g[i:i + 1].clone(), None
                opt.clip_and_accumulate()
                out["clipped_sum_dtype"] = str({p.summed_grad.dtype for p in opt.params})
                worst = max(worst, float(torch.cat([p.summed_grad.double().reshape(-1) for p in opt.params]).norm()) / C)
            out["max_clipped_norm_over_C"] = worst
            summed = [p.summed_grad.detach().clone() for p in opt.params]
            opt.add_noise()
            noise = torch.cat([(p.grad.double() * 4 - s.double()).reshape(-1) for p, s in zip(opt.params, summed)])
            out["noise_std_over_sigma_C"] = float(noise.std()) / C
            out["released_grad_dtype"] = str({p.grad.dtype for p in opt.params})
            opt.zero_grad(set_to_none=True)
            out.update(ghost_fp32_check(engine.close(), feats, batch, C))
    rel = ((grads[torch.bfloat16] - grads[torch.float32]).abs() / grads[torch.float32]).max()
    out["per_example_norm_max_rel_err_bf16_vs_fp32"] = float(rel)
    out["ok"] = bool(rel < 0.05 and out["max_clipped_norm_over_C"] <= 1 + 1e-6
                     and out["clipped_sum_dtype"] == "{torch.float32}"
                     and abs(out["noise_std_over_sigma_C"] - 1.0) < 0.1
                     and out["ghost_fp32_max_clipped_norm_over_C"] <= 1 + 1e-6 and out["ghost_fp32_batch_step"] == "ok")
    return out


def ghost_fp32_check(lm, feats, batch: dict, max_grad_norm: float) -> dict:
    """The lean mode on this device: each example's fp32 clipped sum against C, and whether a whole-batch pair of
    backward passes agrees (a non-deterministic kernel would make the engine refuse the step)."""
    module, worst = GhostFp32Module(lm), 0.0
    for i in range(feats.shape[0]):
        rows = {k: v[i:i + 1] for k, v in batch.items()}
        module.clipped_backward(answer_losses(module, feats[i:i + 1], rows), max_grad_norm)
        worst = max(worst, float(torch.cat([p.clipped_sum.double().reshape(-1) for p in module.params]).norm())
                    / max_grad_norm)
        module.forget()
    try:
        module.clipped_backward(answer_losses(module, feats, batch), max_grad_norm)
        step = "ok"
    except RuntimeError as err:
        step = str(err)[:200]
    module.to_standard_module()
    return dict(ghost_fp32_max_clipped_norm_over_C=worst, ghost_fp32_batch_step=step)


def markdown(cells: list[dict], checks: dict | None, settings: dict) -> str:
    lines = [f"# GPU bench {settings['date']} — {settings['device_name']}", "",
             f"preset {settings['preset']}, {settings['dtype']}, {settings['steps']} steps per cell (one warm-up, "
             "one profiled, the median of the rest timed), "
             + ("each cell in a fresh subprocess." if settings["isolate"] else "cells in one process (smoke)."),
             "settings (" + settings["settings_of"] + "'s): " + ", ".join(
                 f"{k} {v}" for k, v in _lean_settings(settings).items()) + ".", "",
             "| batch | method | status | peak allocated MB | reserved MB | step s | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for c in cells:
        r = c.get("record") or {}
        lines.append(f"| {c['batch']} | {c['method']} | {c['status']} | {r.get('peak_memory_mb', '')} | "
                     f"{r.get('reserved_mb', '')} | {r.get('step_time_s', '')} | {r.get('tokens_per_s', '')} |")
    lines += ["", "| batch | DP-SGD / non-private tokens/s | Dual-Priv / DP-ZO memory | Dual-Priv / DP-SGD memory |"
              " Dual-Priv / DP-SGD steps/s | DP-SGD book-keeping / non-private tokens/s |", "|---|---|---|---|---|---|"]
    for batch in settings["batches"]:
        got = {c["method"]: c["record"] for c in cells if c["batch"] == batch and c["record"]}

        def ratio(a, b, key, invert=False):
            if a not in got or b not in got:
                return "n/a"
            x, y = got[a][key], got[b][key]
            return f"{(y / x if invert else x / y):.3f}"
        lines.append(f"| {batch} | {ratio('dp-sgd', 'non-private', 'tokens_per_s')} | "
                     f"{ratio('dual-priv', 'dp-zo', 'peak_memory_mb')} | {ratio('dual-priv', 'dp-sgd', 'peak_memory_mb')}"
                     f" | {ratio('dual-priv', 'dp-sgd', 'step_time_s', invert=True)} | "
                     f"{ratio('dp-sgd-bk', 'non-private', 'tokens_per_s')} |")
    if checks is not None:
        lines += ["", "bf16 checks: " + ", ".join(f"{k} = {v}" for k, v in checks.items())]
    return "\n".join(lines) + "\n"


def _checks(mode: dict, left: float) -> dict:
    if left <= mode["min_cell_s"]:
        return dict(status="skipped (time limit)")
    lm, vision = mode["check_layers"]
    spec = dict(preset=mode["preset"], device=mode["device"], lm_layers=lm, vision_layers=vision)
    if mode["isolate"]:   # first but bounded: a stuck check must not take the table's time
        status, checks, error = _child(["--check", json.dumps(spec)], min(left, mode["check_limit_s"]))
    else:
        status, checks, error = _in_process(bf16_checks, spec)
    return checks if status == "ok" else dict(status=status, error=error[-300:])


def _write(out: Path, result: dict) -> None:
    """The JSON and the table, replaced whole (a reader never sees half a file)."""
    date = result["settings"]["date"]
    for name, text in ((f"gpu-{date}.json", json.dumps(result, indent=2, default=str)),
                       (f"gpu-{date}.md", markdown(result["cells"], result["bf16_checks"], result["settings"]))):
        scratch = out / f".{name}.partial"
        scratch.write_text(text)
        scratch.replace(out / name)


def run(mode: dict, out: Path, methods=METHODS, extra_cells=EXTRA_CELLS) -> dict:
    started = time.monotonic()
    deadline = started + mode["time_limit"]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    device_name = torch.cuda.get_device_name() if mode["device"].startswith("cuda") else "cpu"
    settings = dict(mode, date=date, device_name=device_name, methods=list(methods))
    out.mkdir(parents=True, exist_ok=True)

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {text}", flush=True)

    say(f"bf16 checks on {mode['preset']} ({device_name}) ...")
    result = dict(settings=settings, cells=[], bf16_checks=_checks(mode, deadline - time.monotonic()), wall_s=None)
    say(f"bf16 checks: {result['bf16_checks']}")
    _write(out, result)
    spent = []
    # the table first (batch by batch), then the extra cells while time is left
    plan = [(batch, method, dict(method=method)) for batch in mode["batches"] for method in methods]
    plan += [(batch, label, overrides) for batch in mode["batches"] for label, overrides in extra_cells]
    for batch, method, overrides in plan:
        left = deadline - time.monotonic()
        need = max(mode["min_cell_s"], max(spent) if spent else mode["min_cell_s"])
        cell = dict(batch=batch, method=method, record=None, error="")
        if left < need:
            cell["status"] = "skipped (time limit)"
        else:
            say(f"batch {batch:>2} {method:<11} started ({left:.0f} s left)")
            kwargs = dict(dict(preset=mode["preset"], batch_size=batch, steps=mode["steps"],
                               device=mode["device"], dtype=mode["dtype"], lm_layers=mode["lm_layers"],
                               vision_layers=mode["vision_layers"], **_lean_settings(mode)), **overrides)
            t0 = time.monotonic()
            cell["status"], cell["record"], cell["error"] = (_child(["--cell", json.dumps(kwargs)], left)
                                                              if mode["isolate"]
                                                              else _in_process(_cell, dict(kwargs=kwargs)))
            spent.append(time.monotonic() - t0)
            cell["wall_s"] = round(spent[-1], 1)
        result["cells"].append(cell)
        r = cell["record"] or {}
        say(f"batch {batch:>2} {method:<11} {cell['status']:<8} peak {r.get('peak_memory_mb', '-')} MB  "
            f"step {r.get('step_time_s', '-')} s")
        result["wall_s"] = round(time.monotonic() - started, 1)
        _write(out, result)
    result["wall_s"] = round(time.monotonic() - started, 1)
    _write(out, result)
    print(f"wrote {out / f'gpu-{date}.json'} and .md ({result['wall_s']} s)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny preset on the CPU (the CI's check of this path)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds (default 450; smoke 55)")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    parser.add_argument("--check", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:  # child: one method at one batch size, one JSON line
        print(json.dumps(_cell(json.loads(args.cell))))
        return
    if args.check:
        print(json.dumps(bf16_checks(**json.loads(args.check))))
        return
    mode = dict(SMOKE if args.smoke else FULL)
    if args.time_limit is not None:
        mode["time_limit"] = args.time_limit
    if mode["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu-bench needs a CUDA device (use make gpu-bench-smoke on a CPU)")
    run(mode, Path(args.out))


if __name__ == "__main__":
    main()
