"""Scoring the queue's predicted starts and finishes against the real ones, as the ETA is
scored.

A runner sink (:class:`QueueScorer`): after each applied step it reads the queues'
forecast (:func:`telemetry.projections.queues.forecast`) at the step's newest event time —
event time, not the wall clock, so a catch-up scores what was predictable then — and keeps
each waiting job's predicted starts (and the finishes issued with them) as they are issued.
When the job's ``JobStarted`` arrives (the runner cuts its steps before each one, so the
forecast read just before is the state the job left the queue from), two of them are scored,
at checkpoints of the job's *actual* wait (so no prediction is scored at a moment of its own
choosing):

``first``
    the first prediction the job got (a job is predicted once a live worker serves its queue
    and the durations ahead are known): what a client is told when it submits;
``half``
    the prediction in effect halfway through the actual wait (none: not scored).

Each score is the signed relative error of the predicted remaining wait,
``(predicted − actual) / actual``, both from when the prediction was issued, and whether the
actual start fell inside its p10–p90 interval.

The predicted finish issued with each scored prediction (if it had one: a finish needs the
job's own expected duration) is kept until the job ends. A ``JobCompleted`` scores it the same
way: the signed relative error of the predicted remaining time to the job's end, from when it
was issued, and whether the actual end (the ``JobCompleted``'s time) fell inside its p10–p90.
A job that fails or is cancelled is not scored (as the ETA's residuals are not); one that
started but never ends is forgotten with the bound (:data:`MAX_PENDING`).

The scores live in this sink, not in a projection (a prediction needs a "now" and the ETA
projection's state, which a fold of its own events cannot see); they start from zero when the
server restarts, as counters may.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Final

from telemetry.events import (
    Event,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobQueued,
    JobStarted,
)
from telemetry.projections.eta import Histogram
from telemetry.projections.queues import Interval, forecast
from telemetry.runner import Applied, Sink

#: Waits (and times to finish) shorter than this (seconds) are scored against it: a job that
#: starts the instant it is predicted has no wait to be relatively wrong about.
MIN_WAIT_S: Final = 0.05
#: Jobs whose predictions are kept while they wait, and started jobs whose predicted finishes
#: are kept while they run (the oldest of each are forgotten beyond it).
MAX_PENDING: Final = 100_000
#: Predictions kept per waiting job: beyond it every other one is dropped (the first stays).
MAX_PER_JOB: Final = 64
#: Between queue changes, the waiting jobs' predictions are read again at most this often
#: (event time, ns): a forecast costs ~4 µs per waiting job.
PREDICT_EVERY_NS: Final = 250_000_000
#: The checkpoints, as fractions of the actual wait (``first`` is the first prediction).
CHECKPOINTS: Final = (("first", None), ("half", 0.5))

#: A prediction: (issued at, queue, predicted start, predicted finish), unix seconds.
_Prediction = tuple[float, str, Interval, Interval | None]
#: A predicted finish awaiting the job's end: (checkpoint, issued at, queue, finish).
_Finish = tuple[str, float, str, Interval]
#: Scores by (queue, checkpoint).
Scores = dict[tuple[str, str], Histogram]


#: The types that move a queue: a job joins one, leaves it, or frees a slot (exact types).
_MOVING: Final = frozenset({JobQueued, JobStarted, JobCompleted, JobFailed, JobCancelled})


class QueueScorer(Sink):
    """Scores each queued job's predicted start when it really starts, and the finish
    predicted with it when it completes (by queue and checkpoint)."""

    name = "queue-scores"
    cut_before = frozenset({JobStarted})

    def __init__(self) -> None:
        self._pending: dict[str, list[_Prediction]] = {}
        self._queued_at: dict[str, float] = {}
        #: Started jobs' predicted finishes, one per scored checkpoint, until they end.
        self._running: dict[str, list[_Finish]] = {}
        self._lock = threading.Lock()
        self._predicted_ts = 0  # event time of the latest forecast
        #: (queue, checkpoint) → histogram of signed relative errors (coverage, |error| sums)
        #: of predicted starts, and of predicted finishes.
        self.scores: Scores = {}
        self.finish_scores: Scores = {}
        #: The batch :meth:`cuts_before` last looked into, and the jobs queued in it.
        self._queued_in: tuple[Sequence[Event], set[str]] = ((), set())

    def cuts_before(self, events: Sequence[Event], index: int,
                    states: dict[str, Any]) -> bool:
        """Only a job that waited in a queue needs the forecast made just before it starts:
        one waiting as of the last cut (the queues projection says), or queued in this batch.
        Most jobs never queue, and a cut before each of their starts made a real
        ``wantel serve`` taking a burst a fifth slower (``benchmarks/serve_catchup.py``)."""
        job = events[index].job
        queues = states.get("queues")
        if queues is not None and job in queues.waiting:
            return True
        if self._queued_in[0] is not events:  # one pass per batch, only when a start asks
            self._queued_in = (events, {e.job for e in events if type(e) is JobQueued})
        return job in self._queued_in[1]

    def on_applied(self, applied: Applied) -> None:
        """Score the jobs that started or completed; record the waiting ones' current
        predictions."""
        if not applied.events:
            return
        newest = applied.newest_ts
        moved = False  # did a job join or leave a queue, or a slot free up?
        # Most steps are steps and samples only: no pass over them then. In a pass, the
        # others are skipped by exact type (as ``kinds`` is built), one hash lookup each: an
        # isinstance chain (a union among them) cost ~0.4 µs an event, ~8 % of a burst's
        # catch-up in a real ``wantel serve`` (benchmarks/serve_catchup.py).
        moving = _MOVING
        for event in applied.events if not applied.kinds.isdisjoint(moving) else ():
            if type(event) not in moving:
                continue
            moved = True
            if type(event) is JobQueued:
                self._queued_at[event.job] = event.ts / 1e9
            elif type(event) is JobStarted:
                self._score_start(event.job, event.ts / 1e9)
            else:  # it ended
                if type(event) is JobCompleted:
                    self._score_finish(event.job, event.ts / 1e9)
                else:
                    self._running.pop(event.job, None)  # not scored, as the ETA is not
                self._pending.pop(event.job, None)  # ended without starting: nothing to score
                self._queued_at.pop(event.job, None)
        for kept in (self._running, self._queued_at):  # they grow only above
            while len(kept) > MAX_PENDING:
                del kept[next(iter(kept))]
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
            if made and made[-1][2:] == (place.start, place.finish):
                continue  # the same prediction again
            made.append((ahead.now, place.queue, place.start, place.finish))
            if len(made) > MAX_PER_JOB:
                made[1:] = made[2::2]
        while len(self._pending) > MAX_PENDING:
            del self._pending[next(iter(self._pending))]

    def _score_start(self, job: str, started: float) -> None:
        """Score the predictions chosen at each checkpoint against the actual start; keep the
        finishes issued with them for the job's end."""
        made = self._pending.pop(job, None)
        queued = self._queued_at.pop(job, None)
        if not made:
            return
        finishes: list[_Finish] = []
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
            issued, queue, start, finish = chosen
            self._add(self.scores, (queue, checkpoint), issued, start, started)
            if finish is not None:
                finishes.append((checkpoint, issued, queue, finish))
        if finishes:
            self._running[job] = finishes

    def _score_finish(self, job: str, ended: float) -> None:
        """Score the finishes kept when ``job`` started against its actual end."""
        for checkpoint, issued, queue, finish in self._running.pop(job, ()):
            self._add(self.finish_scores, (queue, checkpoint), issued, finish, ended)

    def _add(self, scores: Scores, key: tuple[str, str], issued: float, predicted: Interval,
             actual_at: float) -> None:
        """One score under ``key`` (queue, checkpoint): the signed relative error of the time
        from ``issued`` to the predicted moment against the time to the actual one, and
        whether the actual one fell inside p10–p90."""
        actual = max(actual_at - issued, MIN_WAIT_S)
        error = (predicted.at - issued - actual) / actual
        covered = predicted.p10 <= actual_at <= predicted.p90
        with self._lock:
            scores.setdefault(key, Histogram()).add(error, covered)

    def read(self) -> tuple[Scores, Scores]:
        """Copies of the start scores and the finish scores by (queue, checkpoint), for a
        scrape on another thread."""
        with self._lock:
            return _copy(self.scores), _copy(self.finish_scores)


def _copy(scores: Scores) -> Scores:
    return {key: Histogram(counts=list(h.counts), total=h.total, sum=h.sum, sum_abs=h.sum_abs,
                           covered=h.covered)
            for key, h in scores.items()}


__all__ = ["CHECKPOINTS", "QueueScorer", "Scores"]
