"""``wantel demo``: a series of tiny jobs of every Wan layout, recorded in the log, summarised.

It needs no GPU and no download: every model is a tiny random-weight pipeline built in memory.
(The live server joins the demo when the exporters land; until then the demo ends with the
same summary ``wantel replay`` prints.)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from PIL import Image

from inference.runner import GenerationRequest, generate, prepare
from inference.tiny_models import TINY_VARIANTS, variant_spec
from telemetry.commands.replay import print_table, replay
from telemetry.config import resolve_log_dir
from telemetry.emitter import Emitter
from telemetry.log.local import LocalLog

PROMPTS = ("a paper boat drifting down a rainy street", "a fox running through fresh snow",
           "timelapse of clouds over a mountain lake")


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of ``wantel demo``."""
    parser.add_argument("--rounds", type=int, default=1, metavar="N",
                        help="how many times to run every variant (default 1)")
    parser.add_argument("--out-dir", metavar="DIR",
                        help="where to keep the videos (default: a temporary directory)")


def run(args: argparse.Namespace) -> int:
    """Run every tiny variant ``--rounds`` times, then print the per-job summary."""
    if args.rounds < 1:
        from telemetry.cli import UsageError

        raise UsageError(f"--rounds must be at least 1, got {args.rounds}")
    log = LocalLog(resolve_log_dir(args.log))
    with tempfile.TemporaryDirectory(prefix="wantel-demo-") as scratch:
        out_dir = Path(args.out_dir or scratch)
        out_dir.mkdir(parents=True, exist_ok=True)
        image = out_dir / "condition.png"
        _gradient().save(image)
        with Emitter(log) as emitter:
            for round_index in range(args.rounds):
                for k, variant in enumerate(TINY_VARIANTS):
                    spec = variant_spec(variant)
                    size = 64 if spec.spatial_multiple == 32 else 48
                    request = GenerationRequest(
                        model=variant, prompt=PROMPTS[(round_index + k) % len(PROMPTS)],
                        image=str(image) if spec.needs_image else None,
                        frames=9 + 4 * (round_index % 3), height=size, width=size,
                        steps=6 + 2 * (k % 3), guidance=1.0 if k % 4 == 3 else 5.0,
                        seed=round_index * 10 + k,
                        out=str(out_dir / f"{variant}-{round_index}.mp4"),
                    )
                    outcome = generate(prepare(request), emitter)
                    print(f"wantel demo: {variant:<14} job {outcome.job} -> {outcome.output}")
    engine = replay(log.read())
    print()
    print_table(list(engine.states["jobs"].jobs.values()), engine)
    print(f"\nThe log is in {log.path}/. Look at it with: wantel replay --log {log.path}"
          f"   or   wantel cat --log {log.path}")
    return 0


def _gradient() -> Image.Image:
    """A small conditioning image for the image-to-video variants."""
    image = Image.new("RGB", (64, 64))
    image.putdata([(x * 4, y * 4, 128) for y in range(64) for x in range(64)])
    return image
