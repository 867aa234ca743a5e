"""Scoring the queue's predicted starts against the real ones, as the ETA is scored.

A runner sink (:class:`QueueStartScorer`): after each applied step it reads the queues'
forecast (:func:`telemetry.projections.queues.forecast`) at the step's newest event time —
event time, not the wall clock, so a catch-up scores what was predictable then — and keeps,
for each waiting job, the *first* predicted start it could issue (a job is predicted once a
live worker serves its queue and the durations ahead are known). When the job's
``JobStarted`` arrives (the runner cuts its steps before each one, so the forecast read just
before is the state the job left the queue from), the prediction is scored: the signed
relative error of the predicted wait, ``(predicted − actual) / actual`` with both measured
from when it was issued, and whether the actual start fell inside the p10–p90 interval.

The scores live in this sink, not in a projection (a prediction needs a "now" and the ETA
projection's state, which a fold of its own events cannot see); they start from zero when the
server restarts, as counters may.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Final

from telemetry.events import JobCancelled, JobCompleted, JobFailed, JobStarted
from telemetry.projections.eta import Histogram
from telemetry.projections.queues import Interval, forecast
from telemetry.runner import Applied, Sink

#: Waits shorter than this (seconds) are scored against it: a job that starts the instant it
#: is predicted has no wait to be relatively wrong about.
MIN_WAIT_S: Final = 0.05
#: Predictions kept for jobs not started yet (the oldest are forgotten beyond it).
MAX_PENDING: Final = 100_000


@dataclass(frozen=True, slots=True)
class _Prediction:
    queue: str
    issued: float
    start: Interval


class QueueStartScorer(Sink):
    """Scores each queued job's first predicted start when it really starts (by queue)."""

    name = "queue-start-scores"
    cut_before = frozenset({JobStarted})

    def __init__(self) -> None:
        self._pending: dict[str, _Prediction] = {}
        self._lock = threading.Lock()
        #: queue → histogram of signed relative errors (with coverage and |error| sums).
        self.scores: dict[str, Histogram] = {}

    def on_applied(self, applied: Applied) -> None:
        """Score the jobs that started; predict the waiting ones not predicted yet."""
        if not applied.events:
            return
        newest = max(event.ts for event in applied.events)
        for event in applied.events:
            if isinstance(event, JobStarted):
                self._score(event.job, event.ts / 1e9)
            elif isinstance(event, JobCompleted | JobFailed | JobCancelled):
                self._pending.pop(event.job, None)  # ended without starting: nothing to score
        states = applied.engine.states
        queues = states.get("queues")
        if queues is None or all(job in self._pending for job in queues.waiting):
            return
        ahead = forecast(states, newest / 1e9)
        for job, place in ahead.jobs.items():
            if job not in self._pending and place.start is not None:
                self._pending[job] = _Prediction(place.queue, ahead.now, place.start)
        while len(self._pending) > MAX_PENDING:
            del self._pending[next(iter(self._pending))]

    def _score(self, job: str, started: float) -> None:
        made = self._pending.pop(job, None)
        if made is None:
            return
        actual = max(started - made.issued, MIN_WAIT_S)
        error = (made.start.at - made.issued - actual) / actual
        covered = made.start.p10 <= started <= made.start.p90
        with self._lock:
            self.scores.setdefault(made.queue, Histogram()).add(error, covered)

    def read(self) -> dict[str, Histogram]:
        """A copy of the scores by queue (for a scrape, on another thread)."""
        with self._lock:
            return {queue: Histogram(counts=list(h.counts), total=h.total, sum=h.sum,
                                     sum_abs=h.sum_abs, covered=h.covered)
                    for queue, h in self.scores.items()}


__all__ = ["QueueStartScorer"]
