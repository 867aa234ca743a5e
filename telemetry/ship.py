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

import atexit
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import structlog

from telemetry.engine import CheckpointStore, ProjectionEngine
from telemetry.events import Event
from telemetry.log.base import EventLog, LogError, Position
from telemetry.runner import Applied, ProjectionRunner, Sink

if TYPE_CHECKING:
    from telemetry.log.nats import NatsOptions

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
        warn: log failed tries (1st, 2nd, 4th…); a shipper inside a worker process reports
            once, at its end, instead (:class:`BackgroundShipper`).
    """

    name = "ship"

    def __init__(self, connect: Callable[[], EventLog], *, warn: bool = True) -> None:
        self._connect = connect
        self.warn = warn
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
        if self.warn and failures & (failures - 1) == 0:  # the 1st, 2nd, 4th…: backing off
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
            poll_interval: float = 0.02, warn: bool = True) -> tuple[ProjectionRunner, ShipperSink]:
    """A runner that follows ``local`` and ships it through a :class:`ShipperSink`,
    resuming from the checkpoint of ``log_dir`` for ``stream`` (see the module's docstring)."""
    sink = ShipperSink(connect, warn=warn)
    runner = ProjectionRunner(local, ProjectionEngine([]),
                              CheckpointStore(checkpoint_path(log_dir, stream)),
                              sinks=[sink], retry_backoff=backoff,
                              poll_interval=poll_interval, name="wantel-ship")
    return runner, sink


#: Seconds a stopping worker keeps shipping what its log holds (its last events, its
#: ``WorkerStopped``) before it leaves the rest to the next shipper.
DRAIN_S: Final = 2.0


@dataclass(frozen=True)
class ShipReport:
    """How a :class:`BackgroundShipper` left things when it stopped."""

    #: Events the stream acknowledged while it ran.
    shipped: int
    #: About how many events the local log held that were not acknowledged (0: all shipped).
    unshipped: int
    #: Why the last try failed, if the last one did.
    error: str | None
    #: Where the stream was (redacted), for messages.
    target: str
    #: The server's URL (redacted), for a ``wantel ship`` command line.
    url: str = ""


class BackgroundShipper:
    """Ships a worker's local log to the fleet stream from a daemon thread, beside the work.

    The same runner and sink as ``wantel ship`` (:func:`shipper`), started with
    :meth:`start`: the generation writes its local log as always and never waits for the
    broker; the shipper follows that log, publishes, and checkpoints what was acknowledged in
    the log directory. A broker that is down or unreachable costs retries with back-off on
    the shipper's thread, and nothing else. :meth:`stop` ships what the log holds for at most
    ``drain_s`` seconds (the process's last events, its ``WorkerStopped``), then stops and
    reports; what it could not ship stays in the log for the next shipper or ``wantel ship``,
    which resumes from the checkpoint (``Nats-Msg-Id`` and ``(job, seq)`` make a re-ship
    count once).
    """

    def __init__(self, local: EventLog, log_dir: str | Path, stream: str,
                 connect: Callable[[], EventLog], *, target: str = "the fleet stream",
                 url: str = "", backoff: tuple[float, float] = SHIP_BACKOFF,
                 warn: bool = False) -> None:
        self.local = local
        self.target = target
        self.url = url
        self.runner, self.sink = shipper(local, log_dir, stream, connect, backoff=backoff,
                                         warn=warn)
        self.report: ShipReport | None = None

    @classmethod
    def to_nats(cls, local: EventLog, log_dir: str | Path, options: NatsOptions | str, *,
                worker: str) -> BackgroundShipper:
        """A shipper of ``local`` to the JetStream stream ``options`` names (a URL: the
        defaults), publishing on ``worker``'s subject, reconnecting without end."""
        from dataclasses import replace

        from telemetry.log.nats import NatsLog, NatsOptions, redact

        opts = NatsOptions(options) if isinstance(options, str) else options
        opts = replace(opts, reconnect=True)
        return cls(local, log_dir, opts.stream, lambda: NatsLog(opts, worker=worker),
                   target=f"{redact(opts.url)} stream {opts.stream}", url=redact(opts.url))

    def start(self) -> BackgroundShipper:
        """Begin shipping (a daemon thread); returns self."""
        self.runner.start()
        return self

    def stop(self, drain_s: float = DRAIN_S) -> ShipReport:
        """Ship what the log holds now for at most ``drain_s`` seconds, then stop (once)."""
        if self.report is not None:
            return self.report
        runner = self.runner
        deadline = time.monotonic() + drain_s
        try:
            last = self.local.last_position()
        except Exception:  # the local log is unreadable now: stop with what was shipped
            last = None
        end = 0 if last is None else last + 1
        while runner.running and time.monotonic() < deadline:
            if runner.engine.position >= end and runner.held_back() is None:
                break
            time.sleep(0.01)
        # A thread stuck on an unreachable broker is left behind (a daemon): the checkpoint
        # only ever covers what was acknowledged.
        if runner.stop(max(0.05, deadline - time.monotonic())):
            runner.checkpoint()
            self.sink.shutdown()
        held = runner.held_back()
        acknowledged = runner.engine.position if held is None else held
        with self.sink.lock:
            shipped, error = self.sink.shipped, self.sink.last_error
        self.report = ShipReport(shipped=shipped, unshipped=max(0, end - acknowledged),
                                 error=error, target=self.target, url=self.url)
        return self.report


_shippers: dict[tuple[str, str], BackgroundShipper] = {}
_shippers_lock = threading.Lock()


def process_shipper(local: EventLog, options: NatsOptions | str, *,
                    worker: str) -> BackgroundShipper:
    """The process's one :class:`BackgroundShipper` of ``local`` (a log with a directory) to
    the stream ``options`` names, started on first use and shared by every later caller
    (every ``instrument(..., ship=...)``); at interpreter exit it closes the process emitter
    of that log (its ``WorkerStopped`` goes in), ships for up to :data:`DRAIN_S` seconds, and
    logs one warning if anything is left for ``wantel ship``."""
    path = getattr(local, "path", None)
    if path is None:
        raise ValueError("shipping needs a local log in a directory (its checkpoint is kept "
                         "there): give log=LocalLog(DIR)")
    url = options if isinstance(options, str) else options.url
    key = (os.path.realpath(path), url)
    with _shippers_lock:
        found = _shippers.get(key)
        if found is None or found.report is not None:
            found = _shippers[key] = BackgroundShipper.to_nats(local, path, options,
                                                               worker=worker).start()
            _stop_at_exit(found)
        return found


def _stop_at_exit(shipped: BackgroundShipper) -> None:
    """At exit: the process emitter of the log closes first (whichever exit hook runs
    first), then the shipper drains; one warning if events are left."""
    ref = weakref.ref(shipped)

    def stop() -> None:
        instance = ref()
        if instance is None or instance.report is not None:
            return
        from telemetry.emitter import close_process_emitter

        close_process_emitter(instance.local)
        report = instance.stop()
        if report.unshipped:
            _log.warning("events not shipped at exit; they wait in the local log for the next "
                         "shipper (wantel ship --log DIR --nats URL)", target=report.target,
                         unshipped=report.unshipped, error=report.error)

    atexit.register(stop)


__all__ = ["DRAIN_S", "SHIP_BACKOFF", "BackgroundShipper", "ShipReport", "ShipperSink",
           "checkpoint_path", "process_shipper", "shipper"]
