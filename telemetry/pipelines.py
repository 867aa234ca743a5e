"""What any diffusers pipeline is: its family, task and variant, told from its class — in one place.

Wan's own rules (two experts, ``expand_timesteps``, ``boundary_ratio``) live in
:mod:`telemetry.wan`; this module extends them to every other pipeline with a denoising loop,
so a CogVideoX or a Stable Diffusion job is labelled ``cogvideox``/``t2v`` or ``sd``/``t2i``,
never ``wan2.1``/``t2v``:

- the **family** comes from the class name's prefix (:data:`FAMILIES`: ``CogVideoXPipeline`` →
  ``cogvideox``, ``LTXImageToVideoPipeline`` → ``ltx``, ``StableDiffusionXLPipeline`` →
  ``sdxl``…); a class the table does not know gets its own name, lower-cased, without
  ``Pipeline`` and the task words (``FooBarPipeline`` → ``foobar``) — honest, if not pretty;
- the **task** from the class name's task words (``ImageToVideo`` → ``i2v``, ``Img2Img`` →
  ``i2i``, ``Inpaint`` → ``inpaint``…), else ``t2v`` for a video family, else ``t2i``;
- the **variant**, for a model directory, is the task (a class tells no size); tiny
  variants and callers name their own.

What a family's videos are made of (:func:`geometry`: how many pixels a token covers, how
many frames a latent frame) and at what rate they play (:func:`native_fps`) are here too:
the ETA and memory models size a job by them, the views turn frames into seconds by them.
Cost models key what they learn by :func:`cost_family`, so a new family never borrows Wan's
priors or Wan's history. Pure Python: no torch, no diffusers.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from telemetry.wan import WAN21, WAN22, classify
from telemetry.wan import native_fps as wan_fps

#: Class-name prefixes and the family they name, longest first where one prefixes another.
FAMILIES: Final[tuple[tuple[str, str], ...]] = (
    ("CogVideoX", "cogvideox"),
    ("LTX2", "ltx2"),
    ("LTX", "ltx"),
    ("HunyuanVideo15", "hunyuanvideo1.5"),
    ("HunyuanVideo", "hunyuanvideo"),
    ("Mochi", "mochi"),
    ("Allegro", "allegro"),
    ("Latte", "latte"),
    ("AnimateDiff", "animatediff"),
    ("StableVideoDiffusion", "svd"),
    ("SkyReelsV2", "skyreels-v2"),
    ("EasyAnimate", "easyanimate"),
    ("SanaVideo", "sana-video"),
    ("StableDiffusionXL", "sdxl"),
    ("StableDiffusion3", "sd3"),
    ("StableDiffusion", "sd"),
    ("Flux2", "flux2"),
    ("Flux", "flux"),
    ("PixArtAlpha", "pixart"),
    ("PixArtSigma", "pixart-sigma"),
    ("Sana", "sana"),
    ("QwenImage", "qwen-image"),
    ("CogView4", "cogview4"),
    ("CogView3", "cogview3"),
    ("HunyuanDiT", "hunyuandit"),
    ("Kolors", "kolors"),
    ("AuraFlow", "auraflow"),
    ("Lumina2", "lumina2"),
)
#: Families whose pipelines generate video (their default task is ``t2v``).
VIDEO_FAMILIES: Final = frozenset({
    WAN21, WAN22, "cogvideox", "ltx", "ltx2", "hunyuanvideo", "hunyuanvideo1.5", "mochi",
    "allegro", "latte", "animatediff", "svd", "skyreels-v2", "easyanimate", "sana-video"})
#: Task words in class names, checked in order (``ImageToVideo`` before ``Image``).
TASK_WORDS: Final[tuple[tuple[str, str], ...]] = (
    ("ImageToVideo", "i2v"), ("Img2Vid", "i2v"), ("VideoToVideo", "v2v"), ("Video2Video", "v2v"),
    ("Img2Img", "i2i"), ("ImageToImage", "i2i"), ("Inpaint", "inpaint"),
    ("Text2Video", "t2v"), ("TextToVideo", "t2v"),
)
#: Tasks whose output is a video.
VIDEO_TASKS: Final = frozenset({"t2v", "i2v", "ti2v", "v2v"})
#: Frames per second each video family generates for (the model cards); Wan's in
#: :mod:`telemetry.wan`.
FPS: Final[dict[str, int]] = {"cogvideox": 8, "ltx": 24, "ltx2": 24, "hunyuanvideo": 24,
                              "hunyuanvideo1.5": 24, "mochi": 30, "allegro": 15, "latte": 8,
                              "animatediff": 8, "svd": 7, "skyreels-v2": 24}
#: The rate assumed for a video family the table does not know.
DEFAULT_FPS: Final = 16
#: (frames per latent frame, pixels per token side) of families whose latents are not Wan's
#: (4, 16): LTX-Video's VAE compresses 8× in time and 32× in space (patch 1); an image
#: family's one frame stays one, and its token covers the VAE's 8 pixels × a patch of 2.
GEOMETRY: Final[dict[str, tuple[int, int]]] = {"ltx": (8, 32), "ltx2": (8, 32),
                                               "sd": (1, 8), "sdxl": (1, 8)}
_VIDEO_GEOMETRY: Final = (4, 16)
_IMAGE_GEOMETRY: Final = (1, 16)


class PipelineKind(NamedTuple):
    """A pipeline's ``family``, ``task`` and ``variant`` labels (as ``JobStarted`` has)."""

    family: str
    task: str
    variant: str


def is_wan(family: str) -> bool:
    """Whether a family is Wan's (2.1 or 2.2): the one whose published priors wantel has."""
    return family in (WAN21, WAN22)


def cost_family(family: str) -> str:
    """The family a cost model learns under: ``wan`` for Wan 2.1 and 2.2 (they share their
    VAE and transformer layouts, so each teaches the other), else the family itself."""
    return "wan" if is_wan(family) else family


def family_of(pipeline_class: str) -> str:
    """The family a (non-Wan) diffusers class name belongs to (see the module's docstring)."""
    for prefix, family in FAMILIES:
        if pipeline_class.startswith(prefix):
            return family
    name = pipeline_class.removesuffix("Pipeline")
    for word, _task in TASK_WORDS:
        name = name.replace(word, "")
    return name.lower() or "unknown"


def task_of(pipeline_class: str, family: str) -> str:
    """The task a (non-Wan) class performs: its task words, else ``t2v`` for a video family,
    ``t2i`` for any other; Stable Video Diffusion only animates an image (``i2v``)."""
    for word, task in TASK_WORDS:
        if word in pipeline_class:
            return task
    if family == "svd":
        return "i2v"
    return "t2v" if family in VIDEO_FAMILIES or "Video" in pipeline_class else "t2i"


def classify_pipeline(pipeline_class: str, *, two_experts: bool = False,
                      expand_timesteps: bool = False, boundary_ratio: float | None = None,
                      width: int | None = None) -> PipelineKind:
    """The family, task and variant of any diffusers pipeline class.

    A ``Wan…`` class follows :func:`telemetry.wan.classify` (the configuration facts matter
    there, the transformer's ``width`` its size); any other, the class name alone.
    """
    if pipeline_class.startswith("Wan"):
        kind = classify(pipeline_class=pipeline_class, two_experts=two_experts,
                        expand_timesteps=expand_timesteps, boundary_ratio=boundary_ratio,
                        width=width)
        return PipelineKind(kind.family, kind.task, kind.variant)
    family = family_of(pipeline_class)
    task = task_of(pipeline_class, family)
    return PipelineKind(family, task, task)


def is_video(task: str | None) -> bool:
    """Whether a job of ``task`` makes a video (else an image)."""
    return task in VIDEO_TASKS


def native_fps(family: str | None, task: str | None) -> int:
    """Frames per second a model of this family and task generates for (Wan: 16, TI2V-5B:
    24; CogVideoX: 8…; :data:`DEFAULT_FPS` for a family the table does not know; an image
    is one frame, and is given the default rate so a frame count still converts)."""
    if family is None or is_wan(family):
        return wan_fps(task)
    return FPS.get(family, DEFAULT_FPS)


def geometry(family: str, task: str) -> tuple[int, int]:
    """(frames per latent frame, pixels per token side) of this family's latents: what the
    ETA and memory models count a job's tokens with. Wan's are (4, 16), TI2V-5B's (4, 32)."""
    if is_wan(family):
        return (4, 32) if task == "ti2v" else (4, 16)
    if family in GEOMETRY:
        return GEOMETRY[family]
    return _VIDEO_GEOMETRY if is_video(task) else _IMAGE_GEOMETRY


__all__ = ["FAMILIES", "PipelineKind", "classify_pipeline", "cost_family", "family_of",
           "geometry", "is_video", "is_wan", "native_fps", "task_of"]
