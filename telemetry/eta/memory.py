"""The memory model: a job's peak memory before it starts, from the ETA's shape features.

What is predicted is the kind of peak that decides whether a job fits: on CUDA the caching
allocator's peak of allocated bytes (``torch_allocated``: ``torch.cuda.max_memory_allocated``),
on a CPU the process's resident set (``host_rss``), elsewhere the device's use (``device``).

The prior is a sum of components (:func:`prior`)::

    peak = base + resident weights + max(denoise activations, VAE decode working set)

* **weights**: each component's parameter count × bytes per parameter (the job's dtype, or
  its quantization: 8-bit 1 byte, 4-bit ½); offloading changes what is resident on the device
  at the peak: ``none`` every component (diffusers keeps the text encoder on the device too),
  ``model`` (``enable_model_cpu_offload``) only the component running (the transformer while
  denoising, the VAE while decoding), ``sequential`` about one transformer block. On a CPU
  every weight is resident whatever the offload mode.
* **activations** of one transformer pass grow with tokens: the FFN's hidden state and
  q/k/v/o at the model's width (``tokens × (ffn + 4·dim)``), twice (an input and an output
  alive together), times videos per prompt. Classifier-free guidance runs its two passes one
  after the other in diffusers' Wan pipelines, so it does not double them. Attention through
  SDPA's flash/memory-efficient kernels is linear in tokens (no tokens² matrix).
* **the VAE decode** runs latent frame by latent frame with a feature cache (diffusers'
  ``AutoencoderKLWan``), so its working set grows with one frame's pixels (H × W), capped by
  the tile with VAE tiling on (256 × 256), plus the decoded video itself (frames × 3 × H × W
  × 4 bytes, float32).

Sources (public figures; the numbers below are derived from them in comments):

* parameter counts: Wan 2.1 T2V-1.3B and 14B, Wan 2.2 TI2V-5B and A14B (two 14B experts) —
  the model cards (Wan-Video/Wan2.1, Wan-Video/Wan2.2 READMEs); the 1.3B count is the one
  ``benchmarks/gpu_check.py`` built (1,418,996,800). UMT5-XXL encoder ≈ 5.7B (its bf16
  checkpoint ``models_t5_umt5-xxl-enc-bf16.pth`` is 11.4 GB). Wan 2.1 VAE ≈ 127M
  (``Wan2.1_VAE.pth``, 508 MB in float32); Wan 2.2 VAE ≈ 705M (``Wan2.2_VAE.pth``, 2.82 GB in
  float32). CLIP ViT-H/14 vision tower ≈ 632M (Wan 2.1 I2V's image encoder).
* widths (dim, ffn): the diffusers configurations of the same checkpoints (1.3B: 1536, 8960;
  5B: 3072, 14336; 14B: 5120, 13824); the table is ``telemetry.eta.model.TRANSFORMERS``,
  which the ETA's priors scale by too.
* the decode's working set: the Wan 2.1 README's "T2V-1.3B requires only 8.19 GB VRAM" (480P,
  81 frames, ``--offload_model True --t5_cpu``: the transformer is off the GPU while the VAE
  decodes, so the peak is the decode): 8.19 GiB − the VAE's 0.51 GB − the decoded video's
  0.39 GB (81 × 3 × 480 × 832 × 4) = 7.90 GB over 480 × 832 pixels a frame ≈ 19.8 kB per pixel
  of one frame. Wan 2.2's VAE has no published figure: twice that, a guess (it is wider).
* the check against this repository's H100 run (``benchmarks/results/
  gpu_check-h100-2026-11-27-16rounds.json``: the 1.42B transformer in bf16, a 2-layer UMT5 of
  width 4096, the float32 VAE, 832 × 480, 33 frames, CFG, no offload): the prior says 11.4 GB,
  ``torch.cuda.max_memory_allocated`` said 12.62 GB: −9.4 % (``tests/telemetry/
  test_memory_model.py`` pins it; docs/advise.md).
* tiny random-weight models on a CPU (measured here, on ``tests/fixtures/eta-corpus``: host RSS
  of real ``wantel run`` jobs): ~440 MiB of process (Python, torch, diffusers) and ~80 bytes per
  output pixel.

Calibration is online, like the ETA's (:mod:`telemetry.eta.online`, whose statistics this
reuses): when a job completes, ``log(observed peak ÷ prior)`` is learned at the device level
(this machine, this kind of memory), the component level (this transformer and VAE with these
options, as a line in the log of the job's pixels) and the family level (this exact shape);
the next prediction is the prior × ``exp`` of their shrunk sum. Deterministic: a replay learns
exactly what the live fold did.
"""

from __future__ import annotations

import math
from typing import Final, NamedTuple

from telemetry.eta import online
from telemetry.eta.model import TRANSFORMERS, text_encoder_id, transformer_id, vae_id
from telemetry.eta.shape import JobShape
from telemetry.pipelines import cost_family, is_wan
from telemetry.wan import uses_image_encoder

GB: Final = 1e9
MiB: Final = 2**20

TEXT_ENCODER_PARAMS: Final = {"umt5-xxl": 5.7e9, "umt5-tiny": 50_000}
VAE_PARAMS: Final = {"vae-2.1": 127e6, "vae-2.2": 705e6, "vae-2.1-tiny": 10_000,
                     "vae-2.2-tiny": 10_000}
#: Another family's parts, where no figure is known: the sizes of Wan's (a 5B transformer,
#: UMT5-XXL, the Wan 2.1 VAE; tiny ones, the tiny ones) as a neutral prior, which the family's
#: recorded peaks calibrate (keyed by family, see :func:`keys`).
NEUTRAL_DIT: Final = "dit-5B"
IMAGE_ENCODER_PARAMS: Final = 632e6  # CLIP ViT-H/14's vision tower (Wan 2.1 I2V)
#: Bytes of the decode's working set per pixel of one frame (Wan 2.1 VAE; see above).
DECODE_BYTES_PER_FRAME_PIXEL: Final = {"vae-2.1": 19_800.0, "vae-2.2": 39_600.0}
#: The largest frame a tiled decode works on at once (diffusers' default tile, 256 × 256).
TILE_PIXELS: Final = 256 * 256
#: A CPU process's resident set before any job (Python, torch, diffusers; measured here).
CPU_PROCESS_BYTES: Final = 440 * MiB
#: A tiny model's decode on a CPU: bytes of RSS per output pixel (measured here).
TINY_BYTES_PER_PIXEL: Final = 80.0
#: A log ratio of observed to predicted is learned as at most this (a factor of ~20).
RATIO_LIMIT: Final = 3.0


def peak_kind(device_kind: str) -> str:
    """The kind of peak predicted for a device kind (``cuda`` → ``torch_allocated``…)."""
    if device_kind == "cuda":
        return "torch_allocated"
    return "host_rss" if device_kind == "cpu" else "device"


def _option(speed: str, key: str) -> str | None:
    for pair in speed.split(","):
        name, _, value = pair.partition("=")
        if name == key:
            return value
    return None


def bytes_per_parameter(shape: JobShape) -> float:
    """The transformer's bytes per parameter: its quantization, else its dtype (bf16 by
    default on an accelerator, float32 on a CPU)."""
    quantization = (_option(shape.speed, "quantization") or "").lower()
    if quantization not in ("", "none"):
        if "4" in quantization:
            return 0.5
        if "8" in quantization:
            return 1.0
    dtype = (_option(shape.speed, "dtype") or "").lower()
    if dtype in ("float32", "fp32"):
        return 4.0
    if dtype in ("bfloat16", "float16", "bf16", "fp16"):
        return 2.0
    return 4.0 if shape.device == "cpu" else 2.0


def offload_mode(shape: JobShape) -> str:
    """``none``, ``model`` or ``sequential``."""
    return _option(shape.speed, "offload") or "none"


class Components(NamedTuple):
    """The prior's terms, in bytes: what is resident while denoising and while decoding, and
    the working sets of each."""

    base: float
    weights_denoise: float
    weights_decode: float
    activations: float
    decode: float

    @property
    def total(self) -> float:
        """The predicted peak: the larger of the two phases."""
        return self.base + max(self.weights_denoise + self.activations,
                               self.weights_decode + self.decode)


def components(shape: JobShape, *, offload: str | None = None,
               params: dict[str, float] | None = None) -> Components:
    """The prior's terms for ``shape`` (``offload`` overrides the job's mode; ``params``
    overrides parameter counts by part: ``transformer``, ``text_encoder``, ``vae``,
    ``image_encoder`` — for a pipeline built with other parts, as the GPU check's is)."""
    params = params or {}
    mode = offload if offload is not None else offload_mode(shape)
    dit = transformer_id(shape)
    vae = vae_id(shape)
    tiny = shape.tiny
    count, dim, ffn, _layers = TRANSFORMERS.get(
        dit, TRANSFORMERS["dit-tiny" if tiny else NEUTRAL_DIT])
    count = params.get("transformer", count)
    experts = 2 if "a14b" in shape.variant.lower() else 1
    per_param = bytes_per_parameter(shape)
    transformer = count * per_param
    text_id = text_encoder_id(shape)
    text = params.get("text_encoder", TEXT_ENCODER_PARAMS.get(
        text_id, TEXT_ENCODER_PARAMS["umt5-tiny" if tiny else "umt5-xxl"])) * per_param
    vae_params = VAE_PARAMS.get(vae, VAE_PARAMS["vae-2.1-tiny" if tiny else "vae-2.1"])
    vae_bytes = params.get("vae", vae_params) * 4.0  # the VAE runs in float32
    image = 0.0
    if uses_image_encoder(family=shape.family, task=shape.task):
        image = params.get("image_encoder", 0.0 if shape.tiny else IMAGE_ENCODER_PARAMS)
        image *= per_param
    act_bytes = 4.0 if per_param >= 4.0 else 2.0
    activations = shape.videos * shape.tokens * (ffn + 4 * dim) * act_bytes * 2
    video = shape.videos * shape.pixels * 3 * 4.0
    if shape.tiny:
        decode = shape.videos * shape.pixels * TINY_BYTES_PER_PIXEL
    else:
        frame = shape.width * shape.height
        if "vae_tiling=True" in shape.speed:
            frame = min(frame, TILE_PIXELS)
        decode = frame * DECODE_BYTES_PER_FRAME_PIXEL.get(
            vae.removesuffix("-tiny"), DECODE_BYTES_PER_FRAME_PIXEL["vae-2.1"]) + video
    everything = experts * transformer + text + vae_bytes + image
    if shape.device == "cpu":
        return Components(CPU_PROCESS_BYTES, everything, everything, activations, decode)
    if mode == "model":
        return Components(0.0, transformer, vae_bytes, activations, decode)
    if mode == "sequential":
        block = transformer / 30  # about one of the transformer's blocks at a time
        return Components(0.0, block, vae_bytes, activations, decode)
    return Components(0.0, everything, everything, activations, decode)


def prior(shape: JobShape, *, offload: str | None = None) -> float:
    """The prior's predicted peak in bytes (see the module's docstring)."""
    return components(shape, offload=offload).total


def keys(shape: JobShape, kind: str) -> online.PhaseKeys:
    """The keys a job's peak is learned under: device and kind; the transformer and VAE with
    the job's options (a line in log pixels); the exact shape."""
    device = f"mem|{kind}|{shape.device}"
    if not is_wan(shape.family):  # a neutral prior's error is the family's, not the device's
        device = f"mem|{kind}|{cost_family(shape.family)}|{shape.device}"
    component = (f"mem|{transformer_id(shape)}|{vae_id(shape)}|{shape.task}|{shape.speed}|"
                 f"{shape.device}")
    family = (f"{component}|{shape.width}x{shape.height}x{shape.frames}|{shape.videos}|"
              f"{int(shape.cfg)}")
    return online.PhaseKeys(device, component, family, math.log(max(shape.pixels, 1)))


def predict(shape: JobShape, kind: str, learned: online.Learned,
            *, offload: str | None = None) -> tuple[float, float]:
    """(prior, calibrated prediction) in bytes: the prior × ``exp`` of what was learned."""
    return calibrated(prior(shape, offload=offload), keys(shape, kind), learned)


def calibrated(base: float, key: online.PhaseKeys,
               learned: online.Learned) -> tuple[float, float]:
    """(``base``, ``base`` × ``exp`` of what was learned under ``key``): :func:`predict` from
    a prior and keys worked out already."""
    return base, base * math.exp(online.correction(learned, key))


def learn(learned: online.Learned, shape: JobShape, kind: str, base: float,
          observed: float) -> None:
    """What one completed job's peak teaches, in place (the ETA's statistics, one phase)."""
    learn_under(learned, keys(shape, kind), base, observed)


def learn_under(learned: online.Learned, key: online.PhaseKeys, base: float,
                observed: float) -> None:
    """:func:`learn` under keys worked out already."""
    if base <= 0 or observed <= 0:
        return
    ratio = math.log(observed / base)
    ratio = -RATIO_LIMIT if ratio < -RATIO_LIMIT else min(ratio, RATIO_LIMIT)
    levels = learned.levels
    stats = levels[key.device] = online.update(levels.get(key.device), ratio,
                                               online.MEMORY["device"])
    online.learn_beyond_device(learned, key, ratio - stats[0])
    learned.jobs += 1


class PriorCache:
    """:func:`prior` and :func:`keys` memoised per (shape, kind), for the memory projection.

    Both are pure functions of the job's shape and the kind of peak, and a fleet runs few
    distinct shapes; working them out (parameter tables, option strings, key strings) was most
    of the memory projection's cost per job in a replay. A speed-up, never part of a state:
    what it returns is exactly what the functions would.
    """

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._memo: dict[tuple[JobShape, str], tuple[float, online.PhaseKeys]] = {}

    def of(self, shape: JobShape, kind: str) -> tuple[float, online.PhaseKeys]:
        """(``prior(shape)``, ``keys(shape, kind)``)."""
        found = self._memo.get((shape, kind))
        if found is None:
            if len(self._memo) >= self.limit:
                self._memo.clear()
            found = self._memo[shape, kind] = (prior(shape), keys(shape, kind))
        return found


__all__ = ["Components", "PriorCache", "calibrated", "components", "keys", "learn",
           "learn_under", "peak_kind", "predict", "prior"]
