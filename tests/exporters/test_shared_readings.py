"""Exporters and projections read events through the same rules (``projections.readings``)."""

from __future__ import annotations

from exporters.otel import spans_for_job
from telemetry.events import DeviceInfo, Event, JobCompleted, JobQueued, JobStarted, StageEnded
from telemetry.projections.jobs import JobsProjection
from telemetry.projections.metrics import MetricsProjection
from telemetry.projections.readings import device_label, queue_wait_s, stage_start

SECOND = 1_000_000_000


def a_job() -> list[Event]:
    """A queued job on ``cuda:1`` whose decode stage's start was lost."""
    return [
        JobQueued(job="a", seq=0, ts=SECOND // 2, model="m", task="t2v"),
        JobStarted(job="a", seq=1, ts=2 * SECOND, model="m", family="wan2.1", variant="m",
                   task="t2v", width=32, height=32, num_frames=5, steps=2, guidance_scale=5.0,
                   cfg=True, device=DeviceInfo(kind="cuda", name="H100", index=1)),
        StageEnded(job="a", seq=2, ts=9 * SECOND, stage="decode", duration_s=1.25),
        JobCompleted(job="a", seq=3, ts=10 * SECOND, duration_s=8.0),
    ]


def test_a_lost_stage_start_is_the_same_in_the_jobs_view_and_the_span() -> None:
    """The jobs projection's timeline and the stage's span start where the rule says."""
    events = a_job()
    projection = JobsProjection()
    state = projection.initial()
    for event in events:
        state = projection.apply(state, event)
    span = next(s for s in spans_for_job(events) if s.name == "stage.decode")
    assert isinstance(events[2], StageEnded)
    assert stage_start(events[2]) == state.jobs["a"].stages[0].start_ts == span.start_time


def test_the_root_span_carries_the_rules_queue_wait_and_device() -> None:
    """The root span's queue wait is the one the metrics projection observes; its device is
    the device's label."""
    events = a_job()
    projection = MetricsProjection()
    state = projection.initial()
    for event in events:
        state = projection.apply(state, event)
    attributes = spans_for_job(events)[0].attributes or {}
    wait = queue_wait_s(events[0].ts, events[1].ts)
    assert 1.5 == wait == attributes["wantel.queue_wait_s"] == state.queue_wait["m"].sum
    assert isinstance(events[1], JobStarted)
    assert "cuda:1" == device_label(events[1].device) == attributes["wantel.device"]
