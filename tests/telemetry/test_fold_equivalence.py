"""Each projection's fast path against its rules: the same state, byte for byte.

A projection's ``apply`` states its rules; where a benchmark showed a fast ``apply_many`` pays,
it sits beside them (``docs/design-notes.md``), and this suite holds the two to identical
states — compared as their msgpack bytes, what a checkpoint stores — and to the same failures,
reported at the same events (``BatchProjection``'s contract). The heapq pattern
(``Lib/test/test_heapq.py``): one set of tests, every fold with a fast path.

The event sequences are random job streams interleaved as workers run them side by side —
jobs whose start or stage starts were lost, queued jobs, two-expert steps, memory samples of
every kind of reading, GPU samples, heartbeats, silences long enough to abandon a job — with
events that make a fold raise inserted mid-batch, and the two real logs in
``tests/fixtures``: the ETA corpus and a ``wantel demo`` log.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from telemetry.engine import ProjectionEngine
from telemetry.events import (
    DeviceInfo,
    Event,
    ExpertSwitched,
    GpuSampled,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobQueued,
    JobStarted,
    MemorySampled,
    StageEnded,
    StageProgress,
    StageStarted,
    StepEnded,
    WorkerHeartbeat,
)
from telemetry.log.base import Batch
from telemetry.log.local import LocalLog
from telemetry.projections import default_projections
from telemetry.projections.base import Projection, RulesOnly, RuleTable
from telemetry.projections.compare import CompareProjection
from telemetry.projections.eta import EtaProjection
from telemetry.projections.jobs import JobsProjection
from telemetry.projections.metrics import MetricsProjection
from telemetry.projections.throughput import ThroughputProjection

from .test_engine import delivered_logs

SECOND = 1_000_000_000
FIXTURES = Path(__file__).parents[1] / "fixtures"
REAL_LOGS = [pytest.param(FIXTURES / "eta-corpus", id="eta-corpus"),
             pytest.param(FIXTURES / "demo-log", id="demo-log")]

#: Every fold with a fast path, as shipped and with bounds small enough that the random logs
#: reach them (ended jobs forgotten, tracked jobs evicted, silent jobs abandoned).
FOLDS = [
    pytest.param(JobsProjection, id="jobs"),
    pytest.param(lambda: JobsProjection(abandon_after_s=20, keep_finished=2), id="jobs-bounded"),
    pytest.param(ThroughputProjection, id="throughput"),
    pytest.param(MetricsProjection, id="metrics"),
    pytest.param(lambda: MetricsProjection(max_tracked=2), id="metrics-bounded"),
    pytest.param(EtaProjection, id="eta"),
    pytest.param(lambda: EtaProjection(keep_finished=2), id="eta-bounded"),
    pytest.param(CompareProjection, id="compare"),
    pytest.param(lambda: CompareProjection(max_tracked=2), id="compare-bounded"),
]

Fold = Callable[[], Any]
Failures = list[tuple[int, type[Exception]]]

# -- random logs ------------------------------------------------------------------------------

STAGES = ("load", "text_encode", "latent_init", "denoise", "decode", "save")
#: Step durations: repeated values (runs in one bucket), bucket edges, and none, zero, NaN, ∞.
STEP_DURATIONS = st.one_of(
    st.sampled_from([0.25, 0.25, 0.5, 0.01, 0.02, 7200.0, 9000.0, 0.0, None, math.inf,
                     math.nan]),
    st.floats(0.001, 20.0))
#: Memory readings: few values, so samples tie and rise; 0 is a reading for some kinds only.
BYTES = st.one_of(st.none(), st.sampled_from([0, 1, 2**20, 2**30, 3 * 2**30]))
#: Gaps between a job's events: none, short, and silences past the jobs' abandon timeouts.
GAPS = st.sampled_from([0, 1, 10**7, SECOND // 4, 3 * SECOND, 30 * SECOND, 100 * SECOND])


@st.composite
def job_stream(draw: st.DrawFn, job: str) -> list[Event]:
    """One job's events in order, with seqs from 0: maybe queued, maybe its start lost, some
    stages (maybe their starts lost), steps and memory samples, maybe an end."""
    model = draw(st.sampled_from(["m1", "m2"]))
    worker = draw(st.sampled_from(["w1", "w2", None]))
    ts = draw(st.integers(0, 20)) * SECOND
    out: list[Event] = []

    def at() -> dict[str, Any]:
        nonlocal ts
        ts += draw(GAPS)
        return {"job": job, "ts": ts, "worker": worker}

    def sample(stage: str | None, step: int | None) -> MemorySampled:
        return MemorySampled(
            **at(), device=draw(st.sampled_from(["cpu", "cuda:0", "cuda:1"])), stage=stage,
            step=step, allocated_bytes=draw(BYTES), reserved_bytes=draw(BYTES),
            peak_allocated_bytes=draw(BYTES), peak_reserved_bytes=draw(BYTES),
            device_used_bytes=draw(BYTES), device_total_bytes=draw(BYTES),
            host_rss_bytes=draw(BYTES), host_peak_rss_bytes=draw(BYTES))

    if draw(st.booleans()):
        out.append(JobQueued(**at(), model=model, task="t2v",
                             traceparent=draw(st.sampled_from([None, TRACEPARENT]))))
    steps = draw(st.integers(0, 12))
    started = JobStarted(**at(), model=model, family="wan2.1", variant=model, task="t2v",
                         width=64, height=64, num_frames=9, steps=steps, guidance_scale=5.0,
                         cfg=True, device=DeviceInfo(kind="cpu", name="cpu"),
                         traceparent=draw(st.sampled_from([None, TRACEPARENT])))
    if draw(st.integers(0, 4)):  # one start in five is lost
        out.append(started)
    stages = draw(st.lists(st.sampled_from(STAGES), max_size=3))
    if draw(st.integers(0, 3)):  # most jobs denoise: steps are most of a log
        stages.insert(draw(st.integers(0, len(stages))), "denoise")
    for stage in stages:
        if draw(st.integers(0, 5)):
            out.append(StageStarted(**at(), stage=stage))
        if draw(st.booleans()):
            out.append(sample(stage, None))
        if stage == "denoise":
            expert = draw(st.sampled_from([None, "high_noise"]))
            for step in range(steps):
                if expert is not None and step == steps // 2:
                    out.append(ExpertSwitched(**at(), step=step, from_expert="high_noise",
                                              to_expert="low_noise"))
                    expert = "low_noise"
                out.append(StepEnded(**at(), step=step, total_steps=steps,
                                     duration_s=draw(STEP_DURATIONS), expert=expert))
                if draw(st.booleans()):
                    out.append(sample(None, step))
        else:  # its pieces (the decode's), some lost, some out of order
            pieces = draw(st.integers(0, 4))
            for done in draw(st.permutations(range(1, pieces + 1))) if pieces else ():
                if draw(st.integers(0, 3)):
                    out.append(StageProgress(**at(), stage=stage, done=done, total=pieces))
        if draw(st.integers(0, 5)):
            out.append(StageEnded(**at(), stage=stage, duration_s=draw(st.floats(0.0, 5.0)),
                                  ok=draw(st.booleans())))
    end = draw(st.sampled_from(["completed", "failed", "oom", "cancelled", None]))
    if end == "completed":
        out.append(JobCompleted(**at(), duration_s=draw(st.floats(0.0, 100.0))))
    elif end in ("failed", "oom"):
        out.append(JobFailed(**at(), duration_s=1.5, error_type="RuntimeError", message="x",
                             oom=end == "oom", step=draw(st.none() | st.integers(0, 5))))
    elif end == "cancelled":
        out.append(JobCancelled(**at(), duration_s=2.0, reason="requested"))
    return [msgspec.structs.replace(event, seq=seq) for seq, event in enumerate(out)]


@st.composite
def worker_stream(draw: st.DrawFn, worker: str) -> list[Event]:
    """A worker's heartbeats and GPU samples, throttle reasons coming and going."""
    out: list[Event] = []
    ts = 0
    for seq in range(draw(st.integers(0, 4))):
        ts += draw(GAPS)
        if draw(st.booleans()):
            out.append(WorkerHeartbeat(job=f"worker/{worker}", seq=seq, ts=ts, worker=worker,
                                       host="h", pid=1, devices=("cuda:0",)))
        else:
            out.append(GpuSampled(job=f"worker/{worker}", seq=seq, ts=ts, worker=worker,
                                  device="cuda:0", utilization_ratio=0.5,
                                  throttle_reasons=tuple(draw(st.lists(
                                      st.sampled_from(["sw_power_cap", "hw_slowdown"]),
                                      unique=True)))))
    return out


def poisoned(draw: st.DrawFn, events: list[Event]) -> Event:
    """An event a fold raises on, partway through its rule or before it changes anything:
    a stage end whose start is lost and whose duration is no time (its start cannot be
    reconstructed), or an event of any kind whose job cannot be looked up. Its time is an
    event's of the log, or newer than all (a fold's clock moves before it raises)."""
    base = draw(st.sampled_from(events))
    ts = draw(st.sampled_from([base.ts, max(e.ts for e in events) + SECOND]))
    likely = [e for e in events if not isinstance(e, GpuSampled)]
    if not likely or draw(st.booleans()):  # (a log of GPU samples only: the first kind)
        return StageEnded(job=base.job, seq=10_000, ts=ts, stage="postprocess",
                          duration_s=draw(st.sampled_from([math.inf, math.nan, 1.8e299])))
    like = draw(st.sampled_from(likely))
    return msgspec.structs.replace(like, job=cast(Any, ["unhashable"]), ts=ts)


@st.composite
def interleaved_logs(draw: st.DrawFn) -> list[Event]:
    """Several jobs and workers interleaved as they run side by side (each stream in order,
    no duplicates), with up to three events that make a fold raise inserted anywhere."""
    streams = [draw(job_stream(f"job-{k}")) for k in range(draw(st.integers(1, 4)))]
    streams += [draw(worker_stream(w)) for w in ("w1", "w2")]
    out: list[Event] = []
    while any(streams):
        stream = draw(st.sampled_from([s for s in streams if s]))
        out.append(stream.pop(0))
    if out:
        for _ in range(draw(st.integers(0, 3))):
            out.insert(draw(st.integers(0, len(out))), poisoned(draw, out))
    return out


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

# -- the two ways to fold ---------------------------------------------------------------------


def by_rules(fold: Projection[Any], events: Sequence[Event],
             cuts: Sequence[int] = ()) -> tuple[list[bytes], Failures]:
    """``apply`` event by event: the state's bytes at each cut and at the end, and which
    events raised what."""
    state, raised, states = fold.initial(), [], []
    ends = set(_bounds(events, cuts))
    for index, event in enumerate(events):
        try:
            state = fold.apply(state, event)
        except Exception as exc:
            raised.append((index, type(exc)))
        if index + 1 in ends:
            states.append(msgspec.msgpack.encode(state))
    return states, raised


def by_fast_path(fold: Any, events: Sequence[Event],
                 cuts: Sequence[int] = ()) -> tuple[list[bytes], Failures]:
    """``apply_many`` over ``events`` split at ``cuts``: the state's bytes after each piece,
    and which events were reported to ``failed`` with what."""
    state, reported, states = fold.initial(), [], []
    for lo, hi in itertools.pairwise([0, *_bounds(events, cuts)]):
        piece = events[lo:hi]
        positions = {id(event): lo + i for i, event in enumerate(piece)}

        def failed(event: Event, exc: Exception, positions: dict[int, int] = positions) -> None:
            reported.append((positions[id(event)], type(exc)))

        state = fold.apply_many(state, piece, failed)
        states.append(msgspec.msgpack.encode(state))
    return states, reported


def _bounds(events: Sequence[Event], cuts: Sequence[int]) -> list[int]:
    """Where the pieces of ``events`` split at ``cuts`` end, in order (none for no events:
    ``-`` binds before ``|``, so the empty piece a cut made of an empty log was kept, and
    the fast path's state after it was compared with no state of the rules')."""
    return sorted(({min(c, len(events)) for c in cuts if c > 0} | {len(events)}) - {0})


# -- the tests --------------------------------------------------------------------------------


def test_every_fast_path_is_held_to_its_rules() -> None:
    """Every shipped projection with an ``apply_many`` is in :data:`FOLDS` (or tested
    elsewhere), and every one has an ``apply`` of its own or the rule table's (one handler
    per event type), not a batch of one."""
    fast = {p.name for p in default_projections() if hasattr(p, "apply_many")}
    covered = {param.values[0]().name for param in FOLDS}
    assert fast == covered
    for param in FOLDS:
        projection = param.values[0]()
        kind = type(projection)
        assert "apply" in kind.__dict__ or kind.apply is RuleTable.apply, projection.name


@pytest.mark.parametrize("make", FOLDS)
class TestFastPathEqualsRules:
    @settings(max_examples=120, deadline=None)
    @given(events=interleaved_logs(), cuts=st.lists(st.integers(0, 300), max_size=6))
    @example(events=[], cuts=[1])  # an empty log cut: found once by a fresh clone's run
    def test_on_interleaved_streams(self, make: Fold, events: list[Event],
                                 cuts: list[int]) -> None:
        """Random interleaved jobs, lost starts and raising events, folded in random
        batches: after each batch the fast path's state is the rules', and so are the
        failures."""
        assert by_rules(make(), events, cuts) == by_fast_path(make(), events, cuts)

    @pytest.mark.parametrize("log_dir", REAL_LOGS)
    @pytest.mark.parametrize("size", [1, 7, 100, 10**6])
    def test_on_a_real_log(self, make: Fold, log_dir: Path, size: int) -> None:
        """A real log, in batches of ``size``: the same state as the rules', no failure."""
        events, cuts = real_events(log_dir), range(0, len(real_events(log_dir)), size)
        expected, raised = by_rules(make(), events, cuts)
        assert [] == raised
        assert (expected, []) == by_fast_path(make(), events, cuts)


@settings(max_examples=40, deadline=None)
@given(events=delivered_logs())
def test_an_engine_snapshots_the_same_bytes_with_rules_only(events: list[Event]) -> None:
    """Through the engine (de-duplication, routing by ``handles`` and ``passes``), every
    projection folded by its rules alone gives the snapshot of their fast paths."""
    assert engine_snapshot(events, rules_only=False) == engine_snapshot(events, rules_only=True)


@pytest.mark.parametrize("log_dir", REAL_LOGS)
def test_a_real_log_replays_to_the_same_snapshot_with_rules_only(log_dir: Path) -> None:
    """Replaying a real log as ``wantel replay`` and ``serve`` do, fast paths or rules alone
    give the same snapshot, byte for byte."""
    snapshots = []
    for rules_only in (False, True):
        engine = ProjectionEngine(projections(rules_only=rules_only))
        engine.apply_items(LocalLog(log_dir, create=False).read(0))
        snapshots.append(engine.snapshot())
    assert snapshots[0] == snapshots[1]


def projections(*, rules_only: bool) -> list[Projection[Any]]:
    """Serve's projections, those with a fast path folded by their rules if ``rules_only``."""
    return [RulesOnly(p) if rules_only else p
            for p in default_projections()]


def engine_snapshot(events: list[Event], *, rules_only: bool) -> bytes:
    """The snapshot of an engine after ``events`` in one batch."""
    engine = ProjectionEngine(projections(rules_only=rules_only))
    engine.apply_batch(Batch(0, events))
    return engine.snapshot()


_REAL: dict[Path, list[Event]] = {}


def real_events(log_dir: Path) -> list[Event]:
    """Every event of the log at ``log_dir``, read once per session."""
    if log_dir not in _REAL:
        _REAL[log_dir] = [event for item in LocalLog(log_dir, create=False).read(0)
                          if isinstance(item, Batch) for event in item.events]
    return _REAL[log_dir]


@pytest.mark.parametrize("make", FOLDS)
def test_a_step_without_a_job_is_not_folded_into_the_run_before(make: Fold) -> None:
    """An event built in code may carry ``job=None`` (the log's decoder refuses it). After a
    run of a job's steps ends (another event between), such a step must not be taken for the
    job whose run ended: the rules look ``None`` up and find nothing, and so must the fast
    path."""
    device = DeviceInfo(kind="cpu", name="cpu")
    started = JobStarted(job="a", seq=0, ts=1, worker="w", model="tiny-t2v", family="wan2.1",
                         variant="tiny-t2v", task="t2v", width=64, height=64, num_frames=17,
                         steps=4, guidance_scale=5.0, cfg=True, device=device)
    events: list[Event] = [
        started,
        StageStarted(job="a", seq=1, ts=2, worker="w", stage="denoise"),
        StepEnded(job="a", seq=2, ts=3, worker="w", step=0, total_steps=4, duration_s=0.5),
        MemorySampled(job="a", seq=3, ts=3, worker="w", device="cpu", host_rss_bytes=10**8),
        StageEnded(job="a", seq=4, ts=4, worker="w", stage="denoise", duration_s=1.0),
        msgspec.structs.replace(started, job="b", ts=4),  # a lifecycle event ends a run too
        StepEnded(job=None, seq=5, ts=5, worker="w", step=1, total_steps=4,  # type: ignore[arg-type]
                  duration_s=9.0),
        MemorySampled(job=None, seq=6, ts=5, worker="w", device="cpu",  # type: ignore[arg-type]
                      host_rss_bytes=10**10),
        StepEnded(job="a", seq=7, ts=6, worker="w", step=2, total_steps=4, duration_s=0.5),
    ]
    assert by_rules(make(), events) == by_fast_path(make(), events)
