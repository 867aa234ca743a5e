"""The NATS JetStream backend meets the log contract, against a real single-node nats-server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from telemetry.events import JobCompleted
from telemetry.log.base import Batch, LogError, LogNotFound
from telemetry.log.nats import STREAM, NatsLog, NatsOptions, _ClientCursor, redact, subject_for
from tests.nats_server import NatsServer

from .log_contract import LogContract, events_of, positions_of, runs_of, steps

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


class TestNatsLogContractThroughNatsPy(TestNatsLogContract):
    """The contract again, reading through nats-py (``lean=False``; also what a log falls back
    to where the lean reader cannot authenticate as configured)."""

    def make_log(self, tmp_path: Path) -> NatsLog:
        server = NatsServer(tmp_path / f"store{len(self.servers)}")
        self.servers.append(server)
        server.start()
        log = NatsLog(NatsOptions(server.url), worker="w1", lean=False)
        assert "nats-py (lean=False)" == log.reads
        return log


@pytest.fixture(name="server_log")
def _server_log(nats_server: NatsServer) -> Iterator[NatsLog]:
    log = NatsLog(NatsOptions(nats_server.url), worker="host-a:17")
    yield log
    log.close()


@pytest.fixture(name="client_log")
def _client_log(nats_server: NatsServer) -> Iterator[NatsLog]:
    """A log that reads through nats-py."""
    log = NatsLog(NatsOptions(nats_server.url), worker="host-a:17", lean=False)
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


def _stream_config(url: str) -> dict[str, object]:
    """The stream's configuration as the server reports it."""
    import asyncio

    import nats

    async def info() -> dict[str, object]:
        nc = await nats.connect(url)
        try:
            reply = await nc.request(f"$JS.API.STREAM.INFO.{STREAM}", b"", timeout=5)
        finally:
            await nc.close()
        config: dict[str, object] = json.loads(reply.data)["config"]
        return config

    return asyncio.run(info())


class TestAtomicBatches:
    """Appends publish JetStream atomic batches where the stream allows them, and fall back to
    one acknowledgement a message where it does not or where the server refuses a batch."""

    def test_a_created_stream_allows_atomic_batches(self, server_log: NatsLog,
                                                    nats_server: NatsServer) -> None:
        """The stream wantel creates has allow_atomic, and the log publishes batches."""
        assert True is _stream_config(nats_server.url).get("allow_atomic")
        assert server_log.atomic_batches

    def test_a_batch_append_gives_consecutive_positions(self, server_log: NatsLog) -> None:
        """2,500 events (three batches: 1,000, 1,000, 500) land at positions 0…2,499, in
        order, without one refused batch."""
        events = steps("a", 0, 2_500)
        assert range(0, 2_500) == server_log.append(events)
        assert range(2_500, 2_503) == server_log.append(steps("a", 2_500, 3))
        items = list(server_log.read())
        assert events + steps("a", 2_500, 3) == events_of(items)
        assert list(range(2_503)) == positions_of(items)
        assert (3, 0) == (server_log.batches_committed, server_log.batches_refused)
        assert 2_502 == server_log.last_position()

    def test_a_reshipped_batch_stores_nothing_new(self, server_log: NatsLog) -> None:
        """Re-appending what was shipped (a shipper killed before its checkpoint) is refused as
        a batch (a Nats-Msg-Id the stream has), published per message instead, and stores
        nothing twice; a re-ship that overlaps and goes further stores only the new events."""
        first = server_log.append(steps("a", 0, 1_200))
        assert range(0, 1_200) == first
        assert first == server_log.append(steps("a", 0, 1_200))
        assert 2 == server_log.batches_refused  # both chunks of the re-ship
        assert range(1_100, 1_300) == server_log.append(steps("a", 1_100, 200))
        assert 3 == server_log.batches_refused
        assert 1_299 == server_log.last_position()
        assert steps("a", 0, 1_300) == events_of(list(server_log.read()))

    def test_a_batch_holding_one_id_twice_is_stored_once(self, server_log: NatsLog) -> None:
        """A batch with the same (job, seq) twice is refused whole; per message, the copy is
        dropped by the server."""
        events = steps("a", 0, 20)
        assert range(0, 20) == server_log.append([*events, events[1]])
        assert (0, 1) == (server_log.batches_committed, server_log.batches_refused)
        assert events == events_of(list(server_log.read()))

    def test_a_few_events_are_published_without_a_batch(self, server_log: NatsLog) -> None:
        """An append shorter than ATOMIC_MIN (a live shipper's few events a flush) is published
        one message at a time, which the stream acknowledges sooner than a commit; a longer one
        is one batch."""
        from telemetry.log.nats import ATOMIC_MIN

        assert range(0, ATOMIC_MIN - 1) == server_log.append(steps("a", 0, ATOMIC_MIN - 1))
        assert 0 == server_log.batches_committed
        more = steps("a", ATOMIC_MIN - 1, ATOMIC_MIN)
        assert range(ATOMIC_MIN - 1, 2 * ATOMIC_MIN - 1) == server_log.append(more)
        assert 1 == server_log.batches_committed
        assert steps("a", 0, 2 * ATOMIC_MIN - 1) == events_of(list(server_log.read()))

    def test_batches_are_written_as_frames_unless_an_id_cannot_be(
            self, server_log: NatsLog) -> None:
        """A batch's messages go out as ready-made frames (the client counts only the commit
        as its own publish); a job id a frame cannot carry as written (surrounding spaces) takes
        the client's own publish, message by message. Both are stored whole and in order."""
        stats = server_log._nc.stats
        before = stats["out_msgs"]
        assert range(0, 20) == server_log.append(steps("a", 0, 20))
        assert 1 == stats["out_msgs"] - before  # the commit
        before = stats["out_msgs"]
        odd = steps(" b ", 0, 20)
        assert range(20, 40) == server_log.append(odd)
        assert 20 == stats["out_msgs"] - before
        assert (2, 0) == (server_log.batches_committed, server_log.batches_refused)
        assert steps("a", 0, 20) + odd == events_of(list(server_log.read()))

    def test_a_stream_without_allow_atomic_still_works(self, nats_server: NatsServer) -> None:
        """On a stream an operator made without allow_atomic, appends publish one message at a
        time: the same positions, and a retry is still dropped."""
        import asyncio

        import nats

        async def make() -> None:
            nc = await nats.connect(nats_server.url)
            await nc.jetstream().add_stream(name=STREAM, subjects=["wantel.events.>"],
                                            duplicate_window=120.0)
            await nc.close()

        asyncio.run(make())
        log = NatsLog(NatsOptions(nats_server.url), worker="w")
        try:
            assert not _stream_config(nats_server.url).get("allow_atomic")
            assert_ships_one_message_at_a_time(log)
        finally:
            log.close()

    def test_a_server_with_a_lower_batch_limit(self, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
        """A server whose batches hold at most 100 messages refuses the first chunk of 1,000
        (that one is published per message) and takes the rest in chunks of 100."""
        from tests import nats_server as module

        config = tmp_path / "small-batches.conf"
        config.write_text(module.SHIPPED_CONFIG.read_text().replace(
            "\n  sync_interval: always\n",
            "\n  sync_interval: always\n  limits { batch { max_msgs: 100 } }\n"))
        monkeypatch.setattr(module, "SHIPPED_CONFIG", config)
        server = NatsServer(tmp_path / "store")
        server.start()
        try:
            log = NatsLog(NatsOptions(server.url), worker="w")
            try:
                assert range(0, 2_000) == log.append(steps("a", 0, 2_000))
                assert 100 == log.batch_limit
                assert 1 == log.batches_refused
                assert steps("a", 0, 2_000) == events_of(list(log.read()))
            finally:
                log.close()
        finally:
            server.stop()


class TestCatchUpReads:
    """Readers use an ordered push consumer: the same positions and batches as before, gaps
    start a new batch, and a slow reader holds back the server instead of buffering it all."""

    def test_a_gap_in_the_stream_starts_a_new_batch(self, server_log: NatsLog,
                                                    nats_server: NatsServer) -> None:
        """Messages removed from the middle of the stream are stepped over: the batches on
        either side keep their positions, and a cursor goes on following afterwards."""
        import asyncio

        import nats

        server_log.append(steps("a", 0, 10))

        async def delete(seqs: list[int]) -> None:
            nc = await nats.connect(nats_server.url)
            try:
                for seq in seqs:
                    reply = await nc.request(f"$JS.API.STREAM.MSG.DELETE.{STREAM}",
                                             json.dumps({"seq": seq}).encode(), timeout=5)
                    assert json.loads(reply.data).get("success"), reply.data
            finally:
                await nc.close()

        asyncio.run(delete([4, 5]))  # positions 3 and 4
        items = list(server_log.read())
        assert [(0, 3), (5, 5)] == runs_of(items)
        events = steps("a", 0, 10)
        assert events[:3] + events[5:] == events_of(items)

        cursor = server_log.cursor(2)
        try:
            assert [2, 5, 6, 7, 8, 9] == positions_of(_poll_until(cursor, 6))
            server_log.append(steps("a", 10, 2))
            assert [10, 11] == positions_of(_poll_until(cursor, 2))
        finally:
            cursor.close()

    def test_a_reader_slower_than_the_server_loses_nothing(self, client_log: NatsLog) -> None:
        """Through nats-py, flow control holds the server back while the reader takes its
        time: the client holds a few thousand messages, not the stream, and every one of
        50,000 events arrives, in order, once."""
        server_log = client_log
        events = steps("a", 0, 50_000)
        server_log.append(events)
        cursor = server_log.cursor(0)
        assert isinstance(cursor, _ClientCursor)
        try:
            got = [i for i in cursor.fetch(wait=5.0) if isinstance(i, Batch)]
            assert got, "nothing delivered"
            assert cursor._sub.pending_msgs < 25_000  # one flow-control window, not 50,000
            while sum(len(b.events) for b in got) < 50_000:
                items = cursor.fetch(wait=5.0)
                assert items, "the consumer stalled"
                got.extend(i for i in items if isinstance(i, Batch))
            assert events == events_of(got)
            assert list(range(50_000)) == positions_of(list(got))
        finally:
            cursor.close()

    def test_a_reader_paused_past_its_queue_starts_again(
            self, client_log: NatsLog, monkeypatch: pytest.MonkeyPatch) -> None:
        """Through nats-py, a reader that stops reading while each idle heartbeat lets the
        server send another window overflows the client's queue (here 12,000 messages): the
        client drops what comes next, and the cursor starts again from its position — nothing
        lost, nothing twice."""
        from telemetry.log import nats as module
        from tests.polling import wait_for

        server_log = client_log
        monkeypatch.setattr(module, "READ_QUEUE", 12_000)
        events = steps("a", 0, 60_000)
        server_log.append(events)
        cursor = server_log.cursor(0)
        assert isinstance(cursor, _ClientCursor)
        try:
            got = [i for i in cursor.fetch(wait=5.0) if isinstance(i, Batch)]
            assert got
            sub = cursor._sub
            wait_for(lambda: id(sub._sub) in server_log._overflowed, "the queue to overflow",
                     timeout=60, every=0.1)
            while sum(len(b.events) for b in got) < 60_000:
                got.extend(i for i in cursor.fetch(wait=5.0) if isinstance(i, Batch))
            assert cursor._sub is not sub  # it started again
            assert events == events_of(got)
            assert list(range(60_000)) == positions_of(list(got))
        finally:
            cursor.close()

    def test_a_batch_says_how_far_behind_the_reader_is(self, server_log: NatsLog) -> None:
        """The first batch read from a long stream says events remain; the last says none."""
        server_log.append(steps("a", 0, 6_000))
        items = [i for i in server_log.read() if isinstance(i, Batch)]
        assert items[0].behind > 0
        assert 0 == items[-1].behind
        assert 6_000 == len(events_of(items))

    @pytest.mark.parametrize("lean", [True, False], ids=["lean", "nats-py"])
    def test_a_follower_resumes_after_the_server_restarts(self, nats_server: NatsServer,
                                                          lean: bool) -> None:
        """A cursor following the stream when the server is killed and started again (its
        consumer lost with it) picks up the events appended afterwards, each once, without
        being reopened: the client notices the lost connection or the missing heartbeats and
        recreates the consumer after the last message it received."""
        writer = NatsLog(NatsOptions(nats_server.url, reconnect=True), worker="w")
        reader = NatsLog(NatsOptions(nats_server.url, reconnect=True), create=False, lean=lean)
        cursor = reader.cursor(0)
        try:
            writer.append(steps("a", 0, 5))
            assert [0, 1, 2, 3, 4] == positions_of(_poll_until(cursor, 5))
            nats_server.kill()
            nats_server.start()

            def appended() -> bool:
                try:
                    writer.append(steps("a", 5, 5))
                except LogError:
                    return False  # still reconnecting
                return True

            from tests.polling import wait_for

            wait_for(appended, "an append after the restart", timeout=20, every=0.1)
            got = _poll_until(cursor, 5, timeout=30)
            assert [5, 6, 7, 8, 9] == positions_of(got)
            assert steps("a", 5, 5) == events_of(got)
        finally:
            cursor.close()
            reader.close()
            writer.close()

    def test_the_public_way_of_taking_messages(self, server_log: NatsLog) -> None:
        """Where the client's queue is not reachable, messages are taken with next_msg: the
        same messages, in order, and nothing once there is nothing."""
        from telemetry.log.nats import _sequence, _take_slowly

        server_log.append(steps("a", 0, 10))
        sub = server_log._call(server_log._subscribe(0), "reading")
        try:
            taken: list[object] = []
            for _ in range(100):  # delivery is asynchronous: take until ten (bounded)
                taken += server_log._loop.call(_take_slowly(sub, 1.0, 4))
                if len(taken) >= 10:
                    break
            assert list(range(1, 11)) == [_sequence(m.reply)[0] for m in taken]  # type: ignore[attr-defined]
            assert [] == server_log._loop.call(_take_slowly(sub, 0.05, 4))
        finally:
            server_log._loop.call(sub.unsubscribe())

    def test_reply_subjects_of_both_forms_give_the_sequences(self) -> None:
        """The stream sequence and pending count come from the v1 and the v2 (domain, account
        hash) reply subjects alike."""
        from telemetry.log.nats import _sequence

        assert (42, 7) == _sequence("$JS.ACK.WANTEL_EVENTS.c1.1.42.3.1700000000000000000.7")
        assert (42, 7) == _sequence(
            "$JS.ACK.hub.ACCHASH.WANTEL_EVENTS.c1.1.42.3.1700000000000000000.7.rnd")

    def test_status_headers_are_still_parsed(self, server_log: NatsLog) -> None:
        """The connection skips stored messages' headers but keeps the server's status lines
        (heartbeats, flow control, no responders), which the client acts on."""
        parse = server_log._nc._process_headers
        status = server_log._loop.call(parse(b"NATS/1.0 100 Idle Heartbeat\r\n\r\n"))
        assert "100" == status["Status"]
        assert None is server_log._loop.call(parse(b"NATS/1.0\r\nNats-Msg-Id: a:1\r\n\r\n"))


def _poll_until(cursor: object, count: int, timeout: float = 10) -> list[Batch]:
    """Poll ``cursor`` until it has yielded ``count`` events (deadline: ``timeout`` s)."""
    from tests.polling import wait_for

    got: list[Batch] = []

    def enough() -> bool:
        got.extend(i for i in cursor.poll() if isinstance(i, Batch))  # type: ignore[attr-defined]
        return sum(len(b.events) for b in got) >= count

    wait_for(enough, f"{count} events", timeout=timeout)
    return got


def test_an_old_server_without_atomic_batches(tmp_path: Path) -> None:
    """nats-server 2.9 (Debian's package; ``$WANTEL_OLD_NATS_SERVER`` names another) knows no
    atomic batches: the stream is created all the same, appends publish one message at a time,
    and readers follow through the ordered consumer."""
    import os
    import subprocess

    from tests.nats_server import free_port
    from tests.polling import wait_for

    binary = Path(os.environ.get("WANTEL_OLD_NATS_SERVER", "/usr/sbin/nats-server"))
    if not binary.exists():
        pytest.skip(f"no old nats-server at {binary} (apt-get install nats-server)")
    port = free_port()
    proc = subprocess.Popen([str(binary), "-js", "-sd", str(tmp_path / "store"),
                             "-a", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def connected() -> NatsLog | None:
            try:
                return NatsLog(NatsOptions(f"nats://127.0.0.1:{port}", timeout=1.0),
                               worker="w")
            except LogError:
                return None

        log = wait_for(connected, "the old nats-server", timeout=20, every=0.1)
        try:
            version = log._nc.connected_server_version
            if (version.major, version.minor) >= (2, 12):
                pytest.skip(f"{binary} is {version}, not older than 2.12")
            assert_ships_one_message_at_a_time(log)
        finally:
            log.close()
    finally:
        proc.terminate()
        proc.wait(10)


def assert_ships_one_message_at_a_time(log: NatsLog) -> None:
    """Without atomic batches, 1,500 events append at 0…1,499; a re-ship of them appends
    nothing new (the server drops the copies and answers with the originals' positions); they
    read back in order; no batch was refused."""
    assert not log.atomic_batches
    assert range(0, 1_500) == log.append(steps("a", 0, 1_500))
    assert range(0, 1_500) == log.append(steps("a", 0, 1_500))
    assert steps("a", 0, 1_500) == events_of(list(log.read()))
    assert 0 == log.batches_refused
