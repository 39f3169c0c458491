"""The model the app serves: its geometry (cheap, to validate inputs), its public warm start (trained once and
cached; at launch in the job line with its own progress, or by the first job), and the warm-started bundle the views
share.

Every fine-tune loads its own copy of the model in ``toolkit.train.train``; the bundle here is only read (the
tokens view runs its frozen tower).
"""
from __future__ import annotations

import functools
import threading
import time
from typing import Callable

from toolkit.dashboard import jobs
from toolkit.dashboard.common import AppSettings, message_html, progress_html
from toolkit.models import PRESETS, build_model
from toolkit.train import TrainConfig, load_bundle
from toolkit.warmstart import DEFAULT_STEPS, warm_start, warm_start_path

_BUNDLES: dict = {}
_BUNDLE_LOCK = threading.Lock()
_TRAINING: dict = {}   # (preset, steps) -> (jobs.Pace, started): a warm start being trained now
WARM_START_SESSION = "server:warm-start"


@functools.lru_cache(maxsize=4)
def geometry_bundle(preset: str):
    """An untrained model of ``preset`` (cheap): only its geometry is used, to validate token budgets. A shape-only
    preset (7B shapes) is built on the "meta" device: shapes, no memory."""
    return build_model(preset, device="meta") if PRESETS[preset].get("shape_only") else build_model(preset)


def warm_start_steps(settings: AppSettings) -> int:
    """Steps of the app's public warm start (0: none)."""
    steps = settings.warm_start_steps
    return DEFAULT_STEPS.get(settings.preset, 600) if steps is None else steps


def warm_start_cached(settings: AppSettings) -> bool:
    """Whether the preset's public warm start is already on disk (or none is used)."""
    if settings.warm_start_steps == 0:
        return True
    return (warm_start_path(settings.preset, 0, warm_start_steps(settings)) / "toolkit_bundle.json").is_file()


def warm_start_progress(settings: AppSettings) -> str | None:
    """"step 120/600 · 31 s, about 124 s left" while the warm start is being trained in this process, else None.
    The time left is extrapolated from its own pace (:class:`~toolkit.dashboard.jobs.Pace`), once it is known."""
    state = _TRAINING.get((settings.preset, warm_start_steps(settings)))
    if state is None or state[0].done is None:
        return None
    pace, started = state
    done, total = pace.done
    left = pace.left_s()
    return f"step {done:.0f}/{total:.0f} · {time.monotonic() - started:.0f} s" + (
        f", about {left:.0f} s left" if left is not None else "")


def warm_start_note(settings: AppSettings) -> str:
    """One line for the page header: the preset and whether its warm start is cached, being trained, or not yet."""
    if settings.warm_start_steps == 0:
        return f"model: preset {settings.preset!r}, no public warm start (untrained start)"
    progress = warm_start_progress(settings)
    if warm_start_cached(settings):
        state = "cached"
    elif progress is not None:
        state = f"being trained now, once: {progress}"
    elif jobs.running_job(WARM_START_SESSION) is not None:
        state = "being prepared now, once: starting"
    else:
        state = "not trained yet; the first job trains it, once"
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
                # No tqdm bar: in a server log its carriage returns made one 100 KB line.
                training = (settings.preset, warm_start_steps(settings))
                _TRAINING[training] = (jobs.Pace(), time.monotonic())

                def on_step(done: int, total: int) -> None:
                    _TRAINING[training][0].update(done, total)
                    if progress is not None:
                        progress(done, total)

                try:
                    warm_start(settings.preset, steps=settings.warm_start_steps, progress=False, callback=on_step)
                finally:
                    _TRAINING.pop(training, None)
            config = TrainConfig(preset=settings.preset, warm_start_steps=settings.warm_start_steps, steps=1,
                                 progress=False)
            _BUNDLES[key] = load_bundle(config)
        return _BUNDLES[key]


def prepare(settings: AppSettings, note: Callable[[str | None], None],
            progress: Callable[[int, int], None] | None = None) -> float:
    """Make sure the warm start exists before a job trains: when it is missing, train it and report its progress
    as status lines through ``note`` (``note(None)`` at the end) and ``progress(done, total)``. Returns the seconds
    it took (0.0 when it was cached: nothing is reported)."""
    if warm_start_cached(settings):
        return 0.0
    text = f"Preparing the public warm start of {settings.preset!r} (first use only, then cached)"
    started = time.monotonic()
    note(message_html(f"{text}…"))

    def on_step(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total)
        note(progress_html(done, total, f"{text}: {warm_start_progress(settings) or f'step {done}/{total}'}"))

    get_bundle(settings, progress=on_step)
    note(None)
    return time.monotonic() - started


def prepare_in_background(settings: AppSettings) -> jobs.Job | None:
    """At launch: train the missing warm start as the server's own job, first in the line (so a user's first job
    queues behind it with an estimate from its pace). None when it is cached or already being prepared."""
    if warm_start_cached(settings):
        return None
    try:
        job = jobs.claim(WARM_START_SESSION, "public warm start", cancellable=False,
                         units=warm_start_steps(settings), pace_key=f"warm start {settings.preset}")
    except ValueError:  # already being prepared
        return None
    total = warm_start_steps(settings)
    logged = set()

    def progress(done: int, total_steps: int) -> None:
        job.progress(done, total_steps)
        tenth = done * 10 // max(total_steps, 1)
        if tenth not in logged:  # a short line per tenth in the server log (never a carriage-return bar)
            logged.add(tenth)
            state = warm_start_progress(settings) or f"step {done}/{total}"
            print(f"public warm start of {settings.preset!r}: {state}", flush=True)

    jobs.run_detached(job, lambda job: prepare(settings, lambda _: None, progress=progress))
    return job
