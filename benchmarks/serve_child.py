"""``wantel serve`` in a child process, for the benchmarks that measure it from outside."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


def start_server(log_dir: Path, wantel: Sequence[str], *, env: Mapping[str, str] | None = None,
                 timeout: float = 60.0) -> tuple[subprocess.Popen[str], int]:
    """``wantel serve --port 0`` on ``log_dir`` (``wantel``: the command that runs wantel);
    returns the process and the port, read from its banner. Exits the benchmark if it does
    not start within ``timeout`` seconds."""
    proc = subprocess.Popen(
        [*wantel, "serve", "--log", str(log_dir), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=None if env is None else dict(env))
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        found = re.search(r"WebSocket\s+ws://127\.0\.0\.1:(\d+)/", line)
        if found:
            return proc, int(found.group(1))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit("wantel serve did not start")
