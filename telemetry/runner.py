"""The one loop that follows a log: restore, catch up, follow, apply, tell the sinks, checkpoint.

Everything in wantel that keeps up with a log — ``wantel serve``'s projections and its WebSocket
fan-out, the lifecycle log lines, span export, ``wantel run``'s progress line — is a
:class:`ProjectionRunner` with :class:`Sink`\\ s. The runner owns the reading position and the
engine; the engine is the only place events are de-duplicated (by ``(job, seq)``); a sink is
told what each step applied and does its own I/O.

A step: read a log item; apply it through :meth:`ProjectionEngine.apply_fresh
<telemetry.engine.ProjectionEngine.apply_fresh>` under :attr:`ProjectionRunner.lock`; hand the
sinks an :class:`Applied` (the batch's fresh events with their positions, read access to the
engine); wait for any sink that holds work back (see below); checkpoint by policy.

Sinks have the OpenTelemetry SDK's exporter shape: a method that handles what was applied,
``force_flush(timeout)`` and ``shutdown(timeout)``. :class:`Sink` is a documented no-op base,
not an ABC. A sink never breaks the loop: whatever it raises is caught, logged (with a doubling
back-off, so a sink failing on every batch cannot flood the log) and counted in
:attr:`ProjectionRunner.sink_errors`, and the runner carries on.

Checkpoints. A checkpoint is a snapshot of the engine (position + every projection's state)
plus each sink's own :meth:`Sink.snapshot`, in one file replaced atomically. A sink that
delivers somewhere that can refuse (a collector, a webhook) reports undelivered work with
:meth:`Sink.pending_since`: everything before the minimum of those positions is acknowledged.
An engine snapshot can only say "everything before the engine's position", so while any sink
has work pending the runner writes no checkpoint and stops reading — the work waits in the log,
not in memory — calling that sink's ``force_flush`` with an exponential back-off until it
delivers (or, in a non-blocking pass, ending the pass). The moment every sink has acknowledged
the current position again, the runner checkpoints at once (a sink's acknowledgement is what a
restart must not repeat); otherwise it checkpoints every ``checkpoint_interval`` seconds. A
restart restores the engine and the sinks at the checkpointed position and reads on from
there: nothing is applied twice, and nothing a sink had not delivered is lost.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final

import msgspec
import structlog

from telemetry.log.base import Batch, EventLog, Position, Quarantined, ReadItem

if TYPE_CHECKING:
    from telemetry.engine import CheckpointStore, ProjectionEngine
    from telemetry.events import Event

_log = structlog.get_logger("wantel.runner")

#: The first and the longest wait between tries of a sink that holds work back.
DEFAULT_RETRY_BACKOFF: Final = (0.2, 5.0)
#: The first and the longest wait before :meth:`ProjectionRunner.start`'s thread follows
#: again after reading the log failed (an unreadable segment, a full or missing disk).
DEFAULT_FOLLOW_BACKOFF: Final = (0.5, 30.0)


class Failure(msgspec.Struct, frozen=True):
    """Why :meth:`ProjectionRunner.start`'s thread is not following, while it retries."""

    reason: str  # "ExceptionType: message"
    since: float  # when it began failing, seconds since the epoch
    retries: int  # tries since then that failed too
    next_retry_s: float  # the wait before the next try


class Applied:
    """What one step of the runner applied, as handed to every sink.

    Attributes:
        events: the events that were new (de-duplicated by the engine), in log order.
        next: the position after this step: everything before it has been applied.
        live: False while the runner catches up with what was stored when it started, True
            once it follows new appends (a lifecycle log writes only live lines, for one).
        engine: the engine, already updated. Sinks run on the runner's thread, the only one
            that changes the engine, so they read ``engine.states`` without the lock; any
            other thread takes :attr:`ProjectionRunner.lock`.
        quarantined: the notice, when the step was a damaged region of the log (no events).
        kinds: the types among ``events`` (the engine's one pass over them found them): a
            sink that reads a few types returns at once from a step without any.
        newest_ts: the newest ``ts`` among ``events`` (0 if none is positive).
    """

    @property
    def behind(self) -> int:
        """About how many events were already stored after this step when it was read (0:
        none, or the log cannot tell): a sink whose work only matters live may skip it while
        this is large."""
        return 0 if self._batch is None else self._batch.behind

    __slots__ = ("_batch", "_start", "engine", "events", "kinds", "live", "newest_ts", "next",
                 "quarantined")

    def __init__(self, events: list[Event], next: Position, *, live: bool,
                 engine: ProjectionEngine, batch: Batch | None = None, start: int = 0,
                 quarantined: Quarantined | None = None,
                 kinds: frozenset[type] | None = None, newest_ts: int | None = None) -> None:
        self.events = events
        self.next = next
        self.live = live
        self.engine = engine
        self.quarantined = quarantined
        if kinds is None or newest_ts is None:  # a caller that did not have them: one pass
            kinds = frozenset(map(type, events))
            newest_ts = max((event.ts for event in events), default=0)
        self.kinds, self.newest_ts = kinds, max(newest_ts, 0)
        self._batch = batch
        self._start = start  # how many of the batch's events were behind the engine already

    def positioned(self) -> Iterator[tuple[Position, Event]]:
        """Each new event with its log position."""
        batch = self._batch
        if batch is None or not self.events:
            return iter(())
        first = batch.first + self._start
        if len(self.events) == len(batch.events) - self._start:  # no duplicate: all of them
            return zip(range(first, batch.next), self.events, strict=True)
        return self._matched(first)

    def _matched(self, first: Position) -> Iterator[tuple[Position, Event]]:
        """Positions where some events were duplicates: the new ones are those objects."""
        assert self._batch is not None
        wanted = iter(self.events)
        want = next(wanted, None)
        for position, event in zip(range(first, self._batch.next),
                                   self._batch.events[self._start:], strict=True):
            if event is want:
                yield position, event
                want = next(wanted, None)
                if want is None:
                    return


class Sink:
    """Something told what a :class:`ProjectionRunner` applied. This base does nothing.

    Override :meth:`on_applied`; a sink that delivers somewhere that can refuse also overrides
    :meth:`pending_since` and :meth:`force_flush`; one with state a restart needs overrides
    :meth:`snapshot` and :meth:`restore`. Every method is called on the runner's thread
    (``force_flush`` and ``shutdown`` also by whoever stops the runner, once it has stopped).
    """

    #: Names the sink in logs, error counts and checkpoints: unique per runner.
    name: str = "sink"
    #: Event types before which the sink must see the engine's state (the span sink reads a
    #: job's ETA history just before its terminal event, after which the ETA projection drops
    #: it): the runner applies a batch in pieces that end before each of them.
    cut_before: frozenset[type[Event]] = frozenset()
    #: Seconds between calls of :meth:`on_tick` while the runner follows live and the log is
    #: idle (``None``: never). For work that time alone brings due (the span sink declares a
    #: silent job abandoned) — projections never read the clock; a sink may.
    tick_interval: float | None = None

    def cuts_before(self, events: Sequence[Event], index: int,
                    states: dict[str, Any]) -> bool:
        """Whether the runner must cut the batch ``events`` before ``events[index]``, one of
        :attr:`cut_before`'s types (default: always); ``states`` are the projections' states
        as of the last cut (the events of the batch before it since then are not applied yet).
        A sink that needs the state before only some of them says which: every cut is one
        more step of every projection and sink."""
        return True

    def on_applied(self, applied: Applied) -> None:
        """Handle what the runner just applied; keep it short: the loop waits for it."""

    def on_tick(self) -> None:
        """Called every :attr:`tick_interval` seconds of an idle live log; work it makes
        pending is delivered (and checkpointed) as an applied step's would be."""

    def pending_since(self) -> Position | None:
        """The position of the oldest applied event whose work is not delivered yet, or
        ``None`` when nothing is pending: the runner checkpoints nothing past it, and pauses
        reading until it is delivered."""
        return None

    def force_flush(self, timeout: float | None = None) -> bool:
        """Try to deliver pending work now, within ``timeout`` seconds; True if none is left."""
        return True

    def shutdown(self, timeout: float | None = None) -> None:
        """Release what the sink holds (connections, a terminal); it is not called again."""

    def snapshot(self) -> bytes | None:
        """The sink's state to store in the runner's checkpoint, or ``None`` (no state)."""
        return None

    def restore(self, data: bytes) -> None:
        """Take back the state :meth:`snapshot` returned, when the runner restores."""


class _Checkpoint(msgspec.Struct, kw_only=True):
    """A runner's checkpoint: the engine's snapshot and each sink's, written together."""

    engine: bytes
    sinks: dict[str, bytes] = {}


class ProjectionRunner:
    """Keeps an engine up to date with a log and tells its sinks: the one loop that follows.

    Args:
        log: the log to follow.
        engine: the engine to apply it through (its position is where reading starts).
        checkpoints: where to keep the checkpoint; ``None``: keep none.
        sinks: told what each step applied, in this order.
        checkpoint_interval: seconds between periodic checkpoints.
        poll_interval: how often an idle follower looks for new appends.
        retry_backoff: ``(first, longest)`` wait between tries of a sink holding work back.
        name: the thread's name, and this runner's in logs.
    """

    def __init__(
        self,
        log: EventLog,
        engine: ProjectionEngine,
        checkpoints: CheckpointStore | None = None,
        *,
        sinks: Sequence[Sink] = (),
        checkpoint_interval: float = 5.0,
        poll_interval: float = 0.01,
        retry_backoff: tuple[float, float] = DEFAULT_RETRY_BACKOFF,
        follow_backoff: tuple[float, float] = DEFAULT_FOLLOW_BACKOFF,
        name: str = "wantel-runner",
    ) -> None:
        if retry_backoff[0] <= 0 or retry_backoff[1] < retry_backoff[0]:
            raise ValueError(f"retry_backoff must be (first > 0, longest >= first), "
                             f"got {retry_backoff}")
        self.log = log
        self.engine = engine
        self.checkpoints = checkpoints
        self.checkpoint_interval = checkpoint_interval
        self.poll_interval = poll_interval
        self.retry_backoff = retry_backoff
        self.follow_backoff = follow_backoff
        self.name = name
        #: Held while the engine changes; readers of ``engine.states`` on other threads take it.
        self.lock = threading.RLock()
        #: Set once everything stored when :meth:`follow` began has been applied.
        self.caught_up = threading.Event()
        #: What stopped :meth:`start`'s thread, if something did.
        self.error: BaseException | None = None
        #: While :meth:`start`'s thread cannot read the log and retries: why, since when.
        self.failure: Failure | None = None
        #: Exceptions raised by each sink (by name), caught and logged by the runner.
        self.sink_errors: dict[str, int] = {}
        #: Checkpoints written.
        self.checkpoints_written = 0
        self._sinks: tuple[Sink, ...] = ()
        self._cut: frozenset[type[Event]] = frozenset()
        self._cutters: tuple[Sink, ...] = ()  # the sinks with a cut_before
        for sink in sinks:
            self.add_sink(sink)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._acknowledged = False
        self._checkpointed_at = engine.position
        self._last_checkpoint_time = time.monotonic()
        self._restore()

    # -- sinks -------------------------------------------------------------------------------

    @property
    def sinks(self) -> tuple[Sink, ...]:
        """The sinks, in the order they are told."""
        return self._sinks

    def add_sink(self, sink: Sink) -> None:
        """Tell ``sink`` about every step from now on (add sinks before :meth:`start`: a sink
        added later misses what was applied before, and has no state in the checkpoint)."""
        if any(s.name == sink.name for s in self._sinks):
            raise ValueError(f"a sink named {sink.name!r} is already attached")
        with self.lock:  # replaced, not mutated: a step in flight keeps the tuple it read
            self._sinks = (*self._sinks, sink)
            self._cut = self._cut | sink.cut_before
            if sink.cut_before:
                self._cutters = (*self._cutters, sink)

    def _failed(self, sink: Sink, what: str, exc: BaseException) -> None:
        count = self.sink_errors.get(sink.name, 0) + 1
        self.sink_errors[sink.name] = count
        if count & (count - 1) == 0:  # the 1st, 2nd, 4th, 8th…: a doubling back-off
            _log.warning("a sink raised; the runner carries on", runner=self.name,
                         sink=sink.name, call=what, errors=count,
                         error=f"{type(exc).__name__}: {exc}")

    # -- the loop ----------------------------------------------------------------------------

    def catch_up(self, stop: threading.Event | None = None, *, block: bool = False) -> int:
        """Apply everything stored now, tell the sinks, checkpoint; returns how many events
        were new.

        ``block``: wait (with back-off, until ``stop``) for a sink that holds work back;
        without it, the pass ends at the first step after which a sink still holds work back
        once ``force_flush`` was tried, and the next pass tries again first.
        """
        applied = self._pass(self.log.read(self.engine.position), stop, live=False,
                             block=block)
        self.checkpoint()
        return applied

    def follow(self, stop: threading.Event, *, poll_interval: float | None = None) -> None:
        """Catch up, set :attr:`caught_up`, then follow new appends until ``stop`` is set;
        checkpoint on the way out. Waits for sinks that hold work back (reading pauses)."""
        interval = self.poll_interval if poll_interval is None else poll_interval
        try:
            self._pass(self.log.read(self.engine.position), stop, live=False, block=True)
            if stop.is_set():
                return
            self.failure = None  # the log reads again
            self.checkpoint()
            self.caught_up.set()
            tick = min((s.tick_interval for s in self._sinks if s.tick_interval is not None),
                       default=None)
            while True:
                self._pass(self.log.follow(self.engine.position, stop=stop,
                                           poll_interval=interval, idle_timeout=tick),
                           stop, live=True, block=True)
                if tick is None or stop.is_set():
                    break
                self._tick()  # the log was idle for `tick` seconds
        finally:
            self.checkpoint()

    def _pass(self, items: Iterable[ReadItem], stop: threading.Event | None, *, live: bool,
              block: bool) -> int:
        """Apply ``items`` until they end, ``stop`` is set or a sink holds work back."""
        applied = 0
        if not self._deliver(stop, block=block):  # what an earlier pass left pending
            return applied
        if self._acknowledged:
            self.checkpoint()
        for item in items:
            if stop is not None and stop.is_set():
                break
            applied += self._step(item, live)
            if not self._deliver(stop, block=block):
                break
            if self._acknowledged or (time.monotonic() - self._last_checkpoint_time
                                      >= self.checkpoint_interval):
                self.checkpoint()
        return applied

    def _step(self, item: ReadItem, live: bool) -> int:
        """Apply one log item and tell the sinks; returns how many events were new."""
        engine = self.engine
        if not isinstance(item, Batch):
            with self.lock:
                engine.apply_quarantined(item)
            self._tell(Applied([], engine.position, live=live, engine=engine,
                               quarantined=item))
            return 0
        count = 0
        for piece in self._pieces(item):
            with self.lock:
                start = max(0, engine.position - piece.first)
                fresh = engine.apply_fresh(piece)
            if fresh:
                count += len(fresh)
                if self._sinks:
                    self._tell(Applied(fresh, engine.position, live=live, engine=engine,
                                       batch=piece, start=start, kinds=engine.step_kinds,
                                       newest_ts=engine.step_newest_ts))
        return count

    def _pieces(self, batch: Batch) -> Iterator[Batch]:
        """``batch``, cut before each event some sink must see the state before (of a type in
        its ``cut_before``, where its ``cuts_before`` says so)."""
        cut = self._cut
        if not cut:
            yield batch
            return
        events, first, begin = batch.events, batch.first, 0
        cutters = self._cutters
        for index in range(1, len(events)):
            kind = type(events[index])
            if kind in cut and any(kind in sink.cut_before
                                   and sink.cuts_before(events, index, self.engine.states)
                                   for sink in cutters):
                yield Batch(first + begin, events[begin:index],
                            batch.behind + len(events) - index)
                begin = index
        yield Batch(first + begin, events[begin:], batch.behind) if begin else batch

    def _tell(self, applied: Applied) -> None:
        for sink in self._sinks:
            try:
                sink.on_applied(applied)
            except Exception as exc:
                self._failed(sink, "on_applied", exc)

    def _tick(self) -> None:
        for sink in self._sinks:
            if sink.tick_interval is not None:
                try:
                    sink.on_tick()
                except Exception as exc:
                    self._failed(sink, "on_tick", exc)

    def _pending(self) -> list[tuple[Position, Sink]]:
        held: list[tuple[Position, Sink]] = []
        for sink in self._sinks:
            try:
                since = sink.pending_since()
            except Exception as exc:
                self._failed(sink, "pending_since", exc)
                continue
            if since is not None:
                held.append((since, sink))
        return held

    def _deliver(self, stop: threading.Event | None, *, block: bool) -> bool:
        """Flush every sink that holds work back; False if one still does (the pass ends)."""
        for _since, sink in self._pending():
            delay, longest = self.retry_backoff
            while not self._flush(sink):
                if not block or stop is None or stop.wait(delay):
                    return False
                delay = min(delay * 2, longest)
            self._acknowledged = True
        return True

    def _flush(self, sink: Sink, timeout: float | None = None) -> bool:
        try:
            return sink.force_flush(timeout)
        except Exception as exc:
            self._failed(sink, "force_flush", exc)
            return False

    # -- checkpoints -------------------------------------------------------------------------

    def held_back(self) -> Position | None:
        """The position the sinks have acknowledged up to, while one holds work back
        (``None``: every sink has acknowledged everything applied)."""
        held = self._pending()
        return min(since for since, _sink in held) if held else None

    def checkpoint(self, *, force: bool = False) -> bool:
        """Write a checkpoint if anything changed (or ``force``) and no sink holds work back;
        True if written. ``force`` writes one even at the position of the last: a sink whose
        state must outlive a restart before anything is applied (where a webhook receiver
        starts) writes it so.

        A snapshot the engine cannot encode (an event pushed an integer past 64 bits) or a
        disk that refuses the write is logged, and the previous checkpoint stands: the
        projections carry on from memory, and a restart replays from the last good one.
        """
        if self.checkpoints is None or (not force
                                        and self.engine.position == self._checkpointed_at
                                        and not self._acknowledged):
            # (acknowledged work with no new position: a tick's, e.g. an abandoned job's
            # spans, changes the sinks' state, which the checkpoint must hold)
            self._acknowledged = False
            return False
        if self.held_back() is not None:
            return False
        self._acknowledged = False
        self._last_checkpoint_time = time.monotonic()
        try:
            with self.lock:
                engine, position = self.engine.snapshot(), self.engine.position
            sinks: dict[str, bytes] = {}
            for sink in self._sinks:
                try:
                    state = sink.snapshot()
                except Exception as exc:
                    self._failed(sink, "snapshot", exc)
                    return False
                if state is not None:
                    sinks[sink.name] = state
            data = msgspec.msgpack.encode(_Checkpoint(engine=engine, sinks=sinks))
        except (OverflowError, msgspec.EncodeError) as exc:
            _log.warning("cannot encode checkpoint; keeping the previous one",
                         path=str(self.checkpoints.path), error=f"{type(exc).__name__}: {exc}")
            return False
        try:
            self.checkpoints.save(data)
        except OSError as exc:  # a read-only or full disk must not stop the projections
            _log.warning("cannot write checkpoint", path=str(self.checkpoints.path),
                         error=exc.strerror or str(exc))
            return False
        self._checkpointed_at = position
        self.checkpoints_written += 1
        return True

    def _restore(self) -> None:
        if self.checkpoints is None:
            return
        data = self.checkpoints.load()
        if data is None:
            return
        try:
            saved = msgspec.msgpack.decode(data, type=_Checkpoint)
        except (msgspec.DecodeError, msgspec.ValidationError):
            saved = _Checkpoint(engine=data)  # a bare engine snapshot (before sinks had state)
        if not self.engine.restore(saved.engine):
            _log.warning("checkpoint is for other projections; replaying from the start",
                         checkpoint=str(self.checkpoints.path))
            return
        for sink in self._sinks:
            state = saved.sinks.get(sink.name)
            if state is None:
                continue
            try:
                sink.restore(state)
            except Exception as exc:
                self._failed(sink, "restore", exc)
        self._checkpointed_at = self.engine.position

    # -- a thread of its own -----------------------------------------------------------------

    def start(self) -> None:
        """:meth:`follow` in a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name}: start() called twice")
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        """:meth:`follow` until stopped; when reading fails, try again after a doubling
        back-off (the cause may be fixed: a disk remounted, a permission restored), with the
        failure in :attr:`failure` meanwhile. Log lines back off too: the 1st, 2nd, 4th…"""
        delay, longest = self.follow_backoff
        while not self._stop.is_set():
            try:
                self.follow(self._stop)
                return
            except Exception as exc:  # reported (/healthz, /readyz, the log); retried
                reason = f"{type(exc).__name__}: {exc}"
                before = self.failure
                retries = 0 if before is None else before.retries + 1
                self.failure = Failure(reason=reason,
                                       since=time.time() if before is None else before.since,
                                       retries=retries, next_retry_s=delay)
                if retries & (retries + 1) == 0:  # 0, 1, 3, 7…: tries 1, 2, 4, 8…
                    _log.error("reading the log failed; retrying", runner=self.name,
                               error=reason, retries=retries, retry_in_s=delay,
                               exc_info=retries == 0)
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, longest)

    @property
    def running(self) -> bool:
        """True while :meth:`start`'s thread follows the log."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float | None = 10.0) -> bool:
        """Stop following (a checkpoint is written on the way out); True if the thread ended
        within ``timeout``. Sinks stay open: see :meth:`shutdown`."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                return False
        return True

    def shutdown(self, timeout: float | None = 10.0) -> bool:
        """:meth:`stop`, then flush each sink (checkpointing what they deliver) and shut them
        down; True if the thread ended in time."""
        stopped = self.stop(timeout)
        if not stopped:
            return False
        for sink in self._sinks:
            self._flush(sink, timeout)
        self.checkpoint()
        for sink in self._sinks:
            try:
                sink.shutdown(timeout)
            except Exception as exc:
                self._failed(sink, "shutdown", exc)
        return stopped


__all__ = ["DEFAULT_FOLLOW_BACKOFF", "DEFAULT_RETRY_BACKOFF", "Applied", "Failure",
           "ProjectionRunner", "Sink"]
