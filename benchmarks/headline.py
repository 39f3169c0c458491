"""The headline memory table: 576 -> 64 visual tokens, several batch sizes, every method in one run.

    python benchmarks/headline.py [--preset llava576] [--batch-sizes 4,8,16] [--keep 64] [--json out.json]

Each method runs in a fresh subprocess (toolkit.bench, isolate=True) on the same model and batch, the vision
tower inside the step. Targets (issue 4), checked on ratios measured side by side in this run:
  * Dual-Priv peak memory <= 0.25 x DP-SGD(576) and <= 0.7 x DP-ZO(576)
  * DP overhead at equal token count: DP-SGD <= 1.1 x memory and <= 1.3 x time of non-private
A missed target is printed as MISSED, never hidden.
"""
from __future__ import annotations

import argparse
import json

import pandas as pd

from toolkit.bench import add_ratios, format_table, run_bench


def headline(preset: str, batch_size: int, keep: int, steps: int, tower_in_step: bool = True
             ) -> tuple[pd.DataFrame, list[dict]]:
    full = run_bench(("non-private", "dp-sgd", "dual-priv", "dp-zo"), preset=preset, batch_size=batch_size,
                     steps=steps, keep_tokens=keep, token_prune_ratio=None, tower_in_step=tower_in_step)
    # DP overhead at an equal (pruned) token count: non-private and DP-SGD both on the same kept tokens.
    pruned = run_bench(("non-private", "dp-sgd"), preset=preset, batch_size=batch_size, steps=steps,
                       keep_tokens=keep, token_prune_ratio=None, prune_tokens_for_all=True,
                       tower_in_step=tower_in_step)
    row = full.set_index("method")
    prow = pruned.set_index("method")
    checks = [
        ("dual-priv memory / dp-sgd(576)", row.loc["dual-priv", "peak_memory_mb"] / row.loc["dp-sgd", "peak_memory_mb"], 0.25),
        ("dual-priv memory / dp-zo(576)", row.loc["dual-priv", "peak_memory_mb"] / row.loc["dp-zo", "peak_memory_mb"], 0.7),
        ("dp-sgd / non-private memory (576)", row.loc["dp-sgd", "peak_memory_mb"] / row.loc["non-private", "peak_memory_mb"], 1.1),
        ("dp-sgd / non-private time (576)", row.loc["dp-sgd", "step_time_s"] / row.loc["non-private", "step_time_s"], 1.3),
        (f"dp-sgd / non-private memory ({keep})", prow.loc["dp-sgd", "peak_memory_mb"] / prow.loc["non-private", "peak_memory_mb"], 1.1),
        (f"dp-sgd / non-private time ({keep})", prow.loc["dp-sgd", "step_time_s"] / prow.loc["non-private", "step_time_s"], 1.3),
    ]
    results = [dict(batch_size=batch_size, tower="in step" if tower_in_step else "cached", check=name, ratio=round(float(value), 3), target=target,
                    status="met" if value <= target else "MISSED") for name, value, target in checks]
    pruned = pruned.assign(method=pruned.method + f"@{keep}")
    return add_ratios(pd.concat([full, pruned], ignore_index=True)), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llava576")
    parser.add_argument("--batch-sizes", default="4,8,16")
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cached-features", action="store_true",
                        help="vision tower outside the step (features computed once per example, as in training)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    tables, checks = [], []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        table, results = headline(args.preset, batch_size, args.keep, args.steps, not args.cached_features)
        where = "outside the step (cached features)" if args.cached_features else "inside the step"
        print(f"\n== {args.preset}, batch {batch_size}, {table.memory_method.iloc[0]} on {table.device.iloc[0]}, "
              f"tower {where} ==")
        print(format_table(table))
        tables.append(table.assign(batch=batch_size))
        checks += results
    print("\n== targets ==")
    print(pd.DataFrame(checks).to_string(index=False))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(table=pd.concat(tables).to_dict(orient="records"), checks=checks), f, indent=2)


if __name__ == "__main__":
    main()
