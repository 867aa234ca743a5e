#!/usr/bin/env python3
"""Replay throughput with every projection enabled (issue 4's goal: ≥ 500k events/s).

Builds a log of realistic job streams (JobStarted, stages, 50 steps, a memory sample every
other step, JobCompleted; 2600 jobs, ~205k events) and replays it, median of ``--rounds``:
decode only, the engine with no projection, the jobs projection alone, and every projection
``wantel serve`` runs (jobs, eta, throughput, memory, health, metrics). Prints events/s and
the goal.

    python benchmarks/replay_bench.py [--rounds 5] [--jobs 2600]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

from telemetry.engine import ProjectionEngine
from telemetry.events import (
    DeviceInfo,
    Event,
    JobCompleted,
    JobStarted,
    MemorySampled,
    StageEnded,
    StageStarted,
    StepEnded,
)
from telemetry.log.local import LocalLog
from telemetry.projections import default_projections
from telemetry.projections.jobs import JobsProjection

GOAL = 500_000


def workload(jobs: int) -> list[Event]:
    """``jobs`` interleaved-free job streams of 50 steps each (~79 events per job)."""
    device = DeviceInfo(kind="cpu", name="cpu")
    out: list[Event] = []
    for j in range(jobs):
        job, worker, base = f"job-{j}", f"w{j % 4}", j * 10**10
        events: list[Event] = [
            JobStarted(job=job, ts=base, worker=worker, model="tiny-t2v", family="wan2.1",
                       variant="tiny-t2v", task="t2v", width=64, height=64, num_frames=17,
                       steps=50, guidance_scale=5.0, cfg=True, device=device),
            StageStarted(job=job, ts=base + 1, worker=worker, stage="denoise")]
        for i in range(50):
            ts = base + (i + 1) * 10**7
            events.append(StepEnded(job=job, ts=ts, worker=worker, step=i, total_steps=50,
                                    timestep=1.0, duration_s=0.01))
            if i % 2 == 0:
                events.append(MemorySampled(job=job, ts=ts, worker=worker, device="cpu",
                                            host_peak_rss_bytes=10**8))
        events += [StageEnded(job=job, ts=base + 51 * 10**7, worker=worker, stage="denoise",
                              duration_s=0.5),
                   JobCompleted(job=job, ts=base + 52 * 10**7, worker=worker, duration_s=0.52)]
        out += [_with_seq(e, seq) for seq, e in enumerate(events)]
    return out


def _with_seq(event: Event, seq: int) -> Event:
    from msgspec.structs import force_setattr

    force_setattr(event, "seq", seq)
    return event


def rate(log: LocalLog, projections: list[Any] | None, count: int) -> float:
    """Events per second of one replay (``None``: decode only)."""
    start = time.perf_counter()
    if projections is None:
        for _ in log.read(0):
            pass
    else:
        engine = ProjectionEngine(projections)
        for item in log.read(0):
            engine.apply_items((item,))
    return count / (time.perf_counter() - start)


def main() -> None:
    """Build the log once, then time each replay ``--rounds`` times."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=2600)
    args = parser.parse_args()
    events = workload(args.jobs)
    with tempfile.TemporaryDirectory() as directory:
        log = LocalLog(directory, fsync="never")
        for k in range(0, len(events), 1000):
            log.append(events[k:k + 1000])
        cases: list[tuple[str, Any]] = [
            ("read + decode only", lambda: None),
            ("engine, no projection", lambda: []),
            ("jobs projection", lambda: [JobsProjection()]),
            ("every projection (serve's set)", default_projections),
        ]
        print(f"replay of {len(events)} events ({args.jobs} jobs × 50 steps), "
              f"median of {args.rounds} rounds")
        for label, make in cases:
            rates = [rate(log, make(), len(events)) for _ in range(args.rounds)]
            median = statistics.median(rates)
            verdict = ""
            if label.startswith("every"):
                verdict = f"   goal ≥ {GOAL // 1000}k/s  {'PASS' if median >= GOAL else 'MISS'}"
            print(f"  {label:<32} {median / 1e3:8.0f}k events/s{verdict}")


if __name__ == "__main__":
    main()
