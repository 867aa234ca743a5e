"""``wantel demo``: ``wantel serve`` plus a stream of tiny jobs of every Wan layout.

It needs no GPU and no download: every model is a tiny random-weight pipeline built in memory.
The server is the same machinery as ``wantel serve`` (in-process uvicorn on a thread), so the
live page, ``/metrics`` and the WebSocket show the jobs as they run. Jobs vary by variant, size,
frame count, step count and CFG, so every dashboard panel gets data; each takes about a second
on a CPU. It runs until Ctrl-C (the job in flight is recorded as cancelled), or for ``--jobs N``.
"""

from __future__ import annotations

import argparse
import itertools
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Final

from telemetry.errors import UsageError

if TYPE_CHECKING:
    from wantel.serving import Serving

PROMPTS: Final = ("a paper boat drifting down a rainy street", "a fox running through fresh snow",
                  "timelapse of clouds over a mountain lake", "a lighthouse in a storm at night")
#: (size, frames, steps, guidance): cycled against the variants so sizes, lengths and CFG mix.
SHAPES: Final = ((64, 17, 12, 5.0), (96, 13, 10, 1.0), (64, 13, 16, 4.0), (96, 17, 8, 6.0),
                 (64, 9, 20, 1.0), (96, 9, 14, 5.0), (64, 17, 10, 3.5))


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of ``wantel demo``: those of ``wantel serve`` plus how many jobs to run."""
    from wantel.commands import serve

    serve.configure_serving(parser)
    parser.add_argument("--jobs", type=int, default=0, metavar="N",
                        help="stop after N jobs (default: run until Ctrl-C)")
    parser.add_argument("--out-dir", metavar="DIR",
                        help="where to keep the videos (default: a temporary directory)")


def plan(count: int = 0) -> Iterator[tuple[int, str, int, int, int, float]]:
    """``(index, variant, size, frames, steps, guidance)`` for each job; endless if ``count`` 0.

    Every tiny variant in turn (Wan's, then CogVideoX and Stable Diffusion); the shape moves
    one further each round of variants, so every variant meets every shape, with CFG on and
    off. An image model (``tiny-sd``) makes one frame.
    """
    from inference.tiny_models import TINY_VARIANTS, variant_spec

    indices = itertools.count() if count == 0 else iter(range(count))
    for index in indices:
        variant = TINY_VARIANTS[index % len(TINY_VARIANTS)]
        size, frames, steps, guidance = SHAPES[(index + index // len(TINY_VARIANTS))
                                               % len(SHAPES)]
        spec = variant_spec(variant)
        if spec.spatial_multiple == 32:
            size = 64  # TI2V-5B's VAE needs multiples of 32
        if not spec.video:
            frames = 1
        yield index, variant, size, frames, steps, guidance


def run(args: argparse.Namespace) -> int:
    """Serve, then run jobs until Ctrl-C or ``--jobs``; the URL is printed before anything."""
    if args.jobs < 0:
        raise UsageError(f"--jobs must be 0 (until Ctrl-C) or more, got {args.jobs}")
    from wantel import serving as serve

    serving = serve.open_serving(args)

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # SIGTERM stops like Ctrl-C: the job in flight is cancelled

    previous = signal.signal(signal.SIGTERM, interrupt)
    serving.start()
    try:
        serve.print_banner(serving, "demo")
        print("wantel demo: loading the tiny models (first job takes a few seconds); "
              "Ctrl-C stops", flush=True)
        done = _run_jobs(serving, args)
    except KeyboardInterrupt:
        done = -1
    finally:
        serving.stop()
        signal.signal(signal.SIGTERM, previous)
    path = serving.location.rstrip("/")  # demo serves its own local log, never the fleet's
    print(f"\nwantel demo: {'stopped' if done < 0 else f'{done} job(s) done'}. The log is in "
          f"{path}/: wantel replay --log {path}   or   wantel serve --log {path}")
    return 0


def _run_jobs(serving: Serving, args: argparse.Namespace) -> int:
    """Generate the planned jobs into the served log; returns how many ran."""
    from inference.runner import GenerationRequest, generate, prepare
    from inference.tiny_models import variant_spec
    from telemetry.emitter import Emitter

    done = 0
    with tempfile.TemporaryDirectory(prefix="wantel-demo-") as scratch, \
            Emitter(serving.log) as emitter:
        out_dir = Path(args.out_dir or scratch)
        out_dir.mkdir(parents=True, exist_ok=True)
        image = out_dir / "condition.png"
        _gradient(image)
        for index, variant, size, frames, steps, guidance in plan(args.jobs):
            request = GenerationRequest(
                model=variant, prompt=PROMPTS[index % len(PROMPTS)],
                image=str(image) if variant_spec(variant).needs_image else None,
                frames=frames, height=size, width=size, steps=steps, guidance=guidance,
                seed=index, out=str(out_dir / f"demo-{index % 10}"
                                         f"{'.mp4' if variant_spec(variant).video else '.png'}"),
            )
            began = time.monotonic()
            outcome = generate(prepare(request), emitter)
            took = time.monotonic() - began
            done += 1
            cfg = "cfg" if guidance > 1.0 else "no-cfg"
            print(f"wantel demo: job {outcome.job} {variant:<14} {size}x{size}x{frames} "
                  f"{steps:>2} steps {cfg:<6} {outcome.status} in {took:.1f} s", flush=True)
    return done


def _gradient(path: Path) -> None:
    """A small conditioning image for the image-to-video variants."""
    from PIL import Image

    image = Image.new("RGB", (64, 64))
    image.putdata([(x * 4, y * 4, 128) for y in range(64) for x in range(64)])
    image.save(path)
