"""Liveness as events: a silent worker is declared lost once, however many aggregators follow
the log (a real LocalLog; a real nats-server), every view then agrees, and a worker that
stopped cleanly is never declared lost."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry
from websockets.sync.client import connect

from exporters.liveness import LivenessSink
from exporters.otel import SpanSink
from exporters.prometheus import WantelCollector
from exporters.service import TelemetryService
from telemetry.emitter import Emitter
from telemetry.engine import ProjectionEngine
from telemetry.events import (
    DeviceInfo,
    Event,
    JobStarted,
    StageStarted,
    StepEnded,
    WorkerHeartbeat,
    WorkerLost,
    WorkerStopped,
)
from telemetry.log.base import Batch, EventLog
from telemetry.log.local import LocalLog
from telemetry.log.memory import MemoryLog
from telemetry.projections.eta import EtaProjection
from telemetry.runner import ProjectionRunner
from tests.exporters.test_server import opening, recv_until, served
from tests.polling import wait_for

TIMEOUT_S = 1.0


def a_running_job(job: str, worker: str, ts: int) -> list[Event]:
    """A job that started and took two steps on ``worker`` at ``ts``, and its heartbeat."""
    kw = {"job": job, "worker": worker}
    return [
        WorkerHeartbeat(job=f"worker/{worker}", seq=0, ts=ts, worker=worker, host="gpu-1",
                        pid=42),
        JobStarted(**kw, seq=0, ts=ts, model="tiny-t2v", family="wan2.1", variant="tiny-t2v",
                   task="t2v", width=32, height=32, num_frames=5, steps=8,
                   guidance_scale=5.0, cfg=True, device=DeviceInfo(kind="cpu", name="cpu")),
        StageStarted(**kw, seq=1, ts=ts + 1, stage="denoise"),
        StepEnded(**kw, seq=2, ts=ts + 2, step=0, total_steps=8, duration_s=0.1),
        StepEnded(**kw, seq=3, ts=ts + 3, step=1, total_steps=8, duration_s=0.1),
    ]


def all_events(log: EventLog) -> list[Event]:
    """Every event ``log`` holds, in order."""
    return [e for item in log.read() if isinstance(item, Batch) for e in item.events]


def declarations(log: EventLog) -> list[WorkerLost]:
    """The WorkerLost records ``log`` holds."""
    return [e for e in all_events(log) if isinstance(e, WorkerLost)]


def job_status(service: TelemetryService, job: str) -> tuple[str, str | None]:
    """The job's status and abandon reason in the service's jobs projection."""
    view = service.read_states(lambda states: states["jobs"].jobs.get(job))
    return (view.status, view.abandon_reason) if view is not None else ("unknown", None)


@contextmanager
def aggregators(logs: list[EventLog], tmp_path: Path) -> Iterator[list[TelemetryService]]:
    """One service per log object (each its own checkpoints), each declaring lost workers."""
    with ExitStack() as stack:
        services = []
        for n, log in enumerate(logs):
            service = TelemetryService(log, checkpoint_dir=tmp_path / f"agg-{n}",
                                       worker_timeout_s=TIMEOUT_S,
                                       declare_lost_as=f"agg-{n}", poll_interval=0.02)
            stack.enter_context(service)
            services.append(service)
        for service in services:
            assert service.wait_ready(20)
        yield services


def test_two_aggregators_on_one_local_log_write_one_worker_lost(tmp_path: Path) -> None:
    """A worker goes silent mid-job; two services follow the log and both notice: the log
    holds exactly one WorkerLost, and each service's jobs projection has the job abandoned,
    'worker lost'."""
    log_dir = tmp_path / "log"
    writer = LocalLog(log_dir)
    writer.append(a_running_job("j1", "w1", time.time_ns()))
    readers: list[EventLog] = [LocalLog(log_dir), LocalLog(log_dir)]
    with aggregators(readers, tmp_path) as services:
        for service in services:
            wait_for(lambda s=service: job_status(s, "j1") == ("abandoned", "worker lost"),
                     "the job abandoned as its worker lost", timeout=30)
        # Both checked again after the declaration was applied: still one.
        for service in services:
            assert service.liveness is not None
            checked = time.time_ns()
            wait_for(lambda s=service, t=checked: s.liveness._last_check > t, "another check")
    lost = declarations(writer)
    assert 1 == len(lost)
    assert ("w1", "wantel/lost/w1", 0) == (lost[0].worker, lost[0].job, lost[0].seq)
    assert lost[0].declared_by in ("agg-0", "agg-1")
    assert lost[0].last_seen_ts == all_events(writer)[-2].ts  # the last step's time
    assert 1 == sum(s.liveness.declared for s in services if s.liveness is not None)


def test_a_duplicate_declaration_that_slipped_through_counts_once(tmp_path: Path) -> None:
    """Two WorkerLost for one silence under different seqs (written without the log's
    check): the job is abandoned once, the worker lost once, and lost-job metrics count 1."""
    log = MemoryLog()
    events = a_running_job("j1", "w1", time.time_ns() - 100 * 10**9)
    log.append(events)
    last = events[-1].ts
    for n in range(2):
        log.append([WorkerLost(job="wantel/lost/w1", seq=n, ts=last + 70 * 10**9 + n,
                               worker="w1", last_seen_ts=last, declared_by=f"agg-{n}")])
    with TelemetryService(log, checkpoint_dir=tmp_path / "c") as service:
        assert service.wait_ready(20)
        registry = CollectorRegistry()
        registry.register(WantelCollector(service.runner, worker_timeout_s=60))
        lost = registry.get_sample_value("wantel_jobs_lost",
                                         {"model": "tiny-t2v", "worker": "w1"})
        assert 1.0 == lost
        assert ("abandoned", "worker lost") == job_status(service, "j1")


def test_every_view_agrees_once_a_worker_is_declared_lost(tmp_path: Path) -> None:
    """Over HTTP: the WebSocket sends the job's terminal frame (job_abandoned, reason
    'worker lost'), /api/jobs shows it abandoned with the reason, /metrics counts it lost and
    the worker not alive, and a span export runner on the same log ends the job's root span
    with an ERROR status 'worker lost'."""
    log_dir = tmp_path / "log"
    writer = LocalLog(log_dir)
    writer.append(a_running_job("j1", "w1", time.time_ns()))
    exporter = InMemorySpanExporter()
    spans = ProjectionRunner(LocalLog(log_dir), ProjectionEngine([EtaProjection()]),
                             sinks=[SpanSink(exporter, abandon_after_s=600)],
                             poll_interval=0.02, name="test-spans")
    spans.start()
    try:
        with served(log_dir, worker_timeout_s=TIMEOUT_S, declare_lost_as="agg",
                    poll_interval=0.02) as s, connect(s.ws_url()) as ws:
            snapshot, _ = opening(ws)
            assert ["j1"] == [v["job"] for v in snapshot["data"]["running"]]
            frames = recv_until(ws, lambda f: f["type"] == "job_abandoned", timeout=30)
            end = frames[-1]
            assert ("j1", "worker lost", "w1", "agg") == (
                end["job"], end["data"]["reason"], end["data"]["worker"],
                end["data"]["declared_by"])
            assert ("abandoned", "worker lost") == (end["data"]["view"]["status"],
                                                    end["data"]["view"]["abandon_reason"])
            jobs = httpx.get(s.base + "api/jobs", timeout=10).json()
            assert [] == jobs["running"]
            listed = {j["job"]: j for j in jobs["finished"]}
            assert ("abandoned", "worker lost") == (listed["j1"]["status"],
                                                    listed["j1"]["abandon_reason"])
            video = httpx.get(s.base + "v1/videos/j1", timeout=10).json()
            assert ("failed", "abandoned") == (video["status"], video["error"]["code"])
            assert video["error"]["message"].startswith("worker lost")
            metrics = httpx.get(s.base + "metrics", timeout=10).text
            assert 'wantel_jobs_lost{model="tiny-t2v",worker="w1"} 1.0' in metrics
            assert "wantel_workers_alive 0.0" in metrics
        wait_for(lambda: [sp for sp in exporter.get_finished_spans()
                          if sp.name == "video.generate"], "the job's root span", timeout=30)
    finally:
        spans.shutdown()
    root = next(sp for sp in exporter.get_finished_spans() if sp.name == "video.generate")
    assert (StatusCode.ERROR, "worker lost") == (root.status.status_code,
                                                 root.status.description)
    assert "abandoned" == (root.attributes or {})["wantel.status"]


def test_scale_down_raises_no_worker_lost(tmp_path: Path) -> None:
    """A worker whose emitter closed cleanly (WorkerStopped) after its job, watched by two
    aggregators past the liveness timeout: no WorkerLost, nothing abandoned, the job stays
    completed, and no worker is alive."""
    log_dir = tmp_path / "log"
    writer = LocalLog(log_dir)
    emitter = Emitter(writer, worker="w1", heartbeat_interval=0.05)
    now = time.time_ns()
    for event in a_running_job("j1", "w1", now)[1:]:
        emitter.emit(type(event)(**{f: getattr(event, f) for f in event.__struct_fields__
                                    if f != "seq"}))
    from telemetry.events import JobCompleted

    emitter.emit(JobCompleted(job="j1", ts=now + 10, worker="w1", duration_s=0.2))
    emitter.close()
    stopped_at = next(e for e in all_events(writer) if isinstance(e, WorkerStopped)).ts
    with aggregators([LocalLog(log_dir), LocalLog(log_dir)], tmp_path) as services:
        for service in services:  # each has checked once the timeout had long passed
            wait_for(lambda s=service: s.liveness._last_check
                     > stopped_at + 3 * TIMEOUT_S * 1e9, "a check past the timeout",
                     timeout=30)
        assert [("completed", None)] * 2 == [job_status(s, "j1") for s in services]
        alive = [s.read_states(lambda st: st["jobs"].alive_workers(600)) for s in services]
        assert [[], []] == alive
    assert [] == declarations(writer)


def test_a_worker_that_comes_back_is_alive_again(tmp_path: Path) -> None:
    """Declared lost, then a new heartbeat: alive again (and a later silence is declared
    anew, under the next seq)."""
    log = MemoryLog()
    log.append(a_running_job("j1", "w1", time.time_ns()))
    with TelemetryService(log, checkpoint_dir=tmp_path / "c", worker_timeout_s=TIMEOUT_S,
                          declare_lost_as="agg", poll_interval=0.02) as service:
        wait_for(lambda: job_status(service, "j1") == ("abandoned", "worker lost"),
                 "declared lost", timeout=30)
        log.append([WorkerHeartbeat(job="worker/w1", seq=1, ts=time.time_ns(), worker="w1",
                                    host="gpu-1", pid=42)])
        wait_for(lambda: service.read_states(
            lambda st: [w.worker for w in st["jobs"].alive_workers(600)]) == ["w1"],
            "alive again", timeout=10)
        wait_for(lambda: len(declarations(log)) == 2, "a second declaration", timeout=30)
    assert [0, 1] == [e.seq for e in declarations(log)]


def test_the_sink_refuses_an_engine_without_the_jobs_projection() -> None:
    """Declaring needs the workers the jobs projection keeps: said at once."""
    with pytest.raises(ValueError, match="jobs projection"):
        LivenessSink(MemoryLog(), ProjectionEngine([EtaProjection()]))


def test_two_aggregators_on_one_nats_stream_write_one_worker_lost(tmp_path: Path) -> None:
    """The same against a real nats-server: the worker's events in the fleet stream, two
    aggregators (each its own connection and checkpoints) following it, the worker silent
    mid-job: the stream holds one WorkerLost, and both abandon the job ('worker lost').
    Both may publish; the second publish carries the same Nats-Msg-Id and the server drops
    it."""
    pytest.importorskip("nats")
    from telemetry.log.nats import NatsLog, NatsOptions
    from tests.nats_server import NatsServer

    server = NatsServer(tmp_path / "store")
    server.start()
    try:
        worker = NatsLog(NatsOptions(server.url), worker="w1")
        worker.append(a_running_job("j1", "w1", time.time_ns()))
        readers: list[EventLog] = [NatsLog(NatsOptions(server.url, reconnect=True))
                                   for _ in range(2)]
        try:
            with aggregators(readers, tmp_path) as services:
                for service in services:
                    wait_for(lambda s=service: job_status(s, "j1")
                             == ("abandoned", "worker lost"), "abandoned, worker lost",
                             timeout=30)
                for service in services:
                    checked = time.time_ns()
                    wait_for(lambda s=service, t=checked: s.liveness._last_check > t,
                             "another check")
            lost = declarations(worker)
            assert 1 == len(lost)
            assert ("w1", 0) == (lost[0].worker, lost[0].seq)
        finally:
            for reader in readers:
                reader.close()
            worker.close()
    finally:
        server.stop()


def _declaration(n: int = 0) -> WorkerLost:
    return WorkerLost(job="wantel/lost/w1", seq=n, ts=5, worker="w1", last_seen_ts=1,
                      declared_by="agg")


def test_append_new_on_a_local_log_writes_one_copy(tmp_path: Path) -> None:
    """Two log objects (as two processes) append the same declaration from the same known
    position: the second finds the first's under the log's lock and writes nothing."""
    first, second = LocalLog(tmp_path / "log"), LocalLog(tmp_path / "log")
    first.append(a_running_job("j1", "w1", 1))
    since = 5
    assert [_declaration()] == first.append_new([_declaration()], since)
    assert [] == second.append_new([_declaration()], since)
    assert [_declaration(1)] == second.append_new([_declaration(), _declaration(1)], since)
    assert [0, 1] == [e.seq for e in declarations(first)]


def test_append_new_on_nats_is_one_message_even_when_both_publish(tmp_path: Path) -> None:
    """Two connections that both publish the declaration (each checked before the other
    wrote): the server drops the second by its Nats-Msg-Id; the stream holds one."""
    pytest.importorskip("nats")
    from telemetry.log.nats import NatsLog, NatsOptions
    from tests.nats_server import NatsServer

    server = NatsServer(tmp_path / "store")
    server.start()
    a = NatsLog(NatsOptions(server.url))
    b = NatsLog(NatsOptions(server.url))
    try:
        a.append(a_running_job("j1", "w1", 1))
        a.append([_declaration()])
        b.append([_declaration()])  # as append_new would after a check that raced a's write
        assert [_declaration()] == declarations(a)
        assert [] == b.append_new([_declaration()], 0)
    finally:
        a.close()
        b.close()
        server.stop()


WORKER = """
import sys, time
from telemetry.emitter import Emitter
from telemetry.events import DeviceInfo, JobStarted, StepEnded
from telemetry.log.local import LocalLog

log_dir, worker, mode = sys.argv[1], sys.argv[2], sys.argv[3]
emitter = Emitter(LocalLog(log_dir), worker=worker, heartbeat_interval=0.1)
job = f"{worker}-job"
emitter.emit(JobStarted(job=job, ts=time.time_ns(), model="tiny-t2v", family="wan2.1",
                        variant="tiny-t2v", task="t2v", width=32, height=32, num_frames=5,
                        steps=1000, guidance_scale=5.0, cfg=True,
                        device=DeviceInfo(kind="cpu", name="cpu")))
for step in range(1000):
    emitter.emit(StepEnded(job=job, ts=time.time_ns(), step=step, total_steps=1000,
                           duration_s=0.01))
    emitter.flush(5)
    if step == 2:
        print("running", flush=True)
        if mode == "stop":
            break
    time.sleep(0.01)
emitter.close()
"""


def test_a_killed_worker_is_declared_lost_once_and_a_stopped_one_never(tmp_path: Path) -> None:
    """Real worker processes on one local log, two aggregators following it: the worker
    killed with SIGKILL mid-job is declared lost exactly once; the one that exits cleanly
    mid-job (WorkerStopped) never is, its job abandoned 'worker stopped'."""
    import signal
    import subprocess
    import sys

    log_dir = tmp_path / "log"
    LocalLog(log_dir).close()
    with aggregators([LocalLog(log_dir), LocalLog(log_dir)], tmp_path) as services:
        procs = {mode: subprocess.Popen([sys.executable, "-c", WORKER, str(log_dir), mode,
                                         mode], stdout=subprocess.PIPE, text=True)
                 for mode in ("killed", "stop")}
        try:
            for proc in procs.values():
                assert proc.stdout is not None
                assert "running" == proc.stdout.readline().strip()
            procs["killed"].send_signal(signal.SIGKILL)
            for proc in procs.values():
                proc.wait(30)
            for service in services:
                wait_for(lambda s=service: job_status(s, "killed-job")
                         == ("abandoned", "worker lost"), "the killed worker's job lost",
                         timeout=30)
                wait_for(lambda s=service: job_status(s, "stop-job")
                         == ("abandoned", "worker stopped"), "the stopped worker's job",
                         timeout=30)
            stopped_at = next(e.ts for e in all_events(LocalLog(log_dir))
                              if isinstance(e, WorkerStopped))
            for service in services:  # well past the stopped worker's timeout, checked again
                wait_for(lambda s=service: s.liveness._last_check
                         > stopped_at + 3 * TIMEOUT_S * 1e9, "a check past the timeout",
                         timeout=30)
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
    lost = declarations(LocalLog(log_dir))
    assert ["killed"] == [e.worker for e in lost]


def test_a_stop_mid_job_ends_its_trace_with_worker_stopped() -> None:
    """Span export over a log where the worker's WorkerStopped comes while its job runs: the
    root span ends at once, ERROR 'worker stopped' (no waiting out the timeout)."""
    log = MemoryLog()
    events = a_running_job("j1", "w1", 1_800_000_000 * 10**9)
    log.append([*events, WorkerStopped(job="worker/w1", seq=1, ts=events[-1].ts + 5,
                                       worker="w1", host="gpu-1", pid=42)])
    exporter = InMemorySpanExporter()
    runner = ProjectionRunner(log, ProjectionEngine([EtaProjection()]),
                              sinks=[SpanSink(exporter, abandon_after_s=600)])
    runner.catch_up()
    (root,) = [sp for sp in exporter.get_finished_spans() if sp.name == "video.generate"]
    assert (StatusCode.ERROR, "worker stopped") == (root.status.status_code,
                                                   root.status.description)


class _Lines:
    """A logger that keeps each line as (level, name, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, object]]] = []

    def __getattr__(self, level: str) -> object:
        return lambda name, **fields: self.lines.append((level, name, fields))


def test_the_lifecycle_log_says_job_abandoned(tmp_path: Path) -> None:
    """The lifecycle log (wantel serve's job lines) writes job.abandoned, a warning with the
    reason and the job's trace id, once the worker is declared lost, and nothing more."""
    from exporters.logs import LifecycleLogger
    from telemetry.tracing import job_trace_id

    log = MemoryLog()
    lines = _Lines()
    service = TelemetryService(log, checkpoint_dir=tmp_path / "c", worker_timeout_s=TIMEOUT_S,
                               declare_lost_as="agg", poll_interval=0.02)
    service.add_sink(LifecycleLogger(lines))
    with service:
        assert service.wait_ready(20)
        log.append(a_running_job("j1", "w1", time.time_ns()))
        wait_for(lambda: [n for _, n, _ in lines.lines if n == "job.abandoned"],
                 "the job.abandoned line", timeout=30)
        checked = time.time_ns()
        assert service.liveness is not None
        wait_for(lambda: service.liveness._last_check > checked, "another check")
    abandoned = [(level, fields) for level, name, fields in lines.lines
                 if name == "job.abandoned"]
    assert 1 == len(abandoned)
    level, fields = abandoned[0]
    assert ("warning", "j1", "worker lost", "agg", "w1") == (
        level, fields["job"], fields["reason"], fields["declared_by"], fields["worker"])
    started = next(f for _, n, f in lines.lines if n == "job.started")
    assert started["trace_id"] == fields["trace_id"] != job_trace_id("other")
