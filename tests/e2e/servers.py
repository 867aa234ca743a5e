"""Real servers for end-to-end tests: Prometheus, Alertmanager, a webhook sink, polling helpers.

Every server listens on a 127.0.0.1 port picked by binding port 0, is waited for by polling
with a deadline (never a fixed sleep), and is stopped by the context manager's ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")
ALERTMANAGER = Path("/usr/bin/prometheus-alertmanager")
AMTOOL = Path("/usr/bin/amtool")
REPO_PROMETHEUS_CONFIG = (Path(__file__).resolve().parents[2] / "dashboards" / "prometheus"
                          / "prometheus.yml")
DEADLINE_S = 30.0  # a new target is picked up only every ~5 s, scrapes come every 1 s

T = TypeVar("T")


def free_port() -> int:
    """A loopback port nobody listens on now (bound to 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def poll(what: str, check: Callable[[], T | None], *, deadline_s: float = DEADLINE_S,
         detail: Callable[[], str] = lambda: "", every_s: float = 0.2) -> T:
    """Call ``check`` every ``every_s`` until it returns something, or fail at the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            found = check()
        except OSError:  # not listening yet
            found = None
        if found is not None:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not seen within {deadline_s:.0f} s\n{detail()}")
        time.sleep(every_s)


def get_json(url: str) -> Any:
    """GET ``url`` and decode its JSON body."""
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def api(base: str, path: str, **params: str) -> Any:
    """``data`` of a Prometheus HTTP API answer; fails the test on an error answer."""
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    try:
        body = get_json(url)
    except urllib.error.HTTPError as exc:
        pytest.fail(f"{path} {params}: HTTP {exc.code}: {exc.read().decode(errors='replace')}")
    assert "success" == body["status"], body
    return body["data"]


@contextlib.contextmanager
def _process(argv: Sequence[str], output: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A child process with its output in ``output``, terminated (then killed) on exit."""
    with open(output, "wb") as sink:
        process = subprocess.Popen(list(argv), stdout=sink, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def _wait_ready(name: str, process: subprocess.Popen[bytes], url: str, output: Path) -> None:
    def ready() -> bool | None:
        if process.poll() is not None:
            pytest.fail(f"{name} exited: {output.read_text()[-3000:]}")
        with urllib.request.urlopen(url, timeout=2) as response:
            return True if response.status == 200 else None

    poll(f"{name} ready", ready, detail=lambda: output.read_text()[-3000:])


@dataclass
class Prometheus:
    """A running Prometheus: its base URL and log file."""

    base: str
    output: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query now."""
        result: list[dict[str, Any]] = api(self.base, "/api/v1/query", query=expr)["result"]
        return result

    def targets_detail(self) -> str:
        """Target health and the log tail, for failure messages."""
        try:
            targets = get_json(f"{self.base}/api/v1/targets")["data"]["activeTargets"]
            health = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets]
        except OSError as exc:
            health = [("?", "?", str(exc))]
        return f"targets: {health}\n{self.output.read_text()[-2000:]}"


def prometheus_config(targets: str, *, scrape_interval: str = "1s",
                      rule_files: Sequence[Path] = (), evaluation_interval: str = "1s",
                      alertmanager: str | None = None) -> str:
    """A Prometheus config scraping ``targets`` (``host:port``) as job ``wantel``."""
    lines = [
        "global:",
        f"  scrape_interval: {scrape_interval}",
        f"  scrape_timeout: {scrape_interval}",
        f"  evaluation_interval: {evaluation_interval}",
    ]
    if rule_files:
        lines += ["rule_files:", *(f"  - {path}" for path in rule_files)]
    if alertmanager:
        lines += ["alerting:", "  alertmanagers:", "    - static_configs:",
                  f"        - targets: ['{alertmanager}']"]
    lines += ["scrape_configs:", "  - job_name: wantel", "    static_configs:",
              f"      - targets: ['{targets}']"]
    return "\n".join(lines) + "\n"


def repo_prometheus_config(targets: str, *, rule_files: Sequence[Path] = (),
                           alertmanager: str | None = None, interval: str = "1s") -> str:
    """The repository's ``dashboards/prometheus/prometheus.yml`` pointed at loopback servers.

    Everything else (relabelling, the scrape job's name and settings) stays as compose runs
    it; only addresses and intervals change.
    """
    config: dict[str, Any] = yaml.safe_load(REPO_PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval=interval, scrape_timeout=interval,
                            evaluation_interval=interval)
    config["rule_files"] = [str(path) for path in rule_files]
    if alertmanager:
        config["alerting"]["alertmanagers"][0]["static_configs"] = [{"targets": [alertmanager]}]
    else:
        config.pop("alerting")
    scrape = [job for job in config["scrape_configs"] if job["job_name"] == "wantel"]
    assert 1 == len(scrape), "the repository's config must have one wantel scrape job"
    scrape[0].update(scrape_interval=interval, scrape_timeout=interval,
                     static_configs=[{"targets": [targets]}])
    config["scrape_configs"] = scrape
    return str(yaml.safe_dump(config, sort_keys=False))


@contextlib.contextmanager
def run_prometheus(workdir: Path, config_text: str,
                   extra_args: Sequence[str] = ()) -> Iterator[Prometheus]:
    """A real Prometheus (exemplar storage on) with ``config_text``, on a free loopback port."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(config_text)
    port = free_port()
    output = workdir / "prometheus.log"
    argv = [str(PROMETHEUS), f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--enable-feature=exemplar-storage",
            *extra_args]
    with _process(argv, output) as process:
        base = f"http://127.0.0.1:{port}"
        _wait_ready("prometheus", process, f"{base}/-/ready", output)
        yield Prometheus(base, output)


@contextlib.contextmanager
def run_alertmanager(workdir: Path, config_text: str) -> Iterator[str]:
    """A real Alertmanager (no cluster listener) on a free loopback port; yields ``host:port``."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "alertmanager.yml"
    config.write_text(config_text)
    port = free_port()
    output = workdir / "alertmanager.log"
    argv = [str(ALERTMANAGER), f"--config.file={config}",
            f"--storage.path={workdir / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="]
    with _process(argv, output) as process:
        _wait_ready("alertmanager", process, f"http://127.0.0.1:{port}/-/ready", output)
        yield f"127.0.0.1:{port}"


@dataclass
class Webhook:
    """A webhook receiver: every JSON body POSTed to it, in arrival order."""

    url: str
    bodies: list[dict[str, Any]] = field(default_factory=list)


@contextlib.contextmanager
def run_webhook() -> Iterator[Webhook]:
    """An HTTP server on a free loopback port collecting Alertmanager's webhook posts."""
    hook = Webhook(url="")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            with lock:
                hook.bodies.append(body)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hook.url = f"http://127.0.0.1:{server.server_address[1]}/alerts"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hook
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
