"""A real Prometheus scrapes wantel's /metrics while real tiny jobs run, exemplars included."""

from __future__ import annotations

import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from exporters.prometheus import make_registry, render
from telemetry.engine import ProjectionEngine
from telemetry.log.local import LocalLog
from telemetry.projections import default_projections
from telemetry.runner import ProjectionRunner
from tests.e2e.jobs import run_traces
from tests.e2e.servers import PROMETHEUS, get_json, poll, prometheus_config, run_prometheus

MAX_JOBS = 500  # a safety bound: jobs run back to back until the test ends

pytestmark = pytest.mark.skipif(not PROMETHEUS.exists(), reason="no /usr/bin/prometheus")


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    """An empty local log."""
    LocalLog(tmp_path / "log", fsync="never").close()
    return tmp_path / "log"


@pytest.fixture
def runner(log_dir: Path) -> Iterator[ProjectionRunner]:
    """A runner following the log live in its thread (``ProjectionRunner.follow``), as
    `wantel serve`'s TelemetryService runs it."""
    runner = ProjectionRunner(LocalLog(log_dir, create=False),
                              ProjectionEngine(default_projections()), poll_interval=0.05)
    runner.start()
    try:
        yield runner
    finally:
        assert runner.stop(timeout=10)


@pytest.fixture
def metrics_url(runner: ProjectionRunner) -> Iterator[str]:
    """A minimal /metrics endpoint on a free loopback port serving ``render()``."""
    registry: CollectorRegistry = make_registry(runner)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body, content_type = render(registry, self.headers.get("Accept"))
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per scrape would drown the test output

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def prometheus(tmp_path: Path, metrics_url: str) -> Iterator[tuple[str, Path]]:
    """A real Prometheus (exemplar storage on) scraping ``metrics_url`` every second."""
    with run_prometheus(tmp_path / "prometheus", prometheus_config(metrics_url)) as server:
        yield server.base, server.output


@pytest.fixture
def running_jobs(log_dir: Path, tmp_path: Path) -> Iterator[list[str]]:
    """Real tiny jobs (32 px, 5 frames, 2 steps) run back to back in a thread; yields their ids."""
    import torch

    from inference.runner import GenerationRequest, generate, prepare
    from telemetry.emitter import Emitter

    torch.set_num_threads(1)
    started: list[str] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def work() -> None:
        log = LocalLog(log_dir, create=False, fsync="never")
        try:
            with Emitter(log, flush_interval=0.02) as emitter:
                for i in range(MAX_JOBS):
                    if stop.is_set():
                        return
                    job = f"e2e-{i}"
                    started.append(job)
                    request = GenerationRequest(
                        model="tiny-t2v", prompt="waves", frames=5, height=32, width=32,
                        steps=2, job=job, device="cpu", out=str(tmp_path / "out.mp4"))
                    generate(prepare(request), emitter)
        except BaseException as exc:
            errors.append(exc)
        finally:
            log.close()

    thread = threading.Thread(target=work, name="tiny-jobs", daemon=True)
    thread.start()
    try:
        yield started
    finally:
        stop.set()
        thread.join(timeout=60)
    assert [] == errors


def test_prometheus_scrapes_steps_and_exemplars(
    prometheus: tuple[str, Path], running_jobs: list[str], log_dir: Path
) -> None:
    """Prometheus sees the step counter rise while jobs run; exemplars carry their trace ids."""
    base, output = prometheus
    since = time.time() - 600

    def detail() -> str:
        targets = get_json(f"{base}/api/v1/targets")["data"]["activeTargets"]
        health = [(t["health"], t["lastError"]) for t in targets]
        return f"targets: {health}\n{output.read_text()[-2000:]}"

    def steps() -> float | None:
        query = urllib.parse.urlencode({"query": "sum(wantel_denoise_steps_total)"})
        result = get_json(f"{base}/api/v1/query?{query}")["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    first = poll("wantel_denoise_steps_total scraped", steps, detail=detail)

    def risen() -> float | None:
        value = steps()
        return value if value is not None and value > first else None

    rose = poll("wantel_denoise_steps_total increasing", risen, detail=detail)
    assert rose > first

    def exemplar_traces() -> set[str] | None:
        query = urllib.parse.urlencode({
            "query": "wantel_denoise_step_duration_seconds_bucket",
            "start": f"{since:.3f}", "end": f"{time.time() + 60:.3f}"})
        series = get_json(f"{base}/api/v1/query_exemplars?{query}")["data"]
        traces = {e["labels"]["trace_id"] for s in series for e in s["exemplars"]}
        return traces or None

    traces = poll("exemplars with trace_id", exemplar_traces, detail=detail)
    expected = run_traces(log_dir, list(running_jobs))
    assert set() == traces - expected  # every exemplar names the trace of a job that ran
