"""The comparison projection: ``wantel compare``'s figures as series a dashboard can group.

``wantel compare --by model|variant|worker|device`` reads the log; the Grafana "Compare"
dashboard needs the same figures as Prometheus series carrying *every* dimension it may group
by, so one dashboard variable picks the dimension (``sum by ($by)``). The other metrics carry
``model`` only (their labels stay few), so this fold keeps its own series, labelled
:data:`LABELS` — ``model``, ``variant``, ``worker`` and ``device`` — per ended job:

- jobs by status, and failures by category (else error type), as counters;
- the duration of completed jobs (a histogram: p50/p90; its sum over frames: seconds per
  frame);
- the measured denoising steps of completed jobs and their seconds (steps/s = one over the
  other);
- frames of completed jobs;
- each ended job's peak memory of the kind its device predicts (``host_rss`` on a CPU,
  ``torch_allocated`` on CUDA, as ``wantel compare`` reads it), as a histogram by ``kind``.

The ETA's before-start error is scored where the ETA is (:mod:`telemetry.projections.eta`,
``EtaState.before_start_by``) under the same labels (:func:`labels_of`).

Cardinality: ``worker`` is the worker's stable name — a default ``host:pid:start`` name is cut
to its host (a restarted process is the same worker); ``device`` is the device class
(``cpu``, ``cuda:NVIDIA H100 80GB HBM3``): both grow with the fleet, not with its jobs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

import msgspec

from telemetry.eta.memory import peak_kind
from telemetry.eta.shape import device_class
from telemetry.events import (
    EVENT_TYPES,
    Event,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobStarted,
    MemorySampled,
    StepEnded,
)
from telemetry.projections.base import NO_JOB, OnFailure
from telemetry.projections.metrics import (
    DURATION_BUCKETS,
    MEMORY_BUCKETS,
    SEP,
    CounterSeries,
    HistogramSeries,
    increment,
    observe,
)
from telemetry.projections.readings import memory_readings

#: The dimensions every comparison series carries, in order.
LABELS: Final = ("model", "variant", "worker", "device")
#: Upper edges of the |before-start ETA error| histogram (a fraction of the actual duration).
ABS_ERROR_BUCKETS: Final[tuple[float, ...]] = (
    0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
#: Jobs in flight the fold tracks; beyond it the oldest are forgotten (an end never logged).
MAX_TRACKED: Final = 10_000
#: Where each peak kind is in :func:`~telemetry.projections.readings.memory_readings`.
_READING: Final = {"torch_allocated": 0, "torch_reserved": 1, "device": 2, "host_rss": 3}
_DEFAULT_WORKER: Final = re.compile(r"^(?P<host>.+):\d+:\d+$")


def stable_worker(worker: str | None) -> str:
    """A worker's name as a comparison groups it: a default ``host:pid:start`` name is its
    host (every run of ``wantel run`` on a host is one worker); any other name is itself."""
    if not worker:
        return "unknown"
    found = _DEFAULT_WORKER.match(worker)
    return found["host"] if found else worker


def labels_of(event: JobStarted) -> tuple[str, str, str, str]:
    """The :data:`LABELS` values of the job ``event`` starts."""
    return (event.model, event.variant, stable_worker(event.worker),
            device_class(event.device.kind, event.device.name))


class ComparedJob(msgspec.Struct, kw_only=True, gc=False):
    """A job in flight: its labels and what it has shown so far."""

    labels: tuple[str, ...]
    kind: str  # the peak kind its device predicts
    reading: int  # its index in a sample's readings (memory_readings)
    frames: int
    steps: int = 0
    step_s: float = 0.0
    peak: int | None = None


class CompareState(msgspec.Struct, kw_only=True):
    """Series keyed by their joined label values (:data:`LABELS`, then the series' own)."""

    jobs: dict[str, CounterSeries] = {}  # LABELS + status
    failures: dict[str, CounterSeries] = {}  # LABELS + category
    duration: dict[str, HistogramSeries] = {}  # LABELS: completed jobs
    steps: dict[str, CounterSeries] = {}  # LABELS: measured steps of completed jobs
    step_seconds: dict[str, float] = {}  # LABELS joined: their seconds
    frames: dict[str, CounterSeries] = {}  # LABELS: frames of completed jobs
    peak_memory: dict[str, HistogramSeries] = {}  # LABELS + kind
    tracked: dict[str, ComparedJob] = {}  # job → in flight, oldest first


class CompareProjection:
    """Fold job lifecycles, steps and memory samples into the comparison series."""

    name = "compare"
    version = 1
    state_type = CompareState
    handles = frozenset({JobStarted, StepEnded, MemorySampled, JobCompleted, JobFailed,
                         JobCancelled})
    #: Every other type (stage events, heartbeats: a few in a hundred): skipped by the fast
    #: path's loop, which costs less than a filter pass over every batch (25 ns an event of
    #: ``wantel serve``'s replay, ``benchmarks/replay_bench.py``).
    passes = frozenset(EVENT_TYPES) - handles

    def __init__(self, *, max_tracked: int = MAX_TRACKED) -> None:
        self.max_tracked = max_tracked

    def initial(self) -> CompareState:
        """No series yet."""
        return CompareState()

    def apply(self, state: CompareState, event: Event) -> CompareState:
        """The state after ``event``.

        A step of a tracked job adds its measured duration; a memory sample raises the job's
        peak of its kind (:func:`~telemetry.projections.readings.memory_readings`); a
        ``JobStarted`` tracks the job with its labels (the first one counts); an end counts
        it (:meth:`_ended`). ``type(event) is``: the cheapest test, steps first (most of a
        job's events).
        """
        if type(event) is StepEnded:
            job = state.tracked.get(event.job)
            duration = event.duration_s
            if job is not None and duration is not None and duration >= 0:
                job.steps += 1
                job.step_s += duration
        elif type(event) is MemorySampled:
            job = state.tracked.get(event.job)
            if job is not None:
                reading = memory_readings(event)[job.reading]
                if reading is not None and (job.peak is None or reading > job.peak):
                    job.peak = reading
        elif type(event) is JobStarted:
            if event.job not in state.tracked:  # a second JobStarted keeps the first
                peak = peak_kind(event.device.kind)
                state.tracked[event.job] = ComparedJob(
                    labels=labels_of(event), kind=peak, reading=_READING[peak],
                    frames=max(event.num_frames, 0))
                while len(state.tracked) > self.max_tracked:
                    del state.tracked[next(iter(state.tracked))]
        elif type(event) is JobCompleted:
            self._ended(state, event.job, "completed", event.duration_s)
        elif type(event) is JobFailed:
            job = self._ended(state, event.job, "failed", None)
            if job is not None:
                category = event.category or event.error_type or "unknown"
                increment(state.failures, (*job.labels, str(category)))
        elif type(event) is JobCancelled:
            self._ended(state, event.job, "cancelled", None)
        return state

    def apply_many(self, state: CompareState, events: Sequence[Event],
                   failed: OnFailure) -> CompareState:
        """:meth:`apply` over ``events``, each failure reported to ``failed``.

        Steps and memory samples are nearly every event, and a run of them is usually one
        job's: the job's record stays in a local while the job id does not change (only a
        start or an end, which go through :meth:`apply`, changes what is tracked; the local
        is looked up again after one). Measured by ``benchmarks/replay_bench.py``; held to
        :meth:`apply` by ``tests/telemetry/test_fold_equivalence.py``.
        """
        apply, step_type, sample_type = self.apply, StepEnded, MemorySampled
        tracked_of = state.tracked.get
        job_id: object = NO_JOB
        job: ComparedJob | None = None
        for event in events:
            try:
                kind = type(event)
                if kind is step_type or kind is sample_type:
                    if event.job != job_id:
                        job_id = event.job
                        job = tracked_of(job_id)
                    if job is None:
                        continue
                    if kind is step_type:
                        duration = event.duration_s  # type: ignore[attr-defined]
                        if duration is not None and duration >= 0:
                            job.steps += 1
                            job.step_s += duration
                    else:
                        reading = memory_readings(event)[job.reading]  # type: ignore[arg-type]
                        if reading is not None and (job.peak is None or reading > job.peak):
                            job.peak = reading
                else:
                    job_id = NO_JOB
                    state = apply(state, event)
                    tracked_of = state.tracked.get
            except Exception as exc:
                job_id = NO_JOB
                failed(event, exc)
        return state

    @staticmethod
    def _ended(state: CompareState, job_id: str, status: str,
               duration_s: float | None) -> ComparedJob | None:
        """Count an ended job (one whose start was never seen has no labels: left out)."""
        job = state.tracked.pop(job_id, None)
        if job is None:
            return None
        labels = job.labels
        increment(state.jobs, (*labels, status))
        if job.peak is not None:
            observe(state.peak_memory, (*labels, job.kind), MEMORY_BUCKETS, float(job.peak))
        if status == "completed" and duration_s is not None:
            observe(state.duration, labels, DURATION_BUCKETS, duration_s)
            increment(state.frames, labels, job.frames)
            if job.steps:
                increment(state.steps, labels, job.steps)
                key = SEP.join(labels)
                state.step_seconds[key] = state.step_seconds.get(key, 0.0) + job.step_s
        return job


__all__ = ["ABS_ERROR_BUCKETS", "LABELS", "CompareProjection", "CompareState", "labels_of",
           "stable_worker"]
