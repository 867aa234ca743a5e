"""Benchmark wantel's event log against the ``eventsourcing`` library's SQLite recorder.

Run ``python benchmarks/log_bench.py`` (about 7 minutes on two cores) or with ``--quick``
(under a minute). Every figure is printed beside the same workload pushed through
``eventsourcing`` 9.x with its SQLite persistence module (a file database in a temporary
directory, WAL mode, ``synchronous=FULL``: its defaults) — the baseline a user would otherwise
pick — with the ratio and the goal the figure is held to.

The workload is realistic job streams, interleaved across concurrent workers: per job a
``JobStarted``, start/end events of seven stages, ``--steps`` ``StepEnded`` (50 by default), a
``MemorySampled`` every five steps and at the end, and a ``JobCompleted`` (77 events a job at 50
steps). On the ``eventsourcing`` side each job is an ``Aggregate`` and each telemetry event one
domain event triggered by a command method with the same fields, whose body updates the aggregate
the way wantel's jobs projection updates a ``JobView``.

What is measured, and why:

1. Durable append throughput (events/s). wantel: ``LocalLog.append`` in batches of ``--batch``
   (1000) with ``fsync="always"`` — encoding, framing, one ``write`` and one ``fdatasync`` per
   batch, i.e. the emitter's group commit. eventsourcing: ``Application.save(*aggregates)`` of
   the aggregates touched by the same 1000 events (its idiomatic path: mapping, JSON transcoding,
   one SQLite transaction). Triggering the domain events (the analogue of constructing wantel's
   events) is not timed. A second row times ``app.recorder.insert_events(stored_events)`` with the
   events already mapped and encoded outside the timing: the recorder alone, eventsourcing's
   best case.
2. Replay throughput (events/s). wantel: read + checksum + decode + the jobs projection
   (``ProjectionEngine.apply_items``) over the whole log. eventsourcing: the notification log
   read in pages (``recorder.select_notifications``), ``mapper.to_domain_event`` and a fold of
   each event into its aggregate (``event.mutate``, the library's own replay). Both read a warm
   page cache. Read + decode without the fold is reported as well. wantel replays the same
   events in three layouts: the append benchmark's log (batches of ``--batch`` in which the
   workers' events alternate one by one), a frame per worker per batch (as emitters flushing a
   backlog write), and a frame per live flush (each worker's events of one 50 ms flush window,
   lifecycle events at once: what live emitters write, about one event a frame).
   Where the C accelerator was built (``wantel --version`` says), the alternating and
   live-flush logs are also replayed with its pure-Python reference in the same rounds,
   and the ratio is printed.
3. ``emit()`` cost on the caller's thread (µs per call): each call timed alone with
   ``time.perf_counter_ns`` while the emitter's thread appends to a real ``LocalLog``
   (``fsync="always"``); the median cost of an empty timed region (two back-to-back timer reads)
   is subtracted and reported. The queue is sized so that nothing is dropped, and
   ``stats().dropped`` is checked. eventsourcing has no asynchronous emitter: its caller pays
   for triggering the event and ``app.save()`` per event (durable); the in-memory trigger alone
   (nothing persisted) is shown too.
4. Replay memory (MB): RSS growth (psutil) — peak sampled every few batches during replay minus
   RSS just before it — replaying a ``--mem-events`` log (10M; 1M with ``--quick``) built once
   with large batches and ``fsync="never"``, each replay in a fresh process. With the job-stream
   workload the number of jobs grows with the log, and so does the jobs projection's state; a
   second workload with a constant, small number of jobs isolates the reader's own memory, and
   where the jobs projection takes ``keep_finished``, the growing workload is replayed again
   with ``keep_finished=1000`` (the bound a long-running server would set). The
   eventsourcing baseline for memory runs on a smaller log (``--es-mem-events``), beside wantel
   on the same size, because building and replaying 10M events through it takes many minutes.

Throughput and latency figures are medians of ``--rounds`` rounds (5); wantel and
eventsourcing rounds alternate so drift affects both alike. Memory figures are medians of
``--mem-rounds`` fresh-process replays (3: the peak varies by well under 1% between replays,
and five 10M-event replays per workload would not fit the ten-minute budget on two cores).
The run ends by saying how much of the machine's CPU other processes took meanwhile: on a shared
two-core machine that contention depresses and scatters every figure, so read it first. The
SHA-256 prefixes of the library files measured are printed too, for comparing runs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import inspect
import itertools
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Final
from uuid import UUID, uuid5

import msgspec
import psutil
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import StoredEvent

from telemetry import accelerate
from telemetry.emitter import DEFAULT_FLUSH_INTERVAL, Emitter
from telemetry.engine import ProjectionEngine
from telemetry.events import (
    PRIORITY,
    UNSEQUENCED,
    DeviceInfo,
    Event,
    JobCompleted,
    JobStarted,
    MemorySampled,
    Priority,
    StageEnded,
    StageStarted,
    StepEnded,
)
from telemetry.log.base import Batch
from telemetry.log.local import LocalLog
from telemetry.projections.jobs import JobsProjection, JobsState, JobView
from wantel.commands.replay import job_summary, replay_projections, replay_streaming

# -- the workload ------------------------------------------------------------------------------

T0: Final = 1_760_000_000 * 10**9
MEMORY_EVERY: Final = 5
PRE_STAGES: Final = ("load", "text_encode", "latent_init")
POST_STAGES: Final = ("decode", "postprocess", "save")
DEVICE: Final = DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3",
                           total_memory_bytes=85_520_809_984, index=0)
GIB: Final = 1 << 30
MB: Final = 1 << 20
FLUSH_WINDOW_NS: Final = int(DEFAULT_FLUSH_INTERVAL * 1e9)
KEEP_FINISHED: Final = 1000
CODE_FILES: Final = (
    "telemetry/events.py", "telemetry/codec.py", "telemetry/log/framing.py",
    "telemetry/log/local.py", "telemetry/engine.py", "telemetry/dedup.py",
    "telemetry/log/_framing.c", "telemetry/emitter.py",
    "telemetry/projections/jobs.py",
)


def events_per_job(steps: int) -> int:
    """Events in one complete job stream of :func:`job_stream`."""
    stages = len(PRE_STAGES) + 1 + len(POST_STAGES)
    return 1 + 2 * stages + steps + steps // MEMORY_EVERY + 1 + 1


def job_stream(job: str, worker: str, t0: int, steps: int, *, sequenced: bool) -> Iterator[Event]:
    """One job from start to completion, as a Wan 2.2 A14B text-to-video run would emit it."""
    seqs = itertools.count() if sequenced else itertools.repeat(UNSEQUENCED)
    ts = t0
    yield JobStarted(
        job=job, seq=next(seqs), ts=ts, worker=worker, model="Wan-AI/Wan2.2-T2V-A14B-Diffusers",
        family="wan2.2", variant="a14b", task="t2v", width=1280, height=720, num_frames=81,
        steps=steps, guidance_scale=4.0, guidance_scale_2=3.0, cfg=True, boundary_ratio=0.875,
        seed=t0 % 1_000_003, device=DEVICE, options={"sample_shift": 12.0, "offload": False},
        prompt_sha256="9f2c" * 16,
    )
    for stage in PRE_STAGES:
        yield StageStarted(job=job, seq=next(seqs), ts=ts, worker=worker, stage=stage)
        ts += 1_500_000_000
        yield StageEnded(job=job, seq=next(seqs), ts=ts, worker=worker, stage=stage,
                         duration_s=1.5)
    yield StageStarted(job=job, seq=next(seqs), ts=ts, worker=worker, stage="denoise")
    switch = int(steps * 0.875)
    for step in range(steps):
        ts += 2_310_000_000
        yield StepEnded(
            job=job, seq=next(seqs), ts=ts, worker=worker, step=step, total_steps=steps,
            timestep=1000.0 * (1 - step / steps), sigma=1.0 - step / steps,
            expert="high_noise" if step < switch else "low_noise", passes=2, duration_s=2.31,
        )
        if step % MEMORY_EVERY == MEMORY_EVERY - 1:
            yield MemorySampled(
                job=job, seq=next(seqs), ts=ts, worker=worker, device="cuda:0", stage="denoise",
                step=step, allocated_bytes=61 * GIB + step, reserved_bytes=70 * GIB,
                peak_allocated_bytes=66 * GIB, peak_reserved_bytes=72 * GIB,
                device_used_bytes=74 * GIB, device_total_bytes=80 * GIB,
                process_device_bytes=73 * GIB, host_rss_bytes=9 * GIB,
            )
    yield StageEnded(job=job, seq=next(seqs), ts=ts, worker=worker, stage="denoise",
                     duration_s=2.31 * steps)
    for stage in POST_STAGES:
        yield StageStarted(job=job, seq=next(seqs), ts=ts, worker=worker, stage=stage)
        ts += 4_000_000_000
        yield StageEnded(job=job, seq=next(seqs), ts=ts, worker=worker, stage=stage,
                         duration_s=4.0)
    yield MemorySampled(job=job, seq=next(seqs), ts=ts, worker=worker, device="cuda:0",
                        stage="save", allocated_bytes=2 * GIB, reserved_bytes=4 * GIB,
                        host_rss_bytes=9 * GIB)
    yield JobCompleted(job=job, seq=next(seqs), ts=ts, worker=worker,
                       duration_s=(ts - t0) / 1e9, output_path=f"/outputs/{job}.mp4",
                       frames=81, bytes=7_340_032)


def mixed_events(
    n: int, *, steps: int, workers: int, sequenced: bool = True, prefix: str = "job"
) -> Iterator[Event]:
    """``n`` events of back-to-back jobs on ``workers`` workers, interleaved round-robin.

    Each worker keeps its own clock (a job starts 5 s after its previous one ended), and the
    workers run side by side, so event times from different workers overlap as they would in a
    real deployment (no worker looks silent to the projection's liveness check).
    """
    streams: list[Iterator[Event] | None] = [None] * workers
    clocks = [T0 + w * 700_000_000 for w in range(workers)]
    job_numbers = itertools.count()
    produced = 0
    while True:
        for w in range(workers):
            if produced >= n:
                return
            stream = streams[w]
            ev = next(stream, None) if stream is not None else None
            if ev is None:
                stream = streams[w] = job_stream(
                    f"{prefix}-{next(job_numbers):08d}", f"worker-{w}",
                    clocks[w] + 5_000_000_000, steps, sequenced=sequenced,
                )
                ev = next(stream)
            clocks[w] = ev.ts
            yield ev
            produced += 1


def steady_events(n: int, *, jobs: int) -> Iterator[Event]:
    """``n`` events of ``jobs`` jobs that never end: the projection's state stays constant."""

    def endless(job: str, worker: str) -> Iterator[Event]:
        started = next(job_stream(job, worker, T0, 1 << 40, sequenced=True))
        yield started
        yield StageStarted(job=job, seq=1, ts=T0, worker=worker, stage="denoise")
        seq = 2
        for step in itertools.count():
            ts = T0 + step * 2_310_000_000
            yield StepEnded(job=job, seq=seq, ts=ts, worker=worker, step=step,
                            total_steps=1 << 40, timestep=500.0, sigma=0.5, expert="high_noise",
                            passes=2, duration_s=2.31)
            seq += 1
            if step % MEMORY_EVERY == MEMORY_EVERY - 1:
                yield MemorySampled(job=job, seq=seq, ts=ts, worker=worker, device="cuda:0",
                                    stage="denoise", step=step, allocated_bytes=61 * GIB,
                                    reserved_bytes=70 * GIB, host_rss_bytes=9 * GIB)
                seq += 1

    streams = [endless(f"steady-{j}", f"worker-{j}") for j in range(jobs)]
    yield from itertools.islice(itertools.chain.from_iterable(zip(*streams, strict=True)), n)


def live_flushes(events: Iterable[Event],
                 window_ns: int = FLUSH_WINDOW_NS) -> Iterator[list[Event]]:
    """``events`` grouped as live emitters write them: per worker, the events of one flush window
    (``Emitter``'s 50 ms), a lifecycle event ending its flush at once (the emitter wakes for
    it). With steps seconds apart, that is one or two events a frame."""
    pending: dict[str | None, list[Event]] = {}
    for e in events:
        flush = pending.get(e.worker)
        if flush and e.ts - flush[0].ts > window_ns:
            yield flush
            flush = None
        if not flush:
            flush = pending[e.worker] = []
        flush.append(e)
        if PRIORITY[type(e)] == Priority.LIFECYCLE:
            yield flush
            pending[e.worker] = []
    yield from (flush for flush in pending.values() if flush)


def chunked(items: Iterable[Event], size: int) -> Iterator[list[Event]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


# -- the eventsourcing twin ---------------------------------------------------------------------

_NAMESPACE: Final = UUID("6f1d7b8e-0d3c-4e43-9a7d-5d8c1b1f3a11")


class EsJob(Aggregate):
    """One job as an eventsourcing aggregate; its methods mirror the jobs projection's fold."""

    @staticmethod
    def create_id(job: str) -> UUID:
        """Deterministic ids, so a job's stream is addressable by its name."""
        return uuid5(_NAMESPACE, job)

    @event("Started")
    def __init__(
        self, *, job: str, ts: int, worker: str | None, model: str, family: str, variant: str,
        task: str, width: int, height: int, num_frames: int, steps: int, guidance_scale: float,
        guidance_scale_2: float | None, cfg: bool, boundary_ratio: float | None,
        seed: int | None, device: dict[str, Any], options: dict[str, Any],
        prompt_sha256: str | None, traceparent: str | None,
    ) -> None:
        self.job = job
        self.status = "running"
        self.model, self.family, self.variant, self.task = model, family, variant, task
        self.worker = worker
        self.width, self.height, self.num_frames = width, height, num_frames
        self.total_steps, self.cfg, self.traceparent = steps, cfg, traceparent
        self.started_ts: int = ts
        self.last_ts: int = ts
        self.steps_done = 0
        self.step_time_s = 0.0
        self.stage: str | None = None
        self.stages: list[list[Any]] = []
        self.ended_ts: int | None = None
        self.duration_s: float | None = None
        self.output_path: str | None = None

    @event("StageStarted")
    def stage_started(self, *, ts: int, worker: str | None, stage: str) -> None:
        """A stage began."""
        self.last_ts = ts
        self.stage = stage
        self.stages.append([stage, ts, None, None, None])

    @event("StageEnded")
    def stage_ended(
        self, *, ts: int, worker: str | None, stage: str, duration_s: float, ok: bool
    ) -> None:
        """A stage ended: close its span, as the jobs projection does."""
        self.last_ts = ts
        for span in reversed(self.stages):
            if span[0] == stage and span[2] is None:
                break
        else:
            span = [stage, ts - int(duration_s * 1e9), None, None, None]
            self.stages.append(span)
        span[2], span[3], span[4] = ts, duration_s, ok
        if self.stage == stage:
            self.stage = None

    @event("StepEnded")
    def step_ended(
        self, *, ts: int, worker: str | None, step: int, total_steps: int, timestep: float,
        sigma: float | None, expert: str | None, passes: int, duration_s: float | None,
    ) -> None:
        """A denoising step finished."""
        self.last_ts = ts
        self.steps_done = max(self.steps_done, step + 1)
        self.total_steps = total_steps
        if duration_s is not None:
            self.step_time_s += duration_s

    @event("MemorySampled")
    def memory_sampled(
        self, *, ts: int, worker: str | None, device: str, stage: str | None, step: int | None,
        allocated_bytes: int | None, reserved_bytes: int | None,
        peak_allocated_bytes: int | None, peak_reserved_bytes: int | None,
        device_used_bytes: int | None, device_total_bytes: int | None,
        process_device_bytes: int | None, host_rss_bytes: int | None,
    ) -> None:
        """Stored and replayed; the jobs projection ignores samples, and so does this."""

    @event("Completed")
    def completed(
        self, *, ts: int, worker: str | None, duration_s: float, output_path: str | None,
        frames: int | None, bytes: int | None,
    ) -> None:
        """The job produced its output."""
        self.last_ts = ts
        self.status = "completed"
        self.ended_ts = ts
        self.duration_s = duration_s
        self.stage = None
        self.output_path = output_path


EsJobs = dict[str, EsJob]


def _es_started(aggs: EsJobs, e: Any) -> EsJob:
    agg = EsJob(
        job=e.job, ts=e.ts, worker=e.worker, model=e.model, family=e.family, variant=e.variant,
        task=e.task, width=e.width, height=e.height, num_frames=e.num_frames, steps=e.steps,
        guidance_scale=e.guidance_scale, guidance_scale_2=e.guidance_scale_2, cfg=e.cfg,
        boundary_ratio=e.boundary_ratio, seed=e.seed, device=msgspec.to_builtins(e.device),
        options=dict(e.options), prompt_sha256=e.prompt_sha256, traceparent=e.traceparent,
    )
    aggs[e.job] = agg
    return agg


def _es_stage_started(aggs: EsJobs, e: Any) -> EsJob:
    agg = aggs[e.job]
    agg.stage_started(ts=e.ts, worker=e.worker, stage=e.stage)
    return agg


def _es_stage_ended(aggs: EsJobs, e: Any) -> EsJob:
    agg = aggs[e.job]
    agg.stage_ended(ts=e.ts, worker=e.worker, stage=e.stage, duration_s=e.duration_s, ok=e.ok)
    return agg


def _es_step(aggs: EsJobs, e: Any) -> EsJob:
    agg = aggs[e.job]
    agg.step_ended(ts=e.ts, worker=e.worker, step=e.step, total_steps=e.total_steps,
                   timestep=e.timestep, sigma=e.sigma, expert=e.expert, passes=e.passes,
                   duration_s=e.duration_s)
    return agg


def _es_memory(aggs: EsJobs, e: Any) -> EsJob:
    agg = aggs[e.job]
    agg.memory_sampled(
        ts=e.ts, worker=e.worker, device=e.device, stage=e.stage, step=e.step,
        allocated_bytes=e.allocated_bytes, reserved_bytes=e.reserved_bytes,
        peak_allocated_bytes=e.peak_allocated_bytes, peak_reserved_bytes=e.peak_reserved_bytes,
        device_used_bytes=e.device_used_bytes, device_total_bytes=e.device_total_bytes,
        process_device_bytes=e.process_device_bytes, host_rss_bytes=e.host_rss_bytes,
    )
    return agg


def _es_completed(aggs: EsJobs, e: Any) -> EsJob:
    agg = aggs.pop(e.job)  # nothing more will happen to it: let it go once saved
    agg.completed(ts=e.ts, worker=e.worker, duration_s=e.duration_s,
                  output_path=e.output_path, frames=e.frames, bytes=e.bytes)
    return agg


_ES_TRIGGERS: Final[dict[type[Event], Callable[[EsJobs, Any], EsJob]]] = {
    JobStarted: _es_started,
    StageStarted: _es_stage_started,
    StageEnded: _es_stage_ended,
    StepEnded: _es_step,
    MemorySampled: _es_memory,
    JobCompleted: _es_completed,
}


def es_trigger(aggs: EsJobs, e: Event) -> EsJob:
    """Trigger the domain event that mirrors ``e`` on its job's aggregate."""
    return _ES_TRIGGERS[type(e)](aggs, e)


def es_app(db_path: Path) -> Application[UUID]:
    """An eventsourcing application on a SQLite file (WAL and synchronous=FULL by default)."""
    return Application(env={"PERSISTENCE_MODULE": "eventsourcing.sqlite",
                            "SQLITE_DBNAME": str(db_path)})


def es_pages(app: Application[UUID], page: int) -> Iterator[Sequence[Any]]:
    """The notification log, ``page`` notifications at a time."""
    select = app.recorder.select_notifications
    start = 1
    while notes := select(start, page):
        yield notes
        start = notes[-1].id + 1


def es_fold(aggs: dict[UUID, Any], domain_event: Any) -> None:
    """Apply one replayed domain event to its aggregate (the library's own replay step)."""
    oid = domain_event.originator_id
    aggs[oid] = domain_event.mutate(aggs.get(oid))


def es_build(db_path: Path, events: Iterable[Event], batch: int) -> int:
    """Store ``events`` through ``Application.save`` in batches; returns how many."""
    app = es_app(db_path)
    aggs: EsJobs = {}
    stored = 0
    for chunk in chunked(events, batch):
        touched = {e.job: es_trigger(aggs, e) for e in chunk}
        app.save(*touched.values())
        stored += len(chunk)
    app.close()
    return stored


# -- helpers ------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """The median."""
    return statistics.median(values)


def percentile(sorted_values: Sequence[int | float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return float(sorted_values[index])


def log_events(log: LocalLog) -> int:
    """How many events a log holds (reading positions only)."""
    last = log.last_position()
    return 0 if last is None else last + 1


def job_events_in(log: LocalLog) -> int:
    """Events of job streams in a log, leaving out the emitter's own (heartbeats, drop counts)."""
    return sum(
        1
        for item in log.read(0)
        if isinstance(item, Batch)
        for e in item.events
        if not e.job.startswith("worker/")
    )


def jobs_summary(jobs: Iterable[JobView] | Iterable[EsJob]) -> tuple[int, int]:
    """(jobs, steps done over all jobs): the cross-check that both sides folded the same log."""
    count = steps = 0
    for view in jobs:
        count += 1
        steps += view.steps_done
    return count, steps


@dataclass
class Config:
    """Sizes of one run."""

    rounds: int
    events: int
    batch: int
    steps: int
    workers: int
    steady_jobs: int
    emit_calls: int
    es_emit_calls: int
    page: int
    mem_events: int
    es_mem_events: int
    mem_rounds: int
    mem_batch: int
    sample_every: int
    tmp: Path
    quick: bool


@dataclass
class Row:
    """One line of the results table."""

    metric: str
    unit: str
    wantel: float | None
    es: float | None
    higher_is_better: bool
    goal: str = "info"
    passed: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """How many times better wantel is (>1 means better, whichever way is better)."""
        if self.wantel is None or self.es is None or self.wantel <= 0 or self.es <= 0:
            return None
        return self.wantel / self.es if self.higher_is_better else self.es / self.wantel


def fmt(value: float | None, unit: str) -> str:
    """A figure for the table."""
    if value is None:
        return "—"
    if unit == "ev/s":
        return f"{value / 1e6:.2f}M/s" if value >= 1e6 else f"{value / 1e3:.0f}k/s"
    if unit == "us":
        return f"{value:.2f} µs" if value < 100 else f"{value:,.0f} µs"
    if unit == "MB":
        return f"{value:.1f} MB"
    return f"{value:g} {unit}"


# -- 1 and 2: append and replay ----------------------------------------------------------------


@contextlib.contextmanager
def pure_python() -> Iterator[None]:
    """Logs built inside check frames in Python (the reference), as without the C accelerator."""
    accelerate.configure(compiled=False, reason="the benchmark's reference rounds")
    try:
        yield
    finally:
        accelerate.reset_defaults()


def replay_jobs(log: LocalLog, n: int) -> tuple[float, JobsState]:
    """One timed replay of ``log`` (``n`` events) into the jobs projection: events/s, state."""
    engine = ProjectionEngine([JobsProjection()])
    gc.collect()
    t0 = time.perf_counter()
    for item in log.read(0):
        engine.apply_items((item,))
    rate = n / (time.perf_counter() - t0)
    assert engine.position == n and sum(engine.health.events_by_type.values()) == n
    state: JobsState = engine.states["jobs"]
    return rate, state


def bench_append_replay(cfg: Config, rows: list[Row], notes: list[str]) -> dict[str, Any]:
    """Durable append throughput, then replay throughput over the logs the last round wrote."""
    events = list(mixed_events(cfg.events, steps=cfg.steps, workers=cfg.workers))
    n = len(events)
    batches = [events[i : i + cfg.batch] for i in range(0, n, cfg.batch)]
    raw: dict[str, Any] = {"events": n, "batch": cfg.batch}

    # eventsourcing's recorder alone gets events mapped and encoded beforehand, once.
    encode_app = es_app(cfg.tmp / "es-encode.db")
    to_stored = encode_app.mapper.to_stored_event
    stored_batches: list[list[StoredEvent]] = []
    aggs: EsJobs = {}
    encode_s = 0.0
    for b in batches:
        touched = {e.job: es_trigger(aggs, e) for e in b}
        pending = [d for agg in touched.values() for d in agg.collect_events()]
        t0 = time.perf_counter()
        stored_batches.append([to_stored(d) for d in pending])
        encode_s += time.perf_counter() - t0
    encode_app.close()
    notes.append(f"eventsourcing mapper.to_stored_event alone (JSON transcoding): "
                 f"{n / encode_s / 1e3:.0f}k events/s")

    wantel_rates: list[float] = []
    es_rates: list[float] = []
    es_rec_rates: list[float] = []
    wantel_log = cfg.tmp / "append-wantel"
    es_db = cfg.tmp / "append-es.db"
    synchronous = journal = ""
    for r in range(cfg.rounds):
        shutil.rmtree(wantel_log, ignore_errors=True)
        log = LocalLog(wantel_log, fsync="always")
        gc.collect()
        t0 = time.perf_counter()
        for b in batches:
            log.append(b)
        wantel_rates.append(n / (time.perf_counter() - t0))
        log.close()

        for suffix in ("", "-wal", "-shm"):
            Path(f"{es_db}{suffix}").unlink(missing_ok=True)
        app = es_app(es_db)
        aggs = {}
        saving = 0.0
        gc.collect()
        for b in batches:
            touched = {e.job: es_trigger(aggs, e) for e in b}
            t0 = time.perf_counter()
            app.save(*touched.values())
            saving += time.perf_counter() - t0
        es_rates.append(n / saving)
        if r == 0:
            with app.recorder.datastore.transaction(commit=False) as c:
                c.execute("PRAGMA synchronous")
                synchronous = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}[c.fetchone()[0]]
                c.execute("PRAGMA journal_mode")
                journal = str(c.fetchone()[0]).upper()
        app.close()

        rec_db = cfg.tmp / f"append-es-recorder-{r}.db"
        app = es_app(rec_db)
        insert = app.recorder.insert_events
        gc.collect()
        t0 = time.perf_counter()
        for sb in stored_batches:
            insert(sb)
        es_rec_rates.append(n / (time.perf_counter() - t0))
        app.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{rec_db}{suffix}").unlink(missing_ok=True)

    assert log_events(LocalLog(wantel_log, create=False)) == n
    notes.append(f"eventsourcing SQLite: journal_mode={journal}, synchronous={synchronous} "
                 f"(its defaults for a file database; every save is a durable commit)")
    w, e, er = median(wantel_rates), median(es_rates), median(es_rec_rates)
    rows.append(Row(f"durable append, batches of {cfg.batch} [vs Application.save]", "ev/s",
                    w, e, True, "≥400k/s, ≥10×"))
    rows[-1].passed = w >= 400_000 and (rows[-1].ratio or 0) >= 10
    # The recorder alone, events encoded beforehand: eventsourcing's best case, for information
    # (the goal is against Application.save, the path its users take).
    rows.append(Row(f"durable append, batches of {cfg.batch} [vs recorder.insert_events, "
                    "pre-encoded]", "ev/s", w, er, True))
    raw["append"] = {"wantel": wantel_rates, "es_application_save": es_rates,
                     "es_recorder_insert": es_rec_rates,
                     "es_sqlite": {"journal_mode": journal, "synchronous": synchronous}}

    # The same events as each worker's own emitter writes them: a frame per worker flush,
    # frames of different workers interleaved (what LocalLog holds for a fleet of processes).
    frames_log = cfg.tmp / "replay-wantel-frames"
    shutil.rmtree(frames_log, ignore_errors=True)
    by_frame = LocalLog(frames_log, fsync="never")
    for b in batches:
        for worker in sorted({e.worker for e in b}, key=str):
            by_frame.append([e for e in b if e.worker == worker])
    by_frame.close()
    # As live emitters write them: a frame per flush of one worker (one or two events).
    flushes_log = cfg.tmp / "replay-wantel-flushes"
    shutil.rmtree(flushes_log, ignore_errors=True)
    by_flush = LocalLog(flushes_log, fsync="never")
    frames = 0
    for flush in live_flushes(events):
        by_flush.append(flush)
        frames += 1
    by_flush.close()

    # -- replay ----------------------------------------------------------------------------
    del events, batches, stored_batches, aggs  # replay in a process holding no fixtures
    accelerated = accelerate.describe().count(": C") == len(accelerate.ACCELERATORS)
    replay_w: list[float] = []
    replay_e: list[float] = []
    decode_w: list[float] = []
    decode_e: list[float] = []
    framed_w: list[float] = []
    flushed_w: list[float] = []
    pure_w: list[float] = []
    pure_flushed_w: list[float] = []
    summaries: set[tuple[int, int]] = set()
    statuses: Counter[str] = Counter()
    for _ in range(cfg.rounds):
        log = LocalLog(wantel_log, create=False, fsync="never")
        rate, jobs_state = replay_jobs(log, n)
        replay_w.append(rate)
        summaries.add(jobs_summary(jobs_state.jobs.values()))
        statuses = Counter(view.status for view in jobs_state.jobs.values())
        del jobs_state

        app = es_app(es_db)
        to_domain = app.mapper.to_domain_event
        es_aggs: dict[UUID, Any] = {}
        gc.collect()
        count = 0
        t0 = time.perf_counter()
        for notes_page in es_pages(app, cfg.page):
            for note in notes_page:
                es_fold(es_aggs, to_domain(note))
            count += len(notes_page)
        replay_e.append(n / (time.perf_counter() - t0))
        assert count == n
        summaries.add(jobs_summary(es_aggs.values()))
        del es_aggs

        gc.collect()
        count = 0
        t0 = time.perf_counter()
        for item in log.read(0):
            if isinstance(item, Batch):
                count += len(item.events)
        decode_w.append(n / (time.perf_counter() - t0))
        assert count == n

        if accelerated:
            with pure_python():
                rate, jobs_state = replay_jobs(
                    LocalLog(wantel_log, create=False, fsync="never"), n)
                pure_w.append(rate)
                summaries.add(jobs_summary(jobs_state.jobs.values()))
                rate, jobs_state = replay_jobs(
                    LocalLog(flushes_log, create=False, fsync="never"), n)
                pure_flushed_w.append(rate)
                summaries.add(jobs_summary(jobs_state.jobs.values()))
            del jobs_state

        rate, jobs_state = replay_jobs(LocalLog(frames_log, create=False, fsync="never"), n)
        framed_w.append(rate)
        summaries.add(jobs_summary(jobs_state.jobs.values()))
        del jobs_state

        rate, jobs_state = replay_jobs(LocalLog(flushes_log, create=False, fsync="never"), n)
        flushed_w.append(rate)
        summaries.add(jobs_summary(jobs_state.jobs.values()))
        del jobs_state

        gc.collect()
        count = 0
        t0 = time.perf_counter()
        for notes_page in es_pages(app, cfg.page):
            for note in notes_page:
                to_domain(note)
            count += len(notes_page)
        decode_e.append(n / (time.perf_counter() - t0))
        assert count == n
        app.close()
    assert len(summaries) == 1, f"the two folds disagree: {summaries}"
    jobs, steps = summaries.pop()
    notes.append(f"replay cross-check: both folds see {jobs} jobs and {steps} steps done "
                 f"(wantel job statuses: {dict(statuses)}); eventsourcing reads pages of "
                 f"{cfg.page} notifications")
    w, e = median(replay_w), median(replay_e)
    rows.append(Row("replay: read+decode+jobs projection", "ev/s", w, e, True, "≥1M/s, ≥7×"))
    rows[-1].passed = w >= 1_000_000 and (rows[-1].ratio or 0) >= 7
    rows.append(Row("replay: read+decode+jobs, a frame per worker flush", "ev/s",
                    median(framed_w), e, True, "≥1M/s, ≥7×"))
    rows[-1].passed = median(framed_w) >= 1_000_000 and (rows[-1].ratio or 0) >= 7
    rows.append(Row(f"replay: read+decode+jobs, a frame per live flush ({n / frames:.1f} "
                    "ev/frame)", "ev/s", median(flushed_w), e, True, "≥1M/s, ≥7×"))
    rows[-1].passed = median(flushed_w) >= 1_000_000 and (rows[-1].ratio or 0) >= 7
    rows.append(Row("replay: read+decode only", "ev/s", median(decode_w), median(decode_e),
                    True))
    if accelerated:
        flushed, pure_flushed = median(flushed_w), median(pure_flushed_w)
        notes.append(f"C accelerator ({accelerate.describe()}): replay + jobs {w / 1e3:.0f}k "
                     f"ev/s alternating and {flushed / 1e3:.0f}k in live flushes, against "
                     f"{median(pure_w) / 1e3:.0f}k and {pure_flushed / 1e3:.0f}k with its "
                     f"pure-Python reference in the same rounds ({w / median(pure_w):.2f}× "
                     f"and {flushed / pure_flushed:.2f}×)")
    else:
        notes.append(f"no C accelerator: {accelerate.describe()}")
    notes.append("replay layouts: 'read+decode+jobs projection' reads batches in which the "
                 f"{cfg.workers} workers' events alternate one by one (the worst case: no run "
                 "of one job's steps); 'a frame per worker flush' stores the same events as "
                 "each worker's own emitter writes them when its flush holds a quarter of the "
                 "batch (frames of different workers interleaved); 'a frame per live flush' "
                 "groups them as a live emitter's 50 ms flushes do (lifecycle events at once), "
                 f"{frames} frames: what a fleet's log holds")
    raw["replay"] = {"wantel": replay_w, "es": replay_e, "wantel_decode_only": decode_w,
                     "es_decode_only": decode_e, "wantel_frame_per_worker": framed_w,
                     "wantel_frame_per_live_flush": flushed_w, "live_flush_frames": frames,
                     "wantel_pure_python": pure_w,
                     "wantel_frame_per_live_flush_pure_python": pure_flushed_w,
                     "page": cfg.page}
    shutil.rmtree(wantel_log, ignore_errors=True)
    shutil.rmtree(frames_log, ignore_errors=True)
    shutil.rmtree(flushes_log, ignore_errors=True)
    return raw


# -- 3: emit() on the caller's thread -----------------------------------------------------------


def timer_overhead_ns(n: int) -> int:
    """Median cost of an empty timed region: two back-to-back ``perf_counter_ns`` calls."""
    pc = time.perf_counter_ns
    samples = [0] * n
    for i in range(n):
        t0 = pc()
        t1 = pc()
        samples[i] = t1 - t0
    samples.sort()
    return int(percentile(samples, 50))


def bench_emit(cfg: Config, rows: list[Row], notes: list[str]) -> dict[str, Any]:
    """Per-call cost of ``Emitter.emit`` with its thread appending to a durable LocalLog."""
    pc = time.perf_counter_ns
    n = cfg.emit_calls
    med: list[float] = []
    p99: list[float] = []
    p999: list[float] = []
    overheads: list[int] = []
    dropped: list[dict[str, int]] = []
    es_med: list[float] = []
    es_p99: list[float] = []
    trig_med: list[float] = []
    trig_p99: list[float] = []
    appended_total = 0
    early_flushes = 0
    for r in range(cfg.rounds):
        events = list(mixed_events(n, steps=cfg.steps, workers=cfg.workers, sequenced=False,
                                   prefix=f"emit{r}"))
        path = cfg.tmp / f"emit-{r}"
        log = LocalLog(path, fsync="always")
        emitter = Emitter(log, worker="bench", capacity=2 * n + 1024)
        emit = emitter.emit
        samples = [0] * n
        gc.collect()
        for i in range(n):
            ev = events[i]
            t0 = pc()
            emit(ev)
            t1 = pc()
            samples[i] = t1 - t0
        flushed = emitter.flush(timeout=120)
        # flush() can return before the writer thread has appended what it just drained
        # (reported separately); close() joins the thread, so count after it.
        early_flushes += int(flushed and emitter.stats().appended < n)
        emitter.close(timeout=120)
        log.close()
        stats = emitter.stats()
        stored = job_events_in(LocalLog(path, create=False))  # the emitter's own events aside
        assert stored == n and stats.appended >= n and not stats.errors, (stored, stats)
        appended_total += stored
        dropped.append(stats.dropped)
        overhead = timer_overhead_ns(n)
        overheads.append(overhead)
        samples.sort()
        med.append((percentile(samples, 50) - overhead) / 1e3)
        p99.append((percentile(samples, 99) - overhead) / 1e3)
        p999.append((percentile(samples, 99.9) - overhead) / 1e3)
        shutil.rmtree(path, ignore_errors=True)

        # eventsourcing: the caller triggers the event and saves the aggregate (durable).
        db = cfg.tmp / f"emit-es-{r}.db"
        app = es_app(db)
        save = app.save
        aggs: EsJobs = {}
        m = cfg.es_emit_calls
        es_samples = [0] * m
        gc.collect()
        for i in range(m):
            ev = events[i]
            t0 = pc()
            save(es_trigger(aggs, ev))
            t1 = pc()
            es_samples[i] = t1 - t0
        app.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        es_samples.sort()
        es_med.append((percentile(es_samples, 50) - overhead) / 1e3)
        es_p99.append((percentile(es_samples, 99) - overhead) / 1e3)

        # ...or only triggers it, in memory, and saves later (not durable, not concurrent).
        aggs = {}
        k = min(n, 10 * m)
        trig = [0] * k
        gc.collect()
        for i in range(k):
            ev = events[i]
            t0 = pc()
            es_trigger(aggs, ev)
            t1 = pc()
            trig[i] = t1 - t0
        trig.sort()
        trig_med.append((percentile(trig, 50) - overhead) / 1e3)
        trig_p99.append((percentile(trig, 99) - overhead) / 1e3)
        del aggs, events

    m_med = median(med)
    rows.append(Row("emit() caller cost, median [vs trigger+save per event]", "us", m_med,
                    median(es_med), False, "≤2 µs", m_med <= 2.0))
    rows.append(Row("emit() caller cost, p99 [vs trigger+save per event]", "us", median(p99),
                    median(es_p99), False))
    rows.append(Row("emit() caller cost, median [vs in-memory trigger only]", "us", m_med,
                    median(trig_med), False))
    all_dropped = {k: v for d in dropped for k, v in d.items()}
    notes.append(
        f"emit: {n} calls/round ({cfg.es_emit_calls} for trigger+save), timer overhead "
        f"{median(overheads)} ns subtracted (median of empty timed regions); p99.9 "
        f"{median(p999):.2f} µs; stats().dropped = {all_dropped or '{}'} over "
        f"{appended_total} events, all appended"
        + (f"; flush() returned True before all were appended in {early_flushes}/{cfg.rounds} "
           "rounds" if early_flushes else "")
    )
    return {"calls": n, "median_us": med, "p99_us": p99, "p999_us": p999,
            "timer_overhead_ns": overheads, "dropped": dropped, "early_flushes": early_flushes,
            "es_trigger_save_median_us": es_med, "es_trigger_save_p99_us": es_p99,
            "es_trigger_only_median_us": trig_med, "es_trigger_only_p99_us": trig_p99}


# -- 4: replay memory ---------------------------------------------------------------------------


def build_wantel_log(path: Path, events: Iterable[Event], batch: int) -> int:
    """Write ``events`` with big batches and no fsync; returns how many."""
    shutil.rmtree(path, ignore_errors=True)
    log = LocalLog(path, fsync="never")
    stored = 0
    for chunk in chunked(events, batch):
        log.append(chunk)
        stored += len(chunk)
    log.close()
    return stored


def jobs_projection(keep_finished: int | None = None) -> JobsProjection:
    """The jobs projection, bounded to ``keep_finished`` ended jobs where that is given."""
    if keep_finished is None:
        return JobsProjection()
    return JobsProjection(keep_finished=keep_finished)


def supports_keep_finished() -> bool:
    """Whether this wantel's jobs projection can bound how many ended jobs it keeps."""
    return "keep_finished" in inspect.signature(JobsProjection).parameters


def measure_memory(
    backend: str, path: Path, sample_every: int, page: int, keep_finished: int | None = None
) -> dict[str, Any]:
    """Replay in this (fresh) process and report RSS before, sampled peak, and after.

    Backends: ``wantel`` (the jobs projection, every job kept or ``keep_finished``),
    ``wantel-replay`` (what ``wantel replay --json`` does: every projection, each job's
    summary built once final, then the job retired) and ``es`` (eventsourcing).
    """
    proc = psutil.Process()
    folded = {"events": 0}
    if backend in ("wantel", "wantel-replay"):
        log = LocalLog(path, create=False, fsync="never")
        items: Iterator[Any] = log.read(0)

        def count(item: Any) -> int:
            return len(item.events) if isinstance(item, Batch) else 0
    else:
        app = es_app(path)
        to_domain = app.mapper.to_domain_event
        aggs: dict[UUID, Any] = {}
        items = es_pages(app, page)

        def count(item: Any) -> int:
            return len(item)

    gc.collect()
    before = proc.memory_info().rss
    peak = before
    samples = 0

    def sampled(items: Iterator[Any]) -> Iterator[Any]:
        """``items``, counting their events and sampling RSS every ``sample_every``."""
        nonlocal peak, samples
        for i, item in enumerate(items):
            folded["events"] += count(item)
            if i % sample_every == 0:
                peak = max(peak, proc.memory_info().rss)
                samples += 1
            yield item

    t0 = time.perf_counter()
    if backend == "wantel":
        engine = ProjectionEngine([jobs_projection(keep_finished)])
        for item in sampled(items):
            engine.apply_items((item,))
        seconds = time.perf_counter() - t0
        state: JobsState = engine.states["jobs"]
        jobs, steps = jobs_summary(state.jobs.values())
    elif backend == "wantel-replay":
        engine = ProjectionEngine(replay_projections())
        jobs, steps = jobs_summary(summarised(replay_streaming(sampled(items), engine), engine))
        seconds = time.perf_counter() - t0
    else:
        for notes_page in sampled(items):
            for note in notes_page:
                es_fold(aggs, to_domain(note))
        seconds = time.perf_counter() - t0
        jobs, steps = jobs_summary(aggs.values())
    after = proc.memory_info().rss
    peak = max(peak, after)
    count_events = folded["events"]
    return {"backend": backend, "events": count_events, "jobs": jobs, "steps": steps,
            "rss_before": before, "rss_peak_sampled": peak, "rss_after": after,
            "samples": samples,
            "seconds": seconds, "events_per_s": count_events / seconds}


def summarised(views: Iterable[JobView], engine: ProjectionEngine) -> Iterator[JobView]:
    """Each view, once its summary is built as ``wantel replay --json`` builds it."""
    for view in views:
        job_summary(view, engine)
        yield view


def run_memory_child(
    backend: str, path: Path, sample_every: int, page: int, keep_finished: int | None = None
) -> dict[str, Any]:
    """:func:`measure_memory` in a fresh interpreter, so earlier allocations cannot hide growth."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child-memory", backend, str(path),
         str(sample_every), str(page), str(keep_finished or 0)],
        check=True, capture_output=True, text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def bench_memory(cfg: Config, rows: list[Row], notes: list[str]) -> dict[str, Any]:
    """RSS growth while replaying big logs, for growing and for constant numbers of jobs."""
    raw: dict[str, Any] = {}
    per_job = events_per_job(cfg.steps)
    workloads: dict[str, Callable[[int], Iterator[Event]]] = {
        "jobs grow": lambda k: mixed_events(k, steps=cfg.steps, workers=cfg.workers,
                                            prefix="mem"),
        f"{cfg.steady_jobs} constant jobs": lambda k: steady_events(k, jobs=cfg.steady_jobs),
    }
    sizes = [cfg.mem_events]
    if cfg.es_mem_events != cfg.mem_events:
        sizes.append(cfg.es_mem_events)

    def growth(results: list[dict[str, Any]]) -> float:
        return median([(r["rss_peak_sampled"] - r["rss_before"]) / MB for r in results])

    for size in sizes:
        growths: dict[str, tuple[float, int]] = {}
        for label, make in workloads.items():
            path = cfg.tmp / "mem-wantel"
            t0 = time.perf_counter()
            built = build_wantel_log(path, make(size), cfg.mem_batch)
            build_s = time.perf_counter() - t0
            disk = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
            results = [run_memory_child("wantel", path, cfg.sample_every, cfg.page)
                       for _ in range(cfg.mem_rounds)]
            bounded: list[dict[str, Any]] = []
            streamed: list[dict[str, Any]] = []
            if size == cfg.mem_events and label == "jobs grow" and supports_keep_finished():
                bounded = [run_memory_child("wantel", path, cfg.sample_every, cfg.page,
                                            KEEP_FINISHED) for _ in range(cfg.mem_rounds)]
                streamed = [run_memory_child("wantel-replay", path, cfg.sample_every, cfg.page)
                            for _ in range(cfg.mem_rounds)]
            shutil.rmtree(path, ignore_errors=True)
            assert all(r["events"] == built for r in results)
            w = growth(results)
            es_results: list[dict[str, Any]] = []
            if size == cfg.es_mem_events:
                db = cfg.tmp / "mem-es.db"
                es_build(db, make(size), 10_000)
                es_results = [run_memory_child("es", db, max(1, cfg.sample_every * 4),
                                               cfg.page) for _ in range(cfg.mem_rounds)]
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{db}{suffix}").unlink(missing_ok=True)
                assert all(r["events"] == size for r in es_results)
                assert {(r["jobs"], r["steps"]) for r in es_results} == {
                    (r["jobs"], r["steps"]) for r in results}
            e = growth(es_results) if es_results else None
            jobs = results[0]["jobs"]
            name = f"replay RSS growth, {size / 1e6:g}M events, {label}" + (
                f" ({jobs} jobs)" if label == "jobs grow" else "")
            # The goal is a flat memory; a jobs projection that keeps every job grows with the
            # jobs by design (no command runs it so), so its growing row is information.
            is_goal = size == cfg.mem_events and label != "jobs grow"
            row = Row(name, "MB", w, e, False, "<50 MB" if is_goal else "info",
                      (w < 50) if is_goal else None)
            rows.append(row)
            if bounded:
                b = growth(bounded)
                rows.append(Row(f"replay RSS growth, {size / 1e6:g}M events, jobs grow, "
                                f"JobsProjection(keep_finished={KEEP_FINISHED})", "MB", b, None,
                                False, "<50 MB", b < 50))
                raw[f"{size}:{label}:keep_finished={KEEP_FINISHED}"] = bounded
            if streamed:
                g = growth(streamed)
                assert {(r["jobs"], r["steps"]) for r in streamed} == {
                    (r["jobs"], r["steps"]) for r in results}
                rows.append(Row(f"replay RSS growth, {size / 1e6:g}M events, jobs grow, as "
                                "`wantel replay --json` (every projection, ended jobs "
                                "retired once summarised)", "MB", g, None, False, "<50 MB",
                                g < 50))
                raw[f"{size}:{label}:wantel-replay"] = streamed
            rate = median([r["events_per_s"] for r in results])
            notes.append(
                f"memory [{size / 1e6:g}M, {label}]: log {disk / MB:.0f} MB on disk, built in "
                f"{build_s:.1f}s (batches of {cfg.mem_batch}, fsync never); replay "
                f"{rate / 1e6:.2f}M ev/s (in the child, sampling RSS every {cfg.sample_every} "
                f"batches); RSS before {results[0]['rss_before'] / MB:.0f} MB, after "
                f"{results[0]['rss_after'] / MB:.0f} MB"
            )
            growths[label] = (w, jobs)
            raw[f"{size}:{label}"] = {"wantel": results, "es": es_results,
                                      "events_per_job": per_job, "log_bytes": disk}
        (grow, jobs), (steady, _) = growths.values()
        if grow > steady and jobs >= 1000:
            notes.append(f"memory [{size / 1e6:g}M]: the jobs projection's state costs ≈"
                         f"{(grow - steady) * MB / jobs:,.0f} B of RSS per job (growth with "
                         f"growing jobs minus growth with constant jobs, over {jobs} jobs)")
    return raw


# -- main ---------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What ran the benchmark."""
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    root = Path(__file__).resolve().parent.parent
    code = {}
    for name in CODE_FILES:
        with contextlib.suppress(OSError):
            code[name] = hashlib.sha256((root / name).read_bytes()).hexdigest()[:10]
    return {"accelerators": accelerate.describe(), "nproc": os.cpu_count(), "cpu": model,
            "python": platform.python_version(),
            "code_sha256": code,
            "eventsourcing": package_version("eventsourcing"),
            "msgspec": msgspec.__version__, "sqlite": sqlite3.sqlite_version,
            "platform": platform.platform()}


def busy_cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds this process and its children
    have used): their difference over a run is what other processes took."""
    machine_times = psutil.cpu_times()
    busy = sum(machine_times) - machine_times.idle - getattr(machine_times, "iowait", 0.0)
    own = psutil.Process().cpu_times()
    return busy, own.user + own.system + own.children_user + own.children_system


def print_table(rows: list[Row]) -> None:
    """The compact results table."""
    header = ("metric", "wantel", "eventsourcing", "ratio", "goal", "result")
    lines = [
        (
            row.metric,
            fmt(row.wantel, row.unit),
            fmt(row.es, row.unit),
            "—" if row.ratio is None else f"{row.ratio:,.1f}×",
            row.goal,
            "info" if row.passed is None else ("PASS" if row.passed else "MISS"),
        )
        for row in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    aligns = ("<", ">", ">", ">", "<", "<")

    def render(cells: Sequence[str]) -> str:
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, aligns, widths, strict=True))

    print(render(header))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print(render(line))
    print("ratio: how many times better wantel is (throughput ÷, or cost ÷ inverted)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line."""
    parser = argparse.ArgumentParser(
        prog="log_bench.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The full run takes about 7 minutes on 2 cores; --quick under a minute.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: 30k events per round, 1M-event memory logs, "
                             "50k-event memory comparison (about a minute)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds per throughput/latency figure; medians are reported "
                             "(default 5)")
    parser.add_argument("--events", type=int, default=None,
                        help="events per append/replay round and emit() calls per round "
                             "(default 200000; 30000 with --quick)")
    parser.add_argument("--mem-events", type=int, default=None,
                        help="events in the replay-memory logs (default 10M; 1M with --quick)")
    parser.add_argument("--es-mem-events", type=int, default=None,
                        help="events in the smaller logs replayed by both for the memory "
                             "comparison (default 500k; 50k with --quick)")
    parser.add_argument("--mem-rounds", type=int, default=3,
                        help="fresh-process replays per memory figure, median reported (default "
                             "3: peak RSS varies by well under 1%% between replays, and five "
                             "10M-event replays per workload would not fit the time budget)")
    parser.add_argument("--batch", type=int, default=1000, help="events per append (1000)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps per job (50)")
    parser.add_argument("--workers", type=int, default=4,
                        help="concurrent workers whose jobs are interleaved (4)")
    parser.add_argument("--steady-jobs", type=int, default=4,
                        help="jobs in the constant-jobs memory workload (4)")
    parser.add_argument("--page", type=int, default=1000,
                        help="notifications per select_notifications page (1000)")
    parser.add_argument("--tmpdir", type=Path, default=None,
                        help="where the temporary logs and databases go (default: system temp)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT",
                        help="also write every round's figures to OUT as JSON")
    parser.add_argument("--child-memory", nargs=5, help=argparse.SUPPRESS,
                        metavar=("BACKEND", "PATH", "EVERY", "PAGE", "KEEP"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run everything, print the table, optionally write JSON."""
    args = parse_args(argv)
    if args.child_memory:
        backend, path, every, page, keep = args.child_memory
        print(json.dumps(measure_memory(backend, Path(path), int(every), int(page),
                                        int(keep) or None)))
        return 0
    quick = args.quick
    events = args.events or (30_000 if quick else 200_000)
    base = Path(tempfile.mkdtemp(prefix="wantel-bench-", dir=args.tmpdir))
    cfg = Config(
        rounds=max(1, args.rounds), events=events, batch=args.batch, steps=args.steps,
        workers=args.workers, steady_jobs=args.steady_jobs, emit_calls=events,
        es_emit_calls=min(events, 500 if quick else 2000), page=args.page,
        mem_events=args.mem_events or (1_000_000 if quick else 10_000_000),
        es_mem_events=args.es_mem_events or (50_000 if quick else 500_000),
        mem_rounds=max(1, args.mem_rounds),
        mem_batch=4096, sample_every=4, tmp=base, quick=quick,
    )
    info = machine()
    print(f"wantel log benchmark — {info['nproc']} CPUs, {info['cpu']}, Python "
          f"{info['python']}, eventsourcing {info['eventsourcing']}, SQLite {info['sqlite']}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print("code: " + ", ".join(f"{Path(k).name}@{v}" for k, v in info["code_sha256"].items()))
    print(f"hot loops: {accelerate.describe()}")
    print(f"workload: {cfg.workers} workers interleaved, {cfg.steps} steps/job = "
          f"{events_per_job(cfg.steps)} events/job; {cfg.events} events/round, "
          f"{cfg.rounds} rounds; memory logs {cfg.mem_events} and {cfg.es_mem_events} events, "
          f"{cfg.mem_rounds} replays each; temp {base}; load average "
          f"{os.getloadavg()[0]:.2f}")
    if cfg.rounds < 5:
        print("warning: fewer than 5 rounds")
    rows: list[Row] = []
    notes: list[str] = []
    results: dict[str, Any] = {"machine": info, "config": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg).items()}}
    started = time.perf_counter()
    machine_cpu0, own_cpu0 = busy_cpu_seconds()
    try:
        for name, bench in (("append_replay", bench_append_replay), ("emit", bench_emit),
                            ("memory", bench_memory)):
            t0 = time.perf_counter()
            results[name] = bench(cfg, rows, notes)
            print(f"  … {name} done in {time.perf_counter() - t0:.0f}s", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print()
    print_table(rows)
    print()
    for note in notes:
        print(f"- {note}")
    total = time.perf_counter() - started
    machine_cpu1, own_cpu1 = busy_cpu_seconds()
    others = max(0.0, (machine_cpu1 - machine_cpu0) - (own_cpu1 - own_cpu0))
    share = others / (total * (os.cpu_count() or 1))
    print(f"- total {total:.0f}s; other processes used {share:.0%} of the machine's CPU "
          f"meanwhile (load average now {os.getloadavg()[0]:.2f})"
          + ("; figures are depressed and scattered by that contention" if share > 0.1 else ""))
    results["other_cpu_share"] = share
    results["rows"] = [
        {"metric": r.metric, "unit": r.unit, "wantel": r.wantel, "eventsourcing": r.es,
         "ratio": r.ratio, "goal": r.goal, "passed": r.passed} for r in rows]
    results["notes"] = notes
    results["seconds"] = total
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"- wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
