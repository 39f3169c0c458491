"""The one runner of the dashboard's long actions (fine-tune, memory measurement, sweep).

A handler validates its inputs, claims the session's job slot, then streams::

    job = jobs.claim(session, "fine-tune")       # InputError if this session already runs a job
    outcome = yield from jobs.stream(job, work, render, blank=..., first_status=...)

* ``work(job)`` runs in a daemon thread (:func:`start_worker`) and reports through the job: ``job.emit(kind,
  value)`` for its own events, ``job.note(html)`` for a status line that replaces the handler's own while set
  (warm start, waiting for the heavy-job lock). Its return value or exception ends the job.
* :func:`stream` is the single polling loop: it drains the job's queue, hands each event to ``on_event``, yields
  ``render()`` (or the note) at most every ``min_gap_s`` while the job runs, and returns an :class:`Outcome`.
  If the generator is closed (the page was closed), the job is cancelled; in every case its slot is released.
* :func:`exclusive` lets one heavy computation run in the process at a time, even when an abandoned job is still
  finishing; :func:`stopping_callback` turns cancel and the time limit into the toolkit's "return False to stop".
"""
from __future__ import annotations

import contextlib
import contextvars
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterator

import gradio as gr

from toolkit.dashboard.common import InputError, message_html

HEAVY_QUEUE = "heavy-jobs"  # Gradio concurrency id: fine-tunes, measurements and sweeps queue one at a time
_NOTE, _DONE, _ERROR = "__note__", "__done__", "__error__"


class Job:
    """A long action of one browser session. The worker emits; the polling loop (:func:`stream`) reads."""

    def __init__(self, session: str, kind: str, cancellable: bool = True):
        self.session, self.kind, self.cancellable = session, kind, cancellable
        self.reason: str | None = None   # why it was asked to stop (None: it was not)
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._events: queue.Queue = queue.Queue()

    def emit(self, kind: str, value: Any = None) -> None:
        """Worker side: report an event to the handler's ``on_event``."""
        self._events.put((kind, value))

    def note(self, status_html: str | None) -> None:
        """Worker side: show this status line instead of the handler's own until ``note(None)``."""
        self._events.put((_NOTE, status_html))

    def cancel(self, reason: str) -> None:
        """Ask the job to stop at its next check; the first reason given is kept."""
        if not self._stop.is_set():
            self.reason = reason
            self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def elapsed(self) -> float:
        return time.monotonic() - self.started


@dataclass
class Outcome:
    """How a job ended: its worker's return ``value``, or the ``error`` it raised."""

    value: Any = None
    error: BaseException | None = None


_JOBS: dict[str, Job] = {}
_JOBS_LOCK = threading.Lock()
_HEAVY_LOCK = threading.Lock()


def claim(session: str, kind: str, cancellable: bool = True) -> Job:
    """Register a new job for ``session``, or raise :class:`InputError` when one of its jobs is still running."""
    with _JOBS_LOCK:
        if session in _JOBS:
            raise InputError("a job of yours is already running (cancel it first).")
        job = _JOBS[session] = Job(session, kind, cancellable)
    return job


def release(job: Job) -> None:
    """Free the session's slot (if ``job`` still holds it)."""
    with _JOBS_LOCK:
        if _JOBS.get(job.session) is job:
            del _JOBS[job.session]


def running_job(session: str = "local") -> Job | None:
    with _JOBS_LOCK:
        return _JOBS.get(session)


def cancel(session: str = "local") -> str:
    """Ask this session's running job to stop after its current step (it still reports); a status line."""
    job = running_job(session)
    if job is None:
        return message_html("Nothing to cancel: no job of yours is running.", "info")
    if not job.cancellable:
        return message_html(f"The {job.kind} cannot be cancelled midway; it ends by itself shortly.", "info")
    job.cancel("cancelled by the user")
    return message_html("Cancelling: the run stops after the current step and reports its partial result.", "warn")


def session_id(request) -> str:
    """The browser session of a Gradio request (``"local"`` outside one)."""
    return getattr(request, "session_hash", None) or "local"


def cancel_from_page(request: gr.Request) -> str:
    """The Cancel buttons' handler: cancel the running job of the page's session."""
    return cancel(session_id(request))


def start_worker(job: Job, work: Callable[[Job], Any]) -> None:
    """Run ``work(job)`` in a daemon thread with this context (so Gradio tracks its tqdm bars); its result or
    exception ends the job's event stream."""
    context = contextvars.copy_context()

    def target():
        try:
            job._events.put((_DONE, context.run(work, job)))
        except BaseException as err:  # reported to the user by the handler
            job._events.put((_ERROR, err))

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


def stream(job: Job, work: Callable[[Job], Any], render: Callable[[], dict], *, blank: dict,
           first_status: str, on_event: Callable[[str, Any], None] | None = None, poll_s: float = 0.5,
           min_gap_s: float = 0.25) -> Generator[dict, None, Outcome]:
    """Run ``work`` for ``job`` and yield UI updates until it ends; return its :class:`Outcome`.

    Yields ``dict(blank, status=first_status)`` first, then ``render()`` (or ``dict(blank, status=note)`` while
    the worker has a note up) at most every ``min_gap_s`` seconds. ``on_event(kind, value)`` receives every
    ``job.emit``, in order, before the next render.
    """
    try:
        yield dict(blank, status=first_status)
        start_worker(job, work)
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
                yield dict(blank, status=note) if note is not None else render()
    except GeneratorExit:
        job.cancel("the page was closed")  # nobody reads the job any more: stop the worker
        raise
    except BaseException:
        job.cancel("the dashboard failed while following the job")
        raise
    finally:
        release(job)


@contextlib.contextmanager
def exclusive(job: Job) -> Iterator[None]:
    """Worker side: hold the process-wide heavy-job lock (one training or measurement at a time); while another
    job holds it, a note says this one is waiting."""
    if not _HEAVY_LOCK.acquire(blocking=False):
        job.note(message_html("Waiting for the previous job to finish (one heavy job at a time)…"))
        _HEAVY_LOCK.acquire()
        job.note(None)
    try:
        yield
    finally:
        _HEAVY_LOCK.release()


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
