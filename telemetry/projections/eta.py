"""The ETA projection: each running job's ETA with its interval, and how wrong past ETAs were.

Every ETA issued during a job (at its start, at each stage boundary, and at about ten evenly
spaced steps of the denoising loop) is kept until the job ends. When it completes, each one is
scored — the signed relative error of the predicted remaining time against the actual
remaining time — by the progress bucket it was
issued in, and the before-start estimate separately. Those residuals are the feature no peer
has: a dashboard of how much to trust the ETA.

The calibration in force is the latest ``EtaCalibrated`` event before the job started, so a
replay reproduces every ETA exactly.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Final

import msgspec

from telemetry.eta.live import WARMUP_WEIGHT, LiveJob, PriorCache
from telemetry.eta.model import BUCKETS, Calibration, bucket_of
from telemetry.events import (
    EtaCalibrated,
    Event,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobStarted,
    StageEnded,
    StageStarted,
    StepEnded,
)
from telemetry.projections.base import BatchFold, OnFailure, bounded_insert

#: Upper edges of the signed relative-error histogram (−1 … +1 and beyond).
ERROR_EDGES: Final = (-0.5, -0.25, -0.1, -0.05, 0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
_LAST_EDGE: Final = ERROR_EDGES[-1]
_OVERFLOW: Final = len(ERROR_EDGES)  # the counts' last slot: beyond every edge
KEEP_FINISHED: Final = 10_000
#: ETAs issued per denoising loop (plus the first two steps and the last): enough to follow
#: the loop closely, few enough that replay stays fast and residuals stay per-progress.
ISSUES_PER_DENOISE: Final = 10


class EtaPoint(msgspec.Struct, frozen=True, kw_only=True, array_like=True, gc=False):
    """One ETA issued at ``ts``: remaining seconds, interval, progress, still estimating.

    ``gc=False``: only scalars, so never part of a cycle; a server keeps a dozen per running
    job and one per bucket per finished job, which the cyclic collector need not walk.
    """

    ts: int
    remaining_s: float
    p10_s: float
    p90_s: float
    progress: float
    estimating: bool


class Histogram(msgspec.Struct, kw_only=True):
    """Cumulative-friendly counts of signed relative errors, with sum and coverage."""

    counts: list[int] = []
    total: int = 0
    sum: float = 0.0
    sum_abs: float = 0.0
    covered: int = 0

    def add(self, error: float, covered: bool) -> None:
        """Count one scored ETA."""
        self.add_all([error], covered)

    def add_all(self, errors: list[float], covered: int) -> None:
        """Count scored ETAs, ``covered`` of them inside their interval: ``add`` on each in turn.

        A completed job scores a dozen ETAs into a few buckets; reading and writing each field
        once per bucket instead of once per ETA is most of the cost of scoring. The sums are
        still added one error at a time, in order.
        """
        if not errors:
            return
        counts = self.counts
        if not counts:
            counts = self.counts = [0] * (len(ERROR_EDGES) + 1)
        total, sum_, sum_abs = self.total, self.sum, self.sum_abs
        for error in errors:
            # The first edge with error <= edge, else one past the last (NaN too: bisect
            # alone would put NaN in the first bucket).
            counts[bisect_left(ERROR_EDGES, error) if error <= _LAST_EDGE else _OVERFLOW] += 1
            total += 1
            sum_ += error
            sum_abs += abs(error)
        self.total, self.sum, self.sum_abs = total, sum_, sum_abs
        self.covered += covered


class RunningEta(msgspec.Struct, kw_only=True):
    """A running job's estimator and every ETA it issued so far."""

    model: str
    live: LiveJob
    issued: list[EtaPoint] = []


class FinishedEta(msgspec.Struct, kw_only=True):
    """A finished job's ETA story: the first ETA of each bucket and its residual."""

    model: str
    status: str
    duration_s: float
    before_start_error: float | None = None
    residuals: dict[str, float] = {}  # bucket → mean signed relative error
    history: list[EtaPoint] = []  # the first ETA issued in each progress bucket


class EtaState(msgspec.Struct, kw_only=True):
    """Calibration in force, running estimators, finished jobs' residuals, aggregates."""

    calibration: Calibration = Calibration()
    running: dict[str, RunningEta] = {}
    finished: dict[str, FinishedEta] = {}
    residuals: dict[str, dict[str, Histogram]] = {}  # model → bucket → histogram
    before_start: dict[str, Histogram] = {}  # model → histogram


class EtaProjection(BatchFold):
    """Fold job events into live ETAs and, at completion, into residuals."""

    name = "eta"
    version = 1
    state_type = EtaState
    handles = frozenset({
        JobStarted, StageStarted, StageEnded, StepEnded, EtaCalibrated, JobCompleted,
        JobFailed, JobCancelled,
    })

    def __init__(self, keep_finished: int = KEEP_FINISHED) -> None:
        self.keep_finished = keep_finished
        # Memoised priors (not state: LiveJob.start's result, whatever the cache holds).
        self._priors = PriorCache()

    def initial(self) -> EtaState:
        """No calibration, no jobs."""
        return EtaState()

    def apply_many(self, state: EtaState, events: Sequence[Event],
                   failed: OnFailure) -> EtaState:
        """Update each job's estimator and issue new ETAs; score them when the job ends.

        ``StepEnded`` is three events in four of a replay, and most issue no ETA: its path
        is ``LiveJob.step_ended`` inlined, with the issue cadence's divisor kept between
        events of the same ``total_steps``.
        """
        running_of = state.running.get
        issue, point = _issue, EtaPoint
        per_denoise = ISSUES_PER_DENOISE
        warmup_weight = WARMUP_WEIGHT
        every_total, every = None, 1  # max(total // ISSUES_PER_DENOISE, 1) of every_total
        for event in events:
            try:
                if type(event) is StepEnded:  # narrows for mypy, at no cost per event
                    running = running_of(event.job)
                    if running is None:
                        continue
                    live = running.live
                    # LiveJob.step_ended, inlined (keep the two the same); a write to a
                    # struct costs four reads, so an unchanged total_steps is not rewritten.
                    steps_done = live.steps_done + 1
                    total = event.total_steps
                    steps = steps_done if steps_done > total else total  # max(total, done)
                    if steps is not live.total_steps:
                        live.total_steps = steps
                    live.steps_done = steps_done
                    ts = live.last_step_ts = event.ts
                    expert = event.expert
                    if expert != live.expert:
                        if live.expert is not None and live.segment_n > 0:
                            live.segment_prior = live._step_mean()
                        live.expert = expert
                        live.segment_sum, live.segment_n = 0.0, 0.0
                    duration_s = event.duration_s
                    if duration_s is not None:
                        seen = live.steps_seen = live.steps_seen + 1
                        if seen == 1:
                            live.first_step_s = duration_s
                            live.segment_sum += warmup_weight * (duration_s
                                                                 / max(live.warmup, 1e-6))
                            live.segment_n += warmup_weight
                        else:
                            live.segment_sum += 1.0 * duration_s
                            live.segment_n += 1.0
                    done = event.step + 1
                    if not (done <= 2 or done >= total):
                        if total != every_total:
                            every_total, every = total, max(total // per_denoise, 1)
                        if done % every:
                            continue
                    remaining, low, high, progress, estimating = live.estimate_fields(ts)
                    running.issued.append(point(ts=ts, remaining_s=remaining, p10_s=low,
                                                p90_s=high, progress=progress,
                                                estimating=estimating))
                    continue
                kind = type(event)
                if kind is StageStarted or kind is StageEnded:
                    running = running_of(event.job)
                    if running is not None:
                        if isinstance(event, StageStarted):
                            running.live.stage_started(event.stage, event.ts)
                        else:
                            assert isinstance(event, StageEnded)
                            running.live.stage_ended(event.stage, event.duration_s)
                        issue(running, event.ts)
                elif kind is JobStarted:
                    assert isinstance(event, JobStarted)
                    running = RunningEta(model=event.model,
                                         live=self._priors.start(event, state.calibration))
                    bounded_insert(state.running, event.job, running)
                    issue(running, event.ts)
                elif kind is JobCompleted:
                    assert isinstance(event, JobCompleted)
                    self._completed(state, event)
                elif kind is JobFailed or kind is JobCancelled:
                    state.running.pop(event.job, None)
                elif kind is EtaCalibrated:
                    assert isinstance(event, EtaCalibrated)
                    state.calibration = Calibration(
                        coefficients=event.coefficients, rel_sigma=event.rel_sigma,
                        warmup=event.warmup, quantiles=event.quantiles, jobs=event.jobs)
            except Exception as exc:
                failed(event, exc)
        return state

    def _completed(self, state: EtaState, event: JobCompleted) -> None:
        """Score every ETA the job was issued: its residuals, and the model's histograms."""
        running = state.running.pop(event.job, None)
        if running is None:
            return
        model = running.model
        histograms = state.residuals.setdefault(model, {})
        by_bucket: dict[str, list[float]] = {}  # in the order buckets were first reached
        covered_in: dict[str, int] = {}
        history: list[EtaPoint] = []
        before_start: float | None = None
        end_ts = event.ts
        for index, point in enumerate(running.issued):
            actual = (end_ts - point.ts) / 1e9
            if actual <= 1e-3:
                continue
            error = (point.remaining_s - actual) / actual
            covered = point.p10_s <= actual <= point.p90_s
            if index == 0:
                before_start = error
                histogram = state.before_start.get(model)
                if histogram is None:
                    histogram = state.before_start[model] = Histogram()
                histogram.add(error, covered)
                continue
            bucket = bucket_of(point.progress)
            errors = by_bucket.get(bucket)
            if errors is None:
                history.append(point)
                by_bucket[bucket] = [error]
                covered_in[bucket] = covered
            else:
                errors.append(error)
                covered_in[bucket] += covered
        for bucket, errors in by_bucket.items():
            histogram = histograms.get(bucket)
            if histogram is None:
                histogram = histograms[bucket] = Histogram()
            histogram.add_all(errors, covered_in[bucket])
        finished = state.finished
        finished[event.job] = FinishedEta(
            model=model, status="completed", duration_s=event.duration_s,
            before_start_error=before_start,
            residuals={b: sum(v) / len(v) for b, v in by_bucket.items()},
            history=history)
        while len(finished) > self.keep_finished:
            del finished[next(iter(finished))]


def _issue(running: RunningEta, ts: int) -> None:
    remaining, low, high, progress, estimating = running.live.estimate_fields(ts)
    running.issued.append(EtaPoint(ts=ts, remaining_s=remaining, p10_s=low, p90_s=high,
                                   progress=progress, estimating=estimating))


def current(state: EtaState, job: str) -> EtaPoint | None:
    """The latest ETA of a running job."""
    running = state.running.get(job)
    return running.issued[-1] if running is not None and running.issued else None


__all__ = ["BUCKETS", "ERROR_EDGES", "EtaPoint", "EtaProjection", "EtaState", "current"]
