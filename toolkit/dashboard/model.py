"""The model the app serves: its geometry (cheap, to validate inputs), its public warm start (trained on first use,
its progress shown through ``warm_start``'s callback), and the warm-started bundle the views share.

Every fine-tune loads its own copy of the model in ``toolkit.train.train``; the bundle here is only read (the
tokens view runs its frozen tower).
"""
from __future__ import annotations

import functools
import threading
import time
from typing import Callable

from toolkit.dashboard.common import AppSettings, message_html, progress_html
from toolkit.models import build_model
from toolkit.train import TrainConfig, load_bundle
from toolkit.warmstart import DEFAULT_STEPS, warm_start, warm_start_path

_BUNDLES: dict = {}
_BUNDLE_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4)
def geometry_bundle(preset: str):
    """An untrained model of ``preset`` (cheap): only its geometry is used, to validate token budgets."""
    return build_model(preset)


def warm_start_cached(settings: AppSettings) -> bool:
    """Whether the preset's public warm start is already on disk (or none is used)."""
    if settings.warm_start_steps == 0:
        return True
    steps = settings.warm_start_steps
    if steps is None:
        steps = DEFAULT_STEPS.get(settings.preset, 600)
    return (warm_start_path(settings.preset, 0, steps) / "toolkit_bundle.json").is_file()


def warm_start_note(settings: AppSettings) -> str:
    """One line for the page header: the preset and whether its warm start is cached yet."""
    if settings.warm_start_steps == 0:
        return f"model: preset {settings.preset!r}, no public warm start (untrained start)"
    state = "cached" if warm_start_cached(settings) else "not trained yet; the first job trains it in a few minutes"
    return f"model: preset {settings.preset!r} with its public warm start ({state})"


def get_bundle(settings: AppSettings, progress: Callable[[int, int], None] | None = None):
    """The (warm-started) model of the app's preset, loaded once per process.

    The first call may train the public warm start; ``progress(done, total)`` then follows its steps.
    """
    key = (settings.preset, settings.warm_start_steps)
    with _BUNDLE_LOCK:
        if key not in _BUNDLES:
            if not warm_start_cached(settings):
                # Train and cache it here, where its progress can be followed; load_bundle below then reads the
                # cache (one extra load from disk, first use only), so the app runs exactly what train() loads.
                warm_start(settings.preset, steps=settings.warm_start_steps, progress=True, callback=progress)
            config = TrainConfig(preset=settings.preset, warm_start_steps=settings.warm_start_steps, steps=1,
                                 progress=True)
            _BUNDLES[key] = load_bundle(config)
        return _BUNDLES[key]


def prepare(settings: AppSettings, note: Callable[[str | None], None]) -> None:
    """Make sure the warm start exists before a job trains: when it is missing, train it and report its progress
    as status lines through ``note`` (``note(None)`` at the end). Does nothing when it is cached."""
    if warm_start_cached(settings):
        return
    text = f"Preparing the public warm start of {settings.preset!r} (first use only, then cached)"
    started = time.monotonic()
    note(message_html(f"{text}…"))

    def on_step(done: int, total: int) -> None:
        note(progress_html(done, total, f"{text}: step {done}/{total} · {time.monotonic() - started:.0f} s"))

    get_bundle(settings, progress=on_step)
    note(None)
