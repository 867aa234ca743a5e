"""Marks in time that never synchronise the device.

On CUDA the host runs ahead of the GPU, so a host clock read at a step boundary measures when
work was *queued*, not when it ran; ``torch.cuda.synchronize()`` would fix that at the price of
stalling the pipeline. Instead a :class:`CudaTimer` records a CUDA event at each boundary and
resolves durations later, only once ``event.query()`` says both ends have completed — a query
never blocks. On CPU (and MPS) the host clock is the device clock: :class:`HostTimer` uses
``perf_counter_ns``.

Every mark is taken relative to an origin mark recorded at job start together with the wall
clock, so an event's ``ts`` can be placed on the device's own timeline:
``ts = origin_wall_ns + elapsed(origin, mark)``.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch


class Mark(Protocol):
    """An opaque point in device time."""


class Timer(Protocol):
    """Creates marks and measures between them without blocking."""

    def mark(self) -> Any:
        """A mark at this point of the device's work queue."""
        ...

    def elapsed_ns(self, start: Any, end: Any) -> int | None:
        """Nanoseconds from ``start`` to ``end``, or ``None`` if the device is not there yet."""
        ...


class HostTimer:
    """Marks are host ``perf_counter_ns`` readings: exact on CPU, always resolved."""

    def mark(self) -> int:
        """Now, in nanoseconds of the performance counter."""
        return time.perf_counter_ns()

    def elapsed_ns(self, start: int, end: int) -> int:
        """The difference of two readings."""
        return end - start


class CudaTimer:
    """Marks are CUDA events recorded on the current stream; resolved by polling."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mark(self) -> torch.cuda.Event:
        """Record an event on the current stream (asynchronous)."""
        event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        event.record(torch.cuda.current_stream(self.device))
        return event

    def elapsed_ns(self, start: torch.cuda.Event, end: torch.cuda.Event) -> int | None:
        """Device time between the events once both completed; ``None`` before (no waiting)."""
        if not (end.query() and start.query()):  # type: ignore[no-untyped-call]
            return None
        return int(start.elapsed_time(end) * 1_000_000)


def timer_for(device: torch.device) -> HostTimer | CudaTimer:
    """The right timer for where the pipeline runs."""
    if device.type == "cuda":
        return CudaTimer(device)
    return HostTimer()
