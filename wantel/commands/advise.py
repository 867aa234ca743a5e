"""``wantel advise``: how long a job would take and whether it would fit, before running it.

The duration is the ETA model's before-start estimate (with its p10–p90 interval) and the peak
memory the memory model's prediction (docs/advise.md), both calibrated by the log's history:
the log is replayed through the ETA and memory projections first, so what its completed jobs
taught is what the advice uses. The peak is compared with the device's capacity (``--capacity``,
else torch's for CUDA, else the host's RAM on a CPU), and when it does not fit the advice says
what would: another offload mode, fewer frames, a lower resolution at the same aspect ratio.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from telemetry.errors import UsageError
from telemetry.eta import memory as memory_model
from telemetry.eta.live import LiveJob
from telemetry.eta.online import Learned
from telemetry.eta.shape import JobShape
from telemetry.events import DeviceInfo, JobStarted
from telemetry.log.base import Batch, LogNotFound
from telemetry.pipelines import geometry, is_video
from telemetry.projections.eta import EtaProjection, EtaState
from telemetry.projections.memory import MemoryProjection, MemoryState
from wantel.commands.common import open_local_for_reading

OFFLOAD_MODES: Final = ("none", "model", "sequential")
#: Frames: 4k+1, at most this (Wan generates 81; longer clips are extensions).
MAX_FRAMES: Final = 1025
MAX_SIDE: Final = 4096
#: A job "fits" when its predicted peak is at most this share of the capacity: the rest is
#: the CUDA context, the allocator's cache and the prediction's error (~10 %).
FIT_SHARE: Final = 0.9


@dataclass(frozen=True)
class ModelSpec:
    """What a model is, in the labels a ``JobStarted`` carries."""

    family: str
    variant: str
    task: str
    boundary_ratio: float | None = None
    steps: int = 50


#: Models known without a log: wantel's tiny variants and the published Wan checkpoints.
CATALOGUE: Final[dict[str, ModelSpec]] = {
    "tiny-t2v": ModelSpec("wan2.1", "tiny-t2v", "t2v", steps=20),
    "tiny-i2v": ModelSpec("wan2.1", "tiny-i2v", "i2v", steps=20),
    "tiny-ti2v": ModelSpec("wan2.2", "tiny-ti2v", "ti2v", steps=20),
    "tiny-cogvideox": ModelSpec("cogvideox", "tiny-cogvideox", "t2v", steps=20),
    "tiny-sd": ModelSpec("sd", "tiny-sd", "t2i", steps=20),
    "tiny-t2v-a14b": ModelSpec("wan2.2", "tiny-t2v-a14b", "t2v", 0.875, steps=20),
    "tiny-i2v-a14b": ModelSpec("wan2.2", "tiny-i2v-a14b", "i2v", 0.9, steps=20),
    "Wan2.1-T2V-1.3B": ModelSpec("wan2.1", "t2v-1.3B", "t2v"),
    "Wan2.1-T2V-14B": ModelSpec("wan2.1", "t2v", "t2v"),
    "Wan2.1-I2V-14B": ModelSpec("wan2.1", "i2v", "i2v", steps=40),
    "Wan2.2-T2V-A14B": ModelSpec("wan2.2", "t2v-A14B", "t2v", 0.875, steps=40),
    "Wan2.2-I2V-A14B": ModelSpec("wan2.2", "i2v-A14B", "i2v", 0.9, steps=40),
    "Wan2.2-TI2V-5B": ModelSpec("wan2.2", "ti2v-5B", "ti2v"),
}


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of ``wantel advise``."""
    parser.description = (
        "Predict a job's duration (the ETA model's before-start estimate with its p10-p90 "
        "interval) and peak memory (torch allocated on CUDA, host RSS on a CPU) from the log's "
        "history, compare the peak with the device's capacity, and say what would fit: the "
        "offload mode, the most frames, the highest resolution at this aspect ratio. Models: "
        f"{', '.join(CATALOGUE)}, or any model the log has run. See docs/advise.md.")
    parser.add_argument("--model", required=True, metavar="M",
                        help="a tiny variant, a published Wan model name, or a model in the log")
    parser.add_argument("--frames", type=int, required=True, metavar="F",
                        help=f"frames, 4k+1, at most {MAX_FRAMES} (1 for an image model: "
                        "tiny-sd, a Stable Diffusion history)")
    parser.add_argument("--height", type=int, required=True, metavar="H",
                        help="height in pixels (a multiple of 16; 32 for TI2V)")
    parser.add_argument("--width", type=int, required=True, metavar="W",
                        help="width in pixels (a multiple of 16; 32 for TI2V)")
    parser.add_argument("--steps", type=int, metavar="S",
                        help="denoising steps (default: 20 tiny, 40 A14B/I2V, else 50)")
    parser.add_argument("--device", default="auto", metavar="D",
                        help="auto (CUDA if torch sees one, else cpu), cpu, cuda, or a GPU name "
                        "as the log records it (e.g. 'NVIDIA H100 80GB HBM3')")
    parser.add_argument("--offload", default="none", choices=OFFLOAD_MODES,
                        help="CPU offload mode the job would run with (default none)")
    parser.add_argument("--dtype", default="auto", metavar="T",
                        help="bfloat16, float16 or float32 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--vae-tiling", action="store_true", help="decode in tiles")
    parser.add_argument("--no-cfg", action="store_true",
                        help="without classifier-free guidance (one pass a step)")
    parser.add_argument("--capacity", metavar="BYTES",
                        help="the memory to fit in, e.g. 24GiB, 80GB, 16e9 (default: the "
                        "CUDA device's total, or the host's RAM for cpu)")
    parser.add_argument("--json", action="store_true", help="print the advice as JSON")


def run(args: argparse.Namespace) -> int:
    """Print the advice; bad input is one line and exit 2."""
    try:
        log = open_local_for_reading(args)
    except LogNotFound as exc:
        raise UsageError(str(exc)) from None
    eta, mem, templates = _history(log)
    if not templates:
        raise UsageError(f"the log {log.path} has no jobs to learn from; run a job first "
                         "(wantel run …) or point --log at a log with history")
    spec, template = _model(args.model, templates)
    _check_sizes(spec, args.frames, args.height, args.width, args.steps)
    kind_name = _device(args.device, template)
    steps = args.steps if args.steps is not None else spec.steps
    dtype = args.dtype if args.dtype != "auto" else (
        "float32" if kind_name[0] == "cpu" else "bfloat16")
    options: dict[str, Any] = {"dtype": dtype, "stages": "load,save"}
    if args.offload != "none":
        options["offload"] = args.offload
    if args.vae_tiling:
        options["vae_tiling"] = True
    capacity = _capacity(args.capacity, kind_name, templates)
    now = time.time_ns()
    event = JobStarted(
        job="advise", seq=0, ts=now, model=args.model, family=spec.family,
        variant=spec.variant, task=spec.task, width=args.width, height=args.height,  # type: ignore[arg-type]
        num_frames=args.frames, steps=steps, guidance_scale=1.0 if args.no_cfg else 5.0,
        cfg=not args.no_cfg, boundary_ratio=spec.boundary_ratio,
        device=DeviceInfo(kind=kind_name[0], name=kind_name[1], total_memory_bytes=capacity),
        options=options)
    advice = advise(event, eta, mem, capacity)
    if args.json:
        print(msgspec.json.encode(advice).decode())
    else:
        print(render(advice))
    return 0


def advise(event: JobStarted, eta: EtaState, mem: MemoryState,
           capacity: int | None) -> dict[str, Any]:
    """The advice for the job ``event`` describes, as a dictionary (``--json`` prints it)."""
    live = LiveJob.start(event, eta.calibration, eta.learned)
    remaining, low, high, _progress, _estimating = live.estimate_fields(event.ts)
    shape = JobShape.of(event)
    kind = memory_model.peak_kind(event.device.kind)
    learned = mem.learned
    _, peak = memory_model.predict(shape, kind, learned)
    by_offload = {mode: int(memory_model.predict(shape, kind, learned, offload=mode)[1])
                  for mode in OFFLOAD_MODES}
    advice: dict[str, Any] = {
        "model": event.model, "variant": event.variant, "task": event.task,
        "device": shape.device,
        "width": event.width, "height": event.height, "frames": event.num_frames,
        "steps": event.steps, "offload": offload_of(shape),
        "duration_s": remaining, "duration_p10_s": low, "duration_p90_s": high,
        "peak_kind": kind, "predicted_peak_bytes": int(peak),
        "peak_by_offload_bytes": by_offload, "capacity_bytes": capacity,
        "calibrated_on_jobs": {"eta": eta.learned.jobs, "memory": learned.jobs},
    }
    if capacity is None:
        return advice
    budget = capacity * FIT_SHARE
    advice["fits"] = peak <= budget
    advice["fitting_offload"] = next((m for m in OFFLOAD_MODES if by_offload[m] <= budget),
                                     None)
    advice["max_frames"] = (_max_frames(shape, kind, learned, budget)
                            if is_video(event.task) else None)
    advice["max_resolution"] = _max_resolution(shape, kind, learned, budget)
    return advice


def offload_of(shape: JobShape) -> str:
    """The job's offload mode."""
    return memory_model.offload_mode(shape)


def _peak(shape: JobShape, kind: str, learned: Learned) -> float:
    return memory_model.predict(shape, kind, learned)[1]


def _max_frames(shape: JobShape, kind: str, learned: Learned, budget: float) -> int | None:
    """The most frames (4k+1) that fit at this resolution, ``None`` if not even one."""
    if _peak(msgspec.structs.replace(shape, frames=1), kind, learned) > budget:
        return None
    low, high = 0, (MAX_FRAMES - 1) // 4  # k: frames = 4k+1; low fits
    while low < high:
        middle = (low + high + 1) // 2
        frames = 4 * middle + 1
        if _peak(msgspec.structs.replace(shape, frames=frames), kind, learned) <= budget:
            low = middle
        else:
            high = middle - 1
    return 4 * low + 1


def _max_resolution(shape: JobShape, kind: str, learned: Learned,
                    budget: float) -> list[int] | None:
    """The largest [width, height] at the job's aspect ratio (sides on its grid) that fits
    with its frames, ``None`` if not even the smallest."""
    grid = shape.spatial_patch
    best: list[int] | None = None
    for step in range(1, MAX_SIDE // grid + 1):
        scale = step * grid / max(shape.width, shape.height)
        width = max(grid, round(shape.width * scale / grid) * grid)
        height = max(grid, round(shape.height * scale / grid) * grid)
        if _peak(msgspec.structs.replace(shape, width=width, height=height), kind,
                 learned) > budget:
            break
        best = [width, height]
    return best


def render(advice: dict[str, Any]) -> str:
    """The advice in a few lines."""
    gib = 2**30
    lines = [
        f"{advice['model']} ({advice['variant']}) {advice['width']}x{advice['height']}, "
        f"{advice['frames']} frames, {advice['steps']} steps on {advice['device']}, "
        f"offload {advice['offload']}",
        f"duration: {advice['duration_s']:.1f} s (p10-p90 {advice['duration_p10_s']:.1f}-"
        f"{advice['duration_p90_s']:.1f} s; learned from {advice['calibrated_on_jobs']['eta']}"
        " completed jobs)",
    ]
    peak, capacity = advice["predicted_peak_bytes"], advice["capacity_bytes"]
    memory = (f"peak memory ({advice['peak_kind']}): {peak / gib:.2f} GiB "
              f"(learned from {advice['calibrated_on_jobs']['memory']} jobs)")
    if capacity is None:
        lines.append(memory + "; capacity unknown (pass --capacity)")
        return "\n".join(lines)
    verdict = "fits" if advice["fits"] else "does NOT fit"
    lines.append(f"{memory} of {capacity / gib:.2f} GiB: {verdict} "
                 f"(at most {FIT_SHARE:.0%} of capacity)")
    by_offload = ", ".join(f"{mode} {value / gib:.2f} GiB"
                           for mode, value in advice["peak_by_offload_bytes"].items())
    lines.append(f"by offload mode: {by_offload}")
    if not advice["fits"]:
        fitting = advice["fitting_offload"]
        lines.append(f"to fit: --offload {fitting}" if fitting else
                     "to fit: no offload mode is enough at this size")
    frames, resolution = advice["max_frames"], advice["max_resolution"]
    if is_video(advice["task"]):  # an image model makes one frame
        lines.append(f"most frames at {advice['width']}x{advice['height']}: "
                     f"{frames if frames is not None else 'none fit'}")
    lines.append(f"highest resolution at {advice['frames']} frames: "
                 f"{'x'.join(map(str, resolution)) if resolution else 'none fits'}")
    return "\n".join(lines)


# -- input ------------------------------------------------------------------------------------


def _history(log: Any) -> tuple[EtaState, MemoryState, dict[str, JobStarted]]:
    """The log folded through the ETA and memory projections, and each model's latest start."""
    eta_projection, memory_projection = EtaProjection(), MemoryProjection()
    eta, mem = eta_projection.initial(), memory_projection.initial()
    templates: dict[str, JobStarted] = {}
    for item in log.read():
        if not isinstance(item, Batch):
            continue
        for event in item.events:
            eta = eta_projection.apply(eta, event)
            mem = memory_projection.apply(mem, event)
            if type(event) is JobStarted:
                templates[event.model] = event
    return eta, mem, templates


def _model(name: str, templates: dict[str, JobStarted]) -> tuple[ModelSpec, JobStarted | None]:
    """The model's labels: from the catalogue, else from the log's latest job of it."""
    template = templates.get(name)
    spec = CATALOGUE.get(name)
    if spec is None and template is not None:
        spec = ModelSpec(template.family, template.variant, template.task,
                         template.boundary_ratio, steps=template.steps)
    if spec is None:
        known = sorted({*CATALOGUE, *templates})
        raise UsageError(f"unknown model {name!r}: one of {', '.join(known)}")
    return spec, template


def _check_sizes(spec: ModelSpec, frames: int, height: int, width: int,
                 steps: int | None) -> None:
    grid = geometry(spec.family, spec.task)[1]  # Wan: 16, TI2V-5B: 32; others their own
    if not is_video(spec.task):
        if frames != 1:
            raise UsageError(f"--frames must be 1 for {spec.variant}, an image model "
                             f"({spec.task}), got {frames}")
    elif not (1 <= frames <= MAX_FRAMES and (frames - 1) % 4 == 0):
        raise UsageError(f"--frames must be 4k+1 from 1 to {MAX_FRAMES}, got {frames}")
    for flag, value in (("--height", height), ("--width", width)):
        if not (grid <= value <= MAX_SIDE and value % grid == 0):
            raise UsageError(f"{flag} must be a multiple of {grid} from {grid} to {MAX_SIDE} "
                             f"for {spec.variant}, got {value}")
    if steps is not None and not 1 <= steps <= 1000:
        raise UsageError(f"--steps must be from 1 to 1000, got {steps}")


def _device(choice: str, template: JobStarted | None) -> tuple[str, str]:
    """(kind, name) of the device the advice is for."""
    if choice == "cpu":
        return ("cpu", "cpu")
    if choice in ("auto", "cuda"):
        name = _cuda_name()
        if name is not None:
            return ("cuda", name)
        if choice == "cuda":
            if template is not None and template.device.kind == "cuda":
                return ("cuda", template.device.name)
            raise UsageError("--device cuda: torch sees no CUDA device here; name the GPU "
                             "(--device 'NVIDIA H100 80GB HBM3') and pass --capacity")
        return ("cpu", "cpu")
    return ("cuda", choice)


def _cuda_name() -> str | None:
    if "torch" not in sys.modules and not _torch_installed():
        return None
    try:
        import torch

        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name(0))
    except Exception:  # no CUDA is an answer, not an error
        return None
    return None


def _torch_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


_UNITS: Final = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                 "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3,
                 "m": 10**6, "g": 10**9, "t": 10**12}


def parse_bytes(text: str) -> int:
    """``24GiB``, ``80GB``, ``16e9`` → bytes; a UsageError for anything else."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if match is None or match.group(2) not in _UNITS:
        raise UsageError(f"--capacity: not an amount of memory: {text!r} (e.g. 24GiB, 80GB)")
    value = float(match.group(1)) * _UNITS[match.group(2)]
    if not value >= 1:
        raise UsageError(f"--capacity must be positive, got {text!r}")
    return int(value)


def _capacity(flag: str | None, device: tuple[str, str],
              templates: dict[str, JobStarted]) -> int | None:
    """``--capacity``, else the CUDA device's total (torch, or the log's record of that GPU),
    else the host's RAM for a CPU."""
    if flag is not None:
        return parse_bytes(flag)
    kind, name = device
    if kind == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    if _cuda_name() == name:
        import torch

        return int(torch.cuda.get_device_properties(0).total_memory)
    for started in templates.values():
        if started.device.name == name and started.device.total_memory_bytes:
            return started.device.total_memory_bytes
    return None
