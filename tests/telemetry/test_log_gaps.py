"""Gaps are never silent and positions are never reused (issue 16, defect 5).

A deleted or emptied segment, a cut tail, or a checkpoint past the log's end is reported as a
:class:`~telemetry.log.base.Gap` where the positions would have been, counted by the engine
and exported; the next writer starts after the log's high-water mark, so a reader that saw the
lost positions never sees them given to other events.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from telemetry.engine import CheckpointStore, ProjectionEngine
from telemetry.events import Event
from telemetry.files import FileOps
from telemetry.log import Batch, Gap, LocalLog, Quarantined, ReadItem
from telemetry.log.local import RESERVE_AHEAD, segment_name
from telemetry.projections import default_projections
from telemetry.runner import ProjectionRunner
from tests.telemetry.test_engine import a_job
from wantel.cli import main

SEGMENT_BYTES = 1024  # a few jobs per segment


def jobs(names: list[str]) -> list[list[Event]]:
    """A whole job's events per name (eight events each)."""
    return [a_job(name) for name in names]


def write_jobs(log_dir: Path, names: list[str], segment_bytes: int = 64 << 20) -> list[range]:
    """Append each job as one batch; the positions each got."""
    with LocalLog(log_dir, segment_bytes=segment_bytes) as log:
        return [log.append(events) for events in jobs(names)]


def segments(log_dir: Path) -> list[Path]:
    """The segment files, oldest first."""
    return sorted(log_dir.glob("*.wlog"))


def read(log_dir: Path, start: int = 0) -> list[ReadItem]:
    """What a fresh reader sees from ``start``."""
    with LocalLog(log_dir, create=False) as log:
        return list(log.read(start))


def gaps_of(items: list[ReadItem]) -> list[tuple[int | None, int]]:
    """The holes reported, as ``(first, next)``."""
    return [(item.first, item.next) for item in items if isinstance(item, Gap)]


def jobs_read(items: list[ReadItem]) -> list[str]:
    """The jobs whose ``JobStarted`` was read, in order."""
    return [event.job for item in items if isinstance(item, Batch) for event in item.events
            if type(event).__name__ == "JobStarted"]


def covered(items: list[ReadItem]) -> list[tuple[int, int]]:
    """Each item's ``(first, next)``: consecutive items must meet (nothing silent)."""
    out = []
    for item in items:
        first = item.first
        assert first is not None
        out.append((first, item.next))
    return out


def assert_contiguous(items: list[ReadItem]) -> int:
    """Batches and notices cover positions from 0 without a silent hole; the end."""
    position = 0
    for first, after in covered(items):
        assert first == position, f"silent hole before {first} (read up to {position})"
        position = after
    return position


def append_job(log_dir: Path, name: str) -> range:
    """A new writer process's append of one job."""
    with LocalLog(log_dir, segment_bytes=SEGMENT_BYTES) as log:
        return log.append(a_job(name))


class TestDeletedOrEmptiedSegment:
    """A segment that is gone or empty is a hole readers report, counted once."""

    @pytest.fixture(name="log_dir")
    def _log_dir(self, tmp_path: Path) -> Path:
        log_dir = tmp_path / "log"
        write_jobs(log_dir, [f"job-{i}" for i in range(12)], SEGMENT_BYTES)
        assert len(segments(log_dir)) >= 4
        return log_dir

    @pytest.mark.parametrize("damage", ["delete", "empty"])
    def test_a_middle_segment(self, log_dir: Path, damage: str) -> None:
        """The positions of a deleted or emptied middle segment are one reported gap."""
        victim, following = segments(log_dir)[1:3]
        first, after = int(victim.stem), int(following.stem)
        if damage == "delete":
            victim.unlink()
        else:
            os.truncate(victim, 0)
        items = read(log_dir)
        assert [(first, after)] == gaps_of(items)
        assert 96 == assert_contiguous(items)
        engine = ProjectionEngine(default_projections())
        engine.apply_items(items)
        assert (1, after - first) == (engine.health.gaps, engine.health.gap_positions)

    def test_the_first_segment(self, log_dir: Path) -> None:
        """Without its first segment, a log reports the positions before its second."""
        first = segments(log_dir)[0]
        after = int(segments(log_dir)[1].stem)
        first.unlink()
        assert [(0, after)] == gaps_of(read(log_dir))

    @pytest.mark.parametrize("damage", ["delete", "empty"])
    def test_the_newest_segment(self, log_dir: Path, damage: str) -> None:
        """A lost newest segment is a gap up to the high-water mark; the next writer starts
        after it, so no position a reader saw is given to another event."""
        newest = segments(log_dir)[-1]
        if damage == "delete":
            newest.unlink()
        else:
            os.truncate(newest, 0)
        items = read(log_dir)
        assert [(int(newest.stem), 96)] == gaps_of(items)
        assert 96 == assert_contiguous(items)
        assert 96 == append_job(log_dir, "job-new").start
        items = read(log_dir)
        assert "job-new" == jobs_read(items)[-1]
        assert [(int(newest.stem), 96)] == gaps_of(items)
        assert 104 == assert_contiguous(items)


class TestCutTail:
    """Bytes lost from the end of the log (by hand, by a disk) are a reported gap."""

    def test_cut_at_a_frame_boundary(self, tmp_path: Path) -> None:
        """Two whole jobs cut off the end: reported, and not reused by the next writer."""
        log_dir = tmp_path / "log"
        with LocalLog(log_dir) as log:
            for events in jobs(["job-a", "job-b", "job-c"]):
                log.append(events)
        segment, = segments(log_dir)
        frame_len = segment.stat().st_size // 3
        os.truncate(segment, frame_len)
        items = read(log_dir)
        assert ["job-a"] == jobs_read(items)
        assert [(8, 24)] == gaps_of(items)
        assert 24 == append_job(log_dir, "job-d").start
        items = read(log_dir)
        assert ["job-a", "job-d"] == jobs_read(items)
        assert [(8, 24)] == gaps_of(items)
        assert 32 == assert_contiguous(items)

    def test_cut_inside_a_frame(self, tmp_path: Path) -> None:
        """A whole, acknowledged frame cut in half is a lost tail, not a write in progress."""
        log_dir = tmp_path / "log"
        with LocalLog(log_dir) as log:
            for events in jobs(["job-a", "job-b"]):
                log.append(events)
        segment, = segments(log_dir)
        os.truncate(segment, segment.stat().st_size - 10)
        items = read(log_dir)
        assert [(8, 16)] == gaps_of(items)
        assert 16 == append_job(log_dir, "job-c").start

    def test_cut_under_an_open_writer(self, tmp_path: Path) -> None:
        """A writer whose segment shrinks under it starts a new one: no hole inside a
        segment, no byte written where a follower has already read."""
        log_dir = tmp_path / "log"
        with LocalLog(log_dir) as log:
            for events in jobs(["job-a", "job-b"]):
                log.append(events)
            segment, = segments(log_dir)
            os.truncate(segment, segment.stat().st_size // 2)
            assert 16 == log.append(a_job("job-c")).start
        assert [segment_name(0), segment_name(16)] == [p.name for p in segments(log_dir)]
        items = read(log_dir)
        assert ["job-a", "job-c"] == jobs_read(items)
        assert [(8, 16)] == gaps_of(items)

    def test_a_follower_past_the_cut_reads_on(self, tmp_path: Path) -> None:
        """A follower that read the lost tail carries on with the next writer's events."""
        log_dir = tmp_path / "log"
        with LocalLog(log_dir) as log:
            for events in jobs(["job-a", "job-b"]):
                log.append(events)
            cursor = log.cursor(0)
            assert ["job-a", "job-b"] == jobs_read(list(cursor.poll()))
            segment, = segments(log_dir)
            os.truncate(segment, segment.stat().st_size // 2)
            assert [] == list(cursor.poll())
        append_job(log_dir, "job-c")
        assert ["job-c"] == jobs_read(list(cursor.poll()))
        cursor.close()


class TestCheckpointPastTheEnd:
    """A server restarting from a checkpoint the log no longer reaches says so, and then
    sees the jobs written after the loss (it does not wait for positions it already holds)."""

    def test_runner_reports_the_gap_and_sees_new_jobs(self, tmp_path: Path) -> None:
        """Checkpoint at 24, log cut back to 8: a gap is counted, job-d is shown."""
        log_dir = tmp_path / "log"
        store = CheckpointStore(tmp_path / "checkpoint")
        with LocalLog(log_dir) as log:
            for events in jobs(["job-a", "job-b", "job-c"]):
                log.append(events)
            runner = ProjectionRunner(log, ProjectionEngine(default_projections()), store)
            runner.catch_up()
            assert 24 == runner.engine.position
        segment, = segments(log_dir)
        os.truncate(segment, segment.stat().st_size // 3)
        append_job(log_dir, "job-d")

        with LocalLog(log_dir, create=False) as log:
            runner = ProjectionRunner(log, ProjectionEngine(default_projections()), store)
            assert 24 == runner.engine.position
            runner.catch_up()
            health = runner.engine.health
            assert (1, 16) == (health.gaps, health.gap_positions)
            assert "job-d" in runner.engine.states["jobs"].jobs
            assert 32 == runner.engine.position
            runner.catch_up()  # read again: the same hole is not counted twice
            assert 1 == runner.engine.health.gaps

    def test_reader_from_past_the_end_reports_it(self, tmp_path: Path) -> None:
        """A read from a position the log no longer reaches (but once gave) yields the gap."""
        log_dir = tmp_path / "log"
        write_jobs(log_dir, ["job-a", "job-b", "job-c"])
        segment, = segments(log_dir)
        os.truncate(segment, segment.stat().st_size // 3)
        items = read(log_dir, start=20)
        assert [(8, 24)] == gaps_of(items)
        assert "checkpoint past the end" in items[0].reason  # type: ignore[union-attr]
        assert [] == gaps_of(read(log_dir, start=10**6)[1:])  # positions never given: no more

    def test_reading_past_the_high_water_mark_is_not_a_gap(self, tmp_path: Path) -> None:
        """Positions never given out are waited for, not reported."""
        log_dir = tmp_path / "log"
        write_jobs(log_dir, ["job-a"])
        assert [] == read(log_dir, start=100)


class TestPowerCut:
    """After a reboot, unsynced frames readers saw may be gone: the writer starts past its
    durable reservation; a clean close leaves no reservation to skip."""

    class Rebooted(FileOps):
        """The file operations of a machine that has rebooted since the log was written."""

        def boot_id(self) -> str:
            return "another-boot"

    def test_after_a_crash_and_reboot_the_writer_skips_the_reservation(
            self, tmp_path: Path) -> None:
        """A writer that did not close: the next boot starts at the reservation, a gap."""
        log_dir = tmp_path / "log"
        log = LocalLog(log_dir, fsync="never")
        log.append(a_job("job-a"))  # "crashes": never closed
        rebooted = LocalLog(log_dir, ops=self.Rebooted())
        assert 8 + RESERVE_AHEAD == rebooted.append(a_job("job-b")).start
        rebooted.close()
        items = read(log_dir)
        assert [(8, 8 + RESERVE_AHEAD)] == gaps_of(items)
        assert ["job-a", "job-b"] == jobs_read(items)
        log.close()

    def test_after_a_clean_close_a_reboot_costs_nothing(self, tmp_path: Path) -> None:
        """A writer that closed: the next boot carries on at the high-water mark."""
        log_dir = tmp_path / "log"
        with LocalLog(log_dir) as log:
            log.append(a_job("job-a"))
        with LocalLog(log_dir, ops=self.Rebooted()) as rebooted:
            assert 8 == rebooted.append(a_job("job-b")).start
        assert [] == gaps_of(read(log_dir))

    def test_a_killed_writer_costs_no_gap_on_the_same_boot(self, tmp_path: Path) -> None:
        """A process crash keeps the page cache: the high-water mark is exact."""
        log_dir = tmp_path / "log"
        log = LocalLog(log_dir)
        log.append(a_job("job-a"))  # never closed, as if SIGKILLed
        assert 8 == append_job(log_dir, "job-b").start
        assert [] == gaps_of(read(log_dir))
        log.close()


class TestShownAndExported:
    """``wantel cat`` and ``wantel replay`` print the gap; ``/metrics`` counts it."""

    @pytest.fixture(name="log_dir")
    def _log_dir(self, tmp_path: Path) -> Path:
        log_dir = tmp_path / "log"
        write_jobs(log_dir, ["job-a", "job-b", "job-c"])
        segment, = segments(log_dir)
        os.truncate(segment, segment.stat().st_size // 3)
        return log_dir

    def test_cat_warns(self, log_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """One line on stderr names the missing positions."""
        assert 0 == main(["cat", "--log", str(log_dir)])
        err = capsys.readouterr().err
        assert "warning: gap: positions 8-23 (16) are missing" in err

    def test_replay_warns_and_counts(self, log_dir: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
        """The warning, and the footer's count of gaps."""
        assert 0 == main(["replay", "--log", str(log_dir)])
        out, err = capsys.readouterr()
        assert "warning: gap: positions 8-23 (16) are missing" in err
        assert "1 gap(s) in the log (16 position(s) missing)" in out

    def test_metrics(self, log_dir: Path) -> None:
        """``wantel_log_gaps_total`` and ``wantel_log_gap_positions_total``."""
        from exporters.prometheus import make_registry

        with LocalLog(log_dir, create=False) as log:
            runner = ProjectionRunner(log, ProjectionEngine(default_projections()))
            runner.catch_up()
            registry = make_registry(runner)
            assert 1 == registry.get_sample_value("wantel_log_gaps_total")
            assert 16 == registry.get_sample_value("wantel_log_gap_positions_total")


def test_quarantine_is_still_counted_apart_from_gaps(tmp_path: Path) -> None:
    """A damaged record is quarantined (not a gap): the two counters stay apart."""
    log_dir = tmp_path / "log"
    write_jobs(log_dir, ["job-a", "job-b"])
    segment, = segments(log_dir)
    data = bytearray(segment.read_bytes())
    data[len(data) // 4] ^= 0xFF
    segment.write_bytes(bytes(data))
    items = read(log_dir)
    assert [] == gaps_of(items)
    assert [item for item in items if isinstance(item, Quarantined)]
