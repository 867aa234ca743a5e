"""Failed jobs say why (a category) and what to try (suggestions with numbers), in every view:
the event, ``/api/jobs/{id}``, ``wantel run``'s last line, the trace's status, the log line."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from exporters.logs import LifecycleLogger
from exporters.otel import spans_for_job
from exporters.service import summarize
from inference.instrument import instrument
from inference.runner import GenerationRequest, generate, prepare
from inference.tiny_models import build_tiny_pipeline
from telemetry.emitter import Emitter
from telemetry.engine import ProjectionEngine
from telemetry.events import Event, JobFailed
from telemetry.log.base import Batch
from telemetry.log.local import LocalLog
from telemetry.log.memory import MemoryLog
from telemetry.projections import default_projections
from tests.telemetry.log_contract import events_of
from wantel.cli import main

#: What the failures these tests cause raise (OutOfMemoryError is a RuntimeError).
RAISED = (RuntimeError, MemoryError, OSError, ValueError, FloatingPointError)


def _call(variant: str, **extra: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "prompt": "a red fox running through snow", "height": 32, "width": 32, "num_frames": 9,
        "num_inference_steps": 4, "guidance_scale": 5.0,
        "generator": torch.Generator().manual_seed(7), "output_type": "np"}
    return {**kwargs, **extra}


def _raising_at(step: int, exc: BaseException) -> Any:
    """A step callback that raises ``exc`` after step ``step`` (the test hook)."""
    def callback(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> Any:
        if index == step:
            raise exc
        return {}
    return callback


def _failed(pipe: Any, **call: Any) -> tuple[JobFailed, list[Event]]:
    log = MemoryLog()
    with instrument(pipe, log=log, job="job-1") as handle, pytest.raises(RAISED):
        pipe(**call)
    assert ["job-1"] == handle.jobs
    events = [e for e in events_of(log.read()) if e.job == "job-1"]
    failed = [e for e in events if isinstance(e, JobFailed)]
    assert 1 == len(failed)
    return failed[0], events


def _api_error(events: list[Event]) -> dict[str, Any]:
    engine = ProjectionEngine(default_projections())
    engine.apply_batch(Batch(0, tuple(events)))
    view = summarize(engine.states, events[0].job)
    assert view is not None
    error: dict[str, Any] = view["error"]
    return error


@pytest.fixture(name="t2v", scope="module")
def _t2v() -> Any:
    return build_tiny_pipeline("tiny-t2v")


class TestCategories:
    def test_device_oom_at_step_k(self, t2v: Any) -> None:
        """A torch.OutOfMemoryError raised after step 2 is oom_device, at step 3, with fewer
        frames and a smaller size named in numbers."""
        failed, events = _failed(t2v, **_call("tiny-t2v", callback_on_step_end=_raising_at(
            2, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))))
        assert ("oom_device", 3, True) == (failed.category, failed.step, failed.oom)
        assert "9 → 5 frames" in failed.suggestions
        assert "32x32 → 16x16" in failed.suggestions
        error = _api_error(events)
        assert "oom_device" == error["category"]
        assert list(failed.suggestions) == error["suggestions"]

    def test_host_memory_error(self, t2v: Any) -> None:
        """A host MemoryError ("Unable to allocate 12 GiB") is oom_host, not a device OOM, and
        names the size it could not allocate."""
        failed, _ = _failed(t2v, **_call("tiny-t2v", callback_on_step_end=_raising_at(
            1, MemoryError("Unable to allocate 12.0 GiB for an array with shape (3, 2)"))))
        assert ("oom_host", False) == (failed.category, failed.oom)
        assert "free host memory: the job could not allocate 12.0 GiB more" == \
            failed.suggestions[0]
        assert "9 → 5 frames" in failed.suggestions

    def test_nan_latents(self, t2v: Any) -> None:
        """Latents that became NaN fail the job before the decode, as numerical, with a lower
        guidance named."""
        def poison(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> Any:
            return {"latents": tensors["latents"] * float("nan")} if index == 1 else {}

        failed, _ = _failed(t2v, **_call("tiny-t2v", callback_on_step_end=poison))
        assert ("numerical", "decode", "NonFiniteLatents") == (
            failed.category, failed.stage, failed.error_type)
        assert "--guidance 5 → 3.5" in failed.suggestions

    def test_unreadable_image(self, tmp_path: Path) -> None:
        """A truncated image given to an i2v pipeline is invalid_input, with the size limit."""
        path = tmp_path / "cut.png"
        Image.new("RGB", (32, 32), (200, 40, 40)).save(path)
        path.write_bytes(path.read_bytes()[:60])
        pipe = build_tiny_pipeline("tiny-i2v")
        failed, events = _failed(pipe, **_call("tiny-i2v", image=Image.open(path)))
        assert "invalid_input" == failed.category
        assert any("8192x8192" in line for line in failed.suggestions)
        assert "invalid_input" == _api_error(events)["category"]

    def test_missing_model_component(self, tmp_path: Path) -> None:
        """A model directory missing a component folder fails in load, as model_load."""
        build_tiny_pipeline("tiny-t2v").save_pretrained(tmp_path / "model")
        shutil.rmtree(tmp_path / "model" / "transformer")
        log = LocalLog(tmp_path / "log")
        emitter = Emitter(log, worker="w")
        prepared = prepare(GenerationRequest(model=str(tmp_path / "model"), prompt="p",
                                             frames=9, height=32, width=32, steps=2,
                                             out=str(tmp_path / "v.mp4")))
        with pytest.raises(RAISED):
            generate(prepared, emitter)
        emitter.close()
        failed = [e for e in events_of(log.read()) if isinstance(e, JobFailed)]
        assert ("model_load", "load") == (failed[0].category, failed[0].stage)
        assert any("5" in line for line in failed[0].suggestions)
        assert str(tmp_path) not in " ".join(failed[0].suggestions)


class TestViews:
    def test_run_prints_category_and_suggestions(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str],
            monkeypatch: pytest.MonkeyPatch) -> None:
        """``wantel run``'s last line and ``--json`` carry the category and the suggestions."""
        from inference import runner

        original = runner._call

        def oom_at_step_1(pipe: Any, prepared: Any) -> Any:
            hook = _raising_at(1, torch.OutOfMemoryError("CUDA out of memory"))
            return original(_Calling(lambda **kw: pipe(**kw, callback_on_step_end=hook)),
                            prepared)

        monkeypatch.setattr(runner, "_call", oom_at_step_1)
        code = main(["run", "--model", "tiny-t2v", "--prompt", "p", "--frames", "17",
                     "--steps", "3", "--log", str(tmp_path / "log"),
                     "--out", str(tmp_path / "v.mp4")])
        err = capsys.readouterr().err
        assert 1 == code
        assert "[oom_device]; try: 17 → 9 frames; 64x64 → 48x48" in err

    def test_trace_status_and_log_line(self, t2v: Any) -> None:
        """The trace's status description and the lifecycle log line carry them too."""
        from structlog.testing import capture_logs

        failed, events = _failed(t2v, **_call("tiny-t2v", callback_on_step_end=_raising_at(
            0, torch.OutOfMemoryError("CUDA out of memory"))))
        spans = spans_for_job(events)
        root = next(s for s in spans if s.parent is None)
        assert root.status.description is not None
        assert "[oom_device]; try: 9 → 5 frames" in root.status.description
        with capture_logs() as logs:
            LifecycleLogger().handle(events)
        line = next(entry for entry in logs if entry.get("event") == "job.failed")
        assert ("oom_device", list(failed.suggestions)) == (line["category"],
                                                            line["suggestions"])


class _Calling:
    """A stand-in pipeline whose call goes through ``patched``."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __call__(self, **kwargs: Any) -> Any:
        return self._call(**kwargs)
