"""Tiny real jobs for end-to-end tests, including one that pauses mid-denoise on request.

The pause is a test-only hook: the caller's own ``callback_on_step_end`` (which ``instrument``
runs after its own per-step recording) blocks on a :class:`threading.Event`. Production code
has no pause hook and needs none.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from telemetry.emitter import Emitter
from telemetry.events import JobQueued, JobStarted
from telemetry.log.local import LocalLog
from telemetry.tracing import trace_id_for

HOLD_S = 120.0  # the longest a paused job waits for its release (a failed test never hangs)


@dataclass
class PausedJob:
    """A job held at a step: ``paused`` is set when it waits, ``release`` lets it finish."""

    job: str
    paused: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)


def run_tiny_jobs(log_dir: Path, out_dir: Path, variants: Sequence[str], *,
                  prefix: str = "job") -> list[str]:
    """Run one tiny job per variant through ``generate()`` (the ``wantel run`` path)."""
    import torch

    from inference.runner import GenerationRequest, generate, prepare
    from inference.tiny_models import variant_spec

    torch.set_num_threads(1)
    image = out_dir / "condition.png"
    if not image.exists():
        from PIL import Image

        Image.new("RGB", (32, 32), (90, 140, 200)).save(image)
    jobs: list[str] = []
    log = LocalLog(log_dir, create=False, fsync="never")
    try:
        with Emitter(log, flush_interval=0.02) as emitter:
            for index, variant in enumerate(variants):
                spec = variant_spec(variant)
                size = 32 if spec.spatial_multiple <= 32 else spec.spatial_multiple
                job = f"{prefix}-{index}-{variant}"
                request = GenerationRequest(
                    model=variant, prompt="waves at dusk", frames=5 if spec.video else 1,
                    height=size, width=size, steps=3, guidance=4.0 if index % 2 else 1.0,
                    job=job, device="cpu", image=str(image) if spec.needs_image else None,
                    out=str(out_dir / f"{job}{'.mp4' if spec.video else '.png'}"))
                generate(prepare(request), emitter)
                jobs.append(job)
    finally:
        log.close()
    return jobs


@contextmanager
def paused_job(log_dir: Path, job: str, *, steps: int = 6, pause_at: int = 2,
               model: str = "tiny-t2v") -> Iterator[PausedJob]:
    """A tiny job in a thread that blocks after step ``pause_at`` until released.

    Leaving the context releases it and waits for it to finish; errors it raised are kept in
    ``PausedJob.errors`` for the caller to assert on.
    """
    handle = PausedJob(job)

    def hold(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if index == pause_at:
            handle.paused.set()
            handle.release.wait(HOLD_S)
        return {}

    def work() -> None:
        import torch

        from inference.instrument import instrument
        from inference.tiny_models import build_tiny_pipeline

        torch.set_num_threads(1)
        log = LocalLog(log_dir, create=False, fsync="never")
        try:
            pipe = build_tiny_pipeline(model)
            with Emitter(log, flush_interval=0.02) as emitter, \
                    instrument(pipe, emitter=emitter, job=job, model=model, variant=model):
                pipe(prompt="a held job", height=32, width=32, num_frames=5,
                     num_inference_steps=steps, guidance_scale=1.0, output_type="np",
                     callback_on_step_end=hold)
        except BaseException as exc:
            handle.errors.append(exc)
            handle.paused.set()  # never leave a waiter hanging on a job that died
        finally:
            log.close()

    thread = threading.Thread(target=work, name=f"paused-{job}", daemon=True)
    thread.start()
    try:
        yield handle
    finally:
        handle.release.set()
        thread.join(timeout=60)


def run_out_of_memory_job(log_dir: Path, job: str, *, model: str = "tiny-cogvideox") -> None:
    """A tiny job that fails as ``oom_device`` at step 1: the test raises
    ``torch.OutOfMemoryError`` from the caller's own step callback (no GPU here), the way
    ``tests/inference/test_failures.py`` injects it; ``instrument`` records the failure."""
    import pytest
    import torch

    from inference.instrument import instrument
    from inference.tiny_models import build_tiny_pipeline

    def fail(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if index == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {}

    torch.set_num_threads(1)
    log = LocalLog(log_dir, create=False, fsync="never")
    try:
        pipe = build_tiny_pipeline(model)
        with Emitter(log, flush_interval=0.02) as emitter, \
                instrument(pipe, emitter=emitter, job=job, model=model, variant=model), \
                pytest.raises(torch.OutOfMemoryError):
            pipe(prompt="too big", height=32, width=32, num_frames=5, num_inference_steps=3,
                 guidance_scale=1.0, output_type="np", callback_on_step_end=fail)
    finally:
        log.close()


def run_traces(log_dir: Path, jobs: list[str]) -> set[str]:
    """The trace ids of ``jobs``' runs in the log: keyed by the ``ts`` of each run's opening
    event (its JobQueued, else its JobStarted: :func:`telemetry.tracing.trace_id_for`)."""
    opened: dict[str, int] = {}
    for item in LocalLog(log_dir, create=False).read():
        for event in getattr(item, "events", ()):
            if event.job in jobs and event.job not in opened and isinstance(
                    event, JobQueued | JobStarted):
                opened[event.job] = event.ts
    return {trace_id_for(job, None, ts) for job, ts in opened.items()}
