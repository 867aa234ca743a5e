"""``wantel replay``: rebuild every projection from the log and summarise each job.

The summaries stream: a job's row (or JSON object) is written once its summary is final, and
the job is then forgotten, so replaying a log of any size takes the same memory.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO, Final

import msgspec

from telemetry.engine import ProjectionEngine
from telemetry.log.base import Batch, Quarantined, ReadItem
from telemetry.projections import Projection, default_projections
from telemetry.projections.base import oldest_first
from telemetry.projections.eta import EtaState
from telemetry.projections.jobs import JobsState, JobView
from telemetry.projections.summary import job_summary as read_summary
from wantel.commands.common import add_nats_flags, open_log_for_reading, warn_quarantined

#: Ended jobs held back before their summary is printed and they are forgotten: a late event
#: of a job (one that arrives after its end) still lands in its summary, and memory stays flat
#: however many jobs the log holds.
RETAIN_ENDED: Final = 1_000
#: Events folded between two retirements (a larger batch is folded in slices of this size), so
#: no step ends more jobs than the ETA and memory projections keep (KEEP_FINISHED, 10,000).
SLICE: Final = 4_096


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of ``wantel replay``."""
    parser.description = (
        "Rebuild every projection from the log and print a summary per job: a table, or with "
        "--json one JSON document. Jobs are listed in the order they ended, then the jobs "
        "that never did; each is printed once its summary is final and then forgotten, so a "
        "log of any size replays in the same memory.")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document: per job status, stages, steps, steps/s, "
                        "peak memory by kind, progress, ETA history and residuals")
    parser.add_argument("--job", help="only this job")
    add_nats_flags(parser, reading=True)


def replay_projections() -> list[Projection[Any]]:
    """Every projection, keeping no more ended jobs than streaming needs.

    After each slice, at most ``RETAIN_ENDED`` ended jobs are held and a slice ends at most
    ``SLICE`` more, so no projection has to forget a job before it is summarised.
    """
    return default_projections(keep_finished=RETAIN_ENDED + SLICE)


def replay_streaming(
    log_items: Iterable[ReadItem], engine: ProjectionEngine, *, retain: int = RETAIN_ENDED,
) -> Iterator[JobView]:
    """Fold ``log_items`` into ``engine`` and yield each job once its summary is final.

    A job is yielded ``retain`` job-ends after its own end, then forgotten by the jobs
    projection (the other projections bound what they keep of ended jobs themselves); at the
    end of the log, the ended jobs still held, then the jobs that never ended. So jobs come
    in the order they ended, and a job id that ran twice is yielded twice. The caller reads
    what it needs from ``engine`` before asking for the next job.
    """
    jobs_state: JobsState = engine.states["jobs"]
    for item in log_items:
        if isinstance(item, Quarantined):
            warn_quarantined("replay", item)
            engine.apply_items((item,))
            continue
        for start in range(0, len(item.events), SLICE):
            engine.apply_batch(Batch(item.first + start, item.events[start:start + SLICE]))
            yield from _retire(jobs_state, keep=retain)
    yield from _retire(jobs_state, keep=0)
    yield from list(jobs_state.jobs.values())


def _retire(jobs_state: JobsState, *, keep: int) -> Iterator[JobView]:
    """The oldest ended jobs beyond ``keep``, each taken out of the state as it is yielded."""
    if len(jobs_state.finished) <= keep:
        return
    finished = jobs_state.finished = oldest_first(jobs_state.finished)
    while len(finished) > keep:
        job, _ = finished.popitem(last=False)
        view = jobs_state.jobs.pop(job, None)
        if view is not None:
            yield view


def run(args: argparse.Namespace) -> int:
    """Fold the log, printing each job's row (or JSON object) as its summary becomes final."""
    engine = ProjectionEngine(replay_projections())
    views = (view for view in replay_streaming(open_log_for_reading(args).read(0), engine)
             if args.job is None or view.job == args.job)
    if args.json:
        write_json(views, engine, sys.stdout.buffer)
    else:
        print_table(views, engine)
    return 0


def write_json(views: Iterable[JobView], engine: ProjectionEngine, out: BinaryIO) -> None:
    """``{"jobs": [...], "health": {...}, "position": N}``, written a job at a time."""
    out.write(b'{\n  "jobs": [')
    separator = b"\n"
    for view in views:
        formatted = msgspec.json.format(msgspec.json.encode(job_summary(view, engine)))
        out.write(separator + _indent(formatted, b"    "))
        separator = b",\n"
    tail = msgspec.json.format(msgspec.json.encode({
        "health": {**msgspec.to_builtins(engine.health),
                   "dropped": engine.states["health"].dropped()},
        "position": engine.position,
    }))
    out.write((b"\n  ]" if separator != b"\n" else b"]") + b",\n"
              + tail[tail.index(b"\n") + 1:])
    out.write(b"\n")


def _indent(text: bytes, prefix: bytes) -> bytes:
    """``text`` with ``prefix`` before each line (``msgspec.json.format`` writes no empty
    line: a newline in a string is escaped), in one pass rather than a line at a time."""
    return prefix + text.replace(b"\n", b"\n" + prefix)


def job_summary(view: JobView, engine: ProjectionEngine) -> dict[str, Any]:
    """A job as builtins, with what every projection knows of it (the read model of
    :mod:`telemetry.projections.summary`, in replay's JSON shape)."""
    read = read_summary(engine.states, view)
    assert read is not None  # a view is always summarised
    summary: dict[str, Any] = msgspec.to_builtins(view)
    summary["steps_per_second"] = read.mean_steps_per_second
    summary["stage_durations"] = read.stage_durations
    history = [msgspec.to_builtins(p) for p in read.eta_history]
    if read.latest_eta is not None:
        summary["progress"] = read.latest_eta.progress
        summary["eta"] = msgspec.to_builtins(read.latest_eta)
        summary["eta_history"] = history
    elif read.finished_eta is not None:
        summary["progress"] = 1.0  # ended: replay's progress is the ETA model's, done
        summary["eta_history"] = history
        summary["eta_residuals"] = read.finished_eta.residuals
        summary["eta_before_start_error"] = read.finished_eta.before_start_error
    summary["peak_memory_bytes_by_kind"] = read.peaks
    summary["steps_per_second_smoothed"] = read.smoothed_steps_per_second
    return summary


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on or not show (controls such as
    newline and ESC, bidi overrides, lone surrogates) written as its escape (``\\x1b``,
    ``\\u202e``), so an id cannot break a table's rows or drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def print_table(views: Iterable[JobView], engine: ProjectionEngine) -> None:
    """A line per job as it is summarised, then a footer with totals and telemetry health.
    Text from the log (ids, model names) is shown through :func:`printable`."""
    eta: EtaState = engine.states["eta"]
    print(f"{'JOB':<24} {'STATUS':<10} {'MODEL':<16} {'STEPS':>7} {'TIME':>8} "
          f"{'STEP/S':>7} {'ETA ERR@25-50%':>15}  STAGES", flush=True)
    by_status: dict[str, int] = {}
    for v in views:
        steps = f"{v.steps_done}/{v.total_steps or '?'}"
        duration = f"{v.duration_s:.2f}s" if v.duration_s is not None else "-"
        rate = f"{v.steps_per_second:.1f}" if v.steps_per_second else "-"
        finished = eta.finished.get(v.job)
        error = finished.residuals.get("25-50") if finished else None
        error_text = f"{100 * error:+.1f}%" if error is not None else "-"
        stages = " ".join(f"{k}={d:.3f}s" for k, d in v.stage_durations().items())
        model = printable(v.variant or v.model or "?")
        print(f"{printable(v.job):<24} {printable(v.status):<10} {model:<16} "
              f"{steps:>7} {duration:>8} {rate:>7} {error_text:>15}  {stages}")
        by_status[v.status] = by_status.get(v.status, 0) + 1
    statuses = ", ".join(f"{n} {printable(s)}" for s, n in sorted(by_status.items())) or "none"
    health = engine.health
    print(f"{sum(by_status.values())} job(s) ({statuses}); "
          f"{sum(health.events_by_type.values())} events; "
          f"{health.duplicates} duplicate(s); {health.quarantined_records} quarantined record(s)"
          + (f"; {health.gaps} gap(s) in the log ({health.gap_positions} position(s) missing)"
             if health.gaps else ""))
