"""Instrumenting real (tiny) diffusers Wan pipelines: stages, steps, experts, failures, detach."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from inference import instrument as instrument_module
from inference.instrument import JobCancelledError, JobIdInUse, instrument
from inference.recorder import WITHHELD
from inference.runner import GenerationRequest, generate, prepare
from inference.tiny_models import TINY_VARIANTS, build_tiny_pipeline, variant_spec
from telemetry.emitter import Emitter
from telemetry.events import (
    Event,
    ExpertSwitched,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobStarted,
    MemorySampled,
    StageEnded,
    StageProgress,
    StageStarted,
    StepEnded,
)
from telemetry.log.local import LocalLog
from telemetry.log.memory import MemoryLog
from tests.telemetry.log_contract import events_of

STEPS = 6
SIZE = {"tiny-ti2v": 64}  # multiples of 32 for TI2V; 32 px elsewhere


def call_kwargs(variant: str, *, guidance: float = 5.0, steps: int = STEPS) -> dict[str, Any]:
    """Arguments of a small, seeded call of ``variant``."""
    size = SIZE.get(variant, 32)
    kwargs: dict[str, Any] = {
        "prompt": "a red fox running through snow", "height": size, "width": size,
        "num_frames": 9, "num_inference_steps": steps, "guidance_scale": guidance,
        "generator": torch.Generator().manual_seed(7), "output_type": "np",
    }
    if variant_spec(variant).needs_image:
        kwargs["image"] = Image.new("RGB", (size, size), (200, 40, 40))
    return kwargs


def recorded(pipe: Any, variant: str, **call: Any) -> tuple[list[Event], Any]:
    """Run ``pipe`` once under instrumentation; the job's events and the output."""
    log = MemoryLog()
    with instrument(pipe, log=log, job="job-1", model=variant) as handle:
        output = pipe(**{**call_kwargs(variant), **call}).frames
    assert ["job-1"] == handle.jobs
    return [e for e in events_of(log.read()) if e.job == "job-1"], output


def of_type(events: list[Event], cls: type[Event]) -> list[Any]:
    """The events of one type."""
    return [e for e in events if isinstance(e, cls)]


def expected_switch_step(pipe: Any, steps: int) -> int | None:
    """Where the scheduler's own schedule crosses the boundary (computed independently)."""
    ratio = pipe.config.get("boundary_ratio")
    if ratio is None:
        return None
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    boundary = ratio * scheduler.config.num_train_timesteps
    return next(i for i, t in enumerate(scheduler.timesteps) if t < boundary)


@pytest.mark.parametrize("variant", [v for v in TINY_VARIANTS if variant_spec(v).video])
class TestEveryVariant:
    def test_stages_steps_experts_and_memory(self, variant: str) -> None:
        """Stages in order, one StepEnded per step, the expert switch where the schedule says."""
        pipe = build_tiny_pipeline(variant)
        events, _ = recorded(pipe, variant)
        spec = variant_spec(variant)

        assert isinstance(events[0], JobStarted)
        assert isinstance(events[-1], JobCompleted)
        assert list(range(len(events))) == [e.seq for e in events]
        stages = [e.stage for e in of_type(events, StageStarted)]
        expected = ["text_encode", *(["image_encode"] if variant == "tiny-i2v" else []),
                    "latent_init", "denoise", "decode", "postprocess"]
        assert expected == stages
        assert stages == [e.stage for e in of_type(events, StageEnded)]
        assert all(e.ok and e.duration_s >= 0 for e in of_type(events, StageEnded))

        steps = of_type(events, StepEnded)
        assert list(range(STEPS)) == [s.step for s in steps]
        assert {STEPS} == {s.total_steps for s in steps}
        assert all(s.duration_s is not None and s.duration_s > 0 for s in steps)
        assert all(s.timestep is not None and s.sigma is not None for s in steps)

        switch = expected_switch_step(pipe, STEPS)
        switches = of_type(events, ExpertSwitched)
        if spec.two_experts:
            assert [(switch, "high_noise", "low_noise")] == [
                (e.step, e.from_expert, e.to_expert) for e in switches]
            assert ["high_noise"] * switch + ["low_noise"] * (STEPS - switch) == [
                s.expert for s in steps]
        else:
            assert [] == switches
            assert {None} == {s.expert for s in steps}

        samples = of_type(events, MemorySampled)
        assert {s.step for s in samples if s.step is not None} == set(range(STEPS))
        assert all((s.host_peak_rss_bytes or 0) > 0 for s in samples)
        assert all((s.host_rss_bytes or 0) > 0 for s in samples if s.stage is not None)

        started = events[0]
        assert (variant, spec.family, spec.task, STEPS, True) == (
            started.model, started.family, started.task, started.steps, started.cfg)
        # A Wan transformer's width tells its size: these tiny ones are their tiny variant.
        assert "wan" not in spec.family or variant == started.variant
        assert "wan" in spec.family or {1} == {s.passes for s in steps}  # CFG batched

    def test_the_decode_reports_its_pieces(self, variant: str) -> None:
        """Wan's VAE decodes one latent frame at a time (17 frames, 5 latent: 5 pieces),
        CogVideoX's two at a time, the remainder with the first (5 latent frames: 2 pieces):
        one ``StageProgress`` per piece, in order, between the decode's start and end, each
        stamped no earlier than the one before."""
        events, _ = recorded(build_tiny_pipeline(variant), variant, num_frames=17)
        pieces = of_type(events, StageProgress)
        total = 5 if "wan" in variant_spec(variant).family else 2
        assert [("decode", k, total) for k in range(1, total + 1)] == [
            (p.stage, p.done, p.total) for p in pieces]
        kinds = [(type(e), getattr(e, "stage", None)) for e in events]
        start = kinds.index((StageStarted, "decode"))
        end = kinds.index((StageEnded, "decode"))
        assert all(start < events.index(p) < end for p in pieces)
        stamps = [events[start].ts, *(p.ts for p in pieces), events[end].ts]
        assert stamps == sorted(stamps)

    def test_outputs_are_bit_identical_with_and_without_wantel(self, variant: str) -> None:
        """Instrumentation never changes what the pipeline computes."""
        pipe = build_tiny_pipeline(variant)
        plain = pipe(**call_kwargs(variant)).frames
        _, instrumented = recorded(pipe, variant)
        assert np.array_equal(plain, instrumented)


class TestImageModels:
    def test_an_image_models_decode_reports_no_pieces(self) -> None:
        """An image VAE decodes in one pass: its decode is one stage, with no pieces."""
        log = MemoryLog()
        pipe = build_tiny_pipeline("tiny-sd")
        with instrument(pipe, log=log, job="job-1", model="tiny-sd"):
            pipe(prompt="a red fox", height=32, width=32, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(7), output_type="np")
        events = [e for e in events_of(log.read()) if e.job == "job-1"]
        assert any(isinstance(e, StageEnded) and e.stage == "decode" for e in events)
        assert [] == of_type(events, StageProgress)


class TestPasses:
    @pytest.mark.parametrize(("guidance", "passes"), [(5.0, 2), (1.0, 1)])
    def test_guidance_doubles_transformer_passes(self, guidance: float, passes: int) -> None:
        """Classifier-free guidance runs the transformer twice per step; none runs it once."""
        pipe = build_tiny_pipeline("tiny-t2v")
        events, _ = recorded(pipe, "tiny-t2v", guidance_scale=guidance)
        assert {passes} == {s.passes for s in of_type(events, StepEnded)}
        assert (guidance > 1) == events[0].cfg


class TestFailureAndCancellation:
    @pytest.mark.parametrize("k", [0, 3])
    def test_exception_in_the_transformer_at_step_k(self, k: int) -> None:
        """JobFailed names stage denoise and step k; the very same exception reaches the caller."""
        pipe = build_tiny_pipeline("tiny-t2v")
        calls = {"n": 0}
        boom = RuntimeError("CUDA error: an illegal memory access (simulated)")

        def explode(module: Any, args: Any) -> None:
            calls["n"] += 1
            if calls["n"] == 2 * k + 1:  # first pass of step k (two passes per step)
                raise boom

        hook = pipe.transformer.register_forward_pre_hook(explode)
        log = MemoryLog()
        try:
            with pytest.raises(RuntimeError) as raised, instrument(pipe, log=log, job="j"):
                pipe(**call_kwargs("tiny-t2v"))
        finally:
            hook.remove()
        assert raised.value is boom
        events = events_of(log.read())
        failed = events[-1]
        assert isinstance(failed, JobFailed)
        assert ("denoise", k, "RuntimeError", False) == (
            failed.stage, failed.step, failed.error_type, failed.oom)
        assert "illegal memory access" in failed.message
        assert k == len(of_type(events, StepEnded))

    def test_failure_message_never_holds_the_prompt(self) -> None:
        """An error message that echoes the prompt is withheld before it is stored."""
        pipe = build_tiny_pipeline("tiny-t2v")
        prompt = "my secret storyboard prompt"

        def explode(module: Any, args: Any) -> None:
            raise ValueError(f"bad input for {prompt!r}")

        hook = pipe.transformer.register_forward_pre_hook(explode)
        log = MemoryLog()
        try:
            with pytest.raises(ValueError), instrument(pipe, log=log):
                pipe(**{**call_kwargs("tiny-t2v"), "prompt": prompt})
        finally:
            hook.remove()
        (failed,) = of_type(events_of(log.read()), JobFailed)
        assert WITHHELD == failed.message
        (started,) = of_type(events_of(log.read()), JobStarted)
        assert started.prompt is None and started.prompt_sha256 is not None

    def test_a_prompt_quoted_with_its_newlines_escaped_is_withheld(self) -> None:
        """The repr of a multi-line prompt (newline escaped) used to pass exact-substring
        redaction; the message is now withheld whole."""
        pipe = build_tiny_pipeline("tiny-t2v")
        prompt = "scene one: a lighthouse\nscene two: the storm arrives"

        def explode(module: Any, args: Any) -> None:
            raise ValueError(f"cannot schedule {prompt!r}")

        hook = pipe.transformer.register_forward_pre_hook(explode)
        log = MemoryLog()
        try:
            with pytest.raises(ValueError), instrument(pipe, log=log):
                pipe(**{**call_kwargs("tiny-t2v", steps=2), "prompt": prompt})
        finally:
            hook.remove()
        (failed,) = of_type(events_of(log.read()), JobFailed)
        assert (WITHHELD, "ValueError") == (failed.message, failed.error_type)

    def test_a_prompt_with_a_lone_surrogate_is_recorded_like_any_other(self) -> None:
        """Plain diffusers accepts it; with wantel the call used to raise UnicodeEncodeError in
        the prompt digest. Now the job runs and is recorded whole, with a digest."""
        pipe = build_tiny_pipeline("tiny-t2v")
        prompt = "a fox \ud800 in snow"
        plain = pipe(**{**call_kwargs("tiny-t2v", steps=2), "prompt": prompt}).frames
        events, output = recorded(pipe, "tiny-t2v", prompt=prompt, num_inference_steps=2)
        assert np.array_equal(plain, output)
        assert isinstance(events[-1], JobCompleted)
        assert 64 == len(events[0].prompt_sha256 or "")

    def test_cancel_stops_at_the_next_step_boundary(self) -> None:
        """cancel() during step k: JobCancelled with k+1 steps done, no decode, and it raises."""
        pipe = build_tiny_pipeline("tiny-t2v")
        log = MemoryLog()
        with instrument(pipe, log=log, job="j") as handle:

            def cancel_at_2(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
                if i == 2:
                    handle.cancel("user asked")
                return {}

            with pytest.raises(JobCancelledError, match="user asked"):
                pipe(**call_kwargs("tiny-t2v"), callback_on_step_end=cancel_at_2)
        events = events_of(log.read())
        cancelled = events[-1]
        assert isinstance(cancelled, JobCancelled)
        assert ("denoise", 3, "user asked") == (cancelled.stage, cancelled.step, cancelled.reason)
        assert "decode" not in [e.stage for e in of_type(events, StageStarted)]

    def test_pipeline_interrupt_flag_is_reported_as_cancelled(self) -> None:
        """Setting diffusers' own interrupt flag ends the job as cancelled, not completed."""
        pipe = build_tiny_pipeline("tiny-t2v")

        def interrupt_at_1(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
            if i == 1:
                p._interrupt = True
            return {}

        events, _ = recorded(pipe, "tiny-t2v", callback_on_step_end=interrupt_at_1)
        assert isinstance(events[-1], JobCancelled)
        assert "interrupted" == events[-1].reason
        assert 2 == len(of_type(events, StepEnded))

    def test_users_own_callback_still_runs_and_sees_tensors(self) -> None:
        """A caller's callback gets its tensors and can still change latents."""
        pipe = build_tiny_pipeline("tiny-t2v")
        seen: list[tuple[int, tuple[int, ...]]] = []

        def mine(p: Any, i: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
            seen.append((i, tuple(kw["latents"].shape)))
            return {}

        recorded(pipe, "tiny-t2v", callback_on_step_end=mine)
        assert list(range(STEPS)) == [i for i, _ in seen]


class TestDetach:
    def test_leaving_the_context_restores_the_pipeline(self) -> None:
        """No subclass, hooks or wrapped methods remain; later calls emit nothing."""
        pipe = build_tiny_pipeline("tiny-t2v-a14b")
        original_class = type(pipe)
        log = MemoryLog()
        with instrument(pipe, log=log):
            assert type(pipe) is not original_class
        assert type(pipe) is original_class
        assert type(pipe).__name__ == "WanPipeline"
        for module in (pipe.transformer, pipe.transformer_2):
            assert not module._forward_pre_hooks
        assert "decode" not in vars(pipe.vae)
        assert "encode_prompt" not in vars(pipe)
        assert "set_timesteps" not in vars(pipe.scheduler)
        pipe(**call_kwargs("tiny-t2v-a14b"))
        assert [] == [e for e in events_of(log.read()) if not e.job.startswith("worker/")]

    def test_each_call_is_a_job(self) -> None:
        """Two calls in one context are two jobs, named job, job-2."""
        pipe = build_tiny_pipeline("tiny-t2v")
        log = MemoryLog()
        with instrument(pipe, log=log, job="clip") as handle:
            pipe(**call_kwargs("tiny-t2v", steps=2))
            pipe(**call_kwargs("tiny-t2v", steps=2))
        assert ["clip", "clip-2"] == handle.jobs
        completed = [e.job for e in of_type(events_of(log.read()), JobCompleted)]
        assert ["clip", "clip-2"] == completed

    def test_a_job_id_the_log_already_has_is_refused_before_the_pipeline_runs(
        self, tmp_path: Path
    ) -> None:
        """A second ``instrument(job="clip")`` on one log raises JobIdInUse on entry (its
        events would all be dropped as duplicates); the pipeline is not called."""
        pipe = build_tiny_pipeline("tiny-t2v")
        with instrument(pipe, log=LocalLog(tmp_path / "log"), job="clip"):
            pipe(**call_kwargs("tiny-t2v", steps=2))
        calls: list[int] = []
        hook = pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
        try:
            with pytest.raises(JobIdInUse, match="'clip' is already in the log"), instrument(
                pipe, log=LocalLog(tmp_path / "log"), job="clip"
            ):
                pipe(**call_kwargs("tiny-t2v", steps=2))
        finally:
            hook.remove()
        assert [] == calls
        assert type(pipe).__name__ == "WanPipeline" and "_wantel_instrumented" not in vars(
            type(pipe))

    def test_an_id_still_queued_in_a_shared_emitter_is_in_use_too(self) -> None:
        """The emitter's own events count, not only what reached the log."""
        pipe = build_tiny_pipeline("tiny-t2v")
        log = MemoryLog()
        with Emitter(log, heartbeat_interval=None) as emitter:
            with instrument(pipe, emitter=emitter, job="same"):
                pipe(**call_kwargs("tiny-t2v", steps=2))
            with pytest.raises(JobIdInUse), instrument(pipe, emitter=emitter, job="same"):
                pass

    def test_a_queued_job_starts_under_the_id_it_was_queued_with(self, tmp_path: Path) -> None:
        """Only a JobQueued of the id (docs/api.md's flow) does not make it in use, whether
        it is still in the emitter or already in the log."""
        from telemetry.events import JobQueued

        pipe = build_tiny_pipeline("tiny-t2v")
        log = LocalLog(tmp_path / "log")
        with Emitter(log, heartbeat_interval=None) as emitter:
            emitter.emit(JobQueued(job="req-1", ts=1, model="m", task="t2v"))
            with instrument(pipe, emitter=emitter, job="req-1"):
                pipe(**call_kwargs("tiny-t2v", steps=2))
            emitter.emit(JobQueued(job="req-2", ts=1, model="m", task="t2v"))
            assert emitter.flush(10)
            with instrument(pipe, emitter=emitter, job="req-2"):
                pipe(**call_kwargs("tiny-t2v", steps=2))
        completed = [e.job for e in of_type(events_of(log.read()), JobCompleted)]
        assert ["req-1", "req-2"] == completed

    def test_later_calls_take_the_next_free_number(self, tmp_path: Path) -> None:
        """When ``clip-2`` is taken, the context's second call becomes ``clip-3``."""
        pipe = build_tiny_pipeline("tiny-t2v")
        log = LocalLog(tmp_path / "log")
        with instrument(pipe, log=log, job="clip-2"):
            pipe(**call_kwargs("tiny-t2v", steps=2))
        with instrument(pipe, log=LocalLog(tmp_path / "log"), job="clip") as handle:
            pipe(**call_kwargs("tiny-t2v", steps=2))
            pipe(**call_kwargs("tiny-t2v", steps=2))
        assert ["clip", "clip-3"] == handle.jobs

    @pytest.mark.parametrize("job", ["worker/host:1", "wantel/eta", "wantel/anything", "",
                                     "bad \udc80 id"])
    def test_reserved_and_unencodable_ids_are_refused(self, job: str) -> None:
        """The log's own streams cannot be taken by a job; nor can an id no encoder takes."""
        with pytest.raises(ValueError, match=r"reserved|non-empty|surrogate"), instrument(
            build_tiny_pipeline("tiny-t2v"), log=MemoryLog(), job=job
        ):
            pass

    def test_pipeline_without_step_callback_is_refused(self) -> None:
        """wantel says plainly when a pipeline offers no way to see its steps."""

        class NoCallback:
            def __call__(self, prompt: str) -> None: ...

        with pytest.raises(TypeError, match="callback_on_step_end"), instrument(
            NoCallback(), log=MemoryLog()
        ):
            pass


class TestRunner:
    @pytest.mark.parametrize("variant", ["tiny-t2v", "tiny-i2v-a14b"])
    def test_whole_job_is_recorded_and_the_video_decodes(
        self, variant: str, tmp_path: Path
    ) -> None:
        """load → … → save, and the mp4 holds the requested number of frames."""
        image = tmp_path / "in.png"
        Image.new("RGB", (32, 32), (10, 200, 30)).save(image)
        request = GenerationRequest(
            model=variant, prompt="waves", frames=13, height=32, width=32, steps=3,
            out=str(tmp_path / "out.mp4"), job="run-1",
            image=str(image) if variant_spec(variant).needs_image else None)
        log = MemoryLog()
        with Emitter(log) as emitter:
            outcome = generate(prepare(request), emitter)
        events = events_of(log.read())
        stages = [e.stage for e in of_type(events, StageStarted)]
        assert "load" == stages[0] and "save" == stages[-1]
        completed = [e for e in events if e.job == "run-1"][-1]  # (WorkerStopped ends the log)
        assert isinstance(completed, JobCompleted)
        assert (str(tmp_path / "out.mp4"), 13) == (completed.output_path, completed.frames)
        assert completed.bytes == (tmp_path / "out.mp4").stat().st_size
        assert 13 == outcome.frames
        assert 13 == len(list(iio.imiter(tmp_path / "out.mp4")))

    def test_job_started_comes_first_and_carries_the_loaded_pipelines_options(
        self, tmp_path: Path
    ) -> None:
        """JobStarted is written once the pipeline is loaded (its options are read from it) but
        is stamped at the job's start and stays the job's first event, before ``load``."""
        request = GenerationRequest(model="tiny-t2v", prompt="p", frames=5, height=32, width=32,
                                    steps=2, out=str(tmp_path / "out.mp4"), job="first",
                                    dtype="bfloat16")
        log = MemoryLog()
        with Emitter(log) as emitter:
            generate(prepare(request), emitter)
        events = [e for e in events_of(log.read()) if e.job == "first"]
        started, load = events[0], events[1]
        assert isinstance(started, JobStarted) and isinstance(load, StageStarted)
        assert ("load", 0) == (load.stage, started.seq)
        assert started.ts <= load.ts
        assert ("bfloat16", "none", False, 1, "load,save") == tuple(
            started.options[k] for k in ("dtype", "offload", "compiled", "num_videos", "stages"))

    def test_a_failed_load_still_starts_the_job_with_what_it_asked_for(
        self, tmp_path: Path
    ) -> None:
        """A model directory whose weights are corrupt fails in ``load``: the job still has its
        JobStarted (with the options it asked for: no pipeline exists to read them from),
        then the failed stage."""
        build_tiny_pipeline("tiny-t2v").save_pretrained(tmp_path / "model")
        for weights in (tmp_path / "model" / "transformer").glob("*.safetensors"):
            weights.write_bytes(b"not safetensors")
        request = GenerationRequest(model=str(tmp_path / "model"), prompt="p", frames=5,
                                    height=32, width=32, steps=2, vae_tiling=True,
                                    num_videos=3, out=str(tmp_path / "out.mp4"), job="bad")
        log = MemoryLog()
        with Emitter(log) as emitter, pytest.raises(OSError, match="Unable to load weights"):
            generate(prepare(request), emitter)
        events = [e for e in events_of(log.read()) if e.job == "bad"]
        assert [JobStarted, StageStarted, StageEnded] == [type(e) for e in events[:3]]
        assert {"offload": "none", "dtype": "float32", "compiled": False, "vae_tiling": True,
                "num_videos": 3, "stages": "load,save"} == events[0].options
        failed = events[-1]
        assert isinstance(failed, JobFailed) and "load" == failed.stage

    def test_a_killed_writer_leaves_a_job_that_is_not_completed(self, tmp_path: Path) -> None:
        """SIGKILL mid-denoise: the log replays, and the job is not shown as completed."""
        script = textwrap.dedent(f"""
            import os, signal, torch
            torch.set_num_threads(1)
            from inference.instrument import instrument
            from inference.tiny_models import build_tiny_pipeline
            from telemetry.log.local import LocalLog
            from telemetry.emitter import Emitter
            pipe = build_tiny_pipeline("tiny-t2v")
            emitter = Emitter(LocalLog({str(tmp_path / "log")!r}))
            def die(p, i, t, kw):
                if i == 2:
                    emitter.flush(10)
                    os.kill(os.getpid(), signal.SIGKILL)
                return {{}}
            with instrument(pipe, emitter=emitter, job="doomed"):
                pipe(prompt="x", height=32, width=32, num_frames=9, num_inference_steps=6,
                     callback_on_step_end=die, output_type="np")
        """)
        result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2],
                                capture_output=True, text=True, timeout=120,
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
        assert -signal.SIGKILL == result.returncode, result.stderr
        from telemetry.engine import ProjectionEngine
        from telemetry.projections.jobs import JobsProjection

        engine = ProjectionEngine([JobsProjection()])
        engine.apply_items(LocalLog(tmp_path / "log", create=False).read())
        view = engine.states["jobs"].jobs["doomed"]
        assert ("running", "denoise") == (view.status, view.stage)
        assert view.steps_done >= 2


def test_saved_pipeline_runs_through_wantel_run(tmp_path: Path) -> None:
    """A saved tiny pipeline loads offline from its directory via `wantel run --model PATH`."""
    build_tiny_pipeline("tiny-t2v-a14b").save_pretrained(tmp_path / "model")
    from wantel.cli import main

    code = main(["run", "--model", str(tmp_path / "model"), "--prompt", "x", "--frames", "5",
                 "--height", "32", "--width", "32", "--steps", "3", "--log", str(tmp_path / "log"),
                 "--out", str(tmp_path / "v.mp4"), "--json", "--job", "saved"])
    assert 0 == code
    events = events_of(LocalLog(tmp_path / "log", create=False).read())
    (started,) = of_type(events, JobStarted)
    # Its transformer is 24 wide: a tiny test model, labelled (and estimated) as one.
    assert ("wan2.2", "tiny-t2v-a14b", 0.875) == (started.family, started.variant,
                                                  started.boundary_ratio)
    assert 1 == len(of_type(events, ExpertSwitched))
    assert isinstance([e for e in events if e.job == "saved"][-1], JobCompleted)


class TestExecutionDevice:
    """wantel answers diffusers' ``_execution_device`` itself, in one pass over the modules
    (diffusers' walks cost milliseconds a call at real shapes): the answer must be diffusers'."""

    @pytest.mark.parametrize("variant", TINY_VARIANTS)
    def test_plain_pipelines(self, variant: str) -> None:
        pipe = build_tiny_pipeline(variant)
        assert pipe._execution_device == instrument_module._fast_execution_device(pipe)

    @pytest.mark.parametrize("enable", ["enable_model_cpu_offload",
                                        "enable_sequential_cpu_offload"])
    def test_accelerate_offload(self, enable: str) -> None:
        pipe = build_tiny_pipeline("tiny-t2v-a14b")
        getattr(pipe, enable)(device="cpu")
        assert pipe._execution_device == instrument_module._fast_execution_device(pipe)

    def test_group_offload(self) -> None:
        pipe = build_tiny_pipeline("tiny-t2v")
        pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"),
                                              offload_type="leaf_level")
        assert pipe._execution_device == instrument_module._fast_execution_device(pipe)

    def test_meta_components_fall_back_to_the_first(self) -> None:
        pipe = build_tiny_pipeline("tiny-t2v")
        pipe.vae.to("meta")
        assert pipe._execution_device == instrument_module._fast_execution_device(pipe)

    def test_a_class_that_overrides_it_is_asked(self) -> None:
        pipe = build_tiny_pipeline("tiny-t2v")

        class Elsewhere(type(pipe)):  # type: ignore[misc]
            @property
            def _execution_device(self) -> torch.device:
                return torch.device("meta")

        pipe.__class__ = Elsewhere
        assert instrument_module._fast_execution_device(pipe) is None
        assert torch.device("meta") == instrument_module._execution_device(pipe)
