"""The line of heavy jobs: one first-in-first-out order for the whole process, and an honest wait.

* :class:`Line` (:data:`LINE`): the running job and those waiting; one runs at a time.
* :class:`Pace`: the pace of work reported as ``progress(done, total)``, trusted once enough is done.
* :func:`record_duration` / :func:`pace`: measured seconds per unit of recent finished jobs of each kind;
  :func:`remaining_s` and :func:`wait_estimate` turn them (or a running job's own pace) into a wait, or say it is
  unknown: never a guess. :func:`queued_html` and :func:`never_started_html` are the waiting job's status lines.

The jobs themselves (their slot per session, worker thread, polling loop) are :mod:`toolkit.dashboard.jobs`.
"""
from __future__ import annotations

import html
import statistics
import threading
import time
from collections import deque
from typing import Protocol

from toolkit.dashboard.common import message_html

HISTORY = 5                 # recent durations kept per kind of job, for the wait estimates
MIN_PACE_UNITS = 3          # a running job's own pace is trusted once it has done this many units past its first
MIN_PACE_FRACTION = 0.05    # ... and this fraction of its total (the first steps of a warm start run slower:
                            # 3 of 600 steps extrapolated to 547 s for a warm start that took 140 s)


class Job(Protocol):
    """What the line reads of a job (:class:`toolkit.dashboard.jobs.Job` is one; this module does not import it:
    the jobs module stands above the line)."""

    session: str
    kind: str
    units: float
    pace_key: str
    reason: str | None
    started: float | None
    pace: "Pace"

    @property
    def done(self) -> tuple[float, float] | None: ...

    @property
    def running(self) -> bool: ...

    def elapsed(self) -> float: ...


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
    # no hourglass emoji: Debian's Chromium without an emoji font drew it as an empty box
    return f'<div class="dp-msg dp-info dp-queued">{html.escape(text)}</div>'


def never_started_html(job: Job) -> str:
    """The status line of a job that left the line before its turn."""
    return message_html(f"Cancelled before it started ({job.reason or 'cancelled'}): your {job.kind} never ran, "
                        "so nothing was trained and no ε was spent.", "warn")
