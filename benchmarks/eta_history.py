#!/usr/bin/env python3
"""What online calibration costs as the history grows: the ETA projection's time per job after
1,000 completed jobs and after 100,000 (issue 15: "cost of calibration flat as the history
grows").

Every completed job teaches the ETA (``telemetry.eta.online``): a device level, a line per
component, a statistic per exact shape (a bounded table), the interval's offsets. Their cost
per job must not grow with the number of jobs learned from. This replays ``--jobs`` jobs of
``--shapes`` distinct shapes (sizes, frame counts, step counts and variants cycling, so the
per-shape table fills up to its bound) through the ETA projection alone, each job its start,
three stages, its steps and its end, with durations drawn around a cost model (seeded), and
times each window of ``--window`` jobs (CPU time). It prints the µs a job in the five windows
after the 1,000th completed job and in the last five (medians), their ratio, and how big the
learned tables are along the way; with ``--set``, the whole of ``wantel serve``'s projections
instead of the ETA's alone.

    python benchmarks/eta_history.py [--jobs 100000] [--shapes 20000] [--window 1000]
                                     [--keep-finished N] [--set]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Iterator
from typing import Any

from msgspec.structs import force_setattr

from telemetry.engine import ProjectionEngine
from telemetry.events import (
    DeviceInfo,
    Event,
    JobCompleted,
    JobStarted,
    StageEnded,
    StageStarted,
    StepEnded,
)
from telemetry.log.base import Batch
from telemetry.projections import default_projections
from telemetry.projections.eta import EtaProjection

VARIANTS = ("tiny-t2v", "tiny-i2v", "tiny-ti2v", "tiny-t2v-a14b")


def shapes(count: int) -> list[dict[str, Any]]:
    """``count`` distinct job shapes: sizes, frames, steps and variants in a grid."""
    out = []
    for i in range(count):
        variant = VARIANTS[i % len(VARIANTS)]
        out.append({
            "variant": variant, "task": variant.split("-")[1], "family":
            "wan2.2" if variant.endswith(("ti2v", "a14b")) else "wan2.1",
            "width": 32 + 16 * (i % 64), "height": 32 + 16 * (i // 64 % 32),
            "frames": 1 + 4 * (i // 2048 % 12), "steps": 4 + i * 7 % 13})
    return out


def job_events(number: int, shape: dict[str, Any], worker: str, start: int,
               rng: random.Random) -> list[Event]:
    """One job: start, text encode, its steps, decode, end; durations around a cost model."""
    job, scale = f"job-{number}", rng.lognormvariate(0.0, 0.2)
    tokens = shape["width"] * shape["height"] * (shape["frames"] // 4 + 1) / 256
    step_s = scale * (0.004 + tokens * 2e-5)
    events: list[Event] = [JobStarted(
        job=job, ts=start, worker=worker, model=shape["variant"], family=shape["family"],
        variant=shape["variant"], task=shape["task"], width=shape["width"],
        height=shape["height"], num_frames=shape["frames"], steps=shape["steps"],
        guidance_scale=5.0, cfg=True, boundary_ratio=0.875 if "a14b" in shape["variant"]
        else None, device=DeviceInfo(kind="cpu", name="cpu"))]
    ts = start
    for stage, planned in (("text_encode", 0.05 * scale), ("denoise", None),
                           ("decode", step_s * 3)):
        events.append(StageStarted(job=job, ts=ts, worker=worker, stage=stage))
        began = ts
        if planned is None:
            for step in range(shape["steps"]):
                took = step_s * rng.lognormvariate(0.0, 0.05) * (3.0 if step == 0 else 1.0)
                ts += int(took * 1e9)
                events.append(StepEnded(job=job, ts=ts, worker=worker, step=step,
                                        total_steps=shape["steps"], timestep=1.0,
                                        duration_s=took))
        else:
            ts += int(planned * 1e9)
        events.append(StageEnded(job=job, ts=ts, worker=worker, stage=stage,
                                 duration_s=(ts - began) / 1e9))
    events.append(JobCompleted(job=job, ts=ts + 1000, worker=worker,
                               duration_s=(ts + 1000 - start) / 1e9))
    return events


def stream(jobs: int, count: int, seed: int) -> Iterator[list[Event]]:
    """The jobs one after another on four workers, each job's events a batch."""
    rng, table = random.Random(seed), shapes(count)
    ts = 10**18
    for number in range(jobs):
        events = job_events(number, table[number % count], f"w{number % 4}", ts, rng)
        ts = events[-1].ts + 10**6
        yield events


def main() -> None:
    """Replay, timing each window of jobs; print the first window after 1,000 and the last."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--shapes", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep-finished", type=int, default=None,
                        help="finished jobs the ETA projection keeps (default: as wantel serve, "
                        "10,000; the table fills over the first jobs, which costs some µs a "
                        "job of its own)")
    parser.add_argument("--set", action="store_true",
                        help="every projection wantel serve runs, not the ETA's alone")
    args = parser.parse_args()
    projections = default_projections() if args.set else [EtaProjection()]
    if args.keep_finished is not None:
        projections = [EtaProjection(keep_finished=args.keep_finished) if p.name == "eta"
                       else p for p in projections]
    engine = ProjectionEngine(projections)
    position, windows, sizes = 0, [], []
    spent, events_in = 0.0, 0
    for number, events in enumerate(stream(args.jobs, args.shapes, args.seed), 1):
        for seq, event in enumerate(events):  # a job's events in order, for de-duplication
            force_setattr(event, "seq", seq)
        batch = Batch(first=position, events=events)
        position += len(events)
        started = time.process_time()
        engine.apply_batch(batch)
        spent += time.process_time() - started
        events_in += len(events)
        if number % args.window == 0:
            learned = engine.states["eta"].learned
            windows.append((number, spent / args.window * 1e6, events_in))
            sizes.append((number, len(learned.families), len(learned.components),
                          len(learned.levels), len(learned.error)))
            spent, events_in = 0.0, 0
    what = "every projection" if args.set else "the ETA projection"
    print(f"{what}, {args.jobs:,} jobs of {args.shapes:,} shapes, CPU µs a job by windows "
          f"of {args.window:,} jobs ({windows[-1][2] / args.window:.0f} events a job)")
    every = max(len(windows) // 10, 1)
    for index, (number, per_job, _events) in enumerate(windows):
        if index % every == every - 1 or index == 1:
            _, families, components, levels, _errors = sizes[index]
            print(f"  jobs {number - args.window + 1:>7,}–{number:<7,} {per_job:7.1f} µs a job"
                  f"   learned: {families:,} shape statistics, {components:,} component "
                  f"lines, {levels} device levels")
    # Five windows from the 1,000th completed job on, against the last five.
    early = [w for w in windows if w[0] > 1000][:5] or windows[:1]
    late = windows[-5:]
    early_us = statistics.median(w[1] for w in early)
    late_us = statistics.median(w[1] for w in late)
    print(f"  jobs {early[0][0] - args.window + 1:,}–{early[-1][0]:,}: {early_us:.1f} µs a job; "
          f"jobs {late[0][0] - args.window + 1:,}–{late[-1][0]:,}: {late_us:.1f} (medians of "
          f"{len(early)} and {len(late)} windows): {late_us / early_us:.2f}× (goal: flat, ~1.0×)")


if __name__ == "__main__":
    main()
