"""What every tab of the dashboard shares: the app owner's settings, the input error, status lines, number parsing of
UI values (through :mod:`toolkit.validation`), table and JSON formatting, and the help texts of shared controls.

A handler validates its inputs with :func:`ui_number`, :func:`ui_integer`, :func:`ui_fraction`, :func:`ui_choice`,
:func:`ui_steps` and :func:`ui_batch_size`; each raises :class:`InputError` whose message names the control and the
problem. On such an error the handler returns :func:`warn`'s error line as its status (a toast points at it)
and starts nothing.
"""
from __future__ import annotations

import html
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from toolkit.validation import check_choice, check_fraction, check_int, check_number, parse_number
from toolkit.vocabulary import METHOD_LABELS, METHODS, PRIVACY_UNIT, format_epsilon, is_private, strict_json

APP_PRIVACY_UNIT = f"{PRIVACY_UNIT} of the embedded data"
METHOD_CHOICES = [(METHOD_LABELS[m], m) for m in METHODS]  # (label shown, value passed)

# Help texts of controls that several tabs show.
HELP = dict(
    budget_mode="Give the visual-token budget as a fraction removed or as the number of tokens fed to the LLM.",
    token_prune_ratio=("Fraction of the image's visual tokens removed before the LLM, in [0, 1): 0.75 keeps 16 of "
                       "64 patches ([CLS] + dominant patches + fused contextual tokens for dual-priv)."),
    keep_tokens="Visual tokens fed to the LLM per image (1 to the number of patches: 64 for the tiny preset).",
    grad_prune_ratio=("Dual-Priv only: fraction of the noisy gradient's coordinates with the smallest magnitude set "
                      "to zero after the noise is added (post-processing: costs no privacy), in [0, 1)."),
    batch_size="Expected batch size (Poisson sampling for private methods: each record joins a step with "
               "probability batch / records).",
)
GRAD_RATIO_MEANING = "the fraction of noisy-gradient coordinates zeroed"
# A private run's step times and peak memory depend on its Poisson-sampled batch sizes: releases about the secret
# batches that ε does not cover. The page, the JSON and the CSV downloads withhold them for private runs.
WITHHELD_FIELDS = ("peak_memory_mb", "step_time_s", "memory_method")
WITHHELD_TEXT = "withheld for private runs"
WITHHELD_WHY = ("a private run's step time and peak memory depend on its secret, randomly sampled batch sizes, "
                "which ε does not cover; the Memory tab measures them on public data")


class InputError(ValueError):
    """A value the user entered cannot be used; the message says which and why."""


def temp_root() -> str:
    """The app's temporary directory (uploads and downloads): ``$GRADIO_TEMP_DIR`` or ``<tmp>/dualpriv-app``."""
    return os.environ.get("GRADIO_TEMP_DIR") or os.path.join(tempfile.gettempdir(), "dualpriv-app")


@dataclass
class AppSettings:
    """What the app owner fixes on the command line (see ``app.py --help``) or in ``DUALPRIV_APP_*`` variables."""

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
    data_root: str | None = None          # a server folder whose data sets users may pick by relative path

    def __post_init__(self):
        check_int("max_steps", self.max_steps, minimum=1)
        check_number("time_limit", self.time_limit, minimum=0)
        if self.warm_start_steps is not None:
            check_int("warm_start_steps", self.warm_start_steps, minimum=0)
        if self.data_root is not None and not Path(self.data_root).is_dir():
            raise ValueError(f"data_root {self.data_root!r} is not a folder")

    @classmethod
    def from_env(cls, **overrides) -> "AppSettings":
        """Settings from ``DUALPRIV_APP_WARM_START_STEPS``, ``_TRAIN_LIMIT``, ``_EVAL_LIMIT``, ``_DATA_ROOT`` and
        ``_BENCH_ISOLATE``, then the ``overrides`` that are not None."""
        def env(name, cast):
            value = os.environ.get(f"DUALPRIV_APP_{name}")
            return cast(value) if value not in (None, "") else None

        values = dict(warm_start_steps=env("WARM_START_STEPS", int), train_limit=env("TRAIN_LIMIT", int),
                      eval_limit=env("EVAL_LIMIT", int), data_root=env("DATA_ROOT", str))
        isolate = os.environ.get("DUALPRIV_APP_BENCH_ISOLATE")
        if isolate not in (None, ""):
            values["bench_isolate"] = isolate.lower() not in ("0", "false", "no", "off")
        values = {k: v for k, v in values.items() if v is not None}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def results_dir(self) -> Path:
        """Where run settings and sweep CSVs are written (created if missing)."""
        root = Path(self.output_dir) if self.output_dir else Path(temp_root()) / "runs"
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)  # people's uploads, models and results: the server's user only
        return root


# ------------------------------------------------------------------------------------------------ status lines

def message_html(text: str, kind: str = "info") -> str:
    """A status line; ``kind`` is info, ok, warn or error (errors are what a bad input shows)."""
    # text symbols, not emoji: a machine without an emoji font (Debian's headless Chromium) drew empty boxes
    icon = {"error": "⚠ ", "warn": "⚠ ", "ok": "✓ ", "info": ""}[kind]
    return f'<div class="dp-msg dp-{kind}">{icon}{html.escape(text)}</div>'


def progress_html(done: int, total: int, text: str) -> str:
    """A progress bar with its percentage and ``text``."""
    pct = 0 if total <= 0 else max(0, min(100, round(100 * done / total)))
    return (f'<div class="dp-progress"><progress value="{done}" max="{max(total, 1)}"></progress> '
            f'<span>{pct}% · {html.escape(text)}</span></div>')


TOAST_TEXT = "The reason is in the red message on the page."


def warn(text: str) -> str:
    """A refused input or a failed job: ``text`` (``<headline>: <reason>``) as an error status line, and a toast
    titled with the headline that points at it (gr.Warning; outside a Gradio request, a Python warning). The
    reason is shown once: a toast repeating the whole line showed every message twice."""
    gr.Warning(TOAST_TEXT, title=text.split(":", 1)[0])
    return message_html(text, "error")


# Library wording a person should not have to read: exception class names, and Pillow's "cannot identify".
_CLASS_NAME = re.compile(r"\b(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Warning)\b:?\s*")
_NOT_AN_IMAGE = re.compile(r"cannot identify image file [^)]*")


def plain_reason(text: str) -> str:
    """``text`` without exception class names ("UnidentifiedImageError: ..."), in words a person reads."""
    text = _NOT_AN_IMAGE.sub("the file is not an image that can be read (PNG, JPEG, ...)", str(text))
    text = _CLASS_NAME.sub("", text).strip()
    text = re.sub(r"\(\s*\)", "", text).strip()
    return text or "an unexpected problem"


def failure_html(what: str, err: BaseException, toast: bool = False) -> str:
    """The status line of a job that raised: ``<what> failed: <reason in words>`` (also a toast with ``toast``)."""
    text = f"{what} failed: {plain_reason(str(err)) if str(err) else 'an unexpected problem'}"
    return warn(text) if toast else message_html(text, "error")


def routed(update: dict, components: dict) -> dict:
    """A handler's update (keyed by output name) keyed by the Gradio components that show it."""
    return {components[name]: value for name, value in update.items()}


# ------------------------------------------------------------------------------------------------ formatting

def format_value(value, digits: int = 3) -> str:
    """A number for people: ``digits`` significant digits, ``∞`` for infinity, ``n/a`` for NaN, ``–`` for None."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return format_epsilon(value)
        return f"{value:.{digits}g}"
    return str(value)


def percent(accuracy) -> str:
    """An accuracy as every tab writes it: ``84.8%`` (``n/a`` when not measured)."""
    if accuracy is None or (isinstance(accuracy, float) and math.isnan(accuracy)):
        return "n/a"
    return f"{100 * float(accuracy):.1f}%"


def round_table(table: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """A copy of ``table`` with every finite float rounded to ``digits`` significant digits (still numbers), so a
    table shows 0.5313 rather than 0.5312500000000001."""
    def short(value):
        if isinstance(value, float) and math.isfinite(value) and value != 0:
            return float(f"{value:.{digits}g}")
        return value

    out = table.copy()
    for column in out.columns:
        if pd.api.types.is_float_dtype(out[column]) or out[column].dtype == object:
            out[column] = [short(v) for v in out[column]]
    return out


def public_summary(summary: dict) -> dict:
    """``summary`` (``TrainResult.summary()``) as the page may show it: for a private run, without its step times
    and peak memory (:data:`WITHHELD_FIELDS`), also in its per-step history."""
    if not is_private(summary.get("method", "non-private")):
        return summary
    out = {k: v for k, v in summary.items() if k not in WITHHELD_FIELDS}
    if isinstance(out.get("history"), list):
        out["history"] = [{k: v for k, v in row.items() if k not in WITHHELD_FIELDS} for row in out["history"]]
    out["withheld"] = f"{', '.join(WITHHELD_FIELDS)}: {WITHHELD_WHY}"
    return out


def public_table(table: pd.DataFrame) -> pd.DataFrame:
    """A results table (one row per run, a ``method`` column) with :data:`WITHHELD_FIELDS` emptied on private rows."""
    out = table.copy()
    if "method" not in out:
        return out
    private = out["method"].map(lambda m: is_private(str(m)) if m in METHODS else True)
    for column in WITHHELD_FIELDS:
        if column in out:
            out[column] = out[column].astype(object).where(~private, None)
    return out


# ------------------------------------------------------------------------------------------------ UI values

def _checked(check, *args, hint: str = "", **kwargs):
    try:
        return check(*args, **kwargs)
    except ValueError as err:
        raise InputError(f"{err} ({hint})" if hint else str(err)) from None


def ui_number(name: str, value, *, minimum: float | None = None, hint: str = "") -> float:
    """A finite number from a UI field, above ``minimum`` when given; ``hint`` is appended to an error."""
    parsed = _checked(parse_number, name, value)
    return _checked(check_number, name, parsed, minimum=minimum, hint=hint)


def ui_integer(name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """A whole number from a UI field (``3.0`` counts), within ``[minimum, maximum]`` when given."""
    parsed = _checked(parse_number, name, value, integer=True)
    return _checked(check_int, name, parsed, minimum=minimum, maximum=maximum)


def ui_fraction(name: str, value, *, hint: str = "", include_zero: bool = True) -> float:
    """A number in [0, 1) from a UI field ((0, 1) without ``include_zero``); ``hint`` says what it means."""
    parsed = _checked(parse_number, name, value)
    return _checked(check_fraction, name, parsed, include_zero=include_zero, hint=hint)


def ui_choice(name: str, value, choices):
    """One of ``choices`` (a dropdown or radio value; anything else is refused by name)."""
    return _checked(check_choice, name, value, tuple(choices))


def ui_steps(settings: AppSettings, value, minimum: int = 1, name: str = "steps") -> int:
    """A number of optimizer steps, at least ``minimum`` and within the app's ``--max-steps``."""
    count = ui_integer(name, value, minimum=minimum)
    if count > settings.max_steps:
        raise InputError(f"{name} is limited to {settings.max_steps} in this app (--max-steps), got {count}")
    return count


def ui_batch_size(settings: AppSettings, value) -> int:
    """A batch size within the app's limit."""
    return ui_integer("batch size", value, minimum=1, maximum=settings.max_batch_size)
