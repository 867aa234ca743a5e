"""Memory: peaks per job (by kind and by stage), per device, and finished jobs' peaks by model.

Kinds: ``torch_allocated`` and ``torch_reserved`` (the caching allocator's peaks), ``device``
(NVML's whole-device used) and ``host_rss`` (the process on CPU). A job's peak is the maximum
of its samples; per-device figures are the latest reading and the highest seen.
"""

from __future__ import annotations

from typing import Final

import msgspec

from telemetry.events import Event, JobCancelled, JobCompleted, JobFailed, JobStarted, MemorySampled
from telemetry.projections.base import bounded_insert

KEEP_FINISHED: Final = 10_000


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


def _readings(event: MemorySampled) -> dict[str, int]:
    found = {
        "torch_allocated": event.peak_allocated_bytes or event.allocated_bytes,
        "torch_reserved": event.peak_reserved_bytes or event.reserved_bytes,
        "device": event.device_used_bytes,
        "host_rss": max(event.host_rss_bytes or 0, event.host_peak_rss_bytes or 0) or None,
    }
    return {k: v for k, v in found.items() if v is not None}


class MemoryProjection:
    """Fold memory samples into peaks."""

    name = "memory"
    version = 1
    state_type = MemoryState
    handles = frozenset({JobStarted, MemorySampled, JobCompleted, JobFailed, JobCancelled})

    def __init__(self, keep_finished: int = KEEP_FINISHED) -> None:
        self.keep_finished = keep_finished

    def initial(self) -> MemoryState:
        """No readings yet."""
        return MemoryState()

    def apply(self, state: MemoryState, event: Event) -> MemoryState:
        """Raise peaks; move a job to finished when it ends."""
        kind = type(event)
        if kind is MemorySampled:
            assert isinstance(event, MemorySampled)
            readings = _readings(event)
            device = state.devices.setdefault(event.device, DeviceMemory())
            if event.device_used_bytes is not None:
                device.used["nvml"] = event.device_used_bytes
                device.peak_used = max(device.peak_used, event.device_used_bytes)
            elif "torch_reserved" in readings:
                device.used["torch_reserved"] = event.reserved_bytes or readings["torch_reserved"]
            elif "host_rss" in readings:
                device.used["host_rss"] = readings["host_rss"]
            if event.device_total_bytes is not None:
                device.total = event.device_total_bytes
            job = state.running.get(event.job)
            if job is not None:
                job.device = event.device
                for key, value in readings.items():
                    if value > job.peaks.get(key, 0):
                        job.peaks[key] = value
                if event.stage is not None:
                    top = max(readings.values(), default=0)
                    if top > job.stage_peaks.get(event.stage, 0):
                        job.stage_peaks[event.stage] = top
        elif kind is JobStarted:
            assert isinstance(event, JobStarted)
            bounded_insert(state.running, event.job,
                           JobMemory(model=event.model, width=event.width, height=event.height))
        elif kind is JobCompleted or kind is JobFailed or kind is JobCancelled:
            job = state.running.pop(event.job, None)
            if job is not None:
                state.finished[event.job] = job
                while len(state.finished) > self.keep_finished:
                    del state.finished[next(iter(state.finished))]
        return state
