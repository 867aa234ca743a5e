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

Any other VAE (CogVideoX's frame batches, LTX-Video's single pass, an image VAE) gets ``None``:
its decode is recorded as one stage, as before.
"""

from __future__ import annotations

from typing import Any

#: The VAE classes whose ``decoder`` is called once per latent frame (and tile, and video).
PIECEWISE_VAES = frozenset({"AutoencoderKLWan"})


def decoder_calls(vae: Any, latents: Any) -> int | None:
    """How many times ``vae.decode(latents)`` will call ``vae.decoder``, or ``None`` where that
    is not known (another VAE, latents that are not 5-D ``(batch, channels, frames, h, w)``)."""
    if type(vae).__name__ not in PIECEWISE_VAES:
        return None
    shape = getattr(latents, "shape", None)
    if shape is None or len(shape) != 5:
        return None
    batch, _channels, frames, height, width = (int(n) for n in shape)
    if min(batch, frames, height, width) <= 0:
        return None
    videos = batch if getattr(vae, "use_slicing", False) and batch > 1 else 1
    tiles = _tiles(vae, height, width)
    return None if tiles is None else videos * tiles * frames


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
