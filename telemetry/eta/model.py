"""Per-component cost functions, their published priors, and the calibration that replaces them.

A job's expected duration is the sum of its phases. Each phase's cost is a small linear model
over the job's shape, and each model belongs to a *component* shared by every variant that uses
it: the Wan 2.1 VAE decodes for T2V, I2V and both A14B layouts; one transformer pass costs the
same for the cond and the uncond pass and for either A14B expert. Fitting per component rather
than per variant lets every run teach every variant that shares the part.

Features are scaled (tokens in thousands, pixels in millions) so the fit stays well conditioned.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from typing import Final, NamedTuple

import msgspec

from telemetry.eta.shape import JobShape
from telemetry.events import EtaCalibrated
from telemetry.pipelines import is_video, is_wan
from telemetry.wan import WIDTHS, uses_image_encoder, uses_wan22_vae

PHASES: Final = ("load", "text_encode", "image_encode", "latent_init", "denoise", "decode",
                 "postprocess", "save")
STEP: Final = "step"  # the per-pass component of the denoise phase
DEFAULT_REL_SIGMA: Final = 0.35
#: How wrong the neutral prior of a family without published figures (anything not Wan) is
#: taken to be before its own jobs calibrate it: a factor of ~2.7 either way.
NEUTRAL_REL_SIGMA: Final = 1.0

#: Where an ETA is scored and calibrated, as fractions of a job's *actual* duration (5, 10, 25,
#: 50 and 75 %): so no estimator is scored at a moment of its own choosing. ``wantel eta eval``
#: scores at each, ``wantel eta fit`` calibrates the interval at each, and a trace's root span
#: carries the ETA at some of them.
CHECKPOINTS: Final = (0.05, 0.10, 0.25, 0.50, 0.75)
#: The progress buckets ETAs are scored and calibrated by (percent of the job's expected
#: duration; half-open): the ``progress_bucket`` label of ``wantel_eta_relative_error``.
BUCKETS: Final = ("0-10", "10-25", "25-50", "50-75", "75-100")
#: The lower edge of each bucket after the first, as a fraction.
_BUCKET_EDGES: Final = (0.10, 0.25, 0.50, 0.75)


def bucket_of(progress: float) -> str:
    """The progress bucket (percent of the job's expected duration) a fraction falls in.

    NaN falls in the last (no comparison with it is true).
    """
    return BUCKETS[bisect_right(_BUCKET_EDGES, progress)]


def transformer_id(shape: JobShape) -> str:
    """Which transformer runs the steps: cost depends on its size, not on the variant name.

    Another family's denoiser (a UNet or a DiT) is its own component, ``denoiser-<family>``:
    it never shares Wan's costs (nor, tiny, Wan's tiny ones).
    """
    if not is_wan(shape.family):
        return f"denoiser-{shape.family}{'-tiny' if shape.tiny else ''}"
    if shape.tiny:
        return "dit-tiny"
    variant = shape.variant.lower()
    if "1.3b" in variant:
        return "dit-1.3B"
    if "5b" in variant or shape.task == "ti2v":
        return "dit-5B"
    return "dit-14B"


def vae_id(shape: JobShape) -> str:
    """Which VAE encodes and decodes: Wan 2.2's 48-channel one serves only TI2V-5B; another
    family's is ``vae-<family>``."""
    if not is_wan(shape.family):
        return f"vae-{shape.family}{'-tiny' if shape.tiny else ''}"
    base = "vae-2.2" if uses_wan22_vae(shape.task) else "vae-2.1"
    return f"{base}-tiny" if shape.tiny else base


def component_key(phase: str, shape: JobShape) -> str:
    """The component a phase's cost is fitted on, on this device class."""
    return f"{phase}|{component_part(phase, shape)}|{shape.device}"


def component_part(phase: str, shape: JobShape) -> str:
    """The part that runs ``phase``: the transformer for a step, the VAE for the decode, …;
    the variant for what is its own (load, save)."""
    if phase == STEP:
        return transformer_id(shape)
    if phase in ("decode", "postprocess"):
        return vae_id(shape)
    if phase == "latent_init":
        # I2V encodes the conditioning video with the VAE here; T2V only draws noise.
        return f"{vae_id(shape)}:{'encode' if shape.task == 'i2v' else 'noise'}"
    if phase == "text_encode":
        return text_encoder_id(shape)
    return shape.variant


def text_encoder_id(shape: JobShape) -> str:
    """Which text encoder encodes the prompt: Wan's UMT5-XXL, else ``text-<family>``."""
    if not is_wan(shape.family):
        return f"text-{shape.family}{'-tiny' if shape.tiny else ''}"
    return "umt5-tiny" if shape.tiny else "umt5-xxl"


def speed_key(device: str) -> str:
    """Where a calibration keeps the spread of job speeds on a device class (in
    ``rel_sigma``, beside the components' spreads): how much one job's phases run faster or
    slower together."""
    return f"speed|{device}"


def features(phase: str, shape: JobShape) -> tuple[float, ...]:
    """The regressors of a phase's duration (of one pass, for ``step``)."""
    if phase == STEP:
        t = shape.tokens / 1e3
        return (1.0, t, t * t)
    if phase == "text_encode":
        return (1.0, 1.0 if shape.cfg else 0.0)
    if phase in ("decode", "postprocess", "save", "latent_init"):
        return (1.0, shape.pixels / 1e6)
    return (1.0,)


#: The phases whose cost is paid per video generated (``num_videos_per_prompt``): a job's is
#: its videos times one video's, which is what the priors and a calibration's coefficients
#: give (the transformer's pass too: a batch of three videos is three times the tokens).
PER_VIDEO: Final = frozenset({STEP, "latent_init", "decode", "postprocess", "save"})


def videos_of(phase: str, shape: JobShape) -> int:
    """How many videos' worth of ``phase`` the job runs: its videos per prompt where the phase
    is paid per video (:data:`PER_VIDEO`), else 1."""
    return shape.videos if phase in PER_VIDEO else 1


def expected_phases(shape: JobShape, *, runner: bool) -> tuple[str, ...]:
    """The phases a job will go through: ``load``/``save`` only when ``wantel run`` drives it."""
    phases = ["text_encode"]
    if uses_image_encoder(family=shape.family, task=shape.task):
        phases.append("image_encode")
    phases += ["latent_init", "denoise", "decode", "postprocess"]
    if runner:
        phases = ["load", *phases, "save"]
    return tuple(phases)


class Calibration(msgspec.Struct, frozen=True, kw_only=True):
    """Fitted coefficients per component, and how wrong the fit was (for intervals)."""

    coefficients: dict[str, tuple[float, ...]] = {}
    rel_sigma: dict[str, float] = {}
    warmup: dict[str, float] = {}  # step component → first-step duration ÷ later steps
    quantiles: dict[str, tuple[float, float]] = {}  # bucket → p10, p90 of actual/predicted
    jobs: int = 0
    #: Multiplies every prior (never recorded: ``wantel eta eval --prior-scale``'s experiment
    #: of a prior that is off, as on hardware the priors do not describe).
    prior_scale: float = 1.0

    @classmethod
    def of(cls, event: EtaCalibrated) -> Calibration:
        """The calibration an ``EtaCalibrated`` event records."""
        return cls(coefficients=event.coefficients, rel_sigma=event.rel_sigma,
                   warmup=event.warmup, quantiles=event.quantiles, jobs=event.jobs)


def _solve_prior(points: Sequence[tuple[float, float]]) -> tuple[float, ...]:
    """b·t + c·t² through two (tokens/1e3, seconds per pass) points; a = 0."""
    (t1, y1), (t2, y2) = points
    c = (y2 - y1 * t2 / t1) / (t2 * t2 - t1 * t2)
    b = (y1 - c * t1 * t1) / t1
    return (0.0, b, c)


# Published totals (single GPU, 81 frames @ 480P = 832×480 → 32,760 tokens; 720P → 75,600),
# with the denoise loop taken as 90 % of the total and CFG on (two passes per step):
#   Wan2.2 README "Computational Efficiency" (Wan-Video/Wan2.2 @42bf4cf, offload on, 40 steps):
#     T2V-A14B H100 480P 326.9 s, 720P 1041.5 s; A100 480P 785.7 s, 720P 2735.7 s;
#     H20 480P 1133.9 s, 720P 4048.7 s. TI2V-5B RTX 4090 720P (1280×704, 121 frames →
#     27,280 tokens, 50 steps) 534.7 s.
#   Wan2.1 README (Wan-Video/Wan2.1 @9737cba): T2V-1.3B RTX 4090 480P, 50 steps, 261.4 s.
def _per_pass(total_s: float, steps: int) -> float:
    return total_s * 0.9 / (2 * steps)


class Transformer(NamedTuple):
    """A Wan transformer's architecture (per expert for A14B): what its cost and memory scale
    with."""

    params: float
    width: int
    ffn: int
    layers: int


#: Wan's transformers: parameters (the model cards, Wan-Video/Wan2.1 and Wan2.2 READMEs; the
#: 1.3B count is the one ``benchmarks/gpu_check.py`` built), width (:data:`telemetry.wan.WIDTHS`),
#: FFN width and layers (the diffusers configurations: 1.3B 8960, 30; 5B 14336, 30; 14B 13824, 40).
TRANSFORMERS: Final[dict[str, Transformer]] = {
    "dit-1.3B": Transformer(1_418_996_800, WIDTHS["1.3B"], 8960, 30),
    "dit-5B": Transformer(5.0e9, WIDTHS["5B"], 14336, 30),
    "dit-14B": Transformer(14.0e9, WIDTHS["14B"], 13824, 40),
    "dit-tiny": Transformer(50_000, 24, 32, 2),  # inference/tiny_models.py: 2 × 12, 2 layers
}


PUBLISHED_STEP_PRIORS: Final[dict[tuple[str, str], tuple[float, ...]]] = {
    ("dit-14B", "H100"): _solve_prior([(32.76, _per_pass(326.9, 40)),
                                        (75.6, _per_pass(1041.5, 40))]),
    ("dit-14B", "H200"): _solve_prior([(32.76, _per_pass(326.9, 40)),
                                        (75.6, _per_pass(1041.5, 40))]),
    ("dit-14B", "A100"): _solve_prior([(32.76, _per_pass(785.7, 40)),
                                        (75.6, _per_pass(2735.7, 40))]),
    ("dit-14B", "H20"): _solve_prior([(32.76, _per_pass(1133.9, 40)),
                                       (75.6, _per_pass(4048.7, 40))]),
    ("dit-5B", "4090"): (0.0, _per_pass(534.7, 50) / 27.28, 0.0),
    ("dit-1.3B", "4090"): (0.0, _per_pass(261.4, 50) / 32.76, 0.0),
}

# Tiny random-weight Wan pipelines on one CPU thread (diffusers 0.42, torch 2.13), every phase
# measured in one run so that their ratios hold (a job's phases share its speed; the level
# moves with the machine): ``python benchmarks/tiny_priors.py`` records 30 ``wantel run`` jobs
# (a still to 3,300 tokens) and fits them. Keyed by phase, and by ``phase|part`` where a part
# differs: Wan 2.2's VAE decodes a pixel 3.7× cheaper than Wan 2.1's. The latent_init here is
# I2V's, which encodes the image with the VAE (noise latents are _NOISE_LATENTS). The save is
# ``wantel run``'s, less FIRST_EXPORT_S, which a process's first video pays on top (each
# ``wantel run`` job is one); a tiny model's video compresses far better than the random
# pixels of ``benchmarks/save_cost.py``. Calibration replaces them after the first jobs.
_TINY_CPU: Final[dict[str, tuple[float, ...]]] = {
    "load": (0.032,),
    "text_encode": (0.031, 0.020),
    "image_encode": (0.0064,),
    "latent_init": (0.0036, 0.96),
    STEP: (0.0022, 0.0065, 0.0027),
    "decode": (0.0029, 1.49),
    "decode|vae-2.2-tiny": (0.0039, 0.40),
    "postprocess": (0.0004, 0.015),
    "save": (0.08, 0.05),
}
#: What a process's first video costs on top (imageio's ffmpeg plugin and binary found, its
#: first subprocess: 0.14–0.15 s against 0.045 s for the next, measured here): a worker's
#: first job pays it, its later jobs (``warm``: :func:`telemetry.eta.live.device_level`) not.
FIRST_EXPORT_S: Final = 0.1
# Real models without a published figure for the phase: generic guesses, deliberately wide.
# They are also the neutral prior of every real model of another family than Wan, with
# NEUTRAL_REL_SIGMA as their spread: the family's own jobs calibrate them online.
_GENERIC: Final[dict[str, tuple[float, ...]]] = {
    "load": (60.0,),
    "text_encode": (1.0, 0.8),
    "image_encode": (1.0,),
    "latent_init": (0.5, 1.0),
    STEP: (0.5, 0.1, 0.001),
    "decode": (5.0, 0.6),
    "postprocess": (0.2, 0.05),
    "save": (0.5, 0.05),
}


# The neutral prior of a tiny random-weight pipeline of another family than Wan: round
# figures that assume nothing of its layout (no token or pixel term; a step is a step), with
# NEUTRAL_REL_SIGMA as their spread. Not Wan's tiny figures: its first job says "estimating"
# until two steps are measured, and its own completed jobs calibrate every phase online
# (keyed by family: :func:`telemetry.eta.live.device_level`).
_NEUTRAL_TINY: Final[dict[str, tuple[float, ...]]] = {
    "load": (0.5,),
    "text_encode": (0.05, 0.0),
    "image_encode": (0.05,),
    "latent_init": (0.01, 0.0),
    STEP: (0.01, 0.0, 0.0),
    "decode": (0.05, 0.0),
    "postprocess": (0.01, 0.0),
    "save": (0.05, 0.0),
}


_NOISE_LATENTS: Final = (0.002, 0.0)


def prior_coefficients(phase: str, shape: JobShape) -> tuple[float, ...]:
    """The best figure available before any calibration."""
    if phase == STEP and not shape.tiny and is_wan(shape.family):
        published = published_step_prior(transformer_id(shape), shape.device)
        if published is not None:
            return published
    if phase == "latent_init" and shape.task != "i2v":
        # Drawing noise latents (T2V, TI2V's text mode) is a few milliseconds at any size;
        # only I2V encodes its image with the VAE here (the pixel term).
        return _NOISE_LATENTS
    if shape.tiny and is_wan(shape.family):
        return _TINY_CPU.get(f"{phase}|{component_part(phase, shape)}") or _TINY_CPU[phase]
    if shape.tiny:
        return _NEUTRAL_TINY[phase]
    return _GENERIC[phase]


def published_step_prior(part: str, device: str) -> tuple[float, ...] | None:
    """A Wan transformer's pass on ``device`` from published figures: its own where published
    for this device; else the published one of the nearest size on this device, scaled by
    the two transformers' FLOPs term by term — the token term by their parameters (2 FLOPs a
    parameter a token), the tokens² term by layers × width (attention's QKᵀ and AV). Checked
    against a measured pass: the 1.3B on an H100, scaled from the 14B's published H100
    figure, says 0.158 s at 832 × 480 × 33 frames where ``benchmarks/gpu_check.py`` measured
    0.195 s (the generic guess said 2.1 s); the 5B's 4090 figure scaled to the 1.3B says
    1.64 s a pass at 480P, the 1.3B's own 2.35 s. ``None`` where this device has no figure."""
    lowered = device.lower()
    on_device: dict[str, tuple[float, ...]] = {}
    for (name, gpu), figure in PUBLISHED_STEP_PRIORS.items():
        if gpu.lower() in lowered:
            on_device.setdefault(name, figure)  # the first match: an H200 is not an H20
    if part in on_device:
        return on_device[part]
    target = TRANSFORMERS.get(part)
    if target is None or not on_device:
        return None
    reference = min((p for p in on_device if p in TRANSFORMERS), default=None,
                    key=lambda p: abs(math.log(TRANSFORMERS[p].params / target.params)))
    if reference is None:
        return None
    ref = TRANSFORMERS[reference]
    constant, per_token, per_token_squared = on_device[reference]
    by_params = target.params / ref.params
    return (constant * by_params, per_token * by_params,
            per_token_squared * target.layers * target.width / (ref.layers * ref.width))


def predict(phase: str, shape: JobShape, calibration: Calibration) -> float:
    """Expected seconds of a phase (of one transformer pass, for ``step``; of one video, for
    the phases done per video); never negative."""
    coefficients = calibration.coefficients.get(component_key(phase, shape))
    scale = 1.0
    if coefficients is None:
        coefficients = prior_coefficients(phase, shape)
        scale = calibration.prior_scale
    value = sum(c * x for c, x in zip(coefficients, features(phase, shape), strict=False))
    return max(value * scale, 1e-4)


def first_export(shape: JobShape, calibration: Calibration, *, warm: bool) -> float:
    """What the save stage costs once per job on top of its videos: :data:`FIRST_EXPORT_S` for a
    tiny model's video (an image is written by PIL, with no ffmpeg to start) in a job that is
    its process's first (not ``warm``), while the save's prior is in force (a calibration's
    fit measured it, whatever it was)."""
    if (warm or not shape.tiny or not is_video(shape.task)
            or component_key("save", shape) in calibration.coefficients):
        return 0.0
    return FIRST_EXPORT_S * calibration.prior_scale


def rel_sigma(phase: str, shape: JobShape, calibration: Calibration) -> float:
    """How wrong this component's prediction tends to be (relative standard deviation): the
    calibration's figure, else :data:`DEFAULT_REL_SIGMA` for Wan's priors and
    :data:`NEUTRAL_REL_SIGMA` for another family's neutral one."""
    default = DEFAULT_REL_SIGMA if is_wan(shape.family) else NEUTRAL_REL_SIGMA
    return calibration.rel_sigma.get(component_key(phase, shape), default)


def warmup_factor(shape: JobShape, calibration: Calibration) -> float:
    """How much longer the first step takes than the others (compilation, allocator warm-up)."""
    return calibration.warmup.get(component_key(STEP, shape), 1.0)
