"""Benchmark the cost of one ``/metrics`` scrape: collect from projection state, then encode.

Run ``python benchmarks/metrics_bench.py`` (about half a minute on two cores; ``--jobs`` and
``--running`` change the load). The projections are folded over ``--jobs`` (10 000) finished
jobs and ``--running`` (50) running ones — synthetic but shaped like real ones: five models,
seven stages, 8 steps (the A14B-like models on two experts), memory and GPU samples, some jobs
queued first, some failed or cancelled — through every shipped projection
(``default_projections()``), as ``wantel serve`` runs them.

A scrape is timed as Prometheus causes it: ``WantelCollector.collect()`` under the runner's
lock plus encoding, for the classic text format and for OpenMetrics (what Prometheus asks for;
it carries the exemplars). Each figure is the median of ``--rounds`` (21) rounds. The goal is
10 ms per scrape, so a 1 s scrape interval costs the server at most 1 % of a core.

The baseline beside it, in the same run, is prometheus_client's own encoders
(``generate_latest`` and the OpenMetrics one) on the same registry: the stock custom-collector
path, collect + encode, as ``/metrics`` would run without wantel's encoder (and the encode
alone, on families already collected). wantel's encoder (``exporters.prometheus.Encoder``, as
``Exposition`` holds it) writes the same bytes (a test holds it to that) with label sets
formatted once and kept between scrapes.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Final

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector

from exporters.prometheus import Exposition, WantelCollector
from telemetry.engine import ProjectionEngine, ProjectionRunner
from telemetry.events import (
    DeviceInfo,
    Event,
    Expert,
    GpuSampled,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobQueued,
    JobStarted,
    MemorySampled,
    StageEnded,
    StageStarted,
    StepEnded,
)
from telemetry.log.memory import MemoryLog
from telemetry.projections import default_projections

GOAL_MS: Final = 10.0
SECOND: Final = 1_000_000_000
MODELS: Final = ("tiny-t2v", "tiny-i2v", "tiny-ti2v", "tiny-t2v-a14b", "tiny-i2v-a14b")
STAGES: Final = ("load", "text_encode", "latent_init", "denoise", "decode", "postprocess", "save")
STEPS: Final = 8
OPENMETRICS: Final = "application/openmetrics-text;version=1.0.0"


def job_events(index: int, t0: int, *, finish: bool) -> list[Event]:
    """One job's events from ``t0`` (ns); it ends (mostly completed) when ``finish``."""
    job, model = f"job-{index}", MODELS[index % len(MODELS)]
    seq = itertools.count()
    ts = t0

    def kw() -> dict[str, Any]:
        return {"job": job, "seq": next(seq), "ts": ts, "worker": f"w{index % 4}"}

    events: list[Event] = []
    if index % 3 == 0:
        events.append(JobQueued(**kw(), model=model, task="t2v"))
        ts += SECOND
    events.append(JobStarted(**kw(), model=model, family="wan2.2", variant=model, task="t2v",
                             width=64, height=64, num_frames=17, steps=STEPS, guidance_scale=5.0,
                             cfg=True, device=DeviceInfo(kind="cuda", name="bench")))
    two_experts = model.endswith("a14b")
    for stage in STAGES:
        events.append(StageStarted(**kw(), stage=stage))
        if stage == "denoise":
            for step in range(STEPS):
                ts += SECOND // 4
                expert: Expert | None = None
                if two_experts:
                    expert = "high_noise" if step < 3 else "low_noise"
                events.append(StepEnded(**kw(), step=step, total_steps=STEPS,
                                        duration_s=0.25, expert=expert))
        ts += SECOND // 10
        events.append(MemorySampled(**kw(), device=f"cuda:{index % 4}", stage=stage,
                                    allocated_bytes=2**33, reserved_bytes=2**34,
                                    device_used_bytes=2**35, device_total_bytes=80 * 2**30))
        events.append(StageEnded(**kw(), stage=stage, duration_s=0.1))
        if not finish and stage == "denoise":
            return events
    duration = (ts - t0) / 1e9
    if index % 50 == 7:
        events.append(JobFailed(**kw(), duration_s=duration, error_type="OutOfMemoryError",
                                message="oom", oom=True))
    elif index % 50 == 9:
        events.append(JobCancelled(**kw(), duration_s=duration))
    else:
        events.append(JobCompleted(**kw(), duration_s=duration))
    return events


def build(jobs: int, running: int) -> ProjectionRunner:
    """A runner whose projections hold ``jobs`` finished and ``running`` running jobs."""
    log = MemoryLog()
    t0 = 1_700_000_000 * SECOND
    for index in range(jobs):
        log.append(job_events(index, t0 + index * 5 * SECOND, finish=True))
    gpu = [GpuSampled(job="worker/w0", seq=i, ts=t0 + i * SECOND, device=f"cuda:{i % 4}",
                      utilization_ratio=0.9, temperature_celsius=70,
                      throttle_reasons=("sw_power_cap",) if i % 2 else ())
           for i in range(100)]
    log.append(gpu)
    t_run = t0 + jobs * 5 * SECOND
    for index in range(jobs, jobs + running):
        log.append(job_events(index, t_run, finish=False))
    runner = ProjectionRunner(log, ProjectionEngine(default_projections()))
    runner.catch_up()
    return runner


def median_ms(fn: Callable[[], object], rounds: int) -> float:
    """Median wall time of ``fn`` over ``rounds`` calls, in milliseconds (after one warm-up)."""
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


class Frozen(Collector):
    """The families of one collection, replayed: encoding without collecting (the baseline)."""

    def __init__(self, collector: WantelCollector) -> None:
        self.families = list(collector.collect())

    def collect(self) -> list[Metric]:
        """The families of the one collection."""
        return self.families


def main() -> None:
    """Fold, then time scrapes and print figures against the goal and the baseline."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="finished jobs folded in")
    parser.add_argument("--running", type=int, default=50, help="running jobs folded in")
    parser.add_argument("--rounds", type=int, default=21, help="timed rounds per figure (>= 5)")
    args = parser.parse_args()
    rounds = max(5, args.rounds)

    start = time.perf_counter()
    runner = build(args.jobs, args.running)
    fold_s = time.perf_counter() - start
    events = sum(runner.engine.health.events_by_type.values())
    now = time.time()
    exposition = Exposition(runner, clock=lambda: now)  # a fixed clock: equal bytes to compare
    registry = exposition.registry
    collector = WantelCollector(runner)
    frozen = Frozen(collector)
    text, _ = exposition.render(None)
    om, _ = exposition.render(OPENMETRICS)
    assert text == generate_latest(registry) and om == generate_openmetrics(registry)
    series = sum(1 for line in text.splitlines() if not line.startswith(b"#"))

    print(f"workload: {args.jobs} finished + {args.running} running jobs, {events} events "
          f"folded in {fold_s:.1f} s; {series} samples, {len(text)} B text, "
          f"{len(om)} B OpenMetrics; median of {rounds} rounds")
    collect_ms = median_ms(lambda: list(collector.collect()), rounds)
    print(f"  collect() alone (projections → families):  {collect_ms:7.3f} ms")
    for label, accept, encode in (("text", None, generate_latest),
                                  ("OpenMetrics", OPENMETRICS, generate_openmetrics)):
        total = median_ms(partial(exposition.render, accept), rounds)
        stock = median_ms(partial(encode, registry), rounds)
        floor = median_ms(partial(encode, frozen), rounds)
        for who, ms in (("wantel's encoder", total), ("prometheus_client", stock)):
            verdict = "PASS" if ms <= GOAL_MS else "MISS"
            print(f"  /metrics {label:<11} collect + encode, {who:<17} {ms:7.3f} ms   "
                  f"goal <= {GOAL_MS:.0f} ms   {verdict}")
        print(f"  {'':<9}{label:<11} prometheus_client encode alone: {floor:7.3f} ms; "
              f"ratio wantel / prometheus_client {total / stock:.2f}")


if __name__ == "__main__":
    main()
