"""On CUDA: the instrumentation adds no device synchronisation (skipped where there is no GPU).

``torch.cuda.set_sync_debug_mode("error")`` turns every synchronising call into an exception,
so an instrumented pipeline that completes under it proves wantel's hooks, marks and memory
reads never wait on the device. The plain pipeline is tried under the same mode first: if the
pipeline itself synchronises (some diffusers versions do), there is nothing to compare against
and the test says so instead of passing.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from inference.instrument import instrument
from inference.tiny_models import build_tiny_pipeline
from telemetry.events import JobCompleted, StepEnded
from telemetry.log.memory import MemoryLog
from tests.telemetry.log_contract import events_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _run(pipe: Any) -> Any:
    return pipe(prompt="x", height=32, width=32, num_frames=9, num_inference_steps=4,
                output_type="latent",
                generator=torch.Generator(device="cuda").manual_seed(0)).frames


def _syncs_allowed(pipe: Any) -> bool:
    """Whether the plain pipeline itself completes under sync-debug "error"."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run(pipe)
        return True
    except RuntimeError:
        return False
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_instrumentation_adds_no_synchronisation() -> None:
    """Where the plain pipeline runs under sync-debug "error", the instrumented one does too."""
    pipe = build_tiny_pipeline("tiny-t2v-a14b").to("cuda")
    _run(pipe)  # warm-up outside the debug mode
    if not _syncs_allowed(pipe):
        pytest.skip("this diffusers build synchronises inside the pipeline itself")
    log = MemoryLog()
    with instrument(pipe, log=log, job="cuda"):
        torch.cuda.set_sync_debug_mode("error")
        try:
            _run(pipe)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    events = events_of(log.read())
    steps = [e for e in events if isinstance(e, StepEnded)]
    assert 4 == len(steps)
    assert all(s.duration_s is not None and s.duration_s > 0 for s in steps)
    assert isinstance(events[-1], JobCompleted)
