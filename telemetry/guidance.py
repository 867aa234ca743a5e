"""Why a job failed, in one word, and what to try next, with numbers from the job itself.

A ``JobFailed`` carries a ``category`` (:data:`CATEGORIES`) and a few ``suggestions``: short
sentences computed from the job's own shape and options ("81 → 49 frames", "1280x720 → 832x480
(720P → 480P)", "enable model CPU offload: --offload model"), each naming a number where one
exists. Both are decided once, where the job fails (``inference`` classifies the exception
object with :func:`classify`'s help and calls :func:`suggest`), and stored in the event: every
view (``wantel run``, ``/api/jobs/{id}``, the live page, the trace, the lifecycle log) shows
the same words.

Memory-based suggestions ("81 → 49 frames fits in 24 GiB (predicted 22.1 GiB)") appear only
when a ``predict_peak`` is given: a function of a shape and options that returns a job's
predicted peak device memory in bytes (the VRAM model's). Without one, the suggestions are
the plain reductions.

Pure Python: names, numbers and strings; no torch, no I/O. :func:`classify` also decides the
category of a record written before categories existed (the ``JobFailed`` v1 upcaster).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Final, Literal

from telemetry.events import JobStarted
from telemetry.pipelines import geometry, is_video, is_wan

FailureCategory = Literal[
    "oom_device", "oom_host", "invalid_input", "model_load", "numerical", "io", "interrupted",
    "internal",
]
#: Every category, in the order views list them.
CATEGORIES: Final[tuple[str, ...]] = (
    "oom_device", "oom_host", "invalid_input", "model_load", "numerical", "io", "interrupted",
    "internal",
)
#: At most this many suggestions are kept (the first are the most effective).
MAX_SUGGESTIONS: Final = 4
#: A predicted peak must stay under this share of the device's capacity to "fit" (allocator
#: fragmentation and the CUDA context take the rest).
FIT_SHARE: Final = 0.9
#: 480P, Wan's smaller published size (832x480); 720P is 1280x720.
P480: Final = (832, 480)

GiB: Final = 2**30

_DEVICE_OOM: Final = ("out of memory", "cuda error: out of memory", "outofmemoryerror")
_HOST_OOM: Final = ("unable to allocate", "can't allocate memory", "cannot allocate memory",
                    "defaultcpuallocator")
_ALLOCATE: Final = re.compile(r"allocate\s+([0-9.]+)\s*([KMGT]i?B)", re.IGNORECASE)
_UNITS: Final = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def classify(*, error_type: str, message: str, stage: str | None, oom: bool = False,
             image: bool = False) -> FailureCategory:
    """The category of a failure, told from what a ``JobFailed`` records.

    ``inference`` first looks at the exception object (its class and its causes) and falls back
    to this rule, which reads only names and text, so a log written before categories existed
    gets the same answer on read.

    Args:
        error_type: the exception's class name (``OutOfMemoryError``, ``MemoryError``…).
        message: its sanitised message.
        stage: the stage it failed in (``None``: before any stage, i.e. the request's checks).
        oom: the v1 ``oom`` flag (device out-of-memory by type or message).
        image: the failure was reading the conditioning image.
    """
    text = message.lower()
    name = error_type.lower()
    if name in ("memoryerror", "arraymemoryerror") or any(s in text for s in _HOST_OOM):
        return "oom_host"
    if oom or name == "outofmemoryerror" or any(s in text for s in _DEVICE_OOM):
        return "oom_device"
    if name in ("keyboardinterrupt", "systemexit", "jobcancellederror"):
        return "interrupted"
    if name in ("floatingpointerror", "nonfinitelatents") or "nan" in text.split() \
            or "non-finite" in text:
        return "numerical"
    if image or name in ("unidentifiedimageerror", "decompressionbomberror"):
        return "invalid_input"
    if stage == "load":
        return "model_load"
    if name in ("filenotfounderror", "permissionerror", "isadirectoryerror", "oserror",
                "ioerror", "brokenpipeerror") or stage == "save":
        return "io"
    if name in ("valueerror", "typeerror", "requesterror") and stage in (
            None, "text_encode", "image_encode", "latent_init"):
        return "invalid_input"
    return "internal"


@dataclass(frozen=True)
class JobShape:
    """What a job asked for, as its ``JobStarted`` records it (the suggestions' input)."""

    width: int
    height: int
    num_frames: int
    steps: int
    #: ``cuda``, ``cpu``, ``mps``.
    device_kind: str = "cpu"
    task: str = "t2v"
    family: str = ""
    #: Height and width must be multiples of this (16 for Wan, 32 for TI2V-5B).
    spatial_multiple: int = 16
    #: Frame counts are ``temporal * k + 1`` (4 for Wan); 0: any count.
    temporal: int = 4
    guidance_scale: float = 1.0


#: ``predict_peak(shape, options)``: a job's predicted peak device memory in bytes, or ``None``
#: where the model cannot tell. The VRAM model provides one; see :func:`suggest`.
PredictPeak = Callable[[JobShape, Mapping[str, object]], float | None]


def suggest(category: str, shape: JobShape | None, options: Mapping[str, object] | None = None,
            capacity: int | None = None, predict_peak: PredictPeak | None = None, *,
            stage: str | None = None, step: int | None = None, message: str = "",
            ) -> tuple[str, ...]:
    """Short, concrete things to try for a job that failed with ``category``.

    Args:
        category: one of :data:`CATEGORIES`.
        shape: the job's shape (``None`` when it never started: generic advice only).
        options: ``JobStarted.options`` (offload, dtype, vae_tiling, num_videos…).
        capacity: the device's total memory in bytes, where known.
        predict_peak: the VRAM model's predictor; memory suggestions then say what fits.
        stage: the stage it failed in (a decode OOM suggests VAE tiling first).
        step: the step it failed at.
        message: the sanitised message (a host OOM quotes the size it could not allocate).

    Returns:
        At most :data:`MAX_SUGGESTIONS` sentences, the most effective first.
    """
    opts = dict(options or {})
    found: list[str]
    if category == "oom_device":
        found = _device_oom(shape, opts, capacity, predict_peak, stage)
    elif category == "oom_host":
        found = _host_oom(shape, opts, message)
    elif category == "numerical":
        found = _numerical(shape, opts, step)
    elif category == "invalid_input":
        found = _invalid_input(shape, stage)
    elif category == "model_load":
        found = ["check the model directory holds model_index.json and every component "
                 "folder it lists (a Wan pipeline has 5: tokenizer, text_encoder, transformer, "
                 "vae, scheduler)",
                 "check the setup offline in under 1 s with --model tiny-t2v"]
    elif category == "io":
        found = ["check the output folder is writable and has free space (a video needs about "
                 f"{_video_mib(shape)} MiB)", "pick another --out folder"]
    elif category == "interrupted":
        where = f" at step {step + 1} of {shape.steps}" if shape and step is not None else ""
        found = [f"the job was stopped{where}: run it again"]
    else:
        found = ["run it again with --steps 1 to reproduce it in seconds, and report the "
                 "error type and message with the job id"]
    return tuple(found[:MAX_SUGGESTIONS])


def describe_failure(error_type: str | None, message: str | None, category: str | None,
                     suggestions: tuple[str, ...] | list[str] = ()) -> str:
    """One line for a failed job: ``OutOfMemoryError: … [oom_device]; try: 81 → 49 frames; …``.

    What ``wantel run``'s last line and the trace's status description say.
    """
    line = f"{error_type or 'error'}: {message or ''}".rstrip(": ")
    if category:
        line += f" [{category}]"
    if suggestions:
        line += "; try: " + "; ".join(suggestions)
    return line


def fewer_frames(frames: int, temporal: int = 4, share: float = 0.6) -> int | None:
    """About ``share`` of ``frames``, still a valid count (``temporal * k + 1``); ``None`` if
    ``frames`` is already the fewest."""
    if temporal <= 0:
        fewer = max(1, int(frames * share))
    else:
        fewer = round((frames - 1) * share / temporal) * temporal + 1
    return fewer if fewer < frames else None


def smaller_size(width: int, height: int, multiple: int = 16, *,
                 published: bool = True) -> tuple[int, int] | None:
    """The next smaller size: 480P from 720P and above (the orientation kept) where the model
    publishes those sizes (``published``: Wan), else both sides ×0.75 rounded down to
    ``multiple``; ``None`` at the smallest."""
    if published and min(width, height) >= 720:
        return P480 if width >= height else (P480[1], P480[0])
    w = max(multiple, int(width * 0.75) // multiple * multiple)
    h = max(multiple, int(height * 0.75) // multiple * multiple)
    return (w, h) if (w, h) != (width, height) else None


def size_label(width: int, height: int) -> str:
    """``1280x720 (720P)`` for Wan's published sizes, else ``WxH``."""
    names = {720: "720P", 480: "480P"}
    short = min(width, height)
    label = names.get(short)
    return f"{width}x{height} ({label})" if label else f"{width}x{height}"


def gib(value: float) -> str:
    """Bytes as ``31.2 GiB``."""
    return f"{value / GiB:.1f} GiB"


# -- per category -------------------------------------------------------------------------

def _device_oom(shape: JobShape | None, options: dict[str, object], capacity: int | None,
                predict: PredictPeak | None, stage: str | None) -> list[str]:
    found: list[str] = []
    offload = str(options.get("offload") or "none")
    if stage == "decode" and not options.get("vae_tiling"):
        found.append("decode in tiles: --vae-tiling (the VAE decode was the peak)")
    if shape is not None:
        found.extend(_smaller_jobs(shape, options, capacity, predict))
    if offload == "none":
        found.append(_offload_line("model", shape, options, predict,
                                   "enable model CPU offload: --offload model"))
    elif offload == "model":
        found.append(_offload_line("sequential", shape, options, predict,
                                   "offload layer by layer: --offload sequential (least "
                                   "memory, many times slower)"))
    videos = _int(options.get("num_videos"), 1)
    if videos > 1:
        found.append(f"--num-videos {videos} → 1 (each video is a batch row)")
    if shape is not None and not options.get("vae_tiling") and stage != "decode":
        found.append("--vae-tiling (the decode's memory grows with every pixel)")
    return found


def _smaller_jobs(shape: JobShape, options: dict[str, object], capacity: int | None,
                  predict: PredictPeak | None) -> list[str]:
    found: list[str] = []
    fit = capacity * FIT_SHARE if capacity and predict is not None else None
    fewer = fewer_frames(shape.num_frames, shape.temporal)
    if fewer is not None:
        if fit is not None:
            fewer = _largest_frames(shape, options, fit, predict) or fewer
        found.append(f"{shape.num_frames} → {fewer} frames" + _fits(
            replace(shape, num_frames=fewer), options, capacity, predict))
    smaller = smaller_size(shape.width, shape.height, shape.spatial_multiple,
                           published=is_wan(shape.family) or not shape.family)
    if smaller is not None:
        before, after = size_label(shape.width, shape.height), size_label(*smaller)
        found.append(f"{before} → {after}" + _fits(
            replace(shape, width=smaller[0], height=smaller[1]), options, capacity, predict))
    return found


def _largest_frames(shape: JobShape, options: dict[str, object], fit: float,
                    predict: PredictPeak | None) -> int | None:
    """The most frames (a valid count below the job's) whose predicted peak fits."""
    if predict is None:
        return None
    step = shape.temporal or 1
    frames = shape.num_frames - step
    while frames >= 1:
        peak = predict(replace(shape, num_frames=frames), options)
        if peak is not None and peak <= fit:
            return frames
        frames -= step
    return None


def _fits(shape: JobShape, options: Mapping[str, object], capacity: int | None,
          predict: PredictPeak | None) -> str:
    if predict is None or not capacity:
        return ""
    peak = predict(shape, options)
    if peak is None:
        return ""
    verdict = "fits in" if peak <= capacity * FIT_SHARE else "still exceeds"
    return f" ({verdict} {gib(capacity)}: predicted peak {gib(peak)})"


def _offload_line(mode: str, shape: JobShape | None, options: dict[str, object],
                  predict: PredictPeak | None, plain: str) -> str:
    if predict is None or shape is None:
        return plain
    before = predict(shape, options)
    after = predict(shape, {**options, "offload": mode})
    if before is None or after is None:
        return plain
    return f"{plain} (predicted peak {gib(before)} → {gib(after)})"


def _host_oom(shape: JobShape | None, options: dict[str, object], message: str) -> list[str]:
    found: list[str] = []
    asked = _allocation(message)
    if asked is not None:
        found.append(f"free host memory: the job could not allocate {gib(asked)} more")
    if shape is not None:
        found.extend(_smaller_jobs(shape, options, None, None))
    dtype = str(options.get("dtype") or "")
    if dtype == "float32":
        found.append("--dtype bfloat16 (float32 → bfloat16 halves the weights' memory)")
    offload = str(options.get("offload") or "none")
    if offload != "none":
        found.append(f"--offload {offload} keeps the weights in host memory: --offload none if "
                     "the GPU has room")
    return found or ["free host memory, or run a smaller job"]


def _numerical(shape: JobShape | None, options: dict[str, object], step: int | None
               ) -> list[str]:
    found: list[str] = []
    if str(options.get("dtype") or "") == "float16":
        found.append("--dtype bfloat16 (float16 → bfloat16: float16 overflows in Wan's "
                     "attention)")
    if shape is not None and shape.guidance_scale > 1.0:
        lower = max(1.0, round(shape.guidance_scale * 0.7, 1))
        found.append(f"--guidance {shape.guidance_scale:g} → {lower:g}")
    where = f" (the latents became NaN/inf by step {step + 1})" if step is not None else ""
    found.append(f"run it again with another --seed{where}")
    return found


def _invalid_input(shape: JobShape | None, stage: str | None) -> list[str]:
    found: list[str] = []
    if stage in ("image_encode", "latent_init", None):
        found.append("re-save the image as PNG or JPEG, at most 8192x8192 pixels")
    if shape is not None:
        multiple = shape.spatial_multiple
        if shape.width % multiple or shape.height % multiple:
            w, h = (max(multiple, round(v / multiple) * multiple)
                    for v in (shape.width, shape.height))
            found.append(f"{shape.width}x{shape.height} → {w}x{h} (multiples of {multiple})")
        if shape.temporal and (shape.num_frames - 1) % shape.temporal:
            frames = round((shape.num_frames - 1) / shape.temporal) * shape.temporal + 1
            found.append(f"{shape.num_frames} → {max(1, frames)} frames "
                         f"({shape.temporal}k+1)")
    return found or ["check the request's arguments against wantel run --help"]


def _video_mib(shape: JobShape | None) -> int:
    """A generous size for an H.264 video of this shape (~1/20 of the raw RGB frames)."""
    if shape is None:
        return 50
    raw = shape.width * shape.height * 3 * max(1, shape.num_frames)
    return max(1, math.ceil(raw / 20 / 2**20))


def _allocation(message: str) -> float | None:
    match = _ALLOCATE.search(message)
    if match is None:
        return None
    try:
        return float(match.group(1)) * _UNITS[match.group(2)[0].lower()]
    except (ValueError, KeyError):
        return None


def _int(value: object, default: int) -> int:
    try:
        return int(value)  # type: ignore[call-overload, no-any-return]
    except (TypeError, ValueError):
        return default




def shape_of(started: JobStarted) -> JobShape:
    """A job's shape as its ``JobStarted`` records it."""
    temporal, spatial = geometry(started.family, started.task)  # Wan: (4, 16); TI2V: 32
    return JobShape(
        width=started.width, height=started.height, num_frames=started.num_frames,
        steps=started.steps, device_kind=started.device.kind, task=started.task,
        family=started.family, spatial_multiple=spatial,
        temporal=temporal if is_video(started.task) else 0,
        guidance_scale=started.guidance_scale)


__all__ = ["CATEGORIES", "FailureCategory", "JobShape", "PredictPeak", "classify",
           "describe_failure", "fewer_frames", "shape_of", "smaller_size", "suggest"]
