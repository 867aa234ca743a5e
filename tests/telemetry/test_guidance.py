"""Failure categories and suggestions: the pure rules, the v1 upcast, the predictor hook."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
import pytest

from telemetry.codec import decode_one
from telemetry.events import JobFailed
from telemetry.guidance import (
    CATEGORIES,
    JobShape,
    classify,
    describe_failure,
    fewer_frames,
    smaller_size,
    suggest,
)

GiB = 2**30
SHAPE = JobShape(width=1280, height=720, num_frames=81, steps=40, device_kind="cuda")


class TestRules:
    def test_fewer_frames_stays_a_valid_count(self) -> None:
        """81 → 49 and 17 → 9 (4k+1), and a single frame has nothing fewer."""
        assert (49, 9, None) == (fewer_frames(81), fewer_frames(17), fewer_frames(1))

    def test_smaller_size(self) -> None:
        """720P and up goes to 480P in its orientation; smaller sizes by a quarter."""
        assert ((832, 480), (480, 832), (48, 48), None) == (
            smaller_size(1280, 720), smaller_size(720, 1280), smaller_size(64, 64),
            smaller_size(16, 16))

    @pytest.mark.parametrize(("error_type", "message", "stage", "expected"), [
        ("OutOfMemoryError", "CUDA out of memory", "denoise", "oom_device"),
        ("MemoryError", "Unable to allocate 12.0 GiB", "denoise", "oom_host"),
        ("RuntimeError", "DefaultCPUAllocator: can't allocate memory", "decode", "oom_host"),
        ("NonFiniteLatents", "the denoised latents hold NaN", "decode", "numerical"),
        ("OSError", "Error no file named diffusion_pytorch_model.bin", "load", "model_load"),
        ("PermissionError", "denied", "save", "io"),
        ("ValueError", "`height` must be divisible by 16", None, "invalid_input"),
        ("KeyboardInterrupt", "", "denoise", "interrupted"),
        ("RuntimeError", "shape mismatch", "denoise", "internal"),
    ])
    def test_classify(self, error_type: str, message: str, stage: str | None,
                      expected: str) -> None:
        """Each failure gets its category from its type, message and stage."""
        assert expected == classify(error_type=error_type, message=message, stage=stage)
        assert expected in CATEGORIES


class TestSuggest:
    def test_device_oom_without_a_predictor(self) -> None:
        """The plain reductions, in numbers, and offload; nothing memory-predicted."""
        found = suggest("oom_device", SHAPE, {"offload": "none"}, 24 * GiB)
        assert ("81 → 49 frames", "1280x720 (720P) → 832x480 (480P)",
                "enable model CPU offload: --offload model") == found[:3]
        assert not any("predicted" in line for line in found)

    def test_device_oom_with_a_predictor(self) -> None:
        """With the VRAM model's predictor, the suggestions say what fits in the device."""
        def predict(shape: JobShape, options: Mapping[str, object]) -> float:
            weights = 10 * GiB if options.get("offload") == "none" else 2 * GiB
            return weights + shape.num_frames * shape.width * shape.height * 256

        found = suggest("oom_device", SHAPE, {"offload": "none"}, 24 * GiB, predict)
        assert "81 → 49 frames (fits in 24.0 GiB: predicted peak 20.8 GiB)" == found[0]
        assert "(predicted peak 27.8 GiB → 19.8 GiB)" in found[2]

    def test_decode_oom_suggests_tiling_first(self) -> None:
        """An OOM in the VAE decode names --vae-tiling first."""
        assert suggest("oom_device", SHAPE, {}, stage="decode")[0].startswith("decode in tiles")

    def test_every_category_has_advice(self) -> None:
        """Even with no shape (a job that never started) every category says something."""
        for category in CATEGORIES:
            assert suggest(category, None)

    def test_describe_failure(self) -> None:
        """One line: type, message, category, then the suggestions."""
        assert "MemoryError: no [oom_host]; try: a; b" == describe_failure(
            "MemoryError", "no", "oom_host", ("a", "b"))


class TestUpcast:
    @pytest.mark.parametrize(("fields", "expected"), [
        ({"error_type": "OutOfMemoryError", "message": "CUDA out of memory", "oom": True},
         "oom_device"),
        ({"error_type": "MemoryError", "message": "Unable to allocate 12 GiB"}, "oom_host"),
        ({"error_type": "OSError", "message": "no file", "stage": "load"}, "model_load"),
    ])
    def test_v1_records_get_a_category(self, fields: dict[str, object], expected: str) -> None:
        """A v1 JobFailed reads as v2 with the category its fields imply and no suggestions."""
        raw = {"type": "JobFailed", "v": 1, "job": "j", "seq": 3, "ts": 1,
               "duration_s": 1.0, **fields}
        event = decode_one(msgspec.msgpack.encode(raw))
        assert isinstance(event, JobFailed)
        assert (2, expected, ()) == (event.v, event.category, event.suggestions)
