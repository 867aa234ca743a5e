"""The metrics projection: the counters and histograms /metrics renders, as a pure fold."""

from __future__ import annotations

import itertools
import math
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telemetry.engine import ProjectionEngine
from telemetry.events import (
    DeviceInfo,
    Event,
    GpuSampled,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobQueued,
    JobStarted,
    MemorySampled,
    StageEnded,
    StepEnded,
)
from telemetry.log.base import Batch
from telemetry.projections.jobs import JobsProjection
from telemetry.projections.memory import MemoryProjection
from telemetry.projections.metrics import (
    DURATION_BUCKETS,
    MEMORY_BUCKETS,
    SEP,
    CounterSeries,
    Exemplar,
    HistogramSeries,
    MetricsProjection,
    MetricsState,
    observe,
)
from telemetry.tracing import trace_id_for

SECOND = 1_000_000_000
GIB = 2**30
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Stream:
    """Events of one job with consecutive seqs, at times given in seconds."""

    def __init__(self, job: str, model: str = "tiny-t2v", task: str = "t2v") -> None:
        self.job, self.model, self.task = job, model, task
        self.seq = itertools.count()

    def kw(self, t: float) -> dict[str, Any]:
        """The common fields of the next event at ``t`` seconds."""
        return {"job": self.job, "seq": next(self.seq), "ts": int(t * SECOND)}

    def queued(self, t: float, traceparent: str | None = None) -> JobQueued:
        """JobQueued at ``t``."""
        return JobQueued(**self.kw(t), model=self.model, task=self.task,
                         traceparent=traceparent)

    def started(self, t: float, traceparent: str | None = None) -> JobStarted:
        """JobStarted at ``t`` of a tiny CPU job."""
        return JobStarted(**self.kw(t), model=self.model, family="wan2.1",
                          variant=self.model, task=self.task, width=32, height=32,
                          num_frames=5, steps=3, guidance_scale=5.0, cfg=True,
                          device=DeviceInfo(kind="cpu", name="cpu"), traceparent=traceparent)

    def step(self, t: float, i: int, duration: float, expert: str | None = None) -> StepEnded:
        """StepEnded ``i`` at ``t``."""
        return StepEnded(**self.kw(t), step=i, total_steps=3, duration_s=duration,
                         expert=expert)

    def memory(self, t: float, **readings: int) -> MemorySampled:
        """A memory sample of ``cuda:0``."""
        return MemorySampled(**self.kw(t), device="cuda:0", **readings)

    def completed(self, t: float, duration: float) -> JobCompleted:
        """JobCompleted at ``t``."""
        return JobCompleted(**self.kw(t), duration_s=duration)


def fold(events: list[Event]) -> MetricsState:
    """The metrics state after ``events``, through the engine (de-duplication included)."""
    engine = ProjectionEngine([MetricsProjection()])
    engine.apply_batch(Batch(0, events))
    state: MetricsState = engine.states["metrics"]
    return state


def key(*labels: str) -> str:
    """A series key."""
    return SEP.join(labels)


def bucket_index(edges: tuple[float, ...], value: float) -> int:
    """Where ``value`` lands: the first edge at or above it."""
    return next((i for i, edge in enumerate(edges) if value <= edge), len(edges))


def test_duration_buckets_span_10ms_to_two_hours_log_spaced() -> None:
    """Duration buckets go 0.01 s → 7200 s, each edge 1.4–2.5× the previous one."""
    assert (0.01, 7200.0) == (DURATION_BUCKETS[0], DURATION_BUCKETS[-1])
    ratios = [b / a for a, b in itertools.pairwise(DURATION_BUCKETS)]
    assert [] == [r for r in ratios if not 1.4 <= r <= 2.5 + 1e-9]


def test_memory_buckets_are_powers_of_two_from_256mib_to_256gib() -> None:
    """Memory buckets: 256 MiB, 512 MiB, … 256 GiB."""
    assert [2.0**k for k in range(28, 39)] == list(MEMORY_BUCKETS)


def test_jobs_are_counted_by_model_task_and_status() -> None:
    """Each terminal event counts once under its job's model, task and status."""
    a, b, c = Stream("a"), Stream("b", "tiny-i2v", "i2v"), Stream("c")
    events: list[Event] = [
        a.started(1), a.completed(3, 2.0),
        b.started(1), JobFailed(**b.kw(2), duration_s=1.0, error_type="OOM",
                                message="m"),
        c.started(1), JobCancelled(**c.kw(2), duration_s=1.0),
    ]
    state = fold(events)
    assert {
        key("tiny-t2v", "t2v", "completed"): 1,
        key("tiny-i2v", "i2v", "failed"): 1,
        key("tiny-t2v", "t2v", "cancelled"): 1,
    } == {k: v.value for k, v in state.jobs_total.items()}
    assert {} == state.tracked


def test_redelivered_terminal_event_is_counted_once() -> None:
    """A duplicate (job, seq) does not count the job twice."""
    a = Stream("a")
    start = a.started(1)
    done = a.completed(3, 2.0)
    state = fold([start, done, done])
    assert 1 == state.jobs_total[key("tiny-t2v", "t2v", "completed")].value


def test_job_duration_lands_in_its_bucket_with_a_trace_exemplar() -> None:
    """The job's duration is observed once; its bucket's exemplar names the job's trace."""
    a = Stream("a")
    started = a.started(1)
    state = fold([started, a.completed(4.5, 3.5)])
    hist = state.job_duration[key("tiny-t2v", "t2v", "completed")]
    index = bucket_index(DURATION_BUCKETS, 3.5)
    assert (1, 3.5, 1) == (hist.count, hist.sum, hist.counts[index])
    assert {index: Exemplar(trace_id_for("a", None, started.ts), 3.5, 4.5)} == hist.exemplars


def test_exemplar_uses_the_callers_trace_when_the_job_has_a_traceparent() -> None:
    """With a traceparent, exemplars carry the caller's trace id."""
    a = Stream("a")
    state = fold([a.started(1, traceparent=TRACEPARENT), a.step(2, 0, 0.3), a.completed(3, 2.0)])
    (exemplar,) = state.step_duration[key("tiny-t2v", "none")].exemplars.values()
    assert "0af7651916cd43dd8448eb211c80319c" == exemplar.trace_id


def test_queue_wait_is_measured_only_for_queued_jobs() -> None:
    """JobQueued → JobStarted is observed per model; a job never queued adds nothing."""
    a, b = Stream("a"), Stream("b")
    state = fold([a.queued(10, TRACEPARENT), a.started(12.5), b.started(11)])
    hist = state.queue_wait[key("tiny-t2v")]
    assert (1, 2.5) == (hist.count, hist.sum)
    assert ["0af7651916cd43dd8448eb211c80319c"] == [
        e.trace_id for e in hist.exemplars.values()]


def test_stage_durations_are_observed_by_model_and_stage() -> None:
    """StageEnded durations go to the (model, stage) histogram."""
    a = Stream("a", "tiny-ti2v", "ti2v")
    state = fold([a.started(1), StageEnded(**a.kw(2), stage="decode", duration_s=0.7),
                  StageEnded(**a.kw(3), stage="decode", duration_s=0.9)])
    hist = state.stage_duration[key("tiny-ti2v", "decode")]
    assert (2, 1.6) == (hist.count, round(hist.sum, 9))


def test_steps_are_counted_and_timed_by_model_and_expert() -> None:
    """Each step counts once per model; durations split by expert, 'none' without one."""
    a, b = Stream("a"), Stream("b", "tiny-t2v-a14b")
    state = fold([
        a.started(1), a.step(2, 0, 0.2), a.step(3, 1, 0.2),
        b.started(1), b.step(2, 0, 0.4, "high_noise"), b.step(3, 1, 0.5, "low_noise"),
        b.step(4, 2, 0.5, "low_noise"),
    ])
    assert {key("tiny-t2v"): 2, key("tiny-t2v-a14b"): 3} == {
        k: v.value for k, v in state.denoise_steps.items()}
    assert {
        key("tiny-t2v", "none"): 2,
        key("tiny-t2v-a14b", "high_noise"): 1,
        key("tiny-t2v-a14b", "low_noise"): 2,
    } == {k: v.count for k, v in state.step_duration.items()}
    latest = state.step_duration[key("tiny-t2v-a14b", "low_noise")].exemplars
    assert [Exemplar(trace_id_for("b", None, int(1 * SECOND)), 0.5, 4.0)] == list(
        latest.values())  # b's run opened at its JobStarted, at 1 s


def test_peak_memory_is_observed_per_kind_when_the_job_ends() -> None:
    """The highest sample of each kind is observed once, at the job's end."""
    a = Stream("a")
    events: list[Event] = [
        a.started(1),
        a.memory(2, allocated_bytes=1 * GIB, reserved_bytes=2 * GIB, device_used_bytes=3 * GIB),
        a.memory(3, peak_allocated_bytes=5 * GIB, reserved_bytes=int(1.5 * GIB),
                 host_rss_bytes=GIB),
    ]
    assert {} == fold(events).peak_memory  # nothing until the job ends
    state = fold(events + [a.completed(4, 3.0)])
    assert {
        key("tiny-t2v", "torch_allocated"): 5 * GIB,
        key("tiny-t2v", "torch_reserved"): 2 * GIB,
        key("tiny-t2v", "device"): 3 * GIB,
        key("tiny-t2v", "host_rss"): GIB,
    } == {k: v.sum for k, v in state.peak_memory.items()}


def test_gpu_keeps_latest_reading_and_counts_reasons_as_they_appear() -> None:
    """A throttle reason counts when it newly appears in a device's sample, not while it stays."""
    w = Stream("worker/w1")

    def gpu(t: float, device: str, *reasons: str) -> GpuSampled:
        return GpuSampled(**w.kw(t), device=device, utilization_ratio=t / 10,
                          temperature_celsius=60 + t, throttle_reasons=reasons)

    state = fold([
        gpu(1, "cuda:0", "sw_power_cap"),
        gpu(2, "cuda:0", "sw_power_cap", "hw_slowdown"),
        gpu(3, "cuda:1", "sw_power_cap"),
        gpu(4, "cuda:0"),
        gpu(5, "cuda:0", "sw_power_cap"),
    ])
    assert {
        key("cuda:0", "sw_power_cap"): 2,
        key("cuda:0", "hw_slowdown"): 1,
        key("cuda:1", "sw_power_cap"): 1,
    } == {k: v.value for k, v in state.throttle_events.items()}
    assert (0.5, 65.0) == (state.gpus["cuda:0"].utilization_ratio,
                           state.gpus["cuda:0"].temperature_celsius)


def test_a_job_whose_start_was_lost_is_counted_as_unknown() -> None:
    """An end without a start still counts the job (model and task unknown)."""
    a = Stream("a")
    next(a.seq)
    state = fold([a.completed(3, 2.0)])
    assert [("unknown", "unknown", "completed")] == [s.labels for s in state.jobs_total.values()]


def test_tracked_jobs_are_bounded() -> None:
    """Jobs that never end are forgotten oldest first beyond the bound."""
    projection = MetricsProjection(max_tracked=3)
    state = projection.initial()
    for i in range(5):
        state = projection.apply(state, Stream(f"j{i}").started(i))
    assert ["j2", "j3", "j4"] == list(state.tracked)


def test_replay_in_pieces_gives_the_same_bytes() -> None:
    """Folding in pieces with snapshot/restore equals folding in one go, byte for byte."""
    a, b = Stream("a"), Stream("b")
    events: list[Event] = [a.queued(0), a.started(1), b.started(1.5), a.step(2, 0, 0.2),
                           b.step(2.5, 0, 0.3, "high_noise"), a.memory(2.6, allocated_bytes=GIB),
                           a.completed(3, 2.0), b.completed(4, 2.5)]
    whole = ProjectionEngine([MetricsProjection()])
    whole.apply_batch(Batch(0, events))
    pieces = ProjectionEngine([MetricsProjection()])
    for lo, hi in ((0, 3), (3, 6), (6, len(events))):
        restarted = ProjectionEngine([MetricsProjection()])
        assert restarted.restore(pieces.snapshot())
        restarted.apply_batch(Batch(lo, events[lo:hi]))
        pieces = restarted
    assert whole.snapshot() == pieces.snapshot()
    assert math.isclose(4.5, whole.states["metrics"].job_duration[
        key("tiny-t2v", "t2v", "completed")].sum)


#: Step durations around bucket edges, repeated values, and the odd ones (none, zero, NaN, inf).
STEP_DURATIONS = st.one_of(
    st.sampled_from([0.01, 0.01, 0.015, 0.02, 0.0200001, 0.3, 0.3, 7200.0, 9000.0, 0.0, -0.0,
                     -1.0, math.inf, math.nan, None]),
    st.floats(min_value=0.001, max_value=10.0))


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(0, 2), STEP_DURATIONS,
                                st.sampled_from([None, "high_noise", "low_noise"]),
                                st.integers(0, 12)), max_size=60),
       cuts=st.lists(st.integers(0, 70), max_size=5))
def test_steps_fold_in_batches_as_observed_one_by_one(
    steps: list[tuple[int, float | None, str | None, int]], cuts: list[int]
) -> None:
    """The batched step path (runs, counters in locals) equals counting each step and
    ``observe``-ing each timed one with its exemplar, over any split into batches.

    Jobs ``a`` and ``b`` share a model (one counter, shared histograms); ``c`` has its own;
    a step may be replaced by its job's end (later steps of that job are not counted).
    """
    streams = [Stream("a", "m1"), Stream("b", "m1", "i2v"), Stream("c", "m2")]
    events: list[Event] = [s.started(0) for s in streams]
    counters: dict[str, CounterSeries] = {}
    hists: dict[str, HistogramSeries] = {}
    ended: set[str] = set()
    for t, (which, duration, expert, end) in enumerate(steps, start=1):
        stream = streams[which]
        if end == 0:  # the job ends here
            events.append(stream.completed(t, 1.0))
            ended.add(stream.job)
            continue
        step = StepEnded(**stream.kw(t), step=t, total_steps=60, duration_s=duration,
                         expert=expert)
        events.append(step)
        if stream.job in ended:
            continue
        counter = counters.setdefault(stream.model, CounterSeries(labels=(stream.model,)))
        counter.value += 1
        if step.duration_s is not None:
            observe(hists, (stream.model, expert or "none"), DURATION_BUCKETS, step.duration_s,
                    Exemplar(trace_id_for(stream.job, None, 0), step.duration_s,
                             step.ts / 1e9))  # each run opened at its JobStarted, at 0
    projection = MetricsProjection()
    state = projection.initial()
    bounds = sorted({min(c, len(events)) for c in cuts} | {0, len(events)})
    for lo, hi in itertools.pairwise(bounds):
        state = projection.apply_many(state, events[lo:hi], _no_failure)
    assert repr(msgspec.to_builtins(counters)) == repr(msgspec.to_builtins(state.denoise_steps))
    assert repr(msgspec.to_builtins(hists)) == repr(msgspec.to_builtins(state.step_duration))


def _no_failure(event: Event, exc: Exception) -> None:
    raise AssertionError(f"{type(event).__name__} raised {exc!r}")


def test_a_zero_reading_is_a_peak_of_zero_bytes() -> None:
    """A job whose allocator reads 0 bytes has a peak of 0 bytes of that kind; a sample with
    no reading of a kind adds no peak of it."""
    a = Stream("a")
    state = fold([a.started(1), a.memory(2, allocated_bytes=0), a.memory(3)])
    assert {"torch_allocated": 0} == state.tracked["a"].peaks


def test_the_host_rss_peak_counts_the_samples_high_water_mark() -> None:
    """A CPU job's per-step samples carry only the RSS high-water mark, above the current RSS
    read at stage boundaries: the job's ``host_rss`` peak is the mark, as ``/api/jobs`` and
    the memory projection say, not the lower current RSS."""
    a = Stream("a")
    events: list[Event] = [
        a.started(1),
        a.memory(2, host_rss_bytes=GIB, host_peak_rss_bytes=GIB + 4096),
        a.memory(3, host_peak_rss_bytes=2 * GIB),
        a.memory(4, host_rss_bytes=int(1.5 * GIB)),
        a.completed(5, 4.0),
    ]
    engine = ProjectionEngine([MetricsProjection(), MemoryProjection(), JobsProjection()])
    engine.apply_batch(Batch(0, events))
    observed = engine.states["metrics"].peak_memory[key("tiny-t2v", "host_rss")]
    assert (1, float(2 * GIB)) == (observed.count, observed.sum)
    assert 2 * GIB == engine.states["memory"].finished["a"].peaks["host_rss"]
    assert 2 * GIB == engine.states["jobs"].jobs["a"].peak_memory_bytes


def test_non_finite_durations_are_counted_not_observed_on_both_paths() -> None:
    """NaN and infinite durations are left out of every histogram (a NaN made the sum NaN for
    good) and counted in ``non_finite``; the steps still count. The batch fast path and the
    per-event rules agree."""
    job = Stream("j")
    values = [0.1, math.nan, math.inf, -math.inf, 0.2, 9000.0, math.inf]
    events: list[Event] = [job.started(0.0)]
    events += [job.step(1.0 + i, i, value) for i, value in enumerate(values)]
    events += [job.completed(20.0, math.nan)]
    fast = fold(events)
    projection = MetricsProjection()
    slow = projection.initial()
    for event in events:
        slow = projection.apply(slow, event)
    assert msgspec.msgpack.encode(slow) == msgspec.msgpack.encode(fast)
    steps = fast.step_duration[key("tiny-t2v", "none")]
    assert (3, 4, 9000.3) == (steps.count, steps.non_finite, pytest.approx(steps.sum))
    assert 7 == fast.denoise_steps[key("tiny-t2v")].value
    done = fast.job_duration[key("tiny-t2v", "t2v", "completed")]
    assert (0, 1, 0.0) == (done.count, done.non_finite, done.sum)
