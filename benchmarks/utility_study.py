"""Issue 14's utility study: tune on validation, choose, report on test with 5 seeds at ε = 1, 3, 8.

    python benchmarks/utility_study.py --out runs/utility-study [--tasks parity,left-digit,sum] [--shard 0/2]
    python benchmarks/utility_study.py --out benchmarks/results/utility-study-scene --tasks scene --tune-task scene

Stages (``--stage``):

- ``tune`` runs the ``update-masks`` named sweep (parity, ε = 3, validation split);
- ``test`` chooses the winners from the tuning results (:func:`toolkit.sweeps.study.choose_arms`, validation
  only) and runs them on each task's test split, with non-private on the same recipe (the task's ceiling);
- ``ceiling`` runs only that non-private ceiling (and, for a task with one in ``BEST_NON_PRIVATE``, its best known
  non-private recipe: the scene task's headroom, which the study's LoRA recipe did not reach in its probes);
- ``budgets`` runs the ``dual-priv-budgets`` named sweep (update keep fraction 0.05-1.0, visual tokens 8-64) and
  ``ranks`` the ``dp-lora-ranks`` one (both methods at LoRA rank 2-32: the noised dimension), on the validation
  split: ablations reported beside the choice, not candidates for it;
- ``report`` prints the comparison and writes ``<out>/utility-study.json``; ``all`` does them in turn.

Every cell is one file under ``--out``: re-running resumes, and ``--shard i/n`` workers (one thread each) can
share the folder. The scene study (issue 23: tens of CPU hours, over many sessions) keeps its cells in the tracked
``benchmarks/results/utility-study-scene``, committed as they finish: an ignored folder such as ``runs/`` does not
outlive the machine it was written on. The harder tasks (left-digit: 10-way, sum: 19-way, two digits per image) reuse the
configurations chosen on parity: their validation splits hold 50 records (a standard error of about 6.5 points
at 30 % accuracy), too few to tune on.

``--chosen-from REPORT`` (e.g. the published ``toolkit/measured/utility_study.json``) takes the choices, the
tuning table and the ablations from an earlier report instead of from ``--out``: a new task is tested on the
configurations already chosen, and tasks, ceilings or ablations without results in ``--out`` keep the report's
tables (the output says which were kept).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from toolkit.sweeps import parse_shard, run_sweep, summarize, sweep_results
from toolkit.sweeps.named import named_sweep
from toolkit.sweeps.study import (
    BEST_NON_PRIVATE, FAMILIES, MEASURED_STUDY, arm_table, ceiling, ceiling_sweep, choose_arms, chosen_from_report,
    compare, load_measured_study, start_accuracy, summary_markdown, test_sweep,
)
from toolkit.vocabulary import format_epsilon

STAGES = ("tune", "test", "ceiling", "budgets", "ranks", "report", "all")
# two harder tasks beside parity: left-digit (10-way) and sum (19-way), both on two-digit images; and the generated
# scenes (issue 23: colour / count / relation, 11-way), which start from their own public curriculum
TASKS = ("parity", "left-digit", "sum", "scene")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/utility-study", help="results folder (one JSON file per cell)")
    parser.add_argument("--tasks", default="parity,left-digit,sum", help=f"comma-separated, from {', '.join(TASKS)}")
    parser.add_argument("--stage", default="all", choices=STAGES)
    parser.add_argument("--tune-task", default="parity", choices=TASKS,
                        help="the task whose VALIDATION split the tune, budgets and ranks stages run on (default "
                             "parity; 'scene' tunes the scene study on its own validation split: use its own --out)")
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th cell starting at i (parallel workers)")
    parser.add_argument("--publish", action="store_true",
                        help="also copy the report into the package (toolkit/measured/), where the dashboard reads it")
    parser.add_argument("--chosen-from", type=Path, default=None, metavar="REPORT",
                        help="take the choices (and the tables this run has no results for) from an earlier report, "
                             "e.g. toolkit/measured/utility_study.json, instead of re-running the tuning stage")
    args = parser.parse_args(argv)
    try:
        if args.chosen_from is not None:
            if args.stage in ("tune", "budgets", "all"):
                raise ValueError(f"--chosen-from takes the choices from a report: it goes with --stage test, "
                                 f"ceiling, ranks or report, not {args.stage}")
            args.earlier = load_measured_study(args.chosen_from)
            if args.earlier is None:
                raise ValueError(f"--chosen-from: no report at {args.chosen_from}")
            args.chosen = chosen_from_report(args.earlier)
        args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = [t for t in args.tasks if t not in TASKS]
        if unknown or not args.tasks:
            raise ValueError(f"--tasks: unknown {unknown or args.tasks!r}; choose from {', '.join(TASKS)}")
        args.shard = parse_shard(args.shard)
    except ValueError as err:
        parser.error(str(err))
    return args


def _report_cell(event: dict) -> None:
    if event["kind"] == "done":
        row = event["row"]
        print(f"{event['label']}: accuracy {row['accuracy']:.3f}, ε spent {format_epsilon(row['epsilon_spent'], 2)}, "
              f"{row['step_time_s']:.2f} s/step, {row['wall_time_s']:.0f} s", flush=True)
    elif event["kind"] == "failed":
        print(f"FAILED {event['label']}: {event['error']}", flush=True)


def _report_steps(row: dict) -> None:
    """A cell takes 10-60 min on one core: say where it is at every tenth of its steps (public counts only)."""
    step, steps = row["step"], row["steps"]
    if step % max(1, steps // 10) == 0 or step == steps:
        print(f"  step {step} of {steps}", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)

    def run(sweep) -> None:     # every stage: resumable, a failed cell reported and retried by the next run
        run_sweep(sweep, out, progress=False, callback=_report_cell, step_callback=_report_steps,
                  on_error="continue", shard=args.shard)

    tuning = named_sweep("update-masks", task=args.tune_task)   # $DUALPRIV_QUICK shrinks every stage
    if args.stage in ("tune", "all"):
        run(tuning)
    budgets, ranks = named_sweep("dual-priv-budgets", task=args.tune_task), named_sweep("dp-lora-ranks", task=args.tune_task)
    if args.stage in ("budgets", "all"):
        run(budgets)
    if args.stage in ("ranks", "all"):
        run(ranks)
    if args.stage in ("tune", "budgets", "ranks"):
        return
    if args.chosen_from is not None:
        chosen = args.chosen
        earlier = args.earlier
        report = dict(chosen=earlier["chosen"], tuning=earlier["tuning"], tasks=dict(earlier.get("tasks", {})),
                      ceilings=dict(earlier.get("ceilings", {})),
                      best_ceilings=dict(earlier.get("best_ceilings", {})))
        for ablation in ("budgets", "ranks"):
            if ablation in earlier:
                report[ablation] = earlier[ablation]
        print(f"choices, tuning table and ablations from {args.chosen_from}")
    else:
        tuned = sweep_results(tuning, out)
        print(arm_table(tuned).round(3).to_string(index=False))
        chosen = choose_arms(tuned)
        report = dict(chosen={f: a["label"] for f, a in chosen.items()},
                      tuning=arm_table(tuned).round(4).to_dict(orient="records"), tasks={})
    for family, arm in chosen.items():
        print(f"{family}: {arm['label']} (validation {arm['tags']['validation_accuracy']:.3f})")
    for task in args.tasks:
        sweep = test_sweep(chosen, task)
        if args.stage in ("test", "all"):
            run(sweep)
        results = sweep_results(sweep, out)
        if results.empty and task in report["tasks"]:
            print(f"{task}: no results in {out}; the table from {args.chosen_from} is kept")
            continue
        report["tasks"][task] = compare(results, chosen).round(2).to_dict(orient="records")
    # the ceiling of the arms compared (the study's recipe) and, where it differs, the task's headroom (its best one)
    ceilings = [("ceilings", "study", task) for task in args.tasks]
    ceilings += [("best_ceilings", "best", task) for task in args.tasks if task in BEST_NON_PRIVATE]
    for key, recipe, task in ceilings:
        sweep = ceiling_sweep(task, recipe=recipe)
        if args.stage in ("test", "ceiling", "all"):
            run(sweep)
        results = sweep_results(sweep, out)
        if results.empty and task in report.get(key, {}):
            continue
        start = start_accuracy(task) if recipe == "study" else None
        report.setdefault(key, {})[task] = ceiling(results, task, start=start)
    for key, ablation in (("budgets", budgets), ("ranks", ranks)):
        rows = sweep_results(ablation, out)
        if len(rows):
            report[key] = summarize(rows, ["arm"]).round(4).to_dict(orient="records")
    print(summary_markdown(report))                 # the choices, each task's test table and the ablations
    if args.shard == (0, 1) or args.stage == "report":
        text = json.dumps(dict(report, families=FAMILIES), indent=2, default=str)
        (out / "utility-study.json").write_text(text)
        if args.publish:
            MEASURED_STUDY.parent.mkdir(parents=True, exist_ok=True)
            MEASURED_STUDY.write_text(text)
            print(f"published to {MEASURED_STUDY}")


if __name__ == "__main__":
    main()
