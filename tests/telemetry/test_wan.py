"""Wan's family, task and variant, told from a pipeline's facts: the one rule inference uses."""

from __future__ import annotations

import pytest

from telemetry.wan import (
    WanKind,
    classify,
    is_tiny,
    runs_two_experts,
    uses_image_encoder,
    variant_of,
    width_of,
)


class TestClassify:
    @pytest.mark.parametrize(("pipeline_class", "two_experts", "expand", "boundary", "kind"), [
        ("WanPipeline", False, False, None, ("wan2.1", "t2v", "t2v")),
        ("WanImageToVideoPipeline", False, False, None, ("wan2.1", "i2v", "i2v")),
        ("WanPipeline", True, False, 0.875, ("wan2.2", "t2v", "t2v-A14B")),
        ("WanImageToVideoPipeline", True, False, 0.9, ("wan2.2", "i2v", "i2v-A14B")),
        ("WanPipeline", False, True, None, ("wan2.2", "ti2v", "ti2v-5B")),
        ("WanImageToVideoPipeline", False, True, None, ("wan2.2", "ti2v", "ti2v-5B")),
        ("WanPipeline", False, False, 0.0, ("wan2.2", "t2v", "t2v")),
        ("WanPipeline", True, False, None, ("wan2.2", "t2v", "t2v-A14B")),
    ])
    def test_the_released_layouts(self, pipeline_class: str, two_experts: bool, expand: bool,
                                  boundary: float | None, kind: tuple[str, str, str]) -> None:
        """Per-frame timesteps make TI2V-5B; a second transformer an A14B layout; any of those
        or a boundary ratio (even 0.0) is Wan 2.2; the class name tells I2V from T2V."""
        assert WanKind(*kind) == classify(pipeline_class=pipeline_class,
                                          two_experts=two_experts, expand_timesteps=expand,
                                          boundary_ratio=boundary)

    def test_variant_of_is_classifys_variant(self) -> None:
        """A saved model's variant label (from its spec) is the one classify gives."""
        for task in ("t2v", "i2v", "ti2v"):
            for two in (False, True):
                expand = task == "ti2v"
                kind = classify(pipeline_class="WanImageToVideoPipeline" if task == "i2v"
                                else "WanPipeline", two_experts=two, expand_timesteps=expand,
                                boundary_ratio=0.875 if two else None)
                assert kind.variant == variant_of(task, two_experts=two)


class TestSize:
    @pytest.mark.parametrize(("task", "two", "width", "variant"), [
        ("t2v", False, 1536, "t2v-1.3B"),   # Wan2.1-T2V-1.3B: 12 heads × 128
        ("t2v", False, 5120, "t2v-14B"),    # Wan2.1-T2V-14B: 40 × 128
        ("i2v", False, 5120, "i2v-14B"),
        ("t2v", True, 5120, "t2v-A14B"),    # each A14B expert is 14B wide
        ("ti2v", False, 3072, "ti2v-5B"),
        ("t2v", False, 24, "tiny-t2v"),     # a tiny test transformer
        ("i2v", True, 24, "tiny-i2v-a14b"),
        ("ti2v", False, 48, "tiny-ti2v"),
        ("t2v", False, 2048, "t2v"),        # a width no release has: the task alone
        ("t2v", False, None, "t2v"),
    ])
    def test_the_transformers_width_tells_the_size(self, task: str, two: bool,
                                                   width: int | None, variant: str) -> None:
        """Wan 2.1's 1.3B and 14B load through one class; their transformer's width tells
        them apart (before, both were ``t2v``, and the ETA gave a 1.3B the 14B's prior). A
        tiny test transformer is a tiny variant, as wantel's own are named."""
        assert variant == variant_of(task, two_experts=two, width=width)
        assert variant == classify(
            pipeline_class="WanImageToVideoPipeline" if task == "i2v" else "WanPipeline",
            two_experts=two, expand_timesteps=task == "ti2v",
            boundary_ratio=0.875 if two else None, width=width).variant

    def test_width_of_a_config(self) -> None:
        """Heads × head dimension; ``None`` where either is missing or odd."""
        assert 1536 == width_of({"num_attention_heads": 12, "attention_head_dim": 128})
        assert width_of({"num_attention_heads": 12}) is None
        assert width_of({"num_attention_heads": "12", "attention_head_dim": 128}) is None
        assert width_of({"num_attention_heads": 0, "attention_head_dim": 128}) is None
        assert width_of(None) is None


class TestRecordedLabels:
    @pytest.mark.parametrize(("family", "variant", "boundary", "two"), [
        ("wan2.2", "t2v-A14B", 0.875, True),
        ("wan2.2", "tiny-i2v-a14b", 0.9, True),
        ("wan2.2", "t2v-A14B", None, False),
        ("wan2.2", "ti2v-5B", 0.875, False),
        ("wan2.1", "t2v-A14B", 0.875, False),
    ])
    def test_two_experts_need_family_variant_and_boundary(
        self, family: str, variant: str, boundary: float | None, two: bool
    ) -> None:
        """Only a Wan 2.2 A14B job with a boundary ratio runs two expert segments."""
        assert two == runs_two_experts(family=family, variant=variant, boundary_ratio=boundary)

    def test_only_wan21_i2v_encodes_the_image(self) -> None:
        """Wan 2.1 I2V has a CLIP image encoder; Wan 2.2's I2V-A14B and T2V do not."""
        assert [True, False, False, False] == [
            uses_image_encoder(family=f, task=t)
            for f, t in (("wan2.1", "i2v"), ("wan2.2", "i2v"), ("wan2.1", "t2v"),
                         ("wan2.2", "ti2v"))]

    def test_tiny_variants(self) -> None:
        """``tiny-…`` names the random-weight variants, nothing else."""
        assert (True, False) == (is_tiny("tiny-t2v-a14b"), is_tiny("t2v-A14B"))
