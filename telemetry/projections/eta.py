"""The ETA projection: each running job's ETA with its interval, and how wrong past ETAs were.

Every ETA issued during a job (at its start, at each stage boundary, and at about ten evenly
spaced steps of the denoising loop) is kept until the job ends. When it completes, each one is
scored — the signed relative error of the predicted remaining time against the actual
remaining time — by the progress bucket it was
issued in, and the before-start estimate separately. Those residuals are the feature no peer
has: a dashboard of how much to trust the ETA.

Completed jobs also teach the next ones (:mod:`telemetry.eta.online`): what each phase took
against what was expected is learned at once, and every scored ETA moves its bucket's interval
offsets, so the ETA adapts to the machine without anyone running a command. The base is the
latest ``EtaCalibrated`` event before the job started (which replaces what was learned online
before it); the learning is part of the state, so a replay reproduces every ETA exactly.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from functools import partial
from math import isfinite
from typing import Final, Literal

import msgspec

from telemetry.eta import online
from telemetry.eta.live import Estimator, LiveJob, PriorCache, estimator_of
from telemetry.eta.model import BUCKETS, STEP, Calibration, bucket_of
from telemetry.events import (
    EVENT_TYPES,
    EtaCalibrated,
    Event,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobStarted,
    MemorySampled,
    StageEnded,
    StageProgress,
    StageStarted,
    StepEnded,
    WorkerLost,
    WorkerStopped,
)
from telemetry.projections.base import NO_JOB, OnFailure, bounded_insert
from telemetry.projections.compare import ABS_ERROR_BUCKETS, labels_of
from telemetry.projections.metrics import HistogramSeries, observe

#: Upper edges of the signed relative-error histogram (−1 … +1 and beyond).
ERROR_EDGES: Final = (-0.5, -0.25, -0.1, -0.05, 0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
_LAST_EDGE: Final = ERROR_EDGES[-1]
_OVERFLOW: Final = len(ERROR_EDGES)  # the counts' last slot: beyond every edge
KEEP_FINISHED: Final = 10_000
#: ETAs issued per denoising loop (plus the first two steps and the last): enough to follow
#: the loop closely, few enough that replay stays fast and residuals stay per-progress.
ISSUES_PER_DENOISE: Final = 10
#: An ETA whose actual remaining time is this short (seconds) is not scored: its relative
#: error would be noise divided by almost nothing.
MIN_SCORED_S: Final = 1e-3


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

    def aged(self, seconds: float) -> tuple[float, float, float]:
        """Remaining seconds, p10 and p90 ``seconds`` after this ETA was issued: each less the
        time gone, never below 0. An ETA is issued at stage boundaries and about every tenth
        of the loop; a reader between two issues (the metrics, a queue's forecast,
        ``wantel run``'s line) counts it down."""
        return (max(self.remaining_s - seconds, 0.0), max(self.p10_s - seconds, 0.0),
                max(self.p90_s - seconds, 0.0))


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
    #: The comparison's labels (:func:`telemetry.projections.compare.labels_of`).
    labels: tuple[str, ...] = ()


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
    learned: online.Learned = msgspec.field(default_factory=online.Learned)
    running: dict[str, RunningEta] = {}
    finished: dict[str, FinishedEta] = {}
    residuals: dict[str, dict[str, Histogram]] = {}  # model → bucket → histogram
    before_start: dict[str, Histogram] = {}  # model → histogram
    #: |before-start error| by the comparison's labels (model, variant, worker, device), in
    #: the comparison's buckets: the Compare dashboard's ETA error.
    before_start_by: dict[str, HistogramSeries] = {}
    #: Workers that completed a job and have not stopped since, oldest first: their next jobs
    #: are warm (:func:`telemetry.eta.live.device_level`).
    warm: dict[str, None] = {}


class EtaProjection:
    """Fold job events into live ETAs and, at completion, into residuals.

    The estimate is the ETA model's (:mod:`telemetry.eta.live`): this fold only starts each
    job's estimator with the calibration in force, hands it the job's events, records the
    ETAs it gives, and scores them when the job completes.
    """

    name = "eta"
    #: 3: the before-start error by the comparison's labels (``before_start_by``), and a
    #: non-Wan family's online learning under its own device level (a version 2 checkpoint
    #: has neither: replaying learns and scores them). 4: a worker's later jobs learn apart
    #: from its first (``warm``). 5: a stage's pieces (``StageProgress``) move its ETA.
    #: 6: a phase's time carries a millisecond of noise as evidence of the job's speed; the
    #: save stage's prior on a CPU is measured (``benchmarks/save_cost.py``). 7: the tiny
    #: CPU priors, every phase measured in one run (``benchmarks/tiny_priors.py``); a job's
    #: estimator keeps its decode's first-piece share (CogVideoX's pieces are equal); the
    #: learned spreads skip phases that started at their base.
    version = 7
    state_type = EtaState
    handles = frozenset({
        JobStarted, StageStarted, StageEnded, StageProgress, StepEnded, EtaCalibrated,
        JobCompleted, JobFailed, JobCancelled, WorkerStopped, WorkerLost,
    })
    #: Memory samples (a third of a log) and every other type: skipped by the fast path's own
    #: loop, which costs less than the engine's filter pass over every batch.
    passes = frozenset(EVENT_TYPES) - handles

    def __init__(self, keep_finished: int = KEEP_FINISHED,
                 estimator: Literal["c", "python"] | None = None) -> None:
        """``estimator``: ``"python"`` the :class:`~telemetry.eta.live.LiveJob` methods,
        ``"c"`` their C twin where built, ``None`` the process-wide default (C where built):
        :func:`~telemetry.eta.live.estimator_of`. Same ETAs, same state; ``self.estimator``
        says which runs."""
        self.keep_finished = keep_finished
        self._estimator: Estimator = estimator_of(estimator)
        self.estimator = self._estimator.what
        self._score_issued: Callable[[Sequence[EtaPoint], int], list[BucketScore]] = (
            self._estimator.score_issued or score_issued)
        self._learn = self._estimator.learn
        self._add_all: Callable[[Histogram, list[float], int], None] = (
            self._estimator.add_all or Histogram.add_all)
        self._issue: Callable[[RunningEta, int], None] = self._estimator.issue or partial(
            _issue, estimate_fields=self._estimator.estimate_fields)
        # Memoised priors (not state: LiveJob.start's result, whatever the cache holds).
        self._priors = PriorCache(corrector=self._estimator.corrected)

    def initial(self) -> EtaState:
        """No calibration, no jobs."""
        return EtaState()

    def apply(self, state: EtaState, event: Event) -> EtaState:
        """The rule: start, update and score each job's estimator.

        - ``EtaCalibrated``: the calibration in force for jobs that start after it.
        - ``EtaCalibrated`` also forgets what was learned online (the fit saw those jobs).
        - ``JobStarted``: the job's estimator starts from its prior under that calibration,
          corrected by what was learned online (:meth:`PriorCache.start`, which is
          :meth:`LiveJob.start` memoised) and issues the job's first ETA, the before-start one.
          A job of a worker that completed one before (and has not stopped since) is warm: it
          learns and is predicted under the warm device level
          (:func:`~telemetry.eta.live.device_level`), its worker's first job under the plain one.
        - a stage's start, end or pieces, a step: the estimator observes it
          (:meth:`LiveJob.observe`); then, at every stage boundary, every piece of a stage
          and the steps :func:`issues_eta_at` names, it issues an ETA
          (:meth:`LiveJob.estimate_fields`).
        - ``JobCompleted``: every ETA the job was issued is scored (:meth:`_completed`), and
          what the job took is learned (:func:`telemetry.eta.online.learn`); its worker is
          warm from now on.
        - ``WorkerStopped``, ``WorkerLost``: the worker is no longer warm (its next process
          starts cold).
        - ``JobFailed``, ``JobCancelled``: the job is dropped unscored (no actual duration).

        Events of a job that is not running (never started here, or already ended) change
        nothing.
        """
        # ``type(event) is X``: the cheapest test (a fold runs it per event), and mypy narrows.
        if type(event) is StepEnded:  # most of a job's events: tested first
            running = state.running.get(event.job)
            if running is not None:
                self._estimator.step_ended(running.live, event.total_steps, event.duration_s,
                                           event.expert, event.ts)
                if issues_eta_at(event.step, event.total_steps):
                    self._issue(running, event.ts)
        elif (type(event) is StageStarted or type(event) is StageEnded
              or type(event) is StageProgress):
            running = state.running.get(event.job)
            if running is not None:
                running.live.observe(event)
                self._issue(running, event.ts)
        elif type(event) is JobStarted:
            started = RunningEta(model=event.model, live=self._priors.start(
                event, state.calibration, state.learned, warm=event.worker in state.warm),
                labels=labels_of(event))
            state.running = bounded_insert(state.running, event.job, started)
            self._issue(started, event.ts)
        elif type(event) is JobCompleted:
            self._completed(state, event)
        elif type(event) is JobFailed or type(event) is JobCancelled:
            state.running.pop(event.job, None)
        elif type(event) is WorkerStopped or type(event) is WorkerLost:
            if event.worker is not None:
                state.warm.pop(event.worker, None)
        elif type(event) is EtaCalibrated:
            state.calibration = Calibration.of(event)
            # The fit saw what was learned: that starts over; the interval's calibration stays.
            state.learned = online.Learned(offsets=state.learned.offsets)
        return state

    def apply_many(self, state: EtaState, events: Sequence[Event],
                   failed: OnFailure) -> EtaState:
        """:meth:`apply` over ``events``, each failure reported to ``failed``.

        Steps are most of a job's events: a run of one job's steps keeps the job's estimator
        in a local, and each step calls the model as :meth:`apply` does (the same calls, in
        the same order); every other event goes to :meth:`apply`, after which the local is
        looked up again (a start or an end changes the running jobs). Memory samples, a third
        of a log and nothing to this fold, are passed over without leaving the run.
        """
        apply, step_type, sample_type = self.apply, StepEnded, MemorySampled
        step_ended, issue = self._estimator.step_ended, self._issue
        job_id: object = NO_JOB
        running: RunningEta | None = None
        for event in events:
            try:
                if type(event) is step_type:
                    if event.job != job_id:
                        job_id = event.job
                        running = state.running.get(job_id)
                    if running is None:
                        continue
                    total = event.total_steps
                    step_ended(running.live, total, event.duration_s, event.expert, event.ts)
                    done = event.step + 1  # issues_eta_at, inlined
                    if (done <= 2 or done >= total
                            or done % (total // ISSUES_PER_DENOISE or 1) == 0):
                        issue(running, event.ts)
                elif type(event) is not sample_type:
                    job_id = NO_JOB
                    state = apply(state, event)
            except Exception as exc:
                job_id = NO_JOB
                failed(event, exc)
        return state

    def _completed(self, state: EtaState, event: JobCompleted) -> None:
        """Score every ETA the job was issued: its residuals, and the model's histograms.

        An ETA's error is signed and relative, (predicted − actual) ÷ actual remaining time,
        and its interval covers when the actual remaining time lies in it; ETAs issued less
        than ``MIN_SCORED_S`` before the end are not scored, nor a non-finite one (a NaN
        duration in the log makes one; it would make every sum NaN for good). The first ETA
        (issued at the start) is scored on its own; the others by the bucket of the progress
        they were issued at, buckets in the order the job first reached them
        (:func:`score_issued`, or its C twin: the estimator's choice).
        """
        running = state.running.pop(event.job, None)
        if running is None:
            return
        live, learned = running.live, state.learned
        self._learn(learned, live.observations(), live.keys[STEP].component
                    if STEP in live.keys else None, live.warmup_ratio())
        if event.worker is not None:  # its next jobs are warm; the newest kept longest
            state.warm.pop(event.worker, None)
            state.warm = bounded_insert(state.warm, event.worker, None)
        model, end_ts = running.model, event.ts
        before_start: float | None = None
        if running.issued:
            first = running.issued[0]
            actual = (end_ts - first.ts) / 1e9
            if actual > MIN_SCORED_S and isfinite(first.remaining_s):
                before_start = (first.remaining_s - actual) / actual
                histogram = state.before_start.get(model)
                if histogram is None:
                    histogram = state.before_start[model] = Histogram()
                self._add_all(histogram, [before_start], first.p10_s <= actual <= first.p90_s)
                if running.labels:
                    observe(state.before_start_by, running.labels, ABS_ERROR_BUCKETS,
                            abs(before_start))
        histograms = state.residuals.setdefault(model, {})
        residuals: dict[str, float] = {}
        history: list[EtaPoint] = []  # the first ETA of each bucket
        misses: list[tuple[str, float, float]] = []
        for bucket, first_in, errors, covered, below, above in self._score_issued(
                running.issued, end_ts):
            histogram = histograms.get(bucket)
            if histogram is None:  # not setdefault: it would build a Histogram every time
                histogram = histograms[bucket] = Histogram()
            self._add_all(histogram, errors, covered)
            residuals[bucket] = sum(errors) / len(errors)
            history.append(first_in)
            misses.append((bucket, below / len(errors), above / len(errors)))
        online.score_intervals(learned, misses)
        state.finished = bounded_insert(state.finished, event.job, FinishedEta(
            model=model, status="completed", duration_s=event.duration_s,
            before_start_error=before_start, residuals=residuals, history=history),
            self.keep_finished)


def issues_eta_at(step: int, total_steps: int) -> bool:
    """Whether an ETA is issued after step ``step`` (from 0) of ``total_steps``.

    The first two steps (the estimate leaves "estimating"), the last, and about
    ``ISSUES_PER_DENOISE`` evenly spaced ones in between.
    """
    done = step + 1
    # Past the first two and before the last, total_steps > 2: `or 1` is max(…, 1) there.
    return (done <= 2 or done >= total_steps
            or done % (total_steps // ISSUES_PER_DENOISE or 1) == 0)


#: What :func:`score_issued` gives for one progress bucket: its name, the first ETA scored
#: in it, each scored ETA's signed relative error (in the order issued), how many of them
#: their interval covered, and how many it missed below (the actual remaining time under the
#: p10) and above (over the p90).
BucketScore = tuple[str, EtaPoint, list[float], int, int, int]


def score_issued(issued: Sequence[EtaPoint], end_ts: int) -> list[BucketScore]:
    """The rule that scores a completed job's ETAs, all but the first (the before-start one,
    scored on its own), grouped by the progress bucket each was issued in, buckets in the
    order the job first reached them.

    An ETA issued at ``ts`` had ``actual = (end_ts - ts) / 1e9`` seconds left; its error is
    ``(remaining_s - actual) / actual``. One issued within ``MIN_SCORED_S`` of the end, or
    with a non-finite ``remaining_s``, is not scored (and reaches no bucket).

    Pure: reads the points, changes nothing. ``telemetry/eta/_live.c`` has a C twin
    (``score_issued``: the projection's choice, with its estimator) that gives bit-identical
    errors and falls back to this function on anything unexpected.
    """
    errors_in: dict[str, list[float]] = {}  # bucket → its errors, in the order reached
    first_in: dict[str, EtaPoint] = {}
    counts_in: dict[str, list[int]] = {}  # bucket → [covered, below the p10, above the p90]
    for point in issued[1:]:
        actual = (end_ts - point.ts) / 1e9
        if actual <= MIN_SCORED_S or not isfinite(point.remaining_s):
            continue
        bucket = bucket_of(point.progress)
        errors = errors_in.get(bucket)
        if errors is None:
            errors = errors_in[bucket] = []
            first_in[bucket] = point
            counts_in[bucket] = [0, 0, 0]
        errors.append((point.remaining_s - actual) / actual)
        counts = counts_in[bucket]
        counts[0] += point.p10_s <= actual <= point.p90_s
        counts[1] += actual < point.p10_s
        counts[2] += actual > point.p90_s
    scores: list[BucketScore] = []
    for bucket, errors in errors_in.items():
        covered, below, above = counts_in[bucket]
        scores.append((bucket, first_in[bucket], errors, covered, below, above))
    return scores


def _issue(running: RunningEta, ts: int,
           estimate_fields: Callable[[LiveJob, int], tuple[float, float, float, float, bool]],
           ) -> None:
    """Record the estimator's ETA at ``ts`` (``estimate_fields``: the projection's choice of
    :meth:`LiveJob.estimate_fields` or its C twin)."""
    remaining, low, high, progress, estimating = estimate_fields(running.live, ts)
    running.issued.append(EtaPoint(ts=ts, remaining_s=remaining, p10_s=low, p90_s=high,
                                   progress=progress, estimating=estimating))


def current(state: EtaState, job: str) -> EtaPoint | None:
    """The latest ETA of a running job."""
    running = state.running.get(job)
    return running.issued[-1] if running is not None and running.issued else None


__all__ = ["BUCKETS", "ERROR_EDGES", "BucketScore", "EtaPoint", "EtaProjection", "EtaState",
           "current", "issues_eta_at", "score_issued"]
