"""The in-process handle: ``handle.progress()`` and ``on_progress``, with a real tiny pipeline."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference.instrument import instrument
from inference.progress import Progress
from inference.tiny_models import build_tiny_pipeline
from telemetry.emitter import Emitter
from telemetry.events import JobCompleted, JobStarted, StepEnded
from telemetry.log.local import LocalLog
from tests.inference.test_instrument import call_kwargs, of_type
from tests.telemetry.log_contract import events_of

STEPS = 5


def test_progress_is_the_jobs_live_view_at_each_step(tmp_path: Path) -> None:
    """Read from the caller's own step callback: the step it just finished, the total, a
    progress that never goes back, an ETA with an interval once two steps are seen."""
    pipe = build_tiny_pipeline("tiny-t2v")
    seen: list[Progress] = []
    log = LocalLog(tmp_path / "log")
    with Emitter(log, heartbeat_interval=None) as emitter, \
            instrument(pipe, emitter=emitter, job="live") as handle:
        assert handle.progress() is None  # nothing started yet

        def mine(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict:
            view = handle.progress()
            assert view is not None
            seen.append(view)
            return {}

        pipe(**call_kwargs("tiny-t2v", steps=STEPS), callback_on_step_end=mine)
        final = handle.progress()
    log.close()
    assert [v.step for v in seen] == list(range(1, STEPS + 1))
    assert all(v.steps == STEPS and v.status == "running" and v.job == "live" for v in seen)
    # The last step closes the denoise stage: the decode has not started yet.
    assert [v.stage for v in seen] == ["denoise"] * (STEPS - 1) + [None]
    progress = [v.progress for v in seen]
    assert all(p is not None and 0 < p < 1 for p in progress)
    assert progress == sorted(progress)  # type: ignore[type-var]
    assert seen[0].estimating and not seen[-1].estimating
    for view in seen[1:]:
        assert view.eta_s is not None and view.eta_p10_s is not None and view.eta_p90_s
        assert 0 <= view.eta_p10_s <= view.eta_s <= view.eta_p90_s
    assert seen[-1].steps_per_second is not None and seen[-1].steps_per_second > 0
    assert seen[-1].peak_memory_bytes is not None and seen[-1].peak_memory_bytes > 0
    assert final is not None
    assert (final.status, final.progress, final.eta_s, final.step) == ("completed", 1.0, 0.0,
                                                                       STEPS)


def test_on_progress_runs_off_the_generation_thread(tmp_path: Path) -> None:
    pipe = build_tiny_pipeline("tiny-t2v")
    views: list[Progress] = []
    threads: set[str] = set()

    def on_progress(view: Progress) -> None:
        threads.add(threading.current_thread().name)
        views.append(view)

    log = LocalLog(tmp_path / "log")
    with Emitter(log, heartbeat_interval=None) as emitter, \
            instrument(pipe, emitter=emitter, job="cb", on_progress=on_progress):
        pipe(**call_kwargs("tiny-t2v", steps=STEPS))
    log.close()
    assert threads == {"wantel-progress"}
    assert views, "the callback was never called"
    assert [v.step for v in views] == sorted(v.step for v in views)
    assert views[-1].status == "completed" and views[-1].step == STEPS
    assert views[-1].progress == 1.0


def test_a_slow_callback_skips_views_never_steps(tmp_path: Path) -> None:
    """A callback that blocks until the generation is over gets the latest view next, not a
    backlog of one per step; the job's events are all in the log."""
    pipe = build_tiny_pipeline("tiny-t2v")
    release = threading.Event()
    views: list[Progress] = []

    def on_progress(view: Progress) -> None:
        views.append(view)
        release.wait(60)

    log = LocalLog(tmp_path / "log")
    with Emitter(log, heartbeat_interval=None) as emitter, \
            instrument(pipe, emitter=emitter, job="slow", on_progress=on_progress):
        pipe(**call_kwargs("tiny-t2v", steps=8))
        release.set()
        assert emitter.flush(10)
    events = [e for e in events_of(log.read()) if e.job == "slow"]
    log.close()
    assert len(of_type(events, StepEnded)) == 8
    assert len(views) <= 3  # the first, the latest while it waited, maybe the final one
    assert views[-1].status == "completed"


def test_a_raising_callback_is_logged_once_and_breaks_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pipe = build_tiny_pipeline("tiny-t2v")
    calls = 0

    def on_progress(view: Progress) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("the callback is broken")

    reference = pipe(**call_kwargs("tiny-t2v", steps=STEPS)).frames
    log = LocalLog(tmp_path / "log")
    with caplog.at_level(logging.WARNING, logger="wantel.instrument"), \
            Emitter(log, heartbeat_interval=None) as emitter, \
            instrument(pipe, emitter=emitter, job="bad", on_progress=on_progress) as handle:
        output = pipe(**call_kwargs("tiny-t2v", steps=STEPS)).frames
    log.close()
    np.testing.assert_array_equal(reference, output)
    assert calls >= 2
    logged = [r for r in caplog.records if "on_progress raised" in r.getMessage()]
    assert len(logged) == 1
    assert handle._live.callback_errors == calls
    final = handle.progress()
    assert final is not None and final.status == "completed"


def test_two_threads_one_pipeline_each_handle_sees_its_own_job(tmp_path: Path) -> None:
    """Two threads, one pipeline, two jobs: both complete, both recorded correctly, and each
    handle's live view is its own job's."""
    pipe = build_tiny_pipeline("tiny-t2v")
    log = LocalLog(tmp_path / "log")
    finals: dict[str, Progress | None] = {}
    streams: dict[str, list[Progress]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def work(job: str, steps: int) -> None:
        try:
            with instrument(pipe, emitter=emitter, job=job,
                            on_progress=streams[job].append) as handle:
                pipe(**call_kwargs("tiny-t2v", steps=steps))
            finals[job] = handle.progress()
        except BaseException as exc:
            errors.append(exc)

    with Emitter(log, heartbeat_interval=None) as emitter:
        threads = [threading.Thread(target=work, args=("a", 4)),
                   threading.Thread(target=work, args=("b", 2))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert emitter.flush(10)
    events = list(events_of(log.read()))
    log.close()
    assert errors == []
    for job, steps in (("a", 4), ("b", 2)):
        mine = [e for e in events if e.job == job]
        assert 1 == len(of_type(mine, JobStarted)) == len(of_type(mine, JobCompleted))
        assert list(range(steps)) == [e.step for e in of_type(mine, StepEnded)]
        final = finals[job]
        assert final is not None and (final.job, final.status, final.step, final.steps) == (
            job, "completed", steps, steps)
        assert {v.job for v in streams[job]} == {job}


def test_reading_the_view_changes_no_eta_its_fold_issues() -> None:
    """However often the view is read between steps (each read is the estimator at the newest
    event), the ETAs its fold issues are those of a fold nobody read: a read is a peek, never
    an issue, and the progress it shows still never goes back."""
    from inference.progress import LiveView
    from telemetry.events import DeviceInfo, StageEnded, StageStarted
    from telemetry.projections.eta import EtaProjection

    second = 1_000_000_000
    events: list[Any] = [
        JobStarted(job="j", ts=0, worker="w", model="tiny-t2v", family="wan2.1",
                   variant="tiny-t2v", task="t2v", width=64, height=64, num_frames=17,
                   steps=20, guidance_scale=5.0, cfg=True,
                   device=DeviceInfo(kind="cpu", name="cpu"), seq=0),
        StageStarted(job="j", ts=second, worker="w", stage="denoise", seq=1)]
    ts = second
    for step in range(20):
        ts += (60 if step == 10 else 1) * second // 10  # one slow step, between issues
        events.append(StepEnded(job="j", ts=ts, worker="w", step=step, total_steps=20,
                                duration_s=(6.0 if step == 10 else 0.1), seq=2 + step))
    events.append(StageEnded(job="j", ts=ts, worker="w", stage="denoise", duration_s=7.9,
                             seq=22))
    view = LiveView()
    shown: list[float] = []
    for event in events:
        view.push(event)
        current = view.progress("j")
        assert current is not None and current.progress is not None
        shown.append(current.progress)
    projection = EtaProjection()
    state = projection.initial()
    for event in events:
        state = projection.apply(state, event)
    read = view._states["eta"].running["j"].issued
    assert read == state.running["j"].issued
    assert shown == sorted(shown)
