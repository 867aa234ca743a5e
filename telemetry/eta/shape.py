"""What a job is, in the terms its cost depends on.

Tokens for Wan = latent frames ((F−1)/4+1) × (H/16) × (W/16) — /32 for the TI2V-5B layout,
whose VAE compresses space by 16 and whose transformer patches by 2; other families count
theirs by their own latent geometry (:func:`telemetry.pipelines.geometry`). A transformer pass costs
a + b·tokens + c·tokens² (attention is quadratic); with classifier-free guidance each step
runs two passes. Decoding and post-processing scale with output pixels (frames × H × W).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import msgspec

from telemetry.events import JobStarted
from telemetry.pipelines import geometry
from telemetry.wan import is_tiny, runs_two_experts


class JobShape(msgspec.Struct, frozen=True, kw_only=True):
    """The cost-relevant facts of one job."""

    variant: str
    family: str
    task: str
    device: str
    width: int
    height: int
    frames: int
    steps: int
    cfg: bool
    two_experts: bool
    offload: bool = False
    #: The options that change speed, as ``key=value`` pairs (``offload=model,dtype=bfloat16``):
    #: costs are learned per set of options (see :data:`SPEED_OPTIONS`).
    speed: str = ""
    #: Videos generated per prompt: the transformer, the VAE and saving each do that many.
    videos: int = 1

    @classmethod
    def of(cls, event: JobStarted) -> JobShape:
        """The shape of the job a ``JobStarted`` describes."""
        options = event.options
        offload = options.get("offload")
        videos = options.get("num_videos")
        return cls(
            variant=event.variant, family=event.family, task=event.task,
            device=device_class(event.device.kind, event.device.name),
            width=event.width, height=event.height, frames=max(event.num_frames, 1),
            steps=max(event.steps, 0), cfg=event.cfg,
            two_experts=runs_two_experts(family=event.family, variant=event.variant,
                                         boundary_ratio=event.boundary_ratio),
            offload=offload not in (None, False, "none", ""),
            speed=speed_options(options),
            videos=videos if type(videos) is int and 1 <= videos <= 64 else 1,
        )

    @property
    def tiny(self) -> bool:
        """A tiny random-weight variant (``tiny-…``)."""
        return is_tiny(self.variant)

    @property
    def latent_frames(self) -> int:
        """Frames after the VAE's temporal compression (4× for Wan; the family's, see
        :func:`telemetry.pipelines.geometry`)."""
        return (self.frames - 1) // geometry(self.family, self.task)[0] + 1

    @property
    def spatial_patch(self) -> int:
        """Pixels per token side: VAE spatial factor × transformer patch (16 for Wan, 32 for
        TI2V-5B; the family's, see :func:`telemetry.pipelines.geometry`)."""
        return geometry(self.family, self.task)[1]

    @property
    def tokens(self) -> int:
        """The transformer's sequence length."""
        p = self.spatial_patch
        return self.latent_frames * max(self.height // p, 1) * max(self.width // p, 1)

    @property
    def pixels(self) -> int:
        """Output pixels: frames × height × width."""
        return self.frames * self.height * self.width

    @property
    def passes(self) -> int:
        """Transformer passes per step: 2 with classifier-free guidance."""
        return 2 if self.cfg else 1


#: ``JobStarted.options`` keys that change how fast a job runs (docs/events.md): offloading,
#: quantization, ``torch.compile``, the attention backend, the weights' dtype, LoRA adapters
#: (fused or not, they add work to every pass) and VAE tiling (the decode runs in tiles).
SPEED_OPTIONS: Final = ("offload", "quantization", "compiled", "attention_backend", "dtype",
                        "lora_count", "vae_tiling")
_DEFAULTS: Final = (None, False, "none", "", 0)


def speed_options(options: Mapping[str, object]) -> str:
    """The options of :data:`SPEED_OPTIONS` a job set (not at their defaults), as one key."""
    if not options:
        return ""
    return ",".join(f"{key}={value}" for key in SPEED_OPTIONS
                    if (value := options.get(key)) not in _DEFAULTS)


def device_class(kind: str, name: str) -> str:
    """A stable device key: ``cuda:NVIDIA H100 80GB HBM3``, ``cpu``…

    CPUs are one class: tiny models' cost depends on the machine, which calibration absorbs.
    """
    return "cpu" if kind == "cpu" else f"{kind}:{name}"
