"""Which model a request names, what it can take, and how to load it — checked before loading.

A model is a tiny offline variant (``tiny-t2v``, …) or a local diffusers model directory. Its
facts (family, task, expert layout, size rule) are read without loading weights — from the tiny
spec, or from ``model_index.json`` and the component configs — so bad requests are refused in
milliseconds, before seconds (or minutes) of loading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch

from inference.tiny_models import (
    TINY_VARIANTS,
    VariantSpec,
    build_tiny_pipeline,
    check_request,
    variant_spec,
)
from telemetry.pipelines import classify_pipeline, is_video
from telemetry.wan import variant_of, width_of


class ModelError(ValueError):
    """The model named cannot be used; the message says why and what would work."""


@dataclass(frozen=True)
class ModelChoice:
    """A resolved model: its facts, and where it comes from."""

    name: str
    spec: VariantSpec
    path: Path | None = None  # None for tiny variants

    @property
    def variant(self) -> str:
        """The ``variant`` label: the tiny name, or Wan's own (``t2v-A14B``, ``ti2v-5B``…)."""
        if self.path is None:
            return self.name
        if self.spec.pipeline_class.startswith("Wan"):
            return variant_of(self.spec.task, two_experts=self.spec.two_experts,
                              width=self.spec.width)
        return self.spec.task  # a class tells no size: the task

    def check(self, *, height: int, width: int, num_frames: int) -> None:
        """Raise :class:`ModelError` if the model cannot produce this shape."""
        try:
            check_request(self.spec, height=height, width=width, num_frames=num_frames)
        except ValueError as exc:
            raise ModelError(str(exc)) from None

    def load(self, *, device: torch.device, dtype: torch.dtype, seed: int = 0,
             image: bool = False) -> Any:
        """Build or load the pipeline onto ``device``.

        ``image``: a TI2V model's image mode — its weights in diffusers'
        ``WanImageToVideoPipeline`` (``expand_timesteps``), as diffusers runs Wan 2.2 TI2V-5B
        from an image; without it, the class its directory names (``WanPipeline``).
        """
        if self.path is None:
            return build_tiny_pipeline(self.name, seed=seed, dtype=dtype,
                                       image=image and self.spec.takes_image).to(device)
        import diffusers

        loader: Any = diffusers.DiffusionPipeline
        if image and self.spec.takes_image:
            loader = diffusers.WanImageToVideoPipeline
        pipe = loader.from_pretrained(self.path, dtype=dtype, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)


#: What a pipeline class needs imported (beyond itself) before its job's clock starts.
_WARM: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "Wan": (("WanPipeline", "WanImageToVideoPipeline", "WanTransformer3DModel",
             "AutoencoderKLWan", "UniPCMultistepScheduler"),
            ("UMT5EncoderModel", "T5Tokenizer", "CLIPVisionModel")),
    "CogVideoX": (("CogVideoXTransformer3DModel", "AutoencoderKLCogVideoX",
                   "CogVideoXDDIMScheduler"), ("T5EncoderModel", "T5Tokenizer")),
    "StableDiffusion": (("UNet2DConditionModel", "AutoencoderKL", "DDIMScheduler"),
                        ("CLIPTextModel", "T5Tokenizer")),
}


def warm_imports(pipeline_class: str = "WanPipeline") -> None:
    """Import diffusers and transformers now (seconds), before a job's clock starts.

    Importing libraries is process start-up, not model loading: a job's ``load`` stage should
    measure what a server pays per model (reading or building weights), or every ETA of a
    one-shot ``wantel run`` would be dominated by import time. ``pipeline_class``: the class
    about to be loaded (its parts are imported too, where wantel knows them).
    """
    import diffusers
    import transformers

    # Both packages import lazily: touching the classes is what actually loads their modules.
    parts: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    for prefix, known in _WARM.items():
        if pipeline_class.startswith(prefix):
            parts = known
    for name in (pipeline_class, *parts[0]):
        getattr(diffusers, name, None)
    for name in parts[1]:
        getattr(transformers, name, None)


def resolve_model(name: str) -> ModelChoice:
    """A tiny variant by name, or a local diffusers model directory by path."""
    if name in TINY_VARIANTS:
        return ModelChoice(name=name, spec=variant_spec(name))
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelError(
            f"unknown model {name!r}: not a tiny variant ({', '.join(TINY_VARIANTS)}) and no "
            "such directory (models load from a local diffusers directory; nothing is downloaded)"
        )
    index_file = path / "model_index.json"
    if not path.is_dir() or not index_file.is_file():
        raise ModelError(f"{name} is not a diffusers model directory (no model_index.json)")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {index_file}: {exc}") from None
    return ModelChoice(name=str(path), spec=spec_from_model_index(path, index), path=path)


def spec_from_model_index(path: Path, index: dict[str, Any]) -> VariantSpec:
    """The facts of a saved pipeline, read from its configs (no weights loaded).

    A Wan pipeline's task and expert layout come from its configuration; those of any other
    diffusers pipeline with a denoising loop (CogVideoX, Stable Diffusion…) from its class
    (:func:`telemetry.pipelines.classify_pipeline`), with its size rule read from its VAE
    and denoiser configs.
    """
    class_name = str(index.get("_class_name", ""))
    if not class_name.endswith("Pipeline") or not (
            _has_component(index, "transformer") or _has_component(index, "unet")):
        raise ModelError(f"{path} holds a {class_name or 'unknown'} pipeline; wantel runs "
                         "diffusers pipelines with a denoising transformer or UNet (WanPipeline, "
                         "CogVideoXPipeline, StableDiffusionPipeline…)")
    if not class_name.startswith("Wan"):
        return _generic_spec(path, class_name)
    boundary = index.get("boundary_ratio")
    two_experts = _has_component(index, "transformer_2")
    vae = _read_config(path / "vae" / "config.json")
    transformer = _read_config(path / "transformer" / "config.json") or _read_config(
        path / "transformer_2" / "config.json")
    width = width_of(transformer)
    kind = classify_pipeline(class_name, two_experts=two_experts,
                             expand_timesteps=bool(index.get("expand_timesteps", False)),
                             boundary_ratio=boundary, width=width)
    patch = transformer.get("patch_size", [1, 2, 2])
    spatial = int(vae.get("scale_factor_spatial", 8)) * int(patch[-1] if patch else 2)
    return VariantSpec(
        name=path.name, family=kind.family, task=kind.task, pipeline_class=class_name,
        needs_image="ImageToVideo" in class_name, takes_image=kind.task == "ti2v",
        spatial_multiple=spatial, boundary_ratio=boundary, two_experts=two_experts,
        width=width,
    )


def _generic_spec(path: Path, class_name: str) -> VariantSpec:
    """A non-Wan pipeline's facts: family and task from its class; sides in multiples of the
    VAE's spatial factor (2 ** (levels − 1)) times the denoiser's patch (1 for a UNet)."""
    kind = classify_pipeline(class_name)
    vae = _read_config(path / "vae" / "config.json")
    levels = len(vae.get("block_out_channels") or [0, 0, 0, 0])
    factor = int(vae.get("spatial_compression_ratio") or 2 ** max(levels - 1, 0))
    denoiser = _read_config(path / "transformer" / "config.json")
    patch = denoiser.get("patch_size") or 1
    patch = int(patch[-1] if isinstance(patch, list) else patch)
    return VariantSpec(
        name=path.name, family=kind.family, task=kind.task, pipeline_class=class_name,
        needs_image=kind.task in ("i2v", "i2i", "inpaint"), spatial_multiple=factor * patch,
        boundary_ratio=None, two_experts=False, video=is_video(kind.task),
    )


def _has_component(index: dict[str, Any], name: str) -> bool:
    value = index.get(name)
    return isinstance(value, list) and len(value) == 2 and value[0] is not None


def _read_config(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}
