#!/usr/bin/env python3
"""Record the ETA corpus: real `wantel run` jobs of every tiny variant, sizes, frames, steps, CFG.

Each job is a separate `wantel run` process, as a user would run it, so the load stage includes
what it really costs (importing diffusers, building the model). The parameters are drawn from a
seeded generator, so the set of jobs is reproducible; their timings are what this machine did.

    python scripts/record_eta_corpus.py --out tests/fixtures/eta-corpus --jobs 64
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

VARIANTS = ("tiny-t2v", "tiny-i2v", "tiny-ti2v", "tiny-t2v-a14b", "tiny-i2v-a14b")
SIZES = (32, 64, 96, 128, 160, 192, 224, 256)
FRAMES = (9, 13, 17, 25, 33, 41, 49)
MAX_PIXELS = 256 * 256 * 49  # the biggest jobs take several seconds on one CPU thread


def plan(count: int, seed: int) -> list[dict[str, object]]:
    """The jobs to run: every variant equally often, shapes and CFG drawn at random."""
    rng = random.Random(seed)
    jobs = []
    for index in range(count):
        variant = VARIANTS[index % len(VARIANTS)]
        while True:
            height, width = rng.choice(SIZES), rng.choice(SIZES)
            frames = rng.choice(FRAMES)
            if height * width * frames <= MAX_PIXELS:
                break
        jobs.append({
            "job": f"corpus-{index:03d}", "variant": variant, "height": height, "width": width,
            "frames": frames, "steps": rng.randint(4, 30),
            "guidance": rng.choice((1.0, 5.0)), "seed": index,
        })
    return jobs


def main() -> int:
    """Run the plan into ``--out`` (replacing it)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="tests/fixtures/eta-corpus", help="the log directory")
    parser.add_argument("--jobs", type=int, default=64, help="how many jobs (default 64)")
    parser.add_argument("--seed", type=int, default=2026, help="seed of the plan")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    wantel = [sys.executable, "-m", "wantel"]
    with tempfile.TemporaryDirectory() as scratch:
        image = Path(scratch) / "condition.png"
        Image.new("RGB", (64, 64), (120, 80, 200)).save(image)
        for spec in plan(args.jobs, args.seed):
            command = [*wantel, "run", "--model", str(spec["variant"]), "--prompt",
                       f"corpus prompt {spec['seed']}", "--height", str(spec["height"]),
                       "--width", str(spec["width"]), "--frames", str(spec["frames"]),
                       "--steps", str(spec["steps"]), "--guidance", str(spec["guidance"]),
                       "--seed", str(spec["seed"]), "--job", str(spec["job"]),
                       "--log", str(out), "--out", str(Path(scratch) / "video.mp4"), "--json"]
            if str(spec["variant"]) in ("tiny-i2v", "tiny-i2v-a14b"):
                command += ["--image", str(image)]
            result = subprocess.run(command, capture_output=True, text=True, check=False,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
            print(result.stdout.strip()[:160] or result.stderr.strip()[-300:], flush=True)
            if result.returncode != 0:
                return result.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
