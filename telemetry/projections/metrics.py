"""The metrics projection: the counters and histograms ``/metrics`` renders, kept as a fold.

Prometheus histograms and counters must be derived from the log, not incremented on the
inference hot path, and they must survive a restart of ``wantel serve``: a fold over the log
(checkpointed with the other projections) gives both. This projection keeps only what no other
projection has — job counts by outcome, duration and wait histograms with exemplars, per-model
step counts, peak-memory histograms, GPU readings and throttle counts. Gauges of running jobs,
throughput, ETA residuals and telemetry health are read from their own projections.

Histograms store per-bucket (non-cumulative) counts, one slot per upper edge plus ``+Inf``; the
exporter makes them cumulative. Each bucket keeps the latest exemplar that fell into it — the
job's trace id (:func:`telemetry.tracing.trace_id_for`), the value and the event's time — so a
slow bucket in Grafana links to the trace of a job that landed there.

Series are keyed by their label values joined with :data:`SEP` (msgspec map keys must be
scalars); each series also stores its label tuple so rendering never splits strings.
"""

from __future__ import annotations

import math
import sys
from bisect import bisect_left
from collections.abc import Sequence
from typing import Final

import msgspec

from telemetry.events import (
    EVENT_TYPES,
    Event,
    GpuSampled,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobQueued,
    JobStarted,
    MemorySampled,
    StageEnded,
    StepEnded,
)
from telemetry.pipelines import is_video, native_fps
from telemetry.projections.base import NO_JOB, OnFailure, RuleTable
from telemetry.projections.readings import MEMORY_KINDS, memory_readings, queue_wait_s
from telemetry.tracing import trace_id_for

#: Upper bucket edges (seconds) of every duration histogram: a 1-2-5 series (three per decade,
#: evenly log-spaced to one digit) from 10 ms to 5000 s, closed at 7200 s (two hours, the
#: longest A14B jobs at 720p). Shared so dashboards can compare stage, step and job histograms.
DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0,
    100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 7200.0,
)
#: Upper bucket edges (bytes) of peak-memory histograms: powers of two from 256 MiB to 256 GiB
#: (tiny CPU runs to the largest accelerators).
MEMORY_BUCKETS: Final[tuple[float, ...]] = tuple(float(2**k) for k in range(28, 39))
#: Joins label values into a map key; a control character no label value contains.
SEP: Final = "\x1f"
#: Jobs queued or running at once that the projection tracks; beyond it the oldest are
#: forgotten (jobs whose end was never logged must not grow the state forever).
MAX_TRACKED: Final = 10_000
UNKNOWN: Final = "unknown"
#: Frame rate of the videos counted in ``wantel_video_seconds_total`` when a job's family is
#: unknown (its start lost): Wan's native 16 fps. A started job's frames count at its
#: family's rate (:func:`telemetry.pipelines.native_fps`: TI2V-5B 24, CogVideoX 8…), and an
#: image model's at none (events record frames, not a frame rate).
VIDEO_FPS: Final = 16.0


class Exemplar(msgspec.Struct, frozen=True, array_like=True):
    """The latest observation of a bucket: its trace, value, and event time in seconds."""

    trace_id: str
    value: float
    ts_s: float


class HistogramSeries(msgspec.Struct, kw_only=True):
    """One labelled histogram: per-bucket counts (``len(edges) + 1``), sum, exemplars."""

    labels: tuple[str, ...]
    counts: list[int]
    sum: float = 0.0
    exemplars: dict[int, Exemplar] = {}
    #: Values left out because they were NaN or infinite (an event recorded one): counted
    #: here, never observed — one would make ``sum`` NaN for good.
    non_finite: int = 0

    @property
    def count(self) -> int:
        """Observations in all buckets."""
        return sum(self.counts)


class CounterSeries(msgspec.Struct, kw_only=True):
    """One labelled counter."""

    labels: tuple[str, ...]
    value: int = 0


class TrackedJob(msgspec.Struct, kw_only=True):
    """A queued or running job: what its observations are labelled with, and its peaks."""

    model: str
    task: str
    trace_id: str
    queued_ts: int | None = None
    started: bool = False
    peaks: dict[str, int] = {}
    #: Frames the job was started to make (``JobStarted.num_frames``), for a completion
    #: that does not say how many it made.
    num_frames: int | None = None
    #: The rate its frames play at (:func:`telemetry.pipelines.native_fps` of its family and
    #: task); 0 for an image model, whose frames are no seconds of video.
    fps: float = VIDEO_FPS


class GpuReading(msgspec.Struct, kw_only=True):
    """The latest NVML reading of one device."""

    utilization_ratio: float | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    throttle_reasons: tuple[str, ...] = ()
    ts: int = 0
    #: NVML index and ``GPU-…`` id of the device (DCGM exporter's ``gpu`` and ``UUID``).
    gpu: int | None = None
    uuid: str | None = None
    #: The worker that sampled it (its heartbeat names the host: DCGM's ``Hostname``).
    worker: str | None = None


class MetricsState(msgspec.Struct, kw_only=True):
    """Every series, keyed by joined label values, plus the jobs in flight."""

    jobs_total: dict[str, CounterSeries] = {}  # model, task, status
    jobs_oom: dict[str, CounterSeries] = {}  # model: failures that were out of memory
    job_duration: dict[str, HistogramSeries] = {}  # model, task, status
    queue_wait: dict[str, HistogramSeries] = {}  # model
    stage_duration: dict[str, HistogramSeries] = {}  # model, stage
    denoise_steps: dict[str, CounterSeries] = {}  # model
    frames: dict[str, CounterSeries] = {}  # model: frames of completed jobs
    video_seconds: dict[str, float] = {}  # model: seconds of video of completed jobs
    step_duration: dict[str, HistogramSeries] = {}  # model, expert
    peak_memory: dict[str, HistogramSeries] = {}  # model, kind
    gpus: dict[str, GpuReading] = {}  # device
    throttle_events: dict[str, CounterSeries] = {}  # device, reason
    tracked: dict[str, TrackedJob] = {}  # job → labels, oldest first
    #: Every model a job was queued or started with, first seen first: the order never
    #: changes, so the exporter's cap on ``model`` label values keeps the same ones.
    models: dict[str, None] = {}


def observe(
    series: dict[str, HistogramSeries],
    labels: tuple[str, ...],
    edges: tuple[float, ...],
    value: float,
    exemplar: Exemplar | None = None,
) -> None:
    """Count ``value`` in its bucket (first edge ≥ value); keep it as that bucket's exemplar.
    A NaN or infinite value is counted in ``non_finite`` instead."""
    key = SEP.join(labels)
    hist = series.get(key)
    if hist is None:
        hist = series[key] = HistogramSeries(labels=labels, counts=[0] * (len(edges) + 1))
    if not -math.inf < value < math.inf:  # NaN fails every comparison
        hist.non_finite += 1
        return
    index = bisect_left(edges, value)
    hist.counts[index] += 1
    hist.sum += value
    if exemplar is not None:
        hist.exemplars[index] = exemplar


#: Bucket ``i`` holds the values ``v`` with ``lo < v <= hi`` for ``(lo, hi) = _BOUNDS[i]`` (what
#: ``bisect_left`` finds), so a step in its predecessor's bucket needs two comparisons, not a
#: search. NaN and the infinities are in none of them (the last bound is the largest finite
#: float), and are left to the slow path, which counts them in ``non_finite``.
_BOUNDS: Final = tuple(zip((-math.inf, *DURATION_BUCKETS),
                           (*DURATION_BUCKETS, sys.float_info.max), strict=True))
#: Bounds no value is within (``inf < v`` is never true): used while no run can go on.
_NO_RUN: Final = (math.inf, -math.inf)
#: Lifecycle events: they add, change or forget tracked jobs.
_LIFECYCLE: Final = frozenset({JobQueued, JobStarted, JobCompleted, JobFailed, JobCancelled})
#: A job's step expert before its first timed step (no event's ``expert`` is this object).
_UNSEEN: Final = object()
#: The last step of the run before there is a run (never stored).
_NO_STEP: Final = StepEnded(job="", ts=0, step=0, total_steps=0)


def _store_run(hist: HistogramSeries, counter: CounterSeries, index: int, count: int, *,
               total: float, trace: str, last: StepEnded) -> None:
    """Store a run: ``count`` steps of ``counter``'s model, observed in bucket ``index`` of
    ``hist``. ``total`` is the histogram's new sum; ``last`` is the run's last step, whose
    exemplar the bucket keeps."""
    counter.value += count
    hist.counts[index] += count
    hist.sum = total
    value = last.duration_s
    assert value is not None  # a run's steps all have a duration
    hist.exemplars[index] = Exemplar(trace, value, last.ts / 1e9)


#: What a job's steps count in: its model, trace, step counter, the expert of its latest
#: timed step (as the event has it) and the step histogram of that expert.
_Target = tuple[str, str, CounterSeries, object, "HistogramSeries | None"]
#: A run of steps (:func:`_store_run`'s arguments): histogram, counter, bucket, steps, the
#: histogram's new sum, trace, last step.
_Run = tuple["HistogramSeries", CounterSeries, int, int, float, str, StepEnded]


def _job_target(state: MetricsState, job_id: str) -> _Target | None:
    """What the steps of ``job_id`` count in, before its first timed step (``None``: the
    job is not tracked); its model's step counter made at zero if new."""
    tracked = state.tracked.get(job_id)
    if tracked is None:
        return None
    model = tracked.model
    steps = state.denoise_steps.get(model)
    if steps is None:
        steps = state.denoise_steps[model] = CounterSeries(labels=(model,))
    return model, tracked.trace_id, steps, _UNSEEN, None


def _expert_histogram(state: MetricsState, model: str, expert: str | None) -> HistogramSeries:
    """The step-duration histogram of ``model`` and ``expert`` (``none`` for single-expert
    models), made empty if new."""
    key = model + SEP + (expert or "none")
    hist = state.step_duration.get(key)
    if hist is None:
        hist = state.step_duration[key] = HistogramSeries(
            labels=(model, expert or "none"), counts=[0] * (len(DURATION_BUCKETS) + 1))
    return hist


def _store_steps(counter: CounterSeries, untimed: int, run: _Run | None) -> int:
    """Store ``untimed`` steps of ``counter`` and the ``run`` (if any); 0, what is left."""
    if untimed:
        counter.value += untimed
    if run is not None:
        hist, run_counter, index, count, total, trace, last = run
        _store_run(hist, run_counter, index, count, total=total, trace=trace, last=last)
    return 0


def increment(series: dict[str, CounterSeries], labels: tuple[str, ...], by: int = 1) -> None:
    """Add ``by`` to a counter, creating it at zero."""
    key = SEP.join(labels)
    counter = series.get(key)
    if counter is None:
        counter = series[key] = CounterSeries(labels=labels)
    counter.value += by


class MetricsProjection(RuleTable):
    """Fold lifecycle, stage, step, memory and GPU events into Prometheus-shaped series.

    :meth:`apply` states the rules, one handler per event type. :meth:`apply_many` is the
    engine's fast path over a batch, held to the same state byte for byte by
    ``tests/telemetry/test_fold_equivalence.py``.
    """

    name = "metrics"
    #: 2: a job's ``host_rss`` peak counts the samples' RSS high-water mark (a checkpoint of
    #: version 1 holds lower peaks: replaying from the start observes the right ones).
    #: 3: NaN and infinite durations are counted in ``non_finite``, not observed (a version 2
    #: checkpoint may hold a NaN sum: replaying leaves it out).
    #: 4: frames and seconds of video produced; a GPU reading keeps its NVML index, UUID and
    #: worker (a version 3 checkpoint has none of them: replaying counts them).
    #: 5: seconds of video at each family's own rate, none for images (a version 4 checkpoint
    #: counted every frame at 16 fps: replaying counts them right).
    #: 6: the models the log named, in the order first seen (the exporter's label cap).
    version = 6
    state_type = MetricsState
    handles = frozenset({
        JobQueued, JobStarted, StageEnded, StepEnded, MemorySampled, GpuSampled,
        JobCompleted, JobFailed, JobCancelled,
    })
    #: Every other type: skipped in the fast path's own loop, so a batch is handed over whole
    #: (the fold reads nearly every event, and a filter pass over the batch costs more).
    passes = frozenset(EVENT_TYPES) - handles

    def __init__(self, *, max_tracked: int = MAX_TRACKED) -> None:
        self.max_tracked = max_tracked
        self._rules = {
            StepEnded: self._step,
            MemorySampled: self._sampled,
            StageEnded: self._stage_ended,
            JobQueued: self._queued,
            JobStarted: self._started,
            JobCompleted: self._completed,
            JobFailed: self._failed,
            JobCancelled: self._cancelled,
            GpuSampled: self._gpu,
        }

    def initial(self) -> MetricsState:
        """No series yet."""
        return MetricsState()

    # -- the rules, one per event type -----------------------------------------------------

    @staticmethod
    def _step(state: MetricsState, event: StepEnded) -> None:
        """A step of a tracked job counts for its model; a timed one is observed in the
        step-duration histogram of its model and expert (``none`` for single-expert
        models), with the job's trace as the bucket's exemplar. Steps of jobs not tracked
        (their start lost) have no model to count for."""
        job = state.tracked.get(event.job)
        if job is None:
            return
        increment(state.denoise_steps, (job.model,))
        if event.duration_s is not None:
            observe(state.step_duration, (job.model, event.expert or "none"),
                    DURATION_BUCKETS, event.duration_s,
                    Exemplar(job.trace_id, event.duration_s, event.ts / 1e9))

    @staticmethod
    def _sampled(state: MetricsState, event: MemorySampled) -> None:
        """A sample raises its tracked job's peak of each kind to the sample's reading
        (:func:`~telemetry.projections.readings.memory_readings`); a reading of 0 counts,
        so a job whose allocator never allocated has a peak of 0 bytes. The kinds are
        compared in :data:`MEMORY_KINDS` order, the order a job's peaks list them."""
        job = state.tracked.get(event.job)
        if job is None:
            return
        allocated, reserved, used, rss = memory_readings(event)
        peaks = job.peaks
        if allocated is not None and allocated > peaks.get("torch_allocated", -1):
            peaks["torch_allocated"] = allocated
        if reserved is not None and reserved > peaks.get("torch_reserved", -1):
            peaks["torch_reserved"] = reserved
        if used is not None and used > peaks.get("device", -1):
            peaks["device"] = used
        if rss is not None and rss > peaks.get("host_rss", -1):
            peaks["host_rss"] = rss

    @staticmethod
    def _stage_ended(state: MetricsState, event: StageEnded) -> None:
        """A tracked job's stage duration is observed by model and stage."""
        job = state.tracked.get(event.job)
        if job is not None:
            observe(state.stage_duration, (job.model, event.stage), DURATION_BUCKETS,
                    event.duration_s)

    def _completed(self, state: MetricsState, event: JobCompleted) -> None:
        """A completed job is counted and observed (:meth:`_ended`); the frames it made (as
        it says, else as it was started to make) count for its model, and as seconds of video
        at its family's rate (none for an image model; :data:`VIDEO_FPS` if its start was
        lost)."""
        tracked = state.tracked.get(event.job)
        frames = event.frames if event.frames is not None else (
            tracked.num_frames if tracked is not None else None)
        if frames is not None and frames > 0:
            model = tracked.model if tracked is not None else UNKNOWN
            fps = tracked.fps if tracked is not None else VIDEO_FPS
            increment(state.frames, (model,), frames)
            seconds = frames / fps if fps > 0 else 0.0  # an image is no seconds of video
            state.video_seconds[model] = state.video_seconds.get(model, 0.0) + seconds
        self._ended(state, event, "completed", event.duration_s)

    def _failed(self, state: MetricsState, event: JobFailed) -> None:
        """A failed job is counted and observed (:meth:`_ended`); one that ran out of
        memory is counted as such too, for its model (``unknown`` if its start was lost)."""
        if event.oom:
            job = state.tracked.get(event.job)
            increment(state.jobs_oom, (job.model if job else UNKNOWN,))
        self._ended(state, event, "failed", event.duration_s)

    def _cancelled(self, state: MetricsState, event: JobCancelled) -> None:
        """A cancelled job is counted and observed (:meth:`_ended`)."""
        self._ended(state, event, "cancelled", event.duration_s)

    # -- the fast path ---------------------------------------------------------------------

    def apply_many(self, state: MetricsState, events: Sequence[Event],
                   failed: OnFailure) -> MetricsState:
        """:meth:`apply` over ``events``, each failure reported to ``failed``.

        Steps are nearly every event. A batch counts them in runs — one job's steps landing
        in one bucket of one histogram — kept in locals and stored when a run ends, an event
        fails, or the batch does (:func:`_store_steps`): a run stores one exemplar, its last
        step's, as the rules' step by step replacement would leave. A job's model, trace,
        counter and histogram are found when the job or its expert changes
        (:func:`_job_target`, :func:`_expert_histogram`) and kept per job for the batch; a
        lifecycle event, which may forget tracked jobs, forgets them. Samples and the rarer
        events go to their rules. The arithmetic is the rules', in the same order.
        """
        step_type, sample_type = StepEnded, MemorySampled  # locals: read per event
        known_jobs: dict[str, _Target] = {}
        job: object = NO_JOB
        model = trace = ""
        job_steps = run_counter = CounterSeries(labels=())  # stores nothing before a step
        expert: object = _UNSEEN
        hist: HistogramSeries | None = None
        untimed = 0  # the current job's steps without a duration, not yet counted
        # The current run: its histogram and counter, bucket and bounds, steps, the
        # histogram's running sum, its last step and trace; ``lo``/``hi`` its bounds while
        # the current job's histogram is the run's, else none.
        run: HistogramSeries | None = None
        run_index = run_count = 0
        run_sum = 0.0
        run_trace, run_step = "", _NO_STEP
        lo, hi = run_bounds = _NO_RUN
        for event in events:
            try:
                if type(event) is step_type:
                    if event.job != job:
                        known = known_jobs.get(event.job) or _job_target(state, event.job)
                        if known is None:
                            job = NO_JOB
                            continue
                        known_jobs[event.job] = known
                        if untimed and known[2] is not job_steps:
                            untimed = _store_steps(job_steps, untimed, None)
                        job = event.job
                        model, trace, job_steps, expert, hist = known
                        lo, hi = run_bounds if hist is run else _NO_RUN
                    value = event.duration_s
                    if value is None:
                        untimed += 1
                        continue
                    if event.expert is not expert:  # decoded experts are interned: rarely
                        expert = event.expert
                        hist = _expert_histogram(state, model, event.expert)
                        known_jobs[event.job] = (model, trace, job_steps, expert, hist)
                        lo, hi = run_bounds if hist is run else _NO_RUN
                    if lo < value and value <= hi:  # noqa: PLR1716 - no SWAP/COPY per step
                        run_count += 1
                        run_sum += value
                        run_trace = trace
                        run_step = event
                        continue
                    assert hist is not None  # set with ``expert`` (never ``_UNSEEN`` here)
                    if not -math.inf < value < math.inf:  # NaN or infinite: not observed
                        hist.non_finite += 1
                        untimed += 1  # the step itself counts
                        continue
                    if run is not None:
                        _store_run(run, run_counter, run_index, run_count, total=run_sum,
                                   trace=run_trace, last=run_step)
                    run_index = bisect_left(DURATION_BUCKETS, value)
                    run, run_counter, run_count, run_sum = hist, job_steps, 1, hist.sum + value
                    lo, hi = run_bounds = _BOUNDS[run_index]
                    run_trace, run_step = trace, event
                elif type(event) is sample_type:
                    self._sampled(state, event)
                else:  # the rarer events go to their rules
                    if type(event) in _LIFECYCLE:  # tracked jobs change: forget what was found
                        job = NO_JOB
                        known_jobs.clear()
                    self.apply(state, event)
            except Exception as exc:  # store what the batch holds, as folding left it
                job = NO_JOB
                known_jobs.clear()
                untimed = _store_steps(job_steps, untimed, None if run is None else (
                    run, run_counter, run_index, run_count, run_sum, run_trace, run_step))
                run = None
                lo, hi = run_bounds = _NO_RUN
                failed(event, exc)
        _store_steps(job_steps, untimed, None if run is None else (
            run, run_counter, run_index, run_count, run_sum, run_trace, run_step))
        return state

    def _queued(self, state: MetricsState, event: JobQueued) -> None:
        """A queued job is tracked from the request: its model, task and trace, and when it
        was queued (a job already tracked keeps what it has)."""
        if event.model not in state.models:
            state.models[event.model] = None
        if event.job in state.tracked:
            return
        state.tracked[event.job] = TrackedJob(
            model=event.model, task=event.task, queued_ts=event.ts,
            trace_id=trace_id_for(event.job, event.traceparent, event.ts))
        self._bound(state)

    def _started(self, state: MetricsState, event: JobStarted) -> None:
        """A started job is tracked with what the worker runs — the first start counts, and
        the worker's trace context replaces the request's — and a queued job's wait is
        observed by model (:func:`~telemetry.projections.readings.queue_wait_s`)."""
        if event.model not in state.models:
            state.models[event.model] = None
        tracked = state.tracked.get(event.job)
        # The run opens here unless it was queued (telemetry.tracing.job_trace_id's rule).
        trace_id = trace_id_for(event.job, event.traceparent,
                                event.ts if tracked is None else tracked.queued_ts)
        fps = float(native_fps(event.family, event.task)) if is_video(event.task) else 0.0
        if tracked is None:
            state.tracked[event.job] = TrackedJob(model=event.model, task=event.task,
                                                  trace_id=trace_id, started=True,
                                                  num_frames=event.num_frames, fps=fps)
            self._bound(state)
            return
        if tracked.started:  # a second JobStarted for the same job: keep the first
            return
        if event.traceparent is not None:
            tracked.trace_id = trace_id
        tracked.model, tracked.task, tracked.started = event.model, event.task, True
        tracked.num_frames, tracked.fps = event.num_frames, fps
        if tracked.queued_ts is not None:
            wait = queue_wait_s(tracked.queued_ts, event.ts)
            observe(state.queue_wait, (event.model,), DURATION_BUCKETS, wait,
                    Exemplar(tracked.trace_id, wait, event.ts / 1e9))

    def _ended(self, state: MetricsState, event: Event, status: str, duration_s: float) -> None:
        """An ended job is no longer tracked: it is counted by model, task and status, its
        duration observed with its trace as exemplar, and its peak of each kind observed
        once. A job whose start was lost counts as ``unknown``."""
        tracked = state.tracked.pop(event.job, None)
        if tracked is None:  # its start was never seen (lost, or before a damaged region)
            tracked = TrackedJob(model=UNKNOWN, task=UNKNOWN, trace_id=trace_id_for(event.job))
        labels = (tracked.model, tracked.task, status)
        increment(state.jobs_total, labels)
        observe(state.job_duration, labels, DURATION_BUCKETS, duration_s,
                Exemplar(tracked.trace_id, duration_s, event.ts / 1e9))
        for kind in MEMORY_KINDS:
            peak = tracked.peaks.get(kind)
            if peak is not None:
                observe(state.peak_memory, (tracked.model, kind), MEMORY_BUCKETS, float(peak))

    def _gpu(self, state: MetricsState, event: GpuSampled) -> None:
        """A GPU sample is its device's latest reading; a throttle reason counts once each
        time it newly appears (not while it stays)."""
        previous = state.gpus.get(event.device)
        before = previous.throttle_reasons if previous is not None else ()
        for reason in event.throttle_reasons:
            if reason not in before:
                increment(state.throttle_events, (event.device, reason))
        state.gpus[event.device] = GpuReading(
            utilization_ratio=event.utilization_ratio,
            temperature_celsius=event.temperature_celsius, power_watts=event.power_watts,
            throttle_reasons=event.throttle_reasons, ts=event.ts, gpu=event.gpu,
            uuid=event.uuid, worker=event.worker)

    def _bound(self, state: MetricsState) -> None:
        """Forget the oldest tracked jobs beyond the bound (their end was never logged)."""
        tracked = state.tracked
        while len(tracked) > self.max_tracked:
            del tracked[next(iter(tracked))]


__all__ = [
    "DURATION_BUCKETS",
    "MEMORY_BUCKETS",
    "MEMORY_KINDS",
    "VIDEO_FPS",
    "CounterSeries",
    "Exemplar",
    "HistogramSeries",
    "MetricsProjection",
    "MetricsState",
]
