"""The Runs tab: every run of the browser session (fine-tunes on any data, sweep cells, audits) in one table with
its data set and verdict, accuracy drawn against ε and against time, runs pinned (kept when the rest is cleared, drawn larger), and the table exported as a CSV that
the Privacy–utility tab reads back (:func:`toolkit.dashboard.tabs.sweep.load_sweep_csv`).

The session's runs live in a ``gr.State`` (a list of dicts, one per run, columns :data:`COLUMNS`); the handlers here
are plain functions of that list.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from toolkit import stats
from toolkit.dashboard import reference
from toolkit.dashboard.common import AppSettings, message_html, percent, public_table, routed
from toolkit.sweeps import export_csv
from toolkit.viz.runs import runs_comparison_figure
from toolkit.vocabulary import format_epsilon, is_private, method_label

# One row per run. method, epsilon, seed and accuracy are what a sweep CSV holds (the privacy–utility tab needs
# method, epsilon and accuracy); the other names follow the sweep tables (steps_done, wall_time_s, ...). ``data`` is
# the data set the run trained on, ``verdict`` its accuracy read against the baselines (toolkit.stats).
COLUMNS = ["run", "source", "data", "method", "epsilon", "epsilon_spent", "delta", "token_strategy", "visual_tokens",
           "visual_tokens_in", "token_prune_ratio", "grad_prune_ratio", "steps_done", "expected_batch_size",
           "accuracy", "verdict", "peak_memory_mb", "wall_time_s", "cancelled", "seed", "task", "pinned"]
SHOWN = {"run": "#", "pinned": "pin", "source": "kind", "data": "data set", "method": "method", "epsilon": "ε",
         "epsilon_spent": "ε spent", "tokens": "visual tokens", "steps_done": "steps", "accuracy": "accuracy",
         "verdict": "verdict", "peak_memory_mb": "memory (MB)", "wall_time_s": "time (s)"}
SOURCES = {"fine-tune": "fine-tune", "your-data": "fine-tune", "sweep": "sweep", "audit": "audit"}


def _number(value, digits: int = 3):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(f"{float(value):.{digits}g}") if isinstance(value, (int, float)) and math.isfinite(value) else value


def embedded_data(settings: AppSettings) -> str:
    """How the runs table names the embedded data set."""
    return f"embedded {settings.task}"


def verdict_label(read: dict | None, epsilon=None, sigma=None) -> str:
    """A short verdict for a table cell, from :func:`toolkit.stats.verdict`'s dict (and ε / σ of a private run)."""
    if read is None:
        text = "not scored"
    elif read.get("collapsed"):
        text = f"one answer ({read['top_prediction']!r}) for all"
    elif read.get("learned"):
        text = f"learned (p = {read['p_value']:.1g})"
    else:
        text = f"not learned (vs {read.get('baseline', 'chance')})"
    if epsilon is not None and stats.privacy_strength(epsilon, sigma)[0] != "ok":
        text += "; effectively non-private"
    return text


def _withheld(method: str, value):
    """Peak memory of a private run is withheld (common.WITHHELD_WHY)."""
    return None if is_private(method) else value


def run_from_summary(summary: dict, number: int, source: str = "fine-tune", data: str = "embedded",
                     read: dict | None = None, task: str | None = "") -> dict:
    """A row of the runs table from ``TrainResult.summary()``, the data set's name and the run's verdict (``task``:
    None for a run on the user's data, default: the summary's)."""
    config = summary.get("config", {})
    method = summary["method"]
    return dict(run=number, source=source, data=data, method=method, epsilon=summary["epsilon"],
                epsilon_spent=summary["epsilon_spent"], delta=summary["delta"],
                token_strategy=summary["token_strategy"], visual_tokens=summary["visual_tokens"],
                visual_tokens_in=summary["visual_tokens_in"], token_prune_ratio=config.get("token_prune_ratio"),
                grad_prune_ratio=summary["grad_prune_ratio"], steps_done=summary["steps"],
                expected_batch_size=config.get("expected_batch_size"), accuracy=summary["accuracy"],
                verdict=verdict_label(read, summary["epsilon"] if is_private(method) else None,
                                      summary.get("noise_multiplier")),
                peak_memory_mb=_withheld(method, summary.get("peak_memory_mb")), wall_time_s=summary["wall_time_s"],
                cancelled=bool(summary.get("cancelled")), seed=summary.get("seed", 0),
                task=summary.get("task") if task == "" else task, pinned=False)


def run_from_audit(summary: dict, number: int, data: str) -> dict:
    """A row of the runs table from an audit's ``AuditResult.summary()`` (its run trains on ``data`` + canaries)."""
    return dict(run=number, source="audit", data=data, method=summary["method"], epsilon=summary["epsilon_target"],
                epsilon_spent=summary["epsilon_reported"], delta=summary["delta"], token_strategy=None,
                visual_tokens=None, visual_tokens_in=None, token_prune_ratio=None, grad_prune_ratio=None,
                steps_done=summary["steps"], expected_batch_size=None, accuracy=summary["accuracy"],
                verdict=f"audit: ε ≥ {summary['epsilon_lower_bound']:.2f} (95 %)"
                + ("; VIOLATION" if summary["violation"] else ""),
                peak_memory_mb=None, wall_time_s=summary["wall_time_s"], cancelled=False,
                seed=summary.get("seed", 0), task=None, pinned=False)


def runs_from_sweep(table: pd.DataFrame, first_number: int, settings: AppSettings | None = None) -> list[dict]:
    """Rows of the runs table from a finished sweep's results table (one per cell)."""
    rows = []
    task = settings.task if settings is not None else "parity"
    eval_limit = settings.eval_limit if settings is not None else None
    for i, cell in enumerate(table.to_dict(orient="records")):
        get = lambda name, default=None: cell.get(name, default)  # noqa: E731
        method = cell["method"]
        epsilon = math.inf if method == "non-private" else float(cell["epsilon"])
        read = reference.accuracy_verdict(get("task") or task, float(cell["accuracy"]), eval_limit=eval_limit)
        rows.append(dict(run=first_number + i, source="sweep", data=f"embedded {get('task') or task}", method=method,
                         epsilon=epsilon, epsilon_spent=get("epsilon_spent"), delta=get("delta"),
                         token_strategy=get("token_strategy"), visual_tokens=get("visual_tokens"),
                         visual_tokens_in=get("visual_tokens_in"), token_prune_ratio=get("token_prune_ratio"),
                         grad_prune_ratio=get("grad_prune_ratio"), steps_done=get("steps_done"),
                         expected_batch_size=get("expected_batch_size"), accuracy=float(cell["accuracy"]),
                         verdict=verdict_label(read, epsilon if is_private(method) else None,
                                               get("noise_multiplier")),
                         peak_memory_mb=_withheld(method, get("peak_memory_mb")), wall_time_s=get("wall_time_s"),
                         cancelled=bool(get("cancelled", False)), seed=get("seed", 0), task=get("task"),
                         pinned=False))
    return rows


def next_number(runs: list[dict]) -> int:
    return max((r["run"] for r in runs), default=0) + 1


def runs_view(runs: list[dict]) -> pd.DataFrame:
    """The table shown in the page: labels, percentages as everywhere in the app, ε = ∞ written ∞, pinned runs
    marked ★, a private run's memory written as withheld."""
    if not runs:
        return pd.DataFrame(columns=list(SHOWN.values()))
    rows = []
    for r in runs:
        tokens = (f"{r['visual_tokens']}/{r['visual_tokens_in']} ({r['token_strategy']})"
                  if r.get("visual_tokens") is not None else "–")
        private = is_private(r["method"])
        rows.append({
            SHOWN["run"]: r["run"], SHOWN["pinned"]: "★" if r.get("pinned") else "",
            SHOWN["source"]: SOURCES.get(r.get("source"), r.get("source")), SHOWN["data"]: r.get("data") or "–",
            SHOWN["method"]: method_label(r["method"]) + (" (stopped)" if r.get("cancelled") else ""),
            SHOWN["epsilon"]: format_epsilon(r["epsilon"]),
            SHOWN["epsilon_spent"]: format_epsilon(_number(r["epsilon_spent"]) if r["epsilon_spent"] is not None
                                                   else None) if private else "∞",
            SHOWN["tokens"]: tokens, SHOWN["steps_done"]: r.get("steps_done"),
            SHOWN["accuracy"]: percent(r["accuracy"]), SHOWN["verdict"]: r.get("verdict") or "–",
            SHOWN["peak_memory_mb"]: "withheld" if private else _number(r.get("peak_memory_mb"), 4),
            SHOWN["wall_time_s"]: _number(r["wall_time_s"]),
        })
    return pd.DataFrame(rows)


def pin_choices(runs: list[dict]) -> list[tuple[str, int]]:
    """(label, run number) for the pin selector."""
    return [(f"#{r['run']} {method_label(r['method'])} ε={format_epsilon(r['epsilon'])} ({percent(r['accuracy'])})",
             r["run"]) for r in runs]


def set_pins(runs: list[dict], pinned) -> list[dict]:
    """The runs with ``pinned`` (run numbers) marked pinned and the others not."""
    chosen = {int(p) for p in (pinned or [])}
    return [dict(r, pinned=r["run"] in chosen) for r in runs]


def clear_unpinned(runs: list[dict]) -> list[dict]:
    return [r for r in runs if r.get("pinned")]


def export_runs(settings: AppSettings, runs: list[dict]) -> str:
    """Write the runs as a CSV (columns :data:`COLUMNS`; ε = ∞ as ``inf``) under the app's results folder; its
    path. The Privacy–utility tab's "load a sweep CSV" reads it back."""
    table = public_table(pd.DataFrame(runs, columns=COLUMNS))
    path = Path(settings.results_dir()) / f"dashboard-runs-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    return str(export_csv(table, path))


def refresh(settings: AppSettings, runs: list[dict]) -> dict:
    """``table``, ``figure``, ``pins`` (selector update) and ``status`` for the session's runs."""
    runs = runs or []
    if not runs:
        return dict(table=runs_view(runs), figure=None, pins=gr.update(choices=[], value=[]),
                    status=message_html("No run yet: every fine-tune (embedded or your data), sweep and audit of this session is listed here."))
    table = pd.DataFrame(runs, columns=COLUMNS)
    n_eval = reference.eval_size(settings.task, eval_limit=settings.eval_limit)
    pinned = [r["run"] for r in runs if r.get("pinned")]
    chance = 100 * reference.chance_level(settings.task)
    text = f"{len(runs)} run(s) this session, {len(pinned)} pinned. Chance is {chance:.0f}%."
    return dict(table=runs_view(runs), figure=runs_comparison_figure(table, n_eval=n_eval),
                pins=gr.update(choices=pin_choices(runs), value=pinned), status=message_html(text, "info"))


def build(settings: AppSettings, runs_state: gr.State) -> list:
    """The Runs tab (inside the app's ``gr.Blocks``); it reads and writes ``runs_state``. Returns no event that
    may train the warm start."""
    s = settings
    with gr.Tab("Runs", id="runs"):
        status = gr.HTML(message_html("No run yet: every fine-tune (embedded or your data), sweep and audit of this session is listed here."),
                         elem_id="runs-status")
        table = gr.Dataframe(value=runs_view([]), label="Runs of this session", interactive=False, wrap=True,
                             elem_id="runs-table")
        figure = gr.Plot(label="Accuracy against ε and against time", elem_id="runs-figure")
        with gr.Row():
            pins = gr.Dropdown([], value=[], multiselect=True, label="Pinned runs",
                               info="Pinned runs are drawn larger, marked ★, and kept by 'Clear unpinned'.",
                               elem_id="runs-pins", scale=3)
            clear_button = gr.Button("Clear unpinned", elem_id="runs-clear", scale=1)
            export_button = gr.Button("Export CSV", variant="primary", elem_id="runs-export", scale=1)
        download = gr.File(label="Runs as CSV (load it in the Privacy–utility tab)", interactive=False, height=90,
                           elem_id="runs-download")
    outputs = dict(table=table, figure=figure, pins=pins, status=status)

    def show(runs):
        return routed(refresh(s, runs), outputs)

    def pin(runs, chosen):
        return set_pins(runs or [], chosen)

    def export(runs):
        if not runs:
            return None, message_html("Nothing to export yet: run a fine-tune or a sweep first.", "warn")
        path = export_runs(s, runs)
        return path, message_html(f"Exported {len(runs)} run(s) as {Path(path).name}: load it in the "
                                  "Privacy–utility tab to draw the curve.", "ok")

    shown = list(outputs.values())
    runs_state.change(show, runs_state, shown, queue=False, show_progress="hidden", api_name=False)
    # explicit .then: the page is redrawn from the new list whether or not the state's change event fires
    pins.input(pin, [runs_state, pins], runs_state, queue=False, show_progress="hidden", api_name=False).then(
        show, runs_state, shown, queue=False, show_progress="hidden", api_name=False)
    clear_button.click(clear_unpinned, runs_state, runs_state, queue=False, api_name=False).then(
        show, runs_state, shown, queue=False, show_progress="hidden", api_name=False)
    export_button.click(export, runs_state, [download, status], queue=False, api_name="export_runs")
    return []
