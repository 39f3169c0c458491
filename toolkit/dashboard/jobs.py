"""The one runner of the dashboard's long actions (fine-tune, memory measurement, sweep, the public warm start).

A handler validates its inputs, claims the session's job slot, then streams::

    job = jobs.claim(session, "fine-tune", units=steps)   # InputError if this session already has a job
    outcome = yield from jobs.stream(job, work, render, blank=..., first_status=...)
    if not outcome.started: ...                            # cancelled (or the page closed) while queued

* Every heavy job waits in ONE first-in-first-out line (:data:`LINE`): one runs at a time in the process. While a
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
import html
import queue
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Generator

import gradio as gr

from toolkit.dashboard.common import InputError, failure_html, message_html

HEAVY_QUEUE = "heavy-jobs"  # Gradio concurrency id of the heavy events; the line below orders them, not Gradio
HEAVY_EVENT_LIMIT = 16      # sessions whose heavy event may be inside a handler at once (waiting in the line)
HISTORY = 5                 # recent durations kept per kind of job, for the wait estimates
MIN_PACE_UNITS = 3          # a running job's own pace is trusted once it has done this many units past its first
MIN_PACE_FRACTION = 0.05    # ... and this fraction of its total (the first steps of a warm start run slower:
                            # 3 of 600 steps extrapolated to 547 s for a warm start that took 140 s)
_NOTE, _DONE, _ERROR = "__note__", "__done__", "__error__"


class Pace:
    """The pace of work reported as ``update(done, total)``: seconds per unit since the first unit was done (so
    loading and setup do not count), trusted once ``MIN_PACE_UNITS`` more units and ``MIN_PACE_FRACTION`` of the
    total are done; before that, no estimate."""

    def __init__(self):
        self.done: tuple[float, float] | None = None
        self._first: tuple[float, float] | None = None

    def update(self, done: float, total: float) -> None:
        self.done = (float(done), float(total))
        if self._first is None and done > 0:
            self._first = (float(done), time.monotonic())

    def per_unit(self) -> float | None:
        if self._first is None or self.done is None:
            return None
        first_done, first_time = self._first
        units = self.done[0] - first_done
        if units < max(MIN_PACE_UNITS, MIN_PACE_FRACTION * self.done[1]):
            return None
        return (time.monotonic() - first_time) / units

    def left_s(self) -> float | None:
        """Seconds until ``total`` at this pace (None: not known yet)."""
        per_unit = self.per_unit()
        return None if per_unit is None else per_unit * max(0.0, self.done[1] - self.done[0])


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


class Line:
    """The heavy jobs of the process in first-in-first-out order: ``running`` has the turn, ``waiting`` queue."""

    def __init__(self):
        self._lock = threading.Lock()
        self.running: Job | None = None
        self.waiting: list[Job] = []

    def join(self, job: Job) -> None:
        with self._lock:
            if job is not self.running and job not in self.waiting:
                self.waiting.append(job)

    def take_turn(self, job: Job) -> bool:
        """Give ``job`` the turn if nothing runs and it is first in line; whether it has the turn."""
        with self._lock:
            if self.running is job:
                return True
            if self.running is None and self.waiting and self.waiting[0] is job:
                self.running = self.waiting.pop(0)
                return True
            return False

    def leave(self, job: Job) -> None:
        """Take a waiting ``job`` out of the line (it never ran)."""
        with self._lock:
            if job in self.waiting:
                self.waiting.remove(job)

    def finish(self, job: Job) -> None:
        """The running ``job`` is done: the next in line may take the turn."""
        with self._lock:
            if self.running is job:
                self.running = None

    def ahead_of(self, job: Job) -> list[Job]:
        """The jobs that will run before ``job``: the running one first, then those waiting in front of it."""
        with self._lock:
            ahead = [self.running] if self.running is not None and self.running is not job else []
            if job in self.waiting:
                ahead += self.waiting[:self.waiting.index(job)]
            return ahead

    def snapshot(self) -> tuple[Job | None, list[Job]]:
        with self._lock:
            return self.running, list(self.waiting)


LINE = Line()
_JOBS: dict[str, Job] = {}
_JOBS_LOCK = threading.Lock()
_PACES: dict[str, deque] = {}
_PACES_LOCK = threading.Lock()


# ------------------------------------------------------------------------------------------------ durations

def record_duration(job: Job) -> None:
    """Remember how long a finished, uncancelled job took per unit of work (for later wait estimates)."""
    if job.units <= 0 or job.started is None:
        return
    seconds = job.elapsed()
    with _PACES_LOCK:
        _PACES.setdefault(job.pace_key, deque(maxlen=HISTORY)).append(seconds / job.units)


def pace(key: str) -> tuple[float, int] | None:
    """Median seconds per unit of the recent finished jobs of ``key``, and how many were measured (None: none)."""
    with _PACES_LOCK:
        values = list(_PACES.get(key, ()))
    return (statistics.median(values), len(values)) if values else None


def forget_durations() -> None:
    """Drop every measured duration (tests)."""
    with _PACES_LOCK:
        _PACES.clear()


def remaining_s(job: Job) -> tuple[float | None, str]:
    """Seconds ``job`` still needs and where the number comes from; ``(None, why)`` when it cannot be known.

    A running job that reported progress is extrapolated at its own pace; otherwise the median pace of recent
    finished jobs of its kind on this server times its units (minus what it already ran)."""
    own = job.pace.left_s() if job.running else None
    if own is not None:
        return own, f"the running {job.kind}'s own pace"
    measured = pace(job.pace_key)
    if measured is None or job.units <= 0:
        return None, f"no {job.pace_key} has finished on this server yet"
    per_unit, n = measured
    left = per_unit * job.units - job.elapsed()
    if left < 0:  # running longer than its kind usually takes, and it has not reported progress
        return None, f"the running {job.kind} is taking longer than the last {n} did"
    return left, f"the last {n} {job.pace_key}{'s' if n > 1 else ''} on this server"


def wait_estimate(job: Job) -> tuple[float | None, list[str]]:
    """Seconds until ``job``'s turn (None: unknown) and the sources of the estimate (or why it is unknown)."""
    total, sources = 0.0, []
    for ahead in LINE.ahead_of(job):
        seconds, source = remaining_s(ahead)
        if seconds is None:
            return None, [source]
        total += seconds
        if source not in sources:
            sources.append(source)
    return total, sources


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _describe(job: Job, session: str) -> str:
    whose = "yours" if job.session == session else ("the server's" if job.session.startswith("server") else
                                                     "another user's")
    state = ""
    if job.running:
        state = (f", {job.done[0]:.0f}/{job.done[1]:.0f} done" if job.done and job.done[1] else ", running")
    return f"a {job.kind} ({whose}{state})"


def queued_html(job: Job) -> str:
    """The status line of a waiting job: its place in line, what is ahead, and the estimated wait (or unknown)."""
    ahead = LINE.ahead_of(job)
    place = _ordinal(len(ahead) + 1)
    listed = "; ".join(_describe(other, job.session) for other in ahead) or "nothing (starting)"
    seconds, sources = wait_estimate(job)
    if seconds is None:
        wait = f"Wait unknown: {sources[0]}."
    else:
        amount = "under 1 s" if seconds < 1 else f"≈ {seconds:.0f} s"
        wait = f"Estimated wait {amount} (from {' and '.join(sources)})." if sources else ""
    text = (f"Queued: your {job.kind} is {place} in line (one heavy job runs at a time). Ahead: {listed}. {wait} "
            "Cancel takes it out of the line before it starts.")
    return f'<div class="dp-msg dp-info dp-queued">⏳ {html.escape(text)}</div>'


def never_started_html(job: Job) -> str:
    """The status line of a job that left the line before its turn."""
    return message_html(f"Cancelled before it started ({job.reason or 'cancelled'}): your {job.kind} never ran, "
                        "so nothing was trained and no ε was spent.", "warn")


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
