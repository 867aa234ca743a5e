"""Memory readings that cost microseconds and never touch the device queue.

On CUDA the caching allocator's counters (allocated, reserved and their peaks) are host-side
numbers, so reading them does not synchronise. On CPU the figure that matters is the process's
resident set. Its high-water mark comes from ``getrusage`` (a microsecond) and is reset at
job start through ``/proc/self/clear_refs``, so every step can report the job's peak; the
current resident set comes from ``/proc/self/statm``, which makes the kernel walk the
process's mappings (tens of microseconds with torch loaded), so it is read at stage ends
only. Device-wide figures (NVML) come from the sampler thread in
:mod:`inference.nvml`, not from here.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from typing import Any

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _device_name(device: torch.device) -> str:
    """``cuda:0``, ``cpu``…: the ``device`` label of memory metrics."""
    if device.type == "cuda":
        index = device.index if device.index is not None else 0
        return f"cuda:{index}"
    return device.type


def peak_rss() -> int:
    """This process's resident-set high-water mark in bytes (``ru_maxrss`` is KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class MemoryReader:
    """Reads the memory of the device a pipeline runs on, cheaply enough for every step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.device_name = _device_name(device)
        self._statm: int | None = None
        if not self.is_cuda:
            with contextlib.suppress(OSError):
                self._statm = os.open("/proc/self/statm", os.O_RDONLY)

    def reset_peak(self) -> None:
        """Start a job's peak from now (host-side bookkeeping only)."""
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        # Linux: writing "5" resets the RSS high-water mark.
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")

    def read_step(self) -> dict[str, Any]:
        """The cheap reading taken at every step: allocator counters, or the RSS peak."""
        if self.is_cuda:
            return self.read()
        return {"host_peak_rss_bytes": peak_rss()}

    def read(self) -> dict[str, Any]:
        """Fields of a ``MemorySampled`` event."""
        if self.is_cuda:
            stats = self._cuda_stats()
            allocated, reserved = stats["allocated_bytes"]["all"], stats["reserved_bytes"]["all"]
            return {
                "allocated_bytes": allocated["current"],
                "reserved_bytes": reserved["current"],
                "peak_allocated_bytes": allocated["peak"],
                "peak_reserved_bytes": reserved["peak"],
            }
        return {"host_rss_bytes": self.host_rss(), "host_peak_rss_bytes": peak_rss()}

    def _cuda_stats(self) -> Any:
        """The allocator's nested stats, read once (each public ``memory_*`` call rebuilds the
        whole flattened dictionary in Python, four of which cost hundreds of µs per sample)."""
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        raw = getattr(torch._C, "_cuda_memoryStats", None)
        if raw is not None:
            return raw(index)
        return torch.cuda.memory_stats_as_nested_dict(index)

    def host_rss(self) -> int | None:
        """Resident set size of this process in bytes."""
        if self._statm is None:
            return None
        try:
            fields = os.pread(self._statm, 128, 0).split()
            return int(fields[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            return None

    def close(self) -> None:
        """Release the ``/proc`` descriptor."""
        if self._statm is not None:
            with contextlib.suppress(OSError):
                os.close(self._statm)
            self._statm = None

    def __del__(self) -> None:
        self.close()
