"""The Privacy–utility tab: a small sweep (method x ε x seeds, ``toolkit.sweeps.run_sweep``) drawn as accuracy
vs ε, or a sweep CSV written by the toolkit loaded and drawn; and the measured utility study (issue 14: every
configuration tried on validation, the winners on test) as shipped with the package.

This module is the dashboard's only user of the sweeps module.
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Iterator

import gradio as gr
import pandas as pd

from toolkit import stats
from toolkit.dashboard import jobs, model, reference
from toolkit.dashboard.common import (
    HELP as SHARED_HELP, METHOD_CHOICES, AppSettings, InputError, message_html, percent, progress_html,
    public_table, round_table, routed, ui_batch_size, ui_integer, ui_steps, warn,
)
from toolkit.dashboard.tabs import runs as session_runs
from toolkit.sweeps import Sweep, export_csv, plan_sweep, run_sweep
from toolkit.sweeps.study import load_measured_study, summary_markdown
from toolkit.viz import privacy_utility_figure, study_figure, tuning_figure
from toolkit.vocabulary import METHODS, format_epsilon, is_private, method_label, parse_epsilon, parse_epsilons

REQUIRED_COLUMNS = ("method", "epsilon", "accuracy")
DEFAULT_STEPS = 100  # the old 20 left every point within noise of chance: a curve of noise
# Measured at 100 steps (docs/DASHBOARD.md): accuracy rises from ε = 0.3 to 1 and changes by a few points from 1
# to 8, so "1, 3, 8" draws a nearly flat line; "0.3, 1, 3" shows the rise and the plateau.
DEFAULT_EPSILONS = "0.3, 1, 3"
SHOWN_COLUMNS = ["method", "epsilon", "seed", "accuracy", "epsilon_spent", "steps_done", "peak_memory_mb",
                 "wall_time_s"]  # eight fit the page without scrolling sideways; the CSV download has all of them
MAX_SEEDS = 5

HELP = dict(
    methods="Methods of the sweep; non-private runs once per seed (ε = ∞).",
    epsilons="Comma-separated ε values, each > 0 (e.g. 0.3, 1, 3).",
    seeds=f"Seeds per (method, ε): the curve shows their mean and spread (1 to {MAX_SEEDS}).",
    steps="Steps of every run of the sweep (100: each run learns visibly; far fewer ends near chance).",
    csv="A CSV with columns method, epsilon, seed, accuracy (as written by a toolkit sweep).",
)


def check_sweep_table(table: pd.DataFrame) -> pd.DataFrame:
    """A sweep table with numeric ``epsilon`` (``inf`` for non-private) and ``accuracy``, or :class:`InputError`."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(f"the sweep table lacks column(s) {missing}; a toolkit sweep CSV has "
                         f"method, epsilon, seed, accuracy, ...")
    if table.empty:
        raise InputError("the sweep table has no rows")
    table = table.copy()
    try:
        table["epsilon"] = [parse_epsilon(value) for value in table["epsilon"]]
    except ValueError as err:
        raise InputError(f"column 'epsilon': {err}") from None
    table["accuracy"] = pd.to_numeric(table["accuracy"], errors="coerce")
    if table["accuracy"].isna().any():
        raise InputError("column 'accuracy' holds values that are not numbers")
    return table


VIEW_LABELS = {"method": "method", "epsilon": "ε", "seed": "seed", "accuracy": "accuracy",
               "epsilon_spent": "ε spent", "steps_done": "steps", "visual_tokens": "visual tokens",
               "grad_prune_ratio": "grad prune", "peak_memory_mb": "memory (MB)", "wall_time_s": "time (s)"}


def sweep_view(table: pd.DataFrame) -> pd.DataFrame:
    """The columns worth reading in the app, with the labels and formats of the other tabs: method labels,
    accuracies as percentages, ε = ∞ written ∞, a private run's memory withheld (see ``common.WITHHELD_WHY``)."""
    shown = [c for c in SHOWN_COLUMNS if c in table.columns]
    view = round_table(public_table(table)[shown] if shown else table)
    for column in ("epsilon", "epsilon_spent"):
        if column in view and any(isinstance(v, float) and math.isinf(v) for v in view[column]):
            view[column] = [format_epsilon(v) if isinstance(v, float) and math.isinf(v) else v for v in view[column]]
    if "accuracy" in view:
        view["accuracy"] = [percent(v) for v in pd.to_numeric(view["accuracy"], errors="coerce")]
    if "peak_memory_mb" in view and "method" in view:
        view["peak_memory_mb"] = ["withheld" if is_private(str(m)) else v
                                  for m, v in zip(view["method"], view["peak_memory_mb"])]
    if "method" in view:
        view["method"] = [method_label(str(m)) for m in view["method"]]
    return view.rename(columns=VIEW_LABELS)


def load_sweep_csv(path) -> dict:
    """Read a sweep CSV (as written by the toolkit) and draw its privacy–utility curve.
    Returns ``figure``, ``table`` and ``status``."""
    path = getattr(path, "name", path)
    if not path:
        return dict(figure=None, table=None, status=warn("Nothing loaded: upload a sweep CSV first."))
    try:
        try:
            table = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError):
            raise InputError("the file is not a readable CSV (a toolkit sweep CSV is UTF-8 text with a header row "
                             "method, epsilon, seed, accuracy, ...)") from None
        table = check_sweep_table(table)
    except InputError as err:
        return dict(figure=None, table=None, status=warn(f"Nothing loaded: {err}"))
    return dict(figure=privacy_utility_figure(table, width=None), table=sweep_view(table),
                status=message_html(f"Loaded {len(table)} runs of {table['method'].nunique()} method(s).", "ok"))


def sweep(settings: AppSettings, methods, epsilons, seeds, steps, batch_size,
          session: str = "local") -> Iterator[dict]:
    """Generator: a small privacy–utility sweep with ``toolkit.sweeps.run_sweep`` (method x ε x seeds);
    yields ``status``, ``figure``, ``table`` and ``download`` (the sweep CSV the toolkit wrote); the last update of
    a sweep that finished runs also has ``results`` (its full table, for the session's runs table)."""
    blank = dict(figure=None, table=None, download=None)
    try:
        chosen = [m for m in METHODS if m in (methods or [])]
        if not chosen:
            raise InputError("choose at least one method")
        try:
            eps = parse_epsilons(epsilons)
        except ValueError as err:
            raise InputError(str(err)) from None
        n_seeds = ui_integer("seeds", seeds, minimum=1, maximum=MAX_SEEDS)
        n_steps = ui_steps(settings, steps)
        batch = ui_batch_size(settings, batch_size)
        base = dict(preset=settings.preset, warm_start_steps=settings.warm_start_steps, task=settings.task,
                    train_limit=settings.train_limit, eval_limit=settings.eval_limit, steps=n_steps,
                    expected_batch_size=batch, progress=False)
        planned = Sweep(f"dashboard-{time.strftime('%Y%m%d-%H%M%S')}", base=base,
                        grid=dict(method=chosen, epsilon=eps), seeds=list(range(n_seeds)),
                        description="privacy-utility sweep from the dashboard")
        try:
            runs = len(plan_sweep(planned).cells)
        except ValueError as err:
            raise InputError(str(err)) from None
        if runs > settings.max_sweep_runs:
            raise InputError(f"this sweep has {runs} runs; the app allows {settings.max_sweep_runs} "
                             "(choose fewer methods, ε values or seeds)")
        job = jobs.claim(session, "sweep", units=runs * n_steps, pace_key=f"sweep step of {settings.preset}")
    except InputError as err:
        yield dict(blank, status=warn(f"Not started: {err}"))
        return
    cells_done = [0]

    def work(job: jobs.Job):
        job.exclude(model.prepare(settings, job.note))  # the warm start, on first use: its own progress line
        out_dir = tempfile.mkdtemp(prefix="sweep-", dir=settings.results_dir())

        def on_cell(event: dict):
            job.emit("cell", event)
            job.progress((event["index"] + 1) * n_steps, job.units)
            return False if job.stopping else None

        table = run_sweep(planned, out_dir, progress=False, callback=on_cell,
                          step_callback=jobs.stopping_callback(job, settings.time_limit))
        csv_path = export_csv(table, Path(out_dir) / f"{planned.name}.csv") if not table.empty else None
        return table, csv_path

    def on_event(kind: str, event: dict) -> None:
        cells_done[0] = event["index"] + 1

    def render() -> dict:
        text = f"sweep: {cells_done[0]}/{runs} runs done · {job.elapsed():.0f} s"
        return dict(blank, status=progress_html(cells_done[0], runs, text + (" · stopping…" if job.stopping else "")))

    outcome = yield from jobs.stream(job, work, render, blank=blank, on_event=on_event,
                                     first_status=message_html(f"Running {runs} fine-tunes of {n_steps} steps…"))
    failed = jobs.unfinished_html(outcome, job, "The sweep")
    if failed:
        yield dict(blank, status=failed)
        return
    table, csv_path = outcome.value
    if table.empty:
        yield dict(blank, status=message_html(f"No run finished ({job.reason or 'stopped'}).", "warn"))
        return
    stopped = f" Stopped early ({job.reason})." if job.reason else ""
    n_eval = reference.eval_size(settings.task, eval_limit=settings.eval_limit)
    yield dict(status=message_html(f"Sweep done: {len(table)} of {runs} runs in {job.elapsed():.0f} s.{stopped} "
                                   f"{noise_note(table, settings.task, n_eval)}", "ok"),
               figure=privacy_utility_figure(check_sweep_table(table), width=None, n_eval=n_eval),
               table=sweep_view(table), download=str(csv_path) if csv_path is not None else None, results=table)


def noise_note(table: pd.DataFrame, task: str, n_eval: int) -> str:
    """One sentence: the chance level, its noise band on ``n_eval`` test records, and how many points lie in it."""
    chance = reference.chance_level(task)
    band = stats.noise_band(chance, n_eval)
    inside = int((abs(pd.to_numeric(table["accuracy"], errors="coerce") - chance) < band).sum())
    return (f"Chance is {100 * chance:.0f}%; with {n_eval} test images a guesser lands within ± {100 * band:.1f} "
            f"points of it (the grey band), so {inside} of {len(table)} point(s) inside the band are "
            "indistinguishable from guessing. Two single-seed points differ meaningfully only when they are more "
            f"than about {100 * band * 2 ** 0.5:.0f} points apart; more seeds narrow that.")


def measured_study_view(report: dict | None = None) -> dict:
    """The shipped utility study: ``markdown`` (choices, test tables, verdicts), ``tuning`` (every arm tried on
    validation, the losing ones included) and ``test`` (figure per task); figures are None when not measured."""
    report = report if report is not None else load_measured_study()
    if not report:
        return dict(markdown=summary_markdown(None), tuning=None, test={})
    return dict(markdown=summary_markdown(report), tuning=tuning_figure(report["tuning"], width=None),
                test={task: study_figure(rows, task, width=None) for task, rows in report.get("tasks", {}).items()
                      if rows})


def build(settings: AppSettings, runs_state: gr.State) -> list:
    """The Privacy–utility tab (inside the app's ``gr.Blocks``); a sweep's runs are added to ``runs_state``.
    Returns its events that may train the warm start."""
    s = settings
    with gr.Tab("Privacy–utility", id="sweep"):
        with gr.Row():
            with gr.Column(scale=2):
                methods = gr.CheckboxGroup(METHOD_CHOICES, value=["dp-sgd", "dual-priv"], label="Methods",
                                           info=HELP["methods"], elem_id="sw-methods")
                epsilons = gr.Textbox(DEFAULT_EPSILONS, label="ε values", info=HELP["epsilons"], elem_id="sw-eps")
                with gr.Row():
                    seeds = gr.Number(1, precision=0, label="Seeds", info=HELP["seeds"], elem_id="sw-seeds")
                    steps = gr.Number(min(DEFAULT_STEPS, s.max_steps), precision=0, label="Steps per run",
                                      info=HELP["steps"], elem_id="sw-steps")
                    batch = gr.Number(32, precision=0, label="Batch size", info=SHARED_HELP["batch_size"],
                                      elem_id="sw-batch")
                with gr.Row():
                    run_button = gr.Button("Run sweep", variant="primary", elem_id="sw-run")
                    cancel_button = gr.Button("Cancel", variant="stop", elem_id="sw-cancel")
                csv = gr.File(label="Or load a sweep CSV", file_count="single", type="filepath", elem_id="sw-csv")
                gr.Markdown(HELP["csv"])
            with gr.Column(scale=3):
                status = gr.HTML(message_html("Run a small sweep or load a sweep CSV."), elem_id="sw-status")
                figure = gr.Plot(label="Accuracy vs ε", elem_id="sw-figure")
                table = gr.Dataframe(headers=[VIEW_LABELS[c] for c in SHOWN_COLUMNS], label="Runs", interactive=False,
                                     wrap=True, elem_id="sw-table")
                download = gr.File(label="Download the sweep (CSV)", interactive=False, height=90,
                                   elem_id="sw-download")
        study = measured_study_view()
        with gr.Accordion("The measured study: Dual-Priv vs DP-SGD, tuned on validation, reported on test",
                          open=False, elem_id="sw-study"):
            gr.Markdown(study["markdown"], elem_id="sw-study-summary")
            if study["tuning"] is not None:
                gr.Plot(study["tuning"], label="Every configuration tried (validation)", elem_id="sw-study-tuning")
            for task, figure_v in study["test"].items():
                gr.Plot(figure_v, label=f"Chosen configurations on test: {task}", elem_id=f"sw-study-{task}")
    outputs = dict(status=status, figure=figure, table=table, download=download)

    def run(methods_v, eps_v, seeds_v, steps_v, batch_v, runs_v, request: gr.Request):
        for update in sweep(s, methods_v, eps_v, seeds_v, steps_v, batch_v, session=jobs.session_id(request)):
            results = update.pop("results", None)
            shown = routed(update, outputs)
            if results is not None:
                runs_v = list(runs_v or [])
                shown[runs_state] = runs_v + session_runs.runs_from_sweep(results, session_runs.next_number(runs_v), s)
            yield shown

    def load(path_v):
        return routed(load_sweep_csv(path_v), outputs)

    run_event = jobs.wire_run_button(run_button, run, [methods, epsilons, seeds, steps, batch, runs_state],
                                     list(outputs.values()) + [runs_state], api_name="sweep")
    cancel_button.click(jobs.cancel_from_page, None, status, concurrency_limit=None, show_progress="hidden",
                        api_name=False)
    csv.upload(load, csv, [status, figure, table], concurrency_limit=1, api_name="load_sweep")
    return [run_event]
