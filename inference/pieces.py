"""How many pieces the VAE decode runs in, so its progress can be recorded as it goes.

Wan's VAE (diffusers' ``AutoencoderKLWan``, Wan 2.1 and 2.2 alike) is causal in time: its
``_decode`` calls ``vae.decoder`` once per latent frame, carrying a feature cache from one call
to the next; with tiling on, once per latent frame of each spatial tile; with slicing on and
several videos, all of that once per video. A forward hook on ``vae.decoder`` therefore sees
the decode advance in pieces of nearly equal cost (measured on the tiny VAEs here: later pieces
vary 3–6 %; the first, which yields one frame where the others yield four, takes 0.3–0.55 of
a later one), and :func:`decoder_calls` says how many there will be, from the latents' shape
and the VAE's own tiling settings, the way ``_decode`` and ``tiled_decode`` (diffusers 0.42)
split them.

CogVideoX's VAE (``AutoencoderKLCogVideoX``, CogVideoX 1.0 and 1.5, text- and image-to-video)
decodes in batches of latent frames (``num_latent_frames_batch_size``, 2), the first taking
the remainder too, carrying a convolution cache from one ``vae.decoder`` call to the next; with
tiling on, that per overlapping tile; with slicing on and several videos, per video. Its pieces
are of about equal cost (the first one's extra frames aside).

Any other VAE (LTX-Video's single pass, an image VAE) gets ``None``: its decode is recorded as
one stage, as before.
"""

from __future__ import annotations

from typing import Any

#: The VAE classes whose ``decoder`` is called once per latent frame (and tile, and video):
#: Wan's; and once per batch of latent frames (and tile, and video): CogVideoX's.
PER_FRAME_VAES = frozenset({"AutoencoderKLWan"})
PER_FRAME_BATCH_VAES = frozenset({"AutoencoderKLCogVideoX"})
PIECEWISE_VAES = PER_FRAME_VAES | PER_FRAME_BATCH_VAES


def decoder_calls(vae: Any, latents: Any) -> int | None:
    """How many times ``vae.decode(latents)`` will call ``vae.decoder``, or ``None`` where that
    is not known (another VAE, latents that are not 5-D ``(batch, channels, frames, h, w)``)."""
    name = type(vae).__name__
    if name not in PIECEWISE_VAES:
        return None
    shape = getattr(latents, "shape", None)
    if shape is None or len(shape) != 5:
        return None
    batch, _channels, frames, height, width = (int(n) for n in shape)
    if min(batch, frames, height, width) <= 0:
        return None
    videos = batch if getattr(vae, "use_slicing", False) and batch > 1 else 1
    tiles: int | None
    per_tile: int | None
    if name in PER_FRAME_VAES:
        tiles, per_tile = _tiles(vae, height, width), frames
    else:
        tiles, per_tile = _frame_batch_tiles(vae, height, width), _frame_batches(vae, frames)
    return None if tiles is None or per_tile is None else videos * tiles * per_tile


def _frame_batches(vae: Any, frames: int) -> int | None:
    """The batches of latent frames CogVideoX's ``_decode`` runs (the remainder joins the
    first); ``None`` if the batch size cannot be read."""
    try:
        return max(frames // int(vae.num_latent_frames_batch_size), 1)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return None


def _frame_batch_tiles(vae: Any, height: int, width: int) -> int | None:
    """The overlapping tiles CogVideoX's ``_decode`` splits each video into: 1 unless tiling
    is on and the latents exceed a tile (``tiled_decode`` steps through the latent grid by
    the tile less its overlap); ``None`` if the VAE's tiling settings cannot be read."""
    if not getattr(vae, "use_tiling", False):
        return 1
    try:
        min_height, min_width = int(vae.tile_latent_min_height), int(vae.tile_latent_min_width)
        step_height = int(min_height * (1 - float(vae.tile_overlap_factor_height)))
        step_width = int(min_width * (1 - float(vae.tile_overlap_factor_width)))
    except (AttributeError, TypeError, ValueError):
        return None
    if not (width > min_width or height > min_height) or step_height <= 0 or step_width <= 0:
        return 1
    return len(range(0, height, step_height)) * len(range(0, width, step_width))


def _tiles(vae: Any, height: int, width: int) -> int | None:
    """The spatial tiles ``_decode`` splits each video into: 1 unless tiling is on and the
    latents exceed a tile (``tiled_decode``'s loops over the latent grid by its stride);
    ``None`` if the VAE's tiling settings cannot be read."""
    if not getattr(vae, "use_tiling", False):
        return 1
    try:
        ratio = int(vae.spatial_compression_ratio)
        min_height = int(vae.tile_sample_min_height) // ratio
        min_width = int(vae.tile_sample_min_width) // ratio
        stride_height = int(vae.tile_sample_stride_height) // ratio
        stride_width = int(vae.tile_sample_stride_width) // ratio
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return None
    if not (width > min_width or height > min_height) or stride_height <= 0 or stride_width <= 0:
        return 1
    return len(range(0, height, stride_height)) * len(range(0, width, stride_width))
