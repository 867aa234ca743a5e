"""Memory: peaks per job (by kind and by stage), per device, and finished jobs' peaks by model.

Kinds: ``torch_allocated`` and ``torch_reserved`` (the caching allocator's peaks), ``device``
(NVML's whole-device used) and ``host_rss`` (the process on CPU). A job's peak is the maximum
of its samples; per-device figures are the latest reading and the highest seen.

Each job's peak is also predicted when it starts (:mod:`telemetry.eta.memory`: the prior from
its shape, corrected by what completed jobs taught) and the prediction scored when it
completes — the signed relative error, by model and kind — after which the job's peak is
learned from. Learning is part of the state, so a replay reproduces every prediction.
"""

from __future__ import annotations

import math
from typing import Final

import msgspec

from telemetry.eta import memory as memory_model
from telemetry.eta import online
from telemetry.eta.shape import JobShape
from telemetry.events import (
    Event,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobStarted,
    MemorySampled,
)
from telemetry.projections.base import RuleTable, bounded_insert
from telemetry.projections.eta import Histogram
from telemetry.projections.readings import highest, memory_readings

KEEP_FINISHED: Final = 10_000


class JobMemory(msgspec.Struct, kw_only=True):
    """Peak bytes of one job, by kind and by stage."""

    model: str
    device: str | None = None
    width: int = 0
    height: int = 0
    peaks: dict[str, int] = {}
    stage_peaks: dict[str, int] = {}
    #: The kind of peak predicted (``torch_allocated`` on CUDA, ``host_rss`` on a CPU), the
    #: prior's bytes and the calibrated prediction, made when the job started.
    predicted_kind: str | None = None
    prior_bytes: float | None = None
    predicted_bytes: int | None = None
    #: (predicted − observed) ÷ observed, once the job completed with a peak of that kind.
    prediction_error: float | None = None
    #: The job's shape while it runs (what its peak is learned under); dropped at its end.
    shape: JobShape | None = None


class DeviceMemory(msgspec.Struct, kw_only=True):
    """The latest and the highest readings of one device."""

    used: dict[str, int] = {}  # source → bytes (nvml, torch_reserved, host_rss)
    total: int | None = None
    peak_used: int = 0


class MemoryState(msgspec.Struct, kw_only=True):
    """Running jobs, recently finished jobs, and devices."""

    running: dict[str, JobMemory] = {}
    finished: dict[str, JobMemory] = {}
    devices: dict[str, DeviceMemory] = {}
    #: What completed jobs' peaks taught the memory model (:mod:`telemetry.eta.memory`).
    learned: online.Learned = msgspec.field(default_factory=online.Learned)
    #: model → kind → signed relative errors of scored predictions.
    errors: dict[str, dict[str, Histogram]] = {}


class MemoryProjection(RuleTable):
    """Fold memory samples into peaks.

    :meth:`apply` states the rules, one handler per event type, and the engine folds them
    event by event: a fast ``apply_many`` made ``wantel serve``'s replay only 7-9 % faster
    (``benchmarks/replay_bench.py``; ``docs/design-notes.md``), not enough to keep a second
    copy of the rules.
    """

    name = "memory"
    #: 2: predictions of each job's peak, their errors and what the model learned.
    version = 2
    state_type = MemoryState
    handles = frozenset({JobStarted, MemorySampled, JobCompleted, JobFailed, JobCancelled})

    def __init__(self, keep_finished: int = KEEP_FINISHED) -> None:
        self.keep_finished = keep_finished
        # Memoised priors and keys (not state: what memory_model.prior and .keys return).
        self._priors = memory_model.PriorCache()
        self._rules = {
            MemorySampled: self._sampled,
            JobStarted: self._started,
            JobCompleted: self._completed,
            JobFailed: self._ended,
            JobCancelled: self._ended,
        }

    def initial(self) -> MemoryState:
        """No readings yet."""
        return MemoryState()

    # -- the rules, one per event type -----------------------------------------------------

    def _sampled(self, state: MemoryState, event: MemorySampled) -> None:
        """A sample is its device's latest reading and raises its running job's peaks.

        The device's latest use comes from the best source the sample has: NVML's
        device-wide use (whose highest the device keeps too), else the allocator's current
        reserved bytes, else host RSS. The job's peaks rise kind by kind to the sample's
        readings (:func:`~telemetry.projections.readings.memory_readings`), and the peak of
        the stage it was taken in to its highest reading. Peaks start at 0: a reading of 0
        or below raises none. (The four kinds are written out: a loop over them took ~40 %
        of this fold's time in a replay.)
        """
        readings = memory_readings(event)
        allocated, reserved, used, rss = readings
        device = state.devices.get(event.device)
        if device is None:
            device = state.devices[event.device] = DeviceMemory()
        if used is not None:
            device.used["nvml"] = used
            device.peak_used = max(device.peak_used, used)
        elif reserved is not None:
            device.used["torch_reserved"] = event.reserved_bytes or reserved
        elif rss is not None:
            device.used["host_rss"] = rss
        if event.device_total_bytes is not None:
            device.total = event.device_total_bytes
        job = state.running.get(event.job)
        if job is None:
            return
        job.device = event.device
        peaks = job.peaks  # kind by kind, in MEMORY_KINDS order (the order peaks list them)
        if allocated is not None and allocated > peaks.get("torch_allocated", 0):
            peaks["torch_allocated"] = allocated
        if reserved is not None and reserved > peaks.get("torch_reserved", 0):
            peaks["torch_reserved"] = reserved
        if used is not None and used > peaks.get("device", 0):
            peaks["device"] = used
        if rss is not None and rss > peaks.get("host_rss", 0):
            peaks["host_rss"] = rss
        if event.stage is not None:
            top = highest(readings) or 0
            if top > job.stage_peaks.get(event.stage, 0):
                job.stage_peaks[event.stage] = top

    def _started(self, state: MemoryState, event: JobStarted) -> None:
        """A started job is running: its peaks start empty (the oldest running jobs beyond
        :data:`~telemetry.projections.base.MAX_RUNNING` are forgotten: their end was lost)."""
        job = JobMemory(model=event.model, width=event.width, height=event.height)
        try:
            shape = JobShape.of(event)
            kind = memory_model.peak_kind(event.device.kind)
            base, key = self._priors.of(shape, kind)
            prior, predicted = memory_model.calibrated(base, key, state.learned)
        except (KeyError, ValueError, OverflowError):  # a shape no prior describes
            pass
        else:
            if math.isfinite(predicted):
                job.shape, job.predicted_kind, job.prior_bytes = shape, kind, prior
                job.predicted_bytes = int(predicted)
        state.running = bounded_insert(state.running, event.job, job)

    def _completed(self, state: MemoryState, event: JobCompleted) -> None:
        """A completed job's prediction is scored against its peak of the predicted kind,
        and the model learns from it (a failed or cancelled job's peak is no measure of what
        the job needed: it is not learned from)."""
        job = state.running.get(event.job)
        if job is not None and job.shape is not None and job.predicted_kind is not None:
            observed = job.peaks.get(job.predicted_kind, 0)
            if observed > 0 and job.predicted_bytes is not None and job.prior_bytes:
                error = (job.predicted_bytes - observed) / observed
                job.prediction_error = error
                by_kind = state.errors.setdefault(job.model, {})
                histogram = by_kind.get(job.predicted_kind)
                if histogram is None:
                    histogram = by_kind[job.predicted_kind] = Histogram()
                histogram.add(error, False)
                memory_model.learn_under(
                    state.learned, self._priors.of(job.shape, job.predicted_kind)[1],
                    job.prior_bytes, float(observed))
        self._ended(state, event)

    def _ended(self, state: MemoryState, event: Event) -> None:
        """An ended job's peaks are final: it moves to the newest ``keep_finished`` ended
        jobs."""
        ended = state.running.pop(event.job, None)
        if ended is not None:
            ended.shape = None
            state.finished = bounded_insert(state.finished, event.job, ended,
                                            self.keep_finished)
