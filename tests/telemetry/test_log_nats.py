"""The NATS JetStream backend meets the log contract, against a real single-node nats-server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from telemetry.events import JobCompleted
from telemetry.log.base import Batch, LogError, LogNotFound
from telemetry.log.nats import STREAM, NatsLog, NatsOptions, redact, subject_for
from tests.nats_server import NatsServer

from .log_contract import LogContract, events_of, positions_of, steps

pytest.importorskip("nats")


class TestNatsLogContract(LogContract):
    """The contract, each test on a server of its own (they start in milliseconds)."""

    servers: list[NatsServer]

    @pytest.fixture(autouse=True)
    def _servers(self) -> Iterator[None]:
        self.servers = []
        yield
        for server in self.servers:
            server.stop()

    def make_log(self, tmp_path: Path) -> NatsLog:
        """An empty stream on a fresh server."""
        server = NatsServer(tmp_path / f"store{len(self.servers)}")
        self.servers.append(server)
        server.start()
        return NatsLog(NatsOptions(server.url), worker="w1")


@pytest.fixture(name="server_log")
def _server_log(nats_server: NatsServer) -> Iterator[NatsLog]:
    log = NatsLog(NatsOptions(nats_server.url), worker="host-a:17")
    yield log
    log.close()


def test_positions_are_stream_sequences_minus_one(server_log: NatsLog) -> None:
    """The first event of a new stream is at position 0 (stream sequence 1)."""
    assert range(0, 3) == server_log.append(steps("a", 0, 3))
    assert 2 == server_log.last_position()


def test_a_retried_append_is_dropped_by_the_server(server_log: NatsLog) -> None:
    """Publishing the same (job, seq) again within the window stores nothing new and answers
    with the original positions (Nats-Msg-Id de-duplication)."""
    first = server_log.append(steps("a", 0, 4))
    again = server_log.append(steps("a", 0, 4))
    assert first == again
    assert steps("a", 0, 4) == events_of(list(server_log.read()))


def test_workers_publish_on_their_own_subject(nats_server: NatsServer) -> None:
    """Two workers' appends land in one stream, on subjects named after each worker."""
    a = NatsLog(NatsOptions(nats_server.url), worker="gpu-node.1:42")
    b = NatsLog(NatsOptions(nats_server.url), worker="gpu-node-2:7")
    try:
        a.append(steps("a", 0, 2))
        b.append(steps("b", 0, 2))
        assert "wantel.events.gpu-node_1:42" == a.subject == subject_for("gpu-node.1:42")
        items = list(b.read())
        assert steps("a", 0, 2) + steps("b", 0, 2) == events_of(items)
        assert [0, 1, 2, 3] == positions_of(items)
    finally:
        a.close()
        b.close()


def test_a_reader_does_not_create_the_stream(nats_server: NatsServer) -> None:
    """Opening for reading where no stream exists is LogNotFound, and creates nothing."""
    with pytest.raises(LogNotFound, match=STREAM):
        NatsLog(NatsOptions(nats_server.url), create=False)


def test_a_stream_with_other_subjects_is_refused(nats_server: NatsServer) -> None:
    """A stream named WANTEL_EVENTS that is not bound to wantel.events.> is not used."""
    import asyncio

    import nats

    async def make() -> None:
        nc = await nats.connect(nats_server.url)
        await nc.jetstream().add_stream(name=STREAM, subjects=["other.>"])
        await nc.close()

    asyncio.run(make())
    with pytest.raises(LogError, match="not a wantel stream"):
        NatsLog(NatsOptions(nats_server.url))


def test_an_unreachable_server_is_one_clear_error(tmp_path: Path) -> None:
    """Nobody listening: LogError naming the address (without credentials)."""
    from tests.nats_server import free_port

    url = f"nats://alice:s3cret@127.0.0.1:{free_port()}"
    with pytest.raises(LogError) as caught:
        NatsLog(NatsOptions(url, timeout=1.0))
    assert "s3cret" not in str(caught.value)
    assert "cannot connect to NATS at nats://***@127.0.0.1" in str(caught.value)


def test_redact_hides_user_and_password() -> None:
    """Credentials in a URL never reach a message."""
    assert "nats://***@h:4222,nats://g:1" == redact("nats://u:p@h:4222,nats://g:1")


def test_the_shipped_server_config_syncs_always(nats_server: NatsServer) -> None:
    """The server runs the shipped configuration, which flushes before acknowledging."""
    varz = json.loads(nats_server.varz())
    assert varz["jetstream"]["config"]["sync_always"] is True


def test_events_survive_a_server_restart(nats_server: NatsServer) -> None:
    """Acknowledged events are there after the server is killed and started again."""
    log = NatsLog(NatsOptions(nats_server.url, reconnect=True), worker="w")
    try:
        log.append(steps("a", 0, 5))
        log.append([JobCompleted(job="a", seq=5, ts=9_000, duration_s=1.0)])
    finally:
        log.close()
    nats_server.kill()
    nats_server.start()
    reader = NatsLog(NatsOptions(nats_server.url), create=False)
    try:
        items = list(reader.read())
        assert 6 == len(events_of(items))
        assert all(isinstance(item, Batch) for item in items)
    finally:
        reader.close()
