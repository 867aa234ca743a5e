"""deploy/fleet/worker.sh, the compose fleet's demo worker, run here as compose runs it (no
Docker engine on this machine): `wantel demo` writes tiny jobs into the local log, `wantel
ship` ships them to a real nats-server under $WANTEL_WORKER's subject, and SIGTERM stops both
cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.nats_server import NatsServer, free_port
from tests.polling import wait_for

from .fleet import assert_exactly_once, local_events, stream_count, stream_events

pytest.importorskip("nats")
pytest.importorskip("diffusers")  # wantel demo runs tiny Wan pipelines ([wan] extra)

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "fleet" / "worker.sh"


def listening(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
            return True
    except (urllib.error.URLError, OSError):
        return False


def test_the_demo_worker_ships_its_jobs_and_stops_cleanly(nats_server: NatsServer,
                                                          tmp_path: Path) -> None:
    port = free_port()
    log_dir = tmp_path / "log"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "WANTEL_LOG": str(log_dir), "WANTEL_NATS": nats_server.url,
           "WANTEL_WORKER": "worker-a", "WANTEL_DEMO_PORT": str(port)}
    output = tmp_path / "worker.out"
    with output.open("wb") as out:
        proc = subprocess.Popen(["sh", str(SCRIPT)], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: listening(port), "the demo's server", timeout=60, every=0.1)
        wait_for(lambda: any(not e.job.startswith("worker/")
                             for e in stream_events(nats_server.url))
                 if stream_count(nats_server.url) else False,
                 "a demo job's events in the stream", timeout=120, every=0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    text = output.read_text()
    assert 0 == code, text[-2000:]
    assert "as worker-a" in text and "event(s) shipped" in text  # the shipper ran and stopped
    assert not listening(port)  # the demo stopped too
    shipped = stream_events(nats_server.url)
    local = local_events(log_dir)
    shipped_keys = {(e.job, e.seq) for e in shipped}
    assert_exactly_once([e for e in local if (e.job, e.seq) in shipped_keys], shipped)
