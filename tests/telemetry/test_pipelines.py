"""Pipelines beyond Wan: honest family/task labels from the class, and an ETA of their own.

The ETA half folds synthetic but honest jobs (each phase takes what the family's neutral prior
expects times a factor) through the real ETA projection, as tests/telemetry/test_eta_online.py
does for Wan: a new family starts from a neutral prior, learns under its own keys, and never
moves Wan's expectations.
"""

from __future__ import annotations

import random

import msgspec
import pytest

from telemetry.engine import ProjectionEngine
from telemetry.eta.evaluate import StaticProfile, evaluate, online_starts
from telemetry.eta.jobs import job_records
from telemetry.eta.live import LiveJob, Prior, device_level
from telemetry.eta.model import (
    NEUTRAL_REL_SIGMA,
    PUBLISHED_STEP_PRIORS,
    STEP,
    Calibration,
    component_key,
    prior_coefficients,
)
from telemetry.eta.shape import JobShape
from telemetry.events import (
    DeviceInfo,
    Event,
    JobCompleted,
    JobStarted,
    StageEnded,
    StageStarted,
    StepEnded,
)
from telemetry.log.base import Batch
from telemetry.pipelines import (
    classify_pipeline,
    cost_family,
    geometry,
    is_video,
    native_fps,
)
from telemetry.projections import default_projections
from telemetry.projections.eta import EtaProjection

SECOND = 10**9


@pytest.mark.parametrize(
    ("pipeline_class", "expected"),
    [
        ("CogVideoXPipeline", ("cogvideox", "t2v", "t2v")),
        ("CogVideoXImageToVideoPipeline", ("cogvideox", "i2v", "i2v")),
        ("CogVideoXVideoToVideoPipeline", ("cogvideox", "v2v", "v2v")),
        ("LTXPipeline", ("ltx", "t2v", "t2v")),
        ("LTXImageToVideoPipeline", ("ltx", "i2v", "i2v")),
        ("HunyuanVideoPipeline", ("hunyuanvideo", "t2v", "t2v")),
        ("MochiPipeline", ("mochi", "t2v", "t2v")),
        ("StableVideoDiffusionPipeline", ("svd", "i2v", "i2v")),
        ("StableDiffusionPipeline", ("sd", "t2i", "t2i")),
        ("StableDiffusionImg2ImgPipeline", ("sd", "i2i", "i2i")),
        ("StableDiffusionInpaintPipeline", ("sd", "inpaint", "inpaint")),
        ("StableDiffusionXLPipeline", ("sdxl", "t2i", "t2i")),
        ("StableDiffusion3Pipeline", ("sd3", "t2i", "t2i")),
        ("FluxPipeline", ("flux", "t2i", "t2i")),
        ("PixArtAlphaPipeline", ("pixart", "t2i", "t2i")),
        ("SomeNewVideoPipeline", ("somenewvideo", "t2v", "t2v")),
        ("FooBarImg2ImgPipeline", ("foobar", "i2i", "i2i")),
        ("WanPipeline", ("wan2.1", "t2v", "t2v")),
        ("WanImageToVideoPipeline", ("wan2.1", "i2v", "i2v")),
    ],
)
def test_family_and_task_come_from_the_class(pipeline_class: str,
                                             expected: tuple[str, str, str]) -> None:
    """Every diffusers class gets its own family and task; only Wan classes are Wan."""
    assert expected == tuple(classify_pipeline(pipeline_class))


def test_wan_keeps_its_own_rules() -> None:
    """A Wan class still reads its configuration (experts, expand_timesteps, boundary)."""
    assert ("wan2.2", "t2v", "t2v-A14B") == tuple(classify_pipeline(
        "WanPipeline", two_experts=True, boundary_ratio=0.875))
    assert ("wan2.2", "ti2v", "ti2v-5B") == tuple(classify_pipeline(
        "WanPipeline", expand_timesteps=True))


def test_geometry_rate_and_cost_family() -> None:
    """Wan's latents and rates are unchanged; others have their own; Wan 2.1/2.2 learn as one."""
    assert ((4, 16), (4, 32), (4, 16), (8, 32), (1, 8)) == (
        geometry("wan2.1", "t2v"), geometry("wan2.2", "ti2v"), geometry("cogvideox", "t2v"),
        geometry("ltx", "t2v"), geometry("sd", "t2i"))
    assert (16, 24, 8, 16) == (native_fps("wan2.1", "t2v"), native_fps("wan2.2", "ti2v"),
                              native_fps("cogvideox", "t2v"), native_fps("unknownfam", "t2v"))
    assert ("wan", "wan", "cogvideox") == (cost_family("wan2.1"), cost_family("wan2.2"),
                                           cost_family("cogvideox"))
    assert (True, False) == (is_video("t2v"), is_video("t2i"))


def _started(job: str, ts: int, *, family: str, model: str, task: str, frames: int = 17
             ) -> JobStarted:
    return JobStarted(job=job, seq=0, ts=ts, model=model, family=family, variant=model,
                      task=task, width=64, height=64, num_frames=frames, steps=8,
                      guidance_scale=5.0, cfg=True, device=DeviceInfo(kind="cpu", name="cpu"),
                      options={"stages": ""})


def _job(job: str, ts: int, factor: float, *, family: str = "cogvideox",
         model: str = "tiny-cogvideox", task: str = "t2v", frames: int = 17) -> list[Event]:
    """One job whose phases each take ``factor`` × the family's prior (± 3 % seeded noise)."""
    rng = random.Random(job)
    started = _started(job, ts, family=family, model=model, task=task, frames=frames)
    prior = Prior.of(JobShape.of(started), False, Calibration())
    events: list[Event] = [started]
    for phase in prior.phases:
        events.append(StageStarted(job=job, ts=ts, stage=phase))
        begin = ts
        if phase == "denoise":
            for step in range(8):
                duration = prior.step * factor * rng.uniform(0.97, 1.03)
                ts += int(duration * SECOND)
                events.append(StepEnded(job=job, ts=ts, step=step, total_steps=8,
                                        duration_s=duration))
        else:
            ts += int(prior.expected[phase] * factor * rng.uniform(0.97, 1.03) * SECOND)
        events.append(StageEnded(job=job, ts=ts, stage=phase, duration_s=(ts - begin) / SECOND))
    events.append(JobCompleted(job=job, ts=ts + 1, duration_s=(ts + 1 - started.ts) / SECOND))
    return [msgspec.structs.replace(e, seq=seq) for seq, e in enumerate(events)]


def _series(count: int, factor: float, start: int = 0, **kwargs: str) -> list[Event]:
    events: list[Event] = []
    ts = start
    for index in range(count):
        job = _job(f"{kwargs.get('model', 'tiny-cogvideox')}-{index}", ts, factor, **kwargs)  # type: ignore[arg-type]
        events += job
        ts = job[-1].ts + SECOND
    return events


class TestNeutralPriorAndOnlineLearning:
    def test_a_new_family_never_gets_wans_priors_or_keys(self) -> None:
        """CogVideoX's components, device level and published-prior lookup are its own."""
        cog = JobShape.of(_started("c", 0, family="cogvideox", model="tiny-cogvideox",
                                   task="t2v"))
        wan = JobShape.of(_started("w", 0, family="wan2.1", model="tiny-t2v", task="t2v"))
        for phase in (STEP, "text_encode", "decode", "latent_init"):
            assert component_key(phase, cog) != component_key(phase, wan)
            assert "cogvideox" in component_key(phase, cog)
        assert ("device|cogvideox|cpu", "device|cpu") == (device_level(cog), device_level(wan))
        real = msgspec.structs.replace(cog, variant="t2v",
                                       device="cuda:NVIDIA H100 80GB HBM3")
        assert prior_coefficients(STEP, real) not in PUBLISHED_STEP_PRIORS.values()
        prior = Prior.of(cog, False, Calibration())
        assert NEUTRAL_REL_SIGMA == prior.sigma["denoise"]

    def test_the_first_job_estimates_then_later_jobs_learn(self) -> None:
        """Jobs 4× slower than the neutral prior: the first job's before-start estimate is
        far off and says "estimating" until two steps are seen; from the third job on the
        before-start estimate is within 20 % of the actual duration."""
        events = _series(5, factor=4.0)
        records = [r for r in job_records(events) if r.completed]
        report = evaluate(records, Calibration(), StaticProfile.fit(records),
                          online_starts(events, None))
        errors = report.per_job
        jobs = sorted(errors)
        assert errors[jobs[0]][0.0] < -0.5
        assert all(abs(errors[job][0.0]) <= 0.20 for job in jobs[2:])
        first = LiveJob.start(events[0], Calibration())  # type: ignore[arg-type]
        assert first.estimate(events[0].ts).estimating

    def test_a_new_familys_history_does_not_move_wans_expectations(self) -> None:
        """Ten slow CogVideoX jobs teach their own keys; a Wan job then starts from exactly
        the expectations it would have had with no history at all."""
        engine = ProjectionEngine(default_projections())
        events = _series(10, factor=8.0)
        for position, event in enumerate(events):
            engine.apply_batch(Batch(position, [event]))
        eta = engine.states[EtaProjection.name]
        assert "device|cogvideox|cpu" in eta.learned.levels
        assert "device|cpu" not in eta.learned.levels
        wan = _started("w", events[-1].ts + SECOND, family="wan2.1", model="tiny-t2v",
                       task="t2v")
        learned = LiveJob.start(wan, Calibration(), eta.learned)
        fresh = LiveJob.start(wan, Calibration())
        assert fresh.expected == learned.expected


def test_failure_suggestions_follow_the_familys_own_rules() -> None:
    """An out-of-memory CogVideoX job is offered a valid 4k+1 frame count and a smaller size
    of its own aspect (not Wan's 832x480); an image model is offered no fewer frames."""
    from telemetry.guidance import shape_of, suggest

    def oom(family: str, task: str, frames: int, width: int, height: int) -> tuple[str, ...]:
        started = msgspec.structs.replace(
            _started("j", 0, family=family, model="m", task=task, frames=frames),
            width=width, height=height,
            device=DeviceInfo(kind="cuda", name="H100", total_memory_bytes=80 << 30))
        return suggest("oom_device", shape_of(started), {}, 80 << 30)

    cog = oom("cogvideox", "t2v", 49, 720, 480)
    assert "49 → 29 frames" in cog
    assert "720x480 (480P) → 528x352" in cog
    image = oom("sd", "t2i", 1, 1024, 1024)
    assert not any("frames" in line for line in image)
    assert "1024x1024 → 768x768" in image
    assert "1280x720 (720P) → 832x480 (480P)" in oom("wan2.1", "t2v", 81, 1280, 720)
