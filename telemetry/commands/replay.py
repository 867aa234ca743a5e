"""``wantel replay``: rebuild every projection from the log and summarise each job."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import msgspec

from telemetry.commands.common import open_log_for_reading, warn_quarantined
from telemetry.engine import ProjectionEngine
from telemetry.log.base import Quarantined
from telemetry.projections import default_projections
from telemetry.projections.eta import EtaState
from telemetry.projections.jobs import JobsState, JobView
from telemetry.projections.memory import MemoryState
from telemetry.projections.throughput import ThroughputState


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of ``wantel replay``."""
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document: per job status, stages, steps, steps/s, "
                        "peak memory by kind, progress, ETA history and residuals")
    parser.add_argument("--job", help="only this job")


def replay(log_items: Any) -> ProjectionEngine:
    """An engine with every projection, folded over ``log_items``."""
    engine = ProjectionEngine(default_projections())
    for item in log_items:
        if isinstance(item, Quarantined):
            warn_quarantined("replay", item)
        engine.apply_items((item,))
    return engine


def run(args: argparse.Namespace) -> int:
    """Fold the whole log, then print a table (or JSON)."""
    engine = replay(open_log_for_reading(args).read(0))
    jobs_state: JobsState = engine.states["jobs"]
    jobs = [v for v in jobs_state.jobs.values() if args.job is None or v.job == args.job]
    if args.json:
        document = {
            "jobs": [job_summary(v, engine) for v in jobs],
            "health": {**msgspec.to_builtins(engine.health),
                       "dropped": engine.states["health"].dropped()},
            "position": engine.position,
        }
        sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(document)) + b"\n")
    else:
        print_table(jobs, engine)
    return 0


def job_summary(view: JobView, engine: ProjectionEngine) -> dict[str, Any]:
    """A job as builtins, with what every projection knows of it."""
    summary: dict[str, Any] = msgspec.to_builtins(view)
    summary["steps_per_second"] = view.steps_per_second
    summary["stage_durations"] = view.stage_durations()
    eta: EtaState = engine.states["eta"]
    memory: MemoryState = engine.states["memory"]
    throughput: ThroughputState = engine.states["throughput"]
    running = eta.running.get(view.job)
    finished = eta.finished.get(view.job)
    if running is not None and running.issued:
        latest = running.issued[-1]
        summary["progress"] = latest.progress
        summary["eta"] = msgspec.to_builtins(latest)
        summary["eta_history"] = [msgspec.to_builtins(p) for p in running.issued]
    elif finished is not None:
        summary["progress"] = 1.0
        summary["eta_history"] = [msgspec.to_builtins(p) for p in finished.history]
        summary["eta_residuals"] = finished.residuals
        summary["eta_before_start_error"] = finished.before_start_error
    job_memory = memory.running.get(view.job) or memory.finished.get(view.job)
    summary["peak_memory_bytes_by_kind"] = dict(job_memory.peaks) if job_memory else {}
    rate = throughput.jobs.get(view.job)
    summary["steps_per_second_smoothed"] = rate.ema if rate else None
    return summary


def print_table(jobs: list[JobView], engine: ProjectionEngine) -> None:
    """One line per job, then a footer with totals and telemetry health."""
    eta: EtaState = engine.states["eta"]
    print(f"{'JOB':<24} {'STATUS':<10} {'MODEL':<16} {'STEPS':>7} {'TIME':>8} "
          f"{'STEP/S':>7} {'ETA ERR@25-50%':>15}  STAGES")
    for v in jobs:
        steps = f"{v.steps_done}/{v.total_steps or '?'}"
        duration = f"{v.duration_s:.2f}s" if v.duration_s is not None else "-"
        rate = f"{v.steps_per_second:.1f}" if v.steps_per_second else "-"
        finished = eta.finished.get(v.job)
        error = finished.residuals.get("25-50") if finished else None
        error_text = f"{100 * error:+.1f}%" if error is not None else "-"
        stages = " ".join(f"{k}={d:.3f}s" for k, d in v.stage_durations().items())
        print(f"{v.job:<24} {v.status:<10} {(v.variant or v.model or '?'):<16} "
              f"{steps:>7} {duration:>8} {rate:>7} {error_text:>15}  {stages}")
    by_status: dict[str, int] = {}
    for v in jobs:
        by_status[v.status] = by_status.get(v.status, 0) + 1
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(by_status.items())) or "none"
    health = engine.health
    print(f"{len(jobs)} job(s) ({statuses}); {sum(health.events_by_type.values())} events; "
          f"{health.duplicates} duplicate(s); {health.quarantined_records} quarantined record(s)")
