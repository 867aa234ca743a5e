#!/usr/bin/env python3
"""Record an ETA corpus: real `wantel run` jobs of every tiny variant, sizes, frames, steps, CFG.

Each job is a separate `wantel run` process, as a user would run it, so the load stage includes
what it really costs (importing diffusers, building the model). The parameters are drawn from a
seeded generator, so the set of jobs is reproducible; their timings are what this machine did.

Nine plans:

- ``fixture`` (default): the corpus in ``tests/fixtures/eta-corpus``, 32–256 px in steps of 32,
  9–49 frames, 4–30 steps, CFG on or off.
- ``wide``: sizes, frame counts, steps and guidance the fixture never uses (48–272 px off the
  32 grid, 5–53 frames, 3–40 steps, guidance 3.5 and 6.0): a held-out corpus for generalisation.
- ``repeat``: a few shape families, each run several times, interleaved — what a service that
  gets the same requests sees; the online-learning acceptance is measured on it.
- ``strips``: thin strips (16 px beside 304–368), 57–69 frames, 41–50 steps: sizes, frames,
  steps and guidance no other plan uses (the noisy held-out corpora of the speed-shift work).
- ``blocks``: single-frame stills 384–448 px a side and long clips (73–81 frames) 384–448 px by
  32–64, 51–60 steps or 1: the third noisy held-out corpus (the ETA ablation).
- ``options``: 1–3 videos per prompt and the VAE's tiling on or off, at sizes and frames of
  their own: the options that change speed, which no other plan sets.
- ``families``: the tiny pipelines beyond Wan (CogVideoX, Stable Diffusion), alternately.
- ``priors``: a fixed grid of every Wan variant from a still to ~3,300 tokens, CFG on and off:
  the run the tiny CPU priors of ``telemetry/eta/model.py`` are fitted on
  (``python benchmarks/tiny_priors.py``); no ETA corpus is scored on it.
- ``big``: Wan's own 480P and 720P and a 512 px square, 1–17 frames, 3–8 steps: up to 9,000
  tokens and 16 megapixels, beyond every size the priors were fitted on (how they extrapolate).

``--busy N`` runs N busy-loop processes for the whole recording: a noisy neighbour.

    python scripts/record_eta_corpus.py --out tests/fixtures/eta-corpus --jobs 64
    python scripts/record_eta_corpus.py --plan wide --out /tmp/wide --jobs 40 --seed 7
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
WIDE_SIZES = (48, 80, 112, 144, 176, 208, 240, 272)
WIDE_FRAMES = (5, 21, 29, 37, 45, 53)
TI2V_SIZES = (96, 160, 224, 288)  # TI2V-5B's VAE needs multiples of 32: ones the fixture skips


def _wide_job(index: int, rng: random.Random) -> dict[str, object]:
    variant = VARIANTS[index % len(VARIANTS)]
    sizes = TI2V_SIZES if variant == "tiny-ti2v" else WIDE_SIZES
    while True:
        height, width = rng.choice(sizes), rng.choice(sizes)
        frames = rng.choice(WIDE_FRAMES)
        if height * width * frames <= MAX_PIXELS:
            break
    return {"job": f"wide-{index:03d}", "variant": variant, "height": height, "width": width,
            "frames": frames, "steps": rng.randint(3, 40),
            "guidance": rng.choice((1.0, 3.5, 6.0)), "seed": index}


STRIP_SIZES = (16, 304, 336, 368)  # sides no other plan uses (multiples of 16)
STRIP_TI2V_SIZES = (320, 352)  # multiples of 32 no other plan uses, beside 32 or 64
STRIP_FRAMES = (57, 61, 65, 69)


def strips_plan(count: int, seed: int) -> list[dict[str, object]]:
    """Sizes, frames, steps and guidance no other plan uses: thin strips (16 px beside 304–368
    px, or the like), 57–69 frames, 41–50 steps, guidance 2.5/5.5/8 — a held-out corpus
    for the speed-shift work (recorded with ``--busy 2``: tests/fixtures/eta-noisy-heldout*)."""
    rng = random.Random(seed)
    jobs = []
    for index in range(count):
        variant = VARIANTS[index % len(VARIANTS)]
        while True:
            if variant == "tiny-ti2v":
                height, width = rng.choice(STRIP_TI2V_SIZES), rng.choice((32, 64))
                if rng.random() < 0.5:
                    height, width = width, height
            else:
                height, width = rng.choice(STRIP_SIZES), rng.choice(STRIP_SIZES)
            frames = rng.choice(STRIP_FRAMES)
            if height * width * frames <= MAX_PIXELS:
                break
        steps = rng.choice((2, *range(41, 49))) if index % 7 == 3 else rng.randint(41, 50)
        jobs.append({"job": f"held2-{index:03d}", "variant": variant, "height": height,
                     "width": width, "frames": frames, "steps": steps,
                     "guidance": rng.choice((2.5, 5.5, 8.0)), "seed": 500 + index})
    return jobs


BLOCK_SIZES = (384, 400, 416, 432, 448)  # sides above every other plan's (multiples of 16)
BLOCK_TI2V_SIZES = (384, 416, 448)  # multiples of 32 above every other plan's
LONG_FRAMES = (73, 77, 81)  # clips longer than any other plan's


def blocks_plan(count: int, seed: int) -> list[dict[str, object]]:
    """Layouts no other plan uses: single-frame stills at 384–448 px a side, and long clips
    (73–81 frames) 384–448 px by 32 or 48; 51–60 steps (or 1 step, now and then); guidance
    1.0/3.0/6.5 — the third noisy held-out corpus (recorded with ``--busy 2``:
    tests/fixtures/eta-noisy-heldout3)."""
    rng = random.Random(seed)
    jobs = []
    for index in range(count):
        variant = VARIANTS[index % len(VARIANTS)]
        sizes = BLOCK_TI2V_SIZES if variant == "tiny-ti2v" else BLOCK_SIZES
        if index % 2 == 0:
            height, width, frames = rng.choice(sizes), rng.choice(sizes), 1
        else:
            height, width = rng.choice(sizes), rng.choice((32, 64) if variant == "tiny-ti2v"
                                                           else (32, 48))
            if rng.random() < 0.5:
                height, width = width, height
            frames = rng.choice(LONG_FRAMES)
        steps = 1 if index % 6 == 4 else rng.randint(51, 60)
        jobs.append({"job": f"held3-{index:03d}", "variant": variant, "height": height,
                     "width": width, "frames": frames, "steps": steps,
                     "guidance": rng.choice((1.0, 3.0, 6.5)), "seed": 900 + index})
    return jobs


OPTION_SIZES = (80, 112, 176, 208, 240)  # multiples of 16, mostly off the fixture's 32 grid
OPTION_TI2V_SIZES = (96, 128, 192)
OPTION_FRAMES = (13, 29, 45)


def options_plan(count: int, seed: int) -> list[dict[str, object]]:
    """The options that change a job's speed, which no other plan sets: 1–3 videos per
    prompt and the VAE's tiling on or off, at sizes and frames drawn apart from the others',
    6–30 steps, guidance 4.0/7.5 — a held-out corpus for the ETA's per-video scaling and the
    decode's pieces under tiling."""
    rng = random.Random(seed)
    jobs = []
    for index in range(count):
        variant = VARIANTS[index % len(VARIANTS)]
        sizes = OPTION_TI2V_SIZES if variant == "tiny-ti2v" else OPTION_SIZES
        videos = rng.choice((1, 2, 3))
        while True:
            height, width = rng.choice(sizes), rng.choice(sizes)
            frames = rng.choice(OPTION_FRAMES)
            if height * width * frames * videos <= MAX_PIXELS:
                break
        jobs.append({"job": f"opts-{index:03d}", "variant": variant, "height": height,
                     "width": width, "frames": frames, "steps": rng.randint(6, 30),
                     "guidance": rng.choice((4.0, 7.5)), "seed": 1300 + index,
                     "videos": videos, "tiling": rng.random() < 0.5})
    return jobs


FAMILY_SIZES = (64, 80, 96, 112, 128)
FAMILY_FRAMES = (9, 13, 17)  # CogVideoX's VAE compresses time by 4: 4k+1 frames


def families_plan(count: int, seed: int) -> list[dict[str, object]]:
    """The tiny pipelines beyond Wan, alternately: CogVideoX's text-to-video (9–17 frames) and
    Stable Diffusion's text-to-image (one frame, saved as an image), 64–128 px, 6–24 steps —
    the families whose ETA starts from a neutral prior."""
    rng = random.Random(seed)
    jobs = []
    for index in range(count):
        variant = ("tiny-cogvideox", "tiny-sd")[index % 2]
        frames = 1 if variant == "tiny-sd" else rng.choice(FAMILY_FRAMES)
        jobs.append({"job": f"fam-{index:03d}", "variant": variant,
                     "height": rng.choice(FAMILY_SIZES), "width": rng.choice(FAMILY_SIZES),
                     "frames": frames, "steps": rng.randint(6, 24),
                     "guidance": rng.choice((1.0, 6.0)), "seed": 1700 + index})
    return jobs


#: Wan's own resolutions (480P and 720P, both orientations, and a square between), which no
#: other plan reaches: 3,000–9,000 tokens, 2–9 megapixels, beyond what the priors were fitted
#: on (≤ 3,300 tokens, ≤ 3.2 megapixels). TI2V's VAE compresses 16× (sides of 32).
BIG_SIZES = ((480, 832), (832, 480), (512, 512), (720, 1280), (1280, 720))
BIG_TI2V_SIZES = ((480, 832), (832, 480), (512, 512), (704, 1280), (1280, 704))  # Wan's own
BIG_FRAMES = (1, 5, 9, 13, 17)
MAX_BIG_TOKENS = 9_000  # a pass of the tiny transformer at 9,000 tokens: ~0.35 s on one thread


def big_plan(count: int, seed: int) -> list[dict[str, object]]:
    """Jobs at Wan's own resolutions, few frames, 3–8 steps: how the tiny priors extrapolate
    beyond the sizes they were fitted on, as a user who tries a real resolution sees it."""
    rng = random.Random(seed)
    jobs = []
    for index in range(count):
        variant = VARIANTS[index % len(VARIANTS)]
        ti2v = variant == "tiny-ti2v"
        spatial = 16 if ti2v else 8  # the VAE's spatial compression
        while True:
            height, width = rng.choice(BIG_TI2V_SIZES if ti2v else BIG_SIZES)
            frames = rng.choice(BIG_FRAMES)
            tokens = (height // spatial // 2) * (width // spatial // 2) * ((frames - 1) // 4 + 1)
            if tokens <= MAX_BIG_TOKENS:
                break
        jobs.append({"job": f"big-{index:03d}", "variant": variant, "height": height,
                     "width": width, "frames": frames, "steps": rng.randint(3, 8),
                     "guidance": rng.choice((1.0, 5.0)), "seed": 1900 + index})
    return jobs


#: (height, width, frames) of the priors grid: a still, then from ~30 to ~3,300 tokens and from
#: 0.02 to 3.2 megapixels, so every component's terms (tokens², pixels) are measured.
PRIOR_GRID = ((64, 64, 1), (64, 96, 9), (128, 128, 17), (160, 224, 25), (224, 256, 33),
              (256, 256, 49))
PRIOR_TI2V_GRID = ((64, 64, 1), (64, 96, 9), (128, 128, 17), (160, 224, 25), (224, 256, 33),
                   (288, 288, 49))


def priors_plan(count: int, seed: int) -> list[dict[str, object]]:
    """Every Wan variant over :data:`PRIOR_GRID`, 8 steps, CFG on and off in turn (``count``
    and ``seed`` only cut and seed it): what the tiny CPU priors are fitted on, in one run, so
    their phases are measured at one machine speed."""
    jobs = []
    for index in range(count):
        variant = VARIANTS[index % len(VARIANTS)]
        grid = PRIOR_TI2V_GRID if variant == "tiny-ti2v" else PRIOR_GRID
        height, width, frames = grid[(index // len(VARIANTS)) % len(grid)]
        jobs.append({"job": f"prior-{index:03d}", "variant": variant, "height": height,
                     "width": width, "frames": frames, "steps": 8,
                     "guidance": (1.0, 5.0)[(index // len(VARIANTS) + index) % 2],
                     "seed": seed + index})
    return jobs


def repeat_plan(count: int, seed: int) -> list[dict[str, object]]:
    """Six shape families drawn like ``wide``, run round-robin until ``count`` jobs."""
    rng = random.Random(seed)
    families = [_wide_job(index, rng) for index in range(6)]
    jobs = []
    for index in range(count):
        family = families[index % len(families)]
        jobs.append({**family, "job": f"repeat-{index:03d}-f{index % len(families)}",
                     "seed": index})
    return jobs


def wide_plan(count: int, seed: int) -> list[dict[str, object]]:
    """Jobs at sizes, frames, steps and guidance the fixture corpus does not use."""
    rng = random.Random(seed)
    return [_wide_job(index, rng) for index in range(count)]


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
    parser.add_argument("--plan", choices=sorted(PLANS), default="fixture",
                        help="which jobs to run (default fixture)")
    parser.add_argument("--busy", type=int, default=0,
                        help="busy-loop processes to run alongside: a noisy neighbour")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    wantel = [sys.executable, "-m", "wantel"]
    neighbours = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                  for _ in range(args.busy)]
    try:
        return _record(PLANS[args.plan](args.jobs, args.seed), wantel, out)
    finally:
        for neighbour in neighbours:
            neighbour.kill()


def _record(jobs: list[dict[str, object]], wantel: list[str], out: Path) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        image = Path(scratch) / "condition.png"
        Image.new("RGB", (64, 64), (120, 80, 200)).save(image)
        for spec in jobs:
            command = [*wantel, "run", "--model", str(spec["variant"]), "--prompt",
                       f"corpus prompt {spec['seed']}", "--height", str(spec["height"]),
                       "--width", str(spec["width"]), "--frames", str(spec["frames"]),
                       "--steps", str(spec["steps"]), "--guidance", str(spec["guidance"]),
                       "--seed", str(spec["seed"]), "--job", str(spec["job"]),
                       "--log", str(out), "--json", "--out",
                       str(Path(scratch) / ("image.png" if spec["variant"] == "tiny-sd"
                                            else "video.mp4"))]
            if str(spec["variant"]) in ("tiny-i2v", "tiny-i2v-a14b"):
                command += ["--image", str(image)]
            if int(str(spec.get("videos", 1))) > 1:
                command += ["--num-videos", str(spec["videos"])]
            if spec.get("tiling"):
                command += ["--vae-tiling"]
            result = subprocess.run(command, capture_output=True, text=True, check=False,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
            print(result.stdout.strip()[:160] or result.stderr.strip()[-300:], flush=True)
            if result.returncode != 0:
                return result.returncode
    return 0


PLANS = {"fixture": plan, "wide": wide_plan, "repeat": repeat_plan, "strips": strips_plan,
         "blocks": blocks_plan, "options": options_plan, "families": families_plan,
         "priors": priors_plan, "big": big_plan}

if __name__ == "__main__":
    sys.exit(main())
