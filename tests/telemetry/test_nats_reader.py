"""The lean JetStream reader (telemetry/log/nats_wire.py) against a real nats-server: flow
control under a slow reader, gaps found by the consumer sequence and by idle heartbeats, a
consumer deleted under it, a server that goes away, TLS, a user and password, a token, and
the fall back to nats-py where it cannot authenticate."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from telemetry.log import nats_wire
from telemetry.log.base import Batch, LogError
from telemetry.log.nats import STREAM, NatsLog, NatsOptions, _ClientCursor, _NatsCursor
from telemetry.log.nats_wire import RECV_BYTES, Frame, WireConnection, WireUnsupported
from tests.nats_server import NatsServer
from tests.polling import wait_for

from .log_contract import events_of, positions_of, steps

pytest.importorskip("nats")


@pytest.fixture(name="log")
def _log(nats_server: NatsServer) -> Iterator[NatsLog]:
    log = NatsLog(NatsOptions(nats_server.url), worker="w")
    yield log
    log.close()


def server_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: str) -> NatsServer:
    """A server running the shipped configuration plus ``extra``."""
    from tests import nats_server as module

    config = tmp_path / "extra.conf"
    config.write_text(module.SHIPPED_CONFIG.read_text() + "\n" + extra + "\n")
    monkeypatch.setattr(module, "SHIPPED_CONFIG", config)
    server = NatsServer(tmp_path / "store")
    server.start()
    return server


def api(url: str, subject: str, body: bytes = b"") -> dict[str, Any]:
    """A JetStream API request through nats-py, its JSON reply."""
    import nats

    async def ask() -> dict[str, Any]:
        nc = await nats.connect(url)
        try:
            reply = await nc.request(subject, body, timeout=5)
        finally:
            await nc.close()
        answer: dict[str, Any] = json.loads(reply.data)
        return answer

    return asyncio.run(ask())


def poll_until(cursor: Any, count: int, timeout: float = 20) -> list[Batch]:
    got: list[Batch] = []

    def enough() -> bool:
        got.extend(i for i in cursor.poll() if isinstance(i, Batch))
        return sum(len(b.events) for b in got) >= count

    wait_for(enough, f"{count} events", timeout=timeout)
    return got


def dropping(scan: nats_wire.Scan, drop: Callable[[Frame], bool]) -> nats_wire.Scan:
    """``scan``, losing the first delivery ``drop`` picks (as if it never arrived)."""
    dropped: list[Frame] = []

    def lossy(buf: bytes, pos: int) -> tuple[list[Frame], int]:
        frames, nxt = scan(buf, pos)
        if not dropped:
            for frame in frames:
                if frame[1] is not None and frame[1].startswith(b"$JS.ACK.") and drop(frame):
                    dropped.append(frame)
                    frames = [f for f in frames if f is not frame]
                    break
        return frames, nxt

    return lossy


def stream_seq(frame: Frame) -> int:
    assert frame[1] is not None
    return nats_wire.ack_fields(frame[1])[0]


class TestFlowControl:
    def test_a_slow_reader_holds_the_server_back(self, log: NatsLog,
                                                 nats_server: NatsServer) -> None:
        """A reader that stops taking holds the server to one flow-control window: the
        consumer's delivered count stops well short of the stream while the reader holds at
        most one recv() buffer; then every one of 50,000 events arrives, in order, once, without
        the consumer starting again."""
        events = steps("a", 0, 50_000)
        log.append(events)
        cursor = log.cursor(0)
        assert isinstance(cursor, _NatsCursor)
        try:
            got = [i for i in cursor.fetch(wait=5.0) if isinstance(i, Batch)]
            assert got, "nothing delivered"
            consumer = cursor._consumer
            subject = f"$JS.API.CONSUMER.INFO.{STREAM}.{consumer.name}"
            readings: list[int] = []

            def held() -> bool:  # the same count twice, more than a heartbeat apart
                readings.append(api(nats_server.url, subject)["delivered"]["stream_seq"])
                return len(readings) >= 2 and readings[-1] == readings[-2]

            wait_for(held, "the server to stop sending", timeout=30, every=1.5)
            assert readings[-1] < 25_000
            assert len(cursor._conn._buf) <= RECV_BYTES
            while sum(len(b.events) for b in got) < 50_000:
                items = cursor.fetch(wait=5.0)
                assert items, "the consumer stalled"
                got.extend(i for i in items if isinstance(i, Batch))
            assert events == events_of(got)
            assert list(range(50_000)) == positions_of(list(got))
            assert 0 == consumer.restarts
        finally:
            cursor.close()


class TestGaps:
    @pytest.mark.parametrize("lost", [5, 10], ids=["a-later-delivery-skips",
                                                   "an-idle-heartbeat-tells"])
    def test_a_lost_delivery_starts_the_consumer_again(self, log: NatsLog, lost: int) -> None:
        """A delivery lost on the way makes the reader start a new consumer after the last
        event it took: each event once, in order. The gap shows in the next delivery's consumer
        sequence, or, for the last delivery (no later one), in the next idle heartbeat's
        Nats-Last-Consumer."""
        log.append(steps("a", 0, 10))
        log.scan_frames = dropping(log.scan_frames, lambda f: stream_seq(f) == lost)
        cursor = log.cursor(0)
        try:
            got = poll_until(cursor, 10)
            assert steps("a", 0, 10) == events_of(got)
            assert list(range(10)) == positions_of(got)
            assert 1 == cursor._consumer.restarts
        finally:
            cursor.close()

    def test_a_consumer_deleted_under_the_reader(self, log: NatsLog,
                                                 nats_server: NatsServer) -> None:
        """Its consumer deleted on the server, a following reader misses its heartbeats and
        creates another after the last event it took: the events appended meanwhile arrive,
        each once."""
        log.append(steps("a", 0, 5))
        cursor = log.cursor(0)
        try:
            assert [0, 1, 2, 3, 4] == positions_of(poll_until(cursor, 5))
            consumer = cursor._consumer
            name = consumer.name
            answer = api(nats_server.url, f"$JS.API.CONSUMER.DELETE.{STREAM}.{name}")
            assert answer.get("success"), answer
            log.append(steps("a", 5, 5))
            got = poll_until(cursor, 5)
            assert steps("a", 5, 5) == events_of(got)
            assert [5, 6, 7, 8, 9] == positions_of(got)
            assert consumer.name != name
        finally:
            cursor.close()


class TestConnections:
    def test_a_server_gone_mid_read(self, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
        """A command reading (no reconnecting forever) when the server is killed: LogError
        naming the server's address, never its password."""
        server = server_with(tmp_path, monkeypatch,
                             'authorization { user: alice, password: "s3cret" }')
        try:
            url = f"nats://alice:s3cret@127.0.0.1:{server.port}"
            writer = NatsLog(NatsOptions(url), worker="w")
            try:
                writer.append(steps("a", 0, 50_000))
            finally:
                writer.close()
            log = NatsLog(NatsOptions(url, timeout=2.0), create=False)
            try:
                items = log.read()
                assert isinstance(next(items), Batch)  # authenticated, reading
                server.kill()
                with pytest.raises(LogError) as caught:
                    for _item in items:
                        pass
            finally:
                log.close()
        finally:
            server.stop()
        text = str(caught.value)
        assert f"127.0.0.1:{server.port}" in text
        assert "s3cret" not in text
        assert "alice" not in text

    def test_a_token(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A token in the URL (``nats://TOKEN@host``) authenticates the lean reader."""
        server = server_with(tmp_path, monkeypatch, 'authorization { token: "t0ken" }')
        try:
            log = NatsLog(NatsOptions(f"nats://t0ken@127.0.0.1:{server.port}"), worker="w")
            try:
                log.append(steps("a", 0, 100))
                assert steps("a", 0, 100) == events_of(list(log.read()))
                assert "lean" == log.reads
            finally:
                log.close()
        finally:
            server.stop()

    def test_a_wrong_password_is_one_clear_error(self, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
        """The server refuses the lean reader's credentials: WireError naming the address
        and the server's reason, without the password."""
        server = server_with(tmp_path, monkeypatch,
                             'authorization { user: alice, password: "s3cret" }')
        try:
            conn = WireConnection(f"nats://alice:wr0ng@127.0.0.1:{server.port}", timeout=2.0)
            with pytest.raises(nats_wire.WireError) as caught:
                conn.connect()
        finally:
            server.stop()
        assert "Authorization Violation" in str(caught.value)
        assert "wr0ng" not in str(caught.value)

    def test_tls_with_the_options_ca(self, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
        """A server that requires TLS, its certificate signed by the CA given in the options:
        the lean reader reads over TLS, verified."""
        openssl = shutil.which("openssl")
        assert openssl, "openssl is missing (scripts/debian-packages.txt installs it)"
        ca, cert, key = _certificates(Path(openssl), tmp_path / "tls")
        server = server_with(tmp_path, monkeypatch,
                             f'tls {{ cert_file: "{cert}", key_file: "{key}" }}')
        try:
            log = NatsLog(NatsOptions(f"tls://127.0.0.1:{server.port}", ca=str(ca)),
                          worker="w")
            try:
                log.append(steps("a", 0, 3_000))
                cursor = log.cursor(0)
                try:
                    got = poll_until(cursor, 3_000)
                    import ssl

                    assert isinstance(cursor._conn._sock, ssl.SSLSocket)
                finally:
                    cursor.close()
                assert steps("a", 0, 3_000) == events_of(got)
                assert steps("a", 0, 3_000) == events_of(list(log.read()))
            finally:
                log.close()
            unverified = WireConnection(f"nats://127.0.0.1:{server.port}", timeout=2.0)
            with pytest.raises(nats_wire.WireError, match="CERTIFICATE_VERIFY_FAILED"):
                unverified.connect()  # the system's CAs do not know this one
        finally:
            server.stop()


def _certificates(openssl: Path, folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate for 127.0.0.1 it signed, with ``openssl``."""
    folder.mkdir()
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "server.key",
                                                        "server.csr", "server.pem"))
    ext = folder / "san.ext"
    ext.write_text("subjectAltName = IP:127.0.0.1\n")

    def run(*args: str) -> None:
        subprocess.run([str(openssl), *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out",
        str(ca), "-days", "2", "-subj", "/CN=wantel test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return ca, cert, key


class TestFallBack:
    def test_auth_the_lean_reader_cannot_do_reads_through_nats_py(
            self, log: NatsLog, monkeypatch: pytest.MonkeyPatch) -> None:
        """Where the lean reader cannot authenticate as configured, the cursor reads through
        nats-py from its position instead, and the log says so: the same events."""
        log.append(steps("a", 0, 50))

        def refuse(self: WireConnection) -> None:
            raise WireUnsupported("the server asks for an NKey or JWT (no creds file given)")

        monkeypatch.setattr(WireConnection, "connect", refuse)
        cursor = log.cursor(10)
        try:
            got = poll_until(cursor, 40)
            assert isinstance(cursor._client, _ClientCursor)
        finally:
            cursor.close()
        assert steps("a", 10, 40) == events_of(got)
        assert log.reads.startswith("nats-py (the server asks for an NKey")
        assert isinstance(log.cursor(0), _ClientCursor)
        assert steps("a", 0, 50) == events_of(list(log.read()))


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "nats-py"])
def test_a_malformed_message_is_quarantined_in_its_place(nats_server: NatsServer,
                                                         lean: bool) -> None:
    """A message that is not an event (published by something else on a wantel subject) is
    one Quarantined item at its position; the events on either side keep theirs."""
    import nats

    from telemetry.log.base import Quarantined

    writer = NatsLog(NatsOptions(nats_server.url), worker="w")
    reader = NatsLog(NatsOptions(nats_server.url), create=False, lean=lean)
    try:
        writer.append(steps("a", 0, 3))

        async def publish() -> None:
            nc = await nats.connect(nats_server.url)
            try:
                await nc.jetstream().publish("wantel.events.intruder", b"\xc1 not an event",
                                             stream=STREAM)
            finally:
                await nc.close()

        asyncio.run(publish())
        writer.append(steps("a", 3, 3))
        items = list(reader.read())
    finally:
        reader.close()
        writer.close()
    assert steps("a", 0, 6) == events_of(items)
    assert [0, 1, 2, 4, 5, 6] == positions_of(items)
    bad = [i for i in items if isinstance(i, Quarantined)]
    assert [(3, 1, 4)] == [(q.first, q.count, q.next) for q in bad]
    assert "seq 4" in bad[0].where


def _operator_setup(folder: Path) -> tuple[str, Path]:
    """A NATS operator, an account with JetStream and a user of it, as the ``nsc`` tool would
    make them (JWTs signed with nkeys): the server configuration that trusts them, and the
    user's creds file."""
    import base64
    import hashlib
    import os
    import time

    import nkeys

    def keypair(prefix: int) -> tuple[bytes, Any, str]:
        seed = nkeys.encode_seed(os.urandom(32), prefix)
        pair = nkeys.from_seed(bytearray(seed))
        return seed, pair, pair.public_key.decode()

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    def jwt(claims: dict[str, Any], signer: Any) -> str:
        claims = dict(claims, iat=int(time.time()))
        digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
        claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
        head = b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
        body = b64(json.dumps(claims).encode())
        return f"{head}.{body}.{b64(signer.sign(f'{head}.{body}'.encode()))}"

    _, operator, operator_pub = keypair(nkeys.PREFIX_BYTE_OPERATOR)
    _, account, account_pub = keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    _, _system, system_pub = keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    user_seed, _user, user_pub = keypair(nkeys.PREFIX_BYTE_USER)
    limits = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
              "wildcards": True, "conn": -1, "leaf": -1}
    operator_jwt = jwt({"iss": operator_pub, "sub": operator_pub, "name": "op",
                        "nats": {"type": "operator", "version": 2,
                                 "system_account": system_pub}}, operator)
    account_jwt = jwt({"iss": operator_pub, "sub": account_pub, "name": "wantel",
                       "nats": {"limits": {**limits, "mem_storage": -1, "disk_storage": -1,
                                           "streams": -1, "consumer": -1},
                                "type": "account", "version": 2}}, operator)
    system_jwt = jwt({"iss": operator_pub, "sub": system_pub, "name": "SYS",
                      "nats": {"limits": limits, "type": "account", "version": 2}}, operator)
    user_jwt = jwt({"iss": account_pub, "sub": user_pub, "name": "reader",
                    "nats": {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
                             "type": "user", "version": 2}}, account)
    creds = folder / "reader.creds"
    creds.write_text(f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n"
                     "\n************************* IMPORTANT *************************\n\n"
                     f"-----BEGIN USER NKEY SEED-----\n{user_seed.decode()}\n"
                     "------END USER NKEY SEED------\n")
    config = (f'operator: "{operator_jwt}"\nsystem_account: {system_pub}\nresolver: MEMORY\n'
              f'resolver_preload: {{\n  {account_pub}: "{account_jwt}"\n'
              f'  {system_pub}: "{system_jwt}"\n}}\n')
    return config, creds


def test_a_creds_file_against_a_server_that_trusts_an_operator(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server in operator mode (JWT accounts): with the user's creds file the lean reader
    signs the server's nonce and reads (no fall back to nats-py); a creds file the server
    does not trust is refused in one line that names the address; with none, the lean reader
    says it cannot authenticate (a log would read through nats-py)."""
    pytest.importorskip("nkeys")
    config, creds = _operator_setup(tmp_path)
    server = server_with(tmp_path, monkeypatch, config)
    try:
        log = NatsLog(NatsOptions(server.url, creds=str(creds)), worker="w")
        try:
            log.append(steps("a", 0, 2_000))
            cursor = log.cursor(0)
            try:
                got = poll_until(cursor, 2_000)
                assert isinstance(cursor, _NatsCursor) and cursor._client is None
            finally:
                cursor.close()
            assert steps("a", 0, 2_000) == events_of(got)
            assert steps("a", 0, 2_000) == events_of(list(log.read()))
            assert "lean" == log.reads
        finally:
            log.close()
        (tmp_path / "other").mkdir()
        _config, untrusted = _operator_setup(tmp_path / "other")
        stranger = WireConnection(server.url, creds=str(untrusted), timeout=2.0)
        with pytest.raises(nats_wire.WireError) as caught:
            stranger.connect()
        assert f"127.0.0.1:{server.port}" in str(caught.value)
        assert "Authorization Violation" in str(caught.value)
        with pytest.raises(WireUnsupported, match="NKey or JWT"):
            WireConnection(server.url, timeout=2.0).connect()
    finally:
        server.stop()
