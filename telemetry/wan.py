"""What a Wan pipeline is: its family, task and variant, told from facts a pipeline shows.

Wan 2.1 and Wan 2.2 load through the same diffusers classes (``WanPipeline``,
``WanImageToVideoPipeline``), so the class name gives the task and the configuration gives the
rest (diffusers' own ``WanPipeline.__call__`` branches on the same facts):

- ``expand_timesteps`` (a timestep per latent frame) is TI2V-5B's: task ``ti2v``, Wan 2.2;
- a second transformer (``transformer_2``, the low-noise expert) is an A14B layout: Wan 2.2,
  variant ``<task>-A14B``;
- a ``boundary_ratio`` (where the experts hand over) is Wan 2.2's;
- anything else is Wan 2.1, whose variant is its task and its size (``t2v-1.3B``,
  ``i2v-14B``): the class does not tell 1.3B from 14B, the transformer's width does
  (:func:`width_of`); where no width is known, the task alone (``t2v``).

``inference`` tells a live pipeline and a saved model directory apart with these functions;
the ETA model reads the recorded labels back with :func:`runs_two_experts` and
:func:`uses_image_encoder`. Pure Python: no torch, no diffusers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, NamedTuple

WAN21: Final = "wan2.1"
WAN22: Final = "wan2.2"
#: The prefix of wantel's tiny random-weight variants (``tiny-t2v``, ``tiny-t2v-a14b``, …).
TINY_PREFIX: Final = "tiny-"
#: Frames per second of Wan's videos (the model cards): 16 for Wan 2.1 and the A14B layouts,
#: 24 for TI2V-5B. Events do not record a rate; views that turn frames into seconds use these.
FPS: Final = 16
TI2V_FPS: Final = 24
#: A Wan transformer's width by its size (``num_attention_heads × attention_head_dim`` in
#: diffusers' configurations, Wan-AI/…-Diffusers ``transformer/config.json``: T2V-1.3B 12 ×
#: 128, TI2V-5B 24 × 128, the 14B models and each A14B expert 40 × 128): how a pipeline tells
#: its size, and what the ETA's cost of a pass scales with.
WIDTHS: Final = {"1.3B": 1536, "5B": 3072, "14B": 5120}
SIZES_BY_WIDTH: Final = {width: size for size, width in WIDTHS.items()}
#: Widths up to this are tiny test transformers (wantel's own are 24 wide): their variant is
#: tiny, so the ETA and memory models use the tiny figures, not a 14B's.
TINY_WIDTH: Final = 256


def native_fps(task: str | None) -> int:
    """The frame rate a Wan model of ``task`` generates for (:data:`FPS`, :data:`TI2V_FPS`)."""
    return TI2V_FPS if task == "ti2v" else FPS


class WanKind(NamedTuple):
    """A Wan pipeline's ``family``, ``task`` and ``variant`` labels (as ``JobStarted`` has)."""

    family: str
    task: str
    variant: str


def classify(*, pipeline_class: str, two_experts: bool, expand_timesteps: bool,
             boundary_ratio: float | None, width: int | None = None) -> WanKind:
    """The family, task and variant of a Wan pipeline.

    Args:
        pipeline_class: the diffusers class name (``WanImageToVideoPipeline``…).
        two_experts: whether it holds a second transformer (``transformer_2``).
        expand_timesteps: its ``expand_timesteps`` configuration.
        boundary_ratio: its ``boundary_ratio`` configuration (``None`` where unset).
        width: its transformer's width (:func:`width_of`), ``None`` where unknown.
    """
    task = task_of(pipeline_class, expand_timesteps=expand_timesteps)
    wan22 = two_experts or expand_timesteps or boundary_ratio is not None
    return WanKind(WAN22 if wan22 else WAN21, task,
                   variant_of(task, two_experts=two_experts, width=width))


def task_of(pipeline_class: str, *, expand_timesteps: bool) -> str:
    """``ti2v`` with per-frame timesteps, else ``i2v`` for an image-to-video class, else ``t2v``."""
    if expand_timesteps:
        return "ti2v"
    return "i2v" if "ImageToVideo" in pipeline_class else "t2v"


def variant_of(task: str, *, two_experts: bool, width: int | None = None) -> str:
    """Wan's own variant label: ``t2v-A14B``/``i2v-A14B``, ``ti2v-5B``, else the task with
    the size its transformer's ``width`` tells (``t2v-1.3B``, ``i2v-14B``), else the task. A
    tiny test transformer (``width`` ≤ :data:`TINY_WIDTH`) is ``tiny-<task>[-a14b]``, as
    wantel's own tiny variants are named."""
    if width is not None and 0 < width <= TINY_WIDTH:
        return f"{TINY_PREFIX}{task}{'-a14b' if two_experts else ''}"
    if two_experts:
        return f"{task}-A14B"
    if task == "ti2v":
        return "ti2v-5B"
    size = SIZES_BY_WIDTH.get(width) if width is not None else None
    return task if size is None else f"{task}-{size}"


def width_of(config: Mapping[str, Any] | None) -> int | None:
    """A transformer configuration's width (``num_attention_heads × attention_head_dim``),
    or ``None`` where it does not say."""
    if config is None:
        return None
    heads, head_dim = config.get("num_attention_heads"), config.get("attention_head_dim")
    if isinstance(heads, int) and isinstance(head_dim, int) and heads > 0 and head_dim > 0:
        return heads * head_dim
    return None


def runs_two_experts(*, family: str, variant: str, boundary_ratio: float | None) -> bool:
    """Whether a job of these labels hands its steps from one expert to the other (A14B)."""
    return boundary_ratio is not None and family == WAN22 and "a14b" in variant.lower()


def uses_image_encoder(*, family: str, task: str) -> bool:
    """Whether the pipeline encodes its input image with CLIP: Wan 2.1 I2V only (Wan 2.2's
    I2V-A14B has no image encoder)."""
    return task == "i2v" and family == WAN21


def uses_wan22_vae(task: str) -> bool:
    """Whether the pipeline's VAE is Wan 2.2's 48-channel one (16× spatial, TI2V-5B only);
    every other layout, Wan 2.2's A14B ones too, runs Wan 2.1's."""
    return task == "ti2v"


def is_tiny(variant: str) -> bool:
    """A tiny random-weight variant (``tiny-…``)."""
    return variant.startswith(TINY_PREFIX)


__all__ = ["WAN21", "WAN22", "WIDTHS", "WanKind", "classify", "is_tiny", "runs_two_experts",
           "task_of", "uses_image_encoder", "uses_wan22_vae", "variant_of", "width_of"]
