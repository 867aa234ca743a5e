"""The reader's run check: the C accelerator takes exactly the frames the Python reference takes.

Buffers of real frames — several schemas, both layouts, positions with gaps, bytes flipped,
cut short, garbage between — are scanned by both from random offsets with random limits; the
runs they find must be equal (payload bytes, record count, end offset). The reader's own tests
(``test_log_local``) then cover what a run is used for.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telemetry import accelerate
from telemetry.log import framing
from telemetry.log.framing import JSON_ARRAY, MSGPACK_ARRAY, encode_body, encode_header
from telemetry.log.local import LocalLog

from .accelerators import assert_built_where_required, both
from .test_engine import a_job

try:
    from telemetry.log._framing import scan_run as compiled_scan_run
except ImportError:  # pragma: no cover - where the accelerator was not built
    compiled_scan_run = None

Scan = Callable[..., Any]
SCHEMA = 0x1234
SCANS = both(framing.scan_run_py, compiled_scan_run, "telemetry.log._framing")


def test_the_accelerator_is_built_where_the_suite_requires_it(tmp_path: Path) -> None:
    assert_built_where_required(compiled_scan_run, "telemetry.log._framing")
    assert "C" == LocalLog(tmp_path).frame_checks
    from telemetry.log import _framing
    assert _framing.CRC32 == "zlib-ng", "zlib_ng's crc32 was not found: zlib's is ~10x slower"


class TestTheLogChooses:
    def test_the_c_version_where_it_was_built(self, tmp_path: Path) -> None:
        """By default a log's readers run the C check, or the reference where C was not built."""
        log = LocalLog(tmp_path)
        if compiled_scan_run is None:
            assert ("Python (C not built)", framing.scan_run_py) == (log.frame_checks,
                                                                     log.scan_run)
        else:
            assert ("C", compiled_scan_run) == (log.frame_checks, log.scan_run)

    def test_the_reference_when_built_with_compiled_false(self, tmp_path: Path) -> None:
        """``compiled=False`` picks the Python reference, and reads the same events."""
        with LocalLog(tmp_path) as log:
            for job in ("job-a", "job-b", "job-c"):  # a frame each: read as one run
                log.append(a_job(job))
        python = LocalLog(tmp_path, compiled=False)
        assert ("Python (compiled=False)", framing.scan_run_py) == (python.frame_checks,
                                                                    python.scan_run)
        assert list(LocalLog(tmp_path).read()) == list(python.read())

    def test_the_process_default_the_application_set(self, tmp_path: Path) -> None:
        """A log built after ``configure(compiled=False)`` reads with Python; one built before
        keeps its choice."""
        before = LocalLog(tmp_path)
        accelerate.configure(compiled=False, reason="$WANTEL_PURE_PYTHON")
        after = LocalLog(tmp_path)
        assert ("Python ($WANTEL_PURE_PYTHON)", framing.scan_run_py) == (after.frame_checks,
                                                                         after.scan_run)
        assert before.scan_run is LocalLog(tmp_path, compiled=True).scan_run


def frame(records: list[bytes], first: int, schema: int = SCHEMA,
          layout: int = MSGPACK_ARRAY) -> bytes:
    body = encode_body(records, layout)
    return encode_header(body, len(records), first, schema, layout) + body


@st.composite
def buffers(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, int]]]:
    """Frames back to back (with the odd gap in positions, foreign frame or garbage), then
    damage; returns the buffer and where each frame began: (offset, position)."""
    parts: list[bytes] = []
    starts: list[tuple[int, int]] = []
    position = draw(st.integers(0, 5))
    for _ in range(draw(st.integers(0, 12))):
        records = draw(st.lists(st.binary(max_size=24), min_size=1, max_size=6))
        schema = draw(st.sampled_from([SCHEMA, SCHEMA, SCHEMA, SCHEMA + 1]))
        layout = draw(st.sampled_from([MSGPACK_ARRAY] * 5 + [JSON_ARRAY]))
        if draw(st.integers(0, 9)) == 0:
            position += draw(st.integers(1, 3))  # a gap: a run must stop before it
        if draw(st.integers(0, 14)) == 0:
            parts.append(draw(st.binary(min_size=1, max_size=40)))
        starts.append((sum(map(len, parts)), position))
        parts.append(frame(records, position, schema, layout))
        position += len(records)
    buf = bytearray(b"".join(parts))
    for _ in range(draw(st.integers(0, 2))):
        if buf:
            at = draw(st.integers(0, len(buf) - 1))
            buf[at] ^= 1 << draw(st.integers(0, 7))
    cut = draw(st.integers(0, len(buf)))
    if draw(st.booleans()):
        del buf[cut:]
    return bytes(buf), starts


def _scan(scan: Scan, buf: bytes, *args: int) -> tuple[bytes, int, int] | None:
    """The run ``scan`` finds (``args``: offset, first, schema, limit), its payload as bytes."""
    run = scan(buf, *args)
    if run is None:
        return None
    payload, count, end = run
    return bytes(payload), count, end


@pytest.mark.skipif(compiled_scan_run is None, reason="telemetry.log._framing was not built")
@settings(max_examples=500, deadline=None)
@given(data=buffers(), pick=st.data())
def test_c_takes_the_same_runs_as_the_reference(
    data: tuple[bytes, list[tuple[int, int]]], pick: st.DataObject
) -> None:
    buf, starts = data
    # Mostly where a frame starts, expecting its position (a run to find), else anywhere.
    offset, first = pick.draw(st.one_of(
        st.sampled_from(starts or [(0, 0)]), st.sampled_from(starts or [(0, 0)]),
        st.tuples(st.integers(0, len(buf) + 2), st.integers(0, 12))))
    schema = pick.draw(st.sampled_from([SCHEMA, SCHEMA, SCHEMA + 1, 0x1FFFF]))
    limit = pick.draw(st.integers(0, 20))
    expected = _scan(framing.scan_run_py, buf, offset, first, schema, limit)
    assert _scan(compiled_scan_run, buf, offset, first, schema, limit) == expected


@pytest.mark.parametrize("scan", SCANS)
def test_a_run_joins_frames_until_one_does_not_follow(scan: Scan) -> None:
    frames = [frame([b"\x01", b"\x02"], 0), frame([b"\x03"], 2), frame([b"\x04"], 4)]
    buf = b"".join(frames)
    payload, count, end = scan(buf, 0, 0, SCHEMA, 100)
    # one array of the first two frames' records; the third starts at 4, not 3
    assert (bytes(payload), count, end) == (b"\xdd\x00\x00\x00\x03\x01\x02\x03", 3,
                                            len(frames[0]) + len(frames[1]))
    assert scan(buf, 0, 1, SCHEMA, 100) is None  # not the position expected
    assert scan(buf, 0, 0, SCHEMA + 1, 100) is None  # another writer's schema
    lone = scan(buf, 0, 0, SCHEMA, 1)  # the first frame is taken whatever the limit
    assert lone is not None and (bytes(lone[0]), lone[1]) == (b"\xdd\x00\x00\x00\x02\x01\x02", 2)
    assert scan(buf[:-1], len(frames[0]) + len(frames[1]), 3, SCHEMA, 9) is None  # cut short


@pytest.mark.parametrize("scan", SCANS)
def test_a_frame_too_short_for_its_records_is_not_taken(scan: Scan) -> None:
    """Checksums intact, but the body cannot hold the table and array header it promises."""
    body = encode_body([b"\x01"])[:-2]  # table, then a cut array header
    assert scan(encode_header(body, 1, 0, SCHEMA) + body, 0, 0, SCHEMA, 9) is None


@pytest.mark.skipif(compiled_scan_run is None, reason="telemetry.log._framing was not built")
def test_a_large_lone_frame_is_not_copied() -> None:
    assert compiled_scan_run is not None
    buf = frame([bytes(100)] * 100, 0)
    run = compiled_scan_run(buf, 0, 0, SCHEMA, 1024)
    assert run is not None and isinstance(run[0], memoryview) and run[0].obj is buf


@pytest.mark.skipif(compiled_scan_run is None, reason="telemetry.log._framing was not built")
def test_the_c_version_rejects_bad_arguments() -> None:
    assert compiled_scan_run is not None
    with pytest.raises(TypeError):
        compiled_scan_run("text", 0, 0, SCHEMA, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="offset"):
        compiled_scan_run(b"", -1, 0, SCHEMA, 1)
    with pytest.raises(TypeError, match="takes 5 arguments"):
        compiled_scan_run(b"", 0, 0, SCHEMA)  # type: ignore[call-arg]
