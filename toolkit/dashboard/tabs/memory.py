"""The Memory tab: peak memory and step time of the chosen methods on the same model and batch, side by side
(``toolkit.bench.run_bench``), with ratios to DP-SGD and DP-ZO and a note on how memory was measured here."""
from __future__ import annotations

from typing import Iterator

import gradio as gr
import pandas as pd

from toolkit.bench import run_bench
from toolkit.dashboard import jobs
from toolkit.dashboard.budget import AUTO_STRATEGY, budget_controls, token_budget
from toolkit.dashboard.common import (
    GRAD_RATIO_MEANING, HELP as SHARED_HELP, METHOD_CHOICES, AppSettings, InputError, failure_html, message_html,
    progress_html, round_table, routed, ui_batch_size, ui_fraction, ui_steps, warn,
)
from toolkit.tokens import STRATEGIES
from toolkit.viz import peak_memory_figure
from toolkit.vocabulary import METHODS

SHOWN_COLUMNS = ["method", "visual_tokens", "peak_memory_mb", "step_time_s", "memory_vs_dp_sgd", "memory_vs_dp_zo",
                 "time_vs_dp_sgd", "memory_method", "device"]

HELP = dict(
    methods="Methods measured side by side on the same model and batch.",
    steps="Steps per method (at least 3: one warm-up, one profiled for memory, the rest timed).",
    batch="Records in the measured batch (the same for every method).",
    strategy="Token strategy of the Dual-Priv row (the baselines keep every token).",
)


def memory_note(table: pd.DataFrame) -> str:
    """How memory was measured on the device of ``table`` (Markdown), so the numbers can be read correctly."""
    device = str(table["device"].iloc[0]) if len(table) else "?"
    method = str(table["memory_method"].iloc[0]) if len(table) else "?"
    if device.startswith("cuda"):
        how = ("on the GPU: `torch.cuda.reset_peak_memory_stats()` before the profiled step, then "
               "`max_memory_allocated()` (tensor bytes; the allocator's reserve is not counted)")
    else:
        how = ("on the CPU: the tensor-byte peak from the torch profiler's allocation events during one step, plus "
               "the tensors alive before it (weights, gradients, optimizer state); process RSS is not used")
    return (f"**How memory was measured on this device ({device}):** {how}. Measured as `{method}`. "
            "Every method takes the same batch through the whole step (frozen tower, token pruning, LLM, update); "
            "step 1 warms up, step 2 is profiled, the rest are timed. Ratios compare numbers of this same run.")


def memory(settings: AppSettings, methods, batch_size, steps, token_strategy, budget_mode, token_prune_ratio,
           keep_tokens, grad_prune_ratio, session: str = "local") -> Iterator[dict]:
    """Generator: side-by-side peak memory of the chosen methods (``toolkit.bench.run_bench``). Yields dicts
    with ``status`` (HTML), ``figure`` (bar chart), ``table`` (DataFrame with ratio columns) and ``note``."""
    blank = dict(figure=None, table=None, note="")
    try:
        unknown = sorted(set(methods or []) - set(METHODS))
        if unknown:
            raise InputError(f"unknown method(s) {unknown}; choose among {METHODS}")
        chosen = [m for m in METHODS if m in (methods or [])]
        if not chosen:
            raise InputError("choose at least one method to measure")
        batch = ui_batch_size(settings, batch_size)
        n_steps = ui_steps(settings, steps, minimum=3, name="measured steps")
        strategy = token_strategy if token_strategy not in (None, AUTO_STRATEGY) else "dual-priv"
        budget = token_budget(settings, strategy, budget_mode, token_prune_ratio, keep_tokens)
        grad_ratio = ui_fraction("gradient prune ratio", grad_prune_ratio, hint=GRAD_RATIO_MEANING)
        # run_bench has no way to stop midway: cancellable only while queued
        job = jobs.claim(session, "memory measurement", cancellable=False, units=len(chosen),
                         pace_key=f"memory measurement of {settings.preset}")
    except InputError as err:
        yield dict(blank, status=warn(f"Not started: {err}"))
        return
    kwargs = dict(methods=tuple(chosen), preset=settings.preset, batch_size=batch, steps=n_steps,
                  token_strategy=strategy, keep_tokens=budget["keep"], token_prune_ratio=budget["token_prune_ratio"],
                  grad_prune_ratio=grad_ratio, isolate=settings.bench_isolate)
    where = "each in a fresh subprocess" if settings.bench_isolate else "in the app's process"
    current: list = []  # the (method, index, total) being measured

    def work(job: jobs.Job):
        def progress(method: str, i: int, n: int) -> None:
            job.emit("method", (method, i, n))
            job.progress(i, n)

        return run_bench(progress=progress, **kwargs)

    def render() -> dict:
        if not current:
            return dict(blank, status=message_html(f"Measuring {', '.join(chosen)} ({where})…"))
        method, i, n = current[-1]
        return dict(blank, status=progress_html(i, n, f"measuring {method} ({i + 1}/{n}, {where}) · "
                                                      f"{job.elapsed():.0f} s"))

    outcome = yield from jobs.stream(job, work, render, blank=blank, on_event=lambda kind, value: current.append(value),
                                     first_status=message_html(f"Measuring {', '.join(chosen)} ({where})…"))
    if not outcome.started:
        yield dict(blank, status=jobs.never_started_html(job))
        return
    if outcome.error is not None:
        yield dict(blank, status=failure_html("The measurement", outcome.error))
        return
    table = outcome.value
    n = len(chosen)
    yield dict(status=progress_html(n, n, f"measured {n} method(s) in {job.elapsed():.0f} s"),
               figure=peak_memory_figure(table), note=memory_note(table),
               table=round_table(table[[c for c in SHOWN_COLUMNS if c in table.columns]]))


def build(settings: AppSettings) -> list:
    """The Memory tab (inside the app's ``gr.Blocks``); it never trains the warm start (returns no event)."""
    s = settings
    with gr.Tab("Memory", id="memory"):
        with gr.Row():
            with gr.Column(scale=2):
                methods = gr.CheckboxGroup(METHOD_CHOICES, value=list(METHODS), label="Methods",
                                           info=HELP["methods"], elem_id="mem-methods")
                with gr.Row():
                    batch = gr.Number(8, precision=0, label="Batch size", info=HELP["batch"], elem_id="mem-batch")
                    steps = gr.Number(3, precision=0, label="Steps", info=HELP["steps"], elem_id="mem-steps")
                strategy = gr.Dropdown(sorted(STRATEGIES), value="dual-priv", label="Dual-Priv token strategy",
                                       info=HELP["strategy"], elem_id="mem-strategy")
                mode, ratio, keep = budget_controls(("mem-budget-mode", "mem-ratio", "mem-keep"))
                grad_ratio = gr.Number(0.2, label="Gradient-update prune ratio",
                                       info=SHARED_HELP["grad_prune_ratio"], elem_id="mem-grad-ratio")
                with gr.Row():
                    measure_button = gr.Button("Measure", variant="primary", elem_id="mem-run")
                    cancel_button = gr.Button("Cancel while queued", variant="stop", elem_id="mem-cancel")
            with gr.Column(scale=3):
                status = gr.HTML(message_html("Press Measure: each method runs a few steps on the same batch."),
                                 elem_id="mem-status")
                figure = gr.Plot(label="Peak memory", elem_id="mem-figure")
                table = gr.Dataframe(headers=SHOWN_COLUMNS, label="Measurements (ratios to DP-SGD and DP-ZO)",
                                     interactive=False, elem_id="mem-table")
                note = gr.Markdown(elem_id="mem-note")
    outputs = dict(status=status, figure=figure, table=table, note=note)

    def measure(methods_v, batch_v, steps_v, strategy_v, mode_v, ratio_v, keep_v, grad_v, request: gr.Request):
        for update in memory(s, methods_v, batch_v, steps_v, strategy_v, mode_v, ratio_v, keep_v, grad_v,
                             session=jobs.session_id(request)):
            yield routed(update, outputs)

    jobs.wire_run_button(measure_button, measure, [methods, batch, steps, strategy, mode, ratio, keep, grad_ratio],
                         list(outputs.values()), api_name="memory")
    cancel_button.click(jobs.cancel_from_page, None, status, concurrency_limit=None, show_progress="hidden",
                        api_name=False)
    return []
