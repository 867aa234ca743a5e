"""``wantel replay``: rebuild every projection from the log and summarise each job."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import msgspec

from telemetry.commands.common import open_log_for_reading, warn_quarantined
from telemetry.engine import ProjectionEngine
from telemetry.log.base import Quarantined
from telemetry.projections.jobs import JobsProjection, JobsState, JobView


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of ``wantel replay``."""
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--job", help="only this job")


def run(args: argparse.Namespace) -> int:
    """Fold the whole log, then print a table (or JSON)."""
    log = open_log_for_reading(args)
    engine = ProjectionEngine([JobsProjection()])
    for item in log.read(0):
        if isinstance(item, Quarantined):
            warn_quarantined("replay", item)
        engine.apply_items((item,))
    jobs_state: JobsState = engine.states["jobs"]
    jobs = [v for v in jobs_state.jobs.values() if args.job is None or v.job == args.job]
    if args.json:
        document = {
            "jobs": [job_summary(v) for v in jobs],
            "health": msgspec.to_builtins(engine.health),
            "position": engine.position,
        }
        sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(document)) + b"\n")
    else:
        print_table(jobs, engine)
    return 0


def job_summary(view: JobView) -> dict[str, Any]:
    """A job as builtins, with derived figures (steps/s, stage durations)."""
    summary: dict[str, Any] = msgspec.to_builtins(view)
    summary["steps_per_second"] = view.steps_per_second
    summary["stage_durations"] = view.stage_durations()
    return summary


def print_table(jobs: list[JobView], engine: ProjectionEngine) -> None:
    """One line per job, then a footer with totals and telemetry health."""
    print(f"{'JOB':<24} {'STATUS':<10} {'MODEL':<16} {'STEPS':>7} {'TIME':>8} "
          f"{'STEP/S':>7}  STAGES")
    for v in jobs:
        steps = f"{v.steps_done}/{v.total_steps or '?'}"
        duration = f"{v.duration_s:.2f}s" if v.duration_s is not None else "-"
        rate = f"{v.steps_per_second:.1f}" if v.steps_per_second else "-"
        stages = " ".join(f"{k}={d:.3f}s" for k, d in v.stage_durations().items())
        print(f"{v.job:<24} {v.status:<10} {(v.variant or v.model or '?'):<16} "
              f"{steps:>7} {duration:>8} {rate:>7}  {stages}")
    by_status: dict[str, int] = {}
    for v in jobs:
        by_status[v.status] = by_status.get(v.status, 0) + 1
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(by_status.items())) or "none"
    health = engine.health
    print(f"{len(jobs)} job(s) ({statuses}); {sum(health.events_by_type.values())} events; "
          f"{health.duplicates} duplicate(s); {health.quarantined_records} quarantined record(s)")
