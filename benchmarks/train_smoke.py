"""The training path on a device, every method and privacy mode for a few steps: what a GPU run checks first.

    python benchmarks/train_smoke.py --device cuda --out "$OUT"     # benchmarks/gpu_device.sh runs it after the table
    python benchmarks/train_smoke.py --device cpu                   # the same runs here (tests/test_gpu_bench.py)

The GPU table (``gpu_bench.py``) measures one step function; users train. Each run here is a real
:func:`toolkit.train.train` on the tiny preset (untrained, 4 steps, 32 private parity records, scored on 16):
the four methods, each clipping mode, the 7B preset's lean settings in bf16, secure mode, and a checkpoint
resumed on the device. A run that raises is recorded (status ``error`` and the message) and the next one goes
on; a run is started only if the time left covers the slowest so far. Writes ``<out>/train-smoke-<date>.json``;
exits 1 if any run failed, so a caller sees it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

from toolkit.bench import bench_defaults
from toolkit.config import TrainConfig
from toolkit.train import train

BASE = dict(preset="tiny", task="parity", steps=4, train_limit=32, eval_limit=16, warm_start_steps=0,
            expected_batch_size=16, epsilon=8.0, progress=False)
# the 7B preset's lean defaults (its token budget aside), on the tiny model in bf16: one place says what they are
LEAN = dict({k: v for k, v in bench_defaults("llava-7b-shape").items() if k != "keep_tokens"}, dtype="bfloat16")
RUNS = {
    "non-private": dict(method="non-private"),
    "dp-sgd, hooks": dict(method="dp-sgd"),
    "dp-sgd, ghost": dict(method="dp-sgd", grad_sample_mode="ghost"),
    "dual-priv, hooks": dict(method="dual-priv"),
    "dual-priv, past-noisy mask": dict(method="dual-priv", update_mask="past-noisy", grad_prune_ratio=0.5),
    "dual-priv, 7B lean settings, bf16": dict(method="dual-priv", **LEAN),
    "dp-sgd, 7B lean settings, bf16": dict(method="dp-sgd", **LEAN),
    "dp-zo": dict(method="dp-zo"),
    "dual-priv, secure mode": dict(method="dual-priv", secure_mode=True),
    # stopped after 2 of 4 steps with a checkpoint, then resumed from it (a checkpoint loads onto the CPU first)
    "dual-priv, checkpoint resumed": dict(method="dual-priv", resume=True),
    "dual-priv, past-noisy mask, checkpoint resumed": dict(method="dual-priv", update_mask="past-noisy",
                                                           grad_prune_ratio=0.5, resume=True),
}


def _one(fields: dict, device: str, scratch: Path) -> dict:
    fields = dict(fields)
    if fields.pop("resume", False):
        path = str(scratch / f"checkpoint-{len(list(scratch.iterdir()))}")
        train(TrainConfig(**BASE, device=device, checkpoint_path=path, **fields), callback=lambda row: row["step"] < 2)
        result = train(TrainConfig(**BASE, device=device, resume_from=path, **fields))
    else:
        result = train(TrainConfig(**BASE, device=device, **fields))
    return dict(accuracy=result.accuracy, epsilon_spent=result.epsilon_spent, steps=result.steps,
                device=result.extra.get("device", device))


def run(device: str, out: Path, time_limit: float = 90.0, runs: dict | None = None) -> dict:
    runs = RUNS if runs is None else runs
    started, spent, rows = time.monotonic(), [0.0], []
    with tempfile.TemporaryDirectory() as scratch:
        for name, fields in runs.items():
            row = dict(run=name)
            if started + time_limit - time.monotonic() < max(spent):
                row["status"] = "skipped (time limit)"
            else:
                t0 = time.monotonic()
                try:
                    row.update(status="ok", **_one(fields, device, Path(scratch)))
                except Exception as err:   # recorded, the next run goes on
                    row.update(status="error", error=f"{type(err).__name__}: {err}"[:600],
                               where=traceback.format_exc().strip().splitlines()[-3][:300])
                spent.append(time.monotonic() - t0)
                row["wall_s"] = round(spent[-1], 1)
            rows.append(row)
            print(f"[{time.monotonic() - started:5.1f} s] {name:<36} {row['status']}"
                  + (f": {row['error']}" if row["status"] == "error" else ""), flush=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    result = dict(device=device, runs=rows, wall_s=round(time.monotonic() - started, 1), date=date)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train-smoke-{date}.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--time-limit", type=float, default=90.0, help="seconds (default 90)")
    args = parser.parse_args()
    result = run(args.device, args.out, args.time_limit)
    failed = [r["run"] for r in result["runs"] if r["status"] != "ok"]
    print(f"{len(result['runs']) - len(failed)} of {len(result['runs'])} runs ok on {args.device} "
          f"({result['wall_s']} s)" + (f"; not ok: {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
