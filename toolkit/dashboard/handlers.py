"""The dashboard's event handlers as plain functions over the public toolkit API (unit-testable without a browser).

Every handler validates its inputs first and, on a bad value, warns (``gr.Warning``) and returns a visible
message without starting anything. Long jobs (fine-tune, memory measurement, sweep) run the toolkit in a
worker thread and stream their progress; a fine-tune stops cleanly when the user cancels or the app's time
limit is reached (``train``'s ``callback`` returns False). Results are dicts keyed by output name; the UI
(:mod:`toolkit.dashboard.ui`) maps them onto components.

No training or pruning logic lives here: ``toolkit.train.train``, ``toolkit.tokens.make_pruner``,
``toolkit.viz``, ``toolkit.bench.run_bench`` and ``toolkit.experiments.run_sweep`` do the work.
"""
from __future__ import annotations

import contextvars
import functools
import html
import json
import math
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd

from toolkit.dashboard import figures

METHODS = ("non-private", "dp-sgd", "dual-priv", "dp-zo")
METHOD_LABELS = {"non-private": "Non-private", "dp-sgd": "DP-SGD", "dual-priv": "Dual-Priv", "dp-zo": "DP-ZO"}
AUTO_STRATEGY = "auto"
BUDGET_RATIO = "prune ratio"
BUDGET_KEEP = "kept tokens"
PRIVACY_UNIT = "one record = one source image of the embedded data"
MAX_UPLOAD_PIXELS = 40_000_000
SWEEP_COLUMNS = ("method", "epsilon", "accuracy")


class InputError(ValueError):
    """A value the user entered cannot be used; the message says which and why."""


@dataclass
class AppSettings:
    """What the app owner fixes on the command line (see ``app.py --help``)."""

    preset: str = "tiny"
    warm_start_steps: int | None = None   # None: the preset's public warm start; 0: none (tests)
    max_steps: int = 200                  # a job never runs more optimizer steps than this
    time_limit: float = 600.0             # seconds of fine-tuning before the run is stopped
    max_batch_size: int = 256
    task: str = "parity"
    train_limit: int | None = None        # private records (None: all 700); fewer = faster, more noise per ε
    eval_limit: int | None = None
    bench_isolate: bool = True            # measure each method in a fresh subprocess
    max_sweep_runs: int = 24
    output_dir: str | None = None         # where run settings (JSON) are written; default: a temp dir

    def __post_init__(self):
        if not (isinstance(self.max_steps, int) and self.max_steps >= 1):
            raise ValueError(f"max_steps must be an integer >= 1, got {self.max_steps!r}")
        if not (self.time_limit > 0):
            raise ValueError(f"time_limit must be > 0 seconds, got {self.time_limit!r}")
        if self.warm_start_steps is not None and self.warm_start_steps < 0:
            raise ValueError(f"warm_start_steps must be >= 0, got {self.warm_start_steps}")

    def results_dir(self) -> Path:
        root = Path(self.output_dir) if self.output_dir else Path(temp_root()) / "runs"
        root.mkdir(parents=True, exist_ok=True)
        return root


def temp_root() -> str:
    """The app's temporary directory (uploads and downloads): ``$GRADIO_TEMP_DIR`` or ``<tmp>/dualpriv-app``."""
    return os.environ.get("GRADIO_TEMP_DIR") or os.path.join(tempfile.gettempdir(), "dualpriv-app")


# ------------------------------------------------------------------------------------------------ messages

def message_html(text: str, kind: str = "info") -> str:
    """A status line; ``kind`` is info, ok, warn or error (errors are what a bad input shows)."""
    icon = {"error": "⚠️ ", "warn": "⚠️ ", "ok": "✅ ", "info": ""}[kind]
    return f'<div class="dp-msg dp-{kind}">{icon}{html.escape(text)}</div>'


def progress_html(done: int, total: int, text: str) -> str:
    pct = 0 if total <= 0 else max(0, min(100, round(100 * done / total)))
    return (f'<div class="dp-progress"><progress value="{done}" max="{max(total, 1)}"></progress> '
            f'<span>{pct}% · {html.escape(text)}</span></div>')


def _warn(text: str) -> str:
    """Show a toast (gr.Warning; outside a Gradio request it becomes a Python warning) and return the line."""
    import gradio as gr

    gr.Warning(text)
    return message_html(text, "error")


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            return "∞"
        return f"{value:.{digits}g}"
    return str(value)


def json_safe(value):
    """Replace inf/nan (invalid in strict JSON) by strings, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------ validation

def _number(name: str, value, *, integer: bool = False) -> float | int:
    if value is None or isinstance(value, bool) or value == "":
        raise InputError(f"{name} is empty: enter a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(number):
        raise InputError(f"{name} must be a number, got NaN")
    if integer:
        if not math.isfinite(number) or number != int(number):
            raise InputError(f"{name} must be a whole number, got {value!r}")
        return int(number)
    return number


def _ratio(name: str, value, what: str) -> float:
    ratio = _number(name, value)
    if not 0 <= ratio < 1:
        raise InputError(f"{name} must be in [0, 1) ({what}), got {ratio:g}")
    return ratio


def _steps(value, settings: AppSettings, minimum: int = 1, name: str = "steps") -> int:
    steps = _number(name, value, integer=True)
    if steps < minimum:
        raise InputError(f"{name} must be at least {minimum}, got {steps}")
    if steps > settings.max_steps:
        raise InputError(f"{name} is limited to {settings.max_steps} in this app (--max-steps), got {steps}")
    return steps


def _batch(value, settings: AppSettings) -> int:
    batch = _number("batch size", value, integer=True)
    if not 1 <= batch <= settings.max_batch_size:
        raise InputError(f"batch size must be between 1 and {settings.max_batch_size}, got {batch}")
    return batch


@functools.lru_cache(maxsize=4)
def geometry_bundle(preset: str):
    """An untrained model of ``preset`` (cheap): only its geometry is used, to validate token budgets."""
    from toolkit.models import build_model

    return build_model(preset)


def token_budget(settings: AppSettings, strategy: str, budget_mode: str, token_prune_ratio, keep_tokens) -> dict:
    """Validate a token strategy and budget against the preset's tower; returns make_pruner's keywords."""
    from toolkit.tokens import STRATEGIES, make_pruner

    if strategy not in STRATEGIES:
        raise InputError(f"unknown token strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    if strategy == "none":
        return dict(keep=None, token_prune_ratio=None)
    if budget_mode == BUDGET_KEEP:
        budget = dict(keep=_number("kept tokens", keep_tokens, integer=True), token_prune_ratio=None)
    elif budget_mode == BUDGET_RATIO:
        ratio = _ratio("token prune ratio", token_prune_ratio, "the fraction of visual tokens removed")
        budget = dict(keep=None, token_prune_ratio=ratio)
    else:
        raise InputError(f"choose a token budget: {BUDGET_RATIO!r} or {BUDGET_KEEP!r}")
    try:  # the pruner's own checks: budget range, grid factoring, [CLS] needed, ...
        make_pruner(strategy, geometry_bundle(settings.preset), **budget)
    except ValueError as err:
        raise InputError(str(err)) from None
    return budget


def build_train_config(settings: AppSettings, method, epsilon, delta, budget_mode, token_prune_ratio, keep_tokens,
                       token_strategy, grad_prune_ratio, steps, batch_size, lr, fusion_noise: bool = False):
    """The validated ``TrainConfig`` of a fine-tune from the UI's values, or :class:`InputError`.

    Token pruning and update pruning apply to Dual-Priv; the baselines keep every visual token and every
    gradient coordinate unless a token strategy is chosen explicitly (an ablation).
    """
    from toolkit.train import TrainConfig

    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {METHODS}")
    private = method != "non-private"
    eps = _number("ε", epsilon) if private else math.inf
    if private and not eps > 0:
        raise InputError(f"ε must be > 0 (smaller ε = stronger privacy), got {eps:g}")
    dlt = _number("δ", delta) if private else 1e-5
    if private and not 0 < dlt < 1:
        raise InputError(f"δ must be in (0, 1) (e.g. 1e-5, below 1/number of records), got {dlt:g}")
    n_steps = _steps(steps, settings)
    batch = _batch(batch_size, settings)
    rate = None
    if lr is not None and str(lr).strip() != "":
        rate = _number("learning rate", str(lr).strip())
        if not (rate > 0 and math.isfinite(rate)):
            raise InputError(f"learning rate must be > 0, got {rate:g}")
    grad_ratio = _ratio("gradient prune ratio", grad_prune_ratio, "the fraction of noisy-gradient coordinates zeroed")
    strategy = token_strategy or AUTO_STRATEGY
    if strategy == AUTO_STRATEGY:
        strategy = "dual-priv" if method == "dual-priv" else "none"
    budget = token_budget(settings, strategy, budget_mode, token_prune_ratio, keep_tokens)
    config = TrainConfig(
        method=method, preset=settings.preset, warm_start_steps=settings.warm_start_steps, task=settings.task,
        train_limit=settings.train_limit, eval_limit=settings.eval_limit, epsilon=eps, delta=dlt, steps=n_steps,
        expected_batch_size=batch, lr=rate, token_strategy=strategy, keep_tokens=budget["keep"],
        token_prune_ratio=budget["token_prune_ratio"], grad_prune_ratio=grad_ratio if method == "dual-priv" else 0.0,
        fusion_noise_std="matched" if (fusion_noise and private and strategy != "none") else None, progress=False,
    )
    try:
        return config.resolved()
    except ValueError as err:
        raise InputError(str(err)) from None


# ------------------------------------------------------------------------------------------------ the model

_BUNDLES: dict = {}
_BUNDLE_LOCK = threading.Lock()


def warm_start_cached(settings: AppSettings) -> bool:
    """Whether the preset's public warm start is already on disk (or none is used)."""
    from toolkit.warmstart import DEFAULT_STEPS, warm_start_path

    if settings.warm_start_steps == 0:
        return True
    steps = settings.warm_start_steps
    if steps is None:
        steps = DEFAULT_STEPS.get(settings.preset, 600)
    return (warm_start_path(settings.preset, 0, steps) / "toolkit_bundle.json").is_file()


def warm_start_note(settings: AppSettings) -> str:
    if settings.warm_start_steps == 0:
        return f"model: preset {settings.preset!r}, no public warm start (untrained start)"
    state = "cached" if warm_start_cached(settings) else "not trained yet; the first job trains it in a few minutes"
    return f"model: preset {settings.preset!r} with its public warm start ({state})"


def warm_start_bar() -> tuple[int, int] | None:
    """(steps done, total) of a public warm start being trained in this process, read from its tqdm bar
    (``toolkit.warmstart.warm_start`` takes no progress callback); None when none is running."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    for bar in list(getattr(tqdm, "_instances", ())):
        if str(getattr(bar, "desc", "")).startswith("warm start") and getattr(bar, "total", None):
            return int(bar.n), int(bar.total)
    return None


def warm_start_status(settings: AppSettings, elapsed: float) -> str:
    text = f"Preparing the public warm start of {settings.preset!r} (first use only, then cached)"
    bar = warm_start_bar()
    if bar is None:
        return message_html(f"{text}: {elapsed:.0f} s elapsed…")
    done, total = bar
    return progress_html(done, total, f"{text}: step {done}/{total} · {elapsed:.0f} s")


def get_bundle(settings: AppSettings):
    """The (warm-started) model of the app's preset, loaded once; the first call may train the warm start.

    The tower is frozen and only read here (tokens view); every fine-tune loads its own copy in ``train``.
    """
    from toolkit.train import TrainConfig, load_bundle

    key = (settings.preset, settings.warm_start_steps)
    with _BUNDLE_LOCK:
        if key not in _BUNDLES:
            config = TrainConfig(preset=settings.preset, warm_start_steps=settings.warm_start_steps, steps=1,
                                 progress=True)
            _BUNDLES[key] = load_bundle(config)
        return _BUNDLES[key]


# ------------------------------------------------------------------------------------------------ jobs

class Job:
    """A running job of one browser session; ``cancel`` asks it to stop at the next step."""

    def __init__(self, session: str, kind: str):
        self.session, self.kind = session, kind
        self.stop = threading.Event()
        self.reason: str | None = None
        self.started = time.monotonic()

    def cancel(self, reason: str) -> None:
        if not self.stop.is_set():
            self.reason = reason
            self.stop.set()


_JOBS: dict[str, Job] = {}
_JOBS_LOCK = threading.Lock()
_TRAIN_LOCK = threading.Lock()  # one training in this process at a time, even if an abandoned run is finishing


def _register(session: str, kind: str) -> Job:
    job = Job(session, kind)
    with _JOBS_LOCK:
        _JOBS[session] = job
    return job


def _unregister(job: Job) -> None:
    with _JOBS_LOCK:
        if _JOBS.get(job.session) is job:
            del _JOBS[job.session]


def running_job(session: str = "local") -> Job | None:
    with _JOBS_LOCK:
        return _JOBS.get(session)


def cancel(session: str = "local") -> str:
    """Ask this session's running job (fine-tune or sweep) to stop after the current step; it still reports."""
    job = running_job(session)
    if job is None:
        return message_html("Nothing to cancel: no job of yours is running.", "info")
    job.cancel("cancelled by the user")
    return message_html("Cancelling: the run stops after the current step and reports its partial result.", "warn")


def _in_thread(fn: Callable, *args) -> queue.Queue:
    """Run ``fn(emit, *args)`` in a daemon thread (with this context, so Gradio tracks its tqdm bars);
    events arrive on the returned queue, ending with ("done", value) or ("error", exception)."""
    events: queue.Queue = queue.Queue()
    context = contextvars.copy_context()

    def target():
        try:
            events.put(("done", context.run(fn, events.put, *args)))
        except BaseException as err:  # reported to the user by the handler
            events.put(("error", err))

    threading.Thread(target=target, daemon=True, name=f"dashboard-{getattr(fn, '__name__', 'job')}").start()
    return events


def _drain(events: queue.Queue, timeout: float) -> list:
    """Every event available now (waiting up to ``timeout`` for the first)."""
    try:
        out = [events.get(timeout=timeout)]
    except queue.Empty:
        return []
    while not events.empty():  # one consumer: what empty() sees cannot be taken by anyone else
        out.append(events.get_nowait())
    return out


# ------------------------------------------------------------------------------------------------ fine-tune

def _result_markdown(summary: dict, reason: str | None) -> str:
    private = summary["method"] != "non-private"
    eps_target = summary["epsilon"]
    lines = [f"### Result: {METHOD_LABELS[summary['method']]}"]
    if summary.get("cancelled"):
        lines.append(f"**Stopped early ({reason or 'cancelled'})** after {summary['steps']} of "
                     f"{summary['config']['steps']} steps; the model was still evaluated.")
    accuracy = summary["accuracy"]
    rows = [
        ("accuracy (held-out test split)", "n/a" if math.isnan(accuracy) else f"{100 * accuracy:.1f}%"),
        ("ε spent / target", f"{_fmt(summary['epsilon_spent'], 4)} / {_fmt(eps_target)} (δ = {summary['delta']:g})"
         if private else "∞ (non-private: no guarantee)"),
        ("privacy unit", PRIVACY_UNIT if private else "–"),
        ("noise multiplier σ", _fmt(summary["noise_multiplier"])),
        ("peak memory", f"{_fmt(summary['peak_memory_mb'], 4)} MB ({summary['memory_method']})"),
        ("step time (median)", f"{_fmt(summary['step_time_s'])} s"),
        ("visual tokens fed to the LLM", f"{summary['visual_tokens']} of {summary['visual_tokens_in']} "
                                         f"({summary['token_strategy']})"),
        ("gradient prune ratio", _fmt(summary["grad_prune_ratio"])),
        ("steps", str(summary["steps"])),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
    ]
    if summary.get("fusion_noise_std"):
        rows.append(("fusion noise σ (heuristic, outside the DP guarantee)", _fmt(summary["fusion_noise_std"])))
    lines += ["", "| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def _write_settings(settings: AppSettings, summary: dict, history: pd.DataFrame) -> str:
    folder = Path(tempfile.mkdtemp(prefix="run-", dir=settings.results_dir()))
    path = folder / f"dualpriv-{summary['method']}-settings.json"
    record = dict(summary, history=history.to_dict(orient="records"), privacy_unit=PRIVACY_UNIT)
    path.write_text(json.dumps(json_safe(record), indent=2, default=str))
    return str(path)


def _finetune_job(emit, settings: AppSettings, config, job: Job):
    """Worker: prepare the model (warm start on first use), then train with a callback that streams every
    history row and stops on cancel or at the time limit."""
    from toolkit.train import train

    if not warm_start_cached(settings):
        emit(("phase", "warm start"))
        get_bundle(settings)  # trains and caches the public warm start (tqdm tracked by Gradio)
    with _TRAIN_LOCK:
        emit(("phase", "train"))
        started = time.monotonic()
        return train(config, callback=_stopping_callback(emit, settings, job, started))


def _stopping_callback(emit, settings: AppSettings, job: Job, started: float):
    """``train``'s callback: stream the row; return False (stop cleanly) on cancel or past the time limit."""

    def callback(row: dict):
        emit(("row", dict(row)))
        if time.monotonic() - started > settings.time_limit:
            job.cancel(f"time limit of {settings.time_limit:g} s reached")
        return False if job.stop.is_set() else None

    return callback


def _check_idle(session: str) -> None:
    """One job per session at a time: refuse a second before anything starts."""
    if running_job(session) is not None:
        raise InputError("a job of yours is already running (cancel it first).")


def finetune(settings: AppSettings, method, epsilon, delta, budget_mode, token_prune_ratio, keep_tokens,
             token_strategy, grad_prune_ratio, steps, batch_size, lr, fusion_noise: bool = False,
             session: str = "local") -> Iterator[dict]:
    """Generator: validate, then fine-tune in a worker thread, yielding dicts with keys ``status`` (HTML:
    message + progress bar), ``curve`` (plotly figure of loss and ε spent), ``result`` (Markdown),
    ``settings`` (JSON-ready dict) and ``download`` (path of the settings JSON, or None)."""
    empty = dict(curve=None, result="", settings=None, download=None)
    try:
        config = build_train_config(settings, method, epsilon, delta, budget_mode, token_prune_ratio, keep_tokens,
                                    token_strategy, grad_prune_ratio, steps, batch_size, lr, fusion_noise)
        _check_idle(session)
    except InputError as err:
        yield dict(empty, status=_warn(f"Not started: {err}"))
        return
    job = _register(session, "finetune")
    private = config.method != "non-private"
    target = config.epsilon if private else None
    rows: list[dict] = []
    try:
        label = f"{METHOD_LABELS[config.method]}" + (f", ε = {config.epsilon:g}" if private else "")
        yield dict(empty, status=message_html(f"Starting {label}: loading the model and encoding the data…"))
        events = _in_thread(_finetune_job, settings, config, job)
        phase, last_yield, started = "start", 0.0, time.monotonic()
        while True:
            batch = _drain(events, timeout=0.5)
            finished = None
            for kind, value in batch:
                if kind == "row":
                    rows.append(value)
                elif kind == "phase":
                    phase = value
                else:
                    finished = (kind, value)
            now = time.monotonic()
            if finished is None and now - last_yield < 0.25:
                continue
            last_yield = now
            if finished is not None:
                break
            if phase == "warm start":
                status = warm_start_status(settings, now - started)
            elif rows:
                last = rows[-1]
                eps_text = f"ε spent {last['epsilon_spent']:.3g} of {target:g}" if private else "non-private"
                text = f"{label}: step {last['step']}/{last['steps']} · loss {last['loss']:.4f} · {eps_text}"
                if job.stop.is_set():
                    text += " · stopping…"
                status = progress_html(last["step"], last["steps"], text)
            else:
                status = message_html(f"{label}: loading the model and encoding the data "
                                      f"({now - started:.0f} s)…")
            yield dict(empty, status=status, curve=figures.training_curve_figure(rows, target) if rows else None)
        kind, value = finished
        if kind == "error":
            text = f"The run failed: {type(value).__name__}: {value}"
            if isinstance(value, ValueError):
                import gradio as gr

                gr.Warning(text)
            yield dict(empty, status=message_html(text, "error"),
                       curve=figures.training_curve_figure(rows, target) if rows else None)
            return
        result = value
        summary = result.summary()
        path = _write_settings(settings, summary, result.history)
        history_rows = result.history.to_dict(orient="records") or rows
        done = (f"Stopped early ({job.reason}) after {result.steps} steps" if result.cancelled
                else f"Finished {result.steps} steps")
        acc = "n/a" if math.isnan(result.accuracy) else f"{100 * result.accuracy:.1f}%"
        status = progress_html(result.steps, config.steps, f"{done} in {result.wall_time_s:.1f} s · accuracy {acc}")
        yield dict(status=status, curve=figures.training_curve_figure(history_rows, target),
                   result=_result_markdown(summary, job.reason), settings=json_safe(summary),
                   download=path)
    finally:
        job.cancel("the page was closed")  # stops the worker if the generator is abandoned
        _unregister(job)


# ------------------------------------------------------------------------------------------------ tokens

def load_upload(path) -> "Image.Image":  # noqa: F821
    """An uploaded file as an RGB PIL image, or :class:`InputError` (not an image, unreadable, too large)."""
    from PIL import Image, UnidentifiedImageError

    path = getattr(path, "name", path)
    if not path or not Path(path).is_file():
        raise InputError("the uploaded file is missing: upload it again")
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_UPLOAD_PIXELS:
                raise InputError(f"the uploaded image is too large ({width}x{height} pixels)")
            img.load()
            return img.convert("RGB")
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        name = Path(path).name
        raise InputError(f"the uploaded file {name!r} is not an image that can be read "
                         f"({type(err).__name__})") from None


def tokens_view(settings: AppSettings, example, upload, strategy, budget_mode, token_prune_ratio,
                keep_tokens) -> dict:
    """Prune one image's visual tokens and draw the decision. Returns ``overlay`` and ``histogram`` (plotly
    figures), ``counts`` (dict) and ``status`` (HTML); on a bad input the figures are None."""
    from toolkit.data import preprocess_images
    from toolkit.tokens import make_pruner
    from toolkit.viz import spatial_histogram_figure, token_overlay_figure

    empty = dict(overlay=None, histogram=None, counts=None)
    try:
        budget = token_budget(settings, strategy, budget_mode, token_prune_ratio, keep_tokens)
        if upload:
            image = load_upload(upload)
            source = f"uploaded image {Path(getattr(upload, 'name', upload)).name!r}"
        else:
            bundle_size = geometry_bundle(settings.preset).image_size
            index = _number("example", example, integer=True)
            dataset = _test_images(bundle_size)
            if not 0 <= index < len(dataset):
                raise InputError(f"example must be between 0 and {len(dataset) - 1}, got {index}")
            record = dataset[index]
            image = record.image
            source = f"test example {index} (digit {record.answer})"
    except InputError as err:
        return dict(empty, status=_warn(f"Nothing shown: {err}"))
    bundle = get_bundle(settings)
    pruner = make_pruner(strategy, bundle, **budget)
    pixels = preprocess_images([image], bundle.image_size, bundle.image_mean, bundle.image_std)
    output = pruner.from_pixels(bundle, pixels).example(0)
    info = output.to_dict(0)
    counts = dict(source=source, strategy=strategy, patches_in=info["n_in"], tokens_out=info["n_out"],
                  cls=info["cls_slot"] is not None, kept=info["n_kept"], fused=info["n_contextual"],
                  dropped=info["n_dropped"], scoring_layer=info["layer"])
    overlay = token_overlay_figure(output, pixels[0], bundle.image_mean, bundle.image_std)
    histogram = spatial_histogram_figure(output)
    text = (f"{source}: {info['n_in']} patches -> {info['n_out']} visual tokens "
            f"({'[CLS] + ' if counts['cls'] else ''}{info['n_kept']} kept, {info['n_contextual']} fused, "
            f"{info['n_dropped']} dropped)")
    return dict(overlay=overlay, histogram=histogram, counts=counts, status=message_html(text, "ok"))


@functools.lru_cache(maxsize=2)
def _test_images(image_size: int):
    from toolkit.data import make_vqa

    return make_vqa("digit", "test", image_size=image_size)


def example_count(settings: AppSettings) -> int:
    return len(_test_images(geometry_bundle(settings.preset).image_size))


# ------------------------------------------------------------------------------------------------ memory

def memory_note(table: pd.DataFrame) -> str:
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


def _bench_job(emit, kwargs: dict):
    from toolkit.bench import run_bench

    return run_bench(progress=lambda method, i, n: emit(("method", (method, i, n))), **kwargs)


def memory(settings: AppSettings, methods, batch_size, steps, token_strategy, budget_mode, token_prune_ratio,
           keep_tokens, grad_prune_ratio) -> Iterator[dict]:
    """Generator: side-by-side peak memory of the chosen methods (``toolkit.bench.run_bench``). Yields dicts
    with ``status`` (HTML), ``figure`` (bar chart), ``table`` (DataFrame with ratio columns) and ``note``."""
    empty = dict(figure=None, table=None, note="")
    try:
        chosen = [m for m in METHODS if m in (methods or [])]
        unknown = sorted(set(methods or []) - set(METHODS))
        if unknown:
            raise InputError(f"unknown method(s) {unknown}")
        if not chosen:
            raise InputError("choose at least one method to measure")
        batch = _batch(batch_size, settings)
        n_steps = _steps(steps, settings, minimum=3, name="measured steps")
        strategy = token_strategy if token_strategy not in (None, AUTO_STRATEGY) else "dual-priv"
        budget = token_budget(settings, strategy, budget_mode, token_prune_ratio, keep_tokens)
        grad_ratio = _ratio("gradient prune ratio", grad_prune_ratio,
                            "the fraction of noisy-gradient coordinates zeroed")
    except InputError as err:
        yield dict(empty, status=_warn(f"Not started: {err}"))
        return
    kwargs = dict(methods=tuple(chosen), preset=settings.preset, batch_size=batch, steps=n_steps,
                  token_strategy=strategy, keep_tokens=budget["keep"], token_prune_ratio=budget["token_prune_ratio"],
                  grad_prune_ratio=grad_ratio, isolate=settings.bench_isolate)
    where = "each in a fresh subprocess" if settings.bench_isolate else "in the app's process"
    yield dict(empty, status=message_html(f"Measuring {', '.join(chosen)} ({where})…"))
    events = _in_thread(_bench_job, kwargs)
    started = time.monotonic()
    current = None
    while True:
        batch_events = _drain(events, timeout=1.0)
        finished = None
        for kind, value in batch_events:
            if kind == "method":
                current = value
            elif kind in ("done", "error"):
                finished = (kind, value)
        if finished is not None:
            break
        if current is not None:
            method, i, n = current
            text = f"measuring {method} ({i + 1}/{n}, {where}) · {time.monotonic() - started:.0f} s"
            yield dict(empty, status=progress_html(i, n, text))
    kind, value = finished
    if kind == "error":
        yield dict(empty, status=message_html(f"The measurement failed: {type(value).__name__}: {value}", "error"))
        return
    table = value
    shown = [c for c in ("method", "visual_tokens", "peak_memory_mb", "step_time_s", "memory_vs_dp_sgd",
                         "memory_vs_dp_zo", "time_vs_dp_sgd", "memory_method", "device") if c in table.columns]
    yield dict(status=progress_html(len(chosen), len(chosen), f"measured {len(chosen)} method(s) in "
                                                                f"{time.monotonic() - started:.0f} s"),
               figure=figures.memory_figure(table), table=table[shown], note=memory_note(table))


# ------------------------------------------------------------------------------------------------ privacy-utility

def parse_epsilons(text) -> list[float]:
    """'0.5, 1, 3, inf' -> [0.5, 1.0, 3.0, inf]; every ε must be > 0."""
    values = []
    for part in str(text or "").replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        if part.lower() in ("inf", "infinity", "∞"):
            values.append(math.inf)
            continue
        try:
            value = float(part)
        except ValueError:
            raise InputError(f"ε list: {part!r} is not a number") from None
        if not value > 0 or math.isnan(value):
            raise InputError(f"every ε must be > 0, got {part}")
        values.append(value)
    if not values:
        raise InputError("give at least one ε, e.g. '1, 3, 8'")
    return values


def check_sweep_table(table: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in SWEEP_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(f"the sweep table lacks column(s) {missing}; a toolkit sweep CSV has "
                         f"method, epsilon, seed, accuracy, ...")
    if table.empty:
        raise InputError("the sweep table has no rows")
    table = table.copy()
    for column in ("epsilon", "accuracy"):
        table[column] = pd.to_numeric(table[column].replace({"inf": math.inf, "∞": math.inf}), errors="coerce")
        if table[column].isna().any():
            raise InputError(f"column {column!r} holds values that are not numbers")
    return table


def load_sweep_csv(path) -> dict:
    """Read a sweep CSV (as written by the toolkit) and draw its privacy–utility curve.
    Returns ``figure``, ``table`` and ``status``."""
    path = getattr(path, "name", path)
    if not path:
        return dict(figure=None, table=None, status=_warn("Nothing loaded: upload a sweep CSV first."))
    try:
        try:
            table = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as err:
            raise InputError(f"the file is not a readable CSV ({type(err).__name__})") from None
        table = check_sweep_table(table)
    except InputError as err:
        return dict(figure=None, table=None, status=_warn(f"Nothing loaded: {err}"))
    return dict(figure=figures.privacy_utility_figure(table), table=_sweep_view(table),
                status=message_html(f"Loaded {len(table)} runs of {table['method'].nunique()} method(s).", "ok"))


def _sweep_job(emit, sweep_obj, out_dir: str, settings: AppSettings, job: Job):
    """Worker: train the sweep's cells one by one; stop after a cell (or mid-run) on cancel or time limit."""
    from toolkit.experiments import run_sweep

    if not warm_start_cached(settings):
        emit(("phase", "warm start"))
        get_bundle(settings)
    started = time.monotonic()

    def on_cell(event: dict):
        emit(("cell", event))
        return False if job.stop.is_set() else None

    def on_step(row: dict):
        if time.monotonic() - started > settings.time_limit:
            job.cancel(f"time limit of {settings.time_limit:g} s reached")
        return False if job.stop.is_set() else None

    with _TRAIN_LOCK:
        emit(("phase", "train"))
        return run_sweep(sweep_obj, out_dir, progress=False, callback=on_cell, step_callback=on_step)


def sweep(settings: AppSettings, methods, epsilons, seeds, steps, batch_size,
          session: str = "local") -> Iterator[dict]:
    """Generator: a small privacy–utility sweep with ``toolkit.experiments.run_sweep`` (method x ε x seeds);
    yields ``status``, ``figure``, ``table`` and ``download`` (the sweep CSV the toolkit wrote)."""
    from toolkit.experiments import Sweep, plan_sweep

    empty = dict(figure=None, table=None, download=None)
    try:
        chosen = [m for m in METHODS if m in (methods or [])]
        if not chosen:
            raise InputError("choose at least one method")
        eps = parse_epsilons(epsilons)
        n_seeds = _number("seeds", seeds, integer=True)
        if not 1 <= n_seeds <= 5:
            raise InputError(f"seeds must be between 1 and 5, got {n_seeds}")
        n_steps = _steps(steps, settings)
        batch = _batch(batch_size, settings)
        base = dict(preset=settings.preset, warm_start_steps=settings.warm_start_steps, task=settings.task,
                    train_limit=settings.train_limit, eval_limit=settings.eval_limit, steps=n_steps,
                    expected_batch_size=batch, progress=False)
        sweep_obj = Sweep(f"dashboard-{time.strftime('%Y%m%d-%H%M%S')}", base=base,
                          grid=dict(method=chosen, epsilon=eps), seeds=list(range(n_seeds)),
                          description="privacy-utility sweep from the dashboard")
        try:
            plan = plan_sweep(sweep_obj)
        except ValueError as err:
            raise InputError(str(err)) from None
        runs = len(plan.cells)
        if runs > settings.max_sweep_runs:
            raise InputError(f"this sweep has {runs} runs; the app allows {settings.max_sweep_runs} "
                             "(choose fewer methods, ε values or seeds)")
        _check_idle(session)
    except InputError as err:
        yield dict(empty, status=_warn(f"Not started: {err}"))
        return
    job = _register(session, "sweep")
    out_dir = tempfile.mkdtemp(prefix="sweep-", dir=settings.results_dir())
    started = time.monotonic()
    try:
        yield dict(empty, status=message_html(f"Running {runs} fine-tunes of {n_steps} steps…"))
        events = _in_thread(_sweep_job, sweep_obj, out_dir, settings, job)
        cells_done, phase, finished = 0, "start", None
        while finished is None:
            for kind, value in _drain(events, timeout=1.0):
                if kind == "cell":
                    cells_done = value["index"] + 1
                elif kind == "phase":
                    phase = value
                else:
                    finished = (kind, value)
            if finished is None:
                elapsed = time.monotonic() - started
                if phase == "warm start":
                    status = warm_start_status(settings, elapsed)
                else:
                    text = f"sweep: {cells_done}/{runs} runs done · {elapsed:.0f} s"
                    status = progress_html(cells_done, runs, text + (" · stopping…" if job.stop.is_set() else ""))
                yield dict(empty, status=status)
        kind, value = finished
        if kind == "error":
            yield dict(empty, status=message_html(f"The sweep failed: {type(value).__name__}: {value}", "error"))
            return
        table = value
        csv_path = Path(out_dir) / f"{sweep_obj.name}.csv"
        if table.empty:
            yield dict(empty, status=message_html(f"No run finished ({job.reason or 'stopped'}).", "warn"))
            return
        stopped = f" Stopped early ({job.reason})." if job.reason else ""
        yield dict(status=message_html(f"Sweep done: {len(table)} of {runs} runs in "
                                       f"{time.monotonic() - started:.0f} s.{stopped}", "ok"),
                   figure=figures.privacy_utility_figure(check_sweep_table(table)), table=_sweep_view(table),
                   download=str(csv_path) if csv_path.is_file() else None)
    finally:
        job.cancel("the page was closed")
        _unregister(job)


def _sweep_view(table: pd.DataFrame) -> pd.DataFrame:
    """The columns worth reading in the app (the CSV download has all of them)."""
    shown = [c for c in ("method", "epsilon", "seed", "accuracy", "epsilon_spent", "steps_done", "visual_tokens",
                         "grad_prune_ratio", "peak_memory_mb", "wall_time_s") if c in table.columns]
    view = (table[shown] if shown else table).copy()
    for column in ("epsilon", "epsilon_spent"):  # ∞ (non-private) would show as an empty cell
        if column in view:
            values = list(view[column])
            if any(isinstance(v, float) and math.isinf(v) for v in values):
                view[column] = [_fmt(v) if isinstance(v, float) and math.isinf(v) else v for v in values]
    return view
