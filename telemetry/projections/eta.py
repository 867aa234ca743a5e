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
from math import exp, sqrt
from typing import Final

import msgspec

from telemetry.eta.live import (
    PRIOR_STEPS,
    SQUARES,
    WARMUP_WEIGHT,
    Z90,
    DenoiseRest,
    LiveJob,
    PriorCache,
    damp_rise,
)
from telemetry.eta.model import BUCKETS, Calibration, bucket_of
from telemetry.events import (
    EtaCalibrated,
    Event,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobStarted,
    MemorySampled,
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
#: ``run_job`` between runs of steps: no event's job is equal to it (not even ``None``).
_NO_RUN: Final = object()
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
    #: Skipped by the fold's second test, before a run of steps ends: handing them over costs
    #: less than filtering them out of every batch.
    passes = frozenset({MemorySampled})

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

        ``StepEnded`` is three events in four of a replay, and its path is
        ``LiveJob.step_ended`` inlined. Steps come in runs of one job's steps: within a run
        the estimator's step fields and its last ETA (what the next one is damped against)
        are kept in locals (a write-behind). Where jobs alternate, a run that another job's
        step interrupts is held in ``held`` and resumed at its job's next step; runs are
        stored in their estimators before an event that reads them (any other event of the
        job; every run before a start or a calibration), before a failure is reported and at
        the end of the batch. An
        ETA at a step of the denoise loop (nearly all of them) is ``estimate_fields``
        inlined from those locals, with the parts no step changes (``denoise_rest``: the
        speed, the phases after the loop) worked out once per job and batch and dropped when
        one of the job's phases starts or ends; elsewhere the run ends and ``estimate_fields``
        is called. A job's first ETA comes from the prior cache (``start_estimated``), and
        the issue cadence's divisor is kept between events of the same ``total_steps``. The
        arithmetic is the same, in the same order: the ETAs and the state are bit-identical to
        ``LiveJob``'s methods called event by event.
        """
        running_of = state.running.get
        issue, point = _issue, EtaPoint
        per_denoise = ISSUES_PER_DENOISE
        warmup_weight = WARMUP_WEIGHT
        every_total, every = None, 1  # max(total // ISSUES_PER_DENOISE, 1) of every_total
        # This batch's denoise_rest() of each estimator that issued an ETA in the loop, with
        # the estimator (which keeps its id its own); dropped when one of its phases starts or
        # ends.
        rests: dict[int, tuple[LiveJob, DenoiseRest | None]] = {}
        # The run: its job, estimator and issued ETAs, and the estimator's fields in locals.
        run_job: object = _NO_RUN
        live: LiveJob | None = None
        issued: list[EtaPoint] = []
        total_steps = steps_done = steps_seen = 0
        ts: int | None = None  # the run's last_step_ts
        last_ts: int | None = None
        segment_sum = segment_n = segment_prior = last_band = 0.0
        last_remaining: float | None = None
        expert: str | None = None
        # The rest of rest_of (looked up at a run's first ETA), unpacked.
        rest_of: LiveJob | None = None
        rest: DenoiseRest | None = None
        speed = loop_sigma = 0.0
        seconds: list[float] = []
        weighted: tuple[float, ...] = ()
        squares: list[float] | None = None
        # Other jobs' runs, held back from their estimators while jobs alternate: the
        # estimator, its issued list, then segment_prior and expert (also on the estimator),
        # then the fields _store_run stores. A job is popped when its run resumes, and stored
        # before an event that reads it, a failure, and the end of the batch.
        held: dict[object, _HeldRun] = {}
        take_held = held.pop
        for event in events:
            try:
                if type(event) is StepEnded:  # narrows for mypy, at no cost per event
                    if event.job != run_job:  # (run_job is _NO_RUN while live is None)
                        if live is not None:
                            held[run_job] = (live, issued, segment_prior, expert, total_steps,
                                             steps_done, ts, steps_seen, segment_sum,
                                             segment_n, last_remaining, last_ts, last_band)
                        held_run = take_held(event.job, None)
                        if held_run is not None:
                            (live, issued, segment_prior, expert, total_steps, steps_done, ts,
                             steps_seen, segment_sum, segment_n, last_remaining, last_ts,
                             last_band) = held_run
                            run_job = event.job
                        else:
                            running = running_of(event.job)
                            if running is None:
                                live, run_job = None, _NO_RUN
                                continue
                            run_job, live, issued = event.job, running.live, running.issued
                            total_steps, steps_done, ts, steps_seen = (
                                live.total_steps, live.steps_done, live.last_step_ts,
                                live.steps_seen)
                            segment_sum, segment_n, segment_prior, expert = (
                                live.segment_sum, live.segment_n, live.segment_prior,
                                live.expert)
                            last_remaining, last_ts, last_band = (
                                live.last_remaining, live.last_ts, live.last_band)
                    # LiveJob.step_ended, inlined (keep the two the same); each local changes
                    # where step_ended sets its field, so what a failure stores is the same.
                    steps = steps_done + 1
                    total = event.total_steps
                    total_steps = steps if steps > total else total  # max(total, steps)
                    steps_done = steps
                    ts = event.ts
                    if event.expert != expert:
                        assert live is not None  # run_job is this step's job
                        if expert is not None and segment_n > 0:
                            # A new expert: same size, so start from the prior scaled by
                            # what we saw (_step_mean reads the fields: store them first).
                            _store_run(live, (total_steps, steps_done, ts, steps_seen,
                                              segment_sum, segment_n, last_remaining,
                                              last_ts, last_band))
                            live.segment_prior = segment_prior = live._step_mean()
                        live.expert = expert = event.expert
                        segment_sum, segment_n = 0.0, 0.0
                    duration_s = event.duration_s
                    if duration_s is not None:
                        if steps_seen:  # not the first step seen: steps_seen + 1 != 1
                            steps_seen += 1
                            segment_sum += 1.0 * duration_s
                            segment_n += 1.0
                        else:
                            assert live is not None
                            steps_seen += 1
                            live.first_step_s = duration_s
                            segment_sum += warmup_weight * (duration_s
                                                            / max(live.warmup, 1e-6))
                            segment_n += warmup_weight
                    done = event.step + 1
                    if not (done <= 2 or done >= total):
                        if total != every_total:
                            every_total, every = total, max(total // per_denoise, 1)
                        if done % every:
                            continue
                    # An ETA: LiveJob.estimate_fields(ts), inlined (keep the two the same).
                    assert live is not None
                    elapsed = (ts - live.start_ts) / 1e9
                    if 0.0 > elapsed:  # noqa: PLR1730 - max() without the call
                        elapsed = 0.0
                    if rest_of is not live:
                        entry = rests.get(id(live))
                        if entry is None or entry[0] is not live:
                            entry = rests[id(live)] = (live, live.denoise_rest())
                        rest_of, rest = live, entry[1]
                        if rest is not None:
                            speed, seconds, weighted, squares, loop_sigma = rest
                    if rest is None:  # not in the denoise loop: the general estimate
                        _store_run(live, (total_steps, steps_done, ts, steps_seen,
                                          segment_sum, segment_n, last_remaining, last_ts,
                                          last_band))
                        estimator, live, run_job = live, None, _NO_RUN
                        remaining, low, high, progress, estimating = \
                            estimator.estimate_fields(ts)
                        issued.append(point(ts=ts, remaining_s=remaining, p10_s=low,
                                            p90_s=high, progress=progress,
                                            estimating=estimating))
                        continue
                    # _denoise_left(ts, speed) at this step's own time: its since_step is
                    # 0.0, so `mean if mean < since_step else since_step` reads as below.
                    steps_left = total_steps - steps_done
                    if 0 > steps_left:  # noqa: PLR1730 - max() without the call
                        steps_left = 0
                    prior = segment_prior
                    if steps_seen == 0:
                        prior *= speed
                    mean = (PRIOR_STEPS * prior + segment_sum) / (PRIOR_STEPS + segment_n)
                    part = mean * steps_left - (mean if mean < 0.0 else 0.0)
                    if 0.0 > part:  # noqa: PLR1730 - max() without the call
                        part = 0.0
                    sigma = loop_sigma / sqrt(1.0 + segment_n)
                    seconds[0] = part
                    remaining = damp_rise(sum(seconds, 0.0), last_remaining, last_ts,
                                          last_band, ts)
                    total_s = elapsed + remaining
                    progress = elapsed / total_s if total_s > 0 else 0.0
                    if remaining <= 0:
                        low = high = 0.0
                    else:
                        quantiles = live.quantiles
                        if quantiles and (bucket := bucket_of(progress)) in quantiles:
                            q10, q90 = quantiles[bucket]
                            low, high = remaining * q10, remaining * q90
                        else:
                            if squares is None:  # one of the rest's overflows: pow raises
                                spread = sqrt(sum(map(pow, (part * sigma, *weighted), SQUARES)))
                            else:
                                squares[0] = (part * sigma) ** 2  # pow(part * sigma, 2)
                                spread = sqrt(sum(squares))
                            spread /= remaining
                            low = remaining * exp(-Z90 * spread)
                            high = remaining * exp(Z90 * spread)
                    last_remaining, last_ts, last_band = remaining, ts, high - remaining
                    issued.append(point(ts=ts, remaining_s=remaining, p10_s=low, p90_s=high,
                                        progress=progress, estimating=steps_seen < 2))
                    continue
                if type(event) is MemorySampled:  # not read (see passes): the run goes on
                    continue
                if live is not None:
                    held[run_job] = (live, issued, segment_prior, expert, total_steps,
                                     steps_done, ts, steps_seen, segment_sum, segment_n,
                                     last_remaining, last_ts, last_band)
                    live, run_job = None, _NO_RUN
                kind = type(event)
                if held:  # what this event reads of its job, or of any job, is stored first
                    if kind is JobStarted or kind is EtaCalibrated:
                        _store_held(held)  # a start may evict a running job
                    elif (held_run := take_held(event.job, None)) is not None:
                        _store_run(held_run[0], held_run[4:])
                if kind is StageStarted or kind is StageEnded:
                    running = running_of(event.job)
                    if running is not None:
                        rests.pop(id(running.live), None)  # a phase starts or ends
                        rest_of = None
                        if isinstance(event, StageStarted):
                            running.live.stage_started(event.stage, event.ts)
                        else:
                            assert isinstance(event, StageEnded)
                            running.live.stage_ended(event.stage, event.duration_s)
                        issue(running, event.ts)
                elif kind is JobStarted:
                    assert isinstance(event, JobStarted)
                    started, first = self._priors.start_estimated(event, state.calibration)
                    running = RunningEta(model=event.model, live=started)
                    state.running = bounded_insert(state.running, event.job, running)
                    running_of = state.running.get
                    if first is None:
                        issue(running, event.ts)
                    else:
                        remaining, low, high, progress, estimating = first
                        running.issued.append(point(ts=event.ts, remaining_s=remaining,
                                                    p10_s=low, p90_s=high, progress=progress,
                                                    estimating=estimating))
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
                if live is not None:
                    _store_run(live, (total_steps, steps_done, ts, steps_seen,
                                      segment_sum, segment_n, last_remaining, last_ts,
                                      last_band))
                    live, run_job = None, _NO_RUN
                _store_held(held)
                rests.clear()
                rest_of = None
                failed(event, exc)
        if live is not None:
            _store_run(live, (total_steps, steps_done, ts, steps_seen, segment_sum,
                              segment_n, last_remaining, last_ts, last_band))
        _store_held(held)
        return state

    def _completed(self, state: EtaState, event: JobCompleted) -> None:
        """Score every ETA the job was issued: its residuals, and the model's histograms.

        The first ETA (issued at the start) is scored on its own; the others by the bucket of
        the progress they were issued at. Consecutive ETAs mostly share a bucket, so a run of
        them looks its bucket up once. Each bucket's errors, in order, and the order buckets
        are first reached in (the histograms' and the residuals') are those of scoring the
        ETAs one by one.
        """
        running = state.running.pop(event.job, None)
        if running is None:
            return
        model = running.model
        histograms = state.residuals.get(model)
        if histograms is None:  # setdefault(model, {}) without a dict per call
            histograms = state.residuals[model] = {}
        points = running.issued
        end_ts = event.ts
        before_start: float | None = None
        if points:
            point = points[0]
            actual = (end_ts - point.ts) / 1e9
            if actual > 1e-3:
                before_start = (point.remaining_s - actual) / actual
                histogram = state.before_start.get(model)
                if histogram is None:
                    histogram = state.before_start[model] = Histogram()
                histogram.add_all([before_start], point.p10_s <= actual <= point.p90_s)
        by_bucket: dict[str, list[float]] = {}  # in the order buckets were first reached
        covered_in: dict[str, int] = {}
        history: list[EtaPoint] = []  # the first ETA of each bucket
        bucket: str | None = None  # the last scored ETA's, with its errors and count covered
        errors: list[float] = []
        covered = 0
        for point in points[1:]:
            actual = (end_ts - point.ts) / 1e9
            if actual <= 1e-3:
                continue
            this_bucket = bucket_of(point.progress)
            if this_bucket != bucket:
                if bucket is not None:
                    covered_in[bucket] = covered
                bucket = this_bucket
                reached = by_bucket.get(bucket)
                if reached is None:
                    history.append(point)
                    errors = by_bucket[bucket] = []
                    covered = 0
                else:
                    errors, covered = reached, covered_in[bucket]
            errors.append((point.remaining_s - actual) / actual)
            covered += point.p10_s <= actual <= point.p90_s
        if bucket is not None:
            covered_in[bucket] = covered
        residuals: dict[str, float] = {}
        for bucket, errors in by_bucket.items():
            histogram = histograms.get(bucket)
            if histogram is None:
                histogram = histograms[bucket] = Histogram()
            histogram.add_all(errors, covered_in[bucket])
            residuals[bucket] = sum(errors) / len(errors)
        state.finished = bounded_insert(state.finished, event.job, FinishedEta(
            model=model, status="completed", duration_s=event.duration_s,
            before_start_error=before_start, residuals=residuals, history=history),
            self.keep_finished)


def _store_run(live: LiveJob, fields: tuple[int, int, int | None, int, float, float,
                                           float | None, int | None, float]) -> None:
    """Store a run's fields: total_steps, steps_done, last_step_ts, steps_seen, segment_sum,
    segment_n, last_remaining, last_ts, last_band."""
    (live.total_steps, live.steps_done, live.last_step_ts, live.steps_seen, live.segment_sum,
     live.segment_n, live.last_remaining, live.last_ts, live.last_band) = fields


#: A run held back from its estimator (see ``EtaProjection.apply_many``).
_HeldRun = tuple[LiveJob, list[EtaPoint], float, str | None, int, int, int | None, int, float,
                 float, float | None, int | None, float]


def _store_held(held: dict[object, _HeldRun]) -> None:
    """Store every held run in its estimator, and forget them."""
    for entry in held.values():
        _store_run(entry[0], entry[4:])
    held.clear()


def _issue(running: RunningEta, ts: int) -> None:
    remaining, low, high, progress, estimating = running.live.estimate_fields(ts)
    running.issued.append(EtaPoint(ts=ts, remaining_s=remaining, p10_s=low, p90_s=high,
                                   progress=progress, estimating=estimating))


def current(state: EtaState, job: str) -> EtaPoint | None:
    """The latest ETA of a running job."""
    running = state.running.get(job)
    return running.issued[-1] if running is not None and running.issued else None


__all__ = ["BUCKETS", "ERROR_EDGES", "EtaPoint", "EtaProjection", "EtaState", "current"]
