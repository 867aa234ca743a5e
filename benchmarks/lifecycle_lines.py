#!/usr/bin/env python3
"""What one lifecycle log line costs ``wantel serve``: lines per second through
:class:`~exporters.logs.LifecycleLogger`, as the runner hands it a burst.

::

    python benchmarks/lifecycle_lines.py                          # this checkout, ~20 s
    python benchmarks/lifecycle_lines.py --code /path/to/other    # beside another checkout

Each job is what a Wan 2.2 A14B job logs: ``JobQueued``, ``JobStarted``, seven stages started
and ended, an expert switch in the denoise stage, ``JobCompleted`` (20 events, 11 lines; the
steps and samples between are left out: the sink skips them by type before anything else).
The jobs go through :meth:`~exporters.logs.LifecycleLogger.on_applied` as live steps of
``--batch`` events, with logging configured as ``wantel serve`` configures it
(:func:`wantel.logs.configure_logging`: JSON lines, here to ``/dev/null``), a fresh sink a
round. Cases:

``info``
    every line written (the default level): µs a line, all of it — the ids, the timestamp,
    structlog's processors, the JSON encoding and the write.
``warning``
    ``configure_logging(level="warning")``: the info lines are dropped by the logger, and
    what it costs to track the jobs and decide so is what is left (µs per dropped line).

Every round runs in a fresh child process importing ``telemetry``/``exporters``/``wantel``
from the checkout measured (``--code``, default: this one; with two, the rounds alternate so
drift on a shared machine hits both alike). Medians of ``--rounds``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

HERE: Final = Path(__file__).resolve().parents[1]
if TYPE_CHECKING:
    from telemetry.events import Stage

STAGES: Final[tuple[Stage, ...]] = ("load", "text_encode", "latent_init", "denoise", "decode",
                                    "postprocess", "save")


def child(jobs: int, batch: int, level: str) -> dict[str, Any]:
    """In the child: time the sink over ``jobs`` jobs; seconds and lines."""
    from exporters.logs import LifecycleLogger
    from telemetry.engine import ProjectionEngine
    from telemetry.events import (
        DeviceInfo,
        Event,
        ExpertSwitched,
        JobCompleted,
        JobQueued,
        JobStarted,
        StageEnded,
        StageStarted,
    )
    from telemetry.runner import Applied
    from wantel.logs import configure_logging

    device = DeviceInfo(kind="cuda", name="NVIDIA H100", index=0)
    events: list[Event] = []
    for n in range(jobs):
        job, worker, ts = f"job-{n}", f"w{n % 4}", 1_800_000_000 * 10**9 + n * 10**10
        one: list[Event] = [
            JobQueued(job=job, seq=0, ts=ts, model="wan2.2-t2v-a14b", task="t2v"),
            JobStarted(job=job, seq=1, ts=ts + 10**8, worker=worker, model="wan2.2-t2v-a14b",
                       family="wan2.2", variant="t2v-a14b", task="t2v", width=1280,
                       height=720, num_frames=81, steps=40, guidance_scale=5.0, cfg=True,
                       device=device)]
        for i, stage in enumerate(STAGES):
            at = ts + (i + 2) * 10**9
            one.append(StageStarted(job=job, seq=len(one), ts=at, worker=worker, stage=stage))
            if stage == "denoise":
                one.append(ExpertSwitched(job=job, seq=len(one), ts=at + 5 * 10**8,
                                          worker=worker, step=20, from_expert="high_noise",
                                          to_expert="low_noise"))
            one.append(StageEnded(job=job, seq=len(one), ts=at + 9 * 10**8 + 123_456,
                                  worker=worker, stage=stage, duration_s=0.9))
        one.append(JobCompleted(job=job, seq=len(one), ts=ts + 9_876_543_210, worker=worker,
                                duration_s=9.77, frames=81, bytes=10**6))
        events += one
    with open(os.devnull, "w") as null:
        configure_logging(json=True, level=level, stream=null, stdlib=False)
        sink = LifecycleLogger()
        engine = ProjectionEngine([])
        steps = [Applied(events[i:i + batch], i + batch, live=True, engine=engine)
                 for i in range(0, len(events), batch)]
        began = time.perf_counter()
        for applied in steps:
            sink.on_applied(applied)
        took = time.perf_counter() - began
    lines = sum(1 for e in events if not isinstance(e, StageStarted))
    return {"seconds": took, "lines": lines, "written": sink.lines, "errors": sink.errors}


def run_child(code: str, jobs: int, batch: int, level: str) -> dict[str, Any]:
    """One round in a fresh process importing from ``code``."""
    program = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
               f"repr(f).lower()]; sys.path[:0] = [{code!r}, {str(HERE / 'benchmarks')!r}]; "
               "import json, lifecycle_lines as b; "
               f"print(json.dumps(b.child({jobs}, {batch}, {level!r})))")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"the round with {code} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    """Alternate rounds between the checkouts, print µs a line and lines/s, and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", action="append", default=[],
                        help="a checkout to measure (repeatable; default: this one); with "
                             "two, the second is the baseline the ratio is against")
    parser.add_argument("--jobs", type=int, default=20_000,
                        help="jobs a round (default 20000: 220000 lines)")
    parser.add_argument("--batch", type=int, default=1000,
                        help="events a runner step (default 1000)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    codes = args.code or [str(HERE)]
    print(f"LifecycleLogger, {args.jobs:,} jobs of 11 lines, steps of {args.batch} events, "
          f"JSON to /dev/null; median of {args.rounds} rounds, each a fresh process")
    for level in ("info", "warning"):
        per_line: dict[str, list[float]] = {code: [] for code in codes}
        for _ in range(args.rounds):
            for code in codes:
                got = run_child(code, args.jobs, args.batch, level)
                if got["errors"]:
                    raise SystemExit(f"{code}: {got['errors']} lines failed")
                per_line[code].append(got["seconds"] / got["lines"])
        for code in codes:
            us = statistics.median(per_line[code]) * 1e6
            note = ""
            if len(codes) > 1 and code != codes[-1]:
                base = statistics.median(per_line[codes[-1]]) * 1e6
                note = f"  ({base / us:.2f}x the last)"
            print(f"  level {level:<8} {code:<40} {us:6.2f} µs a line "
                  f"{1 / us:7.3f}M lines/s{note}")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
