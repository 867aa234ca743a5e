"""The broker stops mid-run and comes back on the same port and store: the workers never wait
for it, and every event reaches the fleet view exactly once (real nats-server, worker and
``wantel ship`` processes)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.nats_server import NatsServer
from tests.polling import wait_for

from .fleet import (
    assert_exactly_once,
    comparable,
    local_events,
    replay_json,
    start_emitter,
    start_shipper,
    stream_count,
    stream_events,
    union,
    wait_for_log,
)

pytest.importorskip("nats")

WORKERS = 3


@pytest.mark.parametrize(("outage_s", "jobs", "pace"), [
    pytest.param(3.0, 3, 0.06, id="3s"),
    pytest.param(20.0, 6, 0.2, id="20s", marks=pytest.mark.slow),
])
def test_a_broker_outage_costs_delay_not_data(nats_server: NatsServer, tmp_path: Path,
                                              outage_s: float, jobs: int, pace: float) -> None:
    """The workers finish their jobs while the broker is still down (a generation never waits
    for it); once it is back, the shippers catch up and the fleet view holds every event of
    every worker once."""
    logs = [tmp_path / f"w{n}" for n in range(WORKERS)]
    workers = [f"node-{n}" for n in range(WORKERS)]
    emitters = [start_emitter(log, worker, jobs, pace)
                for log, worker in zip(logs, workers, strict=True)]
    for log in logs:
        wait_for_log(log)
    shippers = [start_shipper(log, nats_server.url, worker, stderr=tmp_path / f"ship{n}.err")
                for n, (log, worker) in enumerate(zip(logs, workers, strict=True))]
    try:
        wait_for(lambda: stream_count(nats_server.url) > 0, "the first events shipped",
                 timeout=60, every=0.05)
        nats_server.stop()
        stopped_at = time.monotonic()
        running = [proc for proc in emitters if proc.poll() is None]
        assert running, "the workers ended before the outage: the test proves nothing"
        written_at_stop = [len(local_events(log)) for log in logs]

        for proc in emitters:  # the broker is still down while they finish
            out, _ = proc.communicate(timeout=120)
            assert 0 == proc.returncode and "done" in out
        assert nats_server.proc is None
        assert sum(len(local_events(log)) for log in logs) > sum(written_at_stop)
        assert all(proc.poll() is None for proc in shippers), "a shipper gave up"
        time.sleep(max(0.0, outage_s - (time.monotonic() - stopped_at)))  # the outage itself

        nats_server.start()
        total = sum(len(local_events(log)) for log in logs)
        wait_for(lambda: stream_count(nats_server.url) == total,
                 f"{total} events in the stream", timeout=120, every=0.1)
    finally:
        for ship in shippers:
            ship.terminate()
        codes = [ship.wait(30) for ship in shippers]
        for proc in emitters:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert [0] * WORKERS == codes

    merged = union(logs, tmp_path / "union")
    assert_exactly_once(local_events(merged), stream_events(nats_server.url))
    fleet = replay_json(["--nats", nats_server.url])
    assert 0 == fleet["health"]["duplicates"]
    assert WORKERS * jobs == len(fleet["jobs"])
    assert comparable(replay_json(["--log", str(merged)])) == comparable(fleet)
