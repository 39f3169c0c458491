"""The Fine-tune tab: one run of any method with a live ε curve (and loss, where released), cancel, the app's time limit, the result
read against chance and a non-private reference, and the run's settings and result as a JSON download.

The run itself is ``toolkit.train.train``; this module turns the UI's values into a validated ``TrainConfig``
(:func:`build_train_config`) and follows the run through :mod:`toolkit.dashboard.jobs` (:func:`finetune`). The
reading of the result (chance level, binomial noise, the measured non-private reference) is
:mod:`toolkit.dashboard.reference`.

Defaults: 100 steps of batch 32 at the method's default learning rate. Measured on the tiny preset with its warm
start: 20 steps ended within noise of chance; 100 steps learn visibly in seconds.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Iterator

import gradio as gr
import pandas as pd

from toolkit import stats
from toolkit.dashboard import jobs, model, reference
from toolkit.dashboard.budget import AUTO_STRATEGY, budget_controls, token_budget
from toolkit.dashboard.common import (
    APP_PRIVACY_UNIT, GRAD_RATIO_MEANING, HELP as SHARED_HELP, METHOD_CHOICES, WITHHELD_TEXT, WITHHELD_WHY,
    AppSettings, InputError, format_value, message_html, progress_html, public_summary, routed,
    ui_batch_size, ui_choice, ui_fraction, ui_number, ui_steps, warn,
)
from toolkit.dashboard.planning import plan_html
from toolkit.dashboard.tabs import runs as session_runs
from toolkit.methods import get_method, method_names
from toolkit.tokens import STRATEGIES
from toolkit.train import TrainConfig, train
from toolkit.viz import training_curve_figure
from toolkit.vocabulary import METHOD_LABELS, format_epsilon, is_private, strict_json

HELP = dict(
    method=("Non-private: no noise (ε = ∞). DP-SGD: per-example clipping + Gaussian noise, every visual token. "
            "Dual-Priv: DP-SGD + visual token pruning + update pruning. DP-ZO: zeroth-order, two forward passes, "
            "memory near inference, lower utility."),
    epsilon=(f"Privacy budget ε of the whole run (> 0): smaller = stronger privacy, more noise. Privacy unit: "
             f"{APP_PRIVACY_UNIT}. Ignored by non-private."),
    delta="δ in (0, 1): the chance the ε bound may fail; keep it well below 1 / number of records (700).",
    token_strategy=("How visual tokens are chosen. auto: dual-priv for Dual-Priv, every token for the other "
                    "methods. dual-priv: the patches [CLS] attends to most + contextual tokens fused from the rest; "
                    "random / uniform / pool / divprune / mean-attention: baselines; none: every token."),
    release_stats=("The per-step loss of a private run depends on the private batch and is NOT covered by ε "
                   "(its sensitivity is unbounded). Off by default: only ε is shown while training."),
    secure_mode=("Opacus' noise that resists floating-point attacks on the Gaussian sampler; about 4x the noise "
                 "draws."),
    fusion_noise=("Add Gaussian noise to the fused contextual tokens, σ matched to the DP noise. A heuristic OUTSIDE "
                  "the DP guarantee: ε does not change with it (the guarantee comes from DP-SGD's gradient noise)."),
    steps="Optimizer steps; this app allows at most {max_steps}, and stops a run after {time_limit:g} s.",
    lr="Learning rate; leave empty for the method's default (5e-3 DP-SGD/Dual-Priv, 1e-3 non-private, 2e-3 DP-ZO).",
    compare=("After the run, also fine-tune non-privately with the same steps and batch size (every visual token) "
             "to show what the task reaches without privacy. Measured once per settings on this server, then "
             "cached; the first time it costs about as long as a non-private run."),
)
# measured (docs/DASHBOARD.md): 20 steps spread 66-78.5 % between runs, 100 land at 83-85 % in about 7 CPU s
DEFAULT_STEPS = 100
DEFAULT_BATCH_SIZE = 32


def build_train_config(settings: AppSettings, method, epsilon, delta, budget_mode, token_prune_ratio, keep_tokens,
                       token_strategy, grad_prune_ratio, steps, batch_size, lr,
                       fusion_noise: bool = False, release_stats: bool = False,
                       secure_mode: bool = False) -> TrainConfig:
    """The validated, resolved ``TrainConfig`` of a fine-tune from the UI's values, or :class:`InputError`.

    Token pruning and update pruning apply to Dual-Priv; the baselines keep every visual token and every
    gradient coordinate unless a token strategy is chosen explicitly (an ablation). Non-private ignores ε and δ.
    """
    ui_choice("method", method, method_names())  # the registry now (a method registered after import counts)
    spec = get_method(method)  # what the method prunes by default: the same rule as TrainConfig.resolved()
    private = spec.private
    eps = ui_number("ε", epsilon, minimum=0, hint="smaller ε = stronger privacy") if private else math.inf
    dlt = (ui_fraction("δ", delta, include_zero=False, hint="e.g. 1e-5, below 1 / number of records")
           if private else 1e-5)
    n_steps = ui_steps(settings, steps)
    batch = ui_batch_size(settings, batch_size)
    rate = None if lr is None or str(lr).strip() == "" else ui_number("learning rate", lr, minimum=0)
    grad_ratio = ui_fraction("gradient prune ratio", grad_prune_ratio, hint=GRAD_RATIO_MEANING)
    strategy = token_strategy or AUTO_STRATEGY
    if strategy == AUTO_STRATEGY:
        strategy = spec.default_token_strategy
    budget = token_budget(settings, strategy, budget_mode, token_prune_ratio, keep_tokens)
    config = TrainConfig(
        method=method, preset=settings.preset, warm_start_steps=settings.warm_start_steps, task=settings.task,
        train_limit=settings.train_limit, eval_limit=settings.eval_limit, epsilon=eps, delta=dlt, steps=n_steps,
        expected_batch_size=batch, lr=rate, token_strategy=strategy, keep_tokens=budget["keep"],
        token_prune_ratio=budget["token_prune_ratio"], grad_prune_ratio=grad_ratio if spec.prunes_update else None,
        fusion_noise_std="matched" if (fusion_noise and private and strategy != "none") else None, progress=False,
        release_training_stats=bool(release_stats), secure_mode=bool(secure_mode),
    )
    try:
        return config.resolved()
    except ValueError as err:
        raise InputError(str(err)) from None


def plan_for(settings: AppSettings, *values) -> str:
    """HTML: the plan (:mod:`toolkit.dashboard.planning`) of the fine-tune these UI values describe, before it
    starts: σ, the noise against the signal and what measured runs like it did. No model is loaded."""
    try:
        config = build_train_config(settings, *values)
    except InputError as err:
        return warn(f"No plan: {err}")
    return plan_html(config)


def result_markdown(summary: dict, reason: str | None) -> str:
    """The result table of a finished (or stopped) run, from ``TrainResult.summary()``."""
    private = is_private(summary["method"])
    lines = [f"### Result: {METHOD_LABELS[summary['method']]}"]
    if summary.get("cancelled"):
        lines.append(f"**Stopped early ({reason or 'cancelled'})** after {summary['steps']} of "
                     f"{summary['config']['steps']} steps; the model was still evaluated.")
    accuracy = summary["accuracy"]
    rows = [
        ("accuracy (held-out test split)", "n/a" if math.isnan(accuracy) else f"{100 * accuracy:.1f}%"),
        ("ε spent / target", f"{format_value(summary['epsilon_spent'], 4)} / {format_epsilon(summary['epsilon'])} "
                             f"(δ = {summary['delta']:g})" if private else "∞ (non-private: no guarantee)"),
        ("privacy unit", APP_PRIVACY_UNIT if private else "–"),
        ("noise multiplier σ", format_value(summary["noise_multiplier"])),
        ("peak memory", f"{WITHHELD_TEXT} (see below)" if private else peak_memory_text(summary)),
        ("step time (median)", f"{WITHHELD_TEXT} (see below)" if private else
         f"{format_value(summary['step_time_s'])} s"),
        ("visual tokens fed to the LLM", f"{summary['visual_tokens']} of {summary['visual_tokens_in']} "
                                         f"({summary['token_strategy']})"),
        ("gradient prune ratio", format_value(summary["grad_prune_ratio"])),
        ("steps", str(summary["steps"])),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
    ]
    if summary.get("fusion_noise_std"):
        rows.append(("fusion noise σ (heuristic, outside the DP guarantee)", format_value(summary["fusion_noise_std"])))
    lines += ["", "| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    if private:
        lines += ["", f"Step time and peak memory are {WITHHELD_TEXT}: {WITHHELD_WHY}."]
    return "\n".join(lines)


def peak_memory_text(summary: dict) -> str:
    """Peak memory for the result table; a run stopped before its profiled step says so instead of "n/a MB"."""
    peak = summary.get("peak_memory_mb")
    if peak is None or (isinstance(peak, float) and math.isnan(peak)):
        return "not measured (the run stopped before step 3, the step whose memory is profiled)"
    return f"{format_value(peak, 4)} MB ({summary['memory_method']})"


def comparison_html(config: TrainConfig, summary: dict, ref_entry: dict | None, ref_note: str,
                    read: dict | None = None) -> str:
    """The result read against the chance and majority-class baselines of the test set (``read``: its
    :func:`toolkit.stats.verdict`), whether ε still protects anyone, and the non-private reference: one status
    line, a warning unless the run measurably learned with a meaningful ε."""
    if read is None:  # no predictions kept: the accuracy alone against the embedded set's baselines
        read = reference.accuracy_verdict(config.task, summary["accuracy"], config.eval_split, config.eval_limit)
    kind, sentences = read["kind"], [read["sentence"]]
    if is_private(config.method):
        strength, text = stats.privacy_strength(config.epsilon, summary.get("noise_multiplier"))
        if strength != "ok":
            kind = "warn"
            sentences.insert(0, text)
    if ref_entry is not None:
        sentences.append(f"Non-private reference, same {ref_entry['steps']} steps and batch size "
                         f"{config.expected_batch_size}: {100 * ref_entry['accuracy']:.1f}% (measured on this server "
                         f"on {ref_entry['measured_at']} in {ref_entry['wall_time_s']:g} s, one run; {ref_note}).")
    else:
        sentences.append(f"Non-private reference: {ref_note}.")
    return message_html(" ".join(sentences), kind)


def write_settings(settings: AppSettings, summary: dict, history: pd.DataFrame) -> str:
    """Write the run's summary, config and history as strict JSON under the app's results folder; its path."""
    folder = Path(tempfile.mkdtemp(prefix="run-", dir=settings.results_dir()))
    path = folder / f"dualpriv-{summary['method']}-settings.json"
    record = public_summary(dict(summary, history=history.to_dict(orient="records"), privacy_unit=APP_PRIVACY_UNIT))
    path.write_text(json.dumps(strict_json(record), indent=2, default=str))
    return str(path)


def reference_to_measure(config: TrainConfig, compare: bool) -> bool:
    """Whether the job will train a non-private reference after the run (so its wait counts it): asked for, not
    cached, and not the run itself."""
    if not compare:
        return False
    ref_config = reference.reference_config(config)
    return not reference.same_settings(config, ref_config) and reference.ReferenceStore().get(ref_config) is None


def measure_reference(job: jobs.Job, settings: AppSettings, config: TrainConfig, result) -> tuple[dict | None, str]:
    """Worker side, after the user's run: the non-private reference of ``config``'s settings, from the cache, from
    the run itself (a non-private run with those settings), or measured now with its own progress line.
    Returns ``(entry or None, a note on where it comes from)``."""
    ref_config = reference.reference_config(config)
    store = reference.ReferenceStore()
    if reference.same_settings(config, ref_config) and not result.cancelled:
        return store.put(ref_config, result.summary()), "this run is that reference, now cached for these settings"
    cached = store.get(ref_config)
    if cached is not None:
        return cached, "cached for these settings"
    if job.stopping:
        return None, f"not measured ({job.reason})"
    text = "Measuring the non-private reference for these settings (once, then cached)"
    job.note(message_html(f"{text}…"))

    def on_row(row: dict) -> None:
        job.progress(row["steps"] + row["step"], job.units)
        job.note(progress_html(row["step"], row["steps"], f"{text}: step {row['step']}/{row['steps']}"))

    ref = train(ref_config, callback=jobs.stopping_callback(job, settings.time_limit, on_row))
    job.note(None)
    if ref.cancelled:
        return None, f"not measured ({job.reason or 'stopped'})"
    return store.put(ref_config, ref.summary()), f"measured live just now for {ref.wall_time_s:.0f} s, then cached"


def finetune(settings: AppSettings, method, epsilon, delta, budget_mode, token_prune_ratio, keep_tokens,
             token_strategy, grad_prune_ratio, steps, batch_size, lr, fusion_noise: bool = False,
             release_stats: bool = False, secure_mode: bool = False, compare: bool = False,
             session: str = "local") -> Iterator[dict]:
    """Generator: validate, then fine-tune in a worker thread, yielding dicts with keys ``status`` (HTML:
    message + progress bar), ``curve`` (plotly figure of loss and ε spent), ``verdict`` (HTML: the accuracy read
    against chance and, with ``compare``, the non-private reference of these settings), ``result`` (Markdown),
    ``settings`` (JSON-ready dict) and ``download`` (path of the settings JSON, or None); the last update of a
    finished run also has ``summary`` (``TrainResult.summary()``) and ``read`` (its verdict), for the session's runs
    table."""
    blank = dict(curve=None, verdict="", result="", settings=None, download=None)
    try:
        config = build_train_config(settings, method, epsilon, delta, budget_mode, token_prune_ratio, keep_tokens,
                                    token_strategy, grad_prune_ratio, steps, batch_size, lr, fusion_noise,
                                    release_stats, secure_mode)
        runs = 2 if reference_to_measure(config, compare) else 1   # a cached reference costs nothing: not counted
        job = jobs.claim(session, "fine-tune", units=config.steps * runs,
                         pace_key=f"fine-tune step of {settings.preset}")
    except InputError as err:
        yield dict(blank, status=warn(f"Not started: {err}"))
        return
    private = is_private(config.method)
    target = config.epsilon if private else None
    label = METHOD_LABELS[config.method] + (f", ε = {format_epsilon(config.epsilon)}" if private else "")
    rows: list[dict] = []

    def work(job: jobs.Job):
        job.exclude(model.prepare(settings, job.note))  # the warm start, on first use: its own progress line

        def on_row(row: dict) -> None:
            job.emit("row", dict(row))
            job.progress(row["step"], job.units)

        result = train(config, callback=jobs.stopping_callback(job, settings.time_limit, on_row))
        job.emit("result", result)  # shown at once; the reference (first time: a second run) follows
        ref = measure_reference(job, settings, config, result) if compare else (None, "off (not requested)")
        return result, ref

    shown: dict = {}  # the finished run, once its result is in: result, summary, settings file
    pending = ("coming: measured once per settings on this server, then cached…" if compare
               else "off (not requested)")

    def remember(result) -> None:
        if not shown:
            summary = result.summary()
            shown.update(result=result, summary=summary, path=write_settings(settings, summary, result.history),
                         read=reference.result_verdict(config, result))

    def finished(ref_entry, ref_note) -> dict:
        result, summary = shown["result"], shown["summary"]
        done = (f"Stopped early ({job.reason}) after {result.steps} steps" if result.cancelled
                else f"Finished {result.steps} steps")
        accuracy = "n/a" if math.isnan(result.accuracy) else f"{100 * result.accuracy:.1f}%"
        status = progress_html(result.steps, config.steps,
                               f"{done} in {result.wall_time_s:.1f} s · accuracy {accuracy}")
        return dict(status=status,
                    curve=training_curve_figure(result.history if len(result.history) else rows, target),
                    verdict=comparison_html(config, summary, ref_entry, ref_note, shown["read"]),
                    result=result_markdown(summary, job.reason), settings=strict_json(public_summary(summary)),
                    download=shown["path"])

    def on_event(kind: str, value) -> None:
        if kind == "row":
            rows.append(value)
        elif kind == "result":
            remember(value)

    def render() -> dict:
        if shown:  # the run is over: its result stays up while the reference is measured
            return finished(None, pending)
        if not rows:
            return dict(blank, status=message_html(f"{label}: loading the model and encoding the data "
                                                   f"({job.elapsed():.0f} s)…"))
        last = rows[-1]
        parts = [f"{label}: step {last['step']}/{last['steps']}"]
        if last.get("loss") is not None:
            parts.append(f"loss {last['loss']:.4f}")
        parts.append(f"ε spent {format_value(last['epsilon_spent'])} of {format_epsilon(target)}" if private
                     else "non-private")
        if job.stopping:
            parts.append("stopping…")
        return dict(blank, status=progress_html(last["step"], last["steps"], " · ".join(parts)),
                    curve=training_curve_figure(rows, target))

    outcome = yield from jobs.stream(
        job, work, render, blank=blank, on_event=on_event,
        first_status=message_html(f"Starting {label}: loading the model and encoding the data…"))
    failed = jobs.unfinished_html(outcome, job, "The run", settings_errors=True)  # e.g. too few records for the batch
    if failed:
        yield dict(blank, status=failed, curve=training_curve_figure(rows, target) if rows else None)
        return
    result, (ref_entry, ref_note) = outcome.value
    remember(result)
    yield dict(finished(ref_entry, ref_note), summary=shown["summary"], read=shown["read"])


def build(settings: AppSettings, runs_state: gr.State) -> list:
    """The Fine-tune tab (inside the app's ``gr.Blocks``); a finished run is added to ``runs_state`` (the
    session's runs). Returns its events that may train the warm start."""
    s = settings
    with gr.Tab("Fine-tune", id="finetune"):
        with gr.Row():
            with gr.Column(scale=2):
                # the actions first: Run and Cancel stay on the first screen, whatever the settings below
                with gr.Row():
                    run_button = gr.Button("Run", variant="primary", elem_id="ft-run")
                    cancel_button = gr.Button("Cancel", variant="stop", elem_id="ft-cancel")
                    plan_button = gr.Button("Plan (no training)", elem_id="ft-plan-button")
                method = gr.Radio(METHOD_CHOICES, value="dual-priv", label="Method", info=HELP["method"],
                                  elem_id="ft-method")
                with gr.Row():
                    epsilon = gr.Number(3.0, label="ε (epsilon)", info=HELP["epsilon"], elem_id="ft-epsilon")
                    delta = gr.Number(1e-5, label="δ (delta)", info=HELP["delta"], elem_id="ft-delta")
                token_strategy = gr.Dropdown([AUTO_STRATEGY] + sorted(STRATEGIES), value=AUTO_STRATEGY,
                                             label="Token strategy", info=HELP["token_strategy"],
                                             elem_id="ft-strategy")
                budget_mode, token_ratio, keep_tokens = budget_controls(("ft-budget-mode", "ft-token-ratio",
                                                                         "ft-keep"))
                with gr.Row():
                    grad_ratio = gr.Number(0.2, label="Gradient-update prune ratio",
                                           info=SHARED_HELP["grad_prune_ratio"], elem_id="ft-grad-ratio")
                    fusion_noise = gr.Checkbox(False, label="Matched fusion noise (heuristic)",
                                               info=HELP["fusion_noise"], elem_id="ft-fusion")
                with gr.Row():
                    release_stats = gr.Checkbox(False, label="Show the training loss (outside the DP guarantee)",
                                                info=HELP["release_stats"], elem_id="ft-release-stats")
                    secure_mode = gr.Checkbox(False, label="Secure noise (slower)", info=HELP["secure_mode"],
                                              elem_id="ft-secure")
                with gr.Row():
                    steps = gr.Number(min(DEFAULT_STEPS, s.max_steps), precision=0, label="Steps",
                                      info=HELP["steps"].format(max_steps=s.max_steps, time_limit=s.time_limit),
                                      elem_id="ft-steps")
                    batch_size = gr.Number(DEFAULT_BATCH_SIZE, precision=0, label="Batch size",
                                           info=SHARED_HELP["batch_size"], elem_id="ft-batch")
                    lr = gr.Textbox("", label="Learning rate", placeholder="method default", info=HELP["lr"],
                                    elem_id="ft-lr")
                compare = gr.Checkbox(True, label="Compare with a non-private reference (measured once, cached)",
                                      info=HELP["compare"], elem_id="ft-compare")
            with gr.Column(scale=3):
                status = gr.HTML(message_html("Choose the settings and press Run."), elem_id="ft-status")
                plan_box = gr.HTML(elem_id="ft-plan")
                curve = gr.Plot(label="ε spent per step (and the loss, where released)", elem_id="ft-curve")
                verdict = gr.HTML(elem_id="ft-verdict")
                result = gr.Markdown(elem_id="ft-result")
                with gr.Accordion("Run settings (JSON)", open=False):
                    settings_json = gr.JSON(label="Settings and result", elem_id="ft-settings")
                download = gr.File(label="Download the run settings (JSON)", interactive=False, height=90,
                                   elem_id="ft-download")
    outputs = dict(status=status, curve=curve, verdict=verdict, result=result, settings=settings_json,
                   download=download)

    def run(method_v, eps_v, delta_v, mode_v, ratio_v, keep_v, strategy_v, grad_v, steps_v, batch_v, lr_v,
            fusion_v, release_v, secure_v, compare_v, runs_v, request: gr.Request):
        for update in finetune(s, method_v, eps_v, delta_v, mode_v, ratio_v, keep_v, strategy_v, grad_v, steps_v,
                               batch_v, lr_v, fusion_v, release_v, secure_v, compare=compare_v,
                               session=jobs.session_id(request)):
            summary, read = update.pop("summary", None), update.pop("read", None)
            shown = routed(update, outputs)
            if summary is not None:
                runs_v = list(runs_v or [])
                shown[runs_state] = runs_v + [session_runs.run_from_summary(
                    summary, session_runs.next_number(runs_v), data=session_runs.embedded_data(s), read=read)]
            yield shown

    def plan_it(method_v, eps_v, delta_v, mode_v, ratio_v, keep_v, strategy_v, grad_v, steps_v, batch_v, lr_v,
                fusion_v, release_v, secure_v):
        return plan_for(s, method_v, eps_v, delta_v, mode_v, ratio_v, keep_v, strategy_v, grad_v, steps_v, batch_v,
                        lr_v, fusion_v, release_v, secure_v)

    plan_button.click(plan_it, [method, epsilon, delta, budget_mode, token_ratio, keep_tokens, token_strategy,
                                grad_ratio, steps, batch_size, lr, fusion_noise, release_stats, secure_mode],
                      plan_box, concurrency_limit=2, api_name="plan")
    run_event = jobs.wire_run_button(
        run_button, run, [method, epsilon, delta, budget_mode, token_ratio, keep_tokens, token_strategy, grad_ratio,
                          steps, batch_size, lr, fusion_noise, release_stats, secure_mode, compare, runs_state],
        list(outputs.values()) + [runs_state], api_name="finetune")
    cancel_button.click(jobs.cancel_from_page, None, status, concurrency_limit=None, show_progress="hidden",
                        api_name="cancel")
    return [run_event]
