"""The event log's one narrow interface, which every backend implements.

A log is a totally ordered sequence of events. Positions are opaque, ordered integers: callers
keep the ones they were given and pass them back, never compute them. Appends take a batch and
return the positions they were given. Reads yield :class:`Batch` runs of consecutive positions,
and :class:`Quarantined` notices for stored records that could not be decoded (counted and
reported, never fatal, never silently dropped). Delivery is at-least-once: projections
de-duplicate by ``(job, seq)``, which is also the key a backend may use to drop retried appends.

The contract is pinned by ``tests/telemetry/log_contract.py``, run against every backend.
"""

from __future__ import annotations

import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from telemetry.events import Event, JobQueued

Position = int
#: No log position is beyond this (a signed 64-bit integer): readers asked to start past it
#: start there, and interfaces that take a position from a user refuse a larger one.
MAX_POSITION: Final = 2**63 - 1


class LogError(Exception):
    """A log could not be opened, read or written."""


class LogNotFound(LogError):
    """There is no log where one was asked for."""


class BrokenLog(LogError):
    """A log is there but cannot be used as it is: its metadata is malformed or out of range,
    or a file named like a segment is not a regular file. Nothing is changed on disk; the
    message names the file to fix or move away."""


@dataclass(frozen=True, slots=True)
class Batch:
    """Events at consecutive positions ``first``, ``first + 1``, …

    ``behind`` is the backend's estimate of how many events were already stored after this
    batch when it was read (0: none, or the backend cannot tell). A reader far behind the log
    can skip work that only matters live (the WebSocket fan-out builds no frames a client
    would only read once they are stale).
    """

    first: Position
    events: list[Event]
    behind: int = 0

    @property
    def next(self) -> Position:
        """The position after this batch's last event."""
        return self.first + len(self.events)

    def positioned(self) -> Iterator[tuple[Position, Event]]:
        """Each event with its position."""
        return zip(range(self.first, self.next), self.events, strict=True)


@dataclass(frozen=True, slots=True)
class Quarantined:
    """Stored records that were skipped because they are damaged or undecodable.

    ``first``/``count`` are the positions lost where they are known (a damaged header may hide
    how many records it held); ``next`` is where reading resumed.
    """

    first: Position | None
    count: int | None
    next: Position
    where: str
    reason: str


@dataclass(frozen=True, slots=True)
class Gap(Quarantined):
    """Positions the log once gave out that it no longer holds: a deleted or emptied segment,
    a lost tail (the log ends before its high-water mark, or before the position a reader
    starts from — a checkpoint past the end), events lost in a power cut. Never silent: the
    reader yields it where the positions would have been, the engine counts it
    (``wantel_log_gaps_total``) and ``wantel cat``/``replay`` print it. A writer never gives
    these positions out again."""


ReadItem = Batch | Quarantined


class Cursor(Protocol):
    """A reader's place in a log (see :meth:`EventLog.cursor`)."""

    def poll(self) -> Iterator[ReadItem]:
        """Everything stored after the last item this cursor yielded, as of now."""
        ...  # pragma: no cover - a protocol

    def close(self) -> None:
        """Release what the cursor holds open."""
        ...  # pragma: no cover - a protocol


class EventLog(ABC):
    """Append a batch, read from a position, follow live, ask for the last position, close."""

    @abstractmethod
    def append(self, events: Sequence[Event]) -> range:
        """Store ``events`` atomically, in order, and return their positions.

        When this returns, the batch is as durable as the backend's policy promises.
        """

    @abstractmethod
    def read(self, start: Position = 0) -> Iterator[ReadItem]:
        """Everything stored at or after ``start`` at the time of the call, in order."""

    @abstractmethod
    def last_position(self) -> Position | None:
        """The position of the last stored event, or ``None`` if the log is empty."""

    def cursor(self, start: Position = 0) -> Cursor:
        """A reader that keeps its place: each :meth:`Cursor.poll` yields what is new since the
        last. Backends that can resume cheaply (an open file and an offset) override this; the
        default re-reads from the next position."""
        return _ReadingCursor(self, start)

    def follow(
        self,
        start: Position = 0,
        *,
        idle_timeout: float | None = None,
        stop: threading.Event | None = None,
        poll_interval: float = 0.01,
    ) -> Iterator[ReadItem]:
        """Read from ``start``, then keep yielding new events as they are appended.

        Ends when ``stop`` is set, or when nothing new has arrived for ``idle_timeout`` seconds.
        This is the log's only polling loop; every backend follows through it with its own
        :meth:`cursor`. Applications follow through :class:`telemetry.runner.ProjectionRunner`,
        which applies what it reads and tells its sinks.
        """
        cursor = self.cursor(start)
        try:
            idle_since = time.monotonic()
            while stop is None or not stop.is_set():
                got_any = False
                for item in cursor.poll():
                    got_any = True
                    yield item
                now = time.monotonic()
                if got_any:
                    idle_since = now
                elif idle_timeout is not None and now - idle_since >= idle_timeout:
                    return
                elif stop is not None:
                    stop.wait(poll_interval)
                else:
                    time.sleep(poll_interval)
        finally:
            cursor.close()

    def append_new(self, events: Sequence[Event], since: Position) -> list[Event]:
        """Append those of ``events`` whose ``(job, seq)`` the log does not hold at or after
        ``since``, and return them (empty when every one was there already).

        For records that several writers may write alike (two aggregators declaring one
        worker lost: :class:`~telemetry.events.WorkerLost`), so that the log holds one. The
        caller knows the log before ``since`` (it applied it). This default reads from
        ``since`` then appends, which another writer can race; a backend that can check and
        append under one lock (the local log) or that de-duplicates by ``(job, seq)`` itself
        (JetStream's ``Nats-Msg-Id``) closes that race.
        """
        return self._append_missing(events, since)

    def _append_missing(self, events: Sequence[Event], since: Position) -> list[Event]:
        """:meth:`append_new`'s check and append (a backend calls it under its own lock)."""
        wanted = {(event.job, event.seq) for event in events}
        for item in self.read(since):
            if isinstance(item, Batch):
                for event in item.events:
                    wanted.discard((event.job, event.seq))
            if not wanted:
                return []
        fresh = [event for event in events if (event.job, event.seq) in wanted]
        if fresh:
            self._append_unlocked(fresh)
        return fresh

    def _append_unlocked(self, events: Sequence[Event]) -> range:
        """:meth:`append`, for a caller already holding the backend's append lock."""
        return self.append(events)

    def has_job(self, job: str) -> bool:
        """Whether ``job`` has begun here: any stored event of that stream other than
        ``JobQueued`` (a queued job is started under the id it was queued with). A new job
        must not take such an id: its ``(job, seq)`` would collide with the old events. This
        reads the whole log; backends that can search faster override it."""
        return any(
            any(event.job == job and not isinstance(event, JobQueued) for event in item.events)
            for item in self.read(0) if isinstance(item, Batch))

    def prompt_key(self) -> bytes:
        """The secret key prompt digests are keyed with (HMAC-SHA256), kept with the log so
        every writer of one log digests a prompt alike. This default is a random key held in
        memory for the object's life; a durable backend keeps one beside its data."""
        key: bytes = self.__dict__.setdefault("_memory_prompt_key", secrets.token_bytes(32))
        return key

    def open_writer(self, worker: str) -> list[str]:
        """Say that ``worker`` (an emitter) begins writing here, and claim the marks of
        writers that died without :meth:`close_writer`; returns their names (each may have
        lost what it held in memory: the caller reports it in the log, then calls
        :meth:`forget_crashed`). This default keeps no marks."""
        return []

    def forget_crashed(self) -> None:  # noqa: B027 - optional for backends that keep no marks
        """Remove the marks :meth:`open_writer` claimed: their report is in the log. Until
        then they stay, held by this writer, so if it dies too the next writer reports them."""

    def close_writer(self) -> None:  # noqa: B027 - optional for backends that keep no marks
        """Say that the writer of :meth:`open_writer` closed cleanly, with nothing unwritten."""

    def close(self) -> None:  # noqa: B027 - optional for backends that hold nothing
        """Release files and connections; the log may not be used afterwards."""

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ReadingCursor:
    """The default cursor: :meth:`EventLog.read` from the position after the last item."""

    def __init__(self, log: EventLog, start: Position) -> None:
        self.log = log
        self.position = start

    def poll(self) -> Iterator[ReadItem]:
        for item in self.log.read(self.position):
            self.position = item.next
            yield item

    def close(self) -> None:
        pass
