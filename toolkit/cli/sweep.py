"""``python -m toolkit sweep``: run a grid of fine-tunes, resumably, into one result file per cell and a CSV.

    python -m toolkit sweep --named privacy-utility --out artifacts/sweeps --json out.json --quick
    python -m toolkit sweep --config configs/sweep-quick.yaml --out artifacts/sweeps --json out.json
    python -m toolkit sweep --named ablation --out artifacts/sweeps --dry-run     # the plan, nothing runs

Each finished cell is written to ``OUT/<name>/<cell_id>.json`` the moment it finishes; re-running the same
command skips the cells whose file exists. After the run, every finished cell is exported to ``OUT/<name>.csv``
(a table for people; resuming never reads it). See :mod:`toolkit.sweeps`.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from toolkit.cli import subcommand


@subcommand("sweep", help="run a sweep (grid of fine-tunes) into a CSV; re-running skips finished cells")
def run(args) -> dict:
    # imported here, as in every subcommand: building the parser imports all of them, and --help should not
    # pay for torch
    from toolkit.sweeps import (
        NAMED_SWEEPS, export_csv, load_sweep_config, named_sweep, plan_sweep, results_folder, run_sweep,
    )

    if args.list:
        out = {name: named_sweep(name, quick=False).description for name in NAMED_SWEEPS}
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return dict(named_sweeps=out)
    if bool(args.config) == bool(args.named):
        raise ValueError("give exactly one of --config FILE or --named NAME (see --list)")
    if args.config:
        if args.preset is not None:   # a file's cells take their preset from its base (was ignored silently)
            raise ValueError("--preset applies to --named only: a sweep file sets the preset in its base config")
        sweep = load_sweep_config(args.config)
        if args.quick:
            sweep = sweep.quick_version()
    else:
        sweep = named_sweep(args.named, quick=args.quick, preset=args.preset or "tiny")
    plan = plan_sweep(sweep)
    result = dict(plan.summary(), description=sweep.description, out=str(args.out) if args.out else None,
                  results=str(results_folder(sweep, args.out)) if args.out else None,
                  csv=str(args.out / f"{sweep.name}.csv") if args.out else None, quick=bool(args.quick))
    if args.dry_run:
        result["cells_planned"] = [dict(cell_id=c.cell_id, label=c.label) for c in plan.cells]
        print(json.dumps({k: result[k] for k in ("name", "cells", "skipped")}, indent=2))
        for cell in plan.cells:
            print(f"  {cell.cell_id}  {cell.label}")
        for skip in plan.skipped:
            print(f"  skipped  {skip.label}: [{skip.rule}] {skip.reason}")
        return result
    if not args.out:
        raise ValueError("give --out DIR (where the results and the CSV go)")
    events = {"done": 0, "cached": 0, "failed": 0}
    failures = []

    def count(event):
        events[event["kind"]] += 1
        if event["kind"] == "failed":
            failures.append(dict(label=event["label"], error=event["error"]))

    started = time.perf_counter()
    df = run_sweep(sweep, args.out, progress=not args.no_progress, callback=count,
                   on_error="continue" if args.keep_going else "raise", parquet=args.parquet)
    result.update(wall_time_s=time.perf_counter() - started, ran=events["done"], cached=events["cached"],
                  failed=events["failed"], failures=failures, rows=df.to_dict(orient="records"))
    export_csv(df, result["csv"])
    for failure in failures:
        print(f"FAILED {failure['label']}: {failure['error']}", file=sys.stderr)
    if failures and not events["done"] and not events["cached"]:
        raise ValueError(f"every cell of the sweep failed ({len(failures)}); the first: {failures[0]['label']}: "
                         f"{failures[0]['error']}")
    shown = {k: result[k] for k in ("name", "results", "csv", "cells", "skipped", "ran", "cached", "failed",
                                    "wall_time_s")}
    print(json.dumps(shown, indent=2, default=str, ensure_ascii=False))
    return result


@run.configure
def configure(parser) -> None:
    parser.add_argument("--config", metavar="FILE", help="a sweep file (.yaml/.yml/.json), see configs/")
    parser.add_argument("--named", metavar="NAME",
                        help="a built-in sweep: privacy-utility, ablation, budget, lora-rank, update-masks, "
                             "dual-priv-budgets, dp-lora-ranks (see --list)")
    parser.add_argument("--preset", help="model preset for --named (default: tiny; llava576); a --config file "
                                          "sets its own in its base")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="output folder: NAME/CELL_ID.json (one per finished cell), NAME.plan.json, NAME.csv")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings (no warm start, 64 training and 32 eval records, 2 steps): checks the "
                             "plumbing in minutes")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (cells and skipped) and stop")
    parser.add_argument("--list", action="store_true", help="list the built-in sweeps")
    parser.add_argument("--keep-going", action="store_true",
                        help="record a failing cell and go on (it is retried on the next run) instead of stopping")
    parser.add_argument("--parquet", action="store_true", help="also write NAME.parquet (needs pyarrow)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
