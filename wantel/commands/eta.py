"""``wantel eta fit`` and ``wantel eta eval``: calibrate the ETA model, and score it honestly.

``fit`` calibrates every cost component from the completed jobs in the log (robust least
squares), prints how well each fits, and appends an ``EtaCalibrated`` event, which jobs that
start afterwards use. ``eval`` fits on one part of the log and scores on the other, so a
calibration is never scored on the runs it was fitted on.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import msgspec

from telemetry.errors import UsageError
from telemetry.eta.evaluate import (
    ESTIMATORS,
    POINTS,
    Learning,
    Report,
    StaticProfile,
    evaluate,
    online_starts,
)
from telemetry.eta.fit import FitResult, fit
from telemetry.eta.jobs import JobRecord, job_records
from telemetry.eta.model import CHECKPOINTS, Calibration
from telemetry.events import ETA_STREAM, EtaCalibrated
from telemetry.log.base import Batch, EventLog
from wantel.commands.common import add_nats_flags, open_log_for_reading


def configure(parser: argparse.ArgumentParser) -> None:
    """``wantel eta fit|eval`` and their flags."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True,
                                parser_class=type(parser))
    fit_parser = sub.add_parser("fit", help="calibrate the ETA model from completed jobs",
                                description=fit_command.__doc__)
    fit_parser.add_argument("--dry-run", action="store_true",
                            help="print the fit without appending the calibration to the log")
    fit_parser.add_argument("--train", type=_fraction, default=1.0, metavar="FRACTION",
                            help="fit only on this deterministic share of jobs (default: all)")
    fit_parser.add_argument("--json", action="store_true", help="print the fit as JSON")
    eval_parser = sub.add_parser("eval", help="score ETA accuracy against the baselines",
                                 description=eval_command.__doc__)
    eval_parser.add_argument("--train", type=_fraction, default=0.5, metavar="FRACTION",
                             help="share of jobs (split by job id) to calibrate on; the rest "
                             "is scored (default 0.5)")
    eval_parser.add_argument("--online", action="store_true",
                             help="no split: replay the log in order with online learning "
                             "only, each job scored from what the jobs before it taught (what "
                             "a user who never runs fit sees)")
    eval_parser.add_argument("--prior-scale", type=_positive, default=1.0, metavar="X",
                             help="with --online: multiply every prior by X, to see the "
                             "estimate recover from a prior that is off (default 1)")
    eval_parser.add_argument("--jobs", action="store_true",
                             help="also print each scored job's errors, worst first")
    eval_parser.add_argument("--json", action="store_true", help="print the scores as JSON")
    for child in (fit_parser, eval_parser):
        # SUPPRESS: an absent flag must not overwrite a --log given before the action.
        child.add_argument("--log", metavar="DIR", default=argparse.SUPPRESS,
                           help="the event log directory (default: $WANTEL_LOG, else "
                           "./wantel-log)")
        # The fleet's stream: the calibration covers every worker's jobs, and fit records it
        # there, where every aggregator folds it.
        add_nats_flags(child, reading=True)


def _number(text: str, *, low: float, high: float, low_open: bool, what: str) -> float:
    """``text`` as a finite number within [low, high] (``low_open``: (low, high]), else the
    argparse error that names the range."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    above_low = low < value if low_open else low <= value
    if not (math.isfinite(value) and above_low and value <= high):
        raise argparse.ArgumentTypeError(f"{what}, got {text}")
    return value


def _fraction(text: str) -> float:
    return _number(text, low=0.0, high=1.0, low_open=True, what="a fraction in (0, 1]")


def _positive(text: str) -> float:
    return _number(text, low=1e-3, high=1e3, low_open=False, what="a factor from 0.001 to 1000")


def run(args: argparse.Namespace) -> int:
    """Dispatch to fit or eval."""
    if args.action == "fit":
        return fit_command(args)
    return eval_command(args)


def _records(log: EventLog) -> list[JobRecord]:
    events = (e for item in log.read(0) if isinstance(item, Batch) for e in item.events)
    return job_records(events)


def fit_command(args: argparse.Namespace) -> int:
    """Calibrate from completed jobs and record the calibration in the log."""
    log = open_log_for_reading(args)
    records = [r for r in _records(log) if r.completed]
    if args.train < 1.0:
        records = [r for r in records if r.in_split("train", args.train)]
    if not records:
        raise UsageError(f"no completed jobs in {args.log or 'the log'} to calibrate from; "
                         "run some jobs first (wantel run / wantel demo)")
    result = fit(records)
    if args.json:
        sys.stdout.buffer.write(msgspec.json.encode(_fit_document(result)) + b"\n")
    else:
        _print_fit(result)
    if not args.dry_run:
        calibration = result.calibration
        positions = log.append([EtaCalibrated(
            job=ETA_STREAM, seq=_next_seq(log), ts=time.time_ns(),
            coefficients=calibration.coefficients, rel_sigma=calibration.rel_sigma,
            warmup=calibration.warmup, quantiles=calibration.quantiles, jobs=calibration.jobs,
        )])
        print(f"calibration from {calibration.jobs} job(s) recorded at position "
              f"{positions.start}; jobs started from now on use it", file=sys.stderr)
    return 0


def _next_seq(log: EventLog) -> int:
    last = -1
    for item in log.read(0):
        if isinstance(item, Batch):
            for event in item.events:
                if event.job == ETA_STREAM:
                    last = max(last, event.seq)
    return last + 1


def _fit_document(result: FitResult) -> dict[str, Any]:
    return {"jobs": result.calibration.jobs,
            "components": [msgspec.to_builtins(c.__dict__) for c in result.components],
            "quantiles": result.calibration.quantiles,
            "warmup": result.calibration.warmup}


def _print_fit(result: FitResult) -> None:
    print(f"fitted on {result.calibration.jobs} completed job(s)")
    print(f"{'COMPONENT':<48} {'N':>4} {'REL MAE':>8} {'REL SIGMA':>10}  COEFFICIENTS")
    for c in result.components:
        coefficients = " ".join(f"{v:.4g}" for v in c.coefficients)
        print(f"{c.key:<48} {c.samples:>4} {100 * c.rel_mae:>7.1f}% {100 * c.rel_sigma:>9.1f}%"
              f"  {coefficients}")
    if result.calibration.quantiles:
        bands = ", ".join(f"{b}: {q[0]:.2f}–{q[1]:.2f}"
                          for b, q in result.calibration.quantiles.items())
        print(f"interval (actual ÷ predicted remaining, p10–p90) by progress: {bands}")


def eval_command(args: argparse.Namespace) -> int:
    """Score the ETA against the baselines: fitted on a train split and scored on the rest,
    or (``--online``) replaying the log in order with online learning only."""
    log = open_log_for_reading(args)
    if args.prior_scale != 1.0 and not args.online:
        raise UsageError("--prior-scale needs --online (a fit replaces the priors)")
    events = [e for item in log.read(0) if isinstance(item, Batch) for e in item.events]
    records = [r for r in job_records(events) if r.completed]
    if args.online:
        if not records:
            raise UsageError("no completed jobs in the log to score; run some jobs first")
        starts = online_starts(events, Calibration(prior_scale=args.prior_scale))
        report = evaluate(records, Calibration(), StaticProfile.fit(records), starts)
        heading = (f"online, in log order, never fitted: {report.jobs} job(s), each scored "
                   "from what the jobs before it taught"
                   + (f" (priors × {args.prior_scale:g})" if args.prior_scale != 1.0 else "")
                   + "; static is fitted on the whole log (it sees the future)")
        train_jobs = 0
    else:
        train = [r for r in records if r.in_split("train", args.train)]
        test = [r for r in records if r.in_split("test", args.train)]
        if not train or not test:
            raise UsageError(f"need completed jobs in both splits (train {len(train)}, test "
                             f"{len(test)}); record more jobs or change --train")
        calibration = fit(train).calibration
        report = evaluate(test, calibration, StaticProfile.fit(train),
                          online_starts(events, calibration))
        heading = (f"calibrated on {len(train)} job(s), scored on {report.jobs} other job(s) "
                   "(each from the calibration and what the jobs before it taught online)")
        train_jobs = len(train)
    learning = Learning.of(records, report) if args.online else None
    if args.json:
        document = report_document(report, train_jobs)
        document["mode"] = "online" if args.online else "split"
        if learning is not None:
            document["learning"] = msgspec.to_builtins(learning.__dict__)
        sys.stdout.buffer.write(msgspec.json.encode(document) + b"\n")
    else:
        print(format_report(report, heading))
        if learning is not None:
            print(format_learning(learning))
        if args.jobs:
            print()
            print(format_jobs(report))
    return 0


def _point(fraction: float) -> str:
    return "before" if fraction == 0 else str(int(fraction * 100))


def report_document(report: Report, train_jobs: int) -> dict[str, Any]:
    """The evaluation as builtins (``before`` is the estimate issued at the job's start)."""
    return {
        "train_jobs": train_jobs,
        "test_jobs": report.jobs,
        "checkpoints": [_point(c) for c in POINTS],
        "mape": {name: {_point(c): report.scores[(c, name)].mape for c in POINTS}
                 for name in ESTIMATORS},
        "missing": {name: {_point(c): report.scores[(c, name)].missing for c in POINTS}
                    for name in ESTIMATORS},
        "coverage_p10_p90": report.coverage(),
        "jobs": {job: {_point(c): error for c, error in errors.items()}
                 for job, errors in report.per_job.items()},
    }


def format_report(report: Report, heading: str) -> str:
    """A Markdown table: MAPE (%) of the predicted total, per point and estimator."""
    head = "| estimator | before start | " + " | ".join(
        f"at {int(c * 100)} %" for c in CHECKPOINTS) + " |"
    lines = [f"{heading}; MAPE of the predicted total duration (missing = no estimate yet)",
             "", head, "|" + "---|" * (len(POINTS) + 1)]
    for name in ESTIMATORS:
        cells = []
        for c in POINTS:
            score = report.scores[(c, name)]
            text = "–" if score.mape is None else f"{score.mape:.1f}"
            if score.missing and score.mape is not None:
                text += f" ({score.missing} missing)"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    coverage = report.coverage()
    lines += ["", "ours: p10–p90 interval coverage "
              + ("–" if coverage is None else f"{100 * coverage:.0f} %") + " (goal 75–85 %)"]
    return "\n".join(lines)


def format_learning(learning: Learning) -> str:
    """How fast online learning paid, in one line."""
    def cell(value: float | None) -> str:
        return "–" if value is None else f"{value:.1f} %"

    return (f"learning: before the start, from the 4th job of a shape on "
            f"{cell(learning.before_from_4th)}; at 50 %, from the 2nd job of a shape on "
            f"{cell(learning.half_from_2nd)}; the log's first job at 50 % "
            f"{cell(learning.first_at_half)}")


def format_jobs(report: Report) -> str:
    """Each scored job's signed error (%, + = predicted too long) by point, worst first."""
    head = "| job | before start | " + " | ".join(
        f"at {int(c * 100)} %" for c in CHECKPOINTS) + " |"
    lines = [head, "|" + "---|" * (len(POINTS) + 1)]
    worst = sorted(report.per_job.items(),
                   key=lambda item: -max((abs(e) for e in item[1].values()), default=0.0))
    for job, errors in worst:
        cells = ["–" if c not in errors else f"{100 * errors[c]:+.1f}" for c in POINTS]
        lines.append(f"| {job} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
