"""``wantel compare``: models, variants, configurations, workers or devices side by side.

From the log's history: per group, the jobs that started, the p50/p90 duration of those that
completed, denoising steps per second, seconds per generated frame, the median peak memory, the
median |error| of the ETA issued before each job started, and the failure rate (with the
failures' categories where the log records one, else their error types).
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from telemetry.errors import UsageError
from telemetry.eta.jobs import JobRecord, job_records
from telemetry.eta.shape import JobShape
from telemetry.events import JobFailed
from telemetry.log.base import Batch, LogNotFound
from telemetry.projections.eta import EtaProjection
from telemetry.projections.memory import MemoryProjection
from telemetry.projections.readings import MEMORY_KINDS
from wantel.commands.common import open_local_for_reading

DIMENSIONS: Final = ("model", "variant", "config", "worker", "device")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of ``wantel compare``."""
    parser.description = (
        "Compare the log's jobs side by side, grouped by model, variant, configuration "
        "(variant, size, frames, steps, CFG and speed options), worker or device: jobs, "
        "p50/p90 duration, steps/s, seconds per frame, peak memory, ETA error (before start) "
        "and failure rate. The Grafana 'Compare' dashboard shows the same figures from "
        "Prometheus over a window. See docs/advise.md.")
    parser.add_argument("--by", choices=DIMENSIONS, default="model",
                        help="what to group by (default model)")
    parser.add_argument("--since", metavar="DURATION",
                        help="only jobs started in the last DURATION (90s, 30m, 12h, 7d, 2w)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")


def parse_duration(text: str) -> float:
    """``30m`` → 1800.0 seconds; a UsageError for anything else."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smhdw])\s*", text.lower())
    if match is None or not float(match.group(1)) > 0:
        raise UsageError(f"--since: not a duration: {text!r} (e.g. 90s, 30m, 12h, 7d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class _Group:
    jobs: int = 0
    failed: int = 0
    durations: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    per_frame: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    eta_errors: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)


def _key(record: JobRecord, by: str) -> str:
    started = record.started
    if by == "model":
        return started.model
    if by == "variant":
        return started.variant
    if by == "worker":
        return started.worker or "unknown"
    if by == "device":
        return JobShape.of(started).device
    shape = JobShape.of(started)
    cfg = "cfg" if shape.cfg else "no-cfg"
    options = f" {shape.speed}" if shape.speed else ""
    return (f"{shape.variant} {shape.width}x{shape.height} {shape.frames}f {shape.steps}st "
            f"{cfg}{options}")


def _quantile(values: list[float], q: float) -> float | None:
    """The median for 0.5, else the nearest-rank quantile; ``None`` for no values."""
    if not values:
        return None
    if q == 0.5:
        return statistics.median(values)
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def compare(events: list[Any], by: str, since_ns: int | None = None) -> list[dict[str, Any]]:
    """One row per group, most jobs first."""
    eta_projection, memory_projection = EtaProjection(), MemoryProjection()
    eta, mem = eta_projection.initial(), memory_projection.initial()
    for event in events:
        eta = eta_projection.apply(eta, event)
        mem = memory_projection.apply(mem, event)
    groups: dict[str, _Group] = {}
    for record in job_records(events):
        if since_ns is not None and record.started.ts < since_ns:
            continue
        group = groups.setdefault(_key(record, by), _Group())
        group.jobs += 1
        failed = next((e for e in record.events if isinstance(e, JobFailed)), None)
        if failed is not None:
            group.failed += 1
            reason = str(getattr(failed, "category", None) or failed.error_type or "unknown")
            group.failures[reason] = group.failures.get(reason, 0) + 1
        memory = mem.finished.get(record.job)
        if memory is not None:
            kind = memory.predicted_kind
            peak = memory.peaks.get(kind) if kind else None
            if peak is None:
                peak = next((memory.peaks[k] for k in MEMORY_KINDS if k in memory.peaks), None)
            if peak:
                group.peaks.append(peak)
        if not record.completed:
            continue
        duration = record.duration_s
        group.durations.append(duration)
        frames = record.started.num_frames
        if frames > 0:
            group.per_frame.append(duration / frames)
        stepped = sum(record.step_durations)
        if stepped > 0:
            group.rates.append(len(record.step_durations) / stepped)
        finished = eta.finished.get(record.job)
        if finished is not None and finished.before_start_error is not None:
            group.eta_errors.append(abs(finished.before_start_error))
    rows = []
    for name, group in sorted(groups.items(), key=lambda kv: (-kv[1].jobs, kv[0])):
        rows.append({
            by: name, "jobs": group.jobs, "completed": len(group.durations),
            "p50_duration_s": _quantile(group.durations, 0.5),
            "p90_duration_s": _quantile(group.durations, 0.9),
            "steps_per_second": _quantile(group.rates, 0.5),
            "seconds_per_frame": _quantile(group.per_frame, 0.5),
            "peak_memory_bytes": _quantile([float(p) for p in group.peaks], 0.5),
            "eta_error": _quantile(group.eta_errors, 0.5),
            "failure_rate": group.failed / group.jobs, "failures": dict(group.failures),
        })
    return rows


def _cell(value: Any, fmt: Callable[[Any], str]) -> str:
    return "-" if value is None else fmt(value)


def render(rows: list[dict[str, Any]], by: str) -> str:
    """The rows as an aligned table."""
    header = [by, "jobs", "p50 s", "p90 s", "steps/s", "s/frame", "peak MiB", "ETA err",
              "failed"]
    table = [header]
    for row in rows:
        failures = ", ".join(f"{k} {v}" for k, v in sorted(row["failures"].items()))
        table.append([
            str(row[by]), str(row["jobs"]),
            _cell(row["p50_duration_s"], lambda v: f"{v:.2f}"),
            _cell(row["p90_duration_s"], lambda v: f"{v:.2f}"),
            _cell(row["steps_per_second"], lambda v: f"{v:.1f}"),
            _cell(row["seconds_per_frame"], lambda v: f"{v:.3f}"),
            _cell(row["peak_memory_bytes"], lambda v: f"{v / 2**20:.0f}"),
            _cell(row["eta_error"], lambda v: f"{100 * v:.1f}%"),
            f"{100 * row['failure_rate']:.0f}%" + (f" ({failures})" if failures else ""),
        ])
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                     for r in table)


def run(args: argparse.Namespace) -> int:
    """Print the comparison; bad input is one line and exit 2."""
    since_ns = None
    if args.since is not None:
        since_ns = time.time_ns() - int(parse_duration(args.since) * 1e9)
    try:
        log = open_local_for_reading(args)
    except LogNotFound as exc:
        raise UsageError(str(exc)) from None
    events = [e for item in log.read() if isinstance(item, Batch) for e in item.events]
    rows = compare(events, args.by, since_ns)
    if not rows:
        window = f" started in the last {args.since}" if args.since else ""
        raise UsageError(f"the log {log.path} has no jobs{window} to compare; run a job first "
                         "(wantel run …) or widen --since")
    if args.json:
        print(msgspec.json.encode(rows).decode())
    else:
        print(render(rows, args.by))
    return 0
