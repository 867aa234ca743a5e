"""The NATS JetStream backend: the fleet's one stream behind the same :class:`EventLog` interface.

A fleet shares one JetStream stream, :data:`STREAM` (``WANTEL_EVENTS``), bound to the subjects
``wantel.events.>``. Each worker publishes on ``wantel.events.<worker>`` (see
:func:`subject_for`), one message per event, its payload the event as the local log stores it
(MessagePack, or JSON for an event MessagePack cannot hold).

Positions. A stream numbers its messages from 1; a log position here is the stream sequence
minus one, so an empty stream's first event is at position 0 as in every backend. Positions
are totally ordered and never reused; a message the stream's limits removed leaves a gap,
which readers step over (the next :class:`Batch` starts after it).

Appends. :meth:`NatsLog.append` publishes the batch as JetStream **atomic batches**
(nats-server ≥ 2.12, a stream with ``allow_atomic``, which a stream wantel creates has): chunks
of up to :data:`ATOMIC_BATCH` messages (the server's ``max_msgs`` limit for a batch; a server
configured lower says so in its refusal and the next chunks are that size), each message with
``Nats-Batch-Id``/``Nats-Batch-Sequence``, the last also with ``Nats-Batch-Commit``: one
acknowledgement a chunk, and with ``sync_interval: always`` one flush a chunk, rather than one of
each a message. The server stores a chunk whole or not at all, at consecutive sequences, and its
commit's acknowledgement carries the last sequence and the count. A chunk the server refuses —
one holding a ``Nats-Msg-Id`` it already has (error 10201, a re-ship after a crash), any other
batch error — is published again the per-message way, and so is everything on a stream without
``allow_atomic`` (one an operator made, or an older server's), and an append (or its last
chunk) shorter than :data:`ATOMIC_MIN`, which a commit would delay more than it saves: every
message sent before the first acknowledgement is awaited, one acknowledgement each. Chunks go
one at a time, so a worker's events reach the stream in the order of its log.

Every message carries ``Nats-Msg-Id = <job>:<seq>`` (a worker's own events have the job
``worker/<name>``, so theirs is ``worker/<name>:<seq>``): the server drops a retried message
within its duplicate window (:data:`DUPLICATE_WINDOW_S`) and acknowledges it with the original's
sequence, and projections de-duplicate by ``(job, seq)`` anyway, so a re-ship after the window
still counts once. The messages of one append are stored in order; an append longer than one
chunk is not one atomic unit, and with several publishers on the stream (a fleet) its positions
may interleave with theirs between chunks: the returned range then spans from its first to its
last position.

When an event counts as shipped: when its publish is acknowledged. The server acknowledges a
message once it is written to its stream store; with ``sync_interval: always`` in the server's
``jetstream`` block (every configuration wantel ships, ``deploy/nats/nats-server.conf``), it is
also flushed to disk first, so an acknowledged event survives a power cut. With the default
(a flush every two minutes) a power cut can lose acknowledged messages — a published Jepsen
analysis of NATS 2.12.1 found exactly that.

Reads use an ephemeral **ordered push consumer** created at the reader's position (no
acknowledgements: the reader's own checkpoint, written atomically with the state it belongs
to, is its durable place in the stream; a server-side durable consumer's ack floor could not be
written together with the projections it fed). :meth:`NatsLog.read` and each cursor read through
the **lean reader**, :mod:`telemetry.log.nats_wire`: a blocking socket of their own, the
consumer created by a JetStream API request, frames cut in bulk from large ``recv()`` buffers
(in C where ``telemetry/log/_natswire.c`` was built: ``compiled``), the stream sequence and the
pending count taken from each delivery's ``$JS.ACK…`` reply subject. The server pushes with flow
control, and the reader answers a flow-control request only once the messages before it were
handed over; between reads nothing reads the socket, so a reader that falls behind holds the
server to one window (a few thousand messages) instead of filling memory. The reader creates the
consumer again from the last message it handed over after a gap in the consumer's sequence, an
idle heartbeat (:data:`READ_HEARTBEAT_S`) whose ``Nats-Last-Consumer`` is not the last delivery
received, two heartbeats missed (a restarted server, a deleted consumer), or a lost connection,
which it reconnects (a follower, ``reconnect=True``, keeps trying; a command tries twice, then
raises :class:`LogError`). A gap in the stream's sequence (messages its limits removed) starts a
new :class:`Batch`; a payload that does not decode is :class:`Quarantined`. It reads several
times faster than nats-py's per-message path (its parser, a ``Msg`` object and an asyncio queue
hop a message, ~9 µs) and a pull consumer's ``fetch`` (docs/performance.md, "Fleet").

Where the lean reader cannot authenticate as configured (a creds file without the ``nkeys``
package, a server asking for an NKey), and with ``lean=False``, reads go through nats-py's own
ordered consumer on the log's connection instead (:class:`_ClientCursor`), with the same items:
there the client answers flow control for the messages taken from its queue, and a reader paused
past :data:`READ_QUEUE` starts again from its position.

Publishing, the stream's creation and its state go through nats-py, which is asynchronous; this
class runs it on an event loop in a daemon thread of its own and waits for each call, so the
interface stays the synchronous one every backend has. Connection failures, refusals and
timeouts are raised as :class:`LogError` (a missing stream as :class:`LogNotFound`), with the
server's address but never its credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
import threading
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4

import structlog

from telemetry.codec import (
    MalformedRecord,
    decode_each,
    decode_one,
    encode_many,
    encode_many_json,
)
from telemetry.events import Event
from telemetry.log.base import (
    Batch,
    EventLog,
    LogError,
    LogNotFound,
    Position,
    Quarantined,
    ReadItem,
)

#: The fleet's stream, and the subjects it is bound to.
STREAM: Final = "WANTEL_EVENTS"
SUBJECT_PREFIX: Final = "wantel.events"
SUBJECTS: Final = f"{SUBJECT_PREFIX}.>"
#: How long the server remembers a ``Nats-Msg-Id`` to drop a retried publish (seconds).
DUPLICATE_WINDOW_S: Final = 120.0
#: Messages a nats-py reader takes in one step at most.
READ_BATCH: Final = 4096
#: Messages (and bytes) nats-py holds for a reader at most. Flow control keeps it to a few
#: thousand while the reader reads; a reader paused for long (each idle heartbeat lets the
#: server send another window) fills it, the client drops what comes next, and the cursor
#: starts again from its position (:meth:`_ClientCursor.fetch`).
READ_QUEUE: Final = 65536
READ_QUEUE_BYTES: Final = 64 * 1024 * 1024
#: Messages published per pipelined round (the per-message way).
PUBLISH_WINDOW: Final = 4096
#: Messages in one atomic batch: nats-server's default ceiling (``jetstream { limits { batch {
#: max_msgs } } }``); a server configured lower refuses a larger one, saying its limit.
ATOMIC_BATCH: Final = 1000
#: Appends shorter than this are published one message at a time even where batches are
#: allowed: an atomic commit costs the server ~7–20 ms here (it stages the batch, then stores
#: it), a message ~0.5–1.5 ms with ``sync_interval: always``, so a live shipper's few events
#: a flush reach the stream sooner without one (docs/performance.md, "Fleet").
ATOMIC_MIN: Final = 8
#: JetStream's error codes for the batches it refuses.
ERR_BATCH_DUPLICATE: Final = 10201
ERR_BATCH_TOO_LARGE: Final = 10199
ERR_ATOMIC_DISABLED: Final = 10174
#: JetStream's error code for a stream that does not exist.
ERR_STREAM_NOT_FOUND: Final = 10059
#: How often the server tells an idle reader's consumer it is alive (seconds): two missed, and
#: the client recreates the consumer after the last message it received (a restarted server,
#: a lost consumer).
READ_HEARTBEAT_S: Final = 1.0
#: How long a cursor's poll waits for something new before it says "nothing yet" (seconds).
POLL_WAIT_S: Final = 0.05

_SUBJECT_TOKEN: Final = re.compile(r"[^A-Za-z0-9_:\-]")
T = TypeVar("T")
_log = structlog.get_logger("wantel.nats")


def subject_for(worker: str) -> str:
    """The subject ``worker`` publishes on: ``wantel.events.<worker>``, with every character a
    subject token may not hold (``.``, ``*``, ``>``, spaces…) written as ``_``."""
    token = _SUBJECT_TOKEN.sub("_", worker) or "_"
    return f"{SUBJECT_PREFIX}.{token}"


def redact(url: str) -> str:
    """``url`` without the user and password it may carry (never print credentials)."""
    parts = []
    for one in url.split(","):
        split = urlsplit(one.strip())
        if split.username is not None or split.password is not None:
            host = split.hostname or ""
            if split.port is not None:
                host = f"{host}:{split.port}"
            split = split._replace(netloc=f"***@{host}")
        parts.append(urlunsplit(split))
    return ",".join(parts)


@dataclass(frozen=True)
class NatsOptions:
    """How to reach the stream.

    Attributes:
        url: one server URL or several separated by commas (``nats://host:4222``; ``tls://``
            for TLS).
        creds: a NATS credentials file (JWT + NKey seed), never printed.
        ca: a CA bundle that signs the server's certificate (TLS).
        stream: the stream's name.
        replicas: the stream's replicas when this creates it (3 in a 3-node cluster).
        timeout: seconds to wait for a connection, an acknowledgement or a reply.
        reconnect: keep reconnecting forever after a lost connection (a shipper), rather than
            failing the next call (a command).
    """

    url: str
    creds: str | None = None
    ca: str | None = None
    stream: str = STREAM
    replicas: int = 1
    timeout: float = 5.0
    reconnect: bool = False


class _Loop:
    """An asyncio event loop in a daemon thread; :meth:`call` runs a coroutine on it and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="wantel-nats",
                                       daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def stop(self) -> None:
        """Cancel what the client left running (its flusher, a reconnect), then stop."""

        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):  # a task that would not end: stop regardless
            self.call(cancel_the_rest(), 5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


class NatsLog(EventLog):
    """An :class:`EventLog` on a NATS JetStream stream (see the module's docstring).

    Args:
        options: where the stream is and how to reach it.
        worker: the worker whose subject appends publish on (readers need none).
        create: make the stream if it is missing (writers); ``False`` raises
            :class:`LogNotFound` instead (readers).
        lean: read through :mod:`telemetry.log.nats_wire` (the default), or through nats-py
            (``False``; also where the lean reader cannot authenticate as configured).
        compiled: whether the lean reader cuts frames in C (``telemetry.log._natswire``) or
            with the Python reference; ``None`` is the process-wide default
            (:mod:`telemetry.accelerate`).
    """

    def __init__(self, options: NatsOptions, *, worker: str | None = None,
                 create: bool = True, lean: bool = True, compiled: bool | None = None) -> None:
        import nats  # noqa: F401 - the [nats] extra: a clear error below if it is missing

        from telemetry import accelerate
        from telemetry.log import nats_wire

        self.options = options
        #: How reads reach the stream, in words: "lean" or "nats-py (why)".
        self.reads = "lean" if lean else "nats-py (lean=False)"
        #: The lean reader's frame scan, and what it is in words ("C", "Python (…)").
        self.scan_frames: nats_wire.Scan
        self.frame_scan: str
        self.scan_frames, self.frame_scan = accelerate.choose(
            accelerate.NATS_FRAMES, nats_wire.scan_frames_py, compiled)
        self.subject = subject_for(worker or "_")
        self.location = f"{redact(options.url)} stream {options.stream}"
        self._closed = False
        self._loop = _Loop()
        self._nc: Any = None
        self._js: Any = None
        #: Whether appends publish atomic batches (the stream allows them; see the module's
        #: docstring), and how many messages a batch may hold.
        self.atomic_batches = False
        self.batch_limit = ATOMIC_BATCH
        #: The subscriptions (by ``id``) that dropped a message (their queue was full): their
        #: cursors start again from their position.
        self._overflowed: set[int] = set()
        #: Atomic batches the server stored, and those it refused (published the per-message
        #: way instead).
        self.batches_committed = 0
        self.batches_refused = 0
        try:
            self._loop.call(self._connect(create))
        except BaseException:
            self._loop.stop()
            raise

    # -- connection --------------------------------------------------------------------------

    async def _connect(self, create: bool) -> None:
        import nats
        from nats.errors import Error as NatsError

        opts = self.options
        kwargs: dict[str, Any] = {
            "servers": [u.strip() for u in opts.url.split(",")],
            "connect_timeout": opts.timeout,
            "allow_reconnect": True,
            "reconnect_time_wait": 0.5,
            "name": "wantel",
        }

        from nats.errors import SlowConsumerError

        overflowed = self._overflowed

        async def quiet(exc: Exception) -> None:  # the client's default prints to stderr
            if isinstance(exc, SlowConsumerError):  # a reader's queue was full: it dropped one
                overflowed.add(id(exc.sub))

        kwargs["error_cb"] = quiet
        if opts.creds:
            kwargs["user_credentials"] = opts.creds
        if opts.ca:
            context = ssl.create_default_context(cafile=opts.ca)
            kwargs["tls"] = context
        # The first connection is tried a few times, never forever (nats-py retries a refused
        # first connect without end when asked to reconnect forever); once connected, a
        # shipper's connection reconnects without end.
        kwargs["max_reconnect_attempts"] = 2
        try:
            self._nc = await asyncio.wait_for(nats.connect(**kwargs), opts.timeout * 3)
        except (TimeoutError, NatsError, OSError) as exc:
            raise LogError(f"cannot connect to NATS at {redact(opts.url)}: "
                           f"{_describe(exc)}") from None
        if opts.reconnect:
            self._nc.options["max_reconnect_attempts"] = -1
        _skip_stored_headers(self._nc)
        self._js = self._nc.jetstream(timeout=opts.timeout)
        await self._ensure_stream(create)

    async def _ensure_stream(self, create: bool) -> None:
        from nats.errors import Error as NatsError
        from nats.js.api import StorageType, StreamConfig
        from nats.js.errors import NotFoundError

        opts = self.options
        try:
            info = await self._js.stream_info(opts.stream)
        except NotFoundError:
            if not create:
                raise LogNotFound(f"no stream {opts.stream} at {redact(opts.url)}; ship a "
                                  f"worker's log to it first (wantel ship)") from None
            config = StreamConfig(name=opts.stream, subjects=[SUBJECTS],
                                  storage=StorageType.FILE, num_replicas=opts.replicas,
                                  duplicate_window=DUPLICATE_WINDOW_S, allow_atomic=True)
            try:
                created = await self._js.add_stream(config)
            except NatsError as exc:
                raise LogError(f"cannot create stream {opts.stream} at {redact(opts.url)}: "
                               f"{_describe(exc)}") from None
            # A server older than 2.12 ignores the field and does not echo it back.
            self.atomic_batches = bool(created.config.allow_atomic)
            return
        except (TimeoutError, NatsError) as exc:
            raise LogError(f"NATS at {redact(opts.url)} did not describe stream "
                           f"{opts.stream} (is JetStream enabled?): {_describe(exc)}") from None
        config = info.config
        self.atomic_batches = bool(config.allow_atomic)
        if SUBJECTS not in (config.subjects or []):
            raise LogError(f"stream {opts.stream} at {redact(opts.url)} exists with subjects "
                           f"{config.subjects}, not {SUBJECTS}: it is not a wantel stream")
        if config.storage is not None and config.storage != StorageType.FILE:
            raise LogError(f"stream {opts.stream} at {redact(opts.url)} keeps messages in "
                           f"{config.storage.value}, not file storage: events would not "
                           "survive a server restart")

    def _call(self, coro: Coroutine[Any, Any, T], what: str) -> T:
        from nats.errors import Error as NatsError

        if self._closed:
            coro.close()
            raise LogError(f"{what} on a closed log")
        try:
            return self._loop.call(coro, self.options.timeout * 4 + 5)
        except (LogError, LogNotFound):
            raise
        except (NatsError, OSError, TimeoutError) as exc:
            raise LogError(f"{what} at {self.location}: {_describe(exc)}") from None

    # -- the interface -----------------------------------------------------------------------

    def append(self, events: Sequence[Event]) -> range:
        """Publish ``events`` (atomic batches where the stream allows them, else pipelined) and
        return once every one is acknowledged."""
        if self._closed:
            raise LogError("append to a closed log")
        if not events:
            return range(0)
        return self._call(self._publish(events), "publishing")

    async def _publish(self, events: Sequence[Event]) -> range:
        try:
            payloads = encode_many(events)
        except OverflowError:
            payloads = encode_many_json(events)
        ids = [f"{event.job}:{event.seq}" for event in events]
        low: int | None = None
        high = 0
        begin = 0
        while begin < len(events):
            if self.atomic_batches and len(events) - begin >= ATOMIC_MIN:
                end = min(len(events), begin + self.batch_limit)
                stored = await self._publish_atomic(payloads[begin:end], ids[begin:end])
                if stored is None:  # refused: the same chunk, one message at a time
                    stored = await self._publish_each(payloads[begin:end], ids[begin:end])
            else:
                end = min(len(events), begin + PUBLISH_WINDOW)
                stored = await self._publish_each(payloads[begin:end], ids[begin:end])
            low = stored.start if low is None else min(low, stored.start)
            high = max(high, stored.stop)
            begin = end
        assert low is not None
        return range(low, high)

    async def _publish_atomic(self, payloads: Sequence[bytes], ids: Sequence[str]) -> range | None:
        """One atomic batch; its positions, or ``None`` if the server refused it (stored
        nothing). A lost connection or a commit left unanswered raises, as a publish does."""
        nc, subject = self._nc, self.subject
        batch = uuid4().hex
        last = len(payloads)
        if not await _send_frames(nc, subject, batch, payloads[:-1], ids[:-1]):
            for n, (payload, msg_id) in enumerate(zip(payloads[:-1], ids[:-1], strict=True), 1):
                await nc.publish(subject, payload, headers={
                    "Nats-Batch-Id": batch, "Nats-Batch-Sequence": str(n), "Nats-Msg-Id": msg_id})
        headers = {"Nats-Batch-Id": batch, "Nats-Batch-Sequence": str(last),
                   "Nats-Msg-Id": ids[-1], "Nats-Batch-Commit": "1"}
        reply = await nc.request(subject, payloads[-1], timeout=self.options.timeout,
                                 headers=headers)
        try:
            ack = json.loads(reply.data)
        except ValueError:
            ack = {"error": {"description": f"an unreadable acknowledgement {reply.data[:80]!r}"}}
        error = ack.get("error") if isinstance(ack, dict) else {"description": repr(ack)}
        if error:
            self._refused(error, last)
            return None
        if ack.get("stream") != self.options.stream:
            raise LogError(f"subject {subject} at {redact(self.options.url)} is stored by "
                           f"stream {ack.get('stream')}, not {self.options.stream}")
        seq, count = int(ack["seq"]), int(ack.get("count", last))
        self.batches_committed += 1
        return range(seq - count, seq)

    def _refused(self, error: dict[str, Any], size: int) -> None:
        """Note why the server refused a batch, and publish the way it will take next time."""
        code = error.get("err_code")
        description = str(error.get("description", error))
        self.batches_refused += 1
        if code == ERR_BATCH_TOO_LARGE:
            found = re.search(r"(\d+)\s*$", description)
            limit = int(found.group(1)) if found else size // 2
            self.batch_limit = max(1, min(self.batch_limit, limit, size - 1))
        elif code == ERR_ATOMIC_DISABLED:
            self.atomic_batches = False  # the stream was edited meanwhile
        if code != ERR_BATCH_DUPLICATE:  # a duplicate is the expected re-ship after a crash
            _log.info("atomic batch refused; publishing it one message at a time",
                      stream=self.options.stream, code=code, reason=description)

    async def _publish_each(self, payloads: Sequence[bytes], ids: Sequence[str]) -> range:
        """Every message pipelined (all sent before the first acknowledgement is awaited), one
        acknowledgement each; a retried ``Nats-Msg-Id`` is answered with the original's."""
        js, subject, stream = self._js, self.subject, self.options.stream
        futures = []
        try:
            for payload, msg_id in zip(payloads, ids, strict=True):
                futures.append(await js.publish_async(
                    subject, payload, stream=stream, headers={"Nats-Msg-Id": msg_id},
                    wait_stall=self.options.timeout))
            acks = await asyncio.wait_for(asyncio.gather(*futures), self.options.timeout)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        seqs = [int(ack.seq) for ack in acks]
        return range(min(seqs) - 1, max(seqs))

    def last_position(self) -> Position | None:
        """The last message's position (stream sequence − 1), or ``None`` if there is none."""
        state = self._call(self._state(), "reading the stream's state")
        messages, last = state
        return None if messages == 0 else last - 1

    async def _state(self) -> tuple[int, int]:
        info = await self._js.stream_info(self.options.stream)
        return int(info.state.messages), int(info.state.last_seq)

    def read(self, start: Position = 0) -> Iterator[ReadItem]:
        """Everything stored at or after ``start`` when called, in batches of consecutive
        positions (a gap in the stream's sequences starts a new batch)."""
        _messages, last = self._call(self._state(), "reading the stream's state")
        if last - 1 < start:
            return
        cursor = self.cursor(start)
        try:
            while cursor.position <= last - 1:
                items = cursor.fetch(wait=self.options.timeout, upto=last)
                if not items:
                    break  # the rest was removed by the stream's limits meanwhile
                yield from items
        finally:
            cursor.close()

    @property
    def usable(self) -> bool:
        """Whether the connection is open (or reconnecting): False once it gave up or closed."""
        return not self._closed and self._nc is not None and not self._nc.is_closed

    def cursor(self, start: Position = 0) -> _NatsCursor | _ClientCursor:
        """A reader holding one ordered push consumer open, from ``start`` on: on a connection
        of its own through the lean reader, else through nats-py (see ``lean``)."""
        if self.reads == "lean":
            return _NatsCursor(self, start)
        return _ClientCursor(self, start)

    def _lean_unsupported(self, why: str) -> None:
        """The lean reader cannot authenticate as configured: read through nats-py."""
        if self.reads == "lean":
            _log.info("reading through nats-py", stream=self.options.stream, reason=why)
        self.reads = f"nats-py ({why})"

    def close(self) -> None:
        """Drain and close the connection; the log may not be used afterwards."""
        if self._closed:
            return
        self._closed = True
        if self._nc is not None:
            with contextlib.suppress(Exception):  # a connection to a server that is gone
                self._loop.call(self._nc.close(), self.options.timeout + 1)
        self._loop.stop()

    # -- for cursors -------------------------------------------------------------------------

    async def _subscribe(self, start: Position) -> Any:
        from nats.js.api import ConsumerConfig, DeliverPolicy

        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                opt_start_seq=start + 1, inactive_threshold=60.0)
        return await self._js.subscribe(SUBJECTS, stream=self.options.stream, config=config,
                                        ordered_consumer=True, idle_heartbeat=READ_HEARTBEAT_S,
                                        pending_msgs_limit=READ_QUEUE,
                                        pending_bytes_limit=READ_QUEUE_BYTES)


class _Polling:
    """``poll`` for a cursor: its ``fetch`` until nothing more comes, waiting briefly for the
    first (what each of the two readers does the same way)."""

    def fetch(self, *, wait: float, upto: int | None = None) -> list[ReadItem]:
        raise NotImplementedError

    def poll(self) -> Iterator[ReadItem]:
        """What is new since the last poll (waiting briefly when nothing is)."""
        wait = POLL_WAIT_S
        while True:
            items = self.fetch(wait=wait)
            if not items:
                return
            yield from items
            wait = 0.001


class _NatsCursor(_Polling):
    """The lean reader: an ordered push consumer from a position on a connection of its own
    (:mod:`telemetry.log.nats_wire`); :meth:`poll` yields what the stream holds beyond it.
    Where the lean reader cannot authenticate as configured it hands over to a
    :class:`_ClientCursor` (nats-py) from its position."""

    def __init__(self, log: NatsLog, start: Position) -> None:
        self.log = log
        self.position = max(start, 0)
        self._conn: Any = None
        self._consumer: Any = None
        self._client: _ClientCursor | None = None

    def _ensure(self) -> Any:
        from telemetry.log.nats_wire import (
            OrderedConsumer,
            WireConnection,
            WireError,
            WireUnsupported,
        )

        if self._consumer is not None:
            return self._consumer
        log, opts = self.log, self.log.options
        if log._closed:
            raise LogError("reading on a closed log")
        conn = WireConnection(opts.url, ca=opts.ca, creds=opts.creds, timeout=opts.timeout,
                              scan=log.scan_frames)
        try:
            conn.connect()
        except WireUnsupported as exc:
            log._lean_unsupported(str(exc))
            return None
        except WireError as exc:
            if not opts.reconnect:
                raise LogError(str(exc)) from None
        self._conn = conn
        self._consumer = OrderedConsumer(conn, opts.stream, self.position + 1,
                                         heartbeat=READ_HEARTBEAT_S, reconnect=opts.reconnect)
        return self._consumer

    def fetch(self, *, wait: float, upto: int | None = None) -> list[ReadItem]:
        """What was delivered (waiting up to ``wait`` for the first message), as read items;
        ``upto``: the last stream sequence wanted (``read()``: what was stored when it
        began)."""
        from telemetry.log.nats_wire import ApiError, WireError, WireUnsupported

        if self._client is not None:
            return self._client.fetch(wait=wait, upto=upto)
        try:
            consumer = self._ensure()
            if consumer is None:
                self._client = _ClientCursor(self.log, self.position)
                return self._client.fetch(wait=wait, upto=upto)
            runs = consumer.take(wait)
        except WireUnsupported as exc:  # a reconnect to a server that now asks for more
            self.log._lean_unsupported(str(exc))
            self.close()
            self._client = _ClientCursor(self.log, self.position)
            return self._client.fetch(wait=wait, upto=upto)
        except ApiError as exc:
            self.close()
            if exc.code == ERR_STREAM_NOT_FOUND:
                raise LogNotFound(f"no stream {self.log.options.stream} at "
                                  f"{redact(self.log.options.url)}") from None
            raise LogError(str(exc)) from None
        except WireError as exc:
            self.close()
            raise LogError(f"reading at {self.log.location}: {exc}") from None
        items: list[ReadItem] = []
        where = self.log.location
        for run in runs:
            payloads = run.payloads
            if upto is not None and run.first + len(payloads) - 1 > upto:
                payloads = payloads[:max(0, upto - run.first + 1)]
                if not payloads:
                    continue
            _decode_run(run.first - 1, payloads, run.pending, where, items)
            self.position = run.first - 1 + len(payloads)
        return items

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        consumer, self._consumer = self._consumer, None
        conn, self._conn = self._conn, None
        if consumer is not None:
            consumer.close()
        if conn is not None:
            conn.close()


def _decode_run(first: Position, payloads: list[bytes], pending: int, where: str,
                items: list[ReadItem]) -> None:
    """Decode messages at consecutive positions from ``first`` into ``items``: one
    :class:`Batch`, or batches around the payloads that do not decode (each
    :class:`Quarantined`)."""
    try:
        events = decode_each(payloads)
    except MalformedRecord:
        pass
    else:
        items.append(Batch(first, events, pending))
        return
    events = []
    start = first
    for position, payload in enumerate(payloads, first):
        try:
            events.append(decode_one(payload))
        except MalformedRecord as exc:
            if events:
                items.append(Batch(start, events))
            items.append(Quarantined(first=position, count=1, next=position + 1,
                                     where=f"{where} seq {position + 1}", reason=str(exc)))
            events, start = [], position + 1
    if events:
        items.append(Batch(start, events, pending))


class _ClientCursor(_Polling):
    """The nats-py reader: an ordered push consumer from a position through the log's own
    connection; :meth:`poll` yields what the stream holds beyond it."""

    def __init__(self, log: NatsLog, start: Position) -> None:
        self.log = log
        self.position = max(start, 0)
        self._sub: Any = None

    def _ensure(self) -> Any:
        if self._sub is None:
            self._sub = self.log._call(self.log._subscribe(self.position), "reading")
        return self._sub

    def fetch(self, *, wait: float, upto: int | None = None) -> list[ReadItem]:
        """What was delivered (waiting up to ``wait`` for the first message), as read items."""
        sub = self._ensure()
        messages = self.log._call(_take(sub, wait, READ_BATCH), "reading")
        overflowed = self.log._overflowed
        if overflowed and id(getattr(sub, "_sub", sub)) in overflowed:
            # The client dropped a message for this reader, somewhere after what it yielded:
            # none of what it holds can be trusted to be whole. Start again from the position.
            self.close()
            return []
        items: list[ReadItem] = []
        events: list[Event] = []
        first = self.position
        behind = 0
        for message in messages:
            seq, pending = _sequence(message.reply)
            if upto is not None and seq > upto:
                continue  # read(): only what was stored when it began (the cursor moves on)
            position = seq - 1
            if position < self.position:
                continue  # a redelivery after the consumer was recreated
            if position != first + len(events):  # a gap: the stream's limits removed some
                if events:
                    items.append(Batch(first, events))
                events, first = [], position
            try:
                events.append(decode_one(message.data))
            except MalformedRecord as exc:
                if events:
                    items.append(Batch(first, events))
                items.append(Quarantined(first=position, count=1, next=position + 1,
                                         where=f"{self.log.location} seq {seq}",
                                         reason=str(exc)))
                events, first = [], position + 1
            self.position = position + 1
            behind = pending
        if events:
            items.append(Batch(first, events, behind))
        return items

    def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is None:
            return
        self.log._overflowed.discard(id(getattr(sub, "_sub", sub)))
        if self.log._closed:
            return
        with contextlib.suppress(Exception):  # else it expires on its own (inactive_threshold)
            self.log._loop.call(_unsubscribe(sub), self.log.options.timeout + 1)


async def _take(sub: Any, wait: float, most: int) -> list[Any]:
    """Up to ``most`` of the messages the consumer delivered, waiting up to ``wait`` seconds
    for the first.

    The messages wait in the subscription's own queue until taken: nats-py answers the
    server's flow control only once the messages before it left that queue, so a reader that
    falls behind holds the server back rather than filling memory (a callback would take them
    at once and answer for them, and beyond the client's pending limit it drops messages).
    The queue is drained in one step (``next_msg``, the public way, costs a task and a timer
    a message); a client without it gets ``next_msg``."""
    queue = getattr(sub, "_pending_queue", None)
    if queue is None or not hasattr(sub, "_pending_size"):
        return await _take_slowly(sub, wait, most)
    taken: list[Any] = []
    if queue.empty():
        try:
            taken.append(await asyncio.wait_for(queue.get(), wait))
        except TimeoutError:
            return taken
    while len(taken) < most and not queue.empty():
        taken.append(queue.get_nowait())
    size = 0
    for message in taken:
        size += len(message.data)
        queue.task_done()
    sub._pending_size -= size
    # Answer flow control now if it waited for these (else the client's own check does, within
    # a quarter of a second), as nats-py's next_msg does.
    jsi: Any = getattr(getattr(sub, "_sub", None), "_jsi", None)
    reply = getattr(jsi, "_fcr", None)
    if reply and jsi.get_js_delivered() >= jsi._fcd:
        jsi._fcr = None
        await sub._conn.publish(reply)
    return taken


async def _take_slowly(sub: Any, wait: float, most: int) -> list[Any]:
    from nats.errors import TimeoutError as NatsTimeout

    taken: list[Any] = []
    with contextlib.suppress(TimeoutError, NatsTimeout):
        taken.append(await sub.next_msg(timeout=wait))
        while len(taken) < most and sub.pending_msgs:
            taken.append(await sub.next_msg(timeout=wait))
    return taken


def _sequence(reply: str) -> tuple[int, int]:
    """(stream sequence, messages pending) from a JetStream delivery's reply subject:
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>``, or
    with a domain and an account hash after ``$JS.ACK`` (12 tokens or more)."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[8])
    return int(tokens[7]), int(tokens[10])


async def _unsubscribe(sub: Any) -> None:
    await sub.unsubscribe()  # the server removes the ephemeral consumer when interest goes


async def _send_frames(nc: Any, subject: str, batch: str, payloads: Sequence[bytes],
                       ids: Sequence[str]) -> bool:
    """Queue a batch's messages (all but its commit) on the connection as ready-made ``HPUB``
    frames, in one piece; False, having sent nothing, where the client's own ``publish`` must
    do it.

    nats-py's ``publish`` spends ~4 µs a message checking and assembling its header block and
    protocol line, a third of a shipper's CPU per event; the frames of one batch differ only
    in a sequence number, an id and the payload, so they are written here in ~0.5 µs each and
    handed to the client's outgoing buffer (its ``_send_command``) in order, before the commit
    that ``request`` sends. That needs the hook, a connected client (while reconnecting,
    ``publish`` knows what to buffer and what to refuse), ids that are valid header values and
    payloads within the server's limit — else the client's way."""
    send = getattr(nc, "_send_command", None)
    if send is None or not nc.is_connected or not payloads:
        return False
    limit = getattr(nc, "max_payload", 0) or 0
    if any(len(payload) > limit for payload in payloads) or any(
            not _HEADER_VALUE.fullmatch(msg_id) for msg_id in ids):
        return False
    head = f"NATS/1.0\r\nNats-Batch-Id: {batch}\r\nNats-Batch-Sequence: "
    command = f"HPUB {subject} ".encode()
    frames = []
    for n, (payload, msg_id) in enumerate(zip(payloads, ids, strict=True), 1):
        header = f"{head}{n}\r\nNats-Msg-Id: {msg_id}\r\n\r\n".encode()
        frames.append(b"%s%d %d\r\n%s%s\r\n" % (command, len(header),
                                                   len(header) + len(payload), header, payload))
    await send(b"".join(frames))
    return True


#: What a header value may hold as written in a frame: no line breaks, no surrounding spaces.
_HEADER_VALUE: Final = re.compile(r"[^\s](?:[^\r\n]*[^\s])?")


def _skip_stored_headers(nc: Any) -> None:
    """Have the client parse only status headers (flow control, heartbeats, "no responders"),
    not the headers of every delivered message.

    A stored message comes back with its ``Nats-Msg-Id`` header, and nats-py parses every
    header block it receives, character by character: half of a reader's time at ~100k
    messages/s here. Nothing this class reads needs a stored message's headers (a reader wants
    the payload and the reply subject's sequences; an acknowledgement is a JSON body), so the
    connection's header parsing keeps the server's status lines, which the client's consumers
    and requests act on, and skips the rest. A client without the hook is left as it is."""
    parse = getattr(nc, "_process_headers", None)
    if parse is None:
        return

    async def status_only(headers: bytes | None) -> Any:
        # "NATS/1.0 100 Idle Heartbeat…", "NATS/1.0 503…": a status after the version.
        if headers and headers[_HDR_VERSION:_HDR_VERSION + 1] == b" ":
            return await parse(headers)
        return None

    nc._process_headers = status_only


_HDR_VERSION: Final = len(b"NATS/1.0")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    name = type(exc).__name__
    return f"{name}: {text}" if text and text != name else name


__all__ = ["DUPLICATE_WINDOW_S", "STREAM", "SUBJECTS", "NatsLog", "NatsOptions", "redact",
           "subject_for"]
