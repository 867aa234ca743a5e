"""Tiny, offline Wan (and CogVideoX, Stable Diffusion) pipelines built in memory from the real
diffusers classes.

Why this exists: the telemetry stack instruments Wan video-diffusion inference (text encoding,
the denoising loop, expert switches, VAE decode, ...). Exercising those code paths with real
checkpoints needs a GPU and tens of gigabytes from the Hugging Face Hub, neither of which is
available in CI or on a laptop. The pipelines built here use the very same diffusers / transformers
classes as the production checkpoints (``WanPipeline``, ``WanImageToVideoPipeline``,
``WanTransformer3DModel``, ``AutoencoderKLWan``, ``UMT5EncoderModel``, ``CLIPVisionModel``,
``UniPCMultistepScheduler``) with the same *layout* (channel counts, two-expert split,
``boundary_ratio``, ``expand_timesteps``, 48-channel VAE, image encoder) but with random weights a
few tens of kilobytes in size. A full call at 64x64, 17 frames, 8 steps takes a fraction of a
second on one CPU thread, so every branch of the instrumented pipeline runs in unit tests, with no
network access and no downloaded files.

Beyond Wan, ``tiny-cogvideox`` (``CogVideoXPipeline``) and ``tiny-sd``
(``StableDiffusionPipeline``, an image model) are built the same way, so wantel's handling of
any diffusers pipeline with a denoising loop (its own family and task labels, generic stages,
an ETA that learns) is exercised end to end too.

The outputs are noise, by design: the point is shapes, control flow and timing structure, not
pictures. Weights are a pure function of ``seed`` so tests can compare runs bit for bit.

Module note: diffusers and transformers are imported inside the builder functions. Importing
them costs seconds, and callers that only need :func:`variant_spec` or :func:`check_request`
(argument validation in a CLI, for instance) should not pay for it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from telemetry.wan import uses_image_encoder, uses_wan22_vae

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

__all__ = [
    "TINY_VARIANTS",
    "WAN_VARIANTS",
    "VariantSpec",
    "build_tiny_pipeline",
    "check_request",
    "valid_sizes_message",
    "variant_spec",
]

#: The tiny Wan layouts.
WAN_VARIANTS: tuple[str, ...] = (
    "tiny-t2v",
    "tiny-i2v",
    "tiny-ti2v",
    "tiny-t2v-a14b",
    "tiny-i2v-a14b",
)
#: Every tiny variant: Wan's, then pipelines beyond Wan (a CogVideoX video model, a Stable
#: Diffusion image model).
TINY_VARIANTS: tuple[str, ...] = (*WAN_VARIANTS, "tiny-cogvideox", "tiny-sd")

# Wan VAEs compress time by 4: a clip of 4k+1 frames becomes k+1 latent frames (the first frame is
# encoded on its own). The pipelines silently round other frame counts, which would make the
# telemetry report a different shape than the caller asked for, so we reject them up front.
TEMPORAL_FACTOR = 4

# --- Tiny dimensions -------------------------------------------------------------------------
# Sizes follow diffusers' own fast tests (tests/pipelines/wan/test_wan*.py): 2 heads x 12 dims,
# 2 layers, ffn 32, text_dim 32, freq_dim 256. That gives ~28-35k parameters per transformer.
_HEADS = 2
_HEAD_DIM = 12
_INNER_DIM = _HEADS * _HEAD_DIM
_TEXT_DIM = 32  # == UMT5 d_model: the transformer projects text embeddings from this width
_FFN_DIM = 32
_LAYERS = 2
_FREQ_DIM = 256
# The rotary table must cover the largest patch grid along any axis: 1280 px -> 160 latents
# (VAE /8) -> 80 patches. Wan's own 1024 (diffusers' default) lets a tiny model run at every
# size the real ones do; the table is a non-persistent buffer, and a position's rotation does
# not depend on its length, so a smaller size's output is the same with either.
_ROPE_MAX_SEQ_LEN = 1024
_CLIP_HIDDEN = 16  # == transformer image_dim (Wan 2.1 I2V uses CLIP's penultimate hidden states)
_CLIP_IMAGE_SIZE = 32
_CLIP_PATCH = 8  # (32/8)^2 + 1 = 17 image tokens, vs 257 for the real ViT-H/14
_WAN21_LATENT_CHANNELS = 16
_WAN22_LATENT_CHANNELS = 48
# Wan 2.1 I2V transformer input: 16 noisy-latent channels + 4 mask channels + 16 condition channels.
_I2V_IN_CHANNELS = _WAN21_LATENT_CHANNELS + TEMPORAL_FACTOR + _WAN21_LATENT_CHANNELS

# Small in-memory SentencePiece-style vocabulary for the UMT5 tokenizer: real Wan uses the 256k
# UMT5 vocabulary, which cannot be downloaded here and would dwarf the rest of the model.
# fmt: off
_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "and", "or", "in", "on", "at", "to", "with", "from", "by", "for", "is",
    "are", "was", "be", "it", "its", "this", "that", "as", "cat", "dog", "monkey", "horse", "bird",
    "fish", "robot", "person", "man", "woman", "child", "people", "car", "train", "boat", "plane",
    "dance", "dancing", "walk", "walking", "run", "running", "fly", "flying", "swim", "swimming",
    "jump", "jumping", "sit", "sitting", "ride", "riding", "play", "playing", "eat", "eating",
    "look", "looking", "turn", "turning", "smile", "smiling", "wave", "waving", "city", "street",
    "forest", "beach", "ocean", "sea", "river", "mountain", "sky", "cloud", "clouds", "sun",
    "moon", "star", "stars", "night", "day", "morning", "evening", "rain", "snow", "fire", "water",
    "light", "shadow", "room", "house", "road", "field", "garden", "red", "green", "blue",
    "yellow", "white", "black", "orange", "purple", "pink", "gray", "golden", "silver", "bright",
    "dark", "big", "small", "tall", "short", "old", "young", "happy", "slow", "fast", "slowly",
    "quickly", "gently", "camera", "shot", "close", "up", "wide", "view", "pan", "zoom", "motion",
    "video", "scene", "cinematic", "realistic", "style", "high", "quality", "detailed", "blurry",
    "low", "worst", "best", "static", "still", "frame", "frames", "background", "negative",
    "prompt", "test", "tiny", "wan",
)
# fmt: on


def _tokenizer_vocab() -> list[tuple[str, float]]:
    """Return (piece, log-prob) pairs for a T5 Unigram tokenizer built with no files.

    T5's fixed ids come first (pad 0, eos 1, unk 2); whole words score higher than letters so the
    Unigram model prefers them, and single characters guarantee any ASCII word tokenizes.
    """
    scores: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -2.0}
    for i, word in enumerate(_WORDS):
        scores.setdefault(f"▁{word}", -3.0 - 0.01 * i)
    letters = "abcdefghijklmnopqrstuvwxyz"
    for ch in letters:
        scores.setdefault(f"▁{ch}", -6.0)
    for ch in letters + letters.upper() + "0123456789":
        scores.setdefault(ch, -8.0)
    for ch in ".,!?;:'\"-()":
        scores.setdefault(ch, -9.0)
    return list(scores.items())


@dataclass(frozen=True)
class VariantSpec:
    """What a tiny variant stands for and which requests it can serve.

    The fields mirror the facts the telemetry layer needs about a real Wan checkpoint (family,
    task, expert layout, size constraints) without having to inspect the pipeline object.
    """

    name: str
    family: str  # "wan2.1" or "wan2.2"
    task: str  # "t2v", "i2v" or "ti2v"
    pipeline_class: str  # diffusers class name
    needs_image: bool  # True when the pipeline requires an input image (i2v variants)
    spatial_multiple: int  # height and width must be multiples of this (VAE factor x patch size)
    boundary_ratio: float | None  # two-expert switch point, as a fraction of train timesteps
    two_experts: bool  # True when the pipeline holds transformer (high noise) and transformer_2
    #: True when an image is optional: TI2V-5B generates from text, or from text and an image
    #: (its image mode runs through ``WanImageToVideoPipeline`` with ``expand_timesteps``).
    takes_image: bool = False
    #: False for an image model (``tiny-sd``): it makes one frame, saved as an image.
    video: bool = True
    #: A saved Wan model's transformer width (:func:`telemetry.wan.width_of`): its size,
    #: which its class does not tell; ``None`` for the tiny variants and where unknown.
    width: int | None = None


_SPECS: dict[str, VariantSpec] = {
    "tiny-t2v": VariantSpec(
        name="tiny-t2v",
        family="wan2.1",
        task="t2v",
        pipeline_class="WanPipeline",
        needs_image=False,
        spatial_multiple=16,
        boundary_ratio=None,
        two_experts=False,
    ),
    "tiny-i2v": VariantSpec(
        name="tiny-i2v",
        family="wan2.1",
        task="i2v",
        pipeline_class="WanImageToVideoPipeline",
        needs_image=True,
        spatial_multiple=16,
        boundary_ratio=None,
        two_experts=False,
    ),
    "tiny-ti2v": VariantSpec(
        name="tiny-ti2v",
        family="wan2.2",
        task="ti2v",
        pipeline_class="WanPipeline",
        needs_image=False,
        spatial_multiple=32,
        boundary_ratio=None,
        two_experts=False,
        takes_image=True,
    ),
    "tiny-t2v-a14b": VariantSpec(
        name="tiny-t2v-a14b",
        family="wan2.2",
        task="t2v",
        pipeline_class="WanPipeline",
        needs_image=False,
        spatial_multiple=16,
        boundary_ratio=0.875,
        two_experts=True,
    ),
    "tiny-i2v-a14b": VariantSpec(
        name="tiny-i2v-a14b",
        family="wan2.2",
        task="i2v",
        pipeline_class="WanImageToVideoPipeline",
        needs_image=True,
        spatial_multiple=16,
        boundary_ratio=0.9,
        two_experts=True,
    ),
    # Beyond Wan: a CogVideoX text-to-video pipeline (its VAE: 8x in space, 4x in time; its
    # transformer patches 2x2) and a Stable Diffusion text-to-image one (VAE 8x, a UNet of two
    # levels: sides in multiples of 16).
    "tiny-cogvideox": VariantSpec(
        name="tiny-cogvideox",
        family="cogvideox",
        task="t2v",
        pipeline_class="CogVideoXPipeline",
        needs_image=False,
        spatial_multiple=16,
        boundary_ratio=None,
        two_experts=False,
    ),
    "tiny-sd": VariantSpec(
        name="tiny-sd",
        family="sd",
        task="t2i",
        pipeline_class="StableDiffusionPipeline",
        needs_image=False,
        spatial_multiple=16,
        boundary_ratio=None,
        two_experts=False,
        video=False,
    ),
}


def variant_spec(name: str) -> VariantSpec:
    """Return the spec of a tiny variant; unknown names raise ValueError listing the valid ones.

    ValueError rather than KeyError so CLI callers can show the message to the user as is.
    """
    try:
        return _SPECS[name]
    except KeyError:
        valid = ", ".join(TINY_VARIANTS)
        raise ValueError(f"unknown tiny variant {name!r}; valid variants: {valid}") from None


def valid_sizes_message(spec: VariantSpec) -> str:
    """Return a one-line hint of the sizes a variant accepts, for error messages and --help."""
    frames = (f"frames must be {TEMPORAL_FACTOR}k+1 (1, 5, 9, 13, 17, ...)" if spec.video
              else "frames must be 1 (an image model)")
    return f"height and width must be positive multiples of {spec.spatial_multiple}; {frames}"


def _nearest_multiples(value: int, multiple: int) -> list[int]:
    """Return the valid sizes closest to ``value`` (below and above), smallest first."""
    lower = (value // multiple) * multiple
    candidates = {c for c in (lower, lower + multiple) if c > 0}
    return sorted(candidates or {multiple})


def _nearest_frame_counts(num_frames: int) -> list[int]:
    """Return the 4k+1 frame counts closest to ``num_frames`` (below and above)."""
    lower = ((max(num_frames, 1) - 1) // TEMPORAL_FACTOR) * TEMPORAL_FACTOR + 1
    return sorted({lower, lower + TEMPORAL_FACTOR})


def check_request(spec: VariantSpec, *, height: int, width: int, num_frames: int) -> None:
    """Raise ValueError, naming the nearest valid values, if a request does not fit the variant.

    The Wan pipelines silently round bad sizes down (and only log a warning), so without this
    check telemetry would record a shape different from the one requested.
    """
    problems: list[str] = []
    for label, value in (("height", height), ("width", width)):
        if value <= 0 or value % spec.spatial_multiple != 0:
            options = " or ".join(str(v) for v in _nearest_multiples(value, spec.spatial_multiple))
            problems.append(
                f"{label}={value} is not a positive multiple of {spec.spatial_multiple} "
                f"(try {options})"
            )
    if not spec.video:
        if num_frames != 1:
            problems.append(f"num_frames={num_frames}: {spec.name} makes one image (try 1)")
    elif num_frames < 1 or (num_frames - 1) % TEMPORAL_FACTOR != 0:
        options = " or ".join(str(v) for v in _nearest_frame_counts(num_frames))
        problems.append(f"num_frames={num_frames} is not {TEMPORAL_FACTOR}k+1 (try {options})")
    if problems:
        raise ValueError(
            f"{spec.name}: " + "; ".join(problems) + f". Rule: {valid_sizes_message(spec)}."
        )


def _diffusers() -> Any:
    """Import diffusers lazily, typed ``Any``: its classes are only partly annotated."""
    return importlib.import_module("diffusers")


def _transformers() -> Any:
    """Import transformers lazily, typed ``Any``: its classes are only partly annotated."""
    return importlib.import_module("transformers")


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch for one module's construction without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _cast(module: Any, dtype: torch.dtype) -> Any:
    """Cast a module's floating tensors to ``dtype``, keeping its ``_keep_in_fp32_modules`` in fp32.

    This is what ``from_pretrained(torch_dtype=...)`` does for real checkpoints (the Wan
    transformer keeps rope, time embedder, norms and modulation tables in fp32). A plain
    ``.to(dtype)`` would cast those too, and diffusers warns about it even for float32.
    """
    if dtype == torch.float32:
        return module
    keep: list[str] = list(getattr(module, "_keep_in_fp32_modules", None) or [])
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and not any(k in name.split(".") for k in keep):
                tensor.data = tensor.data.to(dtype)
    return module


def _transformer(*, in_channels: int, out_channels: int, image_dim: int | None = None) -> Any:
    """Build a tiny ``WanTransformer3DModel`` (~30k parameters).

    For Wan 2.1 I2V, ``image_dim`` enables the CLIP image embedder and ``added_kv_proj_dim``
    the separate image key/value projections, as in the real I2V-14B config. Like the real model,
    that attention processor assumes exactly 512 text tokens (diffusers hard-codes it), so Wan 2.1
    I2V calls must keep the default ``max_sequence_length=512``; shorter values are not rejected,
    they silently misroute image tokens.
    """
    return _diffusers().WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=_HEADS,
        attention_head_dim=_HEAD_DIM,
        in_channels=in_channels,
        out_channels=out_channels,
        text_dim=_TEXT_DIM,
        freq_dim=_FREQ_DIM,
        ffn_dim=_FFN_DIM,
        num_layers=_LAYERS,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=image_dim,
        added_kv_proj_dim=_INNER_DIM if image_dim is not None else None,
        rope_max_seq_len=_ROPE_MAX_SEQ_LEN,
    )


def _vae(*, wan22: bool) -> Any:
    """Build a tiny ``AutoencoderKLWan``: the 16-channel Wan 2.1 VAE or the 48-channel Wan 2.2 one.

    The Wan 2.2 VAE (TI2V-5B) patchifies pixels 2x2 (3 -> 12 channels), uses residual blocks and
    compresses 16x spatially, hence the multiple-of-32 sizes once the transformer's 2x2 patch is
    applied. Latent mean/std are identity so decoding does not depend on checkpoint statistics.
    """
    if wan22:
        return _diffusers().AutoencoderKLWan(
            base_dim=3,
            z_dim=_WAN22_LATENT_CHANNELS,
            in_channels=12,
            out_channels=12,
            is_residual=True,
            patch_size=2,
            latents_mean=[0.0] * _WAN22_LATENT_CHANNELS,
            latents_std=[1.0] * _WAN22_LATENT_CHANNELS,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            scale_factor_spatial=16,
            scale_factor_temporal=TEMPORAL_FACTOR,
            temperal_downsample=[False, True, True],
        )
    return _diffusers().AutoencoderKLWan(
        base_dim=3,
        z_dim=_WAN21_LATENT_CHANNELS,
        latents_mean=[0.0] * _WAN21_LATENT_CHANNELS,
        latents_std=[1.0] * _WAN21_LATENT_CHANNELS,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        scale_factor_spatial=8,
        scale_factor_temporal=TEMPORAL_FACTOR,
        temperal_downsample=[False, True, True],
    )


def _text_encoder() -> Any:
    """Build a tiny ``UMT5EncoderModel``; its ``d_model`` equals the transformer's ``text_dim``."""
    config = _transformers().UMT5Config(
        vocab_size=len(_tokenizer_vocab()),
        d_model=_TEXT_DIM,
        d_kv=8,
        d_ff=32,
        num_layers=2,  # UMT5 (unlike T5) has a relative-position bias per layer: keep two
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return _transformers().UMT5EncoderModel(config).eval()


def _tokenizer() -> Any:
    """Build a UMT5-compatible tokenizer from an in-memory Unigram vocabulary (no files)."""
    return _transformers().T5Tokenizer(vocab=_tokenizer_vocab(), extra_ids=0)


def _image_encoder() -> Any:
    """Build a tiny ``CLIPVisionModel``; Wan 2.1 I2V feeds its penultimate hidden states."""
    config = _transformers().CLIPVisionConfig(
        hidden_size=_CLIP_HIDDEN,
        intermediate_size=32,
        projection_dim=_CLIP_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=_CLIP_IMAGE_SIZE,
        patch_size=_CLIP_PATCH,
    )
    return _transformers().CLIPVisionModel(config).eval()


def _image_processor() -> Any:
    """Build a CLIP image processor sized for the tiny encoder.

    Prefers the PIL backend: transformers 5 makes ``CLIPImageProcessor`` depend on torchvision
    (which falls back to PIL with a warning when absent); the PIL one behaves the same everywhere.
    """
    transformers = _transformers()
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(size={"shortest_edge": _CLIP_IMAGE_SIZE}, crop_size=_CLIP_IMAGE_SIZE)


def _scheduler() -> Any:
    """Build the scheduler the released Wan checkpoints ship: UniPC with flow-matching sigmas."""
    return _diffusers().UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
        num_train_timesteps=1000,
    )


def build_tiny_pipeline(
    name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, image: bool = False
) -> DiffusionPipeline:
    """Build tiny variant ``name`` as a real diffusers ``DiffusionPipeline`` with random weights.

    Each module is constructed under its own seed derived from ``seed``, so the weights are a pure
    function of (name, seed), and the caller's global torch RNG state is left untouched.
    ``dtype`` applies to the transformer(s) and the text encoder; the VAE and the CLIP image
    encoder stay in float32, as in the reference Wan recipes. The result is a ``WanPipeline`` or
    ``WanImageToVideoPipeline`` (see ``variant_spec(name).pipeline_class``), in eval mode, with
    the progress bar disabled.

    ``image``: the image mode of a variant that takes an optional image (``tiny-ti2v``): the
    same weights in a ``WanImageToVideoPipeline`` with ``expand_timesteps``, as diffusers runs
    Wan 2.2 TI2V-5B from an image — no CLIP encoder; the image is VAE-encoded into the first
    latent frame, which keeps timestep 0 while the others are denoised.
    """
    spec = variant_spec(name)
    if image and not (spec.needs_image or spec.takes_image):
        raise ValueError(f"{name} does not take an image ({spec.task})")
    if spec.family == "cogvideox":
        return _finish(_cogvideox(seed, dtype))
    if spec.family == "sd":
        return _finish(_stable_diffusion(seed, dtype))
    pipeline_class = "WanImageToVideoPipeline" if image else spec.pipeline_class
    wan22_vae = uses_wan22_vae(spec.task)
    latent_channels = _WAN22_LATENT_CHANNELS if wan22_vae else _WAN21_LATENT_CHANNELS
    in_channels = _I2V_IN_CHANNELS if spec.task == "i2v" else latent_channels
    uses_clip = uses_image_encoder(family=spec.family, task=spec.task)

    with _seeded(seed):
        vae = _vae(wan22=wan22_vae)
    with _seeded(seed + 1):
        text_encoder = _cast(_text_encoder(), dtype)
    with _seeded(seed + 2):
        transformer = _cast(
            _transformer(
                in_channels=in_channels,
                out_channels=latent_channels,
                image_dim=_CLIP_HIDDEN if uses_clip else None,
            ),
            dtype,
        )
    transformer_2 = None
    if spec.two_experts:
        # A different seed than the high-noise expert, so the two experts are distinguishable.
        with _seeded(seed + 3):
            transformer_2 = _cast(
                _transformer(in_channels=in_channels, out_channels=latent_channels), dtype
            )

    common: dict[str, Any] = {
        "tokenizer": _tokenizer(),
        "text_encoder": text_encoder,
        "vae": vae,
        "scheduler": _scheduler(),
        "transformer": transformer,
        "transformer_2": transformer_2,
        "boundary_ratio": spec.boundary_ratio,
        "expand_timesteps": spec.task == "ti2v",
    }
    if pipeline_class == "WanImageToVideoPipeline":
        image_encoder = None
        image_processor = None
        if uses_clip:
            with _seeded(seed + 4):
                image_encoder = _image_encoder()
            image_processor = _image_processor()
        common["image_encoder"] = image_encoder
        common["image_processor"] = image_processor
    return _finish(getattr(_diffusers(), pipeline_class)(**common))


def _finish(pipe: Any) -> DiffusionPipeline:
    """Eval mode and no progress bar, as ``from_pretrained`` and wantel leave a pipeline.

    ``pipe`` is ``Any``: diffusers leaves several pipeline methods unannotated
    (``set_progress_bar_config``, ...). Directly constructed models start in training mode,
    while ``from_pretrained`` returns them in eval mode; match the checkpoints so any
    mode-dependent code behaves as in production.
    """
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    built: DiffusionPipeline = pipe
    return built


def _t5_encoder() -> Any:
    """A tiny ``T5EncoderModel`` (CogVideoX encodes its prompt with T5-XXL), on the same
    in-memory vocabulary as the UMT5 one."""
    config = _transformers().T5Config(
        vocab_size=len(_tokenizer_vocab()), d_model=_TEXT_DIM, d_kv=8, d_ff=32, num_layers=1,
        num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0,
    )
    return _transformers().T5EncoderModel(config).eval()


def _cogvideox(seed: int, dtype: torch.dtype) -> Any:
    """A tiny ``CogVideoXPipeline`` (sizes after diffusers' own fast tests,
    tests/pipelines/cogvideo/test_cogvideox.py): a one-layer ``CogVideoXTransformer3DModel``
    (its text length the real 226 tokens, so the pipeline's default ``max_sequence_length``
    works), a four-level ``AutoencoderKLCogVideoX`` (8x spatial, 4x temporal), a T5 encoder
    and CogVideoX's DDIM scheduler. Classifier-free guidance runs as one batched pass."""
    diffusers = _diffusers()
    with _seeded(seed):
        vae = diffusers.AutoencoderKLCogVideoX(
            in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
            latent_channels=4, layers_per_block=1, norm_num_groups=2,
            temporal_compression_ratio=TEMPORAL_FACTOR,
        )
    with _seeded(seed + 1):
        text_encoder = _cast(_t5_encoder(), dtype)
    with _seeded(seed + 2):
        transformer = _cast(diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            time_embed_dim=2, text_embed_dim=_TEXT_DIM, num_layers=1, sample_width=8,
            sample_height=8, sample_frames=9, patch_size=2,
            temporal_compression_ratio=TEMPORAL_FACTOR, max_text_seq_length=226,
        ), dtype)
    return diffusers.CogVideoXPipeline(
        tokenizer=_tokenizer(), text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=diffusers.CogVideoXDDIMScheduler(),
    )


def _stable_diffusion(seed: int, dtype: torch.dtype) -> Any:
    """A tiny ``StableDiffusionPipeline`` (sizes after diffusers' fast tests,
    tests/pipelines/stable_diffusion/test_stable_diffusion.py): a two-level
    ``UNet2DConditionModel``, a four-level ``AutoencoderKL`` (8x, as SD's), a CLIP text
    encoder over the in-memory vocabulary (no CLIP BPE files: nothing is downloaded), DDIM;
    no safety checker. Classifier-free guidance runs as one batched pass of the UNet."""
    diffusers, transformers = _diffusers(), _transformers()
    with _seeded(seed):
        vae = diffusers.AutoencoderKL(
            block_out_channels=[4, 4, 4, 4], in_channels=3, out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            latent_channels=4, norm_num_groups=2, sample_size=64,
        )
    with _seeded(seed + 1):
        text_encoder = _cast(transformers.CLIPTextModel(transformers.CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=0, hidden_size=_TEXT_DIM,
            intermediate_size=37, num_attention_heads=2, num_hidden_layers=2,
            vocab_size=len(_tokenizer_vocab()), max_position_embeddings=77,
        )).eval(), dtype)
    with _seeded(seed + 2):
        unet = _cast(diffusers.UNet2DConditionModel(
            block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
            out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=_TEXT_DIM,
            norm_num_groups=2, attention_head_dim=2,
        ), dtype)
    tokenizer = _tokenizer()
    tokenizer.model_max_length = 77  # CLIP's context: the pipeline pads prompts to it
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
