"""Cost of one training step per method, measured side by side in one run, with the analytic FLOPs beside it.

    python benchmarks/step_cost.py [--repeats 5] [--batch 128] [--cold]

The utility study's equal-compute view (``toolkit.sweeps.study``) compares methods at equal analytic FLOPs; this
prints how the measured step times of the same configurations compare (tiny preset, warm start, parity, the
study's defaults: DP-SGD at 64 visual tokens with hooks, with ghost clipping, with ghost-fp32's two backward
passes and with its one-pass book-keeping, Dual-Priv at 16). Each step is timed after a warm-up step; methods
are interleaved so a change of machine load hits all of them alike.
"""
from __future__ import annotations

import argparse
import statistics
import time

import pandas as pd
import torch

from toolkit.config import TrainConfig
from toolkit.flops import flops_for_rows
from toolkit.train import one_step, setup

ARMS = {
    "DP-SGD (hooks)": dict(method="dp-sgd"),
    "DP-SGD (ghost clipping)": dict(method="dp-sgd", grad_sample_mode="ghost"),
    "DP-SGD (ghost-fp32, two backward passes)": dict(method="dp-sgd", grad_sample_mode="ghost-fp32"),
    "DP-SGD (ghost-fp32-bk, one backward)": dict(method="dp-sgd", grad_sample_mode="ghost-fp32-bk"),
    "Dual-Priv (16 of 64 tokens)": dict(method="dual-priv"),
    "non-private": dict(method="non-private", epsilon=float("inf")),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per method (after one warm-up)")
    parser.add_argument("--batch", type=int, default=128, help="expected batch size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cold", action="store_true",
                        help="no public warm start (a step's time does not depend on the weights; skips its training)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = {}
    for name, fields in ARMS.items():
        cold = dict(warm_start_steps=0) if args.cold else {}
        config = TrainConfig(**dict(dict(epsilon=3.0, steps=args.repeats + 1, expected_batch_size=args.batch,
                                         progress=False, **cold), **fields)).resolved()
        run = setup(config)
        batches = iter(run.sampler.batches(args.repeats + 1))
        one_step(run, next(batches))                                   # warm-up: lazy allocations
        runs[name] = (run, batches, [])
    for _ in range(args.repeats):                                      # interleaved
        for name, (run, batches, times) in runs.items():
            started = time.perf_counter()
            one_step(run, next(batches))
            times.append(time.perf_counter() - started)
    rows = [dict(arm=name, method=run.config.method, visual_tokens=run.pruner.n_out,
                 expected_batch_size=args.batch, step_s=statistics.median(times))
            for name, (run, _, times) in runs.items()]
    table = flops_for_rows(pd.DataFrame(rows))[["arm", "visual_tokens", "step_s", "gflops_step"]]
    reference = table.set_index("arm").loc["Dual-Priv (16 of 64 tokens)"]
    table["time_x_dual_priv"] = table["step_s"] / reference["step_s"]
    table["flops_x_dual_priv"] = table["gflops_step"] / reference["gflops_step"]
    table["time_x_non_private"] = table["step_s"] / table.set_index("arm").loc["non-private", "step_s"]
    print(table.round(3).to_string(index=False))


if __name__ == "__main__":
    main()
