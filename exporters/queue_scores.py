"""Scoring the queue's predicted starts against the real ones, as the ETA is scored.

A runner sink (:class:`QueueStartScorer`): after each applied step it reads the queues'
forecast (:func:`telemetry.projections.queues.forecast`) at the step's newest event time —
event time, not the wall clock, so a catch-up scores what was predictable then — and keeps
each waiting job's predicted starts as they are issued. When the job's ``JobStarted`` arrives
(the runner cuts its steps before each one, so the forecast read just before is the state the
job left the queue from), two of them are scored, at checkpoints of the job's *actual* wait
(so no prediction is scored at a moment of its own choosing):

``first``
    the first prediction the job got (a job is predicted once a live worker serves its queue
    and the durations ahead are known): what a client is told when it submits;
``half``
    the prediction in effect halfway through the actual wait (none: not scored).

Each score is the signed relative error of the predicted remaining wait,
``(predicted − actual) / actual``, both from when the prediction was issued, and whether the
actual start fell inside its p10–p90 interval.

The scores live in this sink, not in a projection (a prediction needs a "now" and the ETA
projection's state, which a fold of its own events cannot see); they start from zero when the
server restarts, as counters may.
"""

from __future__ import annotations

import threading
from typing import Final

from telemetry.events import JobCancelled, JobCompleted, JobFailed, JobQueued, JobStarted
from telemetry.projections.eta import Histogram
from telemetry.projections.queues import Interval, forecast
from telemetry.runner import Applied, Sink

#: Waits shorter than this (seconds) are scored against it: a job that starts the instant it
#: is predicted has no wait to be relatively wrong about.
MIN_WAIT_S: Final = 0.05
#: Jobs whose predictions are kept while they wait (the oldest are forgotten beyond it).
MAX_PENDING: Final = 100_000
#: Predictions kept per waiting job: beyond it every other one is dropped (the first stays).
MAX_PER_JOB: Final = 64
#: Between queue changes, the waiting jobs' predictions are read again at most this often
#: (event time, ns): a forecast costs ~4 µs per waiting job.
PREDICT_EVERY_NS: Final = 250_000_000
#: The checkpoints, as fractions of the actual wait (``first`` is the first prediction).
CHECKPOINTS: Final = (("first", None), ("half", 0.5))

#: A prediction: (issued at, queue, predicted start), unix seconds.
_Prediction = tuple[float, str, Interval]


class QueueStartScorer(Sink):
    """Scores each queued job's predicted start when it really starts (by queue and
    checkpoint)."""

    name = "queue-start-scores"
    cut_before = frozenset({JobStarted})

    def __init__(self) -> None:
        self._pending: dict[str, list[_Prediction]] = {}
        self._queued_at: dict[str, float] = {}
        self._lock = threading.Lock()
        self._predicted_ts = 0  # event time of the latest forecast
        #: (queue, checkpoint) → histogram of signed relative errors (coverage, |error| sums).
        self.scores: dict[tuple[str, str], Histogram] = {}

    def on_applied(self, applied: Applied) -> None:
        """Score the jobs that started; record the waiting ones' current predictions."""
        if not applied.events:
            return
        newest = max(event.ts for event in applied.events)
        moved = False  # did a job join or leave a queue, or a slot free up?
        for event in applied.events:
            if isinstance(event, JobQueued):
                self._queued_at[event.job] = event.ts / 1e9
                moved = True
            elif isinstance(event, JobStarted):
                self._score(event.job, event.ts / 1e9)
                moved = True
            elif isinstance(event, JobCompleted | JobFailed | JobCancelled):
                self._pending.pop(event.job, None)  # ended without starting: nothing to score
                self._queued_at.pop(event.job, None)
                moved = True
        states = applied.engine.states
        queues = states.get("queues")
        if queues is None or not queues.waiting:
            return
        if not moved and newest - self._predicted_ts < PREDICT_EVERY_NS:
            return  # the ETAs move between, but a forecast per batch would cost too much
        self._predicted_ts = newest
        ahead = forecast(states, newest / 1e9)
        for job, place in ahead.jobs.items():
            if place.start is None:
                continue
            made = self._pending.setdefault(job, [])
            if made and made[-1][2] == place.start:
                continue  # the same prediction again
            made.append((ahead.now, place.queue, place.start))
            if len(made) > MAX_PER_JOB:
                made[1:] = made[2::2]
        while len(self._pending) > MAX_PENDING:
            del self._pending[next(iter(self._pending))]
        while len(self._queued_at) > MAX_PENDING:
            del self._queued_at[next(iter(self._queued_at))]

    def _score(self, job: str, started: float) -> None:
        made = self._pending.pop(job, None)
        queued = self._queued_at.pop(job, None)
        if not made:
            return
        for checkpoint, fraction in CHECKPOINTS:
            if fraction is None:
                chosen: _Prediction | None = made[0]
            else:
                at = (queued if queued is not None else made[0][0])
                at += fraction * (started - at)
                chosen = None
                for prediction in made:
                    if prediction[0] > at:
                        break
                    chosen = prediction
            if chosen is None:
                continue
            issued, queue, start = chosen
            actual = max(started - issued, MIN_WAIT_S)
            error = (start.at - issued - actual) / actual
            covered = start.p10 <= started <= start.p90
            with self._lock:
                self.scores.setdefault((queue, checkpoint), Histogram()).add(error, covered)

    def read(self) -> dict[tuple[str, str], Histogram]:
        """A copy of the scores by (queue, checkpoint), for a scrape on another thread."""
        with self._lock:
            return {key: Histogram(counts=list(h.counts), total=h.total, sum=h.sum,
                                   sum_abs=h.sum_abs, covered=h.covered)
                    for key, h in self.scores.items()}


__all__ = ["CHECKPOINTS", "QueueStartScorer"]
