"""The Memory tab: peak memory and step time of the chosen methods on the same model and batch, side by side
(``toolkit.bench.run_bench``), measured several times (each method in a fresh subprocess every time) and reported
as the median with its min–max spread, with ratios to DP-SGD and DP-ZO and a note on how memory was measured.

The preset is selectable: ``tiny`` (64 visual tokens), ``llava576`` (LLaVA-1.5's 576 visual tokens: the paper's
576 -> 64 comparison) and, only when a GPU is present, a shape-only preset such as ``llava-7b-shape`` (the
presets are read from ``toolkit.models.PRESETS``: whatever exists is offered).
"""
from __future__ import annotations

import statistics
from typing import Iterator

import gradio as gr
import pandas as pd
import torch

from toolkit.bench import add_ratios, bench_defaults, run_bench
from toolkit.dashboard import jobs
from toolkit.dashboard.budget import AUTO_STRATEGY, BUDGET_KEEP, BUDGET_RATIO, budget_controls, token_budget
from toolkit.dashboard.common import (
    GRAD_RATIO_MEANING, HELP as SHARED_HELP, METHOD_CHOICES, AppSettings, InputError, message_html,
    progress_html, routed, ui_batch_size, ui_choice, ui_fraction, ui_integer, ui_steps, warn,
)
from toolkit.models import PRESETS, spec_patches
from toolkit.tokens import STRATEGIES
from toolkit.viz import peak_memory_figure
from toolkit.vocabulary import METHODS, method_label

MAX_REPEATS = 5
DEFAULT_REPEATS = 3
# The paper's setting on a 576-token preset: 576 -> 64 visual tokens; a 64-token preset keeps a quarter.
PAPER_KEEP_TOKENS = 64
TABLE_COLUMNS = ["method", "tokens", "peak MB (median)", "peak MB min–max", "× DP-SGD", "× DP-ZO",
                 "step s (median)", "step s min–max"]

HELP = dict(
    methods="Methods measured side by side on the same model and batch.",
    preset=("Model measured. tiny: 64 visual tokens; llava576: LLaVA-1.5's 576 visual tokens (Dual-Priv keeps 64: "
            "the paper's comparison); a 7B-shape preset is offered only when a GPU is present."),
    steps="Steps per method and repeat (at least 3: one warm-up, one profiled for memory, the rest timed).",
    repeats=f"Measurements per method, each in a fresh process (1 to {MAX_REPEATS}): the table shows the median "
            "and the min–max spread.",
    batch="Records in the measured batch (the same for every method).",
    strategy="Token strategy of the Dual-Priv row (the baselines keep every token).",
)
WHY_LORA = ("**Why DP-SGD with LoRA costs about what non-private training does:** only the small LoRA matrices "
            "(and the answer head) are trained, so the per-example gradients DP-SGD keeps (batch × trainable "
            "parameters: {grad_mb} here) are small next to the activations that every method with a backward pass "
            "stores. What shrinks memory is fewer visual tokens (Dual-Priv's pruning: shorter sequences, smaller "
            "activations) or no backward pass at all (DP-ZO).")


def memory_presets(cuda: bool | None = None) -> list[str]:
    """The presets the tab offers: every preset of ``toolkit.models.PRESETS``, a shape-only one (too large for a
    CPU) only when a GPU is present."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return [name for name, spec in PRESETS.items() if cuda or not spec.get("shape_only")]


def default_preset(settings: AppSettings) -> str:
    """llava576 when offered (the paper's 576-token comparison), else the app's own preset."""
    return "llava576" if "llava576" in memory_presets() else settings.preset


def budget_for_preset(preset: str) -> tuple[str, float, int]:
    """The budget controls' values for ``preset``: 576 -> 64 kept tokens on a many-token preset (the paper's
    setting), a 0.75 prune ratio otherwise."""
    spec = PRESETS[preset]
    n_patches = spec_patches(spec)
    if n_patches > 4 * PAPER_KEEP_TOKENS:
        return BUDGET_KEEP, 0.75, PAPER_KEEP_TOKENS
    return BUDGET_RATIO, 0.75, max(1, n_patches // 4)


def summarize_repeats(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """One row per method from repeated bench tables: median peak memory and step time (ratios recomputed from the
    medians), their min and max, and ``repeats``."""
    rows = pd.concat(tables, ignore_index=True)
    out = []
    for method in [m for m in METHODS if m in set(rows["method"])]:
        group = rows[rows["method"] == method]
        first = group.iloc[0].to_dict()
        record = {k: first[k] for k in ("method", "visual_tokens", "trainable_params", "batch_size", "preset",
                                        "memory_method", "device") if k in first}
        for column in ("peak_memory_mb", "step_time_s"):
            values = group[column].astype(float).tolist()
            record[column] = statistics.median(values)
            record[f"{column}_min"], record[f"{column}_max"] = min(values), max(values)
        record["repeats"] = len(group)
        out.append(record)
    table = pd.DataFrame(out)
    ratios = add_ratios(table)  # ratios of medians, from this same measurement
    for column in ("memory_vs_dp_sgd", "memory_vs_dp_zo", "time_vs_dp_sgd"):
        table[column] = ratios[column].to_numpy()
    return table


def memory_table(table: pd.DataFrame) -> pd.DataFrame:
    """The page's table: few, short columns (it used to overflow sideways), numbers as text with their spread."""
    def ratio(value) -> str:
        return "–" if pd.isna(value) else f"{value:.2f}×"

    rows = []
    for _, r in table.iterrows():
        rows.append({
            "method": method_label(r["method"]), "tokens": int(r["visual_tokens"]),
            "peak MB (median)": f"{r['peak_memory_mb']:.1f}",
            "peak MB min–max": f"{r['peak_memory_mb_min']:.1f}–{r['peak_memory_mb_max']:.1f}",
            "× DP-SGD": ratio(r.get("memory_vs_dp_sgd")), "× DP-ZO": ratio(r.get("memory_vs_dp_zo")),
            "step s (median)": f"{r['step_time_s']:.3g}",
            "step s min–max": f"{r['step_time_s_min']:.3g}–{r['step_time_s_max']:.3g}",
        })
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def memory_note(table: pd.DataFrame) -> str:
    """How memory was measured on the device of ``table`` (Markdown), so the numbers can be read correctly, and
    why DP-SGD with LoRA costs about what non-private does."""
    device = str(table["device"].iloc[0]) if len(table) else "?"
    method = str(table["memory_method"].iloc[0]) if len(table) else "?"
    repeats = int(table["repeats"].iloc[0]) if "repeats" in table and len(table) else 1
    if device.startswith("cuda"):
        how = ("on the GPU: `torch.cuda.reset_peak_memory_stats()` before the profiled step, then "
               "`max_memory_allocated()` (tensor bytes; the allocator's reserve is not counted)")
    else:
        how = ("on the CPU: the tensor-byte peak from the torch profiler's allocation events during one step, plus "
               "the tensors alive before it (weights, gradients, optimizer state); process RSS is not used")
    text = (f"**How memory was measured on this device ({device}):** {how}. Measured as `{method}`. "
            "Every method takes the same batch through the whole step (frozen tower, token pruning, LLM, update); "
            "step 1 warms up, step 2 is profiled, the rest are timed. "
            f"Each method was measured {repeats} time(s), each in a fresh process: the median is shown with the "
            "min–max spread. Ratios compare medians of this same measurement.")
    if "trainable_params" in table and "batch_size" in table and len(table):
        grad_mb = float(table["trainable_params"].max()) * int(table["batch_size"].iloc[0]) * 4 / 2 ** 20
        text += "\n\n" + WHY_LORA.format(grad_mb=f"≈ {grad_mb:.1f} MB in fp32")
    return text


def memory(settings: AppSettings, methods, batch_size, steps, token_strategy, budget_mode, token_prune_ratio,
           keep_tokens, grad_prune_ratio, preset=None, repeats=1, session: str = "local") -> Iterator[dict]:
    """Generator: side-by-side peak memory of the chosen methods (``toolkit.bench.run_bench``), ``repeats``
    times. Yields dicts with ``status`` (HTML), ``figure`` (bars with min–max whiskers), ``table`` (the page's
    table), ``measurements`` (the per-method medians, spreads and ratios) and ``note``."""
    blank = dict(figure=None, table=None, note="")
    try:
        unknown = sorted(set(methods or []) - set(METHODS))
        if unknown:
            raise InputError(f"unknown method(s) {unknown}; choose among {METHODS}")
        chosen = [m for m in METHODS if m in (methods or [])]
        if not chosen:
            raise InputError("choose at least one method to measure")
        preset = ui_choice("preset", preset or settings.preset, memory_presets())
        batch = ui_batch_size(settings, batch_size)
        n_steps = ui_steps(settings, steps, minimum=3, name="measured steps")
        n_repeats = ui_integer("repeats", repeats, minimum=1, maximum=MAX_REPEATS)
        strategy = token_strategy if token_strategy not in (None, AUTO_STRATEGY) else "dual-priv"
        budget = token_budget(settings, strategy, budget_mode, token_prune_ratio, keep_tokens, preset=preset)
        grad_ratio = ui_fraction("gradient prune ratio", grad_prune_ratio, hint=GRAD_RATIO_MEANING)
        # run_bench has no way to stop midway: cancellable only while queued
        job = jobs.claim(session, "memory measurement", cancellable=False, units=len(chosen) * n_repeats,
                         pace_key=f"memory measurement of {preset}")
    except InputError as err:
        yield dict(blank, status=warn(f"Not started: {err}"))
        return
    kwargs = dict(methods=tuple(chosen), preset=preset, batch_size=batch, steps=n_steps, token_strategy=strategy,
                  keep_tokens=budget["keep"], token_prune_ratio=budget["token_prune_ratio"],
                  grad_prune_ratio=grad_ratio, isolate=settings.bench_isolate,
                  trainable=bench_defaults(preset)["trainable"])  # a shape-only preset's own (LoRA, as in the paper)
    where = "each in a fresh subprocess" if settings.bench_isolate else "in the app's process"
    # the (method, index, total, repeat) being measured, and its phase (a 7B-shape method runs for minutes)
    now: dict = dict(measuring=None, phase="")

    def work(job: jobs.Job):
        tables = []
        total = len(chosen) * n_repeats
        for repeat in range(n_repeats):
            def progress(method: str, i: int, n: int, repeat=repeat) -> None:
                done = repeat * len(chosen) + i
                job.emit("method", (method, done, total, repeat + 1))
                job.progress(done, total)

            tables.append(run_bench(progress=progress, on_phase=lambda method, text: job.emit("phase", (method, text)),
                                    **kwargs))
        return summarize_repeats(tables)

    def render() -> dict:
        if now["measuring"] is None:
            return dict(blank, status=message_html(f"Measuring {', '.join(chosen)} on {preset} ({where})…"))
        method, done, total, repeat = now["measuring"]
        phase = f" · {now['phase']}" if now["phase"] else ""
        return dict(blank, status=progress_html(done, total, f"repeat {repeat}/{n_repeats}: measuring {method} on "
                                                              f"{preset} ({where}){phase} · {job.elapsed():.0f} s"))

    def on_event(kind: str, value) -> None:
        if kind == "method":
            now.update(measuring=value, phase="")   # each method, in each repeat, starts from its first phase
        elif kind == "phase" and now["measuring"] is not None and value[0] == now["measuring"][0]:
            now["phase"] = value[1]

    outcome = yield from jobs.stream(job, work, render, blank=blank, on_event=on_event,
                                     first_status=message_html(f"Measuring {', '.join(chosen)} on {preset} ({where})…"))
    failed = jobs.unfinished_html(outcome, job, "The measurement")
    if failed:
        yield dict(blank, status=failed)
        return
    table = outcome.value
    n = len(chosen) * n_repeats
    yield dict(status=progress_html(n, n, f"measured {len(chosen)} method(s) × {n_repeats} on {preset} in "
                                          f"{job.elapsed():.0f} s"),
               figure=peak_memory_figure(table), note=memory_note(table), table=memory_table(table),
               measurements=table)


def build(settings: AppSettings) -> list:
    """The Memory tab (inside the app's ``gr.Blocks``); it never trains the warm start (returns no event)."""
    s = settings
    with gr.Tab("Memory", id="memory"):
        with gr.Row():
            with gr.Column(scale=2):
                methods = gr.CheckboxGroup(METHOD_CHOICES, value=list(METHODS), label="Methods",
                                           info=HELP["methods"], elem_id="mem-methods")
                preset = gr.Dropdown(memory_presets(), value=default_preset(s), label="Model preset",
                                     info=HELP["preset"], elem_id="mem-preset")
                with gr.Row():
                    batch = gr.Number(8, precision=0, label="Batch size", info=HELP["batch"], elem_id="mem-batch")
                    steps = gr.Number(3, precision=0, label="Steps", info=HELP["steps"], elem_id="mem-steps")
                    repeats = gr.Number(DEFAULT_REPEATS, precision=0, label="Repeats", info=HELP["repeats"],
                                        elem_id="mem-repeats")
                strategy = gr.Dropdown(sorted(STRATEGIES), value="dual-priv", label="Dual-Priv token strategy",
                                       info=HELP["strategy"], elem_id="mem-strategy")
                mode, ratio, keep = budget_controls(("mem-budget-mode", "mem-ratio", "mem-keep"),
                                                    values=budget_for_preset(default_preset(s)),
                                                    keep_info="Visual tokens fed to the LLM per image (1 to the "
                                                              "preset's patches: 64 for tiny, 576 for llava576).")
                grad_ratio = gr.Number(0.2, label="Gradient-update prune ratio",
                                       info=SHARED_HELP["grad_prune_ratio"], elem_id="mem-grad-ratio")
                with gr.Row():
                    measure_button = gr.Button("Measure", variant="primary", elem_id="mem-run")
                    cancel_button = gr.Button("Cancel while queued", variant="stop", elem_id="mem-cancel")
            with gr.Column(scale=3):
                status = gr.HTML(message_html("Press Measure: each method runs a few steps on the same batch."),
                                 elem_id="mem-status")
                figure = gr.Plot(label="Peak memory", elem_id="mem-figure")
                table = gr.Dataframe(headers=TABLE_COLUMNS, label="Measurements (ratios of medians to DP-SGD and "
                                     "DP-ZO)", interactive=False, wrap=True, elem_id="mem-table")
                note = gr.Markdown(elem_id="mem-note")
    outputs = dict(status=status, figure=figure, table=table, note=note)

    def measure(methods_v, batch_v, steps_v, strategy_v, mode_v, ratio_v, keep_v, grad_v, preset_v, repeats_v,
                request: gr.Request):
        for update in memory(s, methods_v, batch_v, steps_v, strategy_v, mode_v, ratio_v, keep_v, grad_v,
                             preset=preset_v, repeats=repeats_v, session=jobs.session_id(request)):
            update.pop("measurements", None)
            yield routed(update, outputs)

    def preset_budget(preset_v):
        mode_v, ratio_v, keep_v = budget_for_preset(preset_v)
        return (gr.update(value=mode_v), gr.update(value=ratio_v, interactive=mode_v == BUDGET_RATIO),
                gr.update(value=keep_v, interactive=mode_v == BUDGET_KEEP))

    preset.change(preset_budget, preset, [mode, ratio, keep], queue=False, show_progress="hidden", api_name=False)
    jobs.wire_run_button(measure_button, measure, [methods, batch, steps, strategy, mode, ratio, keep, grad_ratio,
                                                   preset, repeats], list(outputs.values()), api_name="memory")
    cancel_button.click(jobs.cancel_from_page, None, status, concurrency_limit=None, show_progress="hidden",
                        api_name=False)
    return []
