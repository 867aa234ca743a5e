"""Memory: peaks per job (by kind and by stage), per device, and finished jobs' peaks by model.

Kinds: ``torch_allocated`` and ``torch_reserved`` (the caching allocator's peaks), ``device``
(NVML's whole-device used) and ``host_rss`` (the process on CPU). A job's peak is the maximum
of its samples; per-device figures are the latest reading and the highest seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import msgspec

from telemetry.events import Event, JobCancelled, JobCompleted, JobFailed, JobStarted, MemorySampled
from telemetry.projections.base import BatchFold, OnFailure, bounded_insert

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


class MemoryProjection(BatchFold):
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

    def apply_many(self, state: MemoryState, events: Sequence[Event],
                   failed: OnFailure) -> MemoryState:
        """Raise peaks; move a job to finished when it ends.

        Samples are nearly every event this fold reads, so their branch comes first and is
        written out: a sample's readings by kind (allocator peaks when reported, else current
        values; host RSS the larger of current and peak) are compared one by one, in the
        order ``torch_allocated``, ``torch_reserved``, ``device``, ``host_rss`` — the order a
        job's ``peaks`` gets its keys in — instead of through two dictionaries per sample.
        The sample's highest reading is only needed for its stage, so only then is it found.
        """
        running, finished, devices = state.running, state.finished, state.devices
        job_of, device_of = running.get, devices.get
        keep_finished = self.keep_finished
        for event in events:
            try:
                if type(event) is MemorySampled:
                    allocated = event.peak_allocated_bytes or event.allocated_bytes
                    reserved = event.peak_reserved_bytes or event.reserved_bytes
                    used = event.device_used_bytes
                    current_rss = event.host_rss_bytes or 0  # max(current, peak), or None
                    peak_rss = event.host_peak_rss_bytes or 0
                    rss = (peak_rss if peak_rss > current_rss else current_rss) or None
                    device = device_of(event.device)
                    if device is None:
                        device = devices[event.device] = DeviceMemory()
                    if used is not None:
                        device.used["nvml"] = used
                        if used > device.peak_used:  # noqa: PLR1730 - no max() per sample
                            device.peak_used = used
                    elif reserved is not None:
                        device.used["torch_reserved"] = event.reserved_bytes or reserved
                    elif rss is not None:
                        device.used["host_rss"] = rss
                    if event.device_total_bytes is not None:
                        device.total = event.device_total_bytes
                    job = job_of(event.job)
                    if job is None:
                        continue
                    job.device = event.device
                    peaks = job.peaks
                    if allocated is not None and allocated > peaks.get("torch_allocated", 0):
                        peaks["torch_allocated"] = allocated
                    if reserved is not None and reserved > peaks.get("torch_reserved", 0):
                        peaks["torch_reserved"] = reserved
                    if used is not None and used > peaks.get("device", 0):
                        peaks["device"] = used
                    if rss is not None and rss > peaks.get("host_rss", 0):
                        peaks["host_rss"] = rss
                    stage = event.stage
                    if stage is not None:
                        top = allocated
                        if reserved is not None and (top is None or reserved > top):
                            top = reserved
                        if used is not None and (top is None or used > top):
                            top = used
                        if rss is not None and (top is None or rss > top):
                            top = rss
                        if top is None:
                            top = 0
                        stage_peaks = job.stage_peaks
                        if top > stage_peaks.get(stage, 0):
                            stage_peaks[stage] = top
                elif type(event) is JobStarted:
                    bounded_insert(running, event.job, JobMemory(
                        model=event.model, width=event.width, height=event.height))
                elif (type(event) is JobCompleted or type(event) is JobFailed
                      or type(event) is JobCancelled):
                    ended = running.pop(event.job, None)
                    if ended is not None:
                        finished[event.job] = ended
                        while len(finished) > keep_finished:
                            del finished[next(iter(finished))]
            except Exception as exc:
                failed(event, exc)
        return state
