"""Run one generation end to end as a recorded job: validate, load, generate, save.

Everything a user can get wrong is checked by :func:`prepare` before any model is loaded, so a
typo costs milliseconds, not a model load. :func:`generate` then records the whole job —
including ``load`` and ``save``, which happen outside the pipeline call — through one
:class:`~inference.recorder.JobRecorder`.
"""

from __future__ import annotations

import math
import os
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import torch

from inference.instrument import Instrumented, JobCancelledError, device_info, instrument
from inference.memory import MemoryReader
from inference.models import ModelChoice, ModelError, resolve_model
from inference.recorder import JobRecorder
from inference.timing import timer_for
from telemetry.emitter import Emitter
from telemetry.events import job_id_problem

VIDEO_SUFFIXES: Final = (".mp4", ".mov", ".mkv")
FPS: Final = 16  # Wan's native frame rate
DTYPES: Final = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Upper bounds of a request, far beyond any Wan model's use (81 frames at 720p, 40–50
#: steps), low enough that a typo fails in milliseconds instead of filling memory for minutes.
MAX_STEPS: Final = 1000
MAX_FRAMES: Final = 1025
MAX_SIDE: Final = 4096
MAX_GUIDANCE: Final = 100.0
MAX_SEED: Final = 2**64 - 1  # what torch.Generator.manual_seed takes
#: The largest conditioning image read (pixels): 8192 × 8192. PIL's own decompression-bomb
#: limit is higher; an image this large is resized down to at most MAX_SIDE anyway.
MAX_IMAGE_PIXELS: Final = 8192 * 8192


class RequestError(ValueError):
    """A request that cannot run; the message says what was wrong and what would work."""


@dataclass(frozen=True)
class GenerationRequest:
    """What a user asked for (``None`` means the model's default)."""

    model: str
    prompt: str
    image: str | None = None
    negative_prompt: str | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance: float = 5.0
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    out: str | None = None
    job: str | None = None
    record_prompt: bool = False
    traceparent: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PreparedRequest:
    """A request checked against its model and machine, ready to run."""

    request: GenerationRequest
    model: ModelChoice
    job: str
    height: int
    width: int
    frames: int
    steps: int
    device: torch.device
    dtype: torch.dtype
    out: Path
    image: Any  # a PIL image for image-conditioned models, else None


@dataclass(frozen=True)
class Outcome:
    """How a job ended."""

    job: str
    status: str  # completed | failed | cancelled
    output: Path | None = None
    frames: int | None = None
    error: str | None = None


def prepare(request: GenerationRequest, *, creates: Sequence[str | os.PathLike[str]] = ()
            ) -> PreparedRequest:
    """Check everything that can be checked without loading the model.

    ``creates``: directories the caller will create before the job runs (``wantel run``'s
    log), so an ``--out`` inside one of them is not refused for a folder that does not
    exist yet.
    """
    if request.job is not None and (problem := job_id_problem(request.job)) is not None:
        raise RequestError(f"--job {request.job!r}: {problem}")
    try:
        model = resolve_model(request.model)
    except ModelError as exc:
        raise RequestError(str(exc)) from None
    tiny = model.path is None
    height = _or_default(request.height, 64 if tiny else 480)
    width = _or_default(request.width, 64 if tiny else 832)
    frames = _or_default(request.frames, 17 if tiny else 81)
    steps = _or_default(request.steps, 8 if tiny else 40)
    _check_bounds(request, height=height, width=width, frames=frames, steps=steps)
    try:
        model.check(height=height, width=width, num_frames=frames)
    except ModelError as exc:
        raise RequestError(str(exc)) from None
    image = _load_image(model, request.image)
    device = _device(request.device)
    job = request.job or uuid.uuid4().hex[:12]
    return PreparedRequest(
        request=request, model=model, job=job, height=height, width=width, frames=frames,
        steps=steps, device=device, dtype=_dtype(request.dtype, device),
        out=_output_path(request.out, job, creates), image=image,
    )


def _check_bounds(request: GenerationRequest, *, height: int, width: int, frames: int,
                  steps: int) -> None:
    """Each number within its range (and finite), named with the range that would work."""
    if not 1 <= steps <= MAX_STEPS:
        raise RequestError(f"--steps must be at least 1 and at most {MAX_STEPS}, got {steps}")
    if not frames <= MAX_FRAMES:
        raise RequestError(f"--frames must be at most {MAX_FRAMES}, got {frames}")
    for flag, value in (("--height", height), ("--width", width)):
        if not value <= MAX_SIDE:
            raise RequestError(f"{flag} must be at most {MAX_SIDE} pixels, got {value}")
    guidance = request.guidance
    if not (math.isfinite(guidance) and 0 <= guidance <= MAX_GUIDANCE):
        raise RequestError(f"--guidance must be a number from 0 to {MAX_GUIDANCE:g}, "
                           f"got {guidance}")
    if not 0 <= request.seed <= MAX_SEED:
        raise RequestError(f"--seed must be from 0 to 2**64-1, got "
                           f"{_bounded_repr(request.seed)}")


def _bounded_repr(value: object) -> str:
    text = str(value)
    return text if len(text) <= 30 else f"{text[:12]}…{text[-6:]} ({len(text)} digits)"


def _or_default(value: int | None, default: int) -> int:
    return default if value is None else value


def _load_image(model: ModelChoice, image: str | None) -> Any:
    if model.spec.needs_image and image is None:
        raise RequestError(f"{model.name} generates from an image: pass --image IMG")
    if not model.spec.needs_image and image is not None:
        raise RequestError(f"{model.name} does not take an image ({model.spec.task}); "
                           "drop --image or pick an i2v model")
    if image is None:
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # PIL warns (on stderr) past its own limit; ours, lower, refuses such an image.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(image) as opened:
                width, height = opened.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise RequestError(
                        f"--image {image}: {width}x{height} is too large (at most "
                        f"{MAX_IMAGE_PIXELS:,} pixels, e.g. 8192x8192); resize it first")
                return opened.convert("RGB")
    except RequestError:
        raise
    except FileNotFoundError:
        raise RequestError(f"--image {image}: no such file") from None
    except IsADirectoryError:
        raise RequestError(f"--image {image}: is a directory, not an image") from None
    except Image.DecompressionBombError:
        raise RequestError(f"--image {image}: too large to decode safely (PIL refused it "
                           "as a possible decompression bomb); resize it first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError,
            MemoryError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise RequestError(f"--image {image}: not a readable image ({detail})") from None


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RequestError("--device cuda: no CUDA device is available here "
                           "(use --device cpu or auto)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise RequestError(f"--device {name}: expected auto, cpu or cuda[:N]") from None


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise RequestError(f"--dtype {name}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _output_path(out: str | None, job: str,
                 creates: Sequence[str | os.PathLike[str]] = ()) -> Path:
    path = Path(out) if out else Path(f"wantel-{job}.mp4")
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise RequestError(f"--out {path}: the video must end in {', '.join(VIDEO_SUFFIXES)}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        if any(parent.absolute() == Path(d).absolute() for d in creates):
            return path  # created before the job runs (by whoever creates it, with its checks)
        raise RequestError(f"--out {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise RequestError(f"--out {path}: not writable")
    return path


def generate(
    prepared: PreparedRequest,
    emitter: Emitter,
    *,
    on_instrumented: Any = None,
) -> Outcome:
    """Run the job, recording every stage; exceptions propagate after being recorded.

    ``on_instrumented(handle)`` receives the :class:`~inference.instrument.Instrumented` handle
    once the pipeline is loaded, so a caller can cancel the job from another thread.
    """
    memory = MemoryReader(prepared.device)
    try:
        return _generate(prepared, emitter, memory, on_instrumented)
    finally:
        memory.close()


def _generate(prepared: PreparedRequest, emitter: Emitter, memory: MemoryReader,
              on_instrumented: Any) -> Outcome:
    request, model = prepared.request, prepared.model
    recorder = JobRecorder(emitter, prepared.job, timer=timer_for(prepared.device),
                           memory=memory)
    recorder.job_started(
        model=model.name, family=model.spec.family, variant=model.variant, task=model.spec.task,
        width=prepared.width, height=prepared.height, num_frames=prepared.frames,
        steps=prepared.steps, guidance_scale=request.guidance, cfg=request.guidance > 1.0,
        boundary_ratio=model.spec.boundary_ratio, seed=request.seed,
        device=device_info(prepared.device),
        options={"dtype": str(prepared.dtype).removeprefix("torch."), "offload": False,
                 "stages": "load,save", **request.options},
        prompt=request.prompt, record_prompt=request.record_prompt,
        traceparent=request.traceparent,
    )
    try:
        with recorder.stage_span("load"):
            pipe = model.load(device=prepared.device, dtype=prepared.dtype, seed=request.seed)
        with instrument(pipe, emitter=emitter, recorder=recorder, model=model.name,
                        variant=model.variant) as handle:
            if on_instrumented is not None:
                on_instrumented(handle)
            frames = _call(pipe, prepared)
        with recorder.stage_span("save"):
            _save(frames, prepared.out)
    except (KeyboardInterrupt, JobCancelledError) as exc:
        if not recorder.finished:
            recorder.cancelled(str(exc) or type(exc).__name__)
        raise
    except BaseException as exc:
        if not recorder.finished:
            recorder.failed(exc, secrets=tuple(
                p for p in (request.prompt, request.negative_prompt) if p is not None))
        raise
    recorder.completed(output_path=str(prepared.out), frames=len(frames),
                       size_bytes=prepared.out.stat().st_size)
    return Outcome(job=prepared.job, status="completed", output=prepared.out, frames=len(frames))


def _call(pipe: Any, prepared: PreparedRequest) -> Any:
    request = prepared.request
    generator_device = "cuda" if prepared.device.type == "cuda" else "cpu"
    kwargs: dict[str, Any] = {
        "prompt": request.prompt,
        "height": prepared.height,
        "width": prepared.width,
        "num_frames": prepared.frames,
        "num_inference_steps": prepared.steps,
        "guidance_scale": request.guidance,
        "generator": torch.Generator(device=generator_device).manual_seed(request.seed),
        "output_type": "np",
    }
    if request.negative_prompt is not None:
        kwargs["negative_prompt"] = request.negative_prompt
    if prepared.image is not None:
        kwargs["image"] = prepared.image
    return pipe(**kwargs).frames[0]


def _save(frames: Any, path: Path) -> None:
    from diffusers.utils.export_utils import export_to_video

    export_to_video(list(frames), str(path), fps=FPS)


__all__ = [
    "GenerationRequest",
    "Instrumented",
    "Outcome",
    "PreparedRequest",
    "RequestError",
    "generate",
    "prepare",
]
