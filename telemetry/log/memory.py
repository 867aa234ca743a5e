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
        with self._lock:
            return self._append_unlocked(events)

    def _append_unlocked(self, events: Sequence[Event]) -> range:
        if self._closed:
            raise LogError("append to a closed log")
        first = len(self._events)
        self._events.extend(events)
        return range(first, len(self._events))

    def append_new(self, events: Sequence[Event], since: Position) -> list[Event]:
        """Check and append under the list's lock: two writers store one copy."""
        with self._lock:
            stored = self._events[max(since, 0):]
            wanted = {(event.job, event.seq) for event in events}
            wanted -= {(event.job, event.seq) for event in stored}
            fresh = [event for event in events if (event.job, event.seq) in wanted]
            if fresh:
                self._append_unlocked(fresh)
            return fresh

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
