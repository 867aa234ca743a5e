"""What diffusers' ``export_to_video`` costs on this machine, and a process's first export.

The save stage writes each video with diffusers' ``export_to_video`` (imageio's ffmpeg
writer: a subprocess per video, then an encode per frame). Its cost is a constant (the
process's start, the container) plus a term per output pixel. This times it at sizes
spanning tiny models' outputs, on random pixels (the worst case for the encoder), and prints
the least-squares line, seconds = a + b × Mpx, each size beside the ``save`` prior of
``telemetry.eta.model`` for a warm worker and the ratio of the two. The prior itself is
measured on ``wantel run``'s own saves (``benchmarks/tiny_priors.py``), whose videos compress
better: expect ratios above 1 at the larger sizes. The process's first video is timed apart:
what it costs more is ``FIRST_EXPORT_S``.

    python benchmarks/save_cost.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

#: (frames, height, width): stills to short clips, 64 px to 480p-wide.
SIZES = ((1, 64, 64), (5, 64, 96), (17, 128, 128), (33, 96, 160), (49, 192, 192),
         (81, 128, 224), (49, 256, 320), (81, 240, 416))


def time_save(frames: int, height: int, width: int, directory: Path, repeats: int) -> float:
    """The median seconds of writing one video of that size (random pixels: no easy
    compression, as a random-weight model's output)."""
    from diffusers.utils.export_utils import export_to_video

    rng = np.random.default_rng(0)
    video = list(rng.random((frames, height, width, 3), dtype=np.float32))
    seconds = []
    for repeat in range(repeats):
        start = time.perf_counter()
        export_to_video(video, str(directory / f"v{repeat}.mp4"), fps=16)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    """Time every size, then print the fitted line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from telemetry.eta.model import FIRST_EXPORT_S, prior_coefficients
    from telemetry.eta.shape import JobShape
    from telemetry.events import DeviceInfo, JobStarted

    def prior(frames: int, height: int, width: int) -> float:
        shape = JobShape.of(JobStarted(
            job="j", seq=0, ts=0, model="tiny-t2v", family="wan2.1", variant="tiny-t2v",
            task="t2v", width=width, height=height, num_frames=frames, steps=1,
            guidance_scale=1.0, cfg=False, device=DeviceInfo(kind="cpu", name="cpu")))
        a, b = prior_coefficients("save", shape)
        return a + b * shape.pixels / 1e6

    points: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as directory:
        first = time_save(1, 16, 16, Path(directory), 1)  # imports and the first spawn
        again = time_save(1, 16, 16, Path(directory), args.repeats)
        print(f"a process's first video: {first * 1e3:.1f} ms, the next {again * 1e3:.1f} ms: "
              f"+{(first - again) * 1e3:.0f} ms (prior: FIRST_EXPORT_S = "
              f"{FIRST_EXPORT_S * 1e3:.0f} ms)")
        for frames, height, width in SIZES:
            mpx = frames * height * width / 1e6
            seconds = time_save(frames, height, width, Path(directory), args.repeats)
            points.append((mpx, seconds))
            expected = prior(frames, height, width)
            print(f"{frames:3d} × {height}×{width}: {mpx:6.3f} Mpx  {seconds * 1e3:7.1f} ms"
                  f"  prior {expected * 1e3:7.1f} ms  measured ÷ prior {seconds / expected:.2f}")
    slope, intercept = np.polyfit([p[0] for p in points], [p[1] for p in points], 1)
    print(f"save ≈ {intercept:.3f} s + {slope:.3f} s/Mpx (a warm worker's)")


if __name__ == "__main__":
    main()
