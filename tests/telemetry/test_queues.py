"""The queues projection (order, slots, history) and its read-time forecast."""

from __future__ import annotations

import msgspec
import pytest

from telemetry.codec import decode_one
from telemetry.engine import ProjectionEngine
from telemetry.events import (
    DeviceInfo,
    Event,
    JobCancelled,
    JobCompleted,
    JobQueued,
    JobStarted,
    WorkerHeartbeat,
)
from telemetry.log.base import Batch
from telemetry.projections import default_projections
from telemetry.projections.queues import QueuesProjection, expected_duration, forecast

S = 1_000_000_000
T0 = 1_800_000_000 * S  # a plausible epoch, in ns


def q(job: str, ts_s: float, *, queue: str = "default", priority: int = 0,
      model: str = "m") -> JobQueued:
    return JobQueued(job=job, seq=0, ts=T0 + int(ts_s * S), model=model, task="t2v",
                     queue=queue, priority=priority, worker="svc")


def start(job: str, ts_s: float, worker: str, *, model: str = "m", seq: int = 1) -> JobStarted:
    return JobStarted(job=job, seq=seq, ts=T0 + int(ts_s * S), model=model, family="wan2.1",
                      variant="tiny-t2v", task="t2v", width=32, height=32, num_frames=9,
                      steps=4, guidance_scale=5.0, cfg=True, worker=worker,
                      device=DeviceInfo(kind="cpu", name="cpu"))


def done(job: str, ts_s: float, duration_s: float, *, seq: int = 2) -> JobCompleted:
    return JobCompleted(job=job, seq=seq, ts=T0 + int(ts_s * S), duration_s=duration_s)


def fold(events: list[Event]) -> ProjectionEngine:
    engine = ProjectionEngine(default_projections())
    engine.apply_batch(Batch(0, events))
    return engine


def test_old_job_queued_records_decode_into_the_default_queue() -> None:
    """A JobQueued written before queue/priority existed decodes as "default", 0."""
    old = msgspec.json.encode({"type": "JobQueued", "v": 1, "job": "a", "seq": 0, "ts": 5,
                               "model": "m", "task": "t2v"})
    event = decode_one(old)
    assert isinstance(event, JobQueued)
    assert (event.queue, event.priority) == ("default", 0)


def test_order_is_priority_then_arrival_per_queue() -> None:
    state = QueuesProjection().initial()
    projection = QueuesProjection()
    for event in [q("a", 0), q("b", 1, priority=5), q("c", 2), q("d", 3, priority=5),
                  q("x", 4, queue="hd")]:
        state = projection.apply(state, event)
    assert state.order("default") == ["b", "d", "a", "c"]
    assert state.order("hd") == ["x"]
    state = projection.apply(state, start("b", 5, "w1"))
    state = projection.apply(state, JobCancelled(job="c", seq=1, ts=T0 + 6 * S,
                                                 duration_s=0.0))
    assert state.order("default") == ["d", "a"]
    assert state.workers["w1"].queues == {"default": None}


def test_slots_are_the_most_jobs_a_worker_ran_at_once() -> None:
    projection = QueuesProjection()
    state = projection.initial()
    for event in [q("a", 0), q("b", 0), start("a", 1, "w"), start("b", 1, "w"),
                  done("a", 3, 2.0), done("b", 4, 3.0)]:
        state = projection.apply(state, event)
    assert state.workers["w"].slots == 2
    assert not state.workers["w"].running
    assert state.durations["m"] == [2.0, 3.0]


def test_forecast_list_schedules_over_the_serving_workers() -> None:
    """Two workers, history says 10–11 s a warm job (w1's first, 9 s, was cold): the first
    waiting job starts when the earlier running job ends, the next when the other ends, the
    third after the first's slot frees."""
    events: list[Event] = []
    for i, job in enumerate(["h1", "h2", "h3"]):  # history: 9, 10, 11 s
        events += [q(job, 0), start(job, 1, "w1"), done(job, 2, 9.0 + i)]
    events += [q("r1", 10), q("r2", 10), q("a", 11), q("b", 12), q("c", 13),
               start("r1", 20, "w1", seq=1), start("r2", 22, "w2", seq=1),
               WorkerHeartbeat(job="worker/w1", seq=0, ts=T0 + 22 * S, worker="w1", host="h",
                               pid=1),
               WorkerHeartbeat(job="worker/w2", seq=0, ts=T0 + 22 * S, worker="w2", host="h",
                               pid=2)]
    engine = fold(events)
    states = engine.states
    now = (T0 + 22 * S) / 1e9
    expected = expected_duration(states, "m", now)
    assert expected is not None and expected.at == pytest.approx((10.0 * 11.0) ** 0.5)
    assert expected.p10 < 9.0 and expected.p90 > 11.0  # two jobs say little of the spread
    ahead = forecast(states, now)
    assert [ahead.jobs[j].position for j in ("a", "b", "c")] == [1, 2, 3]
    end_r1 = ahead.finishes["r1"].at
    end_r2 = ahead.finishes["r2"].at
    assert end_r1 <= end_r2
    a, b, c = (ahead.jobs[j] for j in ("a", "b", "c"))
    assert a.start is not None and a.start.at == pytest.approx(end_r1)
    assert b.start is not None and b.start.at == pytest.approx(min(end_r2, end_r1 + expected.at))
    assert c.start is not None and c.finish is not None
    assert c.start.at >= b.start.at
    assert c.start.p10 <= c.start.at <= c.start.p90
    assert a.finish is not None and a.finish.at == pytest.approx(a.start.at + expected.at)
    assert ahead.depth == {("default", "m"): 3}
    assert ahead.workers["w1"].free is not None
    assert ahead.workers["w1"].free.at == pytest.approx(end_r1)


def test_a_workers_first_job_is_kept_out_of_the_warm_history() -> None:
    """A process's first job pays its one-time costs: its duration joins the model's history
    but not the warm one, which a waiting job's expected duration uses once it holds two."""
    events: list[Event] = []
    for i, job in enumerate(["h1", "h2", "h3"]):
        events += [q(job, 0), start(job, 1, "w1"), done(job, 2, [30.0, 10.0, 11.0][i])]
    states = fold(events).states
    assert states["queues"].durations == {"m": [30.0, 10.0, 11.0]}
    assert states["queues"].warm_durations == {"m": [10.0, 11.0]}
    expected = expected_duration(states, "m", (T0 + 3 * S) / 1e9)
    assert expected is not None and expected.at == pytest.approx((10.0 * 11.0) ** 0.5)


def test_no_serving_worker_means_a_place_but_no_prediction() -> None:
    ahead = forecast(fold([q("a", 0), q("b", 1)]).states, T0 / 1e9 + 2)
    assert ahead.jobs["a"].position == 1 and ahead.jobs["a"].start is None
    assert ahead.jobs["b"].position == 2


def test_replay_is_deterministic_and_snapshots_round_trip() -> None:
    events: list[Event] = [q("a", 0, priority=1), q("b", 1), start("a", 2, "w"),
                           done("a", 3, 1.0)]
    one = fold(events).snapshot()
    assert fold(events).snapshot() == one


def test_hand_overs_are_learned_and_added_to_freed_slots() -> None:
    """A job that waited for the slot a worker's end freed: the gap from that end to its
    start is a hand-over; a job that started on an idle slot is not one."""
    projection = QueuesProjection()
    state = projection.initial()
    for event in [q("a", 0), q("b", 0), start("a", 1, "w"), done("a", 3, 2.0),
                  start("b", 3.5, "w", seq=1), q("c", 4), start("c", 9, "w", seq=1)]:
        state = projection.apply(state, event)
    assert state.handovers == [pytest.approx(0.5)]  # c came after b's slot was free: none
    events: list[Event] = [q("h1", 0), start("h1", 1, "w"), done("h1", 2, 1.0),
                           q("h2", 0), start("h2", 2.5, "w", seq=1), done("h2", 3.5, 1.0),
                           q("r", 4), start("r", 4, "w", seq=1), q("x", 5)]
    engine = fold(events)
    assert engine.states["queues"].handovers == [pytest.approx(0.5)]
    now = (T0 + 5 * S) / 1e9
    ahead = forecast(engine.states, now)
    end = ahead.finishes["r"]
    start_x = ahead.jobs["x"].start
    assert start_x is not None and start_x.at == pytest.approx(end.at + 0.5)


def test_jobs_queued_by_a_silent_service_leave_the_queue() -> None:
    """The service that queued "a" went silent past the liveness timeout (its in-memory queue
    went with it); "b", queued by a live one, moves up to first place."""
    from telemetry.liveness import WORKER_TIMEOUT_S

    later = WORKER_TIMEOUT_S + 5
    events: list[Event] = [q("a", 0), msgspec.structs.replace(q("b", 1), worker="svc2"),
                           WorkerHeartbeat(job="worker/svc2", seq=0, ts=T0 + int(later * S),
                                           worker="svc2", host="h", pid=2)]
    ahead = forecast(fold(events).states, T0 / 1e9 + later)
    assert "a" not in ahead.jobs
    assert ahead.jobs["b"].position == 1
    assert ahead.depth == {("default", "m"): 1}
