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

from bisect import bisect_left
from typing import Final

import msgspec

from telemetry.events import (
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
#: The memory kinds a job's peak is recorded for: the caching allocator's peaks, NVML's
#: device-wide use, and — beyond the design's three, so CPU runs have a peak too — host RSS.
MEMORY_KINDS: Final = ("torch_allocated", "torch_reserved", "device", "host_rss")
#: Joins label values into a map key; a control character no label value contains.
SEP: Final = "\x1f"
#: Jobs queued or running at once that the projection tracks; beyond it the oldest are
#: forgotten (jobs whose end was never logged must not grow the state forever).
MAX_TRACKED: Final = 10_000
UNKNOWN: Final = "unknown"


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


class GpuReading(msgspec.Struct, kw_only=True):
    """The latest NVML reading of one device."""

    utilization_ratio: float | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    throttle_reasons: tuple[str, ...] = ()
    ts: int = 0


class MetricsState(msgspec.Struct, kw_only=True):
    """Every series, keyed by joined label values, plus the jobs in flight."""

    jobs_total: dict[str, CounterSeries] = {}  # model, task, status
    jobs_oom: dict[str, CounterSeries] = {}  # model: failures that were out of memory
    job_duration: dict[str, HistogramSeries] = {}  # model, task, status
    queue_wait: dict[str, HistogramSeries] = {}  # model
    stage_duration: dict[str, HistogramSeries] = {}  # model, stage
    denoise_steps: dict[str, CounterSeries] = {}  # model
    step_duration: dict[str, HistogramSeries] = {}  # model, expert
    peak_memory: dict[str, HistogramSeries] = {}  # model, kind
    gpus: dict[str, GpuReading] = {}  # device
    throttle_events: dict[str, CounterSeries] = {}  # device, reason
    tracked: dict[str, TrackedJob] = {}  # job → labels, oldest first


def observe(
    series: dict[str, HistogramSeries],
    labels: tuple[str, ...],
    edges: tuple[float, ...],
    value: float,
    exemplar: Exemplar | None = None,
) -> None:
    """Count ``value`` in its bucket (first edge ≥ value); keep it as that bucket's exemplar."""
    key = SEP.join(labels)
    hist = series.get(key)
    if hist is None:
        hist = series[key] = HistogramSeries(labels=labels, counts=[0] * (len(edges) + 1))
    index = bisect_left(edges, value)
    hist.counts[index] += 1
    hist.sum += value
    if exemplar is not None:
        hist.exemplars[index] = exemplar


def increment(series: dict[str, CounterSeries], labels: tuple[str, ...], by: int = 1) -> None:
    """Add ``by`` to a counter, creating it at zero."""
    key = SEP.join(labels)
    counter = series.get(key)
    if counter is None:
        counter = series[key] = CounterSeries(labels=labels)
    counter.value += by


def _peaks_of(event: MemorySampled) -> dict[str, int]:
    """A sample's reading of each kind (allocator peaks when reported, else current values)."""
    found = {
        "torch_allocated": event.peak_allocated_bytes or event.allocated_bytes,
        "torch_reserved": event.peak_reserved_bytes or event.reserved_bytes,
        "device": event.device_used_bytes,
        "host_rss": event.host_rss_bytes,
    }
    return {k: v for k, v in found.items() if v is not None}


class MetricsProjection:
    """Fold lifecycle, stage, step, memory and GPU events into Prometheus-shaped series."""

    name = "metrics"
    version = 1
    state_type = MetricsState
    handles = frozenset({
        JobQueued, JobStarted, StageEnded, StepEnded, MemorySampled, GpuSampled,
        JobCompleted, JobFailed, JobCancelled,
    })

    def __init__(self, *, max_tracked: int = MAX_TRACKED) -> None:
        self.max_tracked = max_tracked

    def initial(self) -> MetricsState:
        """No series yet."""
        return MetricsState()

    def apply(self, state: MetricsState, event: Event) -> MetricsState:
        """Count and observe what the event tells; ignore what it does not."""
        kind = type(event)
        if kind is StepEnded:
            assert isinstance(event, StepEnded)
            self._step(state, event)
        elif kind is MemorySampled:
            assert isinstance(event, MemorySampled)
            tracked = state.tracked.get(event.job)
            if tracked is not None:
                peaks = tracked.peaks
                for key, value in _peaks_of(event).items():
                    if value > peaks.get(key, -1):
                        peaks[key] = value
        elif kind is StageEnded:
            assert isinstance(event, StageEnded)
            tracked = state.tracked.get(event.job)
            if tracked is not None:
                observe(state.stage_duration, (tracked.model, event.stage), DURATION_BUCKETS,
                        event.duration_s)
        elif kind is GpuSampled:
            assert isinstance(event, GpuSampled)
            self._gpu(state, event)
        elif kind is JobStarted:
            assert isinstance(event, JobStarted)
            self._started(state, event)
        elif kind is JobQueued:
            assert isinstance(event, JobQueued)
            if event.job not in state.tracked:
                state.tracked[event.job] = TrackedJob(
                    model=event.model, task=event.task, queued_ts=event.ts,
                    trace_id=trace_id_for(event.job, event.traceparent))
                self._bound(state)
        elif kind is JobCompleted:
            assert isinstance(event, JobCompleted)
            self._ended(state, event, "completed", event.duration_s)
        elif kind is JobFailed:
            assert isinstance(event, JobFailed)
            if event.oom:
                tracked = state.tracked.get(event.job)
                increment(state.jobs_oom, (tracked.model if tracked else UNKNOWN,))
            self._ended(state, event, "failed", event.duration_s)
        elif kind is JobCancelled:
            assert isinstance(event, JobCancelled)
            self._ended(state, event, "cancelled", event.duration_s)
        return state

    def _step(self, state: MetricsState, event: StepEnded) -> None:
        tracked = state.tracked.get(event.job)
        if tracked is None:
            return
        increment(state.denoise_steps, (tracked.model,))
        if event.duration_s is not None:
            observe(state.step_duration, (tracked.model, event.expert or "none"),
                    DURATION_BUCKETS, event.duration_s,
                    Exemplar(tracked.trace_id, event.duration_s, event.ts / 1e9))

    def _started(self, state: MetricsState, event: JobStarted) -> None:
        tracked = state.tracked.get(event.job)
        trace_id = trace_id_for(event.job, event.traceparent)
        if tracked is None:
            state.tracked[event.job] = TrackedJob(model=event.model, task=event.task,
                                                  trace_id=trace_id, started=True)
            self._bound(state)
            return
        if tracked.started:  # a second JobStarted for the same job: keep the first
            return
        if event.traceparent is not None:
            tracked.trace_id = trace_id
        tracked.model, tracked.task, tracked.started = event.model, event.task, True
        if tracked.queued_ts is not None:
            wait = max(0.0, (event.ts - tracked.queued_ts) / 1e9)
            observe(state.queue_wait, (event.model,), DURATION_BUCKETS, wait,
                    Exemplar(tracked.trace_id, wait, event.ts / 1e9))

    def _ended(self, state: MetricsState, event: Event, status: str, duration_s: float) -> None:
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
        previous = state.gpus.get(event.device)
        before = previous.throttle_reasons if previous is not None else ()
        for reason in event.throttle_reasons:
            if reason not in before:
                increment(state.throttle_events, (event.device, reason))
        state.gpus[event.device] = GpuReading(
            utilization_ratio=event.utilization_ratio,
            temperature_celsius=event.temperature_celsius, power_watts=event.power_watts,
            throttle_reasons=event.throttle_reasons, ts=event.ts)

    def _bound(self, state: MetricsState) -> None:
        """Forget the oldest tracked jobs beyond the bound (their end was never logged)."""
        while len(state.tracked) > self.max_tracked:
            del state.tracked[next(iter(state.tracked))]


__all__ = [
    "DURATION_BUCKETS",
    "MEMORY_BUCKETS",
    "MEMORY_KINDS",
    "CounterSeries",
    "Exemplar",
    "HistogramSeries",
    "MetricsProjection",
    "MetricsState",
]
