"""Fuzz targets for the log's inputs (issue 16, item 4): what a disk, a bad copy or a hostile
user can put in front of the reader.

Each target runs a short campaign in ``make test`` and a long one under ``-m slow``:

* event decoding: arbitrary bytes, and valid records with bytes flipped, cut or appended,
  decode to an event or raise :class:`~telemetry.codec.MalformedRecord` — nothing else;
* the log's metadata (``wantel-log.json``): arbitrary bytes and arbitrary JSON give a valid
  ``segment_bytes`` or a one-line :class:`~telemetry.log.base.BrokenLog`;
* the ``positions`` file: arbitrary bytes never stop a writer, and never let it go back;
* segment bytes: valid frames with damage (flips, cuts, junk, whole random segments) read
  without an exception, every record once at most, with notices where anything was lost; a
  writer then appends and its batch reads back.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from telemetry.codec import MalformedRecord, decode_current_batch, decode_one, encode, encode_json
from telemetry.events import Event, StageStarted
from telemetry.log import Batch, LocalLog, Quarantined
from telemetry.log.base import BrokenLog
from telemetry.log.local import (
    MAX_SEGMENT_BYTES,
    MIN_SEGMENT_BYTES,
    POSITIONS_FILE,
    _parse_marks,
    segment_name,
    validate_meta,
)

from .strategies import any_event

QUICK = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LONG = settings(max_examples=5000, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def campaigns(target: Callable[..., None], **strategies: st.SearchStrategy[Any]
              ) -> tuple[Callable[..., None], Callable[..., None]]:
    """A quick test and a slow one (``-m slow``) running ``target`` on ``strategies``."""
    quick = QUICK(given(**strategies)(target))
    long = pytest.mark.slow(LONG(given(**strategies)(target)))
    return quick, long


@st.composite
def damage(draw: st.DrawFn) -> Callable[[bytes], bytes]:
    """A way to damage bytes: flip some, cut the end, cut the start, insert junk."""
    kind = draw(st.sampled_from(["flips", "cut", "behead", "insert"]))
    if kind == "flips":
        picks = draw(st.lists(st.tuples(st.integers(0, 2**20), st.integers(1, 255)),
                              min_size=1, max_size=8))

        def flip(raw: bytes) -> bytes:
            out = bytearray(raw)
            for where, mask in picks:
                if out:
                    out[where % len(out)] ^= mask
            return bytes(out)
        return flip
    where = draw(st.integers(0, 2**20))
    if kind == "cut":
        return lambda raw: raw[: where % (len(raw) + 1)]
    if kind == "behead":
        return lambda raw: raw[where % (len(raw) + 1):]
    junk = draw(st.binary(min_size=1, max_size=64))
    return lambda raw: raw[: where % (len(raw) + 1)] + junk + raw[where % (len(raw) + 1):]


# -- event decoding ----------------------------------------------------------------------------

def _decodes_or_is_malformed(raw: bytes) -> None:
    try:
        event = decode_one(raw)
    except MalformedRecord:
        return
    assert isinstance(event, Event)


def fuzz_decode_arbitrary_bytes(raw: bytes) -> None:
    """Any bytes decode to an event or raise MalformedRecord."""
    _decodes_or_is_malformed(raw)
    try:
        events = decode_current_batch(raw)
    except MalformedRecord:
        return
    assert all(isinstance(event, Event) for event in events)


test_decode_arbitrary_bytes, test_decode_arbitrary_bytes_long = campaigns(
    fuzz_decode_arbitrary_bytes, raw=st.binary(max_size=2048))


def fuzz_decode_damaged_records(event: Event, as_json: bool,
                                hurt: Callable[[bytes], bytes]) -> None:
    """A real record, damaged, decodes to an event or raises MalformedRecord."""
    try:
        raw = encode_json(event) if as_json else encode(event)
    except OverflowError:
        raw = encode_json(event)
    _decodes_or_is_malformed(hurt(raw))


test_decode_damaged_records, test_decode_damaged_records_long = campaigns(
    fuzz_decode_damaged_records, event=any_event, as_json=st.booleans(), hurt=damage())


# -- the metadata file ---------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=12)


def meta_documents() -> st.SearchStrategy[bytes]:
    """Metadata as a hostile user might write it: arbitrary bytes, arbitrary JSON, and the
    real document with each field replaced by arbitrary JSON."""
    real = st.fixed_dictionaries({
        "format": st.one_of(st.just("wantel-log"), JSON),
        "version": st.one_of(st.just(1), JSON),
        "segment_bytes": st.one_of(st.integers(), JSON),
    }, optional={"extra": JSON})
    return st.one_of(st.binary(max_size=512),
                     JSON.map(lambda doc: json.dumps(doc).encode()),
                     real.map(lambda doc: json.dumps(doc).encode()))


def fuzz_metadata(text: bytes) -> None:
    """Valid segment_bytes, or BrokenLog with one line naming the file."""
    try:
        segment_bytes = validate_meta(text, "somewhere/wantel-log.json")
    except BrokenLog as exc:
        message = str(exc)
        assert message.startswith("somewhere/wantel-log.json: ") and "\n" not in message
        return
    assert MIN_SEGMENT_BYTES <= segment_bytes <= MAX_SEGMENT_BYTES


test_metadata, test_metadata_long = campaigns(fuzz_metadata, text=meta_documents())


# -- logs on disk ---------------------------------------------------------------------------

def scratch_log() -> Path:
    """A fresh log directory (hypothesis runs many examples in one test: no tmp_path)."""
    return Path(tempfile.mkdtemp(prefix="wantel-fuzz-")) / "log"


def job_events(job: str, count: int) -> list[Event]:
    """``count`` small events of one job."""
    return [StageStarted(job=job, seq=seq, ts=seq + 1, stage="load") for seq in range(count)]


def fuzz_positions_file(raw: bytes) -> None:
    """Whatever ``positions`` holds, a writer appends, past what the log holds."""
    log_dir = scratch_log()
    try:
        with LocalLog(log_dir) as log:
            log.append(job_events("job-a", 3))
        (log_dir / POSITIONS_FILE).write_bytes(raw)
        marks = _parse_marks(raw)
        with LocalLog(log_dir) as log:
            positions = log.append(job_events("job-b", 2))
        assert positions.start >= 3
        if marks is not None:
            assert positions.start >= marks.end
        with LocalLog(log_dir, create=False) as log:
            items = list(log.read())
        read = [e for item in items if isinstance(item, Batch) for e in item.events]
        assert job_events("job-a", 3) + job_events("job-b", 2) == read
    finally:
        shutil.rmtree(log_dir.parent)


test_positions_file, test_positions_file_long = campaigns(
    fuzz_positions_file, raw=st.one_of(st.binary(max_size=80), st.binary(min_size=64, max_size=64)))


def fuzz_segment_bytes(sizes: list[int], hurt: Callable[[bytes], bytes] | None,
                       junk: bytes | None) -> None:
    """A damaged (or wholly random) segment reads without exception, each record at most
    once, every loss noticed; then a writer appends and its batch reads back."""
    log_dir = scratch_log()
    try:
        written: list[Event] = []
        with LocalLog(log_dir) as log:
            for number, size in enumerate(sizes):
                batch = job_events(f"job-{number}", size)
                log.append(batch)
                written.extend(batch)
        segment = log_dir / segment_name(0)
        raw = segment.read_bytes()
        segment.write_bytes(junk if junk is not None else hurt(raw) if hurt else raw)

        with LocalLog(log_dir, create=False) as log:
            items = list(log.read())
        seen: dict[int, Event] = {}
        for item in items:
            if isinstance(item, Batch):
                for position, event in item.positioned():
                    assert position not in seen, f"position {position} read twice"
                    seen[position] = event
        keys = [(event.job, event.seq) for event in seen.values()]
        assert len(keys) == len(set(keys)), "a record read twice"
        for position, event in seen.items():
            if position < len(written) and event == written[position]:
                continue
            # Bytes a flip turned into another valid record are possible only in theory (each
            # record has its own CRC-32 and so does its frame); anything else is a bug.
            pytest.fail(f"position {position} holds {event!r}, never written there")
        lost = len(written) - len(seen)
        if lost and junk is None:
            assert any(isinstance(item, Quarantined) for item in items), (
                f"{lost} record(s) lost without a notice")

        after = job_events("job-after", 2)
        with LocalLog(log_dir) as log:
            positions = log.append(after)
            assert positions.start >= len(written) or junk is not None
            back = [e for item in log.read(positions.start) if isinstance(item, Batch)
                    for position, e in item.positioned() if position in positions]
        assert after == back
    finally:
        shutil.rmtree(log_dir.parent)


test_segment_bytes, test_segment_bytes_long = campaigns(
    fuzz_segment_bytes, sizes=st.lists(st.integers(1, 12), min_size=1, max_size=8),
    hurt=st.one_of(st.none(), damage()),
    junk=st.one_of(st.none(), st.none(), st.binary(max_size=600)))
