"""The in-memory backend: the reference implementation of the log contract, and a test double.

It keeps decoded events in a list guarded by a lock. It offers no durability and is meant for
tests and for embedding wantel where persistence is someone else's job.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

from telemetry.events import Event
from telemetry.log.base import Batch, EventLog, LogError, Position, ReadItem


class MemoryLog(EventLog):
    """An :class:`EventLog` held in a Python list."""

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._lock = threading.Lock()
        self._closed = False

    def append(self, events: Sequence[Event]) -> range:
        """Store the batch; positions are list indexes."""
        if self._closed:
            raise LogError("append to a closed log")
        with self._lock:
            first = len(self._events)
            self._events.extend(events)
            return range(first, len(self._events))

    def read(self, start: Position = 0) -> Iterator[ReadItem]:
        """One batch with everything from ``start`` that is stored now."""
        with self._lock:
            events = self._events[start:]
        if events:
            yield Batch(max(start, 0), events)

    def last_position(self) -> Position | None:
        """The index of the last event, or ``None`` when empty."""
        with self._lock:
            return len(self._events) - 1 if self._events else None

    def close(self) -> None:
        """Refuse further appends; reads still work."""
        self._closed = True
