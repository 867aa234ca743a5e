"""What a tiny Wan transformer's pass costs on this CPU, by tokens: the prior of its step.

Runs the tiny T2V pipeline without guidance (one pass a step) at sizes from 36 to ~2,000
tokens, times its steps after the first (``callback_on_step_end``), and prints each size's
median beside the ETA's prior for it (``telemetry.eta.model``'s CPU priors) and the ratio, then
the least-squares fit seconds = a + b·t + c·t² (t: tokens ÷ 1000), none negative. Run it as the
corpora are recorded, one thread: ``OMP_NUM_THREADS=1 python benchmarks/step_cost.py``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from typing import Any

import numpy as np

#: (frames, height, width): 36 to ~2,000 tokens ((F−1)/4+1 latent frames × H/16 × W/16).
SIZES = ((1, 96, 96), (9, 112, 80), (13, 160, 160), (21, 176, 160), (29, 208, 176),
         (29, 240, 240), (41, 240, 208), (45, 240, 240))


def step_seconds(pipe: Any, frames: int, height: int, width: int, steps: int) -> float:
    """The median of a run's steps after the first, in seconds."""
    import torch

    marks: list[float] = []

    def mark(pipeline: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        marks.append(time.perf_counter())
        return kwargs

    start = time.perf_counter()
    pipe(prompt="step cost", height=height, width=width, num_frames=frames,
         num_inference_steps=steps, guidance_scale=1.0, output_type="latent",
         generator=torch.Generator().manual_seed(0), callback_on_step_end=mark)
    ends = [start, *marks]
    durations = [b - a for a, b in itertools.pairwise(ends)]
    return statistics.median(durations[1:])


def main() -> None:
    """Time every size, print each beside the prior, then the fitted curve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    from inference.tiny_models import build_tiny_pipeline
    from telemetry.eta.model import STEP, prior_coefficients
    from telemetry.eta.shape import JobShape
    from telemetry.events import DeviceInfo, JobStarted

    pipe = build_tiny_pipeline("tiny-t2v")
    points: list[tuple[float, float]] = []
    step_seconds(pipe, 5, 32, 32, 3)  # the first call's one-time costs: not counted
    for frames, height, width in SIZES:
        shape = JobShape.of(JobStarted(
            job="j", seq=0, ts=0, model="tiny-t2v", family="wan2.1", variant="tiny-t2v",
            task="t2v", width=width, height=height, num_frames=frames, steps=args.steps,
            guidance_scale=1.0, cfg=False, device=DeviceInfo(kind="cpu", name="cpu")))
        t = shape.tokens / 1e3
        a, b, c = prior_coefficients(STEP, shape)
        prior = a + b * t + c * t * t
        seconds = step_seconds(pipe, frames, height, width, args.steps)
        points.append((t, seconds))
        print(f"{frames:3d} × {height}×{width}: {shape.tokens:5d} tokens  {seconds * 1e3:7.2f} ms"
              f"  prior {prior * 1e3:6.2f} ms  measured ÷ prior {seconds / prior:.2f}")
    ts = np.array([p[0] for p in points])
    ys = np.array([p[1] for p in points])
    design = np.stack([np.ones_like(ts), ts, ts * ts], axis=1)
    kept = [0, 1, 2]
    while True:
        fitted, *_ = np.linalg.lstsq(design[:, kept], ys, rcond=None)
        negative = [k for k, value in zip(kept, fitted, strict=True) if value < 0]
        if not negative or len(kept) == 1:
            break
        kept.remove(negative[0])
    coefficients = dict.fromkeys((0, 1, 2), 0.0) | dict(zip(kept, fitted, strict=True))
    print(f"a pass ≈ {coefficients[0] * 1e3:.2f} ms + {coefficients[1] * 1e3:.2f} ms·t"
          f" + {coefficients[2] * 1e3:.2f} ms·t² (t: thousands of tokens)")


if __name__ == "__main__":
    main()
