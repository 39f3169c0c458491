"""Accuracy per method across ε and seeds on the embedded benchmark (issue 4's utility table).

    python benchmarks/utility.py --out runs/utility.csv [--epsilons 1,3,8,inf] [--seeds 0,1,2] [--eval-split test]

Public warm start (digit task, source images 0-699) -> private fine-tune (parity task, images 800-1499, one
record per image, N = 700) -> held-out accuracy (images 1500-1796). Recipe (MEASURED.md, tuned on the
validation split, never on test): 20 epochs at expected batch 128 (110 Poisson steps), C = 1, δ = 1e-5, Adam.

A thin call into :mod:`toolkit.sweeps`: the privacy-utility sweep's recipe (``FULL_BASE``) over the given
methods x ε x seeds, run by ``run_sweep``. Each finished cell is written at once to ``<folder of --out>/<stem of
--out>/<cell_id>.json`` (``runs/utility/`` for the default); re-running skips finished cells (the resume key is
the ``cell_id``), and ``--shard i/n`` workers can share one folder. At the end every finished cell is exported
to ``--out`` as a CSV and the mean accuracy per method and ε is printed.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from toolkit.sweeps import FULL_BASE, Sweep, export_csv, parse_shard, run_sweep, summarize
from toolkit.validation import check_choice
from toolkit.vocabulary import METHODS, format_epsilon, parse_epsilon


def utility_sweep(name: str, epsilons, seeds, methods, epochs: float = 20.0, eval_split: str = "test") -> Sweep:
    """The utility table's sweep: every method at every ε (non-private once per seed, at ε = ∞), every seed."""
    return Sweep(name, base=dict(FULL_BASE, epochs=epochs, eval_split=eval_split),
                 grid=dict(method=list(methods), epsilon=list(epsilons)), seeds=list(seeds),
                 description="benchmarks/utility.py: accuracy per method across ε and seeds (one record = one "
                             "source image)")


def _list(text: str, parse, what: str) -> list:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"--{what}: give at least one value, got {text!r}")
    return [parse(item) for item in items]


def _seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--seeds: {text!r} is not an integer") from None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/utility.csv",
                        help="the CSV to export; the per-cell results go to the folder of the same name")
    parser.add_argument("--epsilons", default="3,inf,1,8")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--eval-split", default="test")
    parser.add_argument("--epochs", type=float, default=20)
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th cell starting at i (parallel workers)")
    args = parser.parse_args(argv)
    try:
        if Path(args.out).suffix.lower() != ".csv":
            raise ValueError(f"--out must name a .csv file (its stem names the results folder), got {args.out!r}")
        args.epsilons = _list(args.epsilons, parse_epsilon, "epsilons")
        args.seeds = _list(args.seeds, _seed, "seeds")
        args.methods = _list(args.methods, lambda m: check_choice("method", m, METHODS), "methods")
        args.shard = parse_shard(args.shard)
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    sweep = utility_sweep(out.stem, args.epsilons, args.seeds, args.methods, args.epochs, args.eval_split)

    def report(event: dict) -> None:
        if event["kind"] == "done":
            row = event["row"]
            spent = format_epsilon(row["epsilon_spent"], 2)
            print(f"{event['label']}: accuracy {row['accuracy']:.3f}, ε spent {spent}, {row['wall_time_s']:.0f} s",
                  flush=True)

    df = run_sweep(sweep, out.parent, progress=False, callback=report, shard=args.shard)
    export_csv(df, out)
    print(f"{len(df)} finished cells -> {out}")
    if len(df):
        summary = summarize(df, ["method", "epsilon"]).round(3)
        summary["epsilon"] = [format_epsilon(e) for e in summary["epsilon"]]
        print(summary.to_string(index=False))


if __name__ == "__main__":
    main()
