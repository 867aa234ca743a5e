"""A 3-node JetStream cluster on loopback with the stream at 3 replicas: the stream's leader
is killed mid-shipping; shipping pauses, resumes on the new leader, and nothing the cluster
acknowledged is lost (real nats-server nodes, worker and ``wantel ship`` processes)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from telemetry.engine import CheckpointStore, ProjectionEngine
from telemetry.log.base import LogError
from telemetry.log.nats import STREAM, NatsLog, NatsOptions
from telemetry.ship import checkpoint_path
from tests.polling import wait_for

from .cluster import NatsCluster
from .fleet import (
    assert_exactly_once,
    local_events,
    start_emitter,
    start_shipper,
    stream_count,
    stream_events,
    wait_for_log,
)

pytest.importorskip("nats")

WORKER = "node-r3:1"


@pytest.fixture(name="cluster")
def _cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    cluster = NatsCluster(tmp_path / "cluster")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def acknowledged(log_dir: Path) -> int:
    """How many local events the shipper recorded as acknowledged: the position of its
    checkpoint (the runner's ``{engine, sinks}`` record, the engine's snapshot inside)."""
    data = CheckpointStore(checkpoint_path(log_dir, STREAM)).load()
    if data is None:
        return 0
    engine = ProjectionEngine([])
    assert engine.restore(msgspec.msgpack.decode(data)["engine"])
    return engine.position


def create_r3(url: str) -> bool:
    try:
        NatsLog(NatsOptions(url, replicas=3, timeout=2.0), worker=WORKER).close()
    except LogError:
        return False  # the meta group is still electing its leader
    return True


def test_killing_the_stream_leader_pauses_shipping_and_loses_nothing(
        cluster: NatsCluster, tmp_path: Path) -> None:
    """`wantel ship --replicas 3` over every node's URL; the stream leader is SIGKILLed while
    the worker writes; the cluster elects another, shipping resumes, and the stream ends with
    every local event once — among them every event acknowledged before the kill."""
    wait_for(lambda: create_r3(cluster.url), "an R3 stream", timeout=60, every=0.2)
    placement = wait_for(lambda: cluster.stream_cluster(STREAM), "the stream's leader")
    assert placement is not None
    assert 2 == len(placement.get("replicas") or [])  # the leader and two followers

    log_dir = tmp_path / "log"
    worker = start_emitter(log_dir, WORKER, jobs=8, pace=0.05)
    wait_for_log(log_dir)
    shipper = start_shipper(log_dir, cluster.url, WORKER, stderr=tmp_path / "ship.err")
    try:
        wait_for(lambda: acknowledged(log_dir) > 50, "the first events acknowledged",
                 timeout=60, every=0.05)
        leader = placement["leader"]
        cluster.kill(leader)
        killed_at = time.monotonic()
        acked = acknowledged(log_dir)
        acked_events = local_events(log_dir)[:acked]

        def new_leader() -> str | None:
            now = cluster.stream_cluster(STREAM)
            return None if now is None or now["leader"] == leader else str(now["leader"])

        new = wait_for(new_leader, "a new stream leader", timeout=60)
        wait_for(lambda: acknowledged(log_dir) > acked, "shipping to resume", timeout=60,
                 every=0.05)
        resumed_after = time.monotonic() - killed_at
        print(f"leader {leader} killed; {new} leads; shipping resumed after "
              f"{resumed_after:.2f} s")

        out, _ = worker.communicate(timeout=120)
        assert 0 == worker.returncode and "done" in out
        total = len(local_events(log_dir))
        wait_for(lambda: acknowledged(log_dir) == total, "the shipper to catch up",
                 timeout=120, every=0.1)
    finally:
        shipper.terminate()
        code = shipper.wait(30)
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    assert 0 == code
    assert "shipping failed" in (tmp_path / "ship.err").read_text()  # it paused, and said so
    assert total == stream_count(cluster.url)
    shipped = stream_events(cluster.url)
    assert_exactly_once(local_events(log_dir), shipped)
    keys = {(e.job, e.seq) for e in shipped}
    assert [e for e in acked_events if (e.job, e.seq) not in keys] == []


@pytest.mark.parametrize("bad", ["0", "6", "three"])
def test_replicas_out_of_range_is_one_line_and_exit_2(
        bad: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """JetStream allows 1 to 5 replicas; anything else is refused before connecting."""
    from wantel.cli import main

    with pytest.raises(SystemExit) as caught:
        main(["ship", "--once", "--log", str(tmp_path), "--nats", "nats://127.0.0.1:1",
              "--replicas", bad])
    assert 2 == caught.value.code
    err = capsys.readouterr().err.strip().splitlines()
    assert 1 == len(err), err
    assert f"--replicas: must be a whole number from 1 to 5, not '{bad}'" in err[0]
