"""The one runner of the dashboard's long actions (fine-tune, memory measurement, sweep, the public warm start).

A handler validates its inputs, claims the session's job slot, then streams::

    job = jobs.claim(session, "fine-tune", units=steps)   # InputError if this session already has a job
    outcome = yield from jobs.stream(job, work, render, blank=..., first_status=...)
    if not outcome.started: ...                            # cancelled (or the page closed) while queued

* Every heavy job waits in ONE first-in-first-out line (:data:`LINE`, :mod:`toolkit.dashboard.line`): one runs at a time in the process. While a
  job waits, :func:`stream` yields its place in line and an honest wait (:func:`wait_estimate`: the running job's
  own pace and the measured durations of recent jobs of each kind on this server, or "unknown"; never a guess).
  Cancel while queued takes the job out of the line: its ``work`` never runs.
* ``work(job)`` runs in a daemon thread once the job's turn comes; it reports with ``job.emit(kind, value)`` (its
  own events), ``job.note(html)`` (a status line replacing the status of ``render()`` while set, e.g. the warm
  start's progress) and ``job.progress(done, total)`` (what the line's estimates use, once a few units are done). The turn passes on when ``work``
  returns or raises, even when nobody follows the job any more (the page was closed).
* :func:`stream` is the single polling loop: it drains the job's queue, hands each event to ``on_event``, yields
  ``render()`` (or the note) at most every ``min_gap_s`` while the job runs, and returns an :class:`Outcome`.
  If the generator is closed (the page was closed), the job is cancelled; in every case its slot is released.
* :func:`stopping_callback` turns cancel and the time limit into the toolkit's "return False to stop".
"""
from __future__ import annotations

import contextvars
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator

import gradio as gr

from toolkit.dashboard.common import InputError, failure_html, message_html
from toolkit.dashboard.line import (  # noqa: F401 (the line's names, as the tabs and tests use them)
    LINE, MIN_PACE_FRACTION, MIN_PACE_UNITS, Line, Pace, forget_durations, never_started_html, pace, queued_html,
    record_duration, remaining_s, wait_estimate,
)

HEAVY_QUEUE = "heavy-jobs"  # Gradio concurrency id of the heavy events; the line below orders them, not Gradio
HEAVY_EVENT_LIMIT = 16      # sessions whose heavy event may be inside a handler at once (waiting in the line)
_NOTE, _DONE, _ERROR = "__note__", "__done__", "__error__"


class Job:
    """A long action of one browser session. The worker emits; the polling loop (:func:`stream`) reads.

    ``units`` is the job's planned amount of work (steps, runs x steps, measurements) and ``pace_key`` the kind of
    work whose measured seconds per unit estimate its duration (e.g. ``"fine-tune tiny"``)."""

    def __init__(self, session: str, kind: str, cancellable: bool = True, units: float = 0.0,
                 pace_key: str | None = None, heavy: bool = True):
        self.session, self.kind, self.cancellable, self.heavy = session, kind, cancellable, heavy
        self.units, self.pace_key = float(units), pace_key or kind
        self.reason: str | None = None   # why it was asked to stop (None: it was not)
        self.claimed = time.monotonic()
        self.started: float | None = None  # when its turn came and work began (None: still queued)
        self.setup_s = 0.0                 # one-off preparation (the warm start): kept out of elapsed and pace
        self.pace = Pace()                 # its progress(done, total) reports
        self._stop = threading.Event()
        self._events: queue.Queue = queue.Queue()

    def emit(self, kind: str, value: Any = None) -> None:
        """Worker side: report an event to the handler's ``on_event``."""
        self._events.put((kind, value))

    def note(self, status_html: str | None) -> None:
        """Worker side: show this status line instead of the handler's own until ``note(None)``."""
        self._events.put((_NOTE, status_html))

    def progress(self, done: float, total: float) -> None:
        """Worker side: ``done`` of ``total`` units so far (the line's estimate of the remaining time uses it)."""
        self.pace.update(done, total)

    @property
    def done(self) -> tuple[float, float] | None:
        """The last ``progress(done, total)`` (None: none yet)."""
        return self.pace.done

    def exclude(self, seconds: float) -> None:
        """Worker side: ``seconds`` of one-off preparation that the status timer and the pace should not count."""
        self.setup_s += max(0.0, float(seconds))

    def cancel(self, reason: str) -> None:
        """Ask the job to stop at its next check (or to leave the line); the first reason given is kept."""
        if not self._stop.is_set():
            self.reason = reason
            self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def running(self) -> bool:
        return self.started is not None

    def elapsed(self) -> float:
        """Seconds of work so far: from the job's turn, less its one-off preparation (0 while queued)."""
        if self.started is None:
            return 0.0
        return max(0.0, time.monotonic() - self.started - self.setup_s)


@dataclass
class Outcome:
    """How a job ended: its worker's return ``value``, or the ``error`` it raised; ``started`` is False when it
    left the line before its turn (cancelled, or the page closed) and never ran."""

    value: Any = None
    error: BaseException | None = None
    started: bool = True


_JOBS: dict[str, Job] = {}
_JOBS_LOCK = threading.Lock()
def unfinished_html(outcome, job: Job, what: str, settings_errors: bool = False) -> str | None:
    """The status line of a streamed job that produced no value: it never started (cancelled while queued) or
    it raised (``<what> failed: ...``; with ``settings_errors`` a ``ValueError``, which is about the user's
    settings, also gets a toast). None when it finished."""
    if not outcome.started:
        return never_started_html(job)
    if outcome.error is not None:
        return failure_html(what, outcome.error, toast=settings_errors and isinstance(outcome.error, ValueError))
    return None


# ------------------------------------------------------------------------------------------------ the session slot

def claim(session: str, kind: str, cancellable: bool = True, units: float = 0.0, pace_key: str | None = None,
          heavy: bool = True) -> Job:
    """Register a new job for ``session``, or raise :class:`InputError` when one of its jobs is still running.

    ``cancellable`` says whether it can stop once running (a queued job can always be cancelled)."""
    with _JOBS_LOCK:
        if session in _JOBS:
            raise InputError("a job of yours is already running or queued (wait for it, or cancel it first).")
        job = _JOBS[session] = Job(session, kind, cancellable, units, pace_key, heavy)
    return job


def release(job: Job) -> None:
    """Free the session's slot (if ``job`` still holds it)."""
    with _JOBS_LOCK:
        if _JOBS.get(job.session) is job:
            del _JOBS[job.session]


def running_job(session: str = "local") -> Job | None:
    """The session's job, queued or running (None: none)."""
    with _JOBS_LOCK:
        return _JOBS.get(session)


def cancel(session: str = "local") -> str:
    """Cancel this session's job: a queued one leaves the line and never runs; a running one stops after its
    current step (and still reports). Returns a status line."""
    job = running_job(session)
    if job is None:
        return message_html("Nothing to cancel: no job of yours is running or queued.", "info")
    if not job.running:
        # the same line the job's own handler ends with: whichever reaches the page last, it reads the same
        job.cancel("cancelled while queued")
        return never_started_html(job)
    if not job.cancellable:
        return message_html(f"The {job.kind} cannot be cancelled midway; it ends by itself shortly.", "info")
    job.cancel("cancelled by the user")
    return message_html("Cancelling: the run stops after the current step and reports its partial result.", "warn")


def session_id(request) -> str:
    """The browser session of a Gradio request (``"local"`` outside one)."""
    return getattr(request, "session_hash", None) or "local"


def cancel_from_page(request: gr.Request) -> str:
    """The Cancel buttons' handler: cancel the queued or running job of the page's session."""
    return cancel(session_id(request))


# ------------------------------------------------------------------------------------------------ running

def start_worker(job: Job, work: Callable[[Job], Any]) -> None:
    """Run ``work(job)`` in a daemon thread with this context (so Gradio tracks its tqdm bars); its result or
    exception ends the job's event stream. When it ends, an uncancelled success records its duration and the
    job's turn in the line passes on."""
    context = contextvars.copy_context()

    def target():
        finished = False
        try:
            job._events.put((_DONE, context.run(work, job)))
            finished = True
        except BaseException as err:  # reported to the user by the handler
            job._events.put((_ERROR, err))
        finally:
            if finished and not job.stopping:
                record_duration(job)
            LINE.finish(job)

    threading.Thread(target=target, daemon=True, name=f"dashboard-{job.kind}").start()


def _drain(events: queue.Queue, timeout: float) -> list:
    """Every event available now (waiting up to ``timeout`` for the first)."""
    try:
        out = [events.get(timeout=timeout)]
    except queue.Empty:
        return []
    while not events.empty():  # one consumer: what empty() sees cannot be taken by anyone else
        out.append(events.get_nowait())
    return out


def _wait_for_turn(job: Job, blank: dict, poll_s: float, min_gap_s: float) -> Generator[dict, None, bool]:
    """Yield the queued status until ``job`` has the turn (True) or is cancelled while waiting (False)."""
    LINE.join(job)
    last_yield = 0.0
    while not LINE.take_turn(job):
        if job.stopping:
            LINE.leave(job)
            return False
        now = time.monotonic()
        if now - last_yield >= min_gap_s:
            last_yield = now
            yield dict(blank, status=queued_html(job))
        job._stop.wait(poll_s)  # wakes at once on cancel
    return True


def stream(job: Job, work: Callable[[Job], Any], render: Callable[[], dict], *, blank: dict,
           first_status: str, on_event: Callable[[str, Any], None] | None = None, poll_s: float = 0.5,
           min_gap_s: float = 0.25) -> Generator[dict, None, Outcome]:
    """Wait for ``job``'s turn, run ``work`` and yield UI updates until it ends; return its :class:`Outcome`.

    While queued it yields ``dict(blank, status=<place in line and wait>)``; a job cancelled while queued returns
    ``Outcome(started=False)`` without ``work`` ever being called. Once running it yields
    ``dict(blank, status=first_status)``, then ``render()`` (its status replaced by the worker's note while one is
    up) at most every ``min_gap_s`` seconds. ``on_event(kind, value)`` receives every ``job.emit``, in
    order, before the next render.
    """
    try:
        if job.heavy:
            has_turn = yield from _wait_for_turn(job, blank, poll_s, min_gap_s)
            if not has_turn:
                return Outcome(started=False)
        job.started = time.monotonic()
        try:
            start_worker(job, work)
        except BaseException:
            LINE.finish(job)
            raise
        yield dict(blank, status=first_status)
        note, last_yield = None, 0.0
        while True:
            outcome = None
            for kind, value in _drain(job._events, poll_s):
                if kind == _NOTE:
                    note = value
                elif kind == _DONE:
                    outcome = Outcome(value=value)
                elif kind == _ERROR:
                    outcome = Outcome(error=value)
                elif on_event is not None:
                    on_event(kind, value)
            if outcome is not None:
                return outcome
            now = time.monotonic()
            if now - last_yield >= min_gap_s:
                last_yield = now
                yield dict(render(), status=note) if note is not None else render()
    except GeneratorExit:
        job.cancel("the page was closed")  # nobody reads the job any more: stop the worker (or leave the line)
        raise
    except BaseException:
        job.cancel("the dashboard failed while following the job")
        raise
    finally:
        if not job.running:
            LINE.leave(job)
        release(job)


def run_detached(job: Job, work: Callable[[Job], Any]) -> threading.Thread:
    """Run ``job`` through the line with nobody following it (the server's own jobs, e.g. the warm start at
    launch); returns the thread that drives it."""
    def drive():
        for _ in stream(job, work, dict, blank={}, first_status=""):
            pass

    thread = threading.Thread(target=drive, daemon=True, name=f"dashboard-detached-{job.kind}")
    thread.start()
    return thread


def stopping_callback(job: Job, time_limit: float,
                      on_row: Callable[[dict], None] | None = None) -> Callable[[dict], bool | None]:
    """A per-step callback for ``toolkit.train.train`` (or a sweep's ``step_callback``): passes each row to
    ``on_row``, cancels the job once ``time_limit`` seconds have passed since this call, and returns False (stop
    cleanly) when the job is stopping."""
    started = time.monotonic()

    def callback(row: dict):
        if on_row is not None:
            on_row(row)
        if time.monotonic() - started > time_limit:
            job.cancel(f"time limit of {time_limit:g} s reached")
        return False if job.stopping else None

    return callback


# ------------------------------------------------------------------------------------------------ the page

def _button(interactive: bool):
    return lambda: gr.update(interactive=interactive)


def wire_run_button(button: gr.Button, handler: Callable, inputs: list, outputs: list, api_name: str):
    """Wire a heavy job's Run button: disabled at the click, ``handler`` streams (ordered by :data:`LINE`, not by
    Gradio, so a queued job is a job of its session that Cancel can reach), then enabled again, also after an
    error or a cancel (``.then`` runs whatever the handler's outcome). Returns the handler's event."""
    disabled = button.click(_button(False), None, button, queue=False, show_progress="hidden", api_name=False)
    # show_progress hidden: the status line says where the job is (queue place, steps); Gradio's own badge showed
    # an ETA of its own guessing
    event = disabled.then(handler, inputs, outputs, concurrency_id=HEAVY_QUEUE, concurrency_limit=HEAVY_EVENT_LIMIT,
                          show_progress="hidden", api_name=api_name)
    event.then(_button(True), None, button, queue=False, show_progress="hidden", api_name=False)
    return event
