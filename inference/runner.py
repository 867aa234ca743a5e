"""Run one generation end to end as a recorded job: validate, load, generate, save.

Everything a user can get wrong is checked by :func:`prepare` before any model is loaded, so a
typo costs milliseconds, not a model load. :func:`generate` then records the whole job —
including ``load`` and ``save``, which happen outside the pipeline call — through one
:class:`~inference.recorder.JobRecorder`.

The options that change a job's speed (offload, compile, VAE tiling, videos per prompt…) are
applied while loading and then read back from the pipeline by
:func:`~inference.speed_options.speed_options`, so ``JobStarted.options`` says what the pipeline
really does, not what was asked for. That is why ``JobStarted`` is written once the pipeline is
loaded: it is still stamped at the job's start and still the job's first event (the ``load``
stage, measured before it, follows it in the log), but live views see a ``wantel run`` job only
from then on.
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
from inference.speed_options import speed_options
from inference.timing import timer_for
from inference.upstream import image_embeds_per_video
from telemetry.emitter import Emitter
from telemetry.events import job_id_problem
from telemetry.pipelines import native_fps

VIDEO_SUFFIXES: Final = (".mp4", ".mov", ".mkv")
#: What an image model's (``tiny-sd``, a Stable Diffusion directory) output may be saved as.
IMAGE_SUFFIXES: Final = (".png", ".jpg", ".jpeg", ".webp")
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
#: ``--offload``: none, or diffusers' ``enable_model_cpu_offload`` /
#: ``enable_sequential_cpu_offload``.
OFFLOAD_MODES: Final = ("none", "model", "sequential")
MAX_VIDEOS: Final = 16  # videos per prompt: each is a full batch row through every step


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
    offload: str = "none"
    vae_tiling: bool = False
    compile: bool = False
    num_videos: int = 1


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
    frames: int | None = None  # over all its videos
    error: str | None = None
    outputs: tuple[Path, ...] = ()  # every video written: ``output`` first


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
    video = model.spec.video
    frames = _or_default(request.frames, (17 if tiny else 81) if video else 1)
    steps = _or_default(request.steps, 8 if tiny else 40)
    _check_bounds(request, height=height, width=width, frames=frames, steps=steps)
    try:
        model.check(height=height, width=width, num_frames=frames)
    except ModelError as exc:
        raise RequestError(str(exc)) from None
    if not 1 <= request.num_videos <= MAX_VIDEOS:
        raise RequestError(f"--num-videos must be 1 to {MAX_VIDEOS}, got {request.num_videos}")
    image = _load_image(model, request.image)
    device = _device(request.device)
    _check_offload(request.offload, device, asked=request.device)
    job = request.job or uuid.uuid4().hex[:12]
    return PreparedRequest(
        request=request, model=model, job=job, height=height, width=width, frames=frames,
        steps=steps, device=device, dtype=_dtype(request.dtype, device),
        out=_output_path(request.out, job, creates, video=video), image=image,
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
    if not (model.spec.needs_image or model.spec.takes_image) and image is not None:
        raise RequestError(f"{model.name} does not take an image ({model.spec.task}); "
                           "drop --image or pick an i2v or ti2v model")
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


def _check_offload(offload: str, device: torch.device, *, asked: str) -> None:
    if offload not in OFFLOAD_MODES:
        raise RequestError(f"--offload {offload}: expected {', '.join(OFFLOAD_MODES)}")
    if offload != "none" and device.type == "cpu":
        why = "--device cpu" if asked == "cpu" else "no CUDA device is available here"
        raise RequestError(
            f"--offload {offload} needs an accelerator: it keeps weights in host memory and "
            f"moves them to the GPU as they run, and this job runs on the CPU ({why}); "
            "drop --offload")


def _output_paths(out: Path, count: int) -> tuple[Path, ...]:
    """``out`` for the first video, ``<stem>-2<suffix>``… beside it for the others."""
    return (out, *(out.with_name(f"{out.stem}-{n}{out.suffix}") for n in range(2, count + 1)))


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise RequestError(f"--dtype {name}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _output_path(out: str | None, job: str,
                 creates: Sequence[str | os.PathLike[str]] = (), *, video: bool = True) -> Path:
    suffixes, what = (VIDEO_SUFFIXES, "video") if video else (IMAGE_SUFFIXES, "image")
    path = Path(out) if out else Path(f"wantel-{job}{suffixes[0]}")
    if path.suffix.lower() not in suffixes:
        raise RequestError(f"--out {path}: the {what} must end in {', '.join(suffixes)}")
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
    try:
        with recorder.stage_span("load"):
            pipe = _load(prepared)
        # Read back from the pipeline: what the flags did, and what the model brought.
        _job_started(recorder, prepared,
                     speed_options(pipe, num_videos=request.num_videos))
        with instrument(pipe, emitter=emitter, recorder=recorder, model=model.name,
                        variant=model.variant) as handle:
            if on_instrumented is not None:
                on_instrumented(handle)
            videos = _call(pipe, prepared)
        with recorder.stage_span("save"):
            outputs = _save(videos, prepared.out,
                            fps=native_fps(model.spec.family, model.spec.task))
    except (KeyboardInterrupt, JobCancelledError) as exc:
        if not recorder.started:
            _job_started(recorder, prepared, _requested(prepared))
        if not recorder.finished:
            recorder.cancelled(str(exc) or type(exc).__name__)
        raise
    except BaseException as exc:
        if not recorder.started:
            _job_started(recorder, prepared, _requested(prepared))
        if not recorder.finished:
            recorder.failed(exc, secrets=tuple(
                p for p in (request.prompt, request.negative_prompt) if p is not None))
        raise
    frames = sum(len(video) for video in videos)
    recorder.completed(output_path=str(prepared.out), frames=frames,
                       size_bytes=sum(path.stat().st_size for path in outputs))
    return Outcome(job=prepared.job, status="completed", output=prepared.out, frames=frames,
                   outputs=outputs)


def _job_started(recorder: JobRecorder, prepared: PreparedRequest,
                 options: dict[str, Any]) -> None:
    request, model = prepared.request, prepared.model
    recorder.job_started(
        model=model.name, family=model.spec.family, variant=model.variant, task=model.spec.task,
        width=prepared.width, height=prepared.height, num_frames=prepared.frames,
        steps=prepared.steps, guidance_scale=request.guidance, cfg=request.guidance > 1.0,
        boundary_ratio=model.spec.boundary_ratio, seed=request.seed,
        device=device_info(prepared.device),
        options={**options, "stages": "load,save",
                 **({"image": True} if model.spec.takes_image and prepared.image is not None
                    else {}),
                 **request.options},
        prompt=request.prompt, record_prompt=request.record_prompt,
        traceparent=request.traceparent,
    )


def _requested(prepared: PreparedRequest) -> dict[str, Any]:
    """The options a job asked for: what a job whose pipeline never loaded records."""
    request = prepared.request
    return {"offload": request.offload, "dtype": str(prepared.dtype).removeprefix("torch."),
            "compiled": request.compile, "vae_tiling": request.vae_tiling,
            "num_videos": request.num_videos}


def _load(prepared: PreparedRequest) -> Any:
    """Load the pipeline and apply the request's speed options to it.

    An offloaded pipeline is loaded into host memory: diffusers' offloading moves each part to
    the device as it runs (loading it all onto the device first is what offloading avoids).
    ``--compile`` wraps the transformers in ``torch.compile``; they compile at their first call,
    so the first denoising step pays for it.
    """
    request = prepared.request
    offload = request.offload
    pipe = prepared.model.load(
        device=prepared.device if offload == "none" else torch.device("cpu"),
        dtype=prepared.dtype, seed=request.seed, image=prepared.image is not None)
    if offload == "model":
        pipe.enable_model_cpu_offload(device=prepared.device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=prepared.device)
    if request.vae_tiling:
        pipe.vae.enable_tiling()
    if request.compile:
        for name in ("transformer", "transformer_2", "unet"):
            module = getattr(pipe, name, None)
            if module is not None:
                setattr(pipe, name, torch.compile(module))
    return pipe


def _call(pipe: Any, prepared: PreparedRequest) -> Any:
    request = prepared.request
    generator_device = "cuda" if prepared.device.type == "cuda" else "cpu"
    kwargs: dict[str, Any] = {
        "prompt": request.prompt,
        "height": prepared.height,
        "width": prepared.width,
        "num_inference_steps": prepared.steps,
        "guidance_scale": request.guidance,
        "generator": torch.Generator(device=generator_device).manual_seed(request.seed),
        "output_type": "np",
    }
    if not prepared.model.spec.video:  # an image model: its batch is images, its output too
        kwargs["num_images_per_prompt"] = request.num_videos
        if request.negative_prompt is not None:
            kwargs["negative_prompt"] = request.negative_prompt
        if prepared.image is not None:  # an image-to-image model's input
            kwargs["image"] = prepared.image
        return pipe(**kwargs).images[:, None]  # each image a one-frame "video"
    kwargs["num_frames"] = prepared.frames
    kwargs["num_videos_per_prompt"] = request.num_videos
    if request.negative_prompt is not None:
        kwargs["negative_prompt"] = request.negative_prompt
    if prepared.image is not None:
        kwargs["image"] = prepared.image
    with image_embeds_per_video(pipe, request.num_videos):
        return pipe(**kwargs).frames


def _save(videos: Any, path: Path, *, fps: int) -> tuple[Path, ...]:
    """Write each video at ``fps`` (``path``, then ``<stem>-2<suffix>``…), or, where ``path``
    names an image, each one-frame video's frame; the paths written."""
    from diffusers.utils.export_utils import export_to_video

    paths = _output_paths(path, len(videos))
    image = path.suffix.lower() in IMAGE_SUFFIXES
    for video, video_path in zip(videos, paths, strict=True):
        if image:
            from PIL import Image

            Image.fromarray((video[0] * 255).round().clip(0, 255).astype("uint8")).save(
                video_path)
        else:
            export_to_video(list(video), str(video_path), fps=fps)
    return paths


__all__ = [
    "GenerationRequest",
    "Instrumented",
    "Outcome",
    "PreparedRequest",
    "RequestError",
    "generate",
    "prepare",
]
