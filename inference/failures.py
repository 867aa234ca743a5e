"""A failed job's category and suggestions, told from the exception object itself.

:func:`category_of` looks at the exception and its causes (``raise … from``, the context an
``except`` block added) by class where torch and PIL have one — ``torch.OutOfMemoryError`` is
a device OOM, a host ``MemoryError`` ("Unable to allocate 12 GiB") is ``oom_host``, PIL's
``UnidentifiedImageError`` an unreadable image — and falls back to the name-and-text rule of
:func:`telemetry.guidance.classify`, which old logs are read with too.

:class:`NonFiniteLatents` is what :func:`inference.instrument.instrument` raises when the
latents it is about to decode hold NaN or infinity: decoding them costs the most of the job
and writes a black video, so the job fails as ``numerical`` instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from telemetry.guidance import FailureCategory, classify

#: How many links of an exception's cause chain are looked at.
MAX_CHAIN: Final = 8


class NonFiniteLatents(FloatingPointError):
    """The denoised latents hold NaN or infinity (category ``numerical``)."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < MAX_CHAIN:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_image_error(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return module.startswith("PIL") or "image file is truncated" in str(exc)


def category_of(exc: BaseException, *, stage: str | None, message: str) -> FailureCategory:
    """The category of ``exc``, raised in ``stage`` (``message`` is its sanitised text)."""
    try:
        import torch

        device_oom: tuple[type[BaseException], ...] = (torch.OutOfMemoryError,)
    except ImportError:  # pragma: no cover - torch is a dependency of inference/
        device_oom = ()
    for link in _chain(exc):
        if isinstance(link, MemoryError):
            return "oom_host"
        if device_oom and isinstance(link, device_oom):
            return "oom_device"
        if isinstance(link, KeyboardInterrupt | SystemExit):
            return "interrupted"
        if isinstance(link, FloatingPointError):
            return "numerical"
    image = any(_is_image_error(link) for link in _chain(exc))
    return classify(error_type=type(exc).__name__, message=message, stage=stage,
                    image=image and stage != "save")


__all__ = ["NonFiniteLatents", "category_of"]
