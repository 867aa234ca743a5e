"""Two threads, one pipeline: each ``instrument()`` context records its own job."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from inference.instrument import PipelineInUse, instrument
from inference.tiny_models import build_tiny_pipeline
from telemetry.emitter import Emitter
from telemetry.events import JobCompleted, JobStarted, StepEnded
from telemetry.log.local import LocalLog
from tests.inference.test_instrument import call_kwargs, of_type
from tests.telemetry.log_contract import events_of


def test_two_threads_one_pipeline_two_jobs(tmp_path: Path) -> None:
    """Both threads' calls complete, each recorded as its own job with all its steps (the
    second context waits for the first: a diffusers pipeline cannot run two calls at once)."""
    pipe = build_tiny_pipeline("tiny-t2v")
    log = LocalLog(tmp_path / "log")
    inside = threading.Event()
    errors: list[BaseException] = []
    outputs: dict[str, Any] = {}

    def work(job: str, steps: int) -> None:
        try:
            with instrument(pipe, emitter=emitter, job=job):
                inside.set()
                outputs[job] = pipe(**call_kwargs("tiny-t2v", steps=steps)).frames
        except BaseException as exc:
            errors.append(exc)

    with Emitter(log, heartbeat_interval=None) as emitter:
        first = threading.Thread(target=work, args=("thread-a", 5))
        first.start()
        inside.wait(30)
        second = threading.Thread(target=work, args=("thread-b", 3))
        second.start()
        first.join(120)
        second.join(120)
        assert emitter.flush(10)
    events = list(events_of(log.read()))
    log.close()
    assert [] == errors
    assert {"thread-a", "thread-b"} == set(outputs)
    for job, steps in (("thread-a", 5), ("thread-b", 3)):
        mine = [e for e in events if e.job == job]
        assert 1 == len(of_type(mine, JobStarted)) == len(of_type(mine, JobCompleted))
        assert list(range(steps)) == [e.step for e in of_type(mine, StepEnded)]
    assert type(pipe).__name__ == "WanPipeline" and not hasattr(type(pipe),
                                                                "_wantel_instrumented")


def test_entering_twice_in_one_thread_names_the_fix(tmp_path: Path) -> None:
    """The same thread entering again would wait for itself: a clear error instead of the
    misleading ``TypeError('... has no callback_on_step_end')`` it used to be."""
    pipe = build_tiny_pipeline("tiny-t2v")
    log = LocalLog(tmp_path / "log")
    with Emitter(log, heartbeat_interval=None) as emitter, instrument(pipe, emitter=emitter), \
            pytest.raises(PipelineInUse, match="nest the pipe"), \
            instrument(pipe, emitter=emitter):
        pass
    log.close()
