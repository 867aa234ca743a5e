"""``wantel run``: generate a video with a tiny offline Wan model or a local diffusers model.

The progress line is itself a projection of the log: a :class:`~telemetry.runner.ProjectionRunner`
follows the events this job appends and folds them with the same projections that
``wantel replay`` and the server use, and its :class:`ProgressDisplay` sink draws the line, so
what the terminal shows is exactly what every other view will show.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from inference.models import warm_imports
from inference.recorder import sanitise
from inference.runner import (
    MAX_FRAMES,
    MAX_GUIDANCE,
    MAX_SIDE,
    MAX_STEPS,
    MAX_VIDEOS,
    OFFLOAD_MODES,
    GenerationRequest,
    RequestError,
    generate,
    prepare,
)
from inference.tiny_models import TINY_VARIANTS
from telemetry.emitter import Emitter, default_worker_name
from telemetry.engine import ProjectionEngine
from telemetry.errors import UsageError
from telemetry.log.base import EventLog
from telemetry.log.local import LocalLog
from telemetry.projections import default_projections
from telemetry.projections.eta import EtaPoint, current
from telemetry.projections.jobs import JobView
from telemetry.projections.summary import JobSummary, job_summary
from telemetry.runner import Applied, ProjectionRunner, Sink
from wantel.config import resolve_log_dir, resolve_worker

EXIT_FAILED = 1
EXIT_CANCELLED = 130
#: ``--sample-interval``: 0 (off), else between these (seconds).
MIN_SAMPLE_INTERVAL = 0.01
MAX_SAMPLE_INTERVAL = 3600.0


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of ``wantel run``."""
    parser.description = (
        "Generate a video and record every stage of the job in the event log. Models: "
        f"{', '.join(TINY_VARIANTS)} (tiny random weights, built offline in a fraction of a "
        "second), or the path of a local diffusers Wan model directory."
    )
    parser.add_argument("--model", required=True, metavar="M",
                        help="a tiny variant or a local diffusers model directory")
    parser.add_argument("--prompt", required=True, metavar="P",
                        help="the text prompt (stored only as a digest keyed with the log's "
                        "secret key, unless --record-prompt)")
    parser.add_argument("--negative-prompt", metavar="P", help="the negative prompt")
    parser.add_argument("--image", metavar="IMG", help="the conditioning image (i2v models)")
    parser.add_argument("--frames", type=int, metavar="F",
                        help=f"frames, 4k+1, at most {MAX_FRAMES} (default: 17 tiny, 81 "
                        "otherwise)")
    parser.add_argument("--height", type=int, metavar="H",
                        help=f"height in pixels (multiple of 16; 32 for ti2v; at most {MAX_SIDE}; "
                        "default 64 tiny, 480)")
    parser.add_argument("--width", type=int, metavar="W",
                        help=f"width in pixels (multiple of 16; 32 for ti2v; at most {MAX_SIDE}; "
                        "default 64 tiny, 832)")
    parser.add_argument("--steps", type=int, metavar="S",
                        help=f"denoising steps, 1 to {MAX_STEPS} (default: 8 tiny, 40 otherwise)")
    parser.add_argument("--guidance", type=float, default=5.0, metavar="G",
                        help="classifier-free guidance scale, 0 to "
                        f"{MAX_GUIDANCE:g}; > 1 runs two passes per step (default 5.0)")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="random seed, 0 to 2**64-1 (default 0)")
    parser.add_argument("--device", default="auto", metavar="D",
                        help="auto, cpu or cuda[:N] (default auto: cuda when available)")
    parser.add_argument("--dtype", default="auto", metavar="T",
                        help="auto, float32, bfloat16 or float16 (auto: bfloat16 on cuda)")
    parser.add_argument("--offload", default="none", choices=OFFLOAD_MODES,
                        help="keep weights in host memory and move them to the GPU as they run: "
                        "'model' moves one whole model at a time (text encoder, transformer, "
                        "VAE; a little slower, much less GPU memory), 'sequential' one layer at "
                        "a time (least GPU memory, many times slower); needs a GPU "
                        "(default none)")
    parser.add_argument("--vae-tiling", action="store_true",
                        help="decode the video in overlapping tiles: less memory for the VAE "
                        "decode at large sizes, at some cost in time")
    parser.add_argument("--compile", action="store_true",
                        help="run the transformer through torch.compile: the first step pays "
                        "for compiling (seconds to minutes), later steps may run faster; works "
                        "on the CPU too, slowly")
    parser.add_argument("--num-videos", type=int, default=1, metavar="N",
                        help=f"videos per prompt, 1 to {MAX_VIDEOS}: one batch, so each step "
                        "costs about N times as much; written as v.mp4, v-2.mp4, … (default 1)")
    parser.add_argument("--out", metavar="FILE",
                        help="where to write the video (.mp4; default wantel-<job>.mp4)")
    parser.add_argument("--job", metavar="ID",
                        help="the job id (default: a random one); refused if the log already "
                        "has it, or if it starts with worker/ or wantel/ (the log's own streams)")
    parser.add_argument("--record-prompt", action="store_true",
                        help="store the prompt text in the log (default: only its keyed digest)")
    parser.add_argument("--json", action="store_true",
                        help="print the job's summary as JSON instead of a progress display")
    parser.add_argument("--sample-interval", type=float, default=1.0, metavar="S",
                        help="seconds between NVML GPU samples (utilisation, temperature, power, "
                        "throttling, device memory) on CUDA, from "
                        f"{MIN_SAMPLE_INTERVAL:g} to {MAX_SAMPLE_INTERVAL:g}; 0 turns sampling "
                        "off (default 1)")


def run(args: argparse.Namespace) -> int:
    """Validate, then generate while showing progress; exit 0, 1 (failed) or 130 (cancelled)."""
    request = GenerationRequest(
        model=args.model, prompt=args.prompt, image=args.image,
        negative_prompt=args.negative_prompt, frames=args.frames, height=args.height,
        width=args.width, steps=args.steps, guidance=args.guidance, seed=args.seed,
        device=args.device, dtype=args.dtype, out=args.out, job=args.job,
        record_prompt=args.record_prompt, offload=args.offload, vae_tiling=args.vae_tiling,
        compile=args.compile, num_videos=args.num_videos,
    )
    interval = args.sample_interval
    if not (interval == 0 or MIN_SAMPLE_INTERVAL <= interval <= MAX_SAMPLE_INTERVAL):
        raise UsageError(f"--sample-interval must be 0 (off) or from {MIN_SAMPLE_INTERVAL:g} "
                         f"to {MAX_SAMPLE_INTERVAL:g} seconds, got {interval}")
    log_dir = resolve_log_dir(args.log)
    try:
        prepared = prepare(request, creates=(log_dir,))
    except RequestError as exc:
        raise UsageError(str(exc)) from None
    log = LocalLog(log_dir)
    if args.job is not None and log.has_job(args.job):
        raise UsageError(
            f"job {args.job!r} is already in the log {log.path} (a second run under that id "
            "would be dropped by every view as a duplicate): pass another --job, or leave "
            "--job out for a random id")
    warn_if_too_big(prepared, log)
    warm_imports()
    start = (log.last_position() or -1) + 1
    emitter = Emitter(log, worker=resolve_worker(None, default=default_worker_name()))
    display = _Display(log, prepared.job, start, live=sys.stdout.isatty() and not args.json)
    display.start()
    if display.live:  # the job's line appears once the pipeline is loaded (its options read)
        print(f"wantel run: loading {prepared.model.name}…", file=sys.stderr)
    sampler = _gpu_sampler(emitter, prepared.job, prepared.device.type, args.sample_interval)
    status, error = "completed", None
    outputs: tuple[Path, ...] = ()
    try:
        outputs = generate(prepared, emitter).outputs
    except KeyboardInterrupt:
        status = "cancelled"
    except Exception as exc:
        status, error = "failed", f"{type(exc).__name__}: {sanitise(exc)}"
    finally:
        if sampler is not None:
            sampler.stop()
        emitter.close()
        view = display.stop()
    summary = job_summary(display.runner.engine.states, view) if view is not None else None
    if args.json:
        print(msgspec.json.encode(_summary(summary, prepared.job, str(log.path))).decode())
    elif status == "completed":
        more = f" and {len(outputs) - 1} more beside it" if len(outputs) > 1 else ""
        print(f"wantel run: job {prepared.job} completed -> {prepared.out}{more} "
              f"({_figures(summary)})")
    if status == "failed":
        print(f"wantel run: job {prepared.job} failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    if status == "cancelled":
        print(f"wantel run: job {prepared.job} cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    return 0


def warn_if_too_big(prepared: Any, log: LocalLog) -> str | None:
    """Before loading: one line on stderr when the memory model (calibrated by the log's
    history) predicts a peak beyond the device's capacity, with the offload mode that would
    fit; the line, or ``None``. Never fails the run."""
    try:
        from telemetry.eta import memory as memory_model
        from telemetry.eta.shape import JobShape, device_class, speed_options
        from telemetry.log.base import Batch
        from telemetry.projections.memory import MemoryProjection
        from wantel.commands.advise import FIT_SHARE, OFFLOAD_MODES

        device = prepared.device
        if device.type == "cuda":
            import torch

            name = torch.cuda.get_device_name(device)
            capacity = torch.cuda.get_device_properties(device).total_memory
        elif device.type == "cpu":
            name = "cpu"
            capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        else:
            return None
        request, spec = prepared.request, prepared.model.spec
        shape = JobShape(
            variant=prepared.model.variant, family=spec.family, task=spec.task,
            device=device_class(device.type, name), width=prepared.width,
            height=prepared.height, frames=prepared.frames, steps=prepared.steps,
            cfg=request.guidance > 1.0, two_experts=spec.two_experts,
            speed=speed_options({"offload": request.offload,
                                 "dtype": str(prepared.dtype).removeprefix("torch."),
                                 "vae_tiling": request.vae_tiling}),
            videos=request.num_videos)
        projection = MemoryProjection()
        state = projection.initial()
        for item in log.read():
            if isinstance(item, Batch):
                for event in item.events:
                    state = projection.apply(state, event)
        kind = memory_model.peak_kind(device.type)
        _, peak = memory_model.predict(shape, kind, state.learned)
        if peak <= capacity * FIT_SHARE:
            return None
        gib = 2**30
        fitting = [(mode, p) for mode in OFFLOAD_MODES
                   if (p := memory_model.predict(shape, kind, state.learned, offload=mode)[1])
                   <= capacity * FIT_SHARE]
        hint = (f"; --offload {fitting[0][0]} predicts {fitting[0][1] / gib:.1f} GiB"
                if fitting else "; fewer frames or a lower resolution (wantel advise)")
        line = (f"wantel run: warning: predicted peak memory {peak / gib:.1f} GiB exceeds "
                f"{FIT_SHARE:.0%} of {capacity / gib:.1f} GiB on {shape.device}{hint}")
    except Exception:  # advice must never stop a run
        return None
    print(line, file=sys.stderr)
    return line


def _gpu_sampler(emitter: Emitter, job: str, device_type: str, interval: float) -> Any:
    """NVML sampling while the job runs, on CUDA (absent NVML is reported once, never fatal)."""
    if device_type != "cuda" or interval == 0:
        return None
    from inference.nvml import GpuSampler

    return GpuSampler(emitter, interval=interval, job_of=lambda: job).start()


def _summary(summary: JobSummary | None, job: str, log: str) -> dict[str, Any]:
    """``--json``: the job's read model (:mod:`telemetry.projections.summary`), ended."""
    if summary is None:
        return {"job": job, "status": "unknown", "log": log}
    view = summary.view
    return {
        "job": job, "status": view.status, "log": log, "model": view.model,
        "variant": view.variant, "output": view.output_path, "duration_s": view.duration_s,
        "steps": view.steps_done, "total_steps": view.total_steps,
        "steps_per_second": summary.mean_steps_per_second,
        "stage_durations": summary.stage_durations,
        "peak_memory_bytes": view.peak_memory_bytes, "error_type": view.error_type,
        "error": view.error_message,
    }


def _figures(summary: JobSummary | None) -> str:
    """The completed line's figures: duration, steps and the mean steps/s."""
    if summary is None or summary.view.duration_s is None:
        return "no figures"
    mean = summary.mean_steps_per_second
    rate = f", {mean:.1f} steps/s" if mean else ""
    return f"{summary.view.duration_s:.2f}s, {summary.view.steps_done} steps{rate}"


class ProgressDisplay(Sink):
    """A runner's sink that draws one job's status line (:func:`render`) after each step.

    ``draw`` receives the line; by default a ``rich`` live display on stderr, opened at the
    first line and closed by :meth:`shutdown`.
    """

    name = "progress"

    def __init__(self, job: str, draw: Callable[[str], object] | None = None) -> None:
        self.job = job
        self.lines = 0
        self._draw = draw
        self._live: Any = None

    def on_applied(self, applied: Applied) -> None:
        """Draw the job's line, if this step changed it."""
        if not any(event.job == self.job for event in applied.events):
            return
        states = applied.engine.states
        view: JobView | None = states["jobs"].jobs.get(self.job)
        if view is None:
            return
        line = render(view, current(states["eta"], self.job))
        if self._draw is None:
            self._draw = self._rich()
        self._draw(line)
        self.lines += 1

    def _rich(self) -> Callable[[str], object]:
        from rich.console import Console
        from rich.live import Live

        self._live = Live(console=Console(stderr=True), refresh_per_second=8, transient=True)
        self._live.start()
        update: Callable[[str], object] = self._live.update
        return update

    def shutdown(self, timeout: float | None = None) -> None:
        """Close the live display (it is transient: the line disappears)."""
        if self._live is not None:
            self._live.stop()
            self._live = None


class _Display:
    """``wantel run``'s view of its job: a runner from where the job starts, drawing the
    status line on a TTY (``live``), and the job's final view once it ends."""

    def __init__(self, log: EventLog, job: str, start: int, *, live: bool,
                 draw: Callable[[str], object] | None = None) -> None:
        self.job, self.live = job, live
        engine = ProjectionEngine(default_projections())
        engine.position = start
        sinks = [ProgressDisplay(job, draw)] if live else []
        self.runner = ProjectionRunner(log, engine, sinks=sinks, poll_interval=0.05,
                                       name="wantel-progress")

    def start(self) -> None:
        """Follow the log in the runner's thread (only when the line is drawn)."""
        if self.live:
            self.runner.start()

    def view(self) -> JobView | None:
        """The job as the jobs projection has it now."""
        with self.runner.lock:
            view: JobView | None = self.runner.engine.states["jobs"].jobs.get(self.job)
        return view

    def stop(self) -> JobView | None:
        """Stop following, read to the end of the log, close the display; the final view."""
        self.runner.stop()
        self.runner.catch_up()
        self.runner.shutdown()
        return self.view()


def render(view: JobView, eta: EtaPoint | None) -> str:
    """One status line: stage, step, progress bar, steps/s, ETA with its interval, peak memory.

    Progress is the ETA model's (time-weighted by each stage's expected cost, so the VAE
    decode counts), not the bare step fraction.
    """
    total = view.total_steps or 0
    fraction = eta.progress if eta is not None else 0.0
    bar = "█" * int(fraction * 20) + "░" * (20 - int(fraction * 20))
    rate = view.steps_per_second
    parts = [f"{view.variant or view.model}", f"{view.stage or view.status:<12}",
             f"step {view.steps_done}/{total}", f"{bar} {100 * fraction:3.0f}%"]
    if rate and view.steps_done >= 2:
        parts.append(f"{rate:.1f} steps/s")
    if eta is None or eta.estimating:
        parts.append("ETA estimating")
    else:
        parts.append(f"ETA {eta.remaining_s:.1f}s ({eta.p10_s:.1f}–{eta.p90_s:.1f})")
    if view.peak_memory_bytes:
        parts.append(f"peak {view.peak_memory_bytes / 2**20:.0f} MiB")
    return "  ".join(parts)
