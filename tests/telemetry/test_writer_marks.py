"""A writer that dies with events in memory is reported by the next one (issue 16, item 2).

Each emitter leaves a mark in the log's ``writers/`` while it runs; a clean close removes it.
The next emitter on the log finds a dead writer's mark and counts ``writer_crashed`` in its
``EventsDropped`` report, so the loss is in the log, exported, and never silent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from telemetry.emitter import Emitter
from telemetry.engine import ProjectionEngine
from telemetry.events import EventsDropped, StageStarted
from telemetry.log import Batch, LocalLog
from telemetry.projections import default_projections
from tests.polling import wait_for

ROOT = Path(__file__).resolve().parents[2]

KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from telemetry.emitter import Emitter
    from telemetry.events import StageStarted
    from telemetry.log import LocalLog

    emitter = Emitter(LocalLog(sys.argv[1]), worker="doomed", heartbeat_interval=None,
                      flush_interval=60.0)
    emitter.emit(StageStarted(job="job-a", seq=0, ts=1, stage="load"))
    assert emitter.flush(10.0)
    emitter.emit(StageStarted(job="job-a", seq=1, ts=2, stage="text_encode"))  # in memory
    os.kill(os.getpid(), signal.SIGKILL)
""")


def kill_a_writer(log_dir: Path) -> None:
    """Run an emitter in a child that SIGKILLs itself with an event still queued."""
    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(log_dir)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert -signal.SIGKILL == result.returncode, result.stderr


def drop_reports(log_dir: Path) -> list[EventsDropped]:
    """Every ``EventsDropped`` in the log."""
    with LocalLog(log_dir, create=False) as log:
        return [event for item in log.read() if isinstance(item, Batch)
                for event in item.events if isinstance(event, EventsDropped)]


def marks(log_dir: Path) -> list[str]:
    """The writer marks left in the log."""
    return sorted(os.listdir(log_dir / "writers"))


def test_next_writer_reports_a_killed_writer(tmp_path: Path) -> None:
    """SIGKILL with an event queued: the next emitter appends ``writer_crashed: 1``."""
    log_dir = tmp_path / "log"
    kill_a_writer(log_dir)
    assert 1 == len(marks(log_dir))
    with Emitter(LocalLog(log_dir), worker="next", heartbeat_interval=None) as emitter:
        emitter.emit(StageStarted(job="job-b", seq=0, ts=3, stage="load"))
        assert emitter.flush(10.0)
        assert {"writer_crashed": 1} == emitter.stats().dropped
    reports = drop_reports(log_dir)
    assert [{"writer_crashed": 1}] == [report.counts for report in reports]
    assert "next" == reports[0].worker
    assert [] == marks(log_dir), "the dead writer's mark was claimed, ours removed"
    engine = ProjectionEngine(default_projections())
    with LocalLog(log_dir, create=False) as log:
        engine.apply_items(log.read())
    assert {"writer_crashed": 1} == engine.states["health"].dropped()


def test_a_clean_close_leaves_nothing_to_report(tmp_path: Path) -> None:
    """Close, then a new writer: no mark, no report."""
    log_dir = tmp_path / "log"
    with Emitter(LocalLog(log_dir), heartbeat_interval=None) as emitter:
        emitter.emit(StageStarted(job="job-a", seq=0, ts=1, stage="load"))
    assert [] == marks(log_dir)
    with Emitter(LocalLog(log_dir), heartbeat_interval=None) as emitter:
        emitter.emit(StageStarted(job="job-b", seq=0, ts=2, stage="load"))
        assert emitter.flush(10.0)
        assert {} == emitter.stats().dropped
    assert [] == drop_reports(log_dir)


def test_a_live_writer_is_not_reported(tmp_path: Path) -> None:
    """Two emitters open at once: neither takes the other for dead; each claims once."""
    log_dir = tmp_path / "log"
    first = Emitter(LocalLog(log_dir), worker="first", heartbeat_interval=None)
    first.emit(StageStarted(job="job-a", seq=0, ts=1, stage="load"))
    assert first.flush(10.0)
    second = Emitter(LocalLog(log_dir), worker="second", heartbeat_interval=None)
    second.emit(StageStarted(job="job-b", seq=0, ts=2, stage="load"))
    assert second.flush(10.0)
    assert 2 == len(marks(log_dir))
    assert {} == first.stats().dropped and {} == second.stats().dropped
    first.close()
    second.close()
    assert [] == marks(log_dir)


def test_two_killed_writers_are_both_counted(tmp_path: Path) -> None:
    """Each dead writer is counted once, by the one writer that claims its mark (the second
    child reported the first before it was killed too)."""
    log_dir = tmp_path / "log"
    kill_a_writer(log_dir)
    kill_a_writer(log_dir)
    with Emitter(LocalLog(log_dir), heartbeat_interval=None) as emitter:
        assert emitter.flush(10.0)
    with Emitter(LocalLog(log_dir), heartbeat_interval=None) as emitter:
        assert emitter.flush(10.0)
        assert {} == emitter.stats().dropped
    reports = drop_reports(log_dir)
    assert 2 == sum(report.counts["writer_crashed"] for report in reports)
    assert [] == marks(log_dir)


CLAIM_THEN_DIE = textwrap.dedent("""
    import os, signal, sys
    from telemetry.log import LocalLog

    log = LocalLog(sys.argv[1])
    assert ["doomed"] == log.open_writer("claimer")  # claims the dead mark, then dies too
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_claimed_mark_is_reported_even_if_its_claimer_dies(tmp_path: Path) -> None:
    """A writer that claimed a dead mark and died before reporting it leaves it to the next:
    both dead writers are reported, neither is lost."""
    log_dir = tmp_path / "log"
    kill_a_writer(log_dir)
    result = subprocess.run([sys.executable, "-c", CLAIM_THEN_DIE, str(log_dir)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert -signal.SIGKILL == result.returncode, result.stderr
    assert 2 == len(marks(log_dir))
    with Emitter(LocalLog(log_dir), heartbeat_interval=None) as emitter:
        assert emitter.flush(10.0)
        assert wait_for(lambda: [] != drop_reports(log_dir), "the report")
        assert {"writer_crashed": 2} == emitter.stats().dropped
    assert [{"writer_crashed": 2}] == [report.counts for report in drop_reports(log_dir)]
    assert [] == marks(log_dir)
