"""Accuracy per method across ε and seeds on the embedded benchmark (issue 4's utility table).

    python benchmarks/utility.py --out runs/utility.csv [--epsilons 1,3,8,inf] [--seeds 0,1,2] [--eval-split test]

Public warm start (digit task, source images 0-699) -> private fine-tune (parity task, images 800-1499, one
record per image, N = 700) -> held-out accuracy (images 1500-1796). Recipe (MEASURED.md, tuned on the
validation split, never on test): 20 epochs at expected batch 128 (110 Poisson steps), C = 1, δ = 1e-5, Adam.
Each finished cell is appended to the CSV at once; re-running skips finished cells.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
from pathlib import Path

METHOD_ORDER = ("non-private", "dp-sgd", "dual-priv", "dp-zo")


def cells(epsilons, seeds, methods):
    for seed in seeds:
        for epsilon in epsilons:
            for method in methods:
                if method == "non-private" and epsilon != epsilons[0]:
                    continue  # ε does not apply: one non-private run per seed
                yield method, (math.inf if method == "non-private" else epsilon), seed


def main() -> None:
    import pandas as pd
    import torch

    from toolkit.train import TrainConfig, train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/utility.csv")
    parser.add_argument("--epsilons", default="3,inf,1,8")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHOD_ORDER))
    parser.add_argument("--eval-split", default="test")
    parser.add_argument("--epochs", type=float, default=20)
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th cell starting at i (parallel workers)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.is_file():
        done = {(r["method"], float(r["epsilon"]), int(r["seed"])) for r in csv.DictReader(out.open())}
    shard, n_shards = (int(x) for x in args.shard.split("/"))
    epsilons = [float(e) for e in args.epsilons.split(",")]
    todo = list(cells(epsilons, [int(s) for s in args.seeds.split(",")], args.methods.split(",")))[shard::n_shards]
    for method, epsilon, seed in todo:
        if (method, epsilon, seed) in done:
            continue
        result = train(TrainConfig(method=method, epsilon=epsilon, seed=seed, epochs=args.epochs,
                                   expected_batch_size=128, eval_split=args.eval_split, progress=False))
        row = {k: result.summary()[k] for k in ("method", "epsilon", "seed", "accuracy", "epsilon_spent",
                                                  "noise_multiplier", "steps", "visual_tokens", "wall_time_s")}
        new = not out.is_file()
        with out.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        print(row, flush=True)
    table = pd.read_csv(out)
    summary = table.groupby(["method", "epsilon"]).accuracy.agg(["mean", "std", "count"]).round(3)
    print(summary.to_string())


if __name__ == "__main__":
    main()
