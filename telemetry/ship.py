"""Shipping a worker's local log to the fleet's stream: at least once, resumable, never blocking.

A worker keeps its local, crash-safe log as the source of truth. A shipper is the one log
follower (:class:`~telemetry.runner.ProjectionRunner`) over that local log with one sink,
:class:`ShipperSink`, and an engine with no projections (it only de-duplicates by ``(job,
seq)`` and keeps the position). The sink holds what the runner applied until the stream
acknowledges it: its :meth:`~ShipperSink.pending_since` is the oldest local position not yet
acknowledged, so the runner pauses reading and writes no checkpoint past it, and retries
:meth:`~ShipperSink.force_flush` with a doubling back-off until the broker takes it. The
moment a batch is acknowledged the runner checkpoints the new position in the log directory
(``checkpoints/ship-<stream>.ckpt``, replaced atomically by :func:`telemetry.files.write_atomic`),
so a restarted shipper resumes after the last acknowledged event.

Guarantees. A broker outage costs delay, never data: the events wait in the local log, not in
memory, and are published when the broker is back. A shipper killed between the broker's
acknowledgement and its checkpoint publishes that batch again on restart; every message carries
``Nats-Msg-Id = <job>:<seq>``, so the server drops the copy within its duplicate window, and
projections de-duplicate by ``(job, seq)`` after it. Nothing is lost, nothing counted twice.

Batches are what the runner reads in one step (up to thousands of events while catching up, a
frame or two live); each is published as JetStream atomic batches of up to 1,000 events (one
acknowledgement and one server flush a batch), or, on a stream without ``allow_atomic``, for
a batch the server refuses (a re-ship of events it already has) and for a live step of under 8
events, pipelined one message at a time (every message sent before the first acknowledgement
is awaited); one batch in flight at a time (:meth:`telemetry.log.nats.NatsLog.append`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final

import structlog

from telemetry.engine import CheckpointStore, ProjectionEngine
from telemetry.events import Event
from telemetry.log.base import EventLog, LogError, Position
from telemetry.runner import Applied, ProjectionRunner, Sink

_log = structlog.get_logger("wantel.ship")

#: The first and the longest wait between tries while the broker refuses or is away.
SHIP_BACKOFF: Final = (0.2, 5.0)


def checkpoint_path(log_dir: str | Path, stream: str) -> Path:
    """Where a shipper of ``log_dir`` to ``stream`` records its last acknowledged position."""
    return Path(log_dir) / "checkpoints" / f"ship-{stream}.ckpt"


class ShipperSink(Sink):
    """Publishes what the runner applied to a target log; holds it back until acknowledged.

    Args:
        connect: opens the target (a :class:`~telemetry.log.nats.NatsLog`); called again
            after a failure left the target unusable, so a shipper may start before its broker.
    """

    name = "ship"

    def __init__(self, connect: Callable[[], EventLog]) -> None:
        self._connect = connect
        self._target: EventLog | None = None
        self._first: Position | None = None
        self._events: list[Event] = []
        #: Events acknowledged by the target since this sink was made.
        self.shipped = 0
        #: Tries that failed (the broker away, a refusal), and the last one's reason.
        self.failures = 0
        self.last_error: str | None = None
        self.lock = threading.Lock()

    def on_applied(self, applied: Applied) -> None:
        """Hold the new events until :meth:`force_flush` has them acknowledged."""
        for position, event in applied.positioned():
            if self._first is None:
                self._first = position
            self._events.append(event)

    def pending_since(self) -> Position | None:
        """The local position of the oldest event not acknowledged yet."""
        return self._first

    def connect_now(self) -> None:
        """Open the target now rather than at the first flush (raises :class:`LogError`)."""
        if self._target is None:
            self._target = self._connect()

    def force_flush(self, timeout: float | None = None) -> bool:
        """Publish what is held; True once the target acknowledged all of it."""
        if not self._events:
            return True
        try:
            if self._target is None:
                self._target = self._connect()
            self._target.append(self._events)
        except LogError as exc:
            self._failed(str(exc))
            return False
        with self.lock:
            self.shipped += len(self._events)
            self.last_error = None
        self._events = []
        self._first = None
        return True

    def _failed(self, reason: str) -> None:
        with self.lock:
            self.failures += 1
            self.last_error = reason
            failures = self.failures
        target = self._target
        if target is not None and not getattr(target, "usable", True):
            self._target = None  # gave up or closed: open a new one next time
            target.close()
        if failures & (failures - 1) == 0:  # the 1st, 2nd, 4th…: a doubling back-off
            _log.warning("shipping failed; the events wait in the local log and are retried",
                         error=reason, failures=failures, held=len(self._events))

    def shutdown(self, timeout: float | None = None) -> None:
        """Close the connection to the target."""
        target, self._target = self._target, None
        if target is not None:
            target.close()


def shipper(local: EventLog, log_dir: str | Path, stream: str,
            connect: Callable[[], EventLog], *,
            backoff: tuple[float, float] = SHIP_BACKOFF,
            poll_interval: float = 0.02) -> tuple[ProjectionRunner, ShipperSink]:
    """A runner that follows ``local`` and ships it through a :class:`ShipperSink`,
    resuming from the checkpoint of ``log_dir`` for ``stream`` (see the module's docstring)."""
    sink = ShipperSink(connect)
    runner = ProjectionRunner(local, ProjectionEngine([]),
                              CheckpointStore(checkpoint_path(log_dir, stream)),
                              sinks=[sink], retry_backoff=backoff,
                              poll_interval=poll_interval, name="wantel-ship")
    return runner, sink


__all__ = ["SHIP_BACKOFF", "ShipperSink", "checkpoint_path", "shipper"]
