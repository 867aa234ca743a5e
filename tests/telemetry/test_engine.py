"""The projection engine: determinism, de-duplication, isolation, snapshots and checkpoint files."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telemetry.engine import CheckpointStore, ProjectionEngine
from telemetry.events import (
    DeviceInfo,
    Event,
    JobCompleted,
    JobFailed,
    JobStarted,
    MemorySampled,
    StageEnded,
    StageProgress,
    StageStarted,
    StepEnded,
)
from telemetry.log.base import Batch, Quarantined
from telemetry.projections.base import OnFailure, Projection
from telemetry.projections.jobs import JobsProjection, JobsState, stage_pieces

SECOND = 1_000_000_000


def step_ts(i: int) -> int:
    """When step ``i`` of a test job ends: steps of 0.25 s from t = 2 s."""
    return 2 * SECOND + (i + 1) * SECOND // 4


def started(job: str, seq: int = 0, steps: int = 4) -> JobStarted:
    """A JobStarted of a tiny CPU job."""
    return JobStarted(job=job, seq=seq, ts=SECOND, model="tiny-t2v", family="wan2.1",
                      variant="tiny-t2v", task="t2v", width=32, height=32, num_frames=9,
                      steps=steps, guidance_scale=5.0, cfg=True,
                      device=DeviceInfo(kind="cpu", name="cpu"))


def a_job(job: str, steps: int = 4, *, fail_at: int | None = None) -> list[Event]:
    """A whole job's events with consecutive seqs; it fails at ``fail_at`` if given."""
    events: list[Event] = [started(job, steps=steps),
                           StageStarted(job=job, seq=1, ts=2 * SECOND, stage="denoise")]
    for i in range(steps):
        if fail_at == i:
            events.append(JobFailed(job=job, seq=len(events), ts=step_ts(i), duration_s=1.0,
                                    stage="denoise", step=i, error_type="RuntimeError",
                                    message="boom"))
            return events
        events.append(StepEnded(job=job, seq=len(events), ts=step_ts(i), step=i,
                                total_steps=steps, timestep=float(1000 - i), duration_s=0.25))
    events.append(StageEnded(job=job, seq=len(events), ts=step_ts(steps - 1), stage="denoise",
                             duration_s=steps * 0.25))
    events.append(JobCompleted(job=job, seq=len(events), ts=step_ts(steps) + SECOND // 2,
                               duration_s=(step_ts(steps) + SECOND // 2 - SECOND) / 1e9))
    return events


class Exploding:
    """A projection that raises on every StepEnded, to prove isolation."""

    name = "exploding"
    version = 1
    state_type = int

    def initial(self) -> int:
        return 0

    def apply(self, state: int, event: Event) -> int:
        if isinstance(event, StepEnded):
            raise ZeroDivisionError("by design")
        return state + 1


class BatchFold:
    """A test fold written only as ``apply_many``; ``apply`` is a batch of one."""

    def apply_many(self, state: Any, events: Sequence[Event], failed: OnFailure) -> Any:
        raise NotImplementedError

    def apply(self, state: Any, event: Event) -> Any:
        def reraise(event: Event, exc: Exception) -> None:
            raise exc

        return self.apply_many(state, (event,), reraise)


class ExplodingBatch(BatchFold):
    """The same, folding whole batches: a raising event must not end the batch's loop."""

    name = "exploding"
    version = 1
    state_type = int

    def initial(self) -> int:
        return 0

    def apply_many(self, state: int, events: Sequence[Event], failed: OnFailure) -> int:
        for event in events:
            try:
                if isinstance(event, StepEnded):
                    raise ZeroDivisionError("by design")
                state += 1
            except Exception as exc:
                failed(event, exc)
        return state


def engine() -> ProjectionEngine:
    """An engine with the jobs projection."""
    return ProjectionEngine([JobsProjection()])


def jobs(e: ProjectionEngine) -> JobsState:
    """The jobs projection's state."""
    state: JobsState = e.states["jobs"]
    return state


@st.composite
def delivered_logs(draw: st.DrawFn) -> list[Event]:
    """Interleaved jobs as a log delivers them: at-least-once, so some events repeat."""
    streams = [
        a_job(f"job-{k}", draw(st.integers(1, 6)), fail_at=draw(st.none() | st.integers(0, 5)))
        for k in range(draw(st.integers(1, 4)))
    ]
    out: list[Event] = []
    while any(streams):
        stream = draw(st.sampled_from([s for s in streams if s]))
        out.append(stream.pop(0))
        if draw(st.integers(0, 9)) == 0:
            out.append(draw(st.sampled_from(out)))  # a redelivery of something already seen
    return out


def assert_pieces_equal_whole(make: Callable[[], ProjectionEngine], events: list[Event],
                              cuts: list[int]) -> None:
    """Folding in pieces, restarting from a snapshot between them, gives the one-go bytes."""
    whole = make()
    whole.apply_batch(Batch(0, events))
    pieces = make()
    bounds = sorted({min(c, len(events)) for c in cuts} | {0, len(events)})
    for lo, hi in itertools.pairwise(bounds):
        restarted = make()
        assert restarted.restore(pieces.snapshot())
        restarted.apply_batch(Batch(lo, events[lo:hi]))
        pieces = restarted
    assert whole.snapshot() == pieces.snapshot()


class TestDeterminism:
    @settings(max_examples=60, deadline=None)
    @given(events=delivered_logs(), cuts=st.lists(st.integers(0, 200), max_size=5))
    def test_incremental_with_restarts_equals_one_replay(
        self, events: list[Event], cuts: list[int]
    ) -> None:
        """Applying in pieces, snapshotting and restoring between them, gives identical bytes."""
        assert_pieces_equal_whole(engine, events, cuts)

    def test_replay_never_reads_the_clock(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Projections take time from events: with every clock broken, replay still works."""
        def broken() -> float:
            raise AssertionError("a projection read the clock")

        for name in ("time", "time_ns", "monotonic", "monotonic_ns", "perf_counter"):
            monkeypatch.setattr(time, name, broken)
        e = engine()
        e.apply_batch(Batch(0, a_job("a") + a_job("b", fail_at=2)))
        assert ["completed", "failed"] == [v.status for v in jobs(e).jobs.values()]


class TestDeduplication:
    def test_redelivered_events_are_applied_once(self) -> None:
        """An event seen again (same job and seq) is skipped and counted."""
        events = a_job("a")
        e = engine()
        e.apply_batch(Batch(0, events))
        e.apply_batch(Batch(len(events), events[2:5]))
        assert 4 == jobs(e).jobs["a"].steps_done
        assert 3 == e.health.duplicates

    def test_positions_already_applied_are_skipped(self) -> None:
        """Re-reading from an earlier position does not double count."""
        events = a_job("a")
        e = engine()
        e.apply_batch(Batch(0, events))
        e.apply_batch(Batch(0, events))
        assert 0 == e.health.duplicates
        assert len(events) == sum(e.health.events_by_type.values())

    def test_quarantined_records_are_counted_and_passed(self) -> None:
        """A quarantine notice moves the position on and is counted."""
        e = engine()
        e.apply_quarantined(Quarantined(0, 3, 3, "segment x offset 0", "checksum"))
        assert (3, 3, 1) == (e.position, e.health.quarantined_records,
                             e.health.quarantined_regions)


class Recorder(BatchFold):
    """Records the batches it is handed: it reads steps and skips memory samples itself."""

    name = "recorder"
    version = 1
    state_type = list
    handles = frozenset({StepEnded})
    passes = frozenset({MemorySampled})

    def initial(self) -> list[list[str]]:
        return []

    def apply_many(self, state: list[list[str]], events: Sequence[Event],
                   failed: OnFailure) -> list[list[str]]:
        state.append([type(event).__name__ for event in events])
        return state


class TestRouting:
    def test_a_fold_gets_its_types_and_those_it_passes_unfiltered(self) -> None:
        """Steps and memory samples arrive whole; a batch with a third type is filtered to
        the types read; a batch with none of them is not handed over."""
        step = StepEnded(job="a", seq=0, ts=1, step=0, total_steps=2)
        sample = MemorySampled(job="a", seq=1, ts=1, device="cpu", host_rss_bytes=1)
        stage = StageEnded(job="a", seq=2, ts=2, stage="denoise", duration_s=1.0)
        e = ProjectionEngine([Recorder()])
        e.apply_batch(Batch(0, [step, sample]))
        e.apply_batch(Batch(2, [stage, msgspec.structs.replace(step, seq=3, step=1)]))
        e.apply_batch(Batch(4, [msgspec.structs.replace(sample, seq=4)]))
        assert [["StepEnded", "MemorySampled"], ["StepEnded"]] == e.states["recorder"]


class TestIsolation:
    @pytest.mark.parametrize("exploding", [Exploding, ExplodingBatch])
    def test_a_raising_projection_does_not_stop_the_others(
        self, exploding: Callable[[], Projection[int]]
    ) -> None:
        """The failure is recorded with its event; the jobs projection still sees everything."""
        e = ProjectionEngine([exploding(), JobsProjection()])
        e.apply_batch(Batch(0, a_job("a")))
        assert "completed" == jobs(e).jobs["a"].status
        assert {"exploding": 4} == e.health.projection_errors
        failure = e.health.recent_failures[0]
        assert ("StepEnded", "a", 2, 2) == (failure.event_type, failure.job, failure.seq,
                                            failure.position)
        assert "ZeroDivisionError" in failure.error
        assert 4 == e.states["exploding"]

    def test_duplicate_projection_names_are_refused(self) -> None:
        """Two projections cannot share a name (their states would collide)."""
        with pytest.raises(ValueError, match="unique"):
            ProjectionEngine([JobsProjection(), JobsProjection()])


class TestJobsProjection:
    def test_completed_job(self) -> None:
        """A finished job has its status, steps, stage timeline and steps/s."""
        e = engine()
        e.apply_batch(Batch(0, a_job("a", steps=4)))
        view = jobs(e).jobs["a"]
        assert ("completed", 4, 4, None) == (view.status, view.steps_done, view.total_steps,
                                             view.stage)
        assert {"denoise": 1.0} == view.stage_durations()
        assert 4.0 == view.steps_per_second
        assert 2.75 == view.duration_s

    def test_running_job_shows_its_current_stage(self) -> None:
        """Mid-denoise, the job is running in stage denoise with the steps seen so far."""
        e = engine()
        e.apply_batch(Batch(0, a_job("a", steps=4)[:4]))
        view = jobs(e).jobs["a"]
        assert ("running", "denoise", 2) == (view.status, view.stage, view.steps_done)

    def test_a_decode_shows_its_pieces_while_it_runs(self) -> None:
        """Mid-decode the job is in stage decode at its newest piece (a late, lower report
        never lowers it; each is a sign of life); once the decode ends the job is in no
        stage, and the decode's span keeps its pieces."""
        e = engine()
        job = a_job("a", steps=4)[:-1]  # all but its completion
        at = job[-1].ts
        seq = len(job)
        decode: list[Event] = [StageStarted(job="a", seq=seq, ts=at + 1, stage="decode")]
        decode += [StageProgress(job="a", seq=seq + k, ts=at + 1 + k, stage="decode",
                                 done=done, total=5)
                   for k, done in enumerate((1, 3, 2), start=1)]
        e.apply_batch(Batch(0, [*job, *decode]))
        view = jobs(e).jobs["a"]
        assert ("decode", (3, 5), at + 4) == (view.stage, stage_pieces(view), view.last_ts)
        e.apply_batch(Batch(seq + 4, [StageEnded(job="a", seq=seq + 4, ts=at + 9,
                                                 stage="decode", duration_s=1.0)]))
        view = jobs(e).jobs["a"]
        assert (None, None) == (view.stage, stage_pieces(view))
        assert (3, 5) == (view.stages[-1].pieces_done, view.stages[-1].pieces_total)

    def test_failed_job_keeps_the_error(self) -> None:
        """A failure records its type, message and step."""
        e = engine()
        e.apply_batch(Batch(0, a_job("a", fail_at=2)))
        view = jobs(e).jobs["a"]
        assert ("failed", "RuntimeError", "boom", 2) == (
            view.status, view.error_type, view.error_message, view.failed_step)


class TestCheckpoints:
    """The runner's own tests are in ``test_runner.py``."""

    def test_checkpoint_is_replaced_atomically(self, tmp_path: Path) -> None:
        """Saving leaves exactly the checkpoint file, no temporary files."""
        store = CheckpointStore(tmp_path / "c" / "jobs.ckpt")
        store.save(b"one")
        store.save(b"two")
        assert b"two" == store.load()
        assert ["jobs.ckpt"] == [p.name for p in (tmp_path / "c").iterdir()]

    def test_snapshot_is_plain_msgpack(self) -> None:
        """Snapshots decode with any msgpack reader (no pickles)."""
        e = engine()
        e.apply_batch(Batch(0, a_job("a")))
        decoded: dict[str, Any] = msgspec.msgpack.decode(e.snapshot())
        assert decoded["position"] == len(a_job("a"))
