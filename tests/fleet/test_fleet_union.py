"""Four worker processes, each shipped by its own ``wantel ship`` process to one real
nats-server: the fleet view equals replaying the union of the workers' local logs.

The workers are scripted emitter processes (:mod:`tests.fleet.emitter_proc`: the real Emitter
and LocalLog writing what a tiny run writes), not tiny ``wantel run``s: four of those cost
~40 s of CPU on this shared 2-core machine for nothing the fleet path sees differently.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.nats_server import NatsServer
from tests.polling import wait_for

from .fleet import (
    ORDER_DEPENDENT_PROJECTIONS,
    assert_exactly_once,
    comparable,
    fold,
    local_events,
    replay_json,
    start_emitter,
    start_shipper,
    state_digests,
    stream_count,
    stream_events,
    union,
    wait_for_log,
)

pytest.importorskip("nats")

WORKERS = 4
JOBS = 3


def test_the_fleet_view_is_the_union_of_the_workers_logs(nats_server: NatsServer,
                                                         tmp_path: Path) -> None:
    """`wantel replay --nats --json` equals `wantel replay --json` of the union, and every
    projection's state digest is equal."""
    logs = [tmp_path / f"w{n}" for n in range(WORKERS)]
    workers = [f"gpu-node-{n}.example:{100 + n}" for n in range(WORKERS)]
    emitters = [start_emitter(log, worker, JOBS) for log, worker in zip(logs, workers, strict=True)]
    for log in logs:
        wait_for_log(log)
    shippers = [start_shipper(log, nats_server.url, worker, stderr=tmp_path / f"ship{n}.err")
                for n, (log, worker) in enumerate(zip(logs, workers, strict=True))]
    try:
        for proc in emitters:
            out, _ = proc.communicate(timeout=120)
            assert 0 == proc.returncode and "done" in out
        total = sum(len(local_events(log)) for log in logs)
        wait_for(lambda: stream_count(nats_server.url) == total,
                 f"{total} events in the stream", timeout=60, every=0.1)
    finally:
        for ship in shippers:
            ship.terminate()
        codes = [ship.wait(30) for ship in shippers]
    assert [0] * WORKERS == codes  # a clean stop with nothing held back

    merged = union(logs, tmp_path / "union")
    local = local_events(merged)
    shipped = stream_events(nats_server.url)
    assert_exactly_once(local, shipped)

    fleet_doc = replay_json(["--nats", nats_server.url])
    union_doc = replay_json(["--log", str(merged)])
    assert WORKERS * JOBS == len(fleet_doc["jobs"])
    assert {"completed"} == {job["status"] for job in fleet_doc["jobs"]}
    assert comparable(union_doc) == comparable(fleet_doc)

    fleet = state_digests(fold(shipped))
    of_union = state_digests(fold(local))
    order_free = {name for name in fleet if name not in ORDER_DEPENDENT_PROJECTIONS}
    assert {"jobs", "throughput", "health", "metrics"} <= order_free
    assert {n: fleet[n] for n in order_free} == {n: of_union[n] for n in order_free}
    # The ETA and memory models learn across workers in the order jobs end fleet-wide: the
    # union's events folded in the stream's order give the fleet's state, digest for digest.
    place = {(e.job, e.seq): i for i, e in enumerate(shipped)}
    in_stream_order = sorted(local, key=lambda e: place[(e.job, e.seq)])
    assert fleet == state_digests(fold(in_stream_order))
