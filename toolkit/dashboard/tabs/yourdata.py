"""The Your data tab: choose a data set (an uploaded zip of LLaVA JSON + images, or a path under the server's data
root), see it validated (records, answers, every refused record with its reason), fine-tune on it, download the
exported model and its model card, and ask the trained model about an image (its answer and the visual tokens it
used).

The data intake is :mod:`toolkit.dashboard.datasets`; training is ``toolkit.train.train`` on the accepted records
(exported by the run itself, ``TrainConfig.output_dir``: :mod:`toolkit.export`); answering is
:class:`toolkit.predict.Predictor` on the export.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import gradio as gr

from toolkit import stats
from toolkit.dashboard import datasets, jobs, model, reference
from toolkit.dashboard.common import (
    HELP as SHARED_HELP, METHOD_CHOICES, AppSettings, InputError, format_value, message_html,
    progress_html, routed, ui_batch_size, ui_choice, ui_number, ui_steps, warn,
)
from toolkit.dashboard.images import load_upload
from toolkit.dashboard.planning import plan_html
from toolkit.dashboard.tabs import runs as session_runs
from toolkit.data import VQADataset, VQARecord
from toolkit.export import EXPORT_FILE
from toolkit.model_card import loading_snippet
from toolkit.methods import method_names
from toolkit.predict import Predictor
from toolkit.train import TrainConfig, train
from toolkit.viz import token_overlay_figure
from toolkit.vocabulary import METHOD_LABELS, format_epsilon, is_private

MODEL_CARD = "README.md"
MAX_QUESTION_CHARS = 300
HELP = dict(
    zip="A .zip of one folder: train.json (or .jsonl) in the LLaVA conversation format, optionally test.json, and "
        "the images they name (paths relative to the JSON file). At most 500 MB unpacked.",
    path="A data folder or .json file relative to the server's data root (only when the app was launched with "
         "--data-root); nothing outside the root can be reached.",
    method="How to fine-tune (the same methods as the Fine-tune tab; Dual-Priv prunes 75% of the visual tokens).",
    epsilon="Privacy budget ε of the whole run (> 0); the privacy unit is shown after validation.",
    steps="Optimizer steps (at most the app's limit).",
    question="A question about the image, as in your data (e.g. 'which photo is this ?').",
)


def _refused_note(count: int) -> str:
    return f" {count} refused record(s) are left out." if count else ""


# What a new data set clears: the previous data set's model, its result, downloads and answers.
CLEARED = dict(train_status="", verdict="", result="", downloads=None, model=None, ask_status="", answer="",
               overlay=None, plan="")


def choose_data(settings: AppSettings, zip_file, server_path) -> dict:
    """Unpack (zip) or locate (server path) a data set and validate it. Returns ``status`` (HTML), ``summary``
    (Markdown), ``refused`` (DataFrame), ``data`` (the choice for the session's state, or None) and the
    :data:`CLEARED` values (the previous data set's results leave the page). A refused zip leaves no file."""
    blank = dict(CLEARED, summary="", refused=datasets.refused_table(None), data=None)
    folder = None
    try:
        if zip_file:
            folder = datasets.extract_zip(zip_file, settings.results_dir() / "uploads")
            name = Path(getattr(zip_file, "name", zip_file)).name
            choice = datasets.find_data_files(folder, f"uploaded zip {name!r}")
        elif server_path and str(server_path).strip():
            place = datasets.server_folder(settings.data_root, server_path)
            choice = datasets.find_data_files(place, f"data root path {str(server_path).strip()!r}")
        else:
            raise InputError("no data given: upload a zip (data zip) or type a path under the data root (data path)")
        validated = datasets.validate(choice)
    except InputError as err:
        datasets.discard(folder)
        return dict(blank, status=warn(f"Not validated: {err}"))
    accepted = len(validated.train_set)
    return dict(blank, status=message_html(f"Validated: {accepted} training record(s) accepted."
                                           f"{_refused_note(len(validated.refused))}",
                                           "warn" if validated.refused else "ok"),
                summary=datasets.summary_markdown(validated), refused=datasets.refused_table(validated),
                data=dict(choice.to_state(), records=accepted))


def build_config(settings: AppSettings, method, epsilon, steps, batch_size, output_dir: Path) -> TrainConfig:
    """The validated ``TrainConfig`` of a fine-tune on the user's data (exported to ``output_dir``)."""
    ui_choice("method", method, method_names())
    private = is_private(method)
    eps = ui_number("ε", epsilon, minimum=0, hint="smaller ε = stronger privacy") if private else math.inf
    config = TrainConfig(method=method, preset=settings.preset, warm_start_steps=settings.warm_start_steps,
                         epsilon=eps, steps=ui_steps(settings, steps), expected_batch_size=ui_batch_size(settings,
                                                                                                    batch_size),
                         output_dir=str(output_dir), progress=False)
    try:
        return config.resolved()
    except ValueError as err:
        raise InputError(str(err)) from None


def plan_for_data(settings: AppSettings, data_state, method, epsilon, steps, batch_size) -> str:
    """HTML: the plan (:mod:`toolkit.dashboard.planning`) of a fine-tune with these settings on the validated data,
    N being its accepted records; before any training, without the model."""
    try:
        choice = datasets.DataChoice.from_state(data_state)
        config = build_config(settings, method, epsilon, steps, batch_size, settings.results_dir() / "plan")
    except InputError as err:
        return warn(f"No plan yet: {err}")
    return plan_html(dataclasses.replace(config, output_dir=None, train_data=str(choice.train),
                                         dataset_size=data_state.get("records")))


def export_downloads(export_dir: Path) -> list[str]:
    """The export as one zip next to it, and its model card: the two files offered for download."""
    archive = shutil.make_archive(str(export_dir), "zip", root_dir=export_dir)
    return [archive, str(export_dir / MODEL_CARD)]


def result_markdown(summary: dict, export_dir: Path) -> str:
    private = is_private(summary["method"])
    accuracy = summary.get("accuracy")
    scored = accuracy is not None and not (isinstance(accuracy, float) and math.isnan(accuracy))
    rows = [
        ("accuracy (your evaluation file)", f"{100 * accuracy:.1f}%" if scored else "not scored (no test.json)"),
        ("ε spent / target", f"{format_value(summary['epsilon_spent'], 4)} / {format_epsilon(summary['epsilon'])} "
                             f"(δ = {summary['delta']:g})" if private else "∞ (non-private: no guarantee)"),
        ("privacy unit", summary.get("privacy_unit") or "–"),
        ("training records", str(summary.get("n_records", "–"))),
        ("visual tokens fed to the LLM", f"{summary['visual_tokens']} of {summary['visual_tokens_in']}"),
        ("steps", str(summary["steps"])),
        ("exported to", f"`{export_dir.name}` (adapter + model card; download below)"),
    ]
    lines = [f"### Your model: {METHOD_LABELS[summary['method']]}", "", "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    meta_file = export_dir / EXPORT_FILE
    if meta_file.is_file():  # the export's own snippet: what a practitioner runs without this toolkit
        lines += ["", "#### Load it with transformers alone (offline, no toolkit)", "", "```python",
                  f"out = '{export_dir.name}'  # the unzipped download",
                  loading_snippet(json.loads(meta_file.read_text())),
                  "```", "", "With the toolkit: `toolkit.export.load_trained(out)`, or "
                  "`python -m toolkit predict --model OUT --data FILE.json`."]
    return "\n".join(lines)


def train_on_data(settings: AppSettings, data_state, method, epsilon, steps, batch_size,
                  session: str = "local") -> Iterator[dict]:
    """Generator: fine-tune on the validated data (its accepted records), export the model, and yield ``status``,
    ``verdict`` (HTML: the accuracy against the evaluation file's baselines), ``result`` (Markdown, with the
    export's loading snippet), ``downloads`` (the export zip and the model card) and, at the end, ``model`` (the export
    folder, for the session's state) with ``summary``, ``read`` (its verdict) and ``data`` (the data set's name)
    for the session's runs table."""
    blank = dict(verdict="", result="", downloads=None)
    try:
        choice = datasets.DataChoice.from_state(data_state)
        validated = datasets.validate(choice)
        export_dir = Path(tempfile.mkdtemp(prefix=f"model-{time.strftime('%Y%m%d-%H%M%S')}-",
                                           dir=settings.results_dir())) / "export"
        config = build_config(settings, method, epsilon, steps, batch_size, export_dir)
        job = jobs.claim(session, "fine-tune on your data", units=config.steps,
                         pace_key=f"fine-tune step of {settings.preset}")
    except InputError as err:
        yield dict(blank, status=warn(f"Not started: {err}"))
        return
    eval_set = validated.eval_set if validated.eval_set is not None else VQADataset([], name="none")
    label = METHOD_LABELS[config.method] + (f", ε = {format_epsilon(config.epsilon)}" if config.private else "")
    rows: list[dict] = []

    def work(job: jobs.Job):
        job.exclude(model.prepare(settings, job.note))

        def on_row(row: dict) -> None:
            job.emit("row", dict(row))
            job.progress(row["step"], row["steps"])

        result = train(config, callback=jobs.stopping_callback(job, settings.time_limit, on_row),
                       train_set=validated.train_set, eval_set=eval_set)
        return result, export_downloads(export_dir)

    def render() -> dict:
        if not rows:
            return dict(blank, status=message_html(f"{label}: loading the model and encoding your images "
                                                   f"({job.elapsed():.0f} s)…"))
        last = rows[-1]
        return dict(blank, status=progress_html(last["step"], last["steps"],
                                                f"{label} on your data: step {last['step']}/{last['steps']} · "
                                                f"{job.elapsed():.0f} s"))

    outcome = yield from jobs.stream(job, work, render, blank=blank, on_event=lambda kind, row: rows.append(row),
                                     first_status=message_html(f"Starting {label} on your data…"))
    failed = jobs.unfinished_html(outcome, job, "The run", settings_errors=True)
    if failed:
        yield dict(blank, status=failed)
        return
    result, downloads = outcome.value
    summary = result.summary()
    done = f"Stopped early ({job.reason})" if result.cancelled else "Finished"
    read = reference.result_verdict(config, result, eval_set) if len(eval_set) else None
    yield dict(status=message_html(f"{done}: {result.steps} steps in {result.wall_time_s:.0f} s; the model is "
                                   "exported (download the adapter and its model card below).", "ok"),
               verdict=verdict_html(config, summary, read), result=result_markdown(summary, export_dir),
               downloads=downloads, model=str(export_dir), summary=summary, read=read, data=choice.source)


def verdict_html(config: TrainConfig, summary: dict, read: dict | None) -> str:
    """The accuracy on the user's evaluation file read against its chance and majority-class baselines (and
    whether ε still protects anyone), as one status line."""
    sentences, kind = [], "ok"
    if read is None:
        sentences.append("Not scored: the data set has no evaluation file (test.json), so nothing says whether the "
                         "model learned.")
        kind = "warn"
    else:
        sentences.append(read["sentence"])
        kind = read["kind"]
    if config.private:
        strength, text = stats.privacy_strength(config.epsilon, summary.get("noise_multiplier"))
        if strength != "ok":
            sentences.insert(0, text)
            kind = "warn"
    return message_html(" ".join(sentences), kind)


@functools.lru_cache(maxsize=2)
def predictor(export_dir: str) -> Predictor:
    """The exported model ready to answer (loaded once per export)."""
    return Predictor.from_folder(export_dir)


def ask(settings: AppSettings, export_dir, image, question) -> dict:
    """The trained model's answer to ``question`` about ``image`` (a PIL image or an uploaded file) and the visual
    tokens it used. Returns ``status``, ``answer`` (Markdown) and ``overlay`` (figure)."""
    blank = dict(answer="", overlay=None)
    try:
        if not export_dir or not (Path(export_dir) / EXPORT_FILE).is_file():
            raise InputError("no trained model yet: fine-tune on your data first")
        if image is None:
            raise InputError("image: upload an image to ask about")
        picture = image if hasattr(image, "convert") else load_upload(image)
        text = str(question or "").strip()
        if not text:
            raise InputError("question is empty: type a question about the image")
        if len(text) > MAX_QUESTION_CHARS:
            raise InputError(f"question is too long ({len(text)} characters; at most {MAX_QUESTION_CHARS})")
    except InputError as err:
        return dict(blank, status=warn(f"Not answered: {err}"))
    trained = predictor(str(export_dir))
    record = VQARecord("question", picture.convert("RGB"), text, None)
    answers = trained.answer(VQADataset([record], name="your question"), use_cache=False)
    bundle = trained.bundle
    pixels = bundle.preprocess([record.image])
    output = trained.pruner.from_pixels(bundle, pixels).example(0)
    overlay = token_overlay_figure(output, pixels[0], bundle.image_mean, bundle.image_std, show_scores=False,
                                   title=f"the {output.n_out} visual tokens the model used")
    mode = "ranking the saved answers" if answers.mode == "closed-set" else "generating freely"
    width, height = picture.size
    fitted = ("" if width == height else f" The {width}×{height} image was resized to the model's square "
              f"{bundle.image_size}×{bundle.image_size} input, as in training.")
    return dict(status=message_html("Answered.", "ok"),
                answer=f"**Answer: {answers.predictions[0]}** ({mode}; {output.n_out} of {output.n_in} visual "
                       f"tokens used).{fitted}", overlay=overlay)


def build(settings: AppSettings, runs_state: gr.State) -> list:
    """The Your data tab (inside the app's ``gr.Blocks``); a finished run is added to ``runs_state``. Returns its
    events that may train the warm start."""
    s = settings
    with gr.Tab("Your data", id="yourdata"):
        data_state, model_state = gr.State(None), gr.State(None)
        with gr.Row():
            with gr.Column(scale=2):
                gr.Markdown("**1. Your data set** (LLaVA JSON + images). Each training record must have its own "
                            "image: ε then protects any one image.")
                zip_file = gr.File(label="Data zip", file_count="single", file_types=[".zip"], type="filepath",
                                   elem_id="yd-zip")
                gr.Markdown(HELP["zip"])
                server_path = gr.Textbox(label="Or a data path on the server", info=HELP["path"],
                                         placeholder="e.g. photos/train.json" if s.data_root else
                                         "not available: the app has no --data-root",
                                         interactive=bool(s.data_root), elem_id="yd-path")
                validate_button = gr.Button("Validate", elem_id="yd-validate")
                gr.Markdown("**2. Fine-tune on it**")
                method = gr.Radio(METHOD_CHOICES, value="dual-priv", label="Method", info=HELP["method"],
                                  elem_id="yd-method")
                with gr.Row():
                    epsilon = gr.Number(3.0, label="ε (epsilon)", info=HELP["epsilon"], elem_id="yd-epsilon")
                    steps = gr.Number(min(100, s.max_steps), precision=0, label="Steps", info=HELP["steps"],
                                      elem_id="yd-steps")
                    batch = gr.Number(16, precision=0, label="Batch size", info=SHARED_HELP["batch_size"],
                                      elem_id="yd-batch")
                with gr.Row():
                    run_button = gr.Button("Fine-tune", variant="primary", elem_id="yd-run")
                    cancel_button = gr.Button("Cancel", variant="stop", elem_id="yd-cancel")
                    plan_button = gr.Button("Plan (no training)", elem_id="yd-plan-button")
                gr.Markdown("**3. Ask your model**")
                image = gr.Image(label="An image", type="pil", sources=["upload"], height=220, elem_id="yd-image")
                question = gr.Textbox(label="Question", info=HELP["question"], elem_id="yd-question")
                ask_button = gr.Button("Ask", elem_id="yd-ask")
            with gr.Column(scale=3):
                status = gr.HTML(message_html("Upload a zip or give a server path, then press Validate."),
                                 elem_id="yd-status")
                summary = gr.Markdown(elem_id="yd-summary")
                refused = gr.Dataframe(value=datasets.refused_table(None), label="Refused records", wrap=True,
                                       column_widths=["18%", "10%", "14%", "58%"],  # the reason is read in full
                                       interactive=False, elem_id="yd-refused")
                plan_box = gr.HTML(elem_id="yd-plan")
                train_status = gr.HTML(elem_id="yd-train-status")
                verdict = gr.HTML(elem_id="yd-verdict")
                result = gr.Markdown(elem_id="yd-result")
                downloads = gr.File(label="Your model: the export (zip) and its model card", file_count="multiple",
                                    interactive=False, elem_id="yd-downloads")
                ask_status = gr.HTML(elem_id="yd-ask-status")
                answer = gr.Markdown(elem_id="yd-answer")
                overlay = gr.Plot(label="The visual tokens the model used", elem_id="yd-overlay")
    train_outputs = dict(status=train_status, verdict=verdict, result=result, downloads=downloads, model=model_state)
    check_outputs = dict(status=status, summary=summary, refused=refused, data=data_state, train_status=train_status,
                         verdict=verdict, result=result, downloads=downloads, model=model_state,
                         ask_status=ask_status, answer=answer, overlay=overlay, plan=plan_box)
    ask_outputs = dict(status=ask_status, answer=answer, overlay=overlay)

    def check(zip_v, path_v):
        return routed(choose_data(s, zip_v, path_v), check_outputs)

    def run(data_v, method_v, eps_v, steps_v, batch_v, runs_v, request: gr.Request):
        for update in train_on_data(s, data_v, method_v, eps_v, steps_v, batch_v, session=jobs.session_id(request)):
            summary, read, data = update.pop("summary", None), update.pop("read", None), update.pop("data", None)
            shown = routed(update, train_outputs)
            if summary is not None:
                runs_v = list(runs_v or [])
                shown[runs_state] = runs_v + [session_runs.run_from_summary(
                    summary, session_runs.next_number(runs_v), "your-data", data, read, task=None)]
            yield shown

    def plan_it(data_v, method_v, eps_v, steps_v, batch_v):
        return plan_for_data(s, data_v, method_v, eps_v, steps_v, batch_v)

    def answer_it(model_v, image_v, question_v):
        return routed(ask(s, model_v, image_v, question_v), ask_outputs)

    plan_inputs = [data_state, method, epsilon, steps, batch]
    validate_button.click(check, [zip_file, server_path], list(check_outputs.values()), concurrency_limit=2,
                          api_name="validate_data").then(plan_it, plan_inputs, plan_box, api_name=False)
    # the plan before a run: σ, the noise against the signal and what measured runs like it did (no model)
    plan_button.click(plan_it, plan_inputs, plan_box, concurrency_limit=2, api_name="plan_your_data")
    # a new upload: the previous data set's results leave the page at once (Validate then fills it again)
    zip_file.upload(lambda: routed(CLEARED, check_outputs), None,
                    [check_outputs[k] for k in CLEARED], queue=False, show_progress="hidden", api_name=False)
    run_event = jobs.wire_run_button(run_button, run, [data_state, method, epsilon, steps, batch, runs_state],
                                     list(train_outputs.values()) + [runs_state], api_name="finetune_your_data")
    cancel_button.click(jobs.cancel_from_page, None, train_status, concurrency_limit=None, show_progress="hidden",
                        api_name=False)
    ask_button.click(answer_it, [model_state, image, question], list(ask_outputs.values()), concurrency_limit=1,
                     api_name="ask")
    return [run_event]
