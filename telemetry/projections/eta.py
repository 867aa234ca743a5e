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

from typing import Final

import msgspec

from telemetry.eta.live import Estimate, LiveJob
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
from telemetry.projections.base import bounded_insert

#: Upper edges of the signed relative-error histogram (−1 … +1 and beyond).
ERROR_EDGES: Final = (-0.5, -0.25, -0.1, -0.05, 0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
KEEP_FINISHED: Final = 10_000
#: ETAs issued per denoising loop (plus the first two steps and the last): enough to follow
#: the loop closely, few enough that replay stays fast and residuals stay per-progress.
ISSUES_PER_DENOISE: Final = 10


class EtaPoint(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """One ETA issued at ``ts``: remaining seconds, interval, progress, still estimating."""

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
        if not self.counts:
            self.counts = [0] * (len(ERROR_EDGES) + 1)
        index = next((i for i, edge in enumerate(ERROR_EDGES) if error <= edge),
                     len(ERROR_EDGES))
        self.counts[index] += 1
        self.total += 1
        self.sum += error
        self.sum_abs += abs(error)
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


class EtaProjection:
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

    def initial(self) -> EtaState:
        """No calibration, no jobs."""
        return EtaState()

    def apply(self, state: EtaState, event: Event) -> EtaState:
        """Update the job's estimator and issue a new ETA; score it when the job ends."""
        kind = type(event)
        if kind is StepEnded:
            running = state.running.get(event.job)
            if running is not None:
                assert isinstance(event, StepEnded)
                running.live.step_ended(total_steps=event.total_steps,
                                        duration_s=event.duration_s, expert=event.expert,
                                        ts=event.ts)
                done, total = event.step + 1, event.total_steps
                if done <= 2 or done >= total or done % max(total // ISSUES_PER_DENOISE, 1) == 0:
                    _issue(running, event.ts)
        elif kind is StageStarted or kind is StageEnded:
            running = state.running.get(event.job)
            if running is not None:
                if isinstance(event, StageStarted):
                    running.live.stage_started(event.stage, event.ts)
                else:
                    assert isinstance(event, StageEnded)
                    running.live.stage_ended(event.stage, event.duration_s)
                _issue(running, event.ts)
        elif kind is JobStarted:
            assert isinstance(event, JobStarted)
            running = RunningEta(model=event.model,
                                 live=LiveJob.start(event, state.calibration))
            bounded_insert(state.running, event.job, running)
            _issue(running, event.ts)
        elif kind is JobCompleted:
            self._completed(state, event)
        elif kind is JobFailed or kind is JobCancelled:
            state.running.pop(event.job, None)
        elif kind is EtaCalibrated:
            assert isinstance(event, EtaCalibrated)
            state.calibration = Calibration(
                coefficients=event.coefficients, rel_sigma=event.rel_sigma,
                warmup=event.warmup, quantiles=event.quantiles, jobs=event.jobs)
        return state

    def _completed(self, state: EtaState, event: Event) -> None:
        running = state.running.pop(event.job, None)
        if running is None:
            return
        assert isinstance(event, JobCompleted)
        by_bucket: dict[str, list[float]] = {}
        histograms = state.residuals.setdefault(running.model, {})
        history: list[EtaPoint] = []
        before_start: float | None = None
        for index, point in enumerate(running.issued):
            actual = (event.ts - point.ts) / 1e9
            if actual <= 1e-3:
                continue
            error = (point.remaining_s - actual) / actual
            covered = point.p10_s <= actual <= point.p90_s
            if index == 0:
                before_start = error
                state.before_start.setdefault(running.model, Histogram()).add(error, covered)
                continue
            bucket = bucket_of(point.progress)
            if bucket not in by_bucket:
                history.append(point)
            by_bucket.setdefault(bucket, []).append(error)
            histograms.setdefault(bucket, Histogram()).add(error, covered)
        state.finished[event.job] = FinishedEta(
            model=running.model, status="completed", duration_s=event.duration_s,
            before_start_error=before_start,
            residuals={b: sum(v) / len(v) for b, v in by_bucket.items()},
            history=history)
        while len(state.finished) > self.keep_finished:
            del state.finished[next(iter(state.finished))]


def _issue(running: RunningEta, ts: int) -> None:
    estimate: Estimate = running.live.estimate(ts)
    running.issued.append(EtaPoint(ts=ts, remaining_s=estimate.remaining_s,
                                   p10_s=estimate.p10_s, p90_s=estimate.p90_s,
                                   progress=estimate.progress, estimating=estimate.estimating))


def current(state: EtaState, job: str) -> EtaPoint | None:
    """The latest ETA of a running job."""
    running = state.running.get(job)
    return running.issued[-1] if running is not None and running.issued else None


__all__ = ["BUCKETS", "ERROR_EDGES", "EtaPoint", "EtaProjection", "EtaState", "current"]
