#!/usr/bin/env python3
"""Replay throughput with every projection enabled (issue 4's goal: ≥ 500k events/s), and
what each projection's fast path (``apply_many``) earns over its rules (``apply``) alone.

Builds a log of realistic job streams (JobStarted, stages, 50 steps, a memory sample every
other step, JobCompleted; 2600 jobs, ~205k events) and replays it, median of ``--rounds``
(the cases take turns within a round, so drift affects them alike): decode only, the engine
with no projection, each projection that has a fast path alone — with it, and folded event by
event through its rules (:class:`~telemetry.projections.base.RulesOnly`) — and every
projection ``wantel serve`` runs (jobs, eta, throughput, memory, health, metrics, compare) with
every fast path, without each one in turn, and without any; and that set without the compare
projection (the Compare dashboard's series), so its cost is measured in the same rounds; and
serve's set and the ETA projection alone with the ETA estimator in Python instead of its C twin
(``telemetry/eta/_live.c``: the estimator and the scoring of completed jobs' ETAs), and
serve's set with only the scoring in Python, with only the online learning (a prior
corrected at each start, a completed job learned) in Python, with only the counting of
scored ETAs into the residual histograms in Python, and with only the issuing of each ETA
(its point made and kept) in Python.
Prints events/s, the fold's own cost (ns per event, over the engine with no projection), the
fast path's gain, and the goal.

    python benchmarks/replay_bench.py [--rounds 5] [--jobs 2600]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from telemetry.engine import ProjectionEngine
from telemetry.eta import online
from telemetry.eta.live import corrected
from telemetry.events import (
    DeviceInfo,
    Event,
    JobCompleted,
    JobStarted,
    MemorySampled,
    StageEnded,
    StageProgress,
    StageStarted,
    StepEnded,
)
from telemetry.log.local import LocalLog
from telemetry.projections import default_projections
from telemetry.projections.base import RulesOnly
from telemetry.projections.eta import EtaProjection, Histogram, score_issued
from telemetry.projections.eta import _issue as eta_issue

GOAL = 500_000


def workload(jobs: int, pieces: int = 0) -> list[Event]:
    """``jobs`` interleaved-free job streams of 50 steps each (~79 events per job); with
    ``pieces``, each then decodes its video in that many pieces (``StageProgress``: Wan's VAE
    reports one per latent frame, 21 for 81 frames)."""
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
        events.append(StageEnded(job=job, ts=base + 51 * 10**7, worker=worker,
                                 stage="denoise", duration_s=0.5))
        end = base + 52 * 10**7
        if pieces:
            decode = base + 51 * 10**7
            events.append(StageStarted(job=job, ts=decode, worker=worker, stage="decode"))
            events += [StageProgress(job=job, ts=decode + k * 10**6, worker=worker,
                                     stage="decode", done=k, total=pieces)
                       for k in range(1, pieces + 1)]
            end = decode + (pieces + 1) * 10**6
            events.append(StageEnded(job=job, ts=end, worker=worker, stage="decode",
                                     duration_s=(pieces + 1) / 1000))
        events.append(JobCompleted(job=job, ts=end + 10**6, worker=worker,
                                   duration_s=(end + 10**6 - base) / 1e9))
        out += [_with_seq(e, seq) for seq, e in enumerate(events)]
    return out


def _with_seq(event: Event, seq: int) -> Event:
    from msgspec.structs import force_setattr

    force_setattr(event, "seq", seq)
    return event


def rate(log: LocalLog, projections: list[Any] | None, count: int, clock: Any) -> float:
    """Events per second of one replay (``None``: decode only), by ``clock``."""
    gc.collect()
    start = clock()
    if projections is None:
        for _ in log.read(0):
            pass
    else:
        engine = ProjectionEngine(projections)
        for item in log.read(0):
            engine.apply_items((item,))
    return count / (clock() - start)


def serve_set(rules_only: frozenset[str] = frozenset()) -> list[Any]:
    """``wantel serve``'s projections, those named in ``rules_only`` without their fast path."""
    return [RulesOnly(p) if p.name in rules_only else p for p in default_projections()]


def python_eta(projections: list[Any]) -> list[Any]:
    """``projections`` with the ETA projection's estimator in Python (its C twin's reference)."""
    return [EtaProjection(keep_finished=p.keep_finished, estimator="python")
            if p.name == "eta" and not isinstance(p, RulesOnly) else p for p in projections]


def changed_eta(projections: list[Any], change: Callable[[Any], None]) -> list[Any]:
    """``projections`` with ``change`` made to the ETA projection (unless its rules alone fold)."""
    for p in projections:
        if p.name == "eta" and not isinstance(p, RulesOnly):
            change(p)
    return projections


def python_scoring(eta: Any) -> None:
    """The ETA projection with its estimator in C but a completed job's ETAs scored by the
    rule, :func:`~telemetry.projections.eta.score_issued`, instead of its C twin (set on the
    built projection: what the scoring's C twin alone earns)."""
    eta._score_issued = score_issued


def python_learning(eta: Any) -> None:
    """The ETA projection with its estimator in C but its online learning — a prior corrected
    at each start (:func:`~telemetry.eta.live.corrected`), a completed job learned
    (:func:`~telemetry.eta.online.learn`) — by the rules instead of their C twins."""
    eta._learn = online.learn
    eta._priors.corrector = corrected


def python_issuing(eta: Any) -> None:
    """The ETA projection with each ETA issued by the rule, ``_issue`` (the C estimate, then
    the point made and appended in Python), not its C twin."""
    eta._issue = partial(eta_issue, estimate_fields=eta._estimator.estimate_fields)


def python_counting(eta: Any) -> None:
    """The ETA projection with scored ETAs counted into its histograms by the rule,
    :meth:`~telemetry.projections.eta.Histogram.add_all`, not its C twin."""
    eta._add_all = Histogram.add_all


def alone(name: str, *, rules_only: bool = False) -> list[Any]:
    """The projection ``name`` of serve's set, alone; folded by its rules if ``rules_only``."""
    return [p for p in serve_set(frozenset({name} if rules_only else ())) if p.name == name]


def main() -> None:
    """Build the log once, then time each replay ``--rounds`` times."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=2600)
    parser.add_argument("--decode-pieces", type=int, default=0, metavar="N",
                        help="each job also decodes in N pieces (StageProgress; 21 is an "
                        "81-frame Wan video) — default 0: the workload the history compares")
    parser.add_argument("--wall", action="store_true",
                        help="time by the wall clock, not by this process's CPU time (which "
                        "other processes on a shared machine disturb less)")
    args = parser.parse_args()
    clock = time.perf_counter if args.wall else time.process_time
    events = workload(args.jobs, args.decode_pieces)
    # The projections with a fast path beside their rules.
    fast = [p.name for p in default_projections() if hasattr(p, "apply_many")]
    every, none = "every projection (serve's set)", "engine, no projection"
    all_rules = f"every projection, rules only ({', '.join(fast)})"
    cases: dict[str, Callable[[], list[Any] | None]] = {
        "read + decode only": lambda: None,
        none: lambda: [],
    }
    for name in fast:
        cases[f"{name} alone, fast path"] = partial(alone, name)
        cases[f"{name} alone, rules only"] = partial(alone, name, rules_only=True)
    cases[every] = serve_set
    # The ETA estimator's C twin (telemetry/eta/_live.c) against its Python rule, same rounds.
    eta_python = "every projection, eta estimator in Python"
    cases[eta_python] = lambda: python_eta(serve_set())
    cases["eta alone, estimator in Python"] = lambda: python_eta(alone("eta"))
    # Its scoring of completed jobs' ETAs alone (score_issued's C twin) against the rule.
    scoring_python = "every projection, eta scoring in Python"
    cases[scoring_python] = lambda: changed_eta(serve_set(), python_scoring)
    # Its online learning (corrected, learn: C twins) against the rules.
    learning_python = "every projection, eta online learning in Python"
    cases[learning_python] = lambda: changed_eta(serve_set(), python_learning)
    counting_python = "every projection, eta counting in Python"
    cases[counting_python] = lambda: changed_eta(serve_set(), python_counting)
    issuing_python = "every projection, eta issuing in Python"
    cases[issuing_python] = lambda: changed_eta(serve_set(), python_issuing)
    twins = {eta_python: "C estimator", scoring_python: "C scoring",
             learning_python: "C learning", counting_python: "C counting",
             issuing_python: "C issuing"}
    # The compare projection (the Compare dashboard's series) is the newest: its cost is the
    # difference from the set without it, measured in the same rounds.
    without_compare = "every projection but compare (the set before it)"
    cases[without_compare] = lambda: [p for p in serve_set() if p.name != "compare"]
    for name in fast:
        cases[f"every projection, {name} rules only"] = partial(serve_set, frozenset({name}))
    cases[all_rules] = partial(serve_set, frozenset(fast))
    with tempfile.TemporaryDirectory() as directory:
        log = LocalLog(directory, fsync="never")
        for k in range(0, len(events), 1000):
            log.append(events[k:k + 1000])
        rates: dict[str, list[float]] = {label: [] for label in cases}
        for _ in range(args.rounds):  # the cases take turns: drift affects them alike
            for label, make in cases.items():
                rates[label].append(rate(log, make(), len(events), clock))
    median = {label: statistics.median(r) for label, r in rates.items()}

    def fold_ns(label: str) -> float:
        """The folds' own time per event: the replay's less the engine's with no projection."""
        return 1e9 / median[label] - 1e9 / median[none]

    decoded = f", a decode of {args.decode_pieces} pieces" if args.decode_pieces else ""
    print(f"replay of {len(events)} events ({args.jobs} jobs × 50 steps{decoded}), "
          f"median of {args.rounds} rounds, {'wall' if args.wall else 'CPU'} time")
    for label in cases:
        value, note = median[label], ""
        if label not in ("read + decode only", none):
            note = f"  {fold_ns(label):5.0f} ns/event in folds"
        if label.endswith("alone, rules only"):
            with_fast = label.replace("rules only", "fast path")
            note += (f"   fast path: replay {median[with_fast] / value:.2f}×, "
                     f"fold {fold_ns(label) / fold_ns(with_fast):.2f}×")
        elif label in twins:  # serve's set with one of the ETA's C twins in Python
            note += (f"   {twins[label]}: replay {median[every] / value:.2f}×, "
                     f"folds {fold_ns(label) / fold_ns(every):.2f}×")
        elif label == "eta alone, estimator in Python":
            with_c = "eta alone, fast path"
            note += (f"   C estimator: replay {median[with_c] / value:.2f}×, "
                     f"fold {fold_ns(label) / fold_ns(with_c):.2f}×")
        elif label == without_compare:
            note += f"   compare costs {fold_ns(every) - fold_ns(label):.0f} ns/event"
        elif label.startswith("every projection,"):
            note += f"   fast paths: replay {median[every] / value:.2f}×"
        if label in (every, all_rules, *twins):
            note += f"   goal ≥ {GOAL // 1000}k/s {'PASS' if value >= GOAL else 'MISS'}"
        print(f"  {label:<66} {value / 1e3:6.0f}k events/s{note}")


if __name__ == "__main__":
    main()
