"""How many pieces Wan's and CogVideoX's VAEs decode in: counted on the real (tiny) VAEs, plain,
tiled, sliced."""

from __future__ import annotations

from typing import Any, Final

import pytest
import torch

from inference.pieces import decoder_calls
from inference.tiny_models import build_tiny_pipeline


def counted_calls(vae: Any, latents: torch.Tensor) -> int:
    """How many times ``vae.decode(latents)`` really calls ``vae.decoder``."""
    calls = 0

    def hook(module: Any, args: Any, output: Any) -> None:
        nonlocal calls
        calls += 1

    handle = vae.decoder.register_forward_hook(hook)
    try:
        with torch.no_grad():
            vae.decode(latents)
    finally:
        handle.remove()
    return calls


def assert_counted(vae: Any, latents: torch.Tensor) -> int:
    """The count worked out for ``vae.decode(latents)`` is known and is the number of
    decoder calls the real VAE makes; the count."""
    expected = decoder_calls(vae, latents)
    assert expected is not None
    assert counted_calls(vae, latents) == expected
    return expected


#: (batch, latent frames, latent height, latent width, tiling, slicing)
CASES: Final = [
    (1, 3, 4, 4, False, False),
    (1, 1, 6, 2, False, False),
    (2, 2, 4, 6, False, False),   # two videos decoded together: one call a latent frame
    (2, 2, 4, 6, False, True),    # sliced: each video apart
    (1, 2, 10, 7, True, False),   # tiled: each latent frame of each tile
    (2, 2, 9, 5, True, True),
    (1, 2, 3, 3, True, False),    # tiling on, latents within one tile: not tiled
]


@pytest.mark.parametrize("variant", ["tiny-t2v", "tiny-ti2v"])
@pytest.mark.parametrize("case", CASES)
def test_the_count_is_what_the_vae_does(variant: str,
                                        case: tuple[int, int, int, int, bool, bool]) -> None:
    """The count worked out from the latents' shape and the VAE's settings is the number of
    decoder calls the real VAE makes (tiles made small so that tiny latents span several)."""
    batch, frames, height, width, tiling, slicing = case
    vae = build_tiny_pipeline(variant).vae
    if tiling:
        ratio = vae.spatial_compression_ratio
        vae.enable_tiling(tile_sample_min_height=4 * ratio, tile_sample_min_width=4 * ratio,
                          tile_sample_stride_height=3 * ratio, tile_sample_stride_width=3 * ratio)
    if slicing:
        vae.enable_slicing()
    assert_counted(vae, torch.randn(batch, vae.config.z_dim, frames, height, width))


def test_other_vaes_and_shapes_are_not_counted() -> None:
    """A VAE other than Wan's, or latents that are not a video's, give no count."""
    vae = build_tiny_pipeline("tiny-t2v").vae
    assert decoder_calls(object(), torch.zeros(1, 4, 2, 4, 4)) is None
    assert decoder_calls(vae, torch.zeros(1, 4, 4, 4)) is None
    assert decoder_calls(vae, None) is None
    assert decoder_calls(vae, torch.zeros(1, 4, 0, 4, 4)) is None


#: (batch, latent frames, latent height, latent width, tiling, slicing): CogVideoX decodes
#: batches of two latent frames, the remainder with the first.
COGVIDEOX_CASES: Final = [
    (1, 4, 4, 4, False, False),   # two batches
    (1, 5, 4, 4, False, False),   # two batches, the first with three latent frames
    (1, 1, 4, 4, False, False),   # one latent frame: still one batch
    (2, 3, 4, 6, False, False),   # two videos decoded together
    (2, 3, 4, 6, False, True),    # sliced: each video apart
    (1, 4, 12, 9, True, False),   # tiled: each batch of each overlapping tile
    (2, 2, 9, 10, True, True),
    (1, 4, 3, 3, True, False),    # tiling on, latents within one tile: not tiled
]


@pytest.mark.parametrize("case", COGVIDEOX_CASES)
def test_cogvideox_counts_its_frame_batches(case: tuple[int, int, int, int, bool, bool]) -> None:
    """CogVideoX's VAE: the count is the number of decoder calls the real VAE makes, plain,
    tiled (tiles made small so that tiny latents span several) and sliced."""
    batch, frames, height, width, tiling, slicing = case
    vae = build_tiny_pipeline("tiny-cogvideox").vae
    if tiling:
        vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32)
    if slicing:
        vae.enable_slicing()
    expected = assert_counted(
        vae, torch.randn(batch, vae.config.latent_channels, frames, height, width))
    if tiling and height > 4:
        assert expected > max(frames // 2, 1) * (batch if slicing else 1)  # several tiles
