"""Work-arounds for bugs in the libraries wantel drives, each with its upstream issue.

Each one checks that the bug is there before it changes anything, so a fixed release of the
library runs untouched; each has a test that runs the real pipeline through it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from typing import Any, Final

#: The line of ``WanImageToVideoPipeline.__call__`` that repeats the CLIP image embedding per
#: prompt only (diffusers 0.42.1 has it; huggingface/diffusers#13578, a fix proposed in #14170).
_PER_PROMPT_ONLY: Final = "image_embeds = image_embeds.repeat(batch_size, 1, 1)"


@functools.cache
def _repeats_image_embeds_per_prompt_only(pipeline_class: type) -> bool:
    """Whether the pipeline's own ``__call__`` — the first in ``pipeline_class``'s MRO that
    takes ``num_videos_per_prompt``, past any wrapper (``instrument()`` gives the instance a
    subclass) — has the per-prompt-only repeat (sources read once per class; unreadable: no)."""
    for klass in pipeline_class.__mro__:
        call = vars(klass).get("__call__")
        if call is None:
            continue
        try:
            source = inspect.getsource(call)
        except (OSError, TypeError):
            return False
        if "num_videos_per_prompt" in source:
            return _PER_PROMPT_ONLY in source
    return False


@contextlib.contextmanager
def image_embeds_per_video(pipe: Any, videos: int) -> Iterator[None]:
    """While in the context, ``pipe.encode_image`` returns one image embedding per video.

    Wan 2.1's I2V pipeline encodes the conditioning image with CLIP once and repeats the
    embedding per prompt, while the latents are one per video: with ``num_videos_per_prompt``
    above 1 the transformer's concatenation of the two fails ("Sizes of tensors must match …
    Expected size 1 but got size 3"). Repeating the embedding per video, as the latents are,
    is what the upstream fix does. Nothing changes unless ``videos`` > 1, the pipeline has an
    image-conditioned transformer (``config.image_dim``) and its ``__call__`` still has the
    per-prompt-only repeat; the instance's own ``encode_image`` (an instrumentation's
    wrapper, say) is the one called, and put back afterwards.
    """
    transformer = getattr(pipe, "transformer", None)
    image_dim = getattr(getattr(transformer, "config", None), "image_dim", None)
    encode = getattr(pipe, "encode_image", None)
    if (videos <= 1 or image_dim is None or encode is None
            or not _repeats_image_embeds_per_prompt_only(pipe.__class__)):
        yield
        return
    absent = object()
    before = vars(pipe).get("encode_image", absent)

    def encode_per_video(*args: Any, **kwargs: Any) -> Any:
        embeds = encode(*args, **kwargs)
        return embeds.repeat_interleave(videos, dim=0)

    pipe.encode_image = encode_per_video
    try:
        yield
    finally:
        if before is absent:
            del pipe.encode_image
        else:
            pipe.encode_image = before


__all__ = ["image_embeds_per_video"]
