"""TI2V-5B's image mode: ``tiny-ti2v`` with an image runs through ``WanImageToVideoPipeline``
with ``expand_timesteps``, recorded with TI2V's labels and its image stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from inference.instrument import instrument
from inference.tiny_models import build_tiny_pipeline
from telemetry.events import Event, JobCompleted, JobStarted, StageEnded, StepEnded
from telemetry.log.local import LocalLog
from telemetry.log.memory import MemoryLog
from tests.telemetry.log_contract import events_of
from wantel.cli import main

RED = (200, 40, 40)


def _stages(events: list[Event]) -> list[str]:
    return [e.stage for e in events if isinstance(e, StageEnded)]


def test_the_image_mode_is_wan_i2v_with_expand_timesteps() -> None:
    """The tiny pipeline's image mode is diffusers' WanImageToVideoPipeline, no CLIP encoder,
    per-frame timesteps, the first frame kept from the image."""
    pipe: Any = build_tiny_pipeline("tiny-ti2v", image=True)
    assert "WanImageToVideoPipeline" == type(pipe).__name__
    assert pipe.config.expand_timesteps is True
    assert pipe.image_encoder is None
    with pytest.raises(ValueError, match="does not take an image"):
        build_tiny_pipeline("tiny-t2v", image=True)


def test_instrument_labels_and_stages() -> None:
    """Through instrument(): task ti2v, Wan 2.2, variant tiny-ti2v (its transformer is a
    tiny one's width; a real TI2V-5B's is ti2v-5B); the image is VAE-encoded in latent_init;
    every step recorded."""
    pipe: Any = build_tiny_pipeline("tiny-ti2v", image=True)
    log = MemoryLog()
    with instrument(pipe, log=log, job="j") as handle:
        pipe(prompt="p", image=Image.new("RGB", (64, 64), RED), height=64, width=64,
             num_frames=9, num_inference_steps=3, guidance_scale=1.0, output_type="np",
             generator=torch.Generator().manual_seed(0))
    assert ["j"] == handle.jobs
    events = events_of(log.read())
    started = next(e for e in events if isinstance(e, JobStarted))
    assert ("wan2.2", "ti2v", "tiny-ti2v", True) == (
        started.family, started.task, started.variant, started.options.get("image"))
    assert ["text_encode", "latent_init", "denoise", "decode", "postprocess"] == \
        _stages(events)
    assert [0, 1, 2] == [e.step for e in events if isinstance(e, StepEnded)]


def test_wantel_run_with_an_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``wantel run --model tiny-ti2v --image IMG`` completes, recorded as tiny-ti2v with its
    image, its load and save stages around the pipeline's."""
    image = tmp_path / "first.png"
    Image.new("RGB", (96, 64), RED).save(image)
    code = main(["run", "--model", "tiny-ti2v", "--image", str(image), "--prompt", "p",
                 "--steps", "2", "--frames", "9", "--log", str(tmp_path / "log"),
                 "--out", str(tmp_path / "v.mp4")])
    assert 0 == code, capsys.readouterr().err
    events = events_of(LocalLog(tmp_path / "log").read())
    started = next(e for e in events if isinstance(e, JobStarted))
    assert ("tiny-ti2v", "ti2v", True) == (started.variant, started.task,
                                           started.options.get("image"))
    assert ["load", "text_encode", "latent_init", "denoise", "decode", "postprocess",
            "save"] == _stages(events)
    assert 2 == sum(isinstance(e, StepEnded) for e in events)
    assert any(isinstance(e, JobCompleted) for e in events)
    assert (tmp_path / "v.mp4").stat().st_size > 0
