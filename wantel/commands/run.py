"""``wantel run``: generate a video with a tiny offline Wan model or a local diffusers model.

The display is itself a projection of the log: a :class:`~telemetry.runner.ProjectionRunner`
follows the events this job appends and folds them with the same projections that
``wantel replay`` and the server use, and its sink shows them, so what the terminal shows is
exactly what every other view will show: on a terminal, :class:`ProgressDisplay` (a
``rich.progress`` bar); without one (a container log, ``> file``), :class:`ProgressLines`
(one structured line every ``--progress-interval`` seconds and at each stage change).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import msgspec

from inference.models import warm_imports
from inference.queueing import MAX_QUEUE_NAME, queue_name_problem, queued
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
from telemetry.events import StageStarted
from telemetry.guidance import describe_failure
from telemetry.log.base import EventLog
from telemetry.log.local import LocalLog
from telemetry.projections import default_projections
from telemetry.projections.eta import EtaPoint, current
from telemetry.projections.jobs import JobView
from telemetry.projections.summary import JobSummary, job_summary
from telemetry.runner import Applied, ProjectionRunner, Sink
from telemetry.ship import DRAIN_S, BackgroundShipper
from wantel.commands.common import add_nats_flags, nats_options
from wantel.config import resolve_log_dir, resolve_nats, resolve_worker

EXIT_FAILED = 1
EXIT_CANCELLED = 130
#: ``--sample-interval``: 0 (off), else between these (seconds).
MIN_SAMPLE_INTERVAL = 0.01
MAX_SAMPLE_INTERVAL = 3600.0


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of ``wantel run``."""
    parser.description = (
        "Generate a video (or, with an image model, an image) and record every stage of the "
        f"job in the event log. Models: {', '.join(TINY_VARIANTS)} (tiny random weights, "
        "built offline in a fraction of a second: Wan layouts, a CogVideoX video model and a "
        "Stable Diffusion image model), or the path of a local diffusers model directory "
        "(Wan, or any pipeline with a denoising transformer or UNet, labelled with its own "
        "family and task). Ctrl-C or SIGTERM cancels the job at once (exit 130) and stops the "
        "worker cleanly (WorkerStopped: a scale-down, never a lost worker)."
    )
    parser.add_argument("--model", required=True, metavar="M",
                        help="a tiny variant or a local diffusers model directory")
    parser.add_argument("--prompt", required=True, metavar="P",
                        help="the text prompt (stored only as a digest keyed with the log's "
                        "secret key, unless --record-prompt)")
    parser.add_argument("--negative-prompt", metavar="P", help="the negative prompt")
    parser.add_argument("--image", metavar="IMG",
                        help="the conditioning image: required by i2v models; optional for "
                        "ti2v (its image mode: the video starts from the image)")
    parser.add_argument("--frames", type=int, metavar="F",
                        help=f"frames, 4k+1, at most {MAX_FRAMES} (default: 17 tiny, 81 "
                        "otherwise; 1 for an image model)")
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
                        help="where to write the video (.mp4; default wantel-<job>.mp4) or an "
                        "image model's image (.png; default wantel-<job>.png)")
    parser.add_argument("--job", metavar="ID",
                        help="the job id (default: a random one); refused if the log already "
                        "has it, or if it starts with worker/ or wantel/ (the log's own streams)")
    parser.add_argument("--queue", metavar="NAME",
                        help="record that the job was queued in NAME (JobQueued, before "
                        "loading), so its wait, its place and the queue's depth show in every "
                        f"view; at most {MAX_QUEUE_NAME} printable characters")
    parser.add_argument("--priority", type=int, metavar="N",
                        help="the job's priority in --queue: higher starts first, equal ones "
                        "in arrival order (default 0)")
    parser.add_argument("--record-prompt", action="store_true",
                        help="store the prompt text in the log (default: only its keyed digest)")
    parser.add_argument("--json", action="store_true",
                        help="print the job's summary as JSON instead of a progress display")
    parser.add_argument("--progress-interval", type=float, default=10.0, metavar="S",
                        help="without a terminal (a container log, `> file`), print one "
                        "progress line every S seconds and at each stage change "
                        "(default 10)")
    parser.add_argument("--sample-interval", type=float, default=1.0, metavar="S",
                        help="seconds between NVML GPU samples (utilisation, temperature, power, "
                        "throttling, device memory) on CUDA, from "
                        f"{MIN_SAMPLE_INTERVAL:g} to {MAX_SAMPLE_INTERVAL:g}; 0 turns sampling "
                        "off (default 1)")
    add_nats_flags(parser, what=(
        "also ship this run's events to the fleet's NATS JetStream stream (comma-separated "
        "servers) while it runs: a background thread follows the local log, which stays the "
        "source of truth; the generation never waits for the broker. At the end it ships for "
        f"up to {DRAIN_S:g} s more, then leaves the rest to `wantel ship` (one warning line "
        "says so)"))


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
    every = args.progress_interval
    if not (math.isfinite(every) and every > 0):
        raise UsageError(f"--progress-interval must be a number of seconds above 0, got {every}")
    if args.priority is not None and args.queue is None:
        raise UsageError("--priority needs --queue NAME (the queue the priority is in)")
    if args.queue is not None and (problem := queue_name_problem(args.queue)) is not None:
        raise UsageError(f"--queue {args.queue!r}: {problem}")
    log_dir = resolve_log_dir(args.log)
    ship_to = (nats_options(args, reconnect=True)
               if resolve_nats(getattr(args, "nats", None)) is not None else None)
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
    warm_imports(prepared.model.spec.pipeline_class)
    start = (log.last_position() or -1) + 1
    emitter = Emitter(log, worker=resolve_worker(None, default=default_worker_name()))
    if args.queue is not None:  # before loading: the wait is what comes before JobStarted
        queued(emitter, prepared.job, model=prepared.model.name,
               task=prepared.model.spec.task, queue=args.queue, priority=args.priority or 0,
               request={"width": prepared.width, "height": prepared.height,
                        "frames": prepared.frames, "steps": prepared.steps})
    shipping = (BackgroundShipper.to_nats(log, log.path, ship_to, worker=emitter.worker).start()
                if ship_to is not None else None)
    interactive = sys.stderr.isatty() and sys.stdout.isatty() and not args.json
    sink: Sink = (ProgressDisplay(prepared.job) if interactive else ProgressLines(
        prepared.job, interval=every, stream=sys.stderr if args.json else sys.stdout))
    display = _Display(log, prepared.job, start, live=interactive, sink=sink)
    display.start()
    if display.live:  # the job's line appears once the pipeline is loaded (its options read)
        print(f"wantel run: loading {prepared.model.name}…", file=sys.stderr)
    sampler = _gpu_sampler(emitter, prepared.job, prepared.device.type, args.sample_interval)
    status, error = "completed", None
    outputs: tuple[Path, ...] = ()

    def interrupt(signum: int, frame: FrameType | None) -> None:
        # SIGTERM (a scale-down, docker stop) stops like Ctrl-C: the job is cancelled at its
        # next step, the emitter's close says WorkerStopped, and shipping drains.
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()  # signals go there
    previous = signal.signal(signal.SIGTERM, interrupt) if main_thread else None
    try:
        outputs = generate(prepared, emitter).outputs
    except KeyboardInterrupt:
        status = "cancelled"
    except Exception as exc:
        status, error = "failed", f"{type(exc).__name__}: {sanitise(exc)}"
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        if sampler is not None:
            sampler.stop()
        emitter.close()
        view = display.stop()
        if shipping is not None:  # after close(): its WorkerStopped is shipped too
            report = shipping.stop(DRAIN_S)
            if report.unshipped:
                reason = f" ({report.error})" if report.error else ""
                print(f"wantel run: warning: {report.unshipped} event(s) not shipped to "
                      f"{report.target}{reason}; they wait in {log.path}/: wantel ship --log "
                      f"{log.path} --nats {report.url} --once ships them", file=sys.stderr)
    summary = job_summary(display.runner.engine.states, view) if view is not None else None
    if args.json:
        print(msgspec.json.encode(_summary(summary, prepared.job, str(log.path))).decode())
    elif status == "completed":
        more = f" and {len(outputs) - 1} more beside it" if len(outputs) > 1 else ""
        print(f"wantel run: job {prepared.job} completed -> {prepared.out}{more} "
              f"({_figures(summary)})")
    if status == "failed":
        ended = summary.view if summary is not None else None
        if ended is not None and ended.status == "failed":
            # What the log recorded: the category and suggestions every view shows.
            error = describe_failure(ended.error_type, ended.error_message,
                                     ended.failure_category, ended.suggestions)
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
        "error": view.error_message, "category": view.failure_category,
        "suggestions": list(view.suggestions),
    }


def _figures(summary: JobSummary | None) -> str:
    """The completed line's figures: duration, steps and the mean steps/s."""
    if summary is None or summary.view.duration_s is None:
        return "no figures"
    rate = format_rate(summary.mean_steps_per_second)
    seconds = summary.view.duration_s
    took = f"{seconds:.2f}s" if seconds < 60 else format_hms(seconds)
    return (f"{took}, {summary.view.steps_done} steps"
            + (f", {rate}" if rate else ""))


def format_rate(steps_per_second: float | None) -> str | None:
    """Denoising speed as it reads best (tqdm's rule): ``2.50 it/s`` at a step a second or
    faster, ``37.4 s/it`` when slower (``0.0 steps/s`` said nothing at 14B speeds)."""
    if steps_per_second is None or not math.isfinite(steps_per_second) or steps_per_second <= 0:
        return None
    if steps_per_second >= 1:
        return f"{steps_per_second:.2f} it/s"
    per_step = 1 / steps_per_second
    return f"{per_step:.2f} s/it" if per_step < 10 else f"{per_step:.1f} s/it"


def format_hms(seconds: float | None) -> str:
    """``h:mm:ss`` (``0:00:07``, ``1:02:03``), as tqdm and ``time`` print durations."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def format_bytes(count: int | None) -> str | None:
    """``315 MiB``, ``12.4 GiB``."""
    if not count:
        return None
    if count >= 2**30:
        return f"{count / 2**30:.1f} GiB"
    return f"{count / 2**20:.0f} MiB"


@dataclass(frozen=True)
class Reading:
    """One moment of the job as ``wantel run`` shows it (both displays read it)."""

    job: str
    model: str
    status: str
    stage: str | None
    step: int
    total_steps: int
    fraction: float  # 0…1, never lower than an earlier reading's
    rate: str | None
    eta: EtaPoint | None
    #: The ETA counted down to now: remaining seconds, p10, p90 (``EtaPoint.aged``).
    left: tuple[float, float, float] | None
    peak: str | None

    @property
    def where(self) -> str:
        """The stage, or the status once the job is in none."""
        return self.stage or self.status

    def eta_text(self) -> str:
        """``ETA 0:01:23 (0:01:10–0:01:40)`` or ``ETA estimating``."""
        eta = self.eta
        if eta is None or eta.estimating or self.left is None:
            return "ETA estimating" if self.status in ("running", "queued") else ""
        remaining, low, high = self.left
        return f"ETA {format_hms(remaining)} ({format_hms(low)}–{format_hms(high)})"

    def line(self) -> str:
        """The structured line a log without a terminal gets (logfmt: ``key=value``)."""
        fields = {"job": self.job, "model": self.model, "status": self.status,
                  "stage": self.stage or "-", "step": f"{self.step}/{self.total_steps}",
                  "progress": f"{100 * self.fraction:.0f}%"}
        if self.rate:
            fields["rate"] = self.rate.replace(" ", "")
        eta = self.eta
        if self.status == "running":
            if eta is None or eta.estimating or self.left is None:
                fields["eta"] = "estimating"
            else:
                remaining, low, high = self.left
                fields["eta"] = format_hms(remaining)
                fields["eta_p10"] = format_hms(low)
                fields["eta_p90"] = format_hms(high)
        if self.peak:
            fields["peak"] = self.peak.replace(" ", "")
        return "wantel run: " + " ".join(f"{k}={_logfmt(v)}" for k, v in fields.items())


def _logfmt(value: str) -> str:
    return value if value and not any(c in value for c in ' "=') else msgspec.json.encode(
        value).decode()


class _JobReader(Sink):
    """What both displays share: the job's reading after each step that touched it, with a
    percentage that never goes down (the ETA projection's progress never does; the floor
    holds it across anything else too) and the ETA counted down between events."""

    def __init__(self, job: str, clock: Callable[[], int] = time.time_ns) -> None:
        self.job = job
        self.fraction = 0.0
        self.lines = 0
        self._clock = clock
        self._view: JobView | None = None
        self._eta: EtaPoint | None = None

    def on_applied(self, applied: Applied) -> None:
        """Read the job again, if this step touched it; then :meth:`show`."""
        if not any(event.job == self.job for event in applied.events):
            return
        states = applied.engine.states
        view: JobView | None = states["jobs"].jobs.get(self.job)
        if view is None:
            return
        self._view, self._eta = view, current(states["eta"], self.job)
        self.show(self.reading(), ticked=False)

    def on_tick(self) -> None:
        """The log was idle: show the ETA counting down."""
        if self._view is not None:
            self.show(self.reading(), ticked=True)

    def reading(self) -> Reading:
        """The job now."""
        view, eta = self._view, self._eta
        assert view is not None
        done = view.status == "completed"
        fraction = 1.0 if done else eta.progress if eta is not None else 0.0
        self.fraction = max(self.fraction, min(1.0, fraction))
        left = None
        if eta is not None and not eta.estimating and view.status == "running":
            left = eta.aged(max(0, self._clock() - eta.ts) / 1e9)
        rate = view.steps_per_second if view.steps_done >= 2 else None
        return Reading(job=self.job, model=view.variant or view.model or "?",
                       status=view.status, stage=view.stage, step=view.steps_done,
                       total_steps=view.total_steps or 0, fraction=self.fraction,
                       rate=format_rate(rate), eta=eta if view.status == "running" else None,
                       left=left, peak=format_bytes(view.peak_memory_bytes))

    def show(self, reading: Reading, *, ticked: bool) -> None:
        """Draw ``reading``."""


class ProgressDisplay(_JobReader):
    """``wantel run``'s display on a terminal: a ``rich.progress`` bar with one monotone
    percentage, the stage, the step, s/it or it/s, the ETA as h:mm:ss with its p10–p90
    interval, and the peak memory. ``console``: where to draw (default: stderr; tests pass a
    recording console). The bar is redrawn after each step and, through the runner's idle
    ticks, every second while a long stage sends nothing.
    """

    name = "progress"
    tick_interval: float | None = 1.0

    def __init__(self, job: str, console: Any = None,
                 clock: Callable[[], int] = time.time_ns) -> None:
        super().__init__(job, clock)
        self._console = console
        self._progress: Any = None
        self._task: Any = None
        #: Every percentage drawn, in order (whole numbers, as shown).
        self.drawn: list[int] = []

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        console = self._console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]{task.fields[model]}[/] {task.fields[where]:<12}"),
            BarColumn(bar_width=24),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[detail]}"),
            console=console, auto_refresh=False, transient=self._console is None)
        self._progress.start()
        self._task = self._progress.add_task("job", total=1000, model="", where="",
                                             detail="")

    def show(self, reading: Reading, *, ticked: bool) -> None:
        """Redraw the bar."""
        if self._progress is None:
            self._start()
        detail = [f"step {reading.step}/{reading.total_steps}"]
        if reading.rate:
            detail.append(reading.rate)
        eta = reading.eta_text()
        if eta:
            detail.append(eta)
        if reading.peak:
            detail.append(f"peak {reading.peak}")
        self._progress.update(self._task, completed=round(1000 * reading.fraction),
                              model=reading.model, where=reading.where,
                              detail="  ".join(detail))
        self._progress.refresh()
        self.drawn.append(int(f"{100 * reading.fraction:.0f}"))
        self.lines += 1

    def shutdown(self, timeout: float | None = None) -> None:
        """Close the display (on a terminal it is transient: the final line replaces it)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class ProgressLines(_JobReader):
    """``wantel run``'s display without a terminal: one structured line (:meth:`Reading.line`)
    at each stage or status change and at least every ``interval`` seconds while the job runs,
    so a container log is never silent for long."""

    name = "progress"

    def __init__(self, job: str, *, interval: float = 10.0, stream: TextIO | None = None,
                 clock: Callable[[], int] = time.time_ns,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        super().__init__(job, clock)
        self.interval = interval
        self.tick_interval = min(1.0, interval)
        self._stream = stream
        self._monotonic = monotonic
        self._last_at: float | None = None
        self._last_where: tuple[str, str | None] | None = None
        self._started: list[str] = []

    def on_applied(self, applied: Applied) -> None:
        """As :class:`_JobReader`, with a line for each stage the step started, even one that
        also ended within it (a fast stage's events come in one flush)."""
        self._started = [event.stage for event in applied.events
                         if isinstance(event, StageStarted) and event.job == self.job]
        super().on_applied(applied)

    def show(self, reading: Reading, *, ticked: bool) -> None:
        """Print a line if the stage changed or ``interval`` passed since the last one."""
        started, self._started = self._started, []
        for stage in started:
            if stage != reading.stage:  # begun and over within the step
                self._print(replace(reading, stage=stage, status="running"), force=True)
        self._print(reading, ticked=ticked)

    def _print(self, reading: Reading, *, ticked: bool = False, force: bool = False) -> None:
        now = self._monotonic()
        where = (reading.status, reading.stage)
        due = self._last_at is None or now - self._last_at >= self.interval
        if where == self._last_where and not due and not force:
            return
        if ticked and reading.status not in ("running", "queued"):
            return
        self._last_at, self._last_where = now, where
        stream = self._stream or sys.stdout
        print(reading.line(), file=stream, flush=True)
        self.lines += 1


class _Display:
    """``wantel run``'s view of its job: a runner from where the job starts, with ``sink``
    (:class:`ProgressDisplay` on a terminal, else :class:`ProgressLines`: on stdout, or on
    stderr with ``--json``), and the job's final view once it ends."""

    def __init__(self, log: EventLog, job: str, start: int, *, live: bool,
                 sink: Sink | None = None) -> None:
        self.job, self.live = job, live
        engine = ProjectionEngine(default_projections())
        engine.position = start
        self.sink = sink
        self.runner = ProjectionRunner(log, engine, sinks=[sink] if sink is not None else [],
                                       poll_interval=0.05, name="wantel-progress")

    def start(self) -> None:
        """Follow the log in the runner's thread (when there is a display)."""
        if self.sink is not None:
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
