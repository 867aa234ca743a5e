"""The lean NATS reader's frame scan: the C accelerator cuts exactly the frames the Python
reference cuts.

Buffers of frames as nats-server writes them — deliveries with a ``$JS.ACK`` reply and a
``Nats-Msg-Id`` header, heartbeats and flow-control requests, plain ``MSG``s, ``PING`` and
``INFO`` between them — are scanned by both, cut at every byte, from random offsets, with bytes
flipped and garbage between; and so are the buffers a real read of a real server received. The
results must be equal (frames, next offset), and the reference must give back what was framed.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telemetry import accelerate
from telemetry.log import nats_wire
from telemetry.log.nats_wire import scan_frames_py

from .accelerators import assert_built_where_required, both

try:
    from telemetry.log._natswire import scan_frames as compiled_scan
except ImportError:  # pragma: no cover - where the accelerator was not built
    compiled_scan = None

Scan = Callable[[bytes, int], Any]
SCANS = both(scan_frames_py, compiled_scan, "telemetry.log._natswire")
needs_c = pytest.mark.skipif(compiled_scan is None, reason="telemetry.log._natswire was not built")


def delivery(seq: int, payload: bytes, sid: bytes = b"7") -> bytes:
    """A JetStream delivery as the server writes it."""
    reply = b"$JS.ACK.WANTEL_EVENTS.c1.1.%d.%d.1700000000000000000.%d" % (seq, seq, 99 - seq)
    headers = b"NATS/1.0\r\nNats-Msg-Id: job-%d:%d\r\n\r\n" % (seq % 3, seq)
    return b"HMSG _INBOX.x %s %s %d %d\r\n%s%s\r\n" % (sid, reply, len(headers),
                                                      len(headers) + len(payload), headers,
                                                      payload)


def status(code: bytes, reply: bytes | None = None) -> bytes:
    headers = b"NATS/1.0 %s Idle Heartbeat\r\nNats-Last-Consumer: 4\r\n\r\n" % code
    head = b"HMSG _INBOX.x 7 %s%d %d\r\n" % (reply + b" " if reply else b"", len(headers),
                                            len(headers))
    return head + headers + b"\r\n"


def msg(payload: bytes, reply: bytes | None = None, sid: bytes = b"2") -> bytes:
    middle = reply + b" " if reply else b""
    return b"MSG _INBOX.r %s %s%d\r\n%s\r\n" % (sid, middle, len(payload), payload)


SAMPLE = b"".join([
    delivery(1, b"\x85\xa4type\xa9JobQueued"),
    delivery(2, b""),
    b"PING\r\n",
    delivery(3, b"has \r\n inside\r\nHMSG fake 1 2 3\r\n"),
    status(b"100"),
    status(b"100", b"$JS.FC.WANTEL_EVENTS.c1.abc"),
    msg(b'{"type":"io.nats.jetstream.api.v1.consumer_create_response"}'),
    msg(b"x", b"reply.to"),
    b'INFO {"server_id":"N"}\r\n',
    delivery(4, bytes(range(256))),
])


@pytest.mark.parametrize("scan", SCANS)
def test_a_buffer_of_frames(scan: Scan) -> None:
    """Frames up to the first other operation, each (sid, reply, headers, payload), and the
    offset of that operation; scanning on from after it takes the rest."""
    frames, pos = scan(SAMPLE, 0)
    assert [b"7", b"7"] == [f[0] for f in frames]
    assert b"$JS.ACK.WANTEL_EVENTS.c1.1.1.1.1700000000000000000.98" == frames[0][1]
    assert b"NATS/1.0\r\nNats-Msg-Id: job-1:1\r\n\r\n" == frames[0][2]
    assert frames[0][3] == b"\x85\xa4type\xa9JobQueued"
    assert frames[1][3] == b""
    assert SAMPLE[pos:].startswith(b"PING\r\n")
    frames, pos = scan(SAMPLE, pos + 6)
    assert b"has \r\n inside\r\nHMSG fake 1 2 3\r\n" == frames[0][3]
    assert (b"7", None) == frames[1][:2] and frames[1][2].startswith(b"NATS/1.0 100")
    assert b"$JS.FC.WANTEL_EVENTS.c1.abc" == frames[2][1]
    assert (b"2", None, None) == frames[3][:3]
    assert (b"2", b"reply.to", None, b"x") == frames[4]
    assert SAMPLE[pos:].startswith(b"INFO ")
    frames, pos = scan(SAMPLE, SAMPLE.index(b"\r\n", pos) + 2)
    assert [bytes(range(256))] == [f[3] for f in frames]
    assert len(SAMPLE) == pos


@pytest.mark.parametrize("scan", SCANS)
def test_bad_offsets_and_types(scan: Scan) -> None:
    """An offset outside the buffer is a ValueError, as in the reference."""
    with pytest.raises(ValueError, match="outside"):
        scan(b"abc", 4)
    with pytest.raises(ValueError, match="outside"):
        scan(b"abc", -1)
    assert ([], 3) == scan(b"abc", 3)


@needs_c
def test_cut_at_every_byte() -> None:
    """Every prefix of the sample, scanned from every frame boundary and from random offsets,
    gives the same result in C and Python; a cut frame is left for the next scan."""
    starts = {0}
    pos = 0
    while pos < len(SAMPLE):
        _frames, nxt = scan_frames_py(SAMPLE, pos)
        if nxt == pos:
            nxt = SAMPLE.index(b"\r\n", pos) + 2
        starts.add(nxt)
        pos = nxt
    rng = random.Random(17)
    starts |= {rng.randrange(len(SAMPLE)) for _ in range(20)}
    for cut in range(len(SAMPLE) + 1):
        prefix = SAMPLE[:cut]
        for start in starts:
            if start <= cut:
                assert scan_frames_py(prefix, start) == compiled_scan(prefix, start), (cut, start)


@needs_c
@settings(max_examples=400, deadline=None)
@given(parts=st.lists(st.one_of(
    st.builds(delivery, st.integers(1, 10**6), st.binary(max_size=40),
              st.sampled_from([b"7", b"12", b"x"])),
    st.builds(status, st.sampled_from([b"100", b"409", b"503"]),
              st.one_of(st.none(), st.just(b"$JS.FC.S.c.1"))),
    st.builds(msg, st.binary(max_size=30), st.one_of(st.none(), st.just(b"r.1"))),
    st.sampled_from([b"PING\r\n", b"PONG\r\n", b"+OK\r\n", b"-ERR 'x'\r\n", b"HMSG a 1 b\r\n",
                     b"MSG a 1 -3\r\n", b"HMSG a 1 9 3\r\n", b"MSG a\t1  2\r\nxy\r\n",
                     b"HMSG a 1 0000000000000000000000002 00000000000000000000000000002\r\n"
                     b"xy\r\n", b"MSG a 1 99999999999999999999999\r\n", b"\r\n", b"MSG ",
                     b"HMSG a 1 r 2 1\r\n", b"MSG a 1 \xd9\xa0\r\n\r\n"]),
    st.binary(max_size=12)), max_size=12),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3),
    pick=st.data())
def test_random_buffers_agree(parts: list[bytes], flips: list[tuple[int, int]],
                              pick: st.DataObject) -> None:
    """Random frames, operations and garbage, some bytes flipped: C equals the reference from
    any offset, on the whole buffer and on a prefix."""
    buf = bytearray(b"".join(parts))
    for at, value in flips:
        if buf:
            buf[at % len(buf)] = value
    data = bytes(buf)
    start = pick.draw(st.integers(0, len(data)))
    cut = pick.draw(st.integers(start, len(data)))
    assert scan_frames_py(data, start) == compiled_scan(data, start)
    assert scan_frames_py(data[:cut], start) == compiled_scan(data[:cut], start)


@needs_c
def test_buffers_a_real_read_received(tmp_path: Path) -> None:
    """Every buffer the lean reader scanned while reading 20,000 events from a real
    nats-server scans alike in C and Python, and both reads give every event once, in order
    (their batches may be cut apart differently: that follows what each recv() brought)."""
    from telemetry.log.nats import NatsLog, NatsOptions
    from tests.nats_server import NatsServer

    from .log_contract import events_of, positions_of, steps

    seen: list[tuple[bytes, int]] = []

    def recording(buf: bytes, pos: int) -> Any:
        seen.append((buf, pos))
        return scan_frames_py(buf, pos)

    server = NatsServer(tmp_path / "store")
    server.start()
    try:
        log = NatsLog(NatsOptions(server.url), worker="w")
        try:
            log.append(steps("a", 0, 20_000))
            log.scan_frames = recording
            python = list(log.read())
            log.scan_frames = compiled_scan
            compiled = list(log.read())
            assert steps("a", 0, 20_000) == events_of(python) == events_of(compiled)
            assert list(range(20_000)) == positions_of(python) == positions_of(compiled)
        finally:
            log.close()
    finally:
        server.stop()
    assert len(seen) > 3
    for buf, pos in seen:
        assert scan_frames_py(buf, pos) == compiled_scan(buf, pos)


class TestTheLogChooses:
    def test_the_accelerator_is_built_where_the_suite_requires_it(self) -> None:
        assert_built_where_required(compiled_scan, "telemetry.log._natswire")

    def test_c_where_built_python_when_asked(self, nats_server: Any) -> None:
        """A log's lean reader scans in C where it was built, with the reference given
        ``compiled=False`` or after the process-wide default says Python."""
        from telemetry.log.nats import NatsLog, NatsOptions

        log = NatsLog(NatsOptions(nats_server.url))
        python = NatsLog(NatsOptions(nats_server.url), compiled=False)
        accelerate.configure(compiled=False, reason="$WANTEL_PURE_PYTHON")
        default = NatsLog(NatsOptions(nats_server.url))
        try:
            if compiled_scan is None:
                assert ("Python (C not built)", scan_frames_py) == (log.frame_scan,
                                                                    log.scan_frames)
            else:
                assert ("C", compiled_scan) == (log.frame_scan, log.scan_frames)
            assert ("Python (compiled=False)", scan_frames_py) == (python.frame_scan,
                                                                   python.scan_frames)
            assert ("Python ($WANTEL_PURE_PYTHON)", nats_wire.scan_frames_py) == (
                default.frame_scan, default.scan_frames)
        finally:
            for one in (log, python, default):
                one.close()


def test_a_scan_that_takes_a_frame_and_yields_none_moves_past_it() -> None:
    """A scan may take a frame and yield nothing (a filter, as the reader tests' lossy scan
    is, when the frame it drops arrived alone): the connection moves past it. It took the
    whole frame left in the buffer for one the scan could not cut, and raised "a malformed
    frame" (a fresh clone's suite failed on it once)."""
    frame = b"HMSG s 1 $JS.ACK.S.c.1.1.1.0.0 12 14\r\nNATS/1.0\r\n\r\nhi\r\n"
    assert scan_frames_py(frame, 0)[1] == len(frame)  # a whole frame, as the server sends it
    conn = nats_wire.WireConnection("nats://127.0.0.1:4222",
                                    scan=lambda buf, pos: ([], len(buf)))
    conn._buf = frame
    out: list[nats_wire.Frame] = []
    assert conn._process(out)
    assert [] == out
    assert (b"", 0) == (conn._buf, conn._pos)
