"""Work-arounds for upstream bugs change nothing where the bug is absent, and put back what
they change."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image

from inference.tiny_models import build_tiny_pipeline
from inference.upstream import image_embeds_per_video


class FixedPipeline:
    """A pipeline whose ``__call__`` takes ``num_videos_per_prompt`` and expands the image
    embedding itself, as a fixed diffusers does."""

    def __init__(self) -> None:
        self.transformer = SimpleNamespace(config=SimpleNamespace(image_dim=16))

    def encode_image(self, image: Any) -> torch.Tensor:
        return torch.zeros(1, 4, 16)

    def __call__(self, num_videos_per_prompt: int = 1) -> None:
        """Repeats the embedding per video already."""


class TestImageEmbedsPerVideo:
    def test_wan21_i2v_gets_one_embedding_per_video_and_its_method_back(self) -> None:
        """The real pipeline's ``encode_image`` gives 3 embeddings in the context, 1 after,
        and the instance holds no attribute of its own again."""
        pipe = build_tiny_pipeline("tiny-i2v")
        picture = Image.new("RGB", (32, 32))
        with image_embeds_per_video(pipe, 3):
            assert 3 == pipe.encode_image(picture, torch.device("cpu")).shape[0]
        assert 1 == pipe.encode_image(picture, torch.device("cpu")).shape[0]
        assert "encode_image" not in vars(pipe)

    def test_an_instance_wrapper_is_called_and_put_back(self) -> None:
        """An instrumentation's own ``encode_image`` on the instance is what runs inside, and
        is the instance's again after."""
        pipe = build_tiny_pipeline("tiny-i2v")
        calls: list[int] = []
        original = pipe.encode_image

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            return original(*args, **kwargs)

        pipe.encode_image = wrapper
        with image_embeds_per_video(pipe, 2):
            assert 2 == pipe.encode_image(Image.new("RGB", (32, 32)),
                                          torch.device("cpu")).shape[0]
        assert [1] == calls
        assert pipe.encode_image is wrapper

    def test_nothing_changes_where_the_bug_is_absent(self) -> None:
        """One video; a transformer without an image embedding (Wan 2.2's I2V); a pipeline
        whose ``__call__`` does not have the per-prompt-only repeat: untouched."""
        fixed = FixedPipeline()
        with image_embeds_per_video(fixed, 3):
            assert "encode_image" not in vars(fixed)
            assert 1 == fixed.encode_image(None).shape[0]
        wan22 = build_tiny_pipeline("tiny-i2v-a14b")
        with image_embeds_per_video(wan22, 3):
            assert "encode_image" not in vars(wan22)
        wan21 = build_tiny_pipeline("tiny-i2v")
        with image_embeds_per_video(wan21, 1):
            assert "encode_image" not in vars(wan21)
