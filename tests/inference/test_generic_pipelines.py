"""Pipelines beyond Wan, for real: tiny CogVideoX and Stable Diffusion pipelines, end to end.

Each runs through ``instrument()`` and ``wantel run`` into a real local log, with the labels
the pipeline's class gives (never ``wan2.1``/``t2v``), the stages it has, every step, an ETA
that has learned from the jobs before it, and those labels on ``/metrics`` and ``/api/jobs``.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from starlette.testclient import TestClient

from exporters.server import create_app
from exporters.service import TelemetryService
from inference.instrument import instrument
from inference.models import resolve_model
from inference.tiny_models import build_tiny_pipeline, check_request, variant_spec
from telemetry.engine import ProjectionEngine
from telemetry.eta.live import Prior
from telemetry.eta.model import Calibration
from telemetry.eta.shape import JobShape
from telemetry.events import JobCompleted, JobStarted, StageEnded, StepEnded
from telemetry.log.base import Batch
from telemetry.log.local import LocalLog
from telemetry.projections import default_projections
from telemetry.projections.eta import EtaProjection, current
from tests.polling import wait_for
from tests.telemetry.log_contract import events_of
from wantel.cli import main

#: variant → (family, task, pipeline class, the stages its pipeline has)
EXPECTED = {
    "tiny-cogvideox": ("cogvideox", "t2v", "CogVideoXPipeline",
                       ["text_encode", "latent_init", "denoise", "decode", "postprocess"]),
    "tiny-sd": ("sd", "t2i", "StableDiffusionPipeline",
                ["text_encode", "latent_init", "denoise", "decode", "postprocess"]),
}
STEPS = 3


def _ended_stages(events: list[object], job: str) -> list[str]:
    return [e.stage for e in events if isinstance(e, StageEnded) and e.job == job and e.ok]


@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_instrument_labels_stages_and_steps(variant: str, tmp_path: Path) -> None:
    """``instrument()`` on a non-Wan pipeline: its own family and task, its generic stages in
    order, every step, one pass a step (these pipelines batch CFG's two halves)."""
    family, task, cls, stages = EXPECTED[variant]
    pipe = build_tiny_pipeline(variant)
    assert cls == type(pipe).__name__
    log = LocalLog(tmp_path / "log")
    kwargs: dict[str, object] = {"prompt": "a cat", "height": 32, "width": 32,
                                 "num_inference_steps": STEPS, "guidance_scale": 5.0,
                                 "output_type": "np"}
    if variant == "tiny-cogvideox":
        kwargs["num_frames"] = 9
    with instrument(pipe, log=log, job=f"{variant}-job") as handle:
        pipe(**kwargs)
    events = events_of(log.read(0))
    started = next(e for e in events if isinstance(e, JobStarted))
    assert (family, task) == (started.family, started.task)
    assert task == started.variant  # a class tells no size: the variant is the task
    assert (9 if variant == "tiny-cogvideox" else 1) == started.num_frames
    assert stages == _ended_stages(events, handle.job or "")
    steps = [e for e in events if isinstance(e, StepEnded)]
    assert list(range(STEPS)) == [s.step for s in steps]
    assert {1} == {s.passes for s in steps}
    assert any(isinstance(e, JobCompleted) for e in events)
    assert type(pipe).__name__ == cls and not hasattr(pipe, "_wantel_instrumented")
    log.close()


def test_image_model_size_rules() -> None:
    """An image model makes one frame; its sides follow its own multiple."""
    spec = variant_spec("tiny-sd")
    check_request(spec, height=48, width=64, num_frames=1)
    with pytest.raises(ValueError, match="makes one image"):
        check_request(spec, height=64, width=64, num_frames=17)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str]]]:
    """Three ``wantel run`` jobs of tiny-cogvideox and two of tiny-sd into one log."""
    tmp = tmp_path_factory.mktemp("generic")
    log_dir = tmp / "log"
    jobs: list[str] = []
    for index, variant in enumerate(["tiny-cogvideox", "tiny-sd", "tiny-cogvideox",
                                     "tiny-sd", "tiny-cogvideox"]):
        job = f"{variant}-{index}"
        suffix = ".mp4" if variant == "tiny-cogvideox" else ".png"
        args = ["run", "--log", str(log_dir), "--model", variant, "--prompt", "a cat",
                "--steps", str(STEPS), "--height", "32", "--width", "32", "--job", job,
                "--device", "cpu", "--out", str(tmp / f"{job}{suffix}"), "--json"]
        if variant == "tiny-cogvideox":
            args += ["--frames", "9"]
        assert 0 == main(args)
        jobs.append(job)
    yield log_dir, jobs


def test_wantel_run_writes_labels_stages_and_outputs(runs: tuple[Path, list[str]],
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    """Each job carries its family/task/variant, the runner's and the pipeline's stages,
    every step; CogVideoX writes a video, Stable Diffusion a PNG of the asked size."""
    log_dir, jobs = runs
    log = LocalLog(log_dir, create=False)
    events = events_of(log.read(0))
    log.close()
    for job in jobs:
        variant = job.rsplit("-", 1)[0]
        family, task, _, stages = EXPECTED[variant]
        started = next(e for e in events if isinstance(e, JobStarted) and e.job == job)
        assert (variant, family, variant, task) == (started.model, started.family,
                                                    started.variant, started.task)
        assert ["load", *stages, "save"] == _ended_stages(events, job)
        assert STEPS == sum(1 for e in events if isinstance(e, StepEnded) and e.job == job)
    with Image.open(log_dir.parent / "tiny-sd-1.png") as image:
        assert (32, 32) == image.size
    assert (log_dir.parent / "tiny-cogvideox-0.mp4").stat().st_size > 0


def test_the_eta_learns_each_family_under_its_own_keys(runs: tuple[Path, list[str]]) -> None:
    """Folded by the real ETA projection: each family's device level is its own, nothing is
    learned under Wan's; the third CogVideoX job starts from what the first four taught (its
    expectations are not the neutral prior's), and once two of its steps are measured its
    ETA is past "estimating", with an interval around it."""
    log_dir, jobs = runs
    log = LocalLog(log_dir, create=False)
    events = events_of(log.read(0))
    log.close()
    engine = ProjectionEngine(default_projections())
    last, steps_seen, point = jobs[4], 0, None
    for position, event in enumerate(events):
        engine.apply_batch(Batch(position, [event]))
        eta = engine.states[EtaProjection.name]
        if isinstance(event, JobStarted) and event.job == last:
            live = eta.running[last].live
            neutral = Prior.of(JobShape.of(event), True, Calibration())
            assert neutral.expected != live.expected
            assert 4 == eta.learned.jobs
        if isinstance(event, StepEnded) and event.job == last:
            steps_seen += 1
            if steps_seen == 2:
                point = current(eta, last)
    assert point is not None and not point.estimating
    assert point.p10_s <= point.remaining_s <= point.p90_s
    eta = engine.states[EtaProjection.name]
    levels = set(eta.learned.levels)
    assert {"device|cogvideox|cpu", "device|sd|cpu"} <= levels
    assert "device|cpu" not in levels
    assert 5 == eta.learned.jobs
    assert eta.finished[last].before_start_error is not None


def test_labels_reach_metrics_and_the_api(runs: tuple[Path, list[str]]) -> None:
    """/metrics counts the jobs under their own model and task labels; /api/jobs and
    /api/jobs/{id} show family, variant and task."""
    log_dir, jobs = runs
    log = LocalLog(log_dir, create=False)
    service = TelemetryService(log, checkpoint_dir=log_dir.parent / "ckpt")
    service.start()
    try:
        assert service.wait_ready(30)
        wait_for(lambda: service.position is not None
                 and service.position >= (log.last_position() or 0), "catch-up")
        client = TestClient(create_app(service))
        metrics = client.get("/metrics").text
        assert 'wantel_jobs_total{model="tiny-cogvideox",status="completed",task="t2v"} 3.0' \
            in metrics
        assert 'wantel_jobs_total{model="tiny-sd",status="completed",task="t2i"} 2.0' in metrics
        assert 'wantel_denoise_steps_total{model="tiny-sd"} 6.0' in metrics
        # Seconds of video at CogVideoX's 8 fps (3 jobs × 9 frames); an image is none.
        assert 'wantel_video_seconds_total{model="tiny-cogvideox"} 3.375' in metrics
        assert 'wantel_frames_total{model="tiny-sd"} 2.0' in metrics
        assert 'wantel_video_seconds_total{model="tiny-sd"} 0.0' in metrics
        assert "wan2.1" not in metrics
        listed = {job["job"]: job for job in client.get("/api/jobs").json()["finished"]}
        assert set(jobs) <= set(listed)
        row = listed[jobs[1]]
        assert ("sd", "tiny-sd", "t2i") == (row["family"], row["variant"], row["task"])
        detail = client.get(f"/api/jobs/{jobs[0]}").json()["projection"]
        assert ("cogvideox", "tiny-cogvideox", "t2v") == (
            detail["family"], detail["variant"], detail["task"])
    finally:
        service.stop()
        log.close()


@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_same_seed_same_weights_and_sigmas_recorded(variant: str, tmp_path: Path) -> None:
    """Weights are a pure function of the seed (bit-identical output); the DDIM schedulers'
    steps carry a sigma derived from ᾱ, falling as the loop goes."""
    kwargs: dict[str, object] = {"prompt": "a cat", "height": 32, "width": 32,
                                 "num_inference_steps": STEPS, "output_type": "np"}
    if variant == "tiny-cogvideox":
        kwargs["num_frames"] = 5
    outputs = []
    for _ in range(2):
        pipe = build_tiny_pipeline(variant, seed=3)
        result = pipe(**kwargs, generator=torch.Generator().manual_seed(1))
        outputs.append(result.frames if variant == "tiny-cogvideox" else result.images)
    assert np.array_equal(outputs[0], outputs[1])
    log = LocalLog(tmp_path / "log")
    with instrument(pipe, log=log):
        pipe(**kwargs)
    sigmas = [e.sigma for e in events_of(log.read(0)) if isinstance(e, StepEnded)]
    log.close()
    assert all(s is not None and s >= 0 for s in sigmas)
    assert sigmas == sorted(sigmas, reverse=True)  # type: ignore[type-var]


def test_a_saved_cogvideox_directory_runs_with_its_own_labels(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local diffusers CogVideoX directory (saved offline) loads through ``wantel run``:
    family ``cogvideox``, task and variant ``t2v``, its size rule read from its configs."""
    directory = tmp_path / "CogVideoX-tiny"
    build_tiny_pipeline("tiny-cogvideox").save_pretrained(directory)
    choice = resolve_model(str(directory))
    assert ("cogvideox", "t2v", "t2v", 16) == (choice.spec.family, choice.spec.task,
                                               choice.variant, choice.spec.spatial_multiple)

    def no_network(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a model load tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    log_dir = tmp_path / "log"
    assert 0 == main(["run", "--log", str(log_dir), "--model", str(directory), "--prompt", "x",
                      "--frames", "5", "--height", "32", "--width", "32", "--steps", "2",
                      "--device", "cpu", "--job", "local", "--out", str(tmp_path / "v.mp4"),
                      "--json"])
    log = LocalLog(log_dir, create=False)
    started = next(e for e in events_of(log.read(0)) if isinstance(e, JobStarted))
    log.close()
    assert (str(directory), "cogvideox", "t2v", "t2v") == (
        started.model, started.family, started.variant, started.task)


def test_advise_knows_an_image_model_makes_one_frame(
        runs: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    """``wantel advise`` on the tiny-sd history: frames other than 1 are one line and exit 2;
    one frame is advised with no "most frames" line and the job's own task in ``--json``."""
    log_dir, _ = runs
    base = ["advise", "--log", str(log_dir), "--model", "tiny-sd", "--height", "32",
            "--width", "32", "--device", "cpu"]
    assert 2 == main([*base, "--frames", "17"])
    assert "--frames must be 1 for tiny-sd, an image model (t2i), got 17" in \
        capsys.readouterr().err
    assert 0 == main([*base, "--frames", "1"])
    assert "most frames" not in capsys.readouterr().out
    assert 0 == main([*base, "--frames", "1", "--json"])
    advice = json.loads(capsys.readouterr().out)
    assert ("t2i", None) == (advice["task"], advice["max_frames"])
    assert advice["calibrated_on_jobs"]["memory"] >= 2  # the two tiny-sd jobs taught it


def test_wantel_demo_runs_every_tiny_variant(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """``wantel demo --jobs 7`` runs one job of each tiny variant — CogVideoX and the Stable
    Diffusion image model among them (one frame, a PNG) — every one completed."""
    log_dir = tmp_path / "log"
    assert 0 == main(["demo", "--log", str(log_dir), "--port", "0", "--jobs", "7",
                      "--out-dir", str(tmp_path / "out")])
    capsys.readouterr()
    log = LocalLog(log_dir, create=False)
    events = events_of(log.read(0))
    log.close()
    started = {e.job: e for e in events if isinstance(e, JobStarted)}
    completed = {e.job for e in events if isinstance(e, JobCompleted)}
    assert set(started) == completed
    assert {"tiny-cogvideox", "tiny-sd"} <= {e.model for e in started.values()}
    assert [1] == [e.num_frames for e in started.values() if e.model == "tiny-sd"]
    assert (tmp_path / "out" / "demo-6.png").is_file()


@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_a_call_without_a_size_records_the_size_the_pipeline_makes(variant: str,
                                                                   tmp_path: Path) -> None:
    """No height/width in the call: the job records the size diffusers derives (the denoiser's
    sample size × the VAE's factor), which is the size of what comes out."""
    pipe = build_tiny_pipeline(variant)
    log = LocalLog(tmp_path / "log")
    kwargs: dict[str, object] = {"prompt": "a cat", "num_inference_steps": 1,
                                 "output_type": "np"}
    if variant == "tiny-cogvideox":
        kwargs["num_frames"] = 5
    with instrument(pipe, log=log):
        result = pipe(**kwargs)
    started = next(e for e in events_of(log.read(0)) if isinstance(e, JobStarted))
    log.close()
    made = result.frames[0][0] if variant == "tiny-cogvideox" else result.images[0]
    assert (started.height, started.width) == made.shape[:2] == (64, 64)
