"""Memory: peaks per job (by kind and by stage), per device, and finished jobs' peaks by model.

Kinds: ``torch_allocated`` and ``torch_reserved`` (the caching allocator's peaks), ``device``
(NVML's whole-device used) and ``host_rss`` (the process on CPU). A job's peak is the maximum
of its samples; per-device figures are the latest reading and the highest seen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

import msgspec

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
from telemetry.projections.base import OnFailure, bounded_insert
from telemetry.projections.readings import MEMORY_KINDS, highest, memory_readings

KEEP_FINISHED: Final = 10_000
_LIFECYCLE: Final = frozenset({JobStarted, JobCompleted, JobFailed, JobCancelled})


class JobMemory(msgspec.Struct, kw_only=True):
    """Peak bytes of one job, by kind and by stage."""

    model: str
    device: str | None = None
    width: int = 0
    height: int = 0
    peaks: dict[str, int] = {}
    stage_peaks: dict[str, int] = {}


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


class MemoryProjection:
    """Fold memory samples into peaks.

    :meth:`apply` states the rules, one handler per event type. :meth:`apply_many` is the
    engine's fast path over a batch, held to the same state byte for byte by
    ``tests/telemetry/test_fold_equivalence.py``.
    """

    name = "memory"
    version = 1
    state_type = MemoryState
    handles = frozenset({JobStarted, MemorySampled, JobCompleted, JobFailed, JobCancelled})
    #: Every other type: skipped in the fast path's own loop (a step, most of a log, by its
    #: first test), which costs less than a filter pass over the batch.
    passes = frozenset(EVENT_TYPES) - handles

    def __init__(self, keep_finished: int = KEEP_FINISHED) -> None:
        self.keep_finished = keep_finished
        self._rules: dict[type[Event], Callable[[MemoryState, Any], None]] = {
            MemorySampled: self._sampled,
            JobStarted: self._started,
            JobCompleted: self._ended,
            JobFailed: self._ended,
            JobCancelled: self._ended,
        }

    def initial(self) -> MemoryState:
        """No readings yet."""
        return MemoryState()

    def apply(self, state: MemoryState, event: Event) -> MemoryState:
        """The state after ``event``: the rule for its type (other types change nothing)."""
        rule = self._rules.get(type(event))
        if rule is not None:
            rule(state, event)
        return state

    # -- the rules, one per event type -----------------------------------------------------

    def _sampled(self, state: MemoryState, event: MemorySampled) -> None:
        """A sample is its device's latest reading and raises its running job's peaks.

        The device's latest use comes from the best source the sample has: NVML's
        device-wide use (whose highest the device keeps too), else the allocator's current
        reserved bytes, else host RSS. The job's peaks rise kind by kind to the sample's
        readings (:func:`~telemetry.projections.readings.memory_readings`), and the peak of
        the stage it was taken in to its highest reading. Peaks start at 0: a reading of 0
        or below raises none.
        """
        readings = memory_readings(event)
        _, reserved, used, rss = readings
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
        for kind, value in zip(MEMORY_KINDS, readings, strict=True):
            if value is not None and value > job.peaks.get(kind, 0):
                job.peaks[kind] = value
        if event.stage is not None:
            top = highest(readings) or 0
            if top > job.stage_peaks.get(event.stage, 0):
                job.stage_peaks[event.stage] = top

    def _started(self, state: MemoryState, event: JobStarted) -> None:
        """A started job is running: its peaks start empty (the oldest running jobs beyond
        :data:`~telemetry.projections.base.MAX_RUNNING` are forgotten: their end was lost)."""
        state.running = bounded_insert(state.running, event.job, JobMemory(
            model=event.model, width=event.width, height=event.height))

    def _ended(self, state: MemoryState, event: Event) -> None:
        """An ended job's peaks are final: it moves to the newest ``keep_finished`` ended
        jobs."""
        ended = state.running.pop(event.job, None)
        if ended is not None:
            state.finished = bounded_insert(state.finished, event.job, ended,
                                            self.keep_finished)

    # -- the fast path ---------------------------------------------------------------------

    def apply_many(self, state: MemoryState, events: Sequence[Event],
                   failed: OnFailure) -> MemoryState:
        """:meth:`apply` over ``events``, each failure reported to ``failed``.

        Samples are nearly every event this fold reads, so their branch comes first and is
        written out: a sample's readings (:func:`memory_readings`) are compared one by one,
        in the order ``torch_allocated``, ``torch_reserved``, ``device``, ``host_rss`` — the
        order a job's ``peaks`` gets its keys in. Lifecycle events go to :meth:`apply`.

        A batch holds runs of one job's samples on one device, so the current device's and
        job's entries stay in locals while the samples' ``device`` and ``job`` do not change
        (a string comparison instead of a lookup). Devices are never removed, so a device's
        entry stays valid for the whole batch; a job's is looked up again after any other
        event (a lifecycle event replaces or retires it), after a failure, and when the
        device changes. With the job come its peaks by kind, read once into locals and
        written through (only this fold's samples of that job change them, so the locals
        stay equal to the dictionary), and its ``device``, written only when it differs (an
        equal string encodes the same).
        """
        devices = state.devices
        job_of, device_of = state.running.get, devices.get
        apply, lifecycle = self.apply, _LIFECYCLE
        step_type, sample_type = StepEnded, MemorySampled  # locals: read per event
        # The current device: its name, entry, and latest readings by source.
        device_name: str | None = None
        device = DeviceMemory()
        device_used: dict[str, int] = {}
        # The current job (None: look it up): its id, entry, peaks by kind (0 where none yet)
        # and peaks by stage.
        job_id: str | None = None
        job: JobMemory | None = None
        peaks: dict[str, int] = {}
        top_allocated = top_reserved = top_used = top_rss = 0
        stage_peaks: dict[str, int] = {}
        for event in events:
            try:
                if type(event) is step_type:  # most events: none of this fold's
                    continue
                if type(event) is sample_type:
                    readings = memory_readings(event)
                    allocated, reserved, used, rss = readings
                    if event.device != device_name:
                        device_name = event.device
                        found = device_of(device_name)
                        if found is None:
                            found = devices[device_name] = DeviceMemory()
                        device, device_used = found, found.used
                        job_id = None  # the job's device is set where the job is found
                    if used is not None:
                        device_used["nvml"] = used
                        if used > device.peak_used:  # noqa: PLR1730 - no max() per sample
                            device.peak_used = used
                    elif reserved is not None:
                        device_used["torch_reserved"] = event.reserved_bytes or reserved
                    elif rss is not None:
                        device_used["host_rss"] = rss
                    if event.device_total_bytes is not None:
                        device.total = event.device_total_bytes
                    if event.job != job_id:
                        job = job_of(event.job)
                        if job is None:
                            job_id = None
                            continue
                        job_id = event.job
                        if job.device != device_name:
                            job.device = device_name
                        peaks, stage_peaks = job.peaks, job.stage_peaks
                        top_allocated = peaks.get("torch_allocated", 0)
                        top_reserved = peaks.get("torch_reserved", 0)
                        top_used = peaks.get("device", 0)
                        top_rss = peaks.get("host_rss", 0)
                    if allocated is not None and allocated > top_allocated:
                        peaks["torch_allocated"] = top_allocated = allocated
                    if reserved is not None and reserved > top_reserved:
                        peaks["torch_reserved"] = top_reserved = reserved
                    if used is not None and used > top_used:
                        peaks["device"] = top_used = used
                    if rss is not None and rss > top_rss:
                        peaks["host_rss"] = top_rss = rss
                    stage = event.stage
                    if stage is not None:
                        top = highest(readings) or 0
                        if top > stage_peaks.get(stage, 0):
                            stage_peaks[stage] = top
                    continue
                if type(event) not in lifecycle:  # another type: nothing to do
                    continue
                job_id = None  # a lifecycle event: the job's entry may change, and the table
                apply(state, event)
                job_of = state.running.get
            except Exception as exc:
                job_id = None
                failed(event, exc)
        return state
