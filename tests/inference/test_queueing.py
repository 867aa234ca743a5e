"""``queued()``: a service records the queueing, ``instrument(job=...)`` continues the job."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference.instrument import instrument
from inference.queueing import queued
from inference.tiny_models import build_tiny_pipeline
from telemetry.emitter import Emitter
from telemetry.engine import ProjectionEngine
from telemetry.events import JobCompleted, JobQueued, JobStarted
from telemetry.log.local import LocalLog
from telemetry.projections import default_projections
from tests.inference.test_instrument import call_kwargs
from tests.telemetry.log_contract import events_of


def test_queued_then_instrumented_is_one_job(tmp_path: Path) -> None:
    pipe = build_tiny_pipeline("tiny-t2v")
    log = LocalLog(tmp_path / "log")
    with Emitter(log, heartbeat_interval=None) as emitter:
        queued(emitter, "req-1", model="tiny-t2v", queue="hd", priority=3,
               request={"width": 32, "height": 32, "frames": 5})
        with instrument(pipe, emitter=emitter, job="req-1") as handle:
            pipe(**call_kwargs("tiny-t2v", steps=2))
        assert handle.job == "req-1"
        assert emitter.flush(10)
    events = [e for e in events_of(log.read()) if e.job == "req-1"]
    assert [type(e) for e in events][:2] == [JobQueued, JobStarted]
    assert isinstance(events[-1], JobCompleted)
    assert [e.seq for e in events] == list(range(len(events)))
    engine = ProjectionEngine(default_projections())
    engine.apply_items(LocalLog(tmp_path / "log", create=False).read())
    view = engine.states["jobs"].jobs["req-1"]
    assert (view.queue, view.priority, view.status) == ("hd", 3, "completed")
    assert view.queued_ts is not None and view.started_ts is not None
    queues = engine.states["queues"]
    assert not queues.waiting and view.worker in queues.workers
    log.close()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"queue": ""}, "a queue name is a non-empty string"),
    ({"queue": "x" * 65}, "at most 64"),
    ({"priority": 1.5}, "priority must be an integer"),
    ({"priority": True}, "priority must be an integer"),
    ({"task": "t2i"}, "task must be one of"),
    ({"model": ""}, "model must be a non-empty string"),
])
def test_bad_arguments_are_refused_before_anything_is_recorded(
        tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    log = LocalLog(tmp_path / "log")
    with Emitter(log, heartbeat_interval=None) as emitter:
        arguments: dict[str, object] = {"model": "m", **kwargs}
        with pytest.raises(ValueError, match=message):
            queued(emitter, "j", **arguments)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="reserved"):
            queued(emitter, "worker/x", model="m")
        assert emitter.flush(10)
    assert not [e for e in events_of(log.read()) if isinstance(e, JobQueued)]
    log.close()
