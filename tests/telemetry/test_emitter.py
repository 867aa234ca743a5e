"""The emitter: never blocks, never raises, orders and sequences events, drops by value."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from structlog.testing import capture_logs

from telemetry.emitter import Emitter
from telemetry.events import (
    DeviceInfo,
    Event,
    EventsDropped,
    JobCompleted,
    JobStarted,
    MemorySampled,
    StageStarted,
    StepEnded,
)
from telemetry.log.base import Batch, EventLog
from telemetry.log.local import LocalLog
from telemetry.log.memory import MemoryLog
from tests.polling import wait_for

from .log_contract import events_of


def step(job: str, i: int) -> StepEnded:
    """An unsequenced step event."""
    return StepEnded(job=job, ts=i, step=i, total_steps=100, timestep=1.0)


def sample(job: str, i: int) -> MemorySampled:
    """An unsequenced memory sample."""
    return MemorySampled(job=job, ts=i, device="cpu", host_rss_bytes=i)


def completed(job: str) -> JobCompleted:
    """An unsequenced completion."""
    return JobCompleted(job=job, ts=10**6, duration_s=1.0)


class GateLog(MemoryLog):
    """A log whose appends wait until the test opens the gate (a stuck disk)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def append(self, events: Sequence[Event]) -> range:
        self.gate.wait(30)
        return super().append(events)


class FlakyLog(MemoryLog):
    """A log that fails with ENOSPC until ``healthy`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.healthy = threading.Event()

    def append(self, events: Sequence[Event]) -> range:
        if not self.healthy.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().append(events)


def job_events(log: EventLog, job: str) -> list[Event]:
    """The events of one job stream, in log order."""
    return [e for e in events_of(log.read()) if e.job == job]


class TestOrderingAndSequencing:
    def test_events_arrive_in_emission_order_with_gap_free_seq(self) -> None:
        """Whatever their priority, events keep emission order and get seq 0, 1, 2, …"""
        log = MemoryLog()
        with Emitter(log, worker="w1") as emitter:
            emitter.emit(StageStarted(job="j", ts=0, stage="denoise"))
            for i in range(5):
                emitter.emit(step("j", i))
                emitter.emit(sample("j", i))
            emitter.emit(completed("j"))
            assert emitter.flush(10)
        events = job_events(log, "j")
        assert list(range(12)) == [e.seq for e in events]
        assert ["StageStarted"] + ["StepEnded", "MemorySampled"] * 5 + ["JobCompleted"] == [
            type(e).__name__ for e in events
        ]
        assert {"w1"} == {e.worker for e in events}

    def test_streams_are_sequenced_independently(self) -> None:
        """Each job has its own sequence."""
        log = MemoryLog()
        with Emitter(log) as emitter:
            for i in range(3):
                emitter.emit(step("a", i))
                emitter.emit(step("b", i))
            emitter.flush(10)
        assert [0, 1, 2] == [e.seq for e in job_events(log, "a")]
        assert [0, 1, 2] == [e.seq for e in job_events(log, "b")]

    def test_close_flushes_everything(self) -> None:
        """Events emitted just before close are in the log after it."""
        log = MemoryLog()
        emitter = Emitter(log, flush_interval=10.0)
        for i in range(1000):
            emitter.emit(step("j", i))
        emitter.close()
        assert 1000 == len(job_events(log, "j"))


class TestNeverBlocksNeverRaises:
    def test_emit_returns_while_the_log_is_stuck(self) -> None:
        """With appends blocked, emit keeps returning; the queue is bounded by dropping."""
        log = GateLog()
        emitter = Emitter(log, capacity=100)
        try:
            for i in range(10_000):
                emitter.emit(step("j", i))
            assert emitter.stats().queued <= 100
        finally:
            log.gate.set()
            emitter.close()

    def test_lowest_value_events_are_dropped_first(self) -> None:
        """When full, samples go before steps, steps before lifecycle events; all counted."""
        log = GateLog()
        emitter = Emitter(log, capacity=10)
        emitter.emit(step("x", 0))  # taken by the writer thread, which then blocks
        deadline = time.monotonic() + 10
        while emitter.stats().queued and time.monotonic() < deadline:
            time.sleep(0.001)
        for i in range(6):
            emitter.emit(sample("j", i))
        for i in range(4):
            emitter.emit(step("j", i))
        emitter.emit(JobStarted(job="k", ts=0, model="m", family="f", variant="v", task="t2v",
                                width=16, height=16, num_frames=5, steps=4,
                                guidance_scale=1.0, cfg=False,
                                device=DeviceInfo(kind="cpu", name="cpu")))
        for i in range(4, 8):
            emitter.emit(step("j", i))
        log.gate.set()
        emitter.close()
        stats = emitter.stats()
        assert {"queue_full_sample": 5} == stats.dropped
        kept = job_events(log, "j")
        assert ["MemorySampled"] + ["StepEnded"] * 8 == [type(e).__name__ for e in kept]
        assert list(range(9)) == [e.seq for e in kept]  # drops leave no holes
        report = [e for e in events_of(log.read()) if isinstance(e, EventsDropped)][-1]
        assert {"queue_full_sample": 5} == report.counts

    def test_when_only_lifecycle_events_remain_the_newest_is_dropped(self) -> None:
        """A queue full of lifecycle events drops the incoming one and counts it."""
        log = GateLog()
        emitter = Emitter(log, capacity=3)
        emitter.emit(step("x", 0))
        deadline = time.monotonic() + 10
        while emitter.stats().queued and time.monotonic() < deadline:
            time.sleep(0.001)
        for job in "abcd":
            emitter.emit(completed(job))
        log.gate.set()
        emitter.close()
        assert {"queue_full_lifecycle": 1} == emitter.stats().dropped

    def test_non_events_are_counted_not_raised(self) -> None:
        """Passing something that is not an event is a counted drop."""
        with Emitter(MemoryLog()) as emitter:
            emitter.emit("not an event")  # type: ignore[arg-type]
            emitter.emit(None)  # type: ignore[arg-type]
        assert {"not_an_event": 2} == emitter.stats().dropped

    def test_emit_after_close_is_counted(self) -> None:
        """Late events are counted as dropped, not raised."""
        emitter = Emitter(MemoryLog())
        emitter.close()
        emitter.emit(step("j", 0))
        assert {"closed": 1} == emitter.stats().dropped


class TestFailingLog:
    def test_failures_are_retried_counted_and_logged_once(self) -> None:
        """A log that fails, then recovers, receives every event; the error is logged once."""
        log = FlakyLog()
        with capture_logs() as logs:
            emitter = Emitter(log, retry_backoff=(0.001, 0.01))
            for i in range(50):
                emitter.emit(step("j", i))
            deadline = time.monotonic() + 10
            while emitter.stats().errors.get("ENOSPC", 0) < 3 and time.monotonic() < deadline:
                time.sleep(0.001)
            log.healthy.set()
            assert emitter.flush(10)
            emitter.close()
        assert list(range(50)) == [e.seq for e in job_events(log, "j")]
        assert emitter.stats().errors["ENOSPC"] >= 3
        assert 1 == len([e for e in logs if e.get("error") == "ENOSPC"])

    def test_close_counts_what_could_not_be_written(self) -> None:
        """Events still unwritable at close are counted as lost, not raised."""
        emitter = Emitter(FlakyLog(), retry_backoff=(0.001, 0.01))
        for i in range(7):
            emitter.emit(step("j", i))
        emitter.close(timeout=0.2)
        assert 7 <= emitter.stats().dropped["log_unavailable"]


class TestClockSkew:
    def test_absurd_timestamps_and_negative_durations_are_clamped_and_counted(self) -> None:
        """A ts of 2**70 (which held every checkpoint back) or below 0, and a negative or NaN
        duration, are stored clamped into range; each kind is counted in EventsDropped and
        logged once."""
        from telemetry.emitter import MAX_TS
        from telemetry.events import StageEnded

        log = MemoryLog()
        with capture_logs() as logs, Emitter(log, heartbeat_interval=None) as emitter:
            emitter.emit(StageEnded(job="j", ts=2**70, stage="decode", duration_s=-3.0))
            emitter.emit(StageEnded(job="j", ts=-5, stage="decode", duration_s=float("nan")))
            emitter.emit(JobCompleted(job="j", ts=10**18, duration_s=2.0))
            assert emitter.flush(10)
        first, second, done = job_events(log, "j")
        assert (MAX_TS, 0.0) == (first.ts, first.duration_s)  # type: ignore[attr-defined]
        assert (0, 0.0) == (second.ts, second.duration_s)  # type: ignore[attr-defined]
        assert (10**18, 2.0) == (done.ts, done.duration_s)  # type: ignore[attr-defined]
        report = [e for e in events_of(log.read()) if isinstance(e, EventsDropped)][-1]
        assert {"clock_skew_ts": 2, "negative_duration": 2} == report.counts
        warned = [entry for entry in logs if "clamped" in entry["event"]]
        assert {"clock_skew_ts", "negative_duration"} == {entry["reason"] for entry in warned}
        assert 2 == len(warned)


class TestProcessEmitter:
    """One emitter per process and log: the worker stream's seq never restarts."""

    def test_every_caller_shares_one_emitter_and_every_heartbeat_counts(
            self, tmp_path: Path) -> None:
        """Three uses in one process (as three instrument() calls) write three heartbeats,
        and replaying applies all three: none is dropped as a duplicate."""
        from telemetry.emitter import process_emitter
        from telemetry.engine import ProjectionEngine
        from telemetry.events import WorkerHeartbeat

        log = LocalLog(tmp_path / "log")
        first = process_emitter(log)
        try:
            for _ in range(3):
                emitter = process_emitter(LocalLog(tmp_path / "log"))
                assert emitter is first
                emitter._next_heartbeat = 0.0  # a heartbeat is due now (the interval is 10 s)
                emitter._wake.set()
                assert emitter.flush(5)
                wait_for(lambda: first._next_heartbeat > 0.0, "the heartbeat")
                assert emitter.flush(5)
        finally:
            first.close()
        written = [e for item in log.read() if isinstance(item, Batch) for e in item.events
                   if isinstance(e, WorkerHeartbeat)]
        engine = ProjectionEngine([])
        engine.apply_items(log.read())
        assert len(written) >= 3
        assert len(written) == engine.health.events_by_type["WorkerHeartbeat"]
        assert 0 == engine.health.duplicates
        assert process_emitter(log) is not first  # a closed one is replaced
        process_emitter(log).close()

    def test_the_open_ones_are_listed_until_closed(self, tmp_path: Path) -> None:
        """``process_emitters()`` lists each log's open emitter once, and drops it when closed
        (what a host closes before exit, as the test suite does after each test)."""
        from telemetry.emitter import process_emitter, process_emitters

        first, second = process_emitter(LocalLog(tmp_path / "a")), process_emitter(
            LocalLog(tmp_path / "b"))
        process_emitter(LocalLog(tmp_path / "a"))  # shared, not listed twice
        listed = process_emitters()
        assert 1 == sum(e is first for e in listed) == sum(e is second for e in listed)
        first.close()
        assert first not in process_emitters() and second in process_emitters()
        second.close()

    def test_the_default_worker_name_is_host_pid_start(self) -> None:
        """host:pid:start — unique across hosts, processes and restarts."""
        import os
        import socket

        from telemetry.emitter import default_worker_name

        host, pid, start = default_worker_name().rsplit(":", 2)
        assert (socket.gethostname(), str(os.getpid())) == (host, pid)
        assert int(start) > 1_700_000_000
        assert default_worker_name() == default_worker_name()


class TestWorkerStopped:
    """A clean shutdown says so: the worker stream's last event is WorkerStopped."""

    def test_close_appends_worker_stopped_last(self, tmp_path: Path) -> None:
        """After a job and a heartbeat, close() writes WorkerStopped (host, pid) as the last
        event of worker/<name>, after every event of the worker, and no heartbeat after it."""
        import os
        import socket

        from telemetry.events import WorkerHeartbeat, WorkerStopped

        log = LocalLog(tmp_path / "log")
        emitter = Emitter(log, worker="w-1", heartbeat_interval=0.01)
        emitter.emit(step("a", 0))
        wait_for(lambda: emitter.stats().appended >= 2, "the step and a heartbeat")
        emitter.close()
        events = events_of(list(log.read()))
        assert isinstance(events[-1], WorkerStopped)
        stopped = events[-1]
        assert ("worker/w-1", "w-1", socket.gethostname(), os.getpid()) == (
            stopped.job, stopped.worker, stopped.host, stopped.pid)
        own = [e for e in events if e.job == "worker/w-1"]
        assert list(range(len(own))) == [e.seq for e in own]  # the stream's next seq
        assert any(isinstance(e, WorkerHeartbeat) for e in own)

    def test_an_emitter_that_wrote_nothing_writes_no_stop(self) -> None:
        """An emitter without heartbeats that never emitted leaves the log as it was."""
        log = MemoryLog()
        Emitter(log, heartbeat_interval=None).close()
        assert [] == events_of(list(log.read()))

    def test_a_process_exiting_writes_worker_stopped(self, tmp_path: Path) -> None:
        """The process emitter (every instrument(log=...) call's) is closed at interpreter
        exit, which writes WorkerStopped: a real child process, exiting normally."""
        import subprocess
        import sys

        from telemetry.events import WorkerStopped

        code = ("import sys\n"
                "from telemetry.emitter import process_emitter\n"
                "from telemetry.events import StepEnded\n"
                "from telemetry.log.local import LocalLog\n"
                "e = process_emitter(LocalLog(sys.argv[1]), worker='child')\n"
                "e.emit(StepEnded(job='j', ts=1, step=0, total_steps=1))\n")
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "log")], check=True,
                       timeout=60)
        events = events_of(list(LocalLog(tmp_path / "log").read()))
        assert ["child"] == [e.worker for e in events if isinstance(e, WorkerStopped)]
        assert isinstance(events[-1], WorkerStopped)
