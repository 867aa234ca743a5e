"""``wantel serve``'s wiring: one runner with the fan-out and the lifecycle lines, and span export
on a runner of its own that keeps serving while the collector is down."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from websockets.sync.client import connect

from exporters import prometheus
from exporters.liveness import LivenessSink
from exporters.logs import LifecycleLogger
from exporters.otel import SpanSink, spans_for_job
from exporters.queue_scores import QueueScorer
from exporters.service import FanOut, JobIndex
from telemetry.log.local import LocalLog
from tests.exporters.otlp_receiver import HttpReceiver
from tests.exporters.test_server import JobScript, recv_until
from tests.polling import wait_for
from wantel.logs import configure_logging
from wantel.serving import Serving


def test_serve_wires_every_follower_as_a_sink_of_a_runner(tmp_path: Path) -> None:
    """The service's runner tells the fan-out and the lifecycle log; span export has its own
    runner, which waits for a collector that is down while /ws/progress and the projections
    carry on, then exports each job once."""
    stream = io.StringIO()
    configure_logging(json=True, stream=stream, stdlib=False)
    receiver = HttpReceiver()  # not started yet: the collector is down
    log = LocalLog(tmp_path / "log")
    serving = Serving(log, port=0, otlp=receiver.endpoint)
    serving.log_lifecycle()
    serving.start()
    try:
        assert serving.service.wait_ready(20)
        service_sinks = [type(s) for s in serving.service.runner.sinks]
        # /metrics' backlog gauge reads what each step says was stored beyond it; its queue
        # scores are kept as the jobs start and end; the liveness sink declares silent workers
        # lost.
        assert [FanOut, JobIndex, LivenessSink, prometheus._Backlog, QueueScorer,
                LifecycleLogger] == service_sinks
        spans = serving._spans
        assert spans is not None and [SpanSink] == [type(s) for s in spans.sinks]
        with connect(f"ws://127.0.0.1:{serving.http.port}/ws/progress") as ws:
            recv_until(ws, lambda f: f["type"] == "caught_up")
            job = JobScript("served-1", steps=3).whole()
            last = log.append(job)[-1]
            frames = recv_until(ws, lambda f: f["type"] == "job_completed")
        assert last == frames[-1]["position"]
        wait_for(lambda: spans.held_back() is not None, "span export waiting for the collector")
        receiver.start()
        expected = spans_for_job(job)
        got = receiver.wait_for(lambda received: len(received) >= len(expected))
        assert sorted(s.name for s in expected) == sorted(s.name for s in got)
    finally:
        serving.stop()
        receiver.stop()
        log.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()
             if '"job": "served-1"' in line or '"job":"served-1"' in line]
    assert ["job.started", "stage.ended", "job.completed"] == [line["event"] for line in lines]
    assert (tmp_path / "log" / "checkpoints" / "otel.ckpt").exists()
    assert (tmp_path / "log" / "checkpoints" / "serve.ckpt").exists()


@pytest.mark.parametrize(("argv", "needle"), [
    (["--worker-timeout", "0"], "--worker-timeout"),
    (["--worker-timeout", "inf"], "--worker-timeout"),
    (["--trace-url", "http://jaeger:16686/trace/"], "{trace_id}"),
    (["--trace-url", "jaeger/{trace_id}"], "http(s)://"),
])
def test_bad_worker_timeout_or_trace_url_is_one_line_and_exit_2(
    argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`wantel serve` refuses a timeout that is not a number of seconds above 0, and a trace
    URL template without {trace_id} or not http(s), before it binds anything."""
    from wantel.cli import main

    assert 2 == main(["serve", "--log", str(tmp_path / "log"), "--port", "0", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert 1 == len(err) and needle in err[0]
