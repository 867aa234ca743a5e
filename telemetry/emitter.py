"""The emitting side: ``emit(event)`` never blocks and never raises; a thread writes the log.

Inference calls :meth:`Emitter.emit` on its own thread between denoising steps, so the call must
cost about a microsecond and must not fail whatever happens to the log. Events go into one of
three bounded FIFO queues by :data:`~telemetry.events.PRIORITY`, stamped with a global counter;
a background thread merges them back into emission order, assigns each stream's gap-free
``seq``, and appends them to the log in batches (so one fsync covers a whole batch).

When the queues are full, the lowest-value events go first: samples, then steps, then lifecycle
events; every drop is counted by reason and reported into the log as an ``EventsDropped`` event.
When the log fails (disk full, permission denied, directory removed) the batch is kept and
retried with backoff; the failure is counted and logged once per kind, and the caller never
sees it. ``close()`` (also run at interpreter exit) appends ``WorkerStopped`` (a clean shutdown, not
a lost worker) and flushes what it can.

A writer that dies leaves a mark. The writer thread calls :meth:`EventLog.open_writer
<telemetry.log.base.EventLog.open_writer>` first: the local log keeps a file in ``writers/``,
locked for the emitter's life, and hands back the names of writers whose marks are there
unlocked (their process died without :meth:`Emitter.close`). Each is counted as a drop with
reason ``writer_crashed`` (so the next ``EventsDropped`` report carries it, and
``wantel_events_dropped_total{reason="writer_crashed"}`` shows it) and logged with the dead
writer's name: what it held in memory — at most ``capacity`` events, and at most
``flush_interval`` seconds of them (lifecycle events go out at once) — is lost, and the loss is
visible. The dead writers' marks are removed only once the report is in the log (until then
this writer holds them locked: if it dies too, the next writer reports them). A clean
:meth:`Emitter.close` that wrote everything removes the mark; one that could
not (the log stayed unwritable) leaves it, so the next writer reports the loss.

Clock skew is bounded here, on the writer thread: an event whose ``ts`` is negative or beyond
:data:`MAX_TS` (a clock set to 2^70 would hold every checkpoint back), or whose
``duration_s`` is negative, is kept with the value clamped into range, counted under
``clock_skew_ts`` / ``negative_duration`` in the ``EventsDropped`` counts (the events were
corrected, not dropped), and logged once per kind.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import itertools
import os
import socket
import threading
import time
import weakref
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import structlog
from msgspec.structs import force_setattr

from telemetry.events import (
    PRIORITY,
    TERMINAL_TYPES,
    UNSEQUENCED,
    Event,
    EventsDropped,
    JobQueued,
    Priority,
    WorkerHeartbeat,
    WorkerStopped,
    stream_of_worker,
)
from telemetry.log.base import EventLog

_log = structlog.get_logger("wantel.emitter")

DEFAULT_CAPACITY: Final = 65_536
DEFAULT_MAX_BATCH: Final = 4_096
DEFAULT_FLUSH_INTERVAL: Final = 0.05
IDLE_INTERVAL: Final = 0.5  # the writer sleeps this long when idle; a new event wakes it
ENDED_STREAMS_KEPT: Final = 4096
#: The latest ``ts`` an event may carry (ns since the epoch; 2^62 is in the year 2116).
MAX_TS: Final = 2**62
_Stamped = tuple[int, Event]


_started: list[int] = []  # [pid, start second] of this process, filled on first use


def default_worker_name() -> str:
    """``host:pid:start``: unique across a fleet's hosts and across restarts (a pid is reused,
    a pid with its start second is not), readable in dashboards. ``start`` is the second this
    process first asked (a forked child asks anew)."""
    pid = os.getpid()
    if not _started or _started[0] != pid:
        _started[:] = [pid, int(time.time())]
    return f"{socket.gethostname()}:{pid}:{_started[1]}"


_shared: dict[object, Emitter] = {}
_shared_lock = threading.Lock()


def process_emitter(log: EventLog, *, worker: str | None = None) -> Emitter:
    """The process's one emitter for ``log``, made on first use and shared by every later
    caller (every ``instrument(log=...)``), until it is closed.

    One per process matters: each emitter numbers its worker's own stream
    (``worker/<name>``: heartbeats, drop reports) from 0, so a second emitter of the same
    worker would restart that ``seq`` and every view would drop its events as duplicates
    ("3 heartbeats written, 1 applied"). Logs are told apart by their directory where they have
    one (two ``LocalLog`` objects of one directory share an emitter), else by identity.
    ``worker`` names the worker when the emitter is made (later callers share that name).
    """
    path = getattr(log, "path", None)
    key: object = ("path", os.path.realpath(path)) if path is not None else ("log", id(log))
    with _shared_lock:
        emitter = _shared.get(key)
        if emitter is None or emitter.closing:
            emitter = Emitter(log, worker=worker)
            _shared[key] = emitter
        return emitter


def process_emitters() -> list[Emitter]:
    """The process's emitters still open, one per log: what interpreter exit will close (a
    host that opens many logs in one process, as a test suite does, closes its own sooner)."""
    with _shared_lock:
        return [emitter for emitter in _shared.values() if not emitter.closing]


def close_process_emitter(log: EventLog, timeout: float = 2.0) -> None:
    """Close the process's emitter for ``log``, if there is one (at exit, before a shipper of
    that log drains, so its ``WorkerStopped`` is shipped too)."""
    path = getattr(log, "path", None)
    key: object = ("path", os.path.realpath(path)) if path is not None else ("log", id(log))
    with _shared_lock:
        emitter = _shared.get(key)
    if emitter is not None:
        emitter.close(timeout=timeout)


@dataclass(frozen=True)
class EmitterStats:
    """A snapshot of what the emitter has done; exported as telemetry-health metrics."""

    emitted: int
    appended: int
    queued: int  # waiting in the queues
    in_flight: int  # taken by the writer: being appended, or kept for a retry
    dropped: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)


class Emitter:
    """Queue events from any thread; append them to ``log`` from one background thread."""

    def __init__(
        self,
        log: EventLog,
        *,
        worker: str | None = None,
        capacity: int = DEFAULT_CAPACITY,
        max_batch: int = DEFAULT_MAX_BATCH,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        retry_backoff: tuple[float, float] = (0.05, 2.0),
        clock_ns: Callable[[], int] = time.time_ns,
        heartbeat_interval: float | None = 10.0,
        devices: tuple[str, ...] = (),
    ) -> None:
        self.log = log
        self.worker = worker or default_worker_name()
        self._capacity = capacity
        self._max_batch = max_batch
        self._flush_interval = flush_interval
        self._backoff_min, self._backoff_max = retry_backoff
        self._clock_ns = clock_ns
        self._heartbeat_interval = heartbeat_interval
        self._next_heartbeat = time.monotonic()
        self.devices = devices
        self._queues: tuple[deque[_Stamped], ...] = (deque(), deque(), deque())
        self._stamps = itertools.count()
        self._wake = threading.Event()
        self._done = threading.Condition()
        self._drop_lock = threading.Lock()
        self._dropped: Counter[str] = Counter()
        self._reported_drops: dict[str, int] = {}
        self._errors: Counter[str] = Counter()
        self._pending: list[_Stamped] = []
        self._next_seq: dict[str, int] = {}
        self._ended: OrderedDict[str, int] = OrderedDict()  # oldest popped in O(1)
        self._queued_only: set[str] = set()  # streams with nothing but a JobQueued so far
        self._emitted = 0
        self._appended = 0
        self._idle = True
        self._writing = False  # the writer took events off the queues and has not finished
        self._closing = False
        self._closed = False
        self._marked = False  # this writer's mark is in the log (see _open_writer)
        self._crash_report = ""  # "due", then "pending" (in a batch being written), then ""
        self._mark_failed = False
        self._thread = threading.Thread(target=self._run, name="wantel-emitter", daemon=True)
        self._thread.start()
        _close_at_exit(self)

    # -- caller side: must be cheap and must never raise -------------------------------------

    def emit(self, event: Event) -> None:
        """Queue ``event`` for the log. Never blocks, never raises."""
        try:
            if self._closed:
                self._count_drop("closed")
                return
            priority = PRIORITY.get(type(event))
            if priority is None:
                self._count_drop("not_an_event")
                return
            queues = self._queues
            if len(queues[0]) + len(queues[1]) + len(queues[2]) >= self._capacity and not (
                self._make_room(priority)
            ):
                return
            queues[priority].append((next(self._stamps), event))
            self._emitted += 1
            # Lifecycle events go out at once, and so does the first event after a lull (the
            # writer sleeps long when idle); otherwise the writer batches for flush_interval.
            if priority == Priority.LIFECYCLE or self._idle:
                self._idle = False
                self._wake.set()
        except Exception:  # telemetry must never break the generation
            self._count_drop("emit_error")

    def _make_room(self, priority: int) -> bool:
        """Drop the oldest event of the lowest class below ``priority``; else drop the new one."""
        for lower in range(priority):
            try:
                self._queues[lower].popleft()
            except IndexError:
                continue
            self._count_drop(f"queue_full_{Priority.NAMES[lower]}")
            return True
        self._count_drop(f"queue_full_{Priority.NAMES[priority]}")
        return False

    def _count_drop(self, reason: str) -> None:
        with self._drop_lock:
            self._dropped[reason] += 1

    # -- control --------------------------------------------------------------------------

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Wait until every event emitted before this call is appended (or dropped)."""
        target = next(self._stamps)
        deadline = None if timeout is None else time.monotonic() + timeout
        self._wake.set()  # once: waking the writer in a loop would defeat its retry backoff
        with self._done:
            while not self._flushed_up_to(target):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._done.wait(min(remaining, 0.1) if remaining is not None else 0.1)
        return True

    def _flushed_up_to(self, target: int) -> bool:
        # Queues first, then the writer's flag, then pending: the writer raises the flag before
        # it pops the queues, so an event cannot slip between "not queued" and "not pending".
        for queue in self._queues:
            try:
                if queue[0][0] < target:
                    return False
            except IndexError:
                continue
        return not self._writing and not self._pending

    def close(self, timeout: float = 5.0) -> None:
        """Say the worker stopped, flush within ``timeout``, stop the thread, and count what
        could not be written.

        A clean shutdown is not a failure: an emitter whose worker is in the log (it wrote or
        queued anything) appends ``WorkerStopped`` as its worker stream's last event, so no
        view declares the worker lost (heartbeats stop from here)."""
        if self._closing:
            return
        self._closing = True
        if self._appended or self._emitted or self._pending:
            # Beyond the queues' capacity (one event, once): the stop must not cost a sample.
            self._queues[Priority.LIFECYCLE].append((next(self._stamps), WorkerStopped(
                job=stream_of_worker(self.worker), ts=self._clock_ns(), worker=self.worker,
                host=socket.gethostname(), pid=os.getpid())))
            self._wake.set()
        self.flush(timeout)
        self._closed = True
        self._wake.set()
        self._thread.join(timeout)
        leftover = len(self._pending) + sum(len(q) for q in self._queues)
        if not leftover and not self._thread.is_alive() and self._marked:
            with contextlib.suppress(Exception):
                self.log.close_writer()  # everything written: no loss to report
        if leftover:
            with self._drop_lock:
                self._dropped["log_unavailable"] += leftover
            with contextlib.suppress(Exception):
                _log.error("telemetry events lost at shutdown: the log stayed unwritable",
                           events=leftover, worker=self.worker)

    @property
    def closing(self) -> bool:
        """Whether :meth:`close` was called (the emitter takes no more events)."""
        return self._closing

    def stats(self) -> EmitterStats:
        """Counts so far, for the telemetry-health exports."""
        with self._drop_lock:
            dropped = dict(self._dropped)
        return EmitterStats(
            emitted=self._emitted,
            appended=self._appended,
            queued=sum(len(q) for q in self._queues),
            in_flight=len(self._pending),
            dropped=dropped,
            errors=dict(self._errors),
        )

    def has_job(self, job: str) -> bool:
        """Whether ``job`` has begun — events other than ``JobQueued`` queued here, being
        written, written by this emitter, or already in its log — so a new job must not take
        that id (its events would collide on ``(job, seq)`` with the old ones). Events move
        queue → writer → log and are looked for in that order. The log's part reads the log
        (:meth:`~telemetry.log.base.EventLog.has_job`): a job-start cost, never an emit's."""
        def begun(item: _Stamped) -> bool:
            return item[1].job == job and not isinstance(item[1], JobQueued)

        for queue in self._queues:
            if any(begun(item) for item in list(queue)):
                return True
        if (job in self._next_seq and job not in self._queued_only) or job in self._ended:
            return True
        if any(begun(item) for item in list(self._pending)):
            return True
        return self.log.has_job(job)

    def __enter__(self) -> Emitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the background thread ------------------------------------------------------------

    def _open_writer(self) -> None:
        """Leave this writer's mark in the log; count the writers that died with theirs.

        Tried when the thread starts and after each write until it works (a log that is
        unwritable now gets the mark once it is writable again)."""
        try:
            crashed = self.log.open_writer(self.worker)
        except Exception as exc:  # no mark yet: a crash of ours would go unreported
            if not self._mark_failed:
                self._mark_failed = True
                with contextlib.suppress(Exception):
                    _log.warning("cannot leave a writer mark in the log; will retry",
                                 error=_error_kind(exc), detail=str(exc), worker=self.worker)
            return
        self._marked = True
        if crashed:
            self._crash_report = "due"  # forget the marks once a report of them is written
        for name in crashed:
            self._count_drop("writer_crashed")
            with contextlib.suppress(Exception):
                _log.warning("a writer of this log died without closing: the events it held "
                             "in memory are lost (counted as writer_crashed)",
                             crashed_worker=name, worker=self.worker)

    def _forget_crashed(self) -> None:
        """The report of dead writers is in the log: their marks can go."""
        self._crash_report = ""
        with contextlib.suppress(Exception):
            self.log.forget_crashed()

    def _run(self) -> None:
        """The writer loop; it must outlive any error, or telemetry would silently stop."""
        self._open_writer()
        while True:
            try:
                self._loop()
                return
            except Exception as exc:  # a bug or a broken logger: count it, keep writing
                self._errors[f"internal_{type(exc).__name__}"] += 1
                time.sleep(self._backoff_min)

    def _loop(self) -> None:
        backoff = self._backoff_min
        interval = self._flush_interval
        while True:
            self._wake.wait(interval)
            self._wake.clear()
            if self._closed or any(self._queues) or self._pending:
                interval = self._flush_interval  # busy: batch for flush_interval
                self._idle = False
            else:
                interval = IDLE_INTERVAL  # idle: sleep until an event wakes us
                self._idle = True
                if any(self._queues):  # an event slipped in before the flag was up
                    interval, self._idle = self._flush_interval, False
            self._writing = True
            if not self._pending:
                self._pending = self._drain()
                self._add_drop_report()
                self._add_heartbeat()
            if self._pending:
                written = self._write_pending()
                self._writing = False
                if written:
                    backoff = self._backoff_min
                    if self._crash_report == "pending":
                        self._forget_crashed()
                    if not self._marked:
                        self._open_writer()
                else:
                    self._notify_done()
                    if self._closed:
                        return
                    self._wake.wait(backoff)
                    backoff = min(backoff * 2, self._backoff_max)
                    continue
            self._writing = False
            self._notify_done()
            if self._closed and not any(self._queues):
                return

    def _drain(self) -> list[_Stamped]:
        """Take everything queued, merged back into emission order, with seq assigned."""
        items: list[_Stamped] = []
        for queue in self._queues:
            for _ in range(len(queue)):
                items.append(queue.popleft())
        items.sort(key=_stamp_of)
        next_seq, ended = self._next_seq, self._ended
        for _, event in items:
            if not 0 <= event.ts <= MAX_TS:
                self._correct(event, "ts", min(max(event.ts, 0), MAX_TS), "clock_skew_ts")
            duration = getattr(event, "duration_s", None)
            if duration is not None and not duration >= 0:  # negative, or NaN
                self._correct(event, "duration_s", 0.0, "negative_duration")
            stream = event.job
            if isinstance(event, JobQueued):
                if stream not in next_seq:
                    self._queued_only.add(stream)
            elif self._queued_only:
                self._queued_only.discard(stream)
            if event.seq == UNSEQUENCED:
                seq = next_seq.get(stream)
                if seq is None:
                    seq = ended.pop(stream, 0)  # a late sample of a finished job continues on
                force_setattr(event, "seq", seq)
            next_seq[stream] = event.seq + 1
            if event.worker is None:
                force_setattr(event, "worker", self.worker)
            if isinstance(event, TERMINAL_TYPES):
                # Remember a finished stream's next seq for a while (late samples), bounded.
                ended[stream] = next_seq.pop(stream)
                if len(ended) > ENDED_STREAMS_KEPT:
                    ended.popitem(last=False)
        return items

    def _correct(self, event: Event, name: str, value: object, reason: str) -> None:
        """Clamp an out-of-range field of ``event``, count it, and say so once per reason."""
        was = getattr(event, name)
        force_setattr(event, name, value)
        self._count_drop(reason)
        if self._dropped[reason] == 1:
            with contextlib.suppress(Exception):
                _log.warning("event field out of range: clamped (clock skew?)", field=name,
                             value=repr(was)[:40], type=type(event).__name__, reason=reason)

    def _add_drop_report(self) -> None:
        """Append an ``EventsDropped`` with the cumulative counts whenever they changed."""
        with self._drop_lock:
            if self._dropped == self._reported_drops:
                return
            counts = dict(self._dropped)
        self._reported_drops = counts
        if self._crash_report == "due":
            self._crash_report = "pending"
        stream = stream_of_worker(self.worker)
        seq = self._next_seq.get(stream, 0)
        self._next_seq[stream] = seq + 1
        report = EventsDropped(job=stream, seq=seq, ts=self._clock_ns(), worker=self.worker,
                               counts=counts)
        self._pending.append((-1, report))

    def _add_heartbeat(self) -> None:
        """A ``WorkerHeartbeat`` every ``heartbeat_interval`` s, so dead workers can be told."""
        if (self._heartbeat_interval is None or self._closing
                or time.monotonic() < self._next_heartbeat):
            return  # none once closing: WorkerStopped is the worker stream's last event
        self._next_heartbeat = time.monotonic() + self._heartbeat_interval
        stream = stream_of_worker(self.worker)
        seq = self._next_seq.get(stream, 0)
        self._next_seq[stream] = seq + 1
        self._pending.append((-1, WorkerHeartbeat(
            job=stream, seq=seq, ts=self._clock_ns(), worker=self.worker,
            host=socket.gethostname(), pid=os.getpid(), devices=self.devices)))

    def _write_pending(self) -> bool:
        """Append the pending events; on failure keep them for a retry and report once."""
        pending = self._pending
        try:
            for start in range(0, len(pending), self._max_batch):
                chunk = pending[start : start + self._max_batch]
                self.log.append([event for _, event in chunk])
                self._appended += len(chunk)
                self._pending = pending[start + len(chunk) :]
        except Exception as exc:
            kind = _error_kind(exc)
            self._errors[kind] += 1
            if self._errors[kind] == 1:
                with contextlib.suppress(Exception):  # stderr may sit on the same full disk
                    _log.error("telemetry log append failed; events kept for retry",
                               error=kind, detail=str(exc), worker=self.worker)
            return False
        self._pending = []
        return True

    def _notify_done(self) -> None:
        with self._done:
            self._done.notify_all()


def _stamp_of(item: _Stamped) -> int:
    return item[0]


def _error_kind(exc: BaseException) -> str:
    """A stable label for an error: its errno name where there is one, else its class."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno is not None:
            return errno.errorcode.get(cause.errno, str(cause.errno))
        cause = cause.__cause__
    return type(exc).__name__


def _close_at_exit(emitter: Emitter) -> None:
    """Flush at interpreter exit without keeping the emitter alive until then."""
    ref = weakref.ref(emitter)

    def close() -> None:
        instance = ref()
        if instance is not None:
            instance.close(timeout=2.0)

    atexit.register(close)
