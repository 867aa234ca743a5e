"""The one runner: catch up, follow, tell the sinks, checkpoint by policy, resume."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest

from telemetry.engine import CheckpointStore, ProjectionEngine
from telemetry.events import Event, JobCompleted
from telemetry.log.base import Batch, Position, Quarantined, ReadItem
from telemetry.log.local import LocalLog
from telemetry.log.memory import MemoryLog
from telemetry.projections.jobs import JobsProjection, JobsState
from telemetry.runner import Applied, ProjectionRunner, Sink
from tests.polling import wait_for
from tests.telemetry.test_engine import Exploding, a_job


class AppendLog(MemoryLog):
    """A memory log that reads back one batch per append (a memory log reads one batch in
    all), so a runner takes several steps over it."""

    def __init__(self) -> None:
        super().__init__()
        self.appends: list[range] = []

    def append(self, events: Sequence[Event]) -> range:
        positions = super().append(events)
        if len(positions):
            self.appends.append(positions)
        return positions

    def read(self, start: Position = 0) -> Iterator[ReadItem]:
        for positions in list(self.appends):
            if positions.stop <= start:
                continue
            for item in super().read(max(start, positions.start)):
                assert isinstance(item, Batch)
                yield Batch(item.first, item.events[:positions.stop - item.first])


class Recording(Sink):
    """Remembers every step it is told about, as (position, event) and the live flag."""

    def __init__(self, name: str = "recording") -> None:
        self.name = name
        self.seen: list[tuple[Position, Event]] = []
        self.live: list[bool] = []
        self.steps: list[Applied] = []
        self.shut = False

    def on_applied(self, applied: Applied) -> None:
        self.steps.append(applied)
        self.seen.extend(applied.positioned())
        self.live.append(applied.live)

    def shutdown(self, timeout: float | None = None) -> None:
        self.shut = True


class Raising(Sink):
    """A sink whose every call raises."""

    name = "raising"

    def on_applied(self, applied: Applied) -> None:
        raise RuntimeError("sink bug")

    def force_flush(self, timeout: float | None = None) -> bool:
        raise RuntimeError("sink bug")

    def shutdown(self, timeout: float | None = None) -> None:
        raise RuntimeError("sink bug")


class Delivering(Sink):
    """Holds each completed job until :meth:`force_flush` delivers it; refuses ``failures``
    times first (a collector that is down). Its state: what it delivered."""

    name = "delivering"

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.pending: list[tuple[Position, str]] = []
        self.delivered: list[str] = []
        self.tries = 0

    def on_applied(self, applied: Applied) -> None:
        for position, event in applied.positioned():
            if isinstance(event, JobCompleted):
                self.pending.append((position, event.job))

    def pending_since(self) -> Position | None:
        return self.pending[0][0] if self.pending else None

    def force_flush(self, timeout: float | None = None) -> bool:
        if not self.pending:
            return True
        self.tries += 1
        if self.failures > 0:
            self.failures -= 1
            return False
        self.delivered += [job for _, job in self.pending]
        self.pending.clear()
        return True

    def snapshot(self) -> bytes:
        return msgspec.json.encode(self.delivered)

    def restore(self, data: bytes) -> None:
        self.delivered = msgspec.json.decode(data, type=list[str])


def engine() -> ProjectionEngine:
    """An engine with the jobs projection."""
    return ProjectionEngine([JobsProjection()])


def status(runner: ProjectionRunner, job: str) -> str:
    """A job's status in the runner's jobs projection."""
    jobs: JobsState = runner.engine.states["jobs"]
    return jobs.jobs[job].status


class TestSinks:
    def test_sinks_get_the_fresh_events_with_their_positions(self) -> None:
        """Each sink is told every new event once, at its log position; duplicates are not."""
        log = AppendLog()
        log.append(a_job("a"))
        log.append(a_job("a")[2:4] + a_job("b"))  # a redelivery, then a new job
        sink = Recording()
        runner = ProjectionRunner(log, engine(), sinks=[sink])
        assert len(a_job("a")) + len(a_job("b")) == runner.catch_up()
        positions = [p for p, _ in sink.seen]
        expected = list(range(len(a_job("a")))) + [
            len(a_job("a")) + 2 + i for i in range(len(a_job("b")))]
        assert expected == positions
        assert a_job("a") + a_job("b") == [e for _, e in sink.seen]
        assert {False} == set(sink.live)  # catching up, not following

    def test_each_step_says_which_types_it_holds_and_its_newest_time(self) -> None:
        """``kinds`` and ``newest_ts`` (what the engine's one pass found) are those of the
        step's new events, duplicates left out: a sink may skip a step by them."""
        log = AppendLog()
        log.append(a_job("a"))
        log.append(a_job("a")[2:4] + a_job("b")[:3])  # a redelivery, then b's first three
        sink = Recording()
        ProjectionRunner(log, engine(), sinks=[sink]).catch_up()
        assert len(sink.steps) == 2
        for step in sink.steps:
            assert step.kinds == frozenset(map(type, step.events))
            assert step.newest_ts == max(event.ts for event in step.events)
        assert sink.steps[1].events == a_job("b")[:3]

    def test_a_sink_that_raises_is_isolated(self, tmp_path: Path) -> None:
        """A raising sink is counted and logged; the projections and other sinks carry on."""
        log = AppendLog()
        log.append(a_job("a"))
        log.append(a_job("b"))
        recording = Recording()
        runner = ProjectionRunner(log, engine(), CheckpointStore(tmp_path / "r.ckpt"),
                                  sinks=[Raising(), recording])
        runner.catch_up()
        assert ("completed", "completed") == (status(runner, "a"), status(runner, "b"))
        assert a_job("a") + a_job("b") == [e for _, e in recording.seen]
        assert {"raising": 2} == runner.sink_errors
        runner.shutdown()
        assert recording.shut
        assert {"raising": 4} == runner.sink_errors  # force_flush and shutdown raised too
        assert (tmp_path / "r.ckpt").exists()

    def test_a_sink_sees_the_state_just_before_the_events_it_cuts_at(self) -> None:
        """``cut_before``: the runner applies a batch in pieces that end before those events."""

        class BeforeTheEnd(Sink):
            name = "before"
            cut_before = frozenset({JobCompleted})

            def __init__(self) -> None:
                self.statuses: list[str | None] = []

            def on_applied(self, applied: Applied) -> None:
                jobs: JobsState = applied.engine.states["jobs"]
                view = jobs.jobs.get("a")
                self.statuses.append(view.status if view is not None else None)

        log = MemoryLog()
        log.append(a_job("a"))
        sink = BeforeTheEnd()
        ProjectionRunner(log, engine(), sinks=[sink]).catch_up()
        assert ["running", "completed"] == sink.statuses

    def test_positions_skip_duplicates_inside_a_batch(self) -> None:
        """Applied.positioned() pairs each new event with its own position."""
        job = a_job("a")
        log = MemoryLog()
        log.append(job[:3] + job[1:2] + job[3:])  # seq 1 twice, at position 3
        sink = Recording()
        ProjectionRunner(log, engine(), sinks=[sink]).catch_up()
        assert [0, 1, 2, *range(4, len(job) + 1)] == [p for p, _ in sink.seen]

    def test_quarantined_regions_are_told(self) -> None:
        """A damaged region is counted by the engine and reported to sinks, with no events."""

        class Damaged(MemoryLog):
            def read(self, start: Position = 0) -> Iterator[ReadItem]:
                if start <= 0:
                    yield Quarantined(first=0, count=2, next=2, where="test", reason="bad")

        sink = Recording()
        runner = ProjectionRunner(Damaged(), engine(), sinks=[sink])
        runner.catch_up()
        assert (2, 2) == (runner.engine.position, runner.engine.health.quarantined_records)
        assert [2] == [s.next for s in sink.steps]
        assert sink.steps[0].quarantined is not None and [] == sink.steps[0].events

    def test_sink_names_are_unique(self) -> None:
        """Two sinks of one name would share a checkpoint entry: refused."""
        runner = ProjectionRunner(MemoryLog(), engine(), sinks=[Recording()])
        with pytest.raises(ValueError, match="recording"):
            runner.add_sink(Recording())


class TestCheckpoints:
    def test_every_interval_and_at_the_end_of_a_pass(self, tmp_path: Path) -> None:
        """With a zero interval every step checkpoints; with a long one, only the pass's end."""
        for interval, expected in ((0.0, 3), (3600.0, 1)):
            log = AppendLog()
            for job in ("a", "b", "c"):
                log.append(a_job(job))
            runner = ProjectionRunner(log, engine(), CheckpointStore(tmp_path / f"{interval}"),
                                      checkpoint_interval=interval)
            runner.catch_up()
            assert expected == runner.checkpoints_written

    def test_nothing_new_writes_nothing(self, tmp_path: Path) -> None:
        """A checkpoint is written only when the position moved."""
        log = MemoryLog()
        log.append(a_job("a"))
        runner = ProjectionRunner(log, engine(), CheckpointStore(tmp_path / "r.ckpt"))
        runner.catch_up()
        runner.catch_up()
        assert 1 == runner.checkpoints_written

    def test_a_sink_holding_work_holds_the_checkpoint_and_the_reading(
        self, tmp_path: Path
    ) -> None:
        """Pending work: no checkpoint past it, and a non-blocking pass stops reading after
        the step; once the sink delivers, the runner checkpoints at once and reads on."""
        log = AppendLog()
        for job in ("a", "b", "c"):
            log.append(a_job(job))
        store = CheckpointStore(tmp_path / "r.ckpt")
        sink = Delivering(failures=1)
        runner = ProjectionRunner(log, engine(), store, sinks=[sink],
                                  checkpoint_interval=3600.0)
        runner.catch_up()
        assert (len(a_job("a")), 0, None) == (runner.engine.position, sink.tries - 1,
                                              store.load())
        assert len(a_job("a")) - 1 == runner.held_back()  # where a's JobCompleted is
        runner.catch_up()
        assert (["a", "b", "c"], None) == (sink.delivered, runner.held_back())
        assert 3 * len(a_job("a")) == runner.engine.position
        # Checkpointed on each acknowledgement (a, b, c), not every interval.
        assert 3 == runner.checkpoints_written

    def test_restart_resumes_without_double_counting(self, tmp_path: Path) -> None:
        """A runner restarted from its checkpoint applies and tells only what is new, and ends
        where a fresh full replay does; a sink's state comes back with it."""
        log = LocalLog(tmp_path / "log")
        store = CheckpointStore(tmp_path / "log" / "checkpoints" / "jobs.ckpt")
        log.append(a_job("a"))
        first_sink = Delivering()
        first = ProjectionRunner(log, engine(), store, sinks=[first_sink])
        assert len(a_job("a")) == first.catch_up()

        log.append(a_job("b", fail_at=1))
        log.append(a_job("c"))
        sink, recording = Delivering(), Recording()
        second = ProjectionRunner(log, engine(), store, sinks=[sink, recording])
        assert ["a"] == sink.delivered  # restored
        assert len(a_job("b", fail_at=1)) + len(a_job("c")) == second.catch_up()
        assert a_job("b", fail_at=1) + a_job("c") == [e for _, e in recording.seen]
        assert ["a", "c"] == sink.delivered

        fresh = engine()
        fresh.apply_items(log.read())
        assert fresh.snapshot() == second.engine.snapshot()

    def test_checkpoint_of_other_projections_is_ignored(self, tmp_path: Path) -> None:
        """A checkpoint written for another projection set leads to a full replay."""
        log = MemoryLog()
        log.append(a_job("a"))
        store = CheckpointStore(tmp_path / "x.ckpt")
        ProjectionRunner(log, ProjectionEngine([Exploding()]), store).catch_up()
        runner = ProjectionRunner(log, engine(), store)
        assert 0 == runner.engine.position
        runner.catch_up()
        assert "completed" == status(runner, "a")

    def test_a_bare_engine_snapshot_still_restores(self, tmp_path: Path) -> None:
        """A checkpoint written before runners had sinks (the engine's snapshot alone)."""
        log = MemoryLog()
        log.append(a_job("a"))
        done = engine()
        done.apply_items(log.read())
        store = CheckpointStore(tmp_path / "old.ckpt")
        store.save(done.snapshot())
        assert len(a_job("a")) == ProjectionRunner(log, engine(), store).engine.position

    def test_a_state_msgpack_cannot_hold_does_not_stop_the_runner(self, tmp_path: Path) -> None:
        """A stage that claims to have lasted 292 years makes an integer past 64 bits: the
        checkpoint is skipped with a warning, and the projections keep folding."""
        from telemetry.events import StageEnded

        log = MemoryLog()
        runner = ProjectionRunner(log, engine(), CheckpointStore(tmp_path / "jobs.ckpt"))
        log.append([StageEnded(job="a", seq=0, ts=0, stage="decode", duration_s=9.3e9)])
        runner.catch_up()
        assert not (tmp_path / "jobs.ckpt").exists()
        log.append(a_job("b"))
        runner.catch_up()
        assert "completed" == status(runner, "b")


class TestFollowing:
    def test_catch_up_then_follow_live_then_stop(self, tmp_path: Path) -> None:
        """The thread catches up (not live), sets caught_up, follows (live), and on stop
        writes its checkpoint; a sink that holds work back pauses it until it delivers."""
        log = LocalLog(tmp_path / "log")
        log.append(a_job("a"))
        store = CheckpointStore(tmp_path / "r.ckpt")
        recording, delivering = Recording(), Delivering(failures=3)
        runner = ProjectionRunner(log, engine(), store, sinks=[recording, delivering],
                                  poll_interval=0.005, retry_backoff=(0.01, 0.02))
        runner.start()
        try:
            assert runner.caught_up.wait(10)
            assert (["a"], 4) == (delivering.delivered, delivering.tries)  # 3 refusals
            log.append(a_job("b"))
            wait_for(lambda: delivering.delivered == ["a", "b"], "b delivered")
            assert runner.running
        finally:
            assert runner.stop(10)
        assert [False, True] == sorted(set(recording.live))
        assert recording.live.index(True) > 0
        saved: dict[str, Any] = msgspec.msgpack.decode(store.load() or b"")
        assert {"delivering"} == set(saved["sinks"])
        assert 2 * len(a_job("a")) == ProjectionRunner(log, engine(), store).engine.position

    def test_stop_interrupts_a_sink_that_never_delivers(self, tmp_path: Path) -> None:
        """A collector that never comes back does not keep the process from stopping, and
        nothing is checkpointed past the undelivered work."""
        log = MemoryLog()
        log.append(a_job("a"))
        store = CheckpointStore(tmp_path / "r.ckpt")
        runner = ProjectionRunner(log, engine(), store, sinks=[Delivering(failures=10**9)],
                                  retry_backoff=(0.01, 0.01))
        stop = threading.Event()
        thread = threading.Thread(target=runner.follow, args=(stop,))
        thread.start()
        wait_for(lambda: runner.held_back() is not None, "held back")
        stop.set()
        thread.join(10)
        assert not thread.is_alive()
        assert store.load() is None
        assert not runner.caught_up.is_set()

    def test_a_step_of_one_event_per_item(self) -> None:
        """Following applies each appended event as it comes (here: one per append)."""
        log = AppendLog()
        sink = Recording()
        runner = ProjectionRunner(log, engine(), sinks=[sink], poll_interval=0.005)
        runner.start()
        try:
            assert runner.caught_up.wait(10)
            for event in a_job("a")[:3]:
                log.append([event])
            wait_for(lambda: len(sink.seen) == 3, "three steps")
        finally:
            runner.stop()
        assert [1, 1, 1] == [len(s.events) for s in sink.steps]
        assert a_job("a")[:3] == [e for _, e in sink.seen]
