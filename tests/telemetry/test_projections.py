"""The projections of issue 4: ETA and residuals, throughput, memory, workers, health."""

from __future__ import annotations

import contextlib
import itertools
import time

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telemetry import engine as engine_module
from telemetry.engine import ProjectionEngine
from telemetry.events import (
    EVENT_TYPES,
    EtaCalibrated,
    Event,
    EventsDropped,
    JobCompleted,
    MemorySampled,
    StageEnded,
    StageStarted,
    StepEnded,
    WorkerHeartbeat,
)
from telemetry.log.base import Batch
from telemetry.projections import default_projections
from telemetry.projections.base import as_batch_projection, bounded_insert
from telemetry.projections.eta import EtaState, current
from telemetry.projections.jobs import JobsProjection, JobsState

from .strategies import event_of
from .test_engine import a_job, assert_pieces_equal_whole, delivered_logs, started


def engine() -> ProjectionEngine:
    """Every shipped projection."""
    return ProjectionEngine(default_projections())


def fold(events: list[Event]) -> ProjectionEngine:
    """An engine after ``events``."""
    e = engine()
    e.apply_batch(Batch(0, events))
    return e


class TestDeterminism:
    @settings(max_examples=40, deadline=None)
    @given(events=delivered_logs(), cuts=st.lists(st.integers(0, 200), max_size=4))
    def test_every_projection_replays_equal_to_incremental(
        self, events: list[Event], cuts: list[int]
    ) -> None:
        """With all projections, pieces with snapshot/restore give the one-go bytes."""
        assert_pieces_equal_whole(engine, events, cuts)

    @settings(max_examples=60, deadline=None)
    @given(jobs=delivered_logs(), extra=st.lists(st.tuples(st.integers(0, 10**4), st.one_of(
        [event_of(cls) for cls in EVENT_TYPES])), max_size=12),
        cuts=st.lists(st.integers(0, 200), max_size=4))
    def test_a_batch_folds_exactly_as_its_events_one_by_one(
        self, jobs: list[Event], extra: list[tuple[int, Event]], cuts: list[int]
    ) -> None:
        """apply_many over any split of a stream = apply per event: same bytes, same failures.

        Arbitrary events of every type (some that a fold may reject) are mixed into realistic
        job streams, so the error path is compared too.
        """
        events = list(jobs)
        for where, event in extra:
            events.insert(where % (len(events) + 1), event)
        bounds = sorted({min(c, len(events)) for c in cuts} | {0, len(events)})
        for one_by_one, batched in zip(default_projections(), default_projections(),
                                       strict=True):
            state, raised = one_by_one.initial(), []
            for index, event in enumerate(events):
                try:
                    state = one_by_one.apply(state, event)
                except Exception as exc:
                    raised.append((index, type(exc)))
            fold = as_batch_projection(batched)
            batch_state, reported = batched.initial(), []
            for lo, hi in itertools.pairwise(bounds):
                piece = events[lo:hi]
                batch_state = fold.apply_many(
                    batch_state, piece,
                    lambda event, exc, piece=piece, lo=lo, reported=reported: reported.append(
                        (lo + next(i for i, e in enumerate(piece) if e is event), type(exc))))
            assert raised == reported, one_by_one.name
            # repr of builtins, not msgpack: arbitrary events can push ints past 64 bits.
            assert repr(msgspec.to_builtins(state)) == repr(msgspec.to_builtins(batch_state)), \
                one_by_one.name

    def test_no_projection_reads_the_clock(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """All time comes from events: with the clocks broken, every projection still folds."""
        def broken() -> float:
            raise AssertionError("a projection read the clock")

        for name in ("time", "time_ns", "monotonic", "monotonic_ns", "perf_counter",
                     "perf_counter_ns"):
            monkeypatch.setattr(time, name, broken)
        e = fold(a_job("a") + a_job("b", fail_at=2))
        assert {} == e.health.projection_errors

    def test_a_failing_event_still_moves_the_jobs_clock_in_a_batch_as_alone(self) -> None:
        """A stage end whose start must be rebuilt from an absurd duration raises; its time
        still counts, whether it failed alone (a batch of one re-raises) or inside a batch."""
        absurd = StageEnded(job="a", seq=2, ts=3 * 10**9, stage="save", duration_s=1.8e299)
        events = [*a_job("a")[:2], absurd, JobCompleted(job="a", seq=3, ts=10, duration_s=1.0)]
        alone, batched = JobsProjection(), JobsProjection()
        state = alone.initial()
        for event in events:
            with contextlib.suppress(OverflowError):
                state = alone.apply(state, event)
        failures: list[Event] = []
        batch_state = batched.apply_many(batched.initial(), events,
                                         lambda event, exc: failures.append(event))
        assert [absurd] == failures
        assert 3 * 10**9 == state.now_ts == batch_state.now_ts


class TestEta:
    def test_an_eta_with_nothing_left_survives_a_checkpoint_byte_for_byte(self) -> None:
        """Every phase done, the job not yet completed: the ETA is 0.0 s — a float, so a
        checkpoint round trip gives the same bytes (an integer 0 would come back as 0.0)."""
        events: list[Event] = [started("a")]
        for stage in ("text_encode", "latent_init", "denoise", "decode", "postprocess"):
            ts = events[-1].ts + 10**8
            events += [StageStarted(job="a", seq=len(events), ts=ts, stage=stage),
                       StageEnded(job="a", seq=len(events) + 1, ts=ts + 10**8, stage=stage,
                                  duration_s=0.1)]
        e = fold(events)
        point = current(e.states["eta"], "a")
        assert point is not None and 0.0 == point.remaining_s
        assert isinstance(point.remaining_s, float)
        restored = engine()
        assert restored.restore(e.snapshot())
        assert e.snapshot() == restored.snapshot()

    def test_running_job_has_an_eta_with_an_interval(self) -> None:
        """Mid-denoise: remaining seconds inside a p10–p90 interval; progress in (0, 1)."""
        e = fold(a_job("a", steps=8)[:6])
        point = current(e.states["eta"], "a")
        assert point is not None
        assert 0 < point.p10_s <= point.remaining_s <= point.p90_s
        assert 0 < point.progress < 1
        assert not point.estimating  # four steps seen

    def test_completion_scores_every_issued_eta(self) -> None:
        """At completion the ETAs become residuals by progress bucket; the running entry goes."""
        e = fold(a_job("a", steps=8))
        state: EtaState = e.states["eta"]
        assert "a" not in state.running
        finished = state.finished["a"]
        assert finished.before_start_error is not None
        assert finished.residuals
        issued = 1 + 2 + 8 + 1  # start, stage start/end, steps, (completion scores them)
        counted = sum(h.total for h in state.residuals["tiny-t2v"].values())
        counted += state.before_start["tiny-t2v"].total
        assert issued - 1 <= counted <= issued

    def test_failed_jobs_are_not_scored(self) -> None:
        """A failed job leaves no residuals (there is no actual duration to compare with)."""
        e = fold(a_job("a", fail_at=2))
        state: EtaState = e.states["eta"]
        assert {} == state.residuals and "a" not in state.finished

    def test_calibration_applies_to_jobs_started_after_it(self) -> None:
        """An EtaCalibrated event changes the prior of later jobs only."""
        first = a_job("a")
        calibration = EtaCalibrated(job="wantel/eta", seq=0, ts=500,
                                    coefficients={"step|dit-tiny|cpu": (10.0, 0.0, 0.0)})
        later = a_job("b")
        e = fold(first[:3] + [calibration] + later[:3])
        state: EtaState = e.states["eta"]
        assert state.running["a"].live.step_prior < 1
        assert state.running["b"].live.step_prior == pytest.approx(20.0)  # 2 passes × 10 s


class TestThroughputAndMemory:
    def test_steps_per_second(self) -> None:
        """0.25 s steps are 4 steps/s, for the job and its model."""
        e = fold(a_job("a", steps=6)[:7])
        throughput = e.states["throughput"]
        assert 4.0 == pytest.approx(throughput.jobs["a"].ema)
        assert (5, 4.0) == (throughput.models["tiny-t2v"].steps,
                            pytest.approx(throughput.models["tiny-t2v"].ema))

    def test_peaks_by_kind_stage_and_device(self) -> None:
        """Peaks rise by kind and by stage; the device keeps its latest and highest reading."""
        events = a_job("a")[:2] + [
            MemorySampled(job="a", seq=2, ts=2_500, device="cuda:0", stage="text_encode",
                          allocated_bytes=100, reserved_bytes=200, peak_allocated_bytes=150),
            MemorySampled(job="a", seq=3, ts=2_600, device="cuda:0", step=0,
                          allocated_bytes=300, reserved_bytes=400, peak_allocated_bytes=350,
                          device_used_bytes=900, device_total_bytes=1000),
        ]
        memory = fold(events).states["memory"]
        job = memory.running["a"]
        assert {"torch_allocated": 350, "torch_reserved": 400, "device": 900} == job.peaks
        assert {"text_encode": 200} == job.stage_peaks
        assert (900, 1000) == (memory.devices["cuda:0"].used["nvml"],
                               memory.devices["cuda:0"].total)


class TestWorkersAndHealth:
    def test_silent_workers_jobs_become_abandoned(self) -> None:
        """A running job whose worker is silent past the timeout (in event time) is abandoned."""
        job = [e for e in a_job("a")[:4]]
        job = [type(e)(**{**{f: getattr(e, f) for f in e.__struct_fields__}, "worker": "w1"})
               for e in job]
        heartbeats = [WorkerHeartbeat(job="worker/w2", seq=i, ts=10_000 + i * 30 * 10**9,
                                      worker="w2", host="h", pid=1) for i in range(4)]
        e = ProjectionEngine([JobsProjection(abandon_after_s=60)])
        e.apply_batch(Batch(0, job + heartbeats))
        state: JobsState = e.states["jobs"]
        assert "abandoned" == state.jobs["a"].status
        assert ["w2"] == [w.worker for w in state.alive_workers(60)]

    def test_drops_are_summed_over_workers(self) -> None:
        """Each worker's latest cumulative report counts once."""
        reports = [
            EventsDropped(job="worker/a", seq=0, ts=1, worker="a", counts={"queue_full_sample": 2}),
            EventsDropped(job="worker/a", seq=1, ts=2, worker="a", counts={"queue_full_sample": 5}),
            EventsDropped(job="worker/b", seq=0, ts=3, worker="b",
                          counts={"queue_full_sample": 1, "log_unavailable": 4}),
        ]
        health = fold(reports).states["health"]
        assert {"queue_full_sample": 6, "log_unavailable": 4} == health.dropped()

    def test_a_job_id_run_again_is_live_again(self) -> None:
        """Bounding ended jobs never forgets a job that is running again under the same id."""
        later = 100 * 10**9

        def shifted(events: list[Event], by: int) -> list[Event]:
            return [msgspec.structs.replace(e, seq=e.seq + by, ts=e.ts + by * later)
                    for e in events]

        first = a_job("a")
        again = shifted(a_job("a")[:2], len(first))  # started again, then silence
        other = shifted(a_job("b"), 1)
        projection = JobsProjection(keep_finished=1)
        state = projection.initial()
        for event in first + again + other:
            state = projection.apply(state, event)
        assert "running" == state.jobs["a"].status
        assert ["a"] == list(state.active)
        assert ["b"] == list(state.finished)

    def test_finished_jobs_are_bounded_when_asked(self) -> None:
        """A server keeps only the newest ended jobs; memory stays flat."""
        e = ProjectionEngine([JobsProjection(keep_finished=2)])
        for k in range(5):
            e.apply_batch(Batch(e.position, a_job(f"j{k}")))
        assert ["j3", "j4"] == list(e.states["jobs"].jobs)

    def test_bounded_tables_evict_alike_across_a_restart(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Every bounded table (ended jobs in each projection, the engine's seq table) keeps
        the same newest entries whether or not the engine was restored from a snapshot midway
        (a restored table is a dict, a live one may have become an OrderedDict)."""
        monkeypatch.setattr(engine_module, "KEEP_SEQ_OF_FINISHED", 3)
        batches = [a_job(f"j{k}") for k in range(9)]
        straight = ProjectionEngine(default_projections(keep_finished=2))
        for events in batches:
            straight.apply_batch(Batch(straight.position, events))
        restarted = ProjectionEngine(default_projections(keep_finished=2))
        for k, events in enumerate(batches):
            if k in (3, 6):
                snapshot = restarted.snapshot()
                restarted = ProjectionEngine(default_projections(keep_finished=2))
                assert restarted.restore(snapshot)
            restarted.apply_batch(Batch(restarted.position, events))
        assert restarted.snapshot() == straight.snapshot()
        assert ["j7", "j8"] == list(straight.states["jobs"].jobs)
        assert ["j6", "j7", "j8"] == list(straight.finished_jobs) == list(straight.last_seq)


def test_bounded_insert_keeps_the_newest_entries_in_order() -> None:
    """Under the bound the table itself goes on; past it, the newest ``limit`` entries in
    insertion order, in a table whose oldest entry later inserts drop one by one."""
    table: dict[str, int] = {"a": 1}
    assert bounded_insert(table, "b", 2, limit=3) is table
    table = bounded_insert(table, "c", 3, limit=3)
    table = bounded_insert(table, "d", 4, limit=3)
    assert list(table.items()) == [("b", 2), ("c", 3), ("d", 4)]
    table["c"] = 30  # replacing a value keeps its place
    table = bounded_insert(table, "e", 5, limit=3)
    assert list(table.items()) == [("c", 30), ("d", 4), ("e", 5)]
    assert msgspec.msgpack.encode(table) == msgspec.msgpack.encode(dict(table))


def test_completed_events_carry_no_clock_dependence() -> None:
    """Two replays of the same events give the same ETA residuals, byte for byte."""
    events = a_job("a") + [StepEnded(job="zz", seq=0, ts=1, step=0, total_steps=1)]
    events += [JobCompleted(job="zz", seq=1, ts=2, duration_s=0.1)]
    assert fold(events).snapshot() == fold(events).snapshot()


class TestRateAndPeakFoldsAgainstTheirDefinitions:
    """The throughput fold's fast path (locals, memos) and the memory fold's rules against
    plain definitions."""

    @settings(max_examples=150, deadline=None)
    @given(steps=st.lists(st.tuples(
        st.integers(0, 2),
        st.one_of(st.sampled_from([0.25, 0.25, 2.31, 2.31, 0.5, 0.0, -0.0, None, float("inf"),
                                   float("nan")]), st.floats(0.01, 10.0)),
        st.sampled_from([None, "high_noise", "low_noise"]),
        st.integers(0, 15)), max_size=60), cuts=st.lists(st.integers(0, 70), max_size=5))
    def test_throughput_is_its_definition_over_any_split(
        self, steps: list[tuple[int, float | None, str | None, int]], cuts: list[int]
    ) -> None:
        """Per step of a running job: its and its model's counts, the model's count by
        expert, and for a timed step its rate folded into both moving averages and its time
        into the model's total, in log order."""
        from telemetry.projections.throughput import (
            SMOOTHING,
            JobRate,
            ModelRate,
            ThroughputProjection,
            ThroughputState,
        )

        models = {"a": "m1", "b": "m1", "c": "m2"}
        events: list[Event] = [msgspec.structs.replace(started(job), model=model)
                               for job, model in models.items()]
        expected = ThroughputState(
            jobs={job: JobRate(model=model) for job, model in models.items()},
            models={"m1": ModelRate(), "m2": ModelRate()})
        for t, (which, duration, expert, end) in enumerate(steps, start=1):
            job = "abc"[which]
            if end == 0:  # the job ends here: its later steps are not counted
                events.append(JobCompleted(job=job, seq=t, ts=t, duration_s=1.0))
                expected.jobs.pop(job, None)
                continue
            events.append(StepEnded(job=job, seq=t, ts=t, step=t, total_steps=60,
                                    duration_s=duration, expert=expert))
            rate = expected.jobs.get(job)
            if rate is None:
                continue
            model = expected.models[models[job]]
            rate.steps += 1
            model.steps += 1
            if expert is not None:
                model.expert_steps[expert] = model.expert_steps.get(expert, 0) + 1
            if duration:
                steps_per_s = 1.0 / duration
                rate.ema = steps_per_s if rate.ema is None else (
                    SMOOTHING * steps_per_s + (1 - SMOOTHING) * rate.ema)
                model.ema = steps_per_s if model.ema is None else (
                    SMOOTHING * steps_per_s + (1 - SMOOTHING) * model.ema)
                model.step_seconds += duration
        projection = ThroughputProjection()
        state = projection.initial()
        bounds = sorted({min(c, len(events)) for c in cuts} | {0, len(events)})
        for lo, hi in itertools.pairwise(bounds):
            state = projection.apply_many(state, events[lo:hi], _raise)
        assert repr(msgspec.to_builtins(expected)) == repr(msgspec.to_builtins(state))

    @pytest.mark.parametrize(("current", "peak", "kept"), [
        (None, None, None), (None, 5, 5), (None, 0, None), (None, -3, None), (0, 4, 4),
        (7, None, 7), (7, 9, 9), (9, 7, 9), (-2, None, None), (-2, -5, -2)])
    def test_host_rss_is_the_larger_of_current_and_peak(
        self, current: int | None, peak: int | None, kept: int | None
    ) -> None:
        """A sample's host RSS is max(current, peak), each 0 when missing; 0 is no reading.
        The device keeps it as its latest reading; the job's peak keeps it above 0."""
        from telemetry.projections.memory import MemoryProjection

        sample = MemorySampled(job="a", seq=1, ts=2, device="cpu", host_rss_bytes=current,
                               host_peak_rss_bytes=peak)
        projection = MemoryProjection()
        state = projection.initial()
        for event in (started("a"), sample):
            state = projection.apply(state, event)
        assert kept == state.devices["cpu"].used.get("host_rss")
        assert (kept if kept is not None and kept > 0 else None) == \
            state.running["a"].peaks.get("host_rss")


def _raise(event: Event, exc: Exception) -> None:
    """A fold's ``failed`` where nothing may fail."""
    raise AssertionError(f"{type(event).__name__} raised {exc!r}")


def _on(worker: str, events: list[Event]) -> list[Event]:
    """``events`` as sent by ``worker``."""
    return [type(e)(**{**{f: getattr(e, f) for f in e.__struct_fields__}, "worker": worker})
            for e in events]


class TestWorkerStoppedAndLost:
    """Liveness as events: a clean stop is not a loss; a declared loss abandons, once."""

    def test_a_stopped_worker_is_not_alive_and_its_ended_jobs_stay(self) -> None:
        """WorkerStopped after the worker's job completed: not alive at once (long before the
        timeout), the job stays completed, nothing is abandoned."""
        from telemetry.events import WorkerStopped

        job = _on("w1", a_job("a"))
        beat = WorkerHeartbeat(job="worker/w1", seq=0, ts=job[-1].ts, worker="w1", host="h",
                               pid=1)
        stop = WorkerStopped(job="worker/w1", seq=1, ts=job[-1].ts + 1, worker="w1", host="h",
                             pid=1)
        e = ProjectionEngine([JobsProjection(abandon_after_s=60)])
        e.apply_batch(Batch(0, [*job, beat]))
        assert ["w1"] == [w.worker for w in e.states["jobs"].alive_workers(60)]
        e.apply_batch(Batch(len(job) + 1, [stop]))
        state: JobsState = e.states["jobs"]
        assert [] == state.alive_workers(60)
        assert "completed" == state.jobs["a"].status
        assert ("stopped", None) == (state.workers["w1"].gone, state.jobs["a"].abandon_reason)

    def test_a_worker_stopped_mid_job_abandons_it_at_once(self) -> None:
        """A job still running at its worker's WorkerStopped is abandoned then, ``worker
        stopped``, ended at the stop's time."""
        from telemetry.events import WorkerStopped

        job = _on("w1", a_job("a")[:4])
        stop = WorkerStopped(job="worker/w1", seq=0, ts=job[-1].ts + 5, worker="w1", host="h",
                             pid=1)
        state: JobsState = fold([*job, stop]).states["jobs"]
        view = state.jobs["a"]
        assert ("abandoned", "worker stopped", stop.ts) == (
            view.status, view.abandon_reason, view.ended_ts)
        assert "a" in state.finished and "a" not in state.active

    def test_worker_lost_abandons_running_jobs_once_per_silence(self) -> None:
        """WorkerLost abandons the worker's running jobs (``worker lost``); a duplicate with
        another seq but the same last_seen_ts changes nothing; a later heartbeat makes the
        worker alive again."""
        from telemetry.events import WorkerLost

        job = _on("w1", a_job("a")[:4])
        last = job[-1].ts
        lost = [WorkerLost(job="wantel/lost/w1", seq=n, ts=last + 61 * 10**9 + n, worker="w1",
                           last_seen_ts=last, declared_by=f"agg-{n}") for n in range(2)]
        e = ProjectionEngine([JobsProjection(abandon_after_s=600)])
        e.apply_batch(Batch(0, [*job, lost[0]]))
        state: JobsState = e.states["jobs"]
        view = state.jobs["a"]
        assert ("abandoned", "worker lost") == (view.status, view.abandon_reason)
        assert ("lost", last) == (state.workers["w1"].gone, state.workers["w1"].lost_seen_ts)
        before = msgspec.msgpack.encode((state.jobs, state.workers))
        e.apply_batch(Batch(len(job) + 1, [lost[1]]))
        after: JobsState = e.states["jobs"]
        assert before == msgspec.msgpack.encode((after.jobs, after.workers))
        beat = WorkerHeartbeat(job="worker/w1", seq=0, ts=last + 70 * 10**9, worker="w1",
                               host="h", pid=1)
        e.apply_batch(Batch(len(job) + 2, [beat]))
        assert ["w1"] == [w.worker for w in e.states["jobs"].alive_workers(600)]

    def test_a_declaration_the_log_refutes_is_not_applied(self) -> None:
        """A WorkerLost whose last_seen_ts is older than an event of the worker's running job
        that the log holds before it (the worker spoke since) abandons nothing."""
        from telemetry.events import WorkerLost

        job = _on("w1", a_job("a")[:5])
        stale = WorkerLost(job="wantel/lost/w1", seq=0, ts=job[-1].ts + 1, worker="w1",
                           last_seen_ts=job[-2].ts, declared_by="agg")
        state: JobsState = fold([*job, stale]).states["jobs"]
        assert "running" == state.jobs["a"].status
        assert state.workers["w1"].gone is None
