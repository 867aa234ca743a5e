"""What an event says: the reading rules every projection and exporter shares, written once.

A rule that reads an event — which of a memory sample's fields is its peak, when a stage whose
start was lost began, how long a job waited in its queue, how a device is named — used to be
written wherever a read model needed it, and the copies drifted (the metrics projection read a
sample's current host RSS but not its high-water mark, so ``/metrics`` could show a lower peak
than ``/api/jobs``). Each rule is one function here; projections and exporters call it.
"""

from __future__ import annotations

from typing import Final

from telemetry.events import DeviceInfo, MemorySampled, StageEnded

#: The kinds of a job's memory peak, in the order a job's peaks are listed: the caching
#: allocator's peaks, NVML's device-wide use, and host RSS (so CPU runs have a peak too).
MEMORY_KINDS: Final = ("torch_allocated", "torch_reserved", "device", "host_rss")


#: A memory sample's readings, by kind (:data:`MEMORY_KINDS`, in that order): the highest
#: bytes of each kind the sample saw, ``None`` where it has no reading of that kind. A plain
#: tuple: samples are a third of a log, and a named tuple costs several times as much to make.
MemoryReadings = tuple[int | None, int | None, int | None, int | None]


def memory_readings(event: MemorySampled) -> MemoryReadings:
    """What a sample says each kind of memory peaked at (:data:`MemoryReadings`).

    * ``torch_allocated``, ``torch_reserved``: the allocator's high-water marks when the
      sample reports them (the peak since the last reset is above any current value), else
      its current values;
    * ``device``: NVML's device-wide use;
    * ``host_rss``: the larger of the process's current resident set and its high-water mark
      (a missing one counts as 0), ``None`` for 0. CPU workers read the cheap high-water mark
      at every step and the current RSS only at stage boundaries, so the mark is often the
      only reading, and the higher one.
    """
    rss, peak_rss = event.host_rss_bytes or 0, event.host_peak_rss_bytes or 0
    return (event.peak_allocated_bytes or event.allocated_bytes,
            event.peak_reserved_bytes or event.reserved_bytes,
            event.device_used_bytes,
            (rss if rss > peak_rss else peak_rss) or None)  # max() would cost as much again


def highest(readings: MemoryReadings) -> int | None:
    """The largest of a sample's readings (its stage's peak), ``None`` if it has none."""
    top: int | None = None
    for value in readings:
        if value is not None and (top is None or value > top):
            top = value
    return top


def stage_start(event: StageEnded) -> int:
    """When the stage ``event`` ends began, in ns: its end less its measured duration.

    For a stage whose ``StageStarted`` was lost (dropped under pressure, or before a damaged
    region of the log). Raises ``OverflowError`` or ``ValueError`` for a duration that is no
    time (infinite, NaN).
    """
    return event.ts - int(event.duration_s * 1e9)


def queue_wait_s(queued_ts: int, started_ts: int) -> float:
    """Seconds from ``JobQueued`` to ``JobStarted``; never negative (the two events may come
    from processes whose clocks differ a little)."""
    return max(0.0, (started_ts - queued_ts) / 1e9)


def device_label(device: DeviceInfo) -> str:
    """How a job's device is named in spans and log lines: ``cuda:1`` for an indexed device,
    else its kind (``cpu``, ``mps``, ``cuda`` without an index)."""
    return device.kind if device.index is None else f"{device.kind}:{device.index}"


def stage_role(stage: str, index: int) -> str:
    """The role of the ``index``-th (from 0) occurrence of ``stage`` in a job: with the job,
    it names the stage's span (:func:`telemetry.tracing.span_id_for`) wherever it is cited."""
    return f"stage:{stage}:{index}"


__all__ = [
    "MEMORY_KINDS",
    "MemoryReadings",
    "device_label",
    "highest",
    "memory_readings",
    "queue_wait_s",
    "stage_role",
    "stage_start",
]
