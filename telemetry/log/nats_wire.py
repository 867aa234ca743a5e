"""A lean, synchronous NATS client for one job: reading the fleet's stream fast.

nats-py, the client :class:`~telemetry.log.nats.NatsLog` publishes with, spends ~9 µs on each
delivered message (its Python parser, a ``Msg`` object, a hop through an asyncio queue): a
catch-up read of the stream topped out at ~105k events/s. A reader needs little of that
machinery — the payload and the ``$JS.ACK…`` reply subject of each message, in order — so
:meth:`NatsLog.read` and its cursors read through this module instead:

* :class:`WireConnection`: one blocking socket (TLS where the URL says ``tls://`` or the server
  requires it, verified against the options' CA), the protocol's text (``INFO``, ``CONNECT``
  with headers and no-responders, ``PING``/``PONG``, ``SUB``/``UNSUB``, ``PUB``, ``MSG``/``HMSG``,
  ``-ERR``), a user and password or a token from the URL, and request/reply (an inbox
  subscription a request). Frames are cut from large ``recv()`` buffers in bulk by
  :func:`scan_frames_py` (or its C twin, ``telemetry.log._natswire.scan_frames``, where built).
* :class:`OrderedConsumer`: the ordered push consumer nats-py would create (a JetStream API
  request ``$JS.API.CONSUMER.CREATE.<stream>``: an inbox to deliver to, from a stream sequence,
  no acknowledgements, flow control, idle heartbeats, in memory, one replica, removed by the
  server when nobody has listened for a minute), taken from in runs of consecutive stream
  sequences.

Flow control. The server stops after a window of messages and sends a flow-control request
(status 100 with a reply subject); the consumer answers it — an empty message to that subject
— only when the messages before it have been handed to the reader. Between reads nothing
reads the socket at all, so a reader that stops reading holds the server back, its memory
bounded by one ``recv()`` buffer and the kernel's socket buffer; an idle heartbeat that says
the consumer is stalled (``Nats-Consumer-Stalled``) is answered the same way, when it is
read.

Gaps. Each delivery's reply subject carries its stream sequence, its consumer sequence and the
messages still pending. A consumer sequence that skips (a message lost between server and
client), an idle heartbeat whose ``Nats-Last-Consumer`` is not the last one received, or two
heartbeat periods with nothing at all from the consumer (a restarted server, a deleted
consumer) make the consumer start again: a new one from the stream sequence after the last
message handed over. A stream sequence that skips is the stream's own gap (messages its limits
removed) and is reported as a new run. A lost connection is reconnected (every URL in turn)
and the consumer recreated, or raised as :class:`WireError` where the caller asked not to wait
(a command).

Credentials. A creds file (a JWT and an NKey seed) is read, as nats-py reads it, when the
server sends a nonce: the nonce is signed with the seed by the ``nkeys`` package nats-py uses
for it (the ``nats`` extra installs it). Where it is missing, or where the server asks for
something this client does not send, :class:`WireUnsupported` is raised on connecting and the
caller reads through nats-py instead. Nothing here prints a credential: an
error names the server by :func:`address`, without user or password.
"""

from __future__ import annotations

import contextlib
import json
import operator
import secrets
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

#: One frame as :func:`scan_frames_py` cuts it: subscription id, reply subject (``None`` when
#: there is none), header block (``None`` for ``MSG``), payload.
Frame = tuple[bytes, bytes | None, bytes | None, bytes]
Scan = Callable[[bytes, int], tuple[list[Frame], int]]

#: Bytes asked of the socket in one ``recv()``: a few thousand events' messages.
RECV_BYTES: Final = 1 << 20
#: Bytes asked of the socket while connecting (a line at a time).
_LINE_MAX: Final = 64 * 1024

_CRLF: Final = b"\r\n"
_STATUS_HDR: Final = b"NATS/1.0 "
_ACK_PREFIX: Final = b"$JS.ACK."
_NANOS: Final = 1_000_000_000


class WireError(Exception):
    """The connection failed, was lost, or the server refused something (``-ERR``, an API
    error). The message names the server without credentials."""


class WireUnsupported(WireError):
    """Authentication this client cannot do is configured (read through nats-py instead)."""


class ApiError(WireError):
    """A JetStream API request was answered with an error: ``code`` is its ``err_code``."""

    def __init__(self, text: str, code: int | None) -> None:
        super().__init__(text)
        self.code = code


def address(url: str) -> str:
    """``url`` as an error may print it: scheme, host and port, never a user or password."""
    split = urlsplit(url if "://" in url else f"nats://{url}")
    host = split.hostname or ""
    port = split.port or 4222
    hidden = "***@" if split.username is not None or split.password is not None else ""
    return f"{split.scheme}://{hidden}{host}:{port}"


# -- frames ------------------------------------------------------------------------------------


def scan_frames_py(buf: bytes, pos: int) -> tuple[list[Frame], int]:
    """The ``MSG``/``HMSG`` frames in ``buf`` from ``pos``, and the offset after the last.

    Stops at the first thing that is not a whole message frame: any other operation
    (``PING``, ``INFO``, ``-ERR``…, which the caller handles a line at a time) or a frame the
    buffer holds only part of (the caller receives more and scans again from the offset).
    This is the reference; ``telemetry/log/_natswire.c`` does the same in C, and a test holds
    the two equal.

    ``MSG <subject> <sid> [reply] <size>`` / ``HMSG <subject> <sid> [reply] <hdr> <total>``,
    then the bytes and ``\\r\\n``.
    """
    if not 0 <= pos <= len(buf):
        raise ValueError(f"offset {pos} outside a buffer of {len(buf)} bytes")
    frames: list[Frame] = []
    append = frames.append
    find = buf.find
    end = len(buf)
    while True:
        eol = find(_CRLF, pos)
        if eol < 0:
            break
        if buf.startswith(b"HMSG ", pos):
            parts = buf[pos + 5:eol].split()
            if len(parts) == 5:
                reply: bytes | None = parts[2]
            elif len(parts) == 4:
                reply = None
            else:
                break  # malformed: the caller's line handling reports it
            if not (parts[-2].isdigit() and parts[-1].isdigit()):
                break
            hdr, total = int(parts[-2]), int(parts[-1])
            if hdr > total:
                break
            body = eol + 2
            stop = body + total
            if stop + 2 > end or buf[stop:stop + 2] != _CRLF:
                break  # not all here yet (or not followed by CRLF: the caller reports it)
            append((parts[1], reply, buf[body:body + hdr], buf[body + hdr:stop]))
            pos = stop + 2
        elif buf.startswith(b"MSG ", pos):
            parts = buf[pos + 4:eol].split()
            if len(parts) == 4:
                reply = parts[2]
            elif len(parts) == 3:
                reply = None
            else:
                break
            if not parts[-1].isdigit():
                break
            body = eol + 2
            stop = body + int(parts[-1])
            if stop + 2 > end or buf[stop:stop + 2] != _CRLF:
                break
            append((parts[1], reply, None, buf[body:stop]))
            pos = stop + 2
        else:
            break
    return frames, pos


# -- the connection ----------------------------------------------------------------------------


@dataclass
class _Server:
    url: str
    scheme: str
    host: str
    port: int
    user: str | None
    password: str | None


def _servers(url: str) -> list[_Server]:
    out = []
    for one in url.split(","):
        text = one.strip()
        if not text:
            continue
        split = urlsplit(text if "://" in text else f"nats://{text}")
        out.append(_Server(text, split.scheme or "nats", split.hostname or "127.0.0.1",
                           split.port or 4222, split.username, split.password))
    if not out:
        raise WireError("no NATS server URL")
    return out


class WireConnection:
    """A blocking connection to one of ``url``'s servers (comma-separated; tried in turn).

    Args:
        url: as :class:`~telemetry.log.nats.NatsOptions` takes it.
        ca: a CA bundle that signs the server's certificate.
        creds: a NATS credentials file (needs the ``nkeys`` package).
        timeout: seconds for connecting and for each request's reply.
        scan: the frame scan: :func:`scan_frames_py` or its C twin.
    """

    def __init__(self, url: str, *, ca: str | None = None, creds: str | None = None,
                 timeout: float = 5.0, scan: Scan = scan_frames_py, name: str = "wantel") -> None:
        self.servers = _servers(url)
        self.ca = ca
        self.creds = creds
        self.timeout = timeout
        self.scan = scan
        self.name = name
        self.server: _Server = self.servers[0]
        self.info: dict[str, Any] = {}
        self._sock: socket.socket | None = None
        self._buf = b""
        self._pos = 0
        self._sid = 0
        #: Requests waiting for their reply, by the subscription id of their inbox.
        self._replies: dict[bytes, Frame | None] = {}
        self._pongs = 0
        #: Frames of other subscriptions received while waiting for a reply, in order.
        self._held: list[Frame] = []

    # -- connecting ------------------------------------------------------------------------

    @property
    def location(self) -> str:
        return address(self.server.url)

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self) -> None:
        """Connect to the first server that answers (raises :class:`WireError` naming the
        last one tried when none does)."""
        self.close()
        last: Exception | None = None
        for server in self.servers:
            self.server = server
            try:
                self._open(server)
                return
            except WireUnsupported:
                self.close()
                raise
            except (OSError, WireError, ValueError) as exc:
                self.close()
                last = exc
        raise WireError(f"cannot connect to NATS at {self.location}: {_describe(last)}")

    def _open(self, server: _Server) -> None:
        sock = socket.create_connection((server.host, server.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._buf, self._pos = b"", 0
        line = self._line()
        if not line.startswith(b"INFO "):
            raise WireError(f"the server did not say INFO: {line[:60]!r}")
        self.info = json.loads(line[5:])
        if self.info.get("tls_required") or server.scheme == "tls":
            context = (ssl.create_default_context(cafile=self.ca) if self.ca
                       else ssl.create_default_context())
            if self._pos < len(self._buf):
                raise WireError("the server sent data before the TLS handshake")
            self._sock = context.wrap_socket(sock, server_hostname=server.host)
        if not self.info.get("headers"):
            raise WireUnsupported("the server does not support headers (nats-server < 2.2)")
        connect: dict[str, Any] = {
            "verbose": False, "pedantic": False, "lang": "python-wantel", "version": "1",
            "protocol": 1, "headers": True, "no_responders": True, "name": self.name,
            "echo": True}
        nonce = self.info.get("nonce")
        if self.creds and nonce:  # as nats-py: the creds file is read only when asked for
            jwt, sign = self._creds_signer()
            connect["jwt"] = jwt
            connect["sig"] = sign(nonce.encode())
        elif server.user is not None and server.password is not None:
            connect["user"], connect["pass"] = server.user, server.password
        elif server.user is not None:
            connect["auth_token"] = server.user
        elif self.info.get("auth_required") and nonce:
            raise WireUnsupported("the server asks for an NKey or JWT (no creds file given)")
        self._send(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        # The first answer is PONG or -ERR (authorization violation, …).
        deadline = time.monotonic() + self.timeout
        pongs = self._pongs
        while self._pongs == pongs:
            self._pump(deadline - time.monotonic())
            if time.monotonic() > deadline and self._pongs == pongs:
                raise WireError("no PONG from the server")

    def _creds_signer(self) -> tuple[str, Callable[[bytes], str]]:
        try:
            import nkeys  # nats-py's signer (the nats extra installs it)
        except ImportError:
            raise WireUnsupported("a creds file needs the nkeys package") from None
        import base64
        import re

        assert self.creds is not None
        try:
            text = Path(self.creds).read_text()
        except OSError as exc:
            raise WireError(f"cannot read the creds file: {exc.strerror}") from None
        blocks = re.findall(r"-----BEGIN [^\n]*-----\s*\n\s*(\S+)\s*\n\s*------END", text)
        if len(blocks) < 2:
            raise WireError("the creds file holds no JWT and seed")
        jwt, seed = blocks[0], blocks[1].encode()

        def sign(nonce: bytes) -> str:
            kp = nkeys.from_seed(seed)
            signed = kp.sign(nonce)
            kp.wipe()
            return base64.b64encode(signed).decode()  # as nats-py signs

        return jwt, sign

    def close(self) -> None:
        sock, self._sock = self._sock, None
        self._buf, self._pos = b"", 0
        self._held = []
        self._replies.clear()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    # -- sending ---------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self._sock is None:
            raise WireError(f"not connected to NATS at {self.location}")
        try:
            self._sock.sendall(data)
        except OSError as exc:
            self.close()
            raise WireError(f"lost the connection to NATS at {self.location}: "
                            f"{_describe(exc)}") from None

    def subscribe(self, subject: bytes) -> bytes:
        self._sid += 1
        sid = str(self._sid).encode()
        self._send(b"SUB %s %s\r\n" % (subject, sid))
        return sid

    def unsubscribe(self, sid: bytes) -> None:
        self._send(b"UNSUB %s\r\n" % sid)

    def publish(self, subject: bytes, payload: bytes = b"", reply: bytes | None = None) -> None:
        if reply is None:
            self._send(b"PUB %s %d\r\n%s\r\n" % (subject, len(payload), payload))
        else:
            self._send(b"PUB %s %s %d\r\n%s\r\n" % (subject, reply, len(payload), payload))

    def request(self, subject: str, payload: bytes, timeout: float | None = None) -> bytes:
        """The reply to ``payload`` sent to ``subject`` (raises :class:`WireError` on no
        responders or no reply in time). Other subscriptions' frames received meanwhile are
        kept, in order, for :meth:`frames`."""
        inbox = new_inbox()
        sid = self.subscribe(inbox)
        replies = self._replies
        replies[sid] = None
        try:
            self.publish(subject.encode(), payload, inbox)
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            while replies.get(sid) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WireError(f"no reply from NATS at {self.location} to {subject} "
                                    "in time")
                self._held.extend(self._pump(left))
            reply = replies[sid]
            assert reply is not None
        finally:
            replies.pop(sid, None)
            if self._sock is not None:
                self.unsubscribe(sid)
        headers, data = reply[2], reply[3]
        if headers and headers.startswith(b"NATS/1.0 503"):
            raise WireError(f"no responders for {subject} at {self.location} "
                            "(is JetStream enabled?)")
        return data

    # -- receiving ---------------------------------------------------------------------------

    def frames(self, wait: float) -> list[Frame]:
        """The frames for every subscription but the inbox, in order: those already received,
        else what one ``recv()`` brings within ``wait`` seconds (maybe none). Raises
        :class:`WireError` when the connection is lost."""
        if self._held:
            held, self._held = self._held, []
            return held + self._pump(0.0)
        return self._pump(wait)

    def _pump(self, wait: float) -> list[Frame]:
        """Handle what the buffer holds; receive once (up to ``wait`` s) if it held no whole
        frame or operation; return the message frames (the inbox's are filed as replies)."""
        out: list[Frame] = []
        progressed = self._process(out)
        if not progressed:
            self._recv(wait)
            self._process(out)
        return out

    def _process(self, out: list[Frame]) -> bool:
        progressed = False
        while True:
            buf, pos = self._buf, self._pos
            if pos >= len(buf):
                break
            frames, nxt = self.scan(buf, pos)
            if frames or nxt > pos:  # what it took is done with, whatever it yielded
                progressed = True
                replies = self._replies
                if replies:
                    for frame in frames:
                        if frame[0] in replies:
                            replies[frame[0]] = frame
                        else:
                            out.append(frame)
                else:
                    out.extend(frames)
                # Keep the buffer's tail only.
                self._pos = nxt
                continue
            eol = buf.find(_CRLF, pos)
            if eol < 0:
                if len(buf) - pos > _LINE_MAX and not buf.startswith((b"MSG ", b"HMSG "), pos):
                    raise self._lost("a line too long from the server")
                break
            op = buf[pos:eol]
            if op.startswith((b"MSG ", b"HMSG ")):
                if _whole(op, len(buf) - eol - 2):  # yet the scan did not take it
                    raise self._lost(f"a malformed frame {op[:80]!r}")
                break  # the rest of it is still to come
            self._pos = eol + 2
            progressed = True
            self._op(op)
        if self._pos > 0 and self._pos >= len(self._buf) // 2:
            self._buf, self._pos = self._buf[self._pos:], 0
        return progressed

    def _op(self, op: bytes) -> None:
        if op == b"PING":
            self._send(b"PONG\r\n")
        elif op == b"PONG":
            self._pongs += 1
        elif op.startswith(b"INFO "):
            with contextlib.suppress(ValueError):
                self.info.update(json.loads(op[5:]))
        elif op == b"+OK":
            pass
        elif op.startswith(b"-ERR"):
            text = op[4:].strip().strip(b"'").decode(errors="replace")
            if "permissions violation" in text.lower():
                raise WireError(f"NATS at {self.location} refused: {text}")
            raise self._lost(f"the server said: {text}")
        else:
            raise self._lost(f"an unknown operation {op[:60]!r}")

    def _lost(self, why: str) -> WireError:
        self.close()
        return WireError(f"lost the connection to NATS at {self.location}: {why}")

    def _recv(self, wait: float) -> None:
        sock = self._sock
        if sock is None:
            raise WireError(f"not connected to NATS at {self.location}")
        try:
            sock.settimeout(wait if wait > 0 else 0.0)
            data = sock.recv(RECV_BYTES)
        except (TimeoutError, BlockingIOError, ssl.SSLWantReadError):
            return
        except OSError as exc:
            raise self._lost(_describe(exc)) from None
        if not data:
            raise self._lost("the server closed it")
        if self._pos >= len(self._buf):
            self._buf, self._pos = data, 0
        else:
            self._buf = self._buf[self._pos:] + data
            self._pos = 0

    def _line(self) -> bytes:
        """One line while connecting (before any frame)."""
        deadline = time.monotonic() + self.timeout
        while True:
            eol = self._buf.find(_CRLF, self._pos)
            if eol >= 0:
                line = self._buf[self._pos:eol]
                self._pos = eol + 2
                return line
            left = deadline - time.monotonic()
            if left <= 0:
                raise WireError("no INFO from the server in time")
            self._recv(left)


@dataclass(frozen=True, slots=True)
class Run:
    """Messages delivered at consecutive stream sequences, from ``first`` on; ``pending``: the
    messages the stream held beyond the last one when it was sent."""

    first: int
    payloads: list[bytes]
    pending: int


def ack_fields(reply: bytes) -> tuple[int, int, int]:
    """(stream sequence, consumer sequence, messages pending) from a JetStream delivery's reply
    subject: ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>``,
    or with a domain and an account hash after ``$JS.ACK`` (12 tokens or more)."""
    tokens = reply.split(b".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[6]), int(tokens[8])
    return int(tokens[7]), int(tokens[8]), int(tokens[10])


_SID: Final = operator.itemgetter(0)
_REPLY: Final = operator.itemgetter(1)
_PAYLOAD: Final = operator.itemgetter(3)
_LINE_ACK: Final = b"\n" + _ACK_PREFIX


def _all_deliveries(frames: list[Frame], sid: bytes | None) -> bool:
    """Whether every frame is a delivery (a ``$JS.ACK…`` reply) on subscription ``sid``, in
    C-level passes: a reply holds no whitespace, so each "\n$JS.ACK." of the replies joined by
    "\n" starts one."""
    n = len(frames)
    if list(map(_SID, frames)).count(sid) != n:
        return False
    replies = list(map(_REPLY, frames))
    if None in replies:
        return False
    return (b"\n" + b"\n".join(replies)).count(_LINE_ACK) == n


def _header(block: bytes, name: bytes) -> bytes | None:
    """A header's value in a status frame's header block (names compared without case)."""
    for line in block.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name:
            return value.strip()
    return None


class OrderedConsumer:
    """An ordered push consumer on ``stream`` from stream sequence ``start``, on ``conn``
    (see the module's docstring): :meth:`take` returns what was delivered, in runs.

    Args:
        conn: a connected :class:`WireConnection` (the consumer reconnects it when lost).
        stream: the stream's name.
        start: the first stream sequence wanted.
        heartbeat: the consumer's idle heartbeat (seconds); two missed recreate it.
        reconnect: after a lost connection, keep trying on each :meth:`take` (a follower);
            ``False`` tries twice, then raises :class:`WireError` (a command).
        inactive: seconds without interest after which the server removes the consumer.
    """

    def __init__(self, conn: WireConnection, stream: str, start: int, *, heartbeat: float = 1.0,
                 reconnect: bool = False, inactive: float = 60.0) -> None:
        self.conn = conn
        self.stream = stream
        #: The stream sequence of the next message wanted (after the last one handed over).
        self.next_seq = max(start, 1)
        self.heartbeat = heartbeat
        self.reconnect = reconnect
        self.inactive = inactive
        self.name: str | None = None
        self.sid: bytes | None = None
        #: The consumer sequence of the last message received from the current consumer.
        self.cseq = 0
        self._seen = time.monotonic()
        self._retry_at = 0.0
        #: Why the consumer last had to start again or wait (for logs and tests).
        self.last_error = ""
        #: How often a consumer was created again (a gap, missed heartbeats, a lost
        #: connection), for tests and logs.
        self.restarts = 0

    # -- the consumer ------------------------------------------------------------------------

    def _create(self) -> None:
        conn = self.conn
        self._drop()
        deliver = new_inbox()
        sid = conn.subscribe(deliver)
        config = {
            "deliver_subject": deliver.decode(),
            "deliver_policy": "by_start_sequence",
            "opt_start_seq": self.next_seq,
            "ack_policy": "none",
            "max_deliver": 1,
            "replay_policy": "instant",
            "flow_control": True,
            "idle_heartbeat": int(self.heartbeat * _NANOS),
            "mem_storage": True,
            "num_replicas": 1,
            "inactive_threshold": int(self.inactive * _NANOS),
        }
        body = json.dumps({"stream_name": self.stream, "config": config}).encode()
        try:
            data = conn.request(f"$JS.API.CONSUMER.CREATE.{self.stream}", body)
        except WireError:
            if conn.connected:
                with contextlib.suppress(OSError):
                    conn.unsubscribe(sid)
            raise
        try:
            answer = json.loads(data)
        except ValueError:
            answer = {"error": {"description": f"an unreadable reply {data[:80]!r}"}}
        error = answer.get("error") if isinstance(answer, dict) else {"description": repr(answer)}
        if error:
            conn.unsubscribe(sid)
            code = error.get("err_code") if isinstance(error, dict) else None
            text = error.get("description", error) if isinstance(error, dict) else error
            raise ApiError(f"NATS at {conn.location} did not create a consumer on stream "
                           f"{self.stream}: {text}", code if isinstance(code, int) else None)
        self.sid, self.name, self.cseq = sid, str(answer.get("name")), 0
        self._seen = time.monotonic()

    def _drop(self) -> None:
        sid, self.sid = self.sid, None
        if sid is not None and self.conn.connected:
            self.conn.unsubscribe(sid)  # the server removes the consumer when interest goes

    def _restart(self) -> None:
        self.restarts += 1
        self._drop()

    def close(self) -> None:
        """Stop the consumer (the connection stays open)."""
        with contextlib.suppress(WireError):
            self._drop()

    # -- taking ------------------------------------------------------------------------------

    def take(self, wait: float) -> list[Run]:
        """What was delivered since the last call (waiting up to ``wait`` seconds for the
        first of it), in runs of consecutive stream sequences; each flow-control request met
        on the way is answered, the messages before it being handed over."""
        deadline = time.monotonic() + wait
        while True:
            runs = self._take_once(wait)
            wait = deadline - time.monotonic()
            if runs or wait <= 0:
                return runs

    def _take_once(self, wait: float) -> list[Run]:
        try:
            if self.sid is None:
                if not self._connected():
                    time.sleep(max(0.0, min(wait, self._retry_at - time.monotonic())))
                    return []
                self._create()
            frames = self.conn.frames(wait)
        except ApiError as exc:
            if not self.reconnect:
                raise
            # A server still starting (its stream not yet recovered…): try again soon.
            self.last_error = str(exc)
            self.sid, self._retry_at = None, time.monotonic() + 1.0
            return []
        except WireError as exc:
            self.last_error = str(exc)
            self.sid = None
            if self.reconnect:
                self._retry_at = time.monotonic() + 0.5
                return []
            raise
        return self._runs(frames)

    def _connected(self) -> bool:
        """Whether the connection is up, reconnecting it if not (see ``reconnect``)."""
        conn = self.conn
        if conn.connected:
            return True
        if self.reconnect:
            if time.monotonic() < self._retry_at:
                return False
            try:
                conn.connect()
            except WireUnsupported:
                raise
            except WireError:
                self._retry_at = time.monotonic() + 0.5
                return False
            self.restarts += 1
            return True
        for attempt in range(2):
            try:
                conn.connect()
                self.restarts += 1
                return True
            except WireUnsupported:
                raise
            except WireError:
                if attempt == 1:
                    raise
                time.sleep(0.5)  # nats-py's reconnect_time_wait
        return False  # pragma: no cover - the loop returns or raises

    def _runs(self, frames: list[Frame]) -> list[Run]:
        runs: list[Run] = []
        sid = self.sid
        if frames and _all_deliveries(frames, sid):
            # The usual case, checked without a Python step a frame: every frame is one of
            # this consumer's deliveries (no heartbeat, no flow-control request).
            self._seen = time.monotonic()
            self._deliveries(frames, runs)
            return runs
        block: list[Frame] = []
        ours = False
        for frame in frames:
            if frame[0] != sid:
                continue  # a consumer given up on
            ours = True
            reply = frame[1]
            if reply is not None and reply.startswith(_ACK_PREFIX):
                block.append(frame)
                continue
            if block:
                if not self._deliveries(block, runs):
                    return runs
                block = []
            if not self._status(frame):
                return runs
        if block:
            self._deliveries(block, runs)
        now = time.monotonic()
        if ours:
            self._seen = now
        elif self.sid is not None and now - self._seen > 2 * self.heartbeat:
            self._restart()  # two heartbeats missed: a restarted server, a deleted consumer
        return runs

    def _deliveries(self, block: list[Frame], runs: list[Run]) -> bool:
        """File ``block``'s messages as runs; False (the consumer restarted) at a gap in the
        consumer's sequence."""
        n = len(block)
        s0, c0, _ = ack_fields(block[0][1])  # type: ignore[arg-type]
        s1, c1, pending = ack_fields(block[-1][1]) if n > 1 else (s0, c0, _)  # type: ignore[arg-type]
        if (c0 == self.cseq + 1 and c1 - c0 == n - 1 and s1 - s0 == n - 1
                and s0 >= self.next_seq):
            # Every consumer and stream sequence in between is the next one: one run.
            runs.append(Run(s0, list(map(_PAYLOAD, block)), pending))
            self.cseq, self.next_seq = c1, s1 + 1
            return True
        payloads: list[bytes] = []
        first = last_pending = 0
        for frame in block:
            seq, cseq, pending = ack_fields(frame[1])  # type: ignore[arg-type]
            if cseq != self.cseq + 1:
                if payloads:
                    runs.append(Run(first, payloads, last_pending))
                self._restart()  # a delivery lost on the way: again from the last taken
                return False
            self.cseq = cseq
            if seq < self.next_seq:
                continue  # pragma: no cover - a fresh consumer starts at next_seq
            if not payloads or seq != first + len(payloads):
                if payloads:
                    runs.append(Run(first, payloads, last_pending))
                payloads, first = [], seq
            payloads.append(frame[3])
            self.next_seq = seq + 1
            last_pending = pending
        if payloads:
            runs.append(Run(first, payloads, last_pending))
        return True

    def _status(self, frame: Frame) -> bool:
        """Act on a status frame (flow control, heartbeat…); False if the consumer
        restarted."""
        headers = frame[2] or b""
        if not headers.startswith(_STATUS_HDR):
            return True  # not a status: nothing a consumer sends
        code = headers[9:12]
        if code == b"100":
            if frame[1] is not None:  # a flow-control request: everything before it is taken
                self.conn.publish(frame[1])
                return True
            stalled = _header(headers, b"nats-consumer-stalled")
            if stalled:
                self.conn.publish(stalled)
            last = _header(headers, b"nats-last-consumer")
            if last is not None and last.isdigit() and int(last) != self.cseq:
                self._restart()  # the server sent more than arrived
                return False
            return True
        if code in (b"409", b"404", b"408"):  # e.g. "409 Consumer Deleted"
            self._restart()
            return False
        return True


def _whole(op: bytes, after: int) -> bool:
    """Whether a ``MSG``/``HMSG`` line's frame would fit in the ``after`` bytes that follow it
    (or the line is malformed, so that no more bytes would make it a frame)."""
    parts = op.split()
    if len(parts) not in ((4, 5) if parts[0] == b"MSG" else (5, 6)) or not parts[-1].isdigit():
        return True
    return int(parts[-1]) + 2 <= after


def new_inbox() -> bytes:
    """A subject nobody else listens on."""
    return b"_INBOX." + secrets.token_hex(11).encode()


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no server"
    if isinstance(exc, WireError):
        return str(exc)
    text = str(exc).strip()
    name = type(exc).__name__
    return f"{name}: {text}" if text and text != name else name




__all__ = ["ApiError", "Frame", "OrderedConsumer", "WireConnection", "WireError",
           "WireUnsupported", "address", "scan_frames_py"]
