"""``wantel ship``: a worker's local log reaches the fleet stream exactly once, through a broker
outage and through shippers killed with SIGKILL at random moments (real nats-server)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from telemetry.events import Event
from telemetry.log.base import Batch, LogError
from telemetry.log.local import LocalLog
from telemetry.log.nats import NatsLog, NatsOptions
from telemetry.ship import checkpoint_path, shipper
from tests.nats_server import NatsServer
from tests.polling import wait_for
from tests.telemetry.log_contract import steps
from wantel.cli import main

pytest.importorskip("nats")


def stream_events(url: str) -> list[Event]:
    """Every event the fleet stream holds, in stream order."""
    log = NatsLog(NatsOptions(url), create=False)
    try:
        return [e for item in log.read() if isinstance(item, Batch) for e in item.events]
    finally:
        log.close()


def local_events(path: Path) -> list[Event]:
    """Every event of a local log, in log order."""
    log = LocalLog(path, create=False)
    try:
        return [e for item in log.read() if isinstance(item, Batch) for e in item.events]
    finally:
        log.close()


def assert_exactly_once(local: list[Event], shipped: list[Event]) -> None:
    """Every local event is in the stream once, and nothing else is."""
    counts = Counter((e.job, e.seq) for e in shipped)
    twice = {key: n for key, n in counts.items() if n > 1}
    assert {} == twice
    assert sorted((e.job, e.seq) for e in local) == sorted(counts)
    by_key = {(e.job, e.seq): e for e in shipped}
    assert all(by_key[(e.job, e.seq)] == e for e in local)


class Writer:
    """Appends small batches of several jobs' steps to a local log from a thread."""

    def __init__(self, path: Path, jobs: int = 4, batches: int = 40, every: float = 0.01,
                 size: int = 5) -> None:
        self.log = LocalLog(path)
        self.jobs, self.batches, self.every, self.size = jobs, batches, every, size
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.done = threading.Event()

    def _run(self) -> None:
        for n in range(self.batches):
            for j in range(self.jobs):
                self.log.append(steps(f"job-{j}", n * self.size, self.size))
            time.sleep(self.every)
        self.done.set()

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(60)
        self.log.close()


def test_ship_once_ships_everything_once_and_resumes(nats_server: NatsServer,
                                                     tmp_path: Path) -> None:
    """--once ships the log; a second run ships only what was appended since."""
    log_dir = tmp_path / "log"
    with LocalLog(log_dir) as log:
        log.append(steps("a", 0, 30))
    argv = ["ship", "--once", "--log", str(log_dir), "--nats", nats_server.url]
    assert 0 == main(argv)
    assert checkpoint_path(log_dir, "WANTEL_EVENTS").exists()
    with LocalLog(log_dir) as log:
        log.append(steps("a", 30, 5))
    assert 0 == main(argv)
    assert_exactly_once(local_events(log_dir), stream_events(nats_server.url))
    assert 35 == len(stream_events(nats_server.url))


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """No URL, an unreachable server, an unreadable creds file: one line each, exit 2."""
    from tests.nats_server import free_port

    with LocalLog(tmp_path / "log") as log:
        log.append(steps("a", 0, 1))
    base = ["ship", "--once", "--log", str(tmp_path / "log")]
    env = os.environ.pop("WANTEL_NATS", None)
    try:
        assert 2 == main(base)
        assert "needs --nats URL" in capsys.readouterr().err
        assert 2 == main([*base, "--nats", f"nats://bob:hunter2@127.0.0.1:{free_port()}"])
        err = capsys.readouterr().err
        assert "cannot connect to NATS" in err and "hunter2" not in err
        assert 2 == main([*base, "--nats", "nats://127.0.0.1:1", "--nats-creds",
                          str(tmp_path / "missing.creds")])
        assert "--nats-creds: cannot read" in capsys.readouterr().err
    finally:
        if env is not None:
            os.environ["WANTEL_NATS"] = env


@pytest.mark.parametrize("outage_s", [pytest.param(3.0, id="3s"),
                                      pytest.param(20.0, id="20s", marks=pytest.mark.slow)])
def test_a_broker_outage_costs_delay_not_data(nats_server: NatsServer, tmp_path: Path,
                                              outage_s: float) -> None:
    """The broker stops mid-run and comes back: writing never waits, and every event arrives
    in the stream exactly once."""
    log_dir = tmp_path / "log"
    with Writer(log_dir, batches=int(outage_s * 30) + 60, every=0.01) as writer:
        local = LocalLog(log_dir)
        runner, sink = shipper(local, log_dir, "WANTEL_EVENTS",
                               lambda: NatsLog(NatsOptions(nats_server.url, reconnect=True,
                                                           timeout=1.0), worker="w1"),
                               backoff=(0.05, 0.5))
        runner.start()
        try:
            wait_for(lambda: sink.shipped > 50, "the first events shipped")
            nats_server.stop()
            stopped_at = time.monotonic()
            wait_for(lambda: sink.failures > 0, "a failed publish while the broker is away")
            appended_during = writer.log.last_position()
            time.sleep(max(0.0, outage_s - (time.monotonic() - stopped_at)))
            assert writer.log.last_position() != appended_during  # writing went on
            nats_server.start()
            wait_for(writer.done.is_set, "the writer to finish", timeout=120)
            total = writer.log.last_position()
            assert total is not None
            wait_for(lambda: runner.engine.position == total + 1 and runner.held_back() is None,
                     "the shipper to catch up", timeout=60)
        finally:
            runner.shutdown()
            local.close()
    assert_exactly_once(local_events(log_dir), stream_events(nats_server.url))


class _Endless(Writer):
    """A writer that appends until ``done`` is set."""

    def _run(self) -> None:
        n = 0
        while not self.done.is_set():
            for j in range(self.jobs):
                self.log.append(steps(f"job-{j}", n * self.size, self.size))
            n += 1
            time.sleep(self.every)


def _kill_trials(nats_server: NatsServer, tmp_path: Path, trials: int, seed: int) -> None:
    rng = random.Random(seed)
    log_dir = tmp_path / "log"
    with _Endless(log_dir, every=0.005, size=3) as writer:
        try:
            for _ in range(trials):
                proc = subprocess.Popen(
                    [sys.executable, "-m", "wantel", "ship", "--log", str(log_dir),
                     "--nats", nats_server.url, "--worker", "killed"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(rng.uniform(0.2, 1.2))
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
        finally:
            writer.done.set()  # ends the writer's loop
    assert 0 == main(["ship", "--once", "--log", str(log_dir), "--nats", nats_server.url,
                      "--worker", "killed"])
    assert_exactly_once(local_events(log_dir), stream_events(nats_server.url))


@pytest.mark.parametrize("trials", [pytest.param(4, id="4"),
                                    pytest.param(100, id="100", marks=pytest.mark.slow)])
def test_a_shipper_killed_at_random_loses_nothing_and_counts_nothing_twice(
        nats_server: NatsServer, tmp_path: Path, trials: int) -> None:
    """SIGKILL at random moments while events keep coming; after a final catch-up, the
    stream holds every local event exactly once."""
    seed = random.randrange(2**32)
    print(f"seed {seed}")
    _kill_trials(nats_server, tmp_path, trials, seed)


def test_shipping_to_an_unreachable_broker_retries_and_never_raises(tmp_path: Path) -> None:
    """With nobody listening, the shipper counts failures and holds the events back; the
    runner neither raises nor checkpoints past them."""
    from tests.nats_server import free_port

    log_dir = tmp_path / "log"
    with LocalLog(log_dir) as log:
        log.append(steps("a", 0, 3))
    local = LocalLog(log_dir)
    url = f"nats://127.0.0.1:{free_port()}"

    def connect() -> NatsLog:
        return NatsLog(NatsOptions(url, timeout=0.5))

    runner, sink = shipper(local, log_dir, "WANTEL_EVENTS", connect)
    try:
        runner.catch_up()
        assert sink.failures >= 1 and sink.shipped == 0
        assert 0 == runner.held_back()
        assert sink.last_error is not None and "cannot connect" in sink.last_error
        assert not checkpoint_path(log_dir, "WANTEL_EVENTS").exists()
    finally:
        runner.shutdown(timeout=1)
        local.close()
    with pytest.raises(LogError):
        connect()
