"""``wantel ship`` killed with SIGKILL at random moments while a worker writes its log, and
restarted each time: at the end the fleet stream holds every local event exactly once — job
tables and per-job event counts equal the local log's (real nats-server, real processes)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.nats_server import NatsServer

from .fleet import (
    assert_exactly_once,
    comparable,
    local_events,
    replay_json,
    start_emitter,
    start_shipper,
    stream_count,
    stream_events,
    wait_for_log,
)

pytest.importorskip("nats")

WORKER = "killed-node:7"


@pytest.mark.parametrize("trials", [pytest.param(20, id="20"),
                                    pytest.param(100, id="100", marks=pytest.mark.slow)])
def test_a_shipper_killed_at_random_loses_nothing_and_counts_nothing_twice(
        nats_server: NatsServer, tmp_path: Path, trials: int) -> None:
    """Each trial starts a shipper and SIGKILLs it after a random 0.05–1 s (before it
    connects, mid-batch, between an acknowledgement and its checkpoint…) while the worker
    keeps writing; a last `wantel ship --once` catches up."""
    seed = random.randrange(2**32)
    print(f"seed {seed}")  # shown on failure: rerun with random.Random(seed)
    rng = random.Random(seed)
    log_dir = tmp_path / "log"
    # About one job per trial, so the worker writes through most of them.
    worker = start_emitter(log_dir, WORKER, jobs=trials, pace=0.05)
    wait_for_log(log_dir)
    progressed = 0
    before = 0
    try:
        for _ in range(trials):
            proc = start_shipper(log_dir, nats_server.url, WORKER)
            time.sleep(rng.uniform(0.05, 1.0))
            proc.send_signal(signal.SIGKILL)
            assert -signal.SIGKILL == proc.wait(10)
            now = stream_count(nats_server.url)
            progressed += now > before
            before = now
        out, _ = worker.communicate(timeout=300)
        assert 0 == worker.returncode and "done" in out
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    print(f"{progressed} of {trials} killed shippers had shipped something new")
    assert progressed > 0
    final = subprocess.run([sys.executable, "-m", "wantel", "ship", "--once", "--log",
                            str(log_dir), "--nats", nats_server.url, "--worker", WORKER],
                           capture_output=True, text=True, timeout=120, check=False)
    assert 0 == final.returncode, final.stderr

    local, shipped = local_events(log_dir), stream_events(nats_server.url)
    assert_exactly_once(local, shipped)
    assert Counter(e.job for e in local) == Counter(e.job for e in shipped)
    fleet = replay_json(["--nats", nats_server.url])
    assert 0 == fleet["health"]["duplicates"]
    assert trials == len(fleet["jobs"])
    assert comparable(replay_json(["--log", str(log_dir)])) == comparable(fleet)
