"""Webhooks: every transition POSTed to a real HTTP receiver, signed, at least once, in order,
through receiver outages and ``wantel serve`` restarts."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from exporters.webhooks import (
    ID_HEADER,
    SIGNATURE_HEADER,
    WebhookSink,
    check_url,
    sign,
    verify,
)
from telemetry.events import Event, JobQueued
from telemetry.log.local import LocalLog
from tests.exporters.test_server import JobScript
from tests.polling import wait_for
from wantel.serving import Serving

SECRET = "whsec-test-0123456789"
FAST_BACKOFF = (0.05, 0.5)


@dataclass
class Received:
    """One POST as the receiver saw it."""

    headers: dict[str, str]
    raw: bytes

    @property
    def body(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.raw)
        return parsed


@dataclass
class Receiver:
    """A real HTTP server on a loopback port that records POSTs; it can be stopped and
    started again on the same port (an outage), and told to answer an error status."""

    port: int = 0
    status: int = 200
    received: list[Received] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/wantel"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status = receiver.status
                if status == 200:
                    with receiver._lock:
                        receiver.received.append(Received(dict(self.headers.items()), raw))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(10)
            self._server = None

    def bodies(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.body for r in self.received]


@pytest.fixture(name="receiver")
def _receiver() -> Iterator[Receiver]:
    receiver = Receiver().start()
    try:
        yield receiver
    finally:
        receiver.stop()


def job_events(job: str, status: str = "completed", steps: int = 2) -> list[Event]:
    """JobQueued, then a whole job ending with ``status``."""
    script = JobScript(job, steps=steps, worker="w1")
    queued = JobQueued(job=job, seq=0, ts=script.ts, model="tiny-t2v", task="t2v")
    script.seq = 1
    return [queued, *script.whole(status)]


def serving(log: LocalLog, url: str, *, secret: str | None = SECRET) -> Serving:
    return Serving(log, port=0, webhooks=[url], webhook_secret=secret,
                   webhook_backoff=FAST_BACKOFF)


def transitions(bodies: list[dict[str, Any]], job: str) -> list[str]:
    return [b["type"] for b in bodies if b["data"]["job"] == job]


def test_every_transition_arrives_signed_and_in_order(tmp_path: Path,
                                                      receiver: Receiver) -> None:
    """Queued, started and each terminal reach the receiver in log order, each once, each
    with a signature that verifies under the secret and a stable id."""
    log = LocalLog(tmp_path / "log")
    with serving(log, receiver.url):
        for job, status in (("a", "completed"), ("b", "failed"), ("c", "cancelled")):
            log.append(job_events(job, status))
        wait_for(lambda: len(receiver.received) >= 9, "nine deliveries")
    log.close()
    bodies = receiver.bodies()
    assert 9 == len(bodies)
    assert ["job.queued", "job.started", "job.completed"] == transitions(bodies, "a")
    assert ["job.queued", "job.started", "job.failed"] == transitions(bodies, "b")
    assert ["job.queued", "job.started", "job.cancelled"] == transitions(bodies, "c")
    positions = [b["position"] for b in bodies]
    assert sorted(positions) == positions
    for got in receiver.received:
        assert verify(SECRET, got.headers[SIGNATURE_HEADER], got.raw)
        assert not verify("another secret", got.headers[SIGNATURE_HEADER], got.raw)
        assert got.body["id"] == got.headers[ID_HEADER]
    assert 9 == len({b["id"] for b in bodies})
    failed = next(b for b in bodies if b["type"] == "job.failed")["data"]
    assert {"type": "OutOfMemoryError", "message": "out of memory", "oom": True,
            "stage": "denoise", "step": None, "category": "internal",
            "suggestions": []} == failed["error"]
    assert "failed" == failed["status"] and "tiny-t2v" == failed["model"]
    started = next(b for b in bodies if b["type"] == "job.started")["data"]
    assert ("running", 32, 32, 2) == (started["status"], started["width"], started["height"],
                                       started["steps"])
    cancelled = next(b for b in bodies if b["type"] == "job.cancelled")["data"]
    assert "user asked" == cancelled["reason"]


@pytest.mark.parametrize("outage_s", [0.0, pytest.param(10.0, marks=pytest.mark.slow)])
def test_receiver_down_then_back_gets_everything_late(tmp_path: Path, receiver: Receiver,
                                                      outage_s: float) -> None:
    """With the receiver down (for 10 s in the slow variant, else for three failed tries),
    deliveries wait and are retried with back-off; when it is back every transition arrives,
    in order, none lost and none twice; the tries show in /metrics."""
    log = LocalLog(tmp_path / "log")
    with serving(log, receiver.url) as served:
        log.append(job_events("before"))
        wait_for(lambda: len(receiver.received) >= 3, "the first job's deliveries")
        receiver.stop()
        down_at = time.monotonic()
        for job in ("x", "y"):
            log.append(job_events(job))
        sink = served.webhooks[0]
        wait_for(lambda: sink.counts["unreachable"] >= 3, "three failed tries")
        wait_for(lambda: time.monotonic() - down_at >= outage_s, "the outage", outage_s + 5)
        assert 3 == len(receiver.received)  # nothing arrived while it was down
        assert sink.pending >= 1
        receiver.start()  # the same port
        wait_for(lambda: len(receiver.received) >= 9, "the late deliveries",
                 timeout=20 + outage_s)
        with urllib.request.urlopen(served.url + "metrics") as response:
            metrics = response.read().decode()
    log.close()
    bodies = receiver.bodies()
    assert 9 == len(bodies)
    assert ["job.queued", "job.started", "job.completed"] == transitions(bodies, "x")
    assert ["job.queued", "job.started", "job.completed"] == transitions(bodies, "y")
    assert 9 == len({b["id"] for b in bodies})
    assert 'wantel_webhook_deliveries_total{result="delivered"} 9.0' in metrics
    unreachable = next(line for line in metrics.splitlines()
                       if line.startswith('wantel_webhook_deliveries_total{result="unreach'))
    assert float(unreachable.rsplit(" ", 1)[1]) >= 3


def test_an_error_status_is_retried_until_acknowledged(tmp_path: Path,
                                                       receiver: Receiver) -> None:
    """A 500 is no acknowledgement: the same delivery is tried again until a 2xx."""
    receiver.status = 500
    log = LocalLog(tmp_path / "log")
    with serving(log, receiver.url) as served:
        log.append(job_events("e"))
        sink = served.webhooks[0]
        wait_for(lambda: sink.counts["http_error"] >= 2, "two refused tries")
        receiver.status = 200
        wait_for(lambda: len(receiver.received) >= 3, "the deliveries")
    log.close()
    assert ["job.queued", "job.started", "job.completed"] == transitions(receiver.bodies(), "e")


def test_a_restart_resends_nothing_acknowledged_and_loses_nothing_pending(
        tmp_path: Path, receiver: Receiver) -> None:
    """Stop ``wantel serve`` with deliveries acknowledged and others pending (the receiver
    down); a new server on the same log sends the pending ones and none of the others."""
    log = LocalLog(tmp_path / "log")
    with serving(log, receiver.url):
        log.append(job_events("one"))
        wait_for(lambda: len(receiver.received) >= 3, "the first job's deliveries")
        receiver.stop()
        log.append(job_events("two"))
    # Appended while no server runs at all.
    log.append(job_events("three"))
    receiver.start()
    with serving(log, receiver.url):
        wait_for(lambda: len(receiver.received) >= 9, "the pending deliveries")
        log.append(job_events("four"))
        wait_for(lambda: len(receiver.received) >= 12, "the new job's deliveries")
    log.close()
    bodies = receiver.bodies()
    ids = [b["id"] for b in bodies]
    assert len(ids) == len(set(ids)), "a delivery was sent twice"
    assert 12 == len(bodies)
    for job in ("one", "two", "three", "four"):
        assert ["job.queued", "job.started", "job.completed"] == transitions(bodies, job)


def test_a_new_receiver_gets_what_happens_next_not_the_history(tmp_path: Path,
                                                               receiver: Receiver) -> None:
    """A webhook added to a server whose log already holds jobs is not flooded with them."""
    log = LocalLog(tmp_path / "log")
    log.append(job_events("old"))
    with serving(log, receiver.url):
        log.append(job_events("new"))
        wait_for(lambda: len(receiver.received) >= 3, "the new job's deliveries")
    log.close()
    assert {"new"} == {b["data"]["job"] for b in receiver.bodies()}


def test_unsigned_without_a_secret(tmp_path: Path, receiver: Receiver) -> None:
    """Without a secret no signature header is sent (the banner says UNSIGNED)."""
    log = LocalLog(tmp_path / "log")
    with serving(log, receiver.url, secret=None):
        log.append(job_events("u"))
        wait_for(lambda: len(receiver.received) >= 3, "the deliveries")
    log.close()
    assert all(SIGNATURE_HEADER not in r.headers for r in receiver.received)


class TestSignature:
    """The signing scheme: HMAC-SHA256 over ``<t>.<body>``."""

    def test_round_trip_and_tampering(self) -> None:
        """A signature verifies for its body and secret only, within the tolerance."""
        body = b'{"id":"j:0"}'
        header = sign(SECRET, 1_700_000_000, body)
        assert header.startswith("t=1700000000,v1=")
        assert verify(SECRET, header, body, now=1_700_000_010)
        assert not verify(SECRET, header, body + b" ", now=1_700_000_010)
        assert not verify(SECRET, header, body, now=1_700_000_000 + 301)
        assert not verify(SECRET, None, body)
        assert not verify(SECRET, "t=abc,v1=00", body)

    def test_matches_a_plain_hmac(self) -> None:
        """The docs' snippet (hmac over f"{t}.".encode() + body) computes the same digest."""
        import hashlib
        import hmac

        body = b"{}"
        expected = hmac.new(SECRET.encode(), b"12." + body, hashlib.sha256).hexdigest()
        assert f"t=12,v1={expected}" == sign(SECRET, 12, body)


@pytest.mark.parametrize("url", [
    "", "ftp://example.com/x", "http://", "http:///path", "not a url",
    "http://example.com:99999/", "http://example.com/#frag", " http://example.com/",
    "http://example.com/\nx", "http://" + "a" * 2100 + ".com/",
])
def test_bad_urls_are_refused_with_a_reason(url: str) -> None:
    """Malformed receiver URLs are refused before anything starts, saying why."""
    with pytest.raises(ValueError) as caught:
        check_url(url)
    assert str(caught.value)


def test_an_oversized_body_is_cut_not_refused(tmp_path: Path) -> None:
    """A body over the limit (a hand-written log's huge message) is sent cut to the job's
    identifying fields, flagged ``truncated``."""
    from exporters.webhooks import MAX_BODY_BYTES, body_of, encode_body
    from telemetry.events import JobFailed

    event = JobFailed(job="big", seq=3, ts=1, duration_s=1.0, error_type="E",
                      message="x" * (MAX_BODY_BYTES * 2))
    raw = encode_body(body_of(event, 7, None))
    assert len(raw) <= MAX_BODY_BYTES
    parsed = json.loads(raw)
    assert {"job": "big", "status": "failed", "model": None, "worker": None,
            "truncated": True} == parsed["data"]
    assert "big:3" == parsed["id"]


def test_sink_refuses_a_bad_url() -> None:
    """The sink itself checks its URL (an embedding service gets the same error)."""
    with pytest.raises(ValueError, match="http"):
        WebhookSink("gopher://x")


@pytest.mark.parametrize(("flags", "says"), [
    (["--webhook", "ftp://example.com/x"], "--webhook"),
    (["--webhook", "http://"], "--webhook"),
    (["--webhook", "http://127.0.0.1:9/x", "--webhook-secret", ""], "--webhook-secret"),
])
def test_wantel_serve_refuses_bad_webhook_flags_in_one_line(tmp_path: Path, flags: list[str],
                                                            says: str) -> None:
    """A malformed receiver URL or an empty secret: one line on stderr, exit 2."""
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "wantel", "serve", "--port", "0", "--log",
                             str(tmp_path / "log"), *flags], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "WANTEL_WEBHOOK_SECRET": ""})
    assert 2 == result.returncode, result.stderr
    assert says in result.stderr
    assert 1 == len(result.stderr.strip().splitlines()), result.stderr


def test_the_docs_verification_snippet_verifies_what_wantel_signs() -> None:
    """docs/api.md's standalone ``verify`` accepts wantel's signature and refuses a forgery."""
    import re

    docs = (Path(__file__).parents[2] / "docs" / "api.md").read_text(encoding="utf-8")
    snippet = re.search(r"```python\n(import hashlib, hmac, time\n.*?)```", docs, re.S)
    assert snippet is not None, "the snippet moved"
    namespace: dict[str, Any] = {}
    exec(snippet.group(1), namespace)
    body = b'{"id":"j:0","type":"job.queued"}'
    header = sign(SECRET, int(time.time()), body)
    assert namespace["verify"](SECRET, header, body)
    assert not namespace["verify"](SECRET, header, body.replace(b"queued", b"started"))
    assert not namespace["verify"]("wrong", header, body)


def test_a_job_of_a_lost_worker_is_announced_abandoned(tmp_path: Path,
                                                       receiver: Receiver) -> None:
    """A running job whose worker is then declared lost (WorkerLost in the log) reaches the
    receiver as job.started, then job.abandoned with the reason and who declared it; a
    second declaration of the same silence (another seq) announces nothing more."""
    from telemetry.events import WorkerLost

    log = LocalLog(tmp_path / "log")
    with serving(log, receiver.url):
        script = JobScript("stuck", steps=4, worker="w1")
        running = script.start()
        log.append(running)
        wait_for(lambda: len(receiver.received) >= 1, "job.started")
        for n in range(2):
            log.append([WorkerLost(job="wantel/lost/w1", seq=n, ts=running[-1].ts + 10**9 + n,
                                   worker="w1", last_seen_ts=running[-1].ts,
                                   declared_by="agg")])
        wait_for(lambda: len(receiver.received) >= 2, "job.abandoned")
        later = JobScript("next", steps=1, worker="w2").whole()
        log.append(later)  # a later job's deliveries: the queue went past both declarations
        wait_for(lambda: "job.completed" in transitions(receiver.bodies(), "next"),
                 "the later job")
    log.close()
    bodies = receiver.bodies()
    assert ["job.started", "job.abandoned"] == transitions(bodies, "stuck")
    abandoned = next(b for b in bodies if b["type"] == "job.abandoned")
    assert ("abandoned", "worker lost", "agg", "w1") == (
        abandoned["data"]["status"], abandoned["data"]["reason"],
        abandoned["data"]["declared_by"], abandoned["data"]["worker"])
    assert "stuck:abandoned:wantel/lost/w1:0" == abandoned["id"]
    got = next(r for r in receiver.received if r.body["type"] == "job.abandoned")
    assert verify(SECRET, got.headers[SIGNATURE_HEADER], got.raw)
