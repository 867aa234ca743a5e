"""Spans of jobs that have not ended: exported as they are known, and abandoned jobs' roots.

The acceptance test kills a real ``wantel run`` with SIGKILL in the middle of its denoise loop,
while a real ``wantel serve --otlp … --worker-timeout 2`` follows the log: the in-test OTLP
receiver must then hold the job's root and stage spans, the root ended with an error status.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from exporters.otel import SpanSink, default_resource, spans_for_job
from telemetry.engine import ProjectionEngine
from telemetry.events import (
    Event,
    JobStarted,
    StageEnded,
    StageStarted,
    StepEnded,
    WorkerHeartbeat,
    stream_of_worker,
)
from telemetry.log.local import LocalLog
from telemetry.projections.eta import EtaProjection
from telemetry.runner import ProjectionRunner
from tests.exporters.otlp_receiver import RECEIVERS, OtlpReceiver
from tests.exporters.test_server import JobScript
from tests.polling import wait_for

ROOT = Path(__file__).resolve().parents[2]
STATUS_ERROR = 2  # opentelemetry.proto.trace.v1.Status.STATUS_CODE_ERROR
NOT_SAMPLED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"


def running_job(job: str = "j1", *, worker: str = "w1", steps: int = 6) -> tuple[JobScript,
                                                                                 list[Event]]:
    """A job that ended its load stage and is half-way through denoising, with no end."""
    script = JobScript(job, steps=steps, worker=worker)
    load = [script._next(StageStarted, stage="load"),
            script._next(StageEnded, stage="load", duration_s=0.01)]
    started = script.start()  # JobStarted, StageStarted(denoise)
    for index, event in enumerate([started[0], *load]):  # JobStarted first, seq gap-free
        load_or_start = msgspec.structs.replace(event, seq=index)
        if index == 0:
            head = [load_or_start]
        else:
            head.append(load_or_start)
    return script, [*head, started[1], *script.step_range(0, steps // 2)]


def sink_and_runner(log: LocalLog, **options: Any) -> tuple[SpanSink, InMemorySpanExporter,
                                                            ProjectionRunner]:
    """A span sink over an in-memory exporter, on a runner with the ETA projection."""
    exporter = InMemorySpanExporter()
    sink = SpanSink(exporter, **options)
    runner = ProjectionRunner(log, ProjectionEngine([EtaProjection()]), sinks=[sink])
    return sink, exporter, runner


def names(exporter: InMemorySpanExporter) -> list[str]:
    """The names of the spans exported so far, in order."""
    return [span.name for span in exporter.get_finished_spans()]


def test_finished_stages_are_exported_before_the_job_ends(tmp_path: Path) -> None:
    """A stage's span goes out at its StageEnded; the root waits for the job's end."""
    _, events = running_job()
    sink, exporter, runner = sink_and_runner(LocalLog(tmp_path / "log"))
    runner.log.append(events)
    runner.catch_up()
    assert ["stage.load"] == names(exporter)
    assert (1, 0) == (sink.stats.open_jobs, sink.stats.jobs_exported)


def test_a_silent_job_is_declared_abandoned_with_an_error(tmp_path: Path) -> None:
    """Once neither the job nor its worker was heard from for abandon_after_s (the sink's
    clock), the root and the open denoise stage are exported, ended at the job's last event
    with an ERROR status; the stage exported before is not sent again."""
    _, events = running_job()
    last = events[-1].ts
    now = {"ns": last}
    sink, exporter, runner = sink_and_runner(LocalLog(tmp_path / "log"), abandon_after_s=5.0,
                                             clock=lambda: now["ns"])
    runner.log.append(events)
    runner.catch_up()
    now["ns"] = last + 4_900_000_000
    sink.on_tick()
    runner.catch_up()
    assert ["stage.load"] == names(exporter)  # not yet: 4.9 s < 5 s
    now["ns"] = last + 5_100_000_000
    sink.on_tick()
    runner.catch_up()
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert ["stage.load", "video.generate", "stage.denoise"] == names(exporter)
    root, denoise = spans["video.generate"], spans["stage.denoise"]
    assert StatusCode.ERROR == root.status.status_code
    assert "abandoned" in (root.status.description or "")
    assert ("abandoned", 5.0) == (root.attributes["wantel.status"],
                                  root.attributes["wantel.abandoned_after_s"])
    last_step = [e for e in events if isinstance(e, StepEnded)][-1].ts  # the last it spans
    assert (last_step, last_step) == (root.end_time, denoise.end_time)
    assert (StatusCode.ERROR, "abandoned") == (denoise.status.status_code,
                                               denoise.attributes["wantel.stage.closed_by"])
    assert 3 == len(denoise.events)  # the three steps it did
    assert (1, 1, 0) == (sink.stats.jobs_exported, sink.stats.abandoned_jobs,
                         sink.stats.open_jobs)


def test_a_heartbeat_of_its_worker_keeps_a_quiet_job_open(tmp_path: Path) -> None:
    """A job that is quiet while its worker still beats is not abandoned (it may be in a long
    stage): the jobs projection's rule."""
    _, events = running_job()
    last = events[-1].ts
    beat = WorkerHeartbeat(job=stream_of_worker("w1"), seq=0, ts=last + 4_000_000_000,
                           worker="w1", host="h", pid=1)
    now = {"ns": last + 6_000_000_000}
    sink, _exporter, runner = sink_and_runner(LocalLog(tmp_path / "log"), abandon_after_s=5.0,
                                             clock=lambda: now["ns"])
    runner.log.append([*events, beat])
    runner.catch_up()
    sink.on_tick()
    assert (1, 0) == (sink.stats.open_jobs, sink.stats.abandoned_jobs)
    now["ns"] = last + 9_100_000_000  # 5.1 s after the heartbeat too
    sink.on_tick()
    assert (0, 1) == (sink.stats.open_jobs, sink.stats.abandoned_jobs)


def test_an_abandoned_job_speaking_again_opens_no_second_root(tmp_path: Path) -> None:
    """Late events of a job declared abandoned are no part of a new trace; its terminal
    exports nothing more."""
    script, events = running_job()
    now = {"ns": events[-1].ts + 10**10}
    sink, exporter, runner = sink_and_runner(LocalLog(tmp_path / "log"), abandon_after_s=1.0,
                                             clock=lambda: now["ns"])
    runner.log.append(events)
    runner.catch_up()
    sink.on_tick()
    runner.catch_up()
    exported = len(exporter.get_finished_spans())
    runner.log.append(script.step_range(3, 6) + script.finish())
    runner.catch_up()
    assert exported == len(exporter.get_finished_spans())
    assert 0 == sink.stats.open_jobs


def test_the_live_runner_ticks_while_the_log_is_idle(tmp_path: Path) -> None:
    """Following live with nothing new to read, the runner still calls the sink, so a killed
    job's root goes out after the timeout, on the real clock."""
    _, events = running_job()
    sink, exporter, runner = sink_and_runner(LocalLog(tmp_path / "log"), abandon_after_s=0.5)
    runner.log.append(events)
    runner.start()
    try:
        wait_for(lambda: "video.generate" in names(exporter), "the abandoned root", timeout=10)
    finally:
        assert runner.stop()
    assert 1 == sink.stats.abandoned_jobs


def test_a_caller_that_did_not_sample_gets_no_spans(tmp_path: Path) -> None:
    """A traceparent with the sampled flag off: nothing of the job is exported."""
    script = JobScript("quiet", steps=2, worker="w1")
    start = script.start()
    started = start[0]
    assert isinstance(started, JobStarted)
    events = [JobStarted(**{**{f: getattr(started, f) for f in started.__struct_fields__},
                            "traceparent": NOT_SAMPLED}),
              start[1], *script.step_range(0, 2), *script.finish()]
    assert [] == spans_for_job(events)
    sink, exporter, runner = sink_and_runner(LocalLog(tmp_path / "log"))
    runner.log.append(events)
    runner.catch_up()
    assert ([], 0) == (names(exporter), sink.stats.open_jobs)


def test_a_reused_job_id_gets_a_trace_per_run(tmp_path: Path) -> None:
    """An older log with two runs under one id (the second's seq carrying on): two roots in
    two traces, each with its own stages."""
    first = JobScript("again", steps=2, worker="w1")
    run1 = first.start() + first.step_range(0, 2) + first.finish()
    second = JobScript("again", steps=2, worker="w1", ago_s=-1)
    second.seq = first.seq
    run2 = second.start() + second.step_range(0, 2) + second.finish()
    sink, exporter, runner = sink_and_runner(LocalLog(tmp_path / "log"))
    runner.log.append(run1 + run2)
    runner.catch_up()
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.name == "video.generate"]
    assert 2 == len(roots)
    traces = {s.context.trace_id for s in roots}
    assert 2 == len(traces)
    assert 2 == sink.stats.jobs_exported
    assert len(spans) == len({s.context.span_id for s in spans})
    for root in roots:
        children = [s for s in spans if s.parent is not None
                    and s.parent.span_id == root.context.span_id]
        assert ["stage.denoise"] == [s.name for s in children]


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "wantel"),
    ({"OTEL_SERVICE_NAME": "video-api"}, "video-api"),
    ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=gen%20worker,deployment.environment=prod"},
     "gen worker"),
    ({"OTEL_SERVICE_NAME": "svc", "OTEL_RESOURCE_ATTRIBUTES": "service.name=other"}, "svc"),
])
def test_the_service_name_follows_the_opentelemetry_variables(
    env: dict[str, str], expected: str
) -> None:
    """OTEL_SERVICE_NAME wins, then service.name in OTEL_RESOURCE_ATTRIBUTES, then wantel."""
    resource = default_resource(env)
    assert expected == resource.attributes["service.name"]
    if "deployment.environment" in env.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        assert "prod" == resource.attributes["deployment.environment"]


# -- acceptance: a real wantel run, killed ------------------------------------------------------


@pytest.fixture(name="receiver")
def _receiver() -> Iterator[OtlpReceiver]:
    """A real OTLP/HTTP receiver, started."""
    receiver = RECEIVERS["http"]()
    receiver.start()
    yield receiver
    receiver.stop()


def _first_step(log_dir: Path) -> str | None:
    """The job id of the first StepEnded in the log, once there is one."""
    if not log_dir.exists():
        return None
    log = LocalLog(log_dir, create=False)
    try:
        for item in log.read():
            for event in getattr(item, "events", ()):
                if isinstance(event, StepEnded):
                    return event.job
    finally:
        log.close()
    return None


def test_a_killed_wantel_run_is_exported_as_abandoned(tmp_path: Path,
                                                      receiver: OtlpReceiver) -> None:
    """SIGKILL mid-denoise: after the worker timeout, the receiver holds the root (ERROR) and
    the stage spans of the job — the ones it finished and the denoise it died in."""
    log_dir = tmp_path / "log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    serve = subprocess.Popen(
        [sys.executable, "-m", "wantel", "serve", "--log", str(log_dir), "--port", "0",
         "--otlp", receiver.endpoint, "--worker-timeout", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    run = None
    try:
        assert serve.stdout is not None
        assert serve.stdout.readline().startswith("wantel serve: following")
        run = subprocess.Popen(
            [sys.executable, "-m", "wantel", "run", "--model", "tiny-t2v", "--prompt", "a fox",
             "--steps", "1000", "--log", str(log_dir), "--out", str(tmp_path / "fox.mp4")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, env=env)
        job = wait_for(lambda: _first_step(log_dir), "the job's first step", timeout=120,
                       every=0.05)
        run.send_signal(signal.SIGKILL)
        assert -signal.SIGKILL == run.wait(10)
        root = wait_for(lambda: next((s for s in receiver.spans
                                      if s.name == "video.generate"), None),
                        "the abandoned root span", timeout=30)
        serve.send_signal(signal.SIGTERM)
        assert 0 == serve.wait(20)
    finally:
        for proc in (run, serve):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
    spans = [s for s in receiver.spans if s.trace_id == root.trace_id]
    stages = {s.name: s for s in spans if s.parent_span_id == root.span_id}
    assert (STATUS_ERROR, "abandoned", job) == (
        root.status_code, root.attributes["wantel.status"], root.attributes["wantel.job"])
    assert {"stage.load", "stage.text_encode", "stage.denoise"} <= set(stages)
    assert STATUS_ERROR == stages["stage.denoise"].status_code
    assert "abandoned" == stages["stage.denoise"].attributes["wantel.stage.closed_by"]
    assert {1} == set(receiver.span_counts().values())  # each span once
    assert "wantel" == root.resource["service.name"]
