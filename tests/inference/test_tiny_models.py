"""Tests for inference.tiny_models: tiny offline Wan pipelines built from real diffusers classes
(the CogVideoX and Stable Diffusion ones: tests/inference/test_generic_pipelines.py).

These pipelines stand in for multi-gigabyte checkpoints in every other inference test, so the
properties checked here (shapes, expert layout, determinism, save/reload) are the ones the rest
of the suite relies on.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from inference.models import resolve_model
from inference.tiny_models import (
    TINY_VARIANTS,
    WAN_VARIANTS,
    VariantSpec,
    build_tiny_pipeline,
    check_request,
    valid_sizes_message,
    variant_spec,
)
from telemetry.eta.model import transformer_id
from telemetry.eta.shape import JobShape
from telemetry.events import DeviceInfo, JobStarted

NUM_FRAMES = 9
STEPS = 2  # with UniPC and flow_shift=3 the timesteps are [999, 750]: both experts get a step


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Pin torch to one thread so timings are stable and runs are reproducible."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _size(spec: VariantSpec) -> int:
    """Smallest square side that is valid for the variant (32 works for every Wan VAE)."""
    return max(32, spec.spatial_multiple)


def _call(pipe: Any, spec: VariantSpec, *, seed: int = 0, **overrides: Any) -> np.ndarray:
    """Run one small generation and return the first video as (frames, H, W, 3)."""
    size = _size(spec)
    kwargs: dict[str, Any] = {
        "prompt": "a cat dancing in the rain",
        "negative_prompt": "blurry, low quality",
        "height": size,
        "width": size,
        "num_frames": NUM_FRAMES,
        "num_inference_steps": STEPS,
        "guidance_scale": 5.0,
        "output_type": "np",
        "generator": torch.Generator().manual_seed(seed),
    }
    if spec.needs_image:
        kwargs["image"] = Image.new("RGB", (size, size), (200, 80, 30))
    kwargs.update(overrides)
    frames: np.ndarray = pipe(**kwargs).frames[0]
    return frames


def _normalised(config: Any) -> dict[str, Any]:
    """Public config entries, JSON round-tripped so tuples and lists compare equal."""
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    public = {k: v for k, v in raw.items() if not k.startswith("_")}
    public.pop("transformers_version", None)
    result: dict[str, Any] = json.loads(json.dumps(public, default=str))
    return result


@pytest.mark.parametrize("name", WAN_VARIANTS)
def test_builds_real_diffusers_pipeline_with_tiny_transformer(name: str) -> None:
    """Each variant builds the diffusers class its spec names, with a ~30k-parameter transformer."""
    spec = variant_spec(name)
    pipe = build_tiny_pipeline(name)
    assert type(pipe).__name__ == spec.pipeline_class
    assert spec.name == name
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    assert 10_000 < n_params < 50_000
    assert pipe.text_encoder.config.d_model == pipe.transformer.config.text_dim
    assert pipe.config["expand_timesteps"] == (spec.task == "ti2v")
    assert pipe.vae.config.z_dim == (48 if spec.task == "ti2v" else 16)
    assert all(not m.training for m in pipe.components.values() if isinstance(m, torch.nn.Module))


@pytest.mark.parametrize("name", WAN_VARIANTS)
def test_runs_and_returns_frames_of_requested_shape(name: str) -> None:
    """A small call returns (num_frames, H, W, 3) float frames in [0, 1]."""
    spec = variant_spec(name)
    frames = _call(build_tiny_pipeline(name), spec)
    size = _size(spec)
    assert frames.shape == (NUM_FRAMES, size, size, 3)
    assert frames.dtype == np.float32
    assert np.isfinite(frames).all()
    assert frames.min() >= 0.0 and frames.max() <= 1.0


@pytest.mark.parametrize("name", WAN_VARIANTS)
def test_runs_at_wans_own_720p(name: str) -> None:
    """A tiny model runs at the sizes the real ones do: 1280 px is 80 patches along an axis,
    which the rotary table must cover (it held 64, and such a job failed with a reshape
    error in its first step)."""
    spec = variant_spec(name)
    height = 704 if spec.spatial_multiple == 32 else 720  # TI2V's VAE needs multiples of 32
    latents = _call(build_tiny_pipeline(name), spec, height=height, width=1280, num_frames=1,
                    num_inference_steps=1, output_type="latent")
    latent_side = 16 if spec.task == "ti2v" else 8
    assert tuple(latents.shape[-2:]) == (height // latent_side, 1280 // latent_side)


@pytest.mark.parametrize("name", WAN_VARIANTS)
def test_expert_layout_matches_spec_and_both_experts_run(name: str) -> None:
    """Two-expert variants hold transformer_2 and the spec's boundary_ratio and run both experts."""
    spec = variant_spec(name)
    pipe = build_tiny_pipeline(name)
    assert pipe.config["boundary_ratio"] == spec.boundary_ratio
    assert (pipe.transformer_2 is not None) == spec.two_experts
    calls = {"transformer": 0, "transformer_2": 0}
    for attr in ("transformer", "transformer_2"):
        module = getattr(pipe, attr)
        if module is not None:
            module.register_forward_hook(
                lambda *_args, attr=attr: calls.__setitem__(attr, calls[attr] + 1)
            )
    _call(pipe, spec)
    # guidance_scale > 1 runs each step twice (conditional + unconditional).
    if spec.two_experts:
        assert pipe.transformer_2 is not pipe.transformer
        assert calls == {"transformer": 2, "transformer_2": 2}
    else:
        assert calls == {"transformer": 2 * STEPS, "transformer_2": 0}


@pytest.mark.parametrize("name", ["tiny-t2v-a14b", "tiny-i2v-a14b"])
def test_two_experts_have_different_weights(name: str) -> None:
    """The high- and low-noise experts are distinct modules with distinct random weights."""
    pipe = build_tiny_pipeline(name)
    first = pipe.transformer.state_dict()
    second = pipe.transformer_2.state_dict()
    assert first.keys() == second.keys()
    assert not all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("name", [n for n in TINY_VARIANTS if variant_spec(n).needs_image])
def test_i2v_variants_accept_a_pil_image_of_any_size(name: str) -> None:
    """I2V variants take a PIL image (resized by the pipeline) and still return the asked shape."""
    spec = variant_spec(name)
    pipe = build_tiny_pipeline(name)
    image = Image.new("RGB", (40, 24), (10, 120, 250))
    frames = _call(pipe, spec, image=image)
    assert frames.shape == (NUM_FRAMES, 32, 32, 3)
    if spec.family == "wan2.1":
        assert pipe.image_encoder is not None
        assert pipe.transformer.config.image_dim == pipe.image_encoder.config.hidden_size
    else:
        assert pipe.image_encoder is None and pipe.image_processor is None


@pytest.mark.parametrize("name", WAN_VARIANTS)
def test_same_seed_gives_bit_identical_output(name: str) -> None:
    """Same build seed and generator seed give bit-identical frames, run after run."""
    spec = variant_spec(name)
    first = _call(build_tiny_pipeline(name, seed=3), spec)
    again = _call(build_tiny_pipeline(name, seed=3), spec)
    assert np.array_equal(first, again)


def test_build_seed_controls_weights_and_leaves_global_rng_alone() -> None:
    """Different seeds give different weights, and building does not consume the global RNG."""
    state = torch.get_rng_state()
    a = build_tiny_pipeline("tiny-t2v", seed=0).transformer.state_dict()
    b = build_tiny_pipeline("tiny-t2v", seed=1).transformer.state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(a["proj_out.weight"], b["proj_out.weight"])


@pytest.mark.parametrize("name", WAN_VARIANTS)
def test_save_pretrained_reloads_offline_with_same_config_and_output(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """save_pretrained then DiffusionPipeline.from_pretrained(dir) reloads offline, same output."""
    spec = variant_spec(name)
    pipe = build_tiny_pipeline(name)
    expected = _call(pipe, spec)
    pipe.save_pretrained(tmp_path)

    def _no_network(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("from_pretrained tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", _no_network)
    load: Any = DiffusionPipeline.from_pretrained  # Any: diffusers leaves it unannotated
    reloaded = load(tmp_path)
    reloaded.set_progress_bar_config(disable=True)

    assert type(reloaded) is type(pipe)
    assert _normalised(reloaded.config) == _normalised(pipe.config)
    assert reloaded.components.keys() == pipe.components.keys()
    for key, component in pipe.components.items():
        loaded = reloaded.components[key]
        if component is None or key == "tokenizer":
            assert (loaded is None) == (component is None), key
            continue
        assert type(loaded) is type(component), key
        assert _normalised(loaded.config if hasattr(loaded, "config") else loaded) == (
            _normalised(component.config if hasattr(component, "config") else component)
        ), key
    prompt = "a cat dancing in the rain"
    assert reloaded.tokenizer(prompt).input_ids == pipe.tokenizer(prompt).input_ids
    # Not bit-exact: safetensors memory-maps weights at addresses with a different alignment, so
    # CPU kernels may pick another SIMD path (observed: 1 ulp, ~1.5e-7). Weights are identical.
    np.testing.assert_allclose(_call(reloaded, spec), expected, rtol=0, atol=1e-5)


def test_bfloat16_build_runs_and_keeps_fp32_modules() -> None:
    """dtype=bfloat16 casts the transformer (minus its fp32-pinned modules); the VAE stays fp32."""
    spec = variant_spec("tiny-t2v")
    pipe = build_tiny_pipeline("tiny-t2v", dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16
    assert pipe.transformer.scale_shift_table.dtype == torch.float32
    assert pipe.vae.dtype == torch.float32
    frames = _call(pipe, spec)
    assert frames.shape == (NUM_FRAMES, 32, 32, 3)
    assert np.isfinite(frames).all()


def test_unknown_variant_raises_value_error_naming_valid_ones() -> None:
    """An unknown name raises ValueError (not KeyError) that lists every valid variant."""
    for func in (variant_spec, build_tiny_pipeline):
        with pytest.raises(ValueError, match="unknown tiny variant 'tiny-nope'") as info:
            func("tiny-nope")
        assert all(name in str(info.value) for name in TINY_VARIANTS)


def test_check_request_rejects_size_not_multiple_with_nearest_values() -> None:
    """30x32 is rejected for a 16-multiple variant, with 16 or 32 suggested for the height."""
    spec = variant_spec("tiny-t2v")
    with pytest.raises(ValueError, match="height=30") as info:
        check_request(spec, height=30, width=32, num_frames=9)
    message = str(info.value)
    assert "multiple of 16" in message
    assert "try 16 or 32" in message
    assert "width" not in message.split(". Rule", maxsplit=1)[0]


def test_check_request_rejects_frames_not_4k_plus_1_with_nearest_values() -> None:
    """10 frames is rejected with 9 or 13 suggested."""
    spec = variant_spec("tiny-t2v")
    with pytest.raises(ValueError, match=r"num_frames=10 is not 4k\+1 \(try 9 or 13\)"):
        check_request(spec, height=32, width=32, num_frames=10)


@pytest.mark.parametrize(
    ("height", "width", "num_frames"),
    [(0, 32, 9), (32, -16, 9), (32, 32, 0), (32, 32, -3)],
)
def test_check_request_rejects_non_positive_values(
    height: int, width: int, num_frames: int
) -> None:
    """Zero or negative sizes and frame counts are rejected."""
    with pytest.raises(ValueError, match="tiny-t2v"):
        check_request(variant_spec("tiny-t2v"), height=height, width=width, num_frames=num_frames)


def test_check_request_uses_the_variant_spatial_multiple() -> None:
    """48x48 is fine for 16-multiple variants but rejected for tiny-ti2v (multiples of 32)."""
    check_request(variant_spec("tiny-t2v"), height=48, width=48, num_frames=1)
    check_request(variant_spec("tiny-ti2v"), height=64, width=96, num_frames=17)
    with pytest.raises(ValueError, match="try 32 or 64"):
        check_request(variant_spec("tiny-ti2v"), height=48, width=64, num_frames=17)


def test_valid_sizes_message_states_both_rules() -> None:
    """The hint names the spatial multiple and the 4k+1 frame rule."""
    message = valid_sizes_message(variant_spec("tiny-ti2v"))
    assert "multiples of 32" in message
    assert "4k+1" in message and "5, 9, 13, 17" in message


def test_specs_are_consistent() -> None:
    """Spec table: expected families, tasks, boundaries and spatial multiples."""
    specs = {name: variant_spec(name) for name in WAN_VARIANTS}
    assert specs["tiny-t2v-a14b"].boundary_ratio == 0.875
    assert specs["tiny-i2v-a14b"].boundary_ratio == 0.9
    for spec in specs.values():
        assert spec.two_experts == (spec.boundary_ratio is not None)
        assert spec.needs_image == (spec.task == "i2v")
        assert spec.spatial_multiple == (32 if spec.task == "ti2v" else 16)
        assert spec.family == ("wan2.1" if spec.name in {"tiny-t2v", "tiny-i2v"} else "wan2.2")


@pytest.mark.parametrize(("heads", "variant", "transformer"), [
    (12, "t2v-1.3B", "dit-1.3B"), (40, "t2v-14B", "dit-14B"), (2, "tiny-t2v", "dit-tiny")])
def test_a_saved_wan_models_size_is_its_transformers_width(
        tmp_path: Path, heads: int, variant: str, transformer: str) -> None:
    """A saved Wan 2.1 T2V directory (its configs only: nothing is loaded) is labelled by its
    transformer's width, so the ETA takes the 1.3B's published prior for a 1.3B — not the
    14B's, as the class alone (``t2v``) had it — and the tiny figures for a tiny one."""
    (tmp_path / "transformer").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
         "vae": ["diffusers", "AutoencoderKLWan"]}))
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(
        {"num_attention_heads": heads, "attention_head_dim": 128 if heads > 2 else 12,
         "patch_size": [1, 2, 2]}))
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"scale_factor_spatial": 8}))
    choice = resolve_model(str(tmp_path))
    assert variant == choice.variant
    event = JobStarted(job="j", seq=0, ts=0, model=str(tmp_path), family="wan2.1",
                       variant=choice.variant, task="t2v", width=832, height=480,
                       num_frames=81, steps=50, guidance_scale=5.0, cfg=True,
                       device=DeviceInfo(kind="cuda", name="NVIDIA GeForce RTX 4090"))
    assert transformer == transformer_id(JobShape.of(event))
