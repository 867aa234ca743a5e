"""The local backend: the log contract, plus persistence, rotation and damage handling."""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import NoReturn

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from telemetry.codec import encode, encode_json
from telemetry.events import JobQueued, StepEnded
from telemetry.log import framing, local
from telemetry.log.base import MAX_POSITION, Batch, BrokenLog, LogNotFound, Quarantined, ReadItem
from telemetry.log.local import LocalLog, segment_name

from .log_contract import LogContract, events_of, positions_of, steps
from .test_codec import STEP_ENDED_V1

LAYOUTS = [framing.MSGPACK_ARRAY, framing.JSON_ARRAY]
LAYOUT_IDS = ["msgpack", "json"]


class TestLocalLogContract(LogContract):
    def make_log(self, tmp_path: Path) -> LocalLog:
        """An empty log directory."""
        return LocalLog(tmp_path / "log")


def only_segment(path: Path) -> Path:
    """The single segment file of a small log."""
    (segment,) = sorted(path.glob("*.wlog"))
    return segment


class TestPersistence:
    def test_events_survive_reopening(self, tmp_path: Path) -> None:
        """A log reopened by another instance reads everything and continues the positions."""
        with LocalLog(tmp_path) as log:
            first = log.append(steps("a", 0, 4))
        with LocalLog(tmp_path) as log:
            second = log.append(steps("a", 4, 2))
            assert second.start == first.stop
            assert steps("a", 0, 6) == events_of(log.read())

    def test_reader_needs_an_existing_log(self, tmp_path: Path) -> None:
        """Opening a missing log for reading says so instead of creating one."""
        with pytest.raises(LogNotFound, match="does not exist"):
            LocalLog(tmp_path / "missing", create=False)
        with pytest.raises(LogNotFound, match="not a wantel log"):
            LocalLog(tmp_path, create=False)

    def test_bad_fsync_policy_is_refused(self, tmp_path: Path) -> None:
        """Only always, batch and never are policies."""
        with pytest.raises(ValueError, match="sometimes"):
            LocalLog(tmp_path, fsync="sometimes")

    @pytest.mark.parametrize("policy", ["always", "batch", "never"])
    def test_every_fsync_policy_stores_events(self, tmp_path: Path, policy: str) -> None:
        """Each policy appends and reads back the same events."""
        with LocalLog(tmp_path, fsync=policy) as log:
            log.append(steps("a", 0, 3))
            assert steps("a", 0, 3) == events_of(log.read())

    def test_unknown_files_are_ignored_with_a_warning(self, tmp_path: Path) -> None:
        """A stray file in the directory is reported once and otherwise ignored."""
        with LocalLog(tmp_path) as log:
            log.append(steps("a", 0, 2))
            (tmp_path / "notes.txt").write_text("hello")
            with capture_logs() as logs:
                assert steps("a", 0, 2) == events_of(log.read())
                assert steps("a", 0, 2) == events_of(log.read())
        warnings = [e for e in logs if e.get("file") == "notes.txt"]
        assert 1 == len(warnings)
        assert "warning" == warnings[0]["log_level"]


class TestRotation:
    def test_segments_rotate_by_size_and_read_as_one(self, tmp_path: Path) -> None:
        """Small segments roll over; reads cross them seamlessly, from any position."""
        with LocalLog(tmp_path, segment_bytes=4096) as log:
            for k in range(20):
                log.append(steps("a", k * 10, 10))
            segments = sorted(tmp_path.glob("*.wlog"))
            assert len(segments) > 3
            assert steps("a", 0, 200) == events_of(log.read())
            assert steps("a", 137, 63) == events_of(log.read(137))
            assert 199 == log.last_position()

    def test_segment_names_are_their_first_position(self, tmp_path: Path) -> None:
        """A segment file is named by the position of its first record."""
        with LocalLog(tmp_path, segment_bytes=2048) as log:
            for k in range(10):
                log.append(steps("a", k * 10, 10))
            for segment in sorted(tmp_path.glob("*.wlog")):
                base = int(segment.stem)
                first = next(iter(LocalLog(tmp_path).read(base)))
                assert segment.name == segment_name(base)
                assert base == getattr(first, "first", None)

    def test_segment_size_is_fixed_at_creation(self, tmp_path: Path) -> None:
        """Every writer uses the segment size recorded when the log was made."""
        LocalLog(tmp_path, segment_bytes=2048).close()
        assert 2048 == LocalLog(tmp_path, segment_bytes=10**9).segment_bytes


class TestHostileDirectories:
    """What a log directory holds is validated before it is trusted, and nothing that is not
    the log's own is ever written through or truncated."""

    @pytest.mark.parametrize(("meta", "message"), [
        (b"garbage{", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object, found list"),
        (b'{"format": "other", "version": 1, "segment_bytes": 4096}', "not a wantel log"),
        (b'{"format": "wantel-log", "version": 99, "segment_bytes": 4096}',
         "unsupported log format version 99"),
        (b'{"format": "wantel-log", "version": true, "segment_bytes": 4096}',
         "unsupported log format version true"),
        (b'{"format": "wantel-log", "version": 1}', "segment_bytes must be an integer"),
        (b'{"format": "wantel-log", "version": 1, "segment_bytes": 0}', "got 0"),
        (b'{"format": "wantel-log", "version": 1, "segment_bytes": -5}', "got -5"),
        (b'{"format": "wantel-log", "version": 1, "segment_bytes": "64"}', 'got "64"'),
        (b'{"format": "wantel-log", "version": 1, "segment_bytes": 1e400}', "got Infinity"),
        (b'{"format": "wantel-log", "version": 1, "segment_bytes": 4096.5}', "got 4096.5"),
        (b"[" * 100_000, "not valid JSON"),
    ])
    def test_malformed_metadata_is_one_error_naming_the_file(
        self, tmp_path: Path, meta: bytes, message: str
    ) -> None:
        """Readers and writers refuse a bad ``wantel-log.json`` with one line that names it;
        ``segment_bytes: 0`` used to make the first append rotate forever."""
        LocalLog(tmp_path / "log").close()
        (tmp_path / "log" / local.META_FILE).write_bytes(meta)
        for create in (False, True):
            with pytest.raises(BrokenLog, match=message) as raised:
                LocalLog(tmp_path / "log", create=create)
            assert str(tmp_path / "log" / local.META_FILE) in str(raised.value)
            assert "\n" not in str(raised.value)

    def test_segment_size_out_of_range_is_refused_at_creation(self, tmp_path: Path) -> None:
        """A caller cannot create a log that would rotate forever either."""
        with pytest.raises(ValueError, match="segment_bytes must be an integer from 256"):
            LocalLog(tmp_path / "log", segment_bytes=0)
        assert not (tmp_path / "log").exists()

    def test_a_symlink_named_like_a_segment_is_never_written_through(
        self, tmp_path: Path
    ) -> None:
        """The writer refuses, and the link's target keeps every byte."""
        LocalLog(tmp_path / "log").close()
        target = tmp_path / "precious.txt"
        target.write_bytes(b"someone else's data")
        (tmp_path / "log" / segment_name(0)).symlink_to(target)
        log = LocalLog(tmp_path / "log")
        with pytest.raises(BrokenLog, match="is a symbolic link"):
            log.append(steps("a", 0, 2))
        with pytest.raises(BrokenLog, match="is a symbolic link"):
            list(log.read())
        assert b"someone else's data" == target.read_bytes()

    def test_a_directory_named_like_a_segment_is_a_broken_log(self, tmp_path: Path) -> None:
        """Readers and writers name it, rather than fail on EISDIR mid-read."""
        with LocalLog(tmp_path / "log") as log:
            log.append(steps("a", 0, 2))
        (tmp_path / "log" / segment_name(99)).mkdir()
        with pytest.raises(BrokenLog, match="not a regular file"):
            list(LocalLog(tmp_path / "log", create=False).read())
        with pytest.raises(BrokenLog, match="not a regular file"):
            LocalLog(tmp_path / "log").append(steps("a", 2, 1))

    def test_stray_segment_names_in_a_directory_that_is_no_log_are_left_alone(
        self, tmp_path: Path
    ) -> None:
        """Without ``wantel-log.json`` a directory is not a log: its files named like
        segments are not "repaired" (truncated), and no metadata is written there."""
        stray = tmp_path / "photos" / segment_name(0)
        stray.parent.mkdir()
        stray.write_bytes(b"not a wantel frame at all")
        with pytest.raises(BrokenLog, match="is not a wantel log"):
            LocalLog(stray.parent).append(steps("a", 0, 1))
        assert b"not a wantel frame at all" == stray.read_bytes()
        assert [stray.name] == os.listdir(stray.parent)

    def test_a_start_past_the_largest_position_reads_nothing(self, tmp_path: Path) -> None:
        """``read(10**30)`` is empty, not an OverflowError from the frame scanner."""
        with LocalLog(tmp_path / "log") as log:
            log.append(steps("a", 0, 3))
            assert [] == list(log.read(10**30))
            assert [] == list(log.read(MAX_POSITION))


class TestKeysAndStreams:
    def test_the_prompt_key_is_made_once_private_and_shared(self, tmp_path: Path) -> None:
        """32 random bytes, mode 0600, the same for every instance on the log; another log
        has another key."""
        first = LocalLog(tmp_path / "log").prompt_key()
        key_file = tmp_path / "log" / local.PROMPT_KEY_FILE
        assert 0o600 == key_file.stat().st_mode & 0o777
        assert first == LocalLog(tmp_path / "log").prompt_key() == key_file.read_bytes()
        assert 32 == len(first)
        assert first != LocalLog(tmp_path / "other").prompt_key()

    def test_a_damaged_prompt_key_is_reported_not_replaced(self, tmp_path: Path) -> None:
        """A key of the wrong size is a broken log; it is not silently re-made."""
        (tmp_path / "log").mkdir()
        (tmp_path / "log" / local.PROMPT_KEY_FILE).write_bytes(b"short")
        with pytest.raises(BrokenLog, match="has 5"):
            LocalLog(tmp_path / "log").prompt_key()

    @pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
    def test_has_job_finds_a_job_in_any_segment_and_no_other(
        self, tmp_path: Path, layout: int, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Found in either record layout and in a later segment; a prefix or a job named in
        some other field is not a match."""
        if layout == framing.JSON_ARRAY:
            monkeypatch.setattr(local, "encode_many",
                                lambda events: (_ for _ in ()).throw(OverflowError()))
        with LocalLog(tmp_path / "log", segment_bytes=1024) as log:
            for k in range(30):
                log.append(steps(f"job-{k}", 0, 2))
            assert 2 < len(log.segments())
            assert log.has_job("job-0") and log.has_job("job-29")
            assert not log.has_job("job-")
            assert not log.has_job("job-30")
            assert not log.has_job("StepEnded")
            log.append([JobQueued(job="queued", seq=0, ts=1, model="m", task="t2v")])
            assert not log.has_job("queued")  # queued, not begun: it starts under this id


class TestDamage:
    def test_flipped_bytes_quarantine_one_record_and_keep_the_rest(self, tmp_path: Path) -> None:
        """Corruption inside one record loses that record only; later records are intact."""
        with LocalLog(tmp_path) as log:
            log.append(steps("a", 0, 5))
            log.append(steps("a", 5, 5))
            log.append(steps("a", 10, 5))
        segment = only_segment(tmp_path)
        data = bytearray(segment.read_bytes())
        target = encode(steps("a", 7, 1)[0])
        at = bytes(data).index(target) + 20
        data[at] ^= 0x55
        segment.write_bytes(bytes(data))

        items = list(LocalLog(tmp_path).read())
        notices = [i for i in items if isinstance(i, Quarantined)]
        assert [(7, 1)] == [(n.first, n.count) for n in notices]
        assert "checksum" in notices[0].reason
        expected = steps("a", 0, 7) + steps("a", 8, 7)
        assert expected == events_of(items)
        assert [p for p in range(15) if p != 7] == positions_of(items)

    def test_damaged_header_is_skipped_to_the_next_frame(self, tmp_path: Path) -> None:
        """A destroyed frame header loses that frame; reading resumes at the next one."""
        with LocalLog(tmp_path) as log:
            log.append(steps("a", 0, 3))
            second = log.append(steps("a", 3, 3))
            log.append(steps("a", 6, 3))
        segment = only_segment(tmp_path)
        data = bytearray(segment.read_bytes())
        frame_at = bytes(data).index(framing.MAGIC, 1)
        data[frame_at + 12] ^= 0xFF  # inside the CRC-protected header
        segment.write_bytes(bytes(data))

        items = list(LocalLog(tmp_path).read())
        notices = [i for i in items if isinstance(i, Quarantined)]
        assert [(second.start, 3)] == [(n.first, n.count) for n in notices]
        assert steps("a", 0, 3) + steps("a", 6, 3) == events_of(items)

    @pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
    def test_invalid_record_is_quarantined_alone(self, tmp_path: Path, layout: int) -> None:
        """A well-framed record that fails validation is skipped; its neighbours are kept."""
        good = steps("a", 0, 3)
        enc, dump = ((encode, msgspec.msgpack.encode) if layout == framing.MSGPACK_ARRAY
                     else (encode_json, msgspec.json.encode))
        invalid = dump({"type": "StepEnded", "v": 2, "job": "a"})
        _write_raw_frame(tmp_path, [enc(good[0]), invalid, enc(good[2])], first=0,
                         schema=framing_schema(), layout=layout)
        items = list(LocalLog(tmp_path).read())
        assert [good[0], good[2]] == events_of(items)
        (notice,) = [i for i in items if isinstance(i, Quarantined)]
        assert (1, 1) == (notice.first, notice.count)
        assert "undecodable" in notice.reason

    @pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
    def test_a_damaged_record_loses_only_itself_in_either_layout(self, tmp_path: Path,
                                                                 layout: int) -> None:
        """The per-record table locates records in MessagePack and JSON payloads alike."""
        good = steps("a", 0, 3)
        enc = encode if layout == framing.MSGPACK_ARRAY else encode_json
        _write_raw_frame(tmp_path, [enc(e) for e in good], first=0, schema=framing_schema(),
                         layout=layout)
        segment = only_segment(tmp_path)
        data = bytearray(segment.read_bytes())
        data[bytes(data).index(enc(good[1])) + 5] ^= 0x55
        segment.write_bytes(bytes(data))
        items = list(LocalLog(tmp_path).read())
        assert [good[0], good[2]] == events_of(items)
        (notice,) = [i for i in items if isinstance(i, Quarantined)]
        assert ((1, 1), "record checksum mismatch") == ((notice.first, notice.count),
                                                        notice.reason)

    def test_old_schema_records_are_upcast_on_read(self, tmp_path: Path) -> None:
        """A frame written by an older schema is decoded record by record and upcast."""
        _write_raw_frame(tmp_path, [STEP_ENDED_V1], first=0, schema=0x0001,
                         layout=framing.JSON_ARRAY)  # as wantel wrote v1 records
        (event,) = events_of(LocalLog(tmp_path).read())
        assert isinstance(event, StepEnded)
        assert (2, 2) == (event.v, event.passes)


class TestRecordLayouts:
    def test_logs_of_json_frames_read_and_take_new_appends(self, tmp_path: Path) -> None:
        """A log written before MessagePack records (JSON frames) reads whole, fast path
        included, and new appends land after it in the current layout."""
        old = steps("a", 0, 4)
        _write_raw_frame(tmp_path, [encode_json(e) for e in old], first=0,
                         schema=framing_schema(), layout=framing.JSON_ARRAY)
        with LocalLog(tmp_path) as log:
            assert range(4, 7) == log.append(steps("a", 4, 3))
            items = list(log.read())
        assert [(0, 4), (4, 7)] == [(i.first, i.next) for i in items]
        assert steps("a", 0, 7) == events_of(items)
        layouts = [header.layout for header in frame_headers(only_segment(tmp_path))]
        assert [framing.JSON_ARRAY, framing.MSGPACK_ARRAY] == layouts

    def test_an_integer_beyond_64_bits_is_stored_as_a_json_frame(self, tmp_path: Path) -> None:
        """MessagePack cannot hold it; the batch is stored as JSON rather than lost."""
        absurd = StepEnded(job="a", seq=1, ts=2**70, step=1, total_steps=4)
        with LocalLog(tmp_path) as log:
            log.append(steps("a", 0, 1))
            log.append([absurd])
            assert steps("a", 0, 1) + [absurd] == events_of(log.read())
        layouts = [header.layout for header in frame_headers(only_segment(tmp_path))]
        assert [framing.MSGPACK_ARRAY, framing.JSON_ARRAY] == layouts

    def test_torn_tail_waits_then_is_truncated_by_the_next_writer(self, tmp_path: Path) -> None:
        """A frame cut short at the end (a writer died mid-``write``) is invisible to readers
        and replaced by the next append."""
        with LocalLog(tmp_path) as log:
            log.append(steps("a", 0, 3))
        frame = frame_bytes(steps("a", 3, 3), first=3)
        with open(only_segment(tmp_path), "ab") as segment:
            segment.write(frame[:-7])

        items = list(LocalLog(tmp_path).read())
        assert steps("a", 0, 3) == events_of(items)
        assert not [i for i in items if isinstance(i, Quarantined)]

        with LocalLog(tmp_path) as log:
            positions = log.append(steps("a", 3, 3))
            assert 3 == positions.start
            assert steps("a", 0, 6) == events_of(log.read())


class TestRunsOfSmallFrames:
    """Live emitters write a frame per flush (one or two events); a reader checks each frame and
    decodes a run of them in one call, with exactly what reading frame by frame would give."""

    def test_small_frames_are_handed_over_as_one_batch(self, tmp_path: Path) -> None:
        """Fifty appends of one to three events read back as one batch, positions in order."""
        sizes = [1 + k % 3 for k in range(50)]
        with LocalLog(tmp_path) as log:
            for first, size in zip(_firsts(sizes), sizes, strict=True):
                log.append(steps("a", first, size))
            items = list(log.read())
        assert [(0, sum(sizes))] == [(i.first, i.next) for i in items]
        assert steps("a", 0, sum(sizes)) == events_of(items)

    def test_a_run_stops_before_the_record_limit_but_takes_a_large_frame_whole(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Runs stay under ``RUN_RECORDS``; a frame larger than that is one batch of its own."""
        monkeypatch.setattr(local, "RUN_RECORDS", 10)
        sizes = [3, 3, 3, 3, 25, 3]
        with LocalLog(tmp_path) as log:
            for first, size in zip(_firsts(sizes), sizes, strict=True):
                log.append(steps("a", first, size))
            items = list(log.read())
        assert [9, 3, 25, 3] == [len(i.events) for i in items if isinstance(i, Batch)]
        assert steps("a", 0, 40) == events_of(items)

    @pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
    def test_an_invalid_record_in_a_run_loses_only_itself(self, tmp_path: Path,
                                                          layout: int) -> None:
        """A frame whose checksums hold but whose record does not validate stops nothing:
        the run is read again frame by frame and only that record is quarantined."""
        good = steps("a", 0, 6)
        enc, dump = ((encode, msgspec.msgpack.encode) if layout == framing.MSGPACK_ARRAY
                     else (encode_json, msgspec.json.encode))
        invalid = dump({"type": "StepEnded", "v": 2, "job": "a"})
        _write_raw_frames(tmp_path, [[enc(good[0]), enc(good[1])],
                                     [enc(good[2]), invalid, enc(good[3])],
                                     [enc(good[4]), enc(good[5])]], layout=layout)
        items = list(LocalLog(tmp_path).read())
        assert good[:4] + good[4:] == events_of(items)
        assert [0, 1, 2, 4, 5, 6] == positions_of(items)
        (notice,) = [i for i in items if isinstance(i, Quarantined)]
        assert ((3, 1), True) == ((notice.first, notice.count), "undecodable" in notice.reason)

    def test_a_bad_record_at_a_segment_end_leaves_the_next_segment_read_in_runs(
        self, tmp_path: Path
    ) -> None:
        """Frames are read one at a time only up to the bad record's frame, in its segment."""
        good = steps("a", 0, 12)
        invalid = msgspec.msgpack.encode({"type": "StepEnded", "v": 2, "job": "a"})
        _write_raw_frames(tmp_path, [[encode(good[0])], [encode(good[1]), invalid]])
        following = framing_schema()
        out, first = b"", 3
        for event in good[2:]:
            body = framing.encode_body([encode(event)])
            out += framing.encode_header(body, 1, first, following) + body
            first += 1
        (tmp_path / segment_name(3)).write_bytes(out)
        items = list(LocalLog(tmp_path).read())
        assert good == events_of(items)
        assert [(3, 13)] == [(i.first, i.next) for i in items if isinstance(i, Batch)][-1:]

    def test_old_frames_amid_current_ones_are_upcast_in_place(self, tmp_path: Path) -> None:
        """A run stops at a frame of another schema or layout, which is decoded as before."""
        now = steps("a", 0, 4)
        _write_raw_frames(tmp_path, [[encode(now[0])], [STEP_ENDED_V1], [encode_json(now[1])],
                                     [encode(now[2]), encode(now[3])]],
                          schemas=[None, 0x0001, None, None],
                          layouts=[framing.MSGPACK_ARRAY, framing.JSON_ARRAY,
                                   framing.JSON_ARRAY, framing.MSGPACK_ARRAY])
        events = events_of(LocalLog(tmp_path).read())
        assert [now[0], now[1], now[2], now[3]] == [events[0], *events[2:]]
        assert isinstance(events[1], StepEnded) and (2, 2) == (events[1].v, events[1].passes)

    def test_frames_of_the_catalogue_before_an_added_type_decode_in_runs(
            self, tmp_path: Path) -> None:
        """A log written before ``StageProgress`` existed (its frames carry that catalogue's
        fingerprint, every record current here) is decoded a run at a time, never record by
        record — a previous release's log replays as fast as a new one — and a run stops
        where the fingerprint changes."""
        from telemetry.codec import CURRENT_FINGERPRINTS, SCHEMA_FINGERPRINT

        (previous,) = CURRENT_FINGERPRINTS - {SCHEMA_FINGERPRINT}
        now = steps("a", 0, 6)
        _write_raw_frames(tmp_path, [[encode(now[0]), encode(now[1])], [encode(now[2])],
                                     [encode(now[3])], [encode(now[4]), encode(now[5])]],
                          schemas=[previous, previous, None, previous])
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(local._Cursor, "_salvage", _never)
            items = list(LocalLog(tmp_path).read())
        assert now == events_of(items)
        assert [(0, 3), (3, 4), (4, 6)] == [(i.first, i.next) for i in items
                                            if isinstance(i, Batch)]

    def test_reading_from_inside_a_frame_starts_at_that_position(self, tmp_path: Path) -> None:
        """The frame holding the start is cut; the run goes on from the next frame."""
        with LocalLog(tmp_path) as log:
            for first in range(0, 12, 3):
                log.append(steps("a", first, 3))
            items = list(log.read(4))
        assert list(range(4, 12)) == positions_of(items)
        assert steps("a", 4, 8) == events_of(items)

    @settings(max_examples=80, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(sizes=st.lists(st.integers(1, 4), min_size=1, max_size=20),
           flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                          max_size=3),
           segment_bytes=st.sampled_from([64 << 20, 1024]), start=st.integers(0, 60),
           run_records=st.sampled_from([1024, 1, 3]))
    def test_runs_read_exactly_what_frame_by_frame_reads(
        self, tmp_path_factory: pytest.TempPathFactory, *, sizes: list[int],
        flips: list[tuple[float, int]], segment_bytes: int, start: int, run_records: int,
    ) -> None:
        """Whatever the frames, segments, start and record limit, and wherever bytes are
        damaged, the same events at the same positions and the same quarantine notices come
        out as from frame-by-frame reading."""
        path = tmp_path_factory.mktemp("log")
        with LocalLog(path, segment_bytes=segment_bytes) as log:
            for first, size in zip(_firsts(sizes), sizes, strict=True):
                log.append(steps("a", first, size))
        segments = sorted(path.glob("*.wlog"))
        for where, mask in flips:  # a place in the whole log, then its segment and byte
            data = bytearray((segment := segments[int(where * len(segments))]).read_bytes())
            data[int(where * len(segments) % 1 * len(data))] ^= mask
            segment.write_bytes(bytes(data))

        def flattened(items: list[ReadItem]) -> list[tuple[object, ...]]:
            return [(p, e) for i in items if isinstance(i, Batch) for p, e in i.positioned()] + [
                (i.first, i.count, i.next, i.reason) for i in items
                if isinstance(i, Quarantined)]

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(local, "RUN_RECORDS", run_records)
            runs = flattened(list(LocalLog(path, create=False).read(start)))
            patch.setattr(local._Cursor, "_run_of_frames", lambda self: None)
            one_by_one = flattened(list(LocalLog(path, create=False).read(start)))
        assert one_by_one == runs


@given(st.binary(max_size=4096), st.integers(0, 2**32 - 1))
def test_frames_are_checksummed_with_zlibs_crc32(data: bytes, start: int) -> None:
    """The checksum (zlib-ng's where installed) is zlib's CRC-32: every log stays readable."""
    assert zlib.crc32(data, start) == framing.crc32(data, start)


def _never(*args: object) -> NoReturn:
    raise AssertionError("decoded record by record")


def _firsts(sizes: list[int]) -> list[int]:
    """The first position of each of appends of these sizes."""
    return [sum(sizes[:k]) for k in range(len(sizes))]


def _write_raw_frames(path: Path, frames: list[list[bytes]], *, layout: int | None = None,
                      layouts: list[int] | None = None,
                      schemas: list[int | None] | None = None) -> None:
    """Make a log holding these frames of exactly these record bytes, positions in order."""
    LocalLog(path).close()
    out, first = b"", 0
    for k, records in enumerate(frames):
        frame_layout = layouts[k] if layouts else (
            framing.MSGPACK_ARRAY if layout is None else layout)
        schema = (schemas[k] if schemas else None) or framing_schema()
        body = framing.encode_body(records, frame_layout)
        out += framing.encode_header(body, len(records), first, schema, frame_layout) + body
        first += len(records)
    (path / segment_name(0)).write_bytes(out)


def framing_schema() -> int:
    """The schema fingerprint current writers record."""
    from telemetry.codec import SCHEMA_FINGERPRINT

    return SCHEMA_FINGERPRINT


def _write_raw_frame(path: Path, records: list[bytes], *, first: int, schema: int,
                     layout: int = framing.MSGPACK_ARRAY) -> None:
    """Make a log holding one frame of exactly these record bytes."""
    LocalLog(path).close()
    body = framing.encode_body(records, layout)
    frame = framing.encode_header(body, len(records), first, schema, layout) + body
    (path / segment_name(0)).write_bytes(frame)


def frame_headers(segment: Path) -> list[framing.FrameHeader]:
    """Every frame header of a healthy segment, in order."""
    data, offset, headers = segment.read_bytes(), 0, []
    while offset < len(data):
        header = framing.parse_header(data, offset)
        assert header is not None
        headers.append(header)
        offset += header.frame_len
    return headers


def test_a_reader_far_behind_knows_about_how_far(tmp_path: Path) -> None:
    """Each batch says about how many events were stored after it when it was read (what lets
    the WebSocket fan-out skip frames a client would only read once stale); the last says 0."""
    log = LocalLog(tmp_path / "log")
    for start in range(0, 3000, 3):  # as live emitters flush: a frame of three events
        log.append(steps("a", start, 3))
    batches = [item for item in log.read() if isinstance(item, Batch)]
    log.close()
    assert len(batches) >= 3
    assert batches[-1].behind == 0
    for batch in batches:  # an estimate from bytes (frames differ in size): close enough
        assert abs(batch.behind - (3000 - batch.next)) <= 0.05 * (3000 - batch.next) + 3


def test_a_reader_far_behind_counts_the_segments_after_its_own(tmp_path: Path) -> None:
    """Near the end of a segment, a reader with newer segments ahead is still far behind."""
    log = LocalLog(tmp_path / "log", segment_bytes=4096)
    for start in range(0, 3000, 3):
        log.append(steps("a", start, 3))
    assert len(log.segments()) > 3
    batches = [item for item in log.read() if isinstance(item, Batch)]
    log.close()
    assert batches[-1].behind == 0
    # A segment's last batch too knows a newer segment follows (segments hold ~60 events).
    assert all(batch.behind > 0 for batch in batches if batch.next < 3000 - 200)


def test_a_read_from_a_position_starts_at_a_noted_frame_and_reads_the_same(
        tmp_path: Path) -> None:
    """Readers note a frame start every SEEK_HINT_BYTES; a later read from a position starts
    at the last one before it (not the segment's first byte) and yields exactly what a read
    from the start yields from there. A hint whose frame no longer says so is ignored."""
    log = LocalLog(tmp_path / "log")
    for first in range(0, 3000, 3):
        log.append(steps("j", first, 3))
    everything = events_of(log.read(0))  # notes the hints
    ((_base, (offsets, positions)),) = log._hints.items()
    assert len(positions) >= 3 and list(positions) == sorted(positions)
    for start in (0, 1, positions[2], positions[2] + 1, 1500, 2999, 3000):
        cursor = local._Cursor(log, start)
        items = list(cursor.poll())
        assert everything[start:] == events_of(items), start
        assert (positions_of(items) or [start])[0] == start
        noted = [o for o, p in zip(offsets, positions, strict=True) if p <= start]
        if start >= positions[0]:
            assert cursor._hinted >= noted[-1]
        cursor.close()
    positions[2] += 1  # a hint that lies: its frame's header names another position
    assert everything[positions[2]:] == events_of(log.read(positions[2]))
    assert everything[10:40] == events_of(log.read_near(10, records=4))[:30]


def frame_bytes(events: list[StepEnded], *, first: int) -> bytes:
    """A whole frame of ``events`` at position ``first``, as a writer would write it."""
    from telemetry.codec import SCHEMA_FINGERPRINT, encode_many

    body = framing.encode_body(encode_many(events))
    return framing.encode_header(body, len(events), first, SCHEMA_FINGERPRINT) + body
