"""The utility study (issue 14): tune on the validation split, report the winners on test, two views.

1. **Tune**: the ``update-masks`` named sweep (ε = 3, parity, validation split, seeds 0-1).
2. **Choose** (:func:`choose_arms`), by mean validation accuracy, never by test:

   - ``DP-SGD``: the best DP-SGD arm (ties: the first by name), and ``DP-SGD (validation tie)``: the next DP-SGD
     arm with the same validation mean, if any, tested as well;
   - ``Dual-Priv (paper)``: the paper's exact mechanism as published (post-noise mask, prune 0.2), always reported;
   - ``Dual-Priv, equal steps``: the best Dual-Priv arm with DP-SGD's winner's steps and expected batch;
   - ``Dual-Priv, equal wall-clock``: the best Dual-Priv arm whose training compute (analytic FLOPs of a step x
     steps) is at most the DP-SGD winner's; measured training times are reported beside it.

3. **Test** (:func:`test_sweep`): the chosen arms at ε ∈ {1, 3, 8}, 5 seeds, on the test split, per task.
4. **Report** (:func:`compare`): mean ± standard error per family, and Dual-Priv minus DP-SGD with the standard
   error of the difference (unpaired: the seeds of two methods draw different noise).

Every stage is a sweep of :func:`~toolkit.sweeps.run.run_sweep`: one file per finished cell, so the study resumes
where it stopped. ``$DUALPRIV_QUICK`` shrinks every stage to a plumbing check. Example::

    >>> from toolkit.sweeps.named import named_sweep
    >>> from toolkit.sweeps.study import test_sweep
    >>> arms = {"DP-SGD": dict(label="DP-SGD", method="dp-sgd")}
    >>> test_sweep(arms, task="parity", epsilons=[3.0], seeds=[0], quick=False).grid["epsilon"]
    [3.0]
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from toolkit.data import make_vqa
from toolkit.flops import flops_for_rows
from toolkit.sweeps.named import FULL_BASE, is_quick, update_mask_arms
from toolkit.sweeps.plan import Sweep
from toolkit.sweeps.summary import summarize
from toolkit.warmstart import public_curriculum, starting_model, task_accuracy

PAPER_ARM = "Dual-Priv (paper: noisy mask, prune 0.2)"
FAMILIES = ("DP-SGD", "DP-SGD (validation tie)", "Dual-Priv (paper)", "Dual-Priv, equal steps",
            "Dual-Priv, equal wall-clock")
TIE = "DP-SGD (validation tie)"
TEST_EPSILONS = (1.0, 3.0, 8.0)
TEST_SEEDS = (0, 1, 2, 3, 4)
TARGET_POINTS = 2.0   # issue 14: best Dual-Priv >= best DP-SGD + 2 points at ε = 3 on test, at equal wall-clock
# The measured study as shipped with the package (written by benchmarks/utility_study.py --publish)
MEASURED_STUDY = Path(__file__).resolve().parents[1] / "measured" / "utility_study.json"


def arm_table(tuning: pd.DataFrame) -> pd.DataFrame:
    """One row per tuning arm: mean validation accuracy (and its standard error over seeds), steps, expected
    batch, training time = median step time x steps, and training GFLOPs = the analytic step FLOPs
    (:func:`toolkit.flops.flops_for_rows`, at the expected batch) x steps: what the equal-compute view compares."""
    if tuning.empty:
        raise ValueError("the tuning sweep has no finished cells yet: run it first")
    df = flops_for_rows(tuning)
    df = df.assign(train_time_s=df["step_time_s"] * df["steps_done"],
                   train_gflops=df["gflops_step"] * df["steps_done"])
    stats = summarize(df, "arm")
    extra = df.groupby("arm").agg(method=("method", "first"), steps=("steps_done", "first"),
                                  expected_batch_size=("expected_batch_size", "first"),
                                  train_time_s=("train_time_s", "mean"),
                                  train_gflops=("train_gflops", "mean")).reset_index()
    return stats.merge(extra, on="arm").sort_values("mean", ascending=False, kind="stable").reset_index(drop=True)


def choose_arms(tuning: pd.DataFrame, arms: list[dict] | None = None) -> dict[str, dict]:
    """Family -> the winning arm (its bundled-axis dict, with ``tags`` holding its validation score and training
    time). A view no finished arm qualifies for is left out. Raises ``ValueError`` without finished DP-SGD and
    Dual-Priv arms."""
    arms = {a["label"]: a for a in (arms or update_mask_arms())}
    table = arm_table(tuning)
    table = table[table["arm"].isin(arms)]
    dp_sgd = table[table["method"] == "dp-sgd"]
    dual = table[table["method"] == "dual-priv"]
    if dp_sgd.empty or dual.empty:
        raise ValueError("choosing needs finished DP-SGD and Dual-Priv arms in the tuning results")
    best_dp = dp_sgd.iloc[0]
    candidates = {
        "DP-SGD": dp_sgd,
        # a DP-SGD arm as good on validation as the winner is tested too: DP-SGD's side of the comparison must
        # not hang on a tie-break by name
        TIE: dp_sgd[((dp_sgd["mean"] - best_dp["mean"]).abs() < 1e-9) & (dp_sgd["arm"] != best_dp["arm"])],
        "Dual-Priv (paper)": dual[dual["arm"] == PAPER_ARM],
        "Dual-Priv, equal steps": dual[(dual["steps"] == best_dp["steps"])
                                       & (dual["expected_batch_size"] == best_dp["expected_batch_size"])],
        # by analytic FLOPs, not by the measured times: those swing with the load of a shared machine (the
        # DP-SGD/Dual-Priv step-time ratio measured 1.9-2.2x quiet, 3.5-5.5x loaded; FLOPs say 2.8x;
        # benchmarks/step_cost.py prints them side by side)
        "Dual-Priv, equal wall-clock": dual[dual["train_gflops"] <= best_dp["train_gflops"]],
    }
    chosen = {}
    for family, rows in candidates.items():
        if rows.empty:
            continue   # e.g. no Dual-Priv arm as fast as DP-SGD: that view has nothing to report (shown as "–")
        row = rows.iloc[0]
        chosen[family] = dict(arms[row["arm"]], tags=dict(validation_accuracy=float(row["mean"]),
                                                           train_time_s=float(row["train_time_s"])))
    return chosen


def chosen_from_report(report: dict, arms: list[dict] | None = None) -> dict[str, dict]:
    """:func:`choose_arms`' result rebuilt from a published report (its ``chosen`` labels and ``tuning`` table),
    so a later task can be tested on the configurations already chosen without re-running the tuning sweep.
    Raises ``ValueError`` when the report has no choices or names an arm that no longer exists (the arms changed
    since it was written: its choices would not describe what runs now)."""
    arms = {a["label"]: a for a in (arms or update_mask_arms())}
    if not report or not report.get("chosen"):
        raise ValueError("the report holds no chosen configurations (was it written by benchmarks/utility_study.py?)")
    tuning = {row["arm"]: row for row in report.get("tuning", [])}
    missing = sorted({label for label in report["chosen"].values() if label not in arms or label not in tuning})
    if missing:
        raise ValueError(f"the report chose {missing}, which the current update-mask arms or the report's tuning "
                         "table do not define: re-run the tuning stage")
    return {family: dict(arms[label], tags=dict(validation_accuracy=float(tuning[label]["mean"]),
                                                train_time_s=float(tuning[label]["train_time_s"])))
            for family, label in report["chosen"].items()}


def test_sweep(chosen: dict[str, dict], task: str = "parity", epsilons=TEST_EPSILONS, seeds=TEST_SEEDS,
               quick: bool | None = None) -> Sweep:
    """The chosen arms on the test split at each ε, one cell per seed. An arm chosen by several families is run
    once (its label keeps the arm's own name; :func:`compare` maps families onto it). ``quick`` (default:
    ``$DUALPRIV_QUICK``) shrinks it to the plumbing check of :meth:`~toolkit.sweeps.plan.Sweep.quick_version`
    at ε = 3 only."""
    unique = {}
    for arm in chosen.values():
        unique.setdefault(arm["label"], {k: v for k, v in arm.items() if k != "tags"})
    sweep = Sweep(
        f"utility-test-{task}", base=dict(FULL_BASE, task=task, eval_split="test"),
        grid=dict(arm=list(unique.values()), epsilon=list(epsilons)), seeds=list(seeds),
        description=f"The configurations chosen on the validation split (toolkit.sweeps.study), on the {task} "
                    "test split.",
        quick=dict(grid=dict(epsilon=[3.0])),
    )
    return sweep.quick_version() if (quick if quick is not None else is_quick()) else sweep


# The study's recipe (LoRA + head, what DP-SGD is tuned on) did not learn the scene task's left/right relations
# reliably, so its headroom is also measured with the best non-private recipe found for it: the whole LM, lr 1e-3,
# batch 64, 4800 steps (benchmarks/RESULTS.md, seventh session: 94.8 % over 3 seeds on validation).
BEST_NON_PRIVATE = {"scene": dict(trainable="lm-full", lr=1e-3, expected_batch_size=64, steps=4800, epochs=None)}
CEILING_RECIPES = ("study", "best")


def ceiling_sweep(task: str = "parity", seeds=TEST_SEEDS, quick: bool | None = None, recipe: str = "study") -> Sweep:
    """Non-private fine-tuning on ``task``'s test split, one cell per seed: what the task reaches without privacy.
    A DP comparison is only informative on a task whose ceiling is well above chance.

    ``recipe="study"``: the study's own recipe (the ceiling of the arms it compares); ``"best"``: the best
    non-private recipe known for the task (:data:`BEST_NON_PRIVATE`), where it differs, i.e. the task's headroom."""
    if recipe not in CEILING_RECIPES:
        raise ValueError(f"unknown ceiling recipe {recipe!r}; choose one of {CEILING_RECIPES}")
    if recipe == "best" and task not in BEST_NON_PRIVATE:
        raise ValueError(f"no best non-private recipe is recorded for {task!r} (only for {sorted(BEST_NON_PRIVATE)}): "
                         f"its ceiling is the study's recipe")
    overrides, suffix = (BEST_NON_PRIVATE[task], "-best") if recipe == "best" else ({}, "")
    what = "its best known non-private recipe" if recipe == "best" else "the study's recipe"
    sweep = Sweep(f"utility-ceiling-{task}{suffix}",
                  base=dict(FULL_BASE, task=task, eval_split="test", method="non-private", epsilon=math.inf,
                            **overrides),
                  seeds=list(seeds),
                  description=f"Non-private with {what} on the {task} test split: the task's ceiling.")
    return sweep.quick_version() if (quick if quick is not None else is_quick()) else sweep


def recipe_text(task: str) -> str:
    """The best non-private recipe of ``task`` in words (for the report)."""
    recipe = BEST_NON_PRIVATE[task]
    return (f"{recipe['trainable']}, lr {recipe['lr']:g}, batch {recipe['expected_batch_size']}, "
            f"{recipe['steps']} steps")


def start_accuracy(task: str, quick: bool | None = None) -> float:
    """Test accuracy % of the model every arm starts from (the study's public warm start, every visual token, no
    fine-tuning) on ``task``: a fine-tune that ends near it has not learned the task."""
    base = ceiling_sweep(task, quick=quick).base
    bundle = starting_model(preset=base["preset"], warm_start_steps=base.get("warm_start_steps"), progress=False,
                            curriculum=public_curriculum(task))
    return round(100 * task_accuracy(bundle, task, "test", limit=base.get("eval_limit")), 2)


def ceiling(results: pd.DataFrame, task: str, start: float | None = None) -> dict:
    """The ceiling sweep's result for the report: accuracy % (mean, standard error, seeds), the task's chance
    level (the most frequent answer's share of the test split: what always answering it scores) and, if given,
    ``start``: the accuracy of the starting model before fine-tuning (:func:`start_accuracy`)."""
    answers = pd.Series([record.answer for record in make_vqa(task, "test").records])
    row = dict(task=task, chance=round(100 * float(answers.value_counts(normalize=True).iloc[0]), 2))
    if start is not None:
        row["start"] = start
    if results.empty:
        return row
    stats = summarize(results.assign(task=task), "task").iloc[0]
    return dict(row, mean=round(100 * float(stats["mean"]), 2), seeds=int(stats["count"]),
                se=round(100 * float(stats["sem"]), 2) if stats["count"] > 1 else math.nan)


def compare(results: pd.DataFrame, chosen: dict[str, dict]) -> pd.DataFrame:
    """Rows per (family, ε): mean, standard error, seeds; and ``vs_dp_sgd`` = family mean - DP-SGD mean with
    ``vs_dp_sgd_se`` = sqrt(se² + se_DP-SGD²). Accuracies in percent."""
    rows = []
    stats = summarize(results, ["arm", "epsilon"]) if not results.empty else pd.DataFrame()
    for family, arm in chosen.items():
        for _, r in stats[stats["arm"] == arm["label"]].iterrows() if len(stats) else []:
            rows.append(dict(family=family, arm=arm["label"], epsilon=r["epsilon"], mean=100 * r["mean"],
                             se=100 * (r["sem"] if r["count"] > 1 else math.nan), seeds=int(r["count"])))
    table = pd.DataFrame(rows, columns=["family", "arm", "epsilon", "mean", "se", "seeds"])
    base = table[table["family"] == "DP-SGD"].set_index("epsilon")
    table["vs_dp_sgd"] = [m - base["mean"].get(e, math.nan) for m, e in zip(table["mean"], table["epsilon"])]
    table["vs_dp_sgd_se"] = [math.hypot(s, base["se"].get(e, math.nan))
                             for s, e in zip(table["se"], table["epsilon"])]
    return table


def markdown(table: pd.DataFrame) -> str:
    """The comparison as a Markdown table (ε rows, one column per family, ``mean ± se (Δ vs DP-SGD)``)."""
    families = [f for f in FAMILIES if f in set(table["family"])]
    lines = ["| ε | " + " | ".join(families) + " |", "|---" * (len(families) + 1) + "|"]
    for epsilon in sorted(table["epsilon"].unique()):
        cells = []
        for family in families:
            r = table[(table["family"] == family) & (table["epsilon"] == epsilon)]
            if r.empty:
                cells.append("–")
                continue
            r = r.iloc[0]
            delta = "" if family == "DP-SGD" else f" ({r['vs_dp_sgd']:+.1f} ± {r['vs_dp_sgd_se']:.1f})"
            cells.append(f"{r['mean']:.1f} ± {r['se']:.1f}{delta} [n={r['seeds']}]")
        lines.append(f"| {epsilon:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_measured_study(path: str | Path = MEASURED_STUDY) -> dict | None:
    """The study report written by ``benchmarks/utility_study.py`` (None when it has not been measured)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def verdict(rows: list[dict], family: str = "Dual-Priv, equal wall-clock", epsilon: float = 3.0) -> str:
    """One sentence on the target: ``family`` minus DP-SGD at ``epsilon`` against :data:`TARGET_POINTS`."""
    row = next((r for r in rows if r["family"] == family and r["epsilon"] == epsilon), None)
    if row is None:
        return f"{family} at ε = {epsilon:g}: not measured."
    delta, se = row["vs_dp_sgd"], row["vs_dp_sgd_se"]
    if delta >= TARGET_POINTS and delta > se:
        outcome = "MET"
    elif delta >= TARGET_POINTS:
        outcome = "not met: the difference is within its standard error"
    else:
        outcome = f"MISSED by {TARGET_POINTS - delta:.1f} points"
    text = (f"{family} minus DP-SGD at ε = {epsilon:g}: {delta:+.1f} ± {se:.1f} points over {row['seeds']} seeds; "
            f"the target (+{TARGET_POINTS:g}, larger than its standard error) is {outcome}.")
    tie = next((r for r in rows if r["family"] == TIE and r["epsilon"] == epsilon), None)
    if tie is not None:
        text += (f" Against the DP-SGD configuration tied with it on validation ({tie['arm']}, {tie['mean']:.1f} %): "
                 f"{row['mean'] - tie['mean']:+.1f} ± {math.hypot(row['se'], tie['se']):.1f} points.")
    return text


ABLATIONS = {"budgets": "Dual-Priv budgets (update keep fraction and visual tokens)",
             "ranks": "LoRA rank, both methods at lr 1e-2 (the noised dimension)"}


def ablation_markdown(rows: list[dict]) -> str:
    """An ablation's arms (``summarize`` rows on the validation split) as a Markdown table, best first."""
    lines = ["| arm | validation accuracy % (± s.e. over seeds) | seeds |", "|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["mean"]):
        se = f" ± {100 * r['sem']:.1f}" if r.get("count", 0) > 1 else ""
        lines.append(f"| {r['arm']} | {100 * r['mean']:.1f}{se} | {r.get('count', '?')} |")
    return "\n".join(lines)


def summary_markdown(report: dict | None) -> str:
    """The study for people: what was chosen, the test tables per task, and the verdict."""
    if not report:
        return ("The utility study has not been measured in this installation yet: "
                "`python benchmarks/utility_study.py --publish` runs it (hours on a CPU; resumable).")
    lines = ["Chosen on the validation split (ε = 3, parity):", ""]
    lines += [f"- **{family}**: {arm}" for family, arm in report["chosen"].items()]
    measured = dict(report.get("tasks", {}))
    for task in [*report.get("ceilings", {}), *report.get("best_ceilings", {})]:
        measured.setdefault(task, [])     # a task whose ceilings alone were measured shows them without a table
    for task, rows in measured.items():
        if rows:
            lines += ["", f"**{task}**, test split, accuracy % (mean ± standard error over seeds; Δ vs DP-SGD):", "",
                      markdown(pd.DataFrame(rows)), ""]
        else:
            lines += ["", f"**{task}**, test split: no arm measured yet.", ""]
        top = report.get("ceilings", {}).get(task)
        if top and "mean" in top:
            start = f"; the starting model before fine-tuning: {top['start']:.1f} %" if "start" in top else ""
            lines += [f"Without privacy (same recipe): {top['mean']:.1f} ± {top['se']:.1f} % over {top['seeds']} "
                      f"seeds; always giving the most frequent answer: {top['chance']:.1f} %{start}.", ""]
        best = report.get("best_ceilings", {}).get(task)
        if best and "mean" in best:
            lines += [f"Without privacy (the task's best known recipe: {recipe_text(task)}): {best['mean']:.1f} ± "
                      f"{best['se']:.1f} % over {best['seeds']} seeds.", ""]
        if rows:
            lines += [verdict(rows, "Dual-Priv, equal steps"), verdict(rows, "Dual-Priv, equal wall-clock")]
    for key, title in ABLATIONS.items():
        if report.get(key):
            lines += ["", f"**{title}**: an ablation on the parity validation split at ε = 3 (reported, not a "
                          "candidate for the choice):", "", ablation_markdown(report[key])]
    return "\n".join(lines)
