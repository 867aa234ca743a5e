"""`wantel serve` against hostile clients and bad data (issue 16, the server's share).

Each test failed before its fix: a ping flood, the whole-log read per ``/events`` request,
NaN in an event, an oversized ``since``, the follower stopping for good, half-sent requests,
tokens that cannot work, uvicorn's plain-text log lines.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from starlette.testclient import TestClient
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from exporters.server import MAX_PING_ID_BYTES, check_token, create_app
from exporters.service import DEFAULT_CONTROL_BUFFER, TelemetryService
from telemetry.events import Event, JobCompleted, JobStarted, StageEnded, StepEnded
from telemetry.log.base import LogError
from telemetry.log.local import LocalLog
from tests.exporters.test_server import JobScript, opening, recv, served
from tests.polling import wait_for
from wantel.logs import configure_logging
from wantel.serving import HeaderTimeoutProtocol

WANTEL = [sys.executable, "-m", "wantel"]


def caught_up(service: TelemetryService, log: LocalLog) -> None:
    last = log.last_position()
    wait_for(lambda: service.position == last, "catch-up")


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path / "log"


# -- 1. WebSocket ping flood ----------------------------------------------------------------------


async def _flood(url: str, pings: int, pad: int, closed: Callable[[], bool]) -> str:
    """Send ``pings`` pings, each ``pad`` bytes of padding and a short id, reading nothing,
    until the server closes the connection (``closed()`` says it has) or every ping went
    out. A send that cannot go out in a second means the server stopped reading, or is only
    slow (a loaded machine): the connection is then held open, unread, until the server
    closes it or 30 s pass — closing it here would end the flood before the server saw it."""
    port = int(url.split(":")[2].split("/", maxsplit=1)[0])
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    async with async_connect(url, sock=sock, max_queue=1, ping_interval=None,
                             close_timeout=0.1) as ws:
        body = json.dumps({"type": "ping", "id": "i" * 60, "pad": "x" * pad})
        for sent in range(pings):
            if closed():
                return f"closed after {sent}"
            try:
                await asyncio.wait_for(ws.send(body), 1.0)
            except ConnectionClosed:
                return f"closed after {sent}"
            except TimeoutError:
                deadline = time.monotonic() + 30.0
                while not closed() and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                return f"held open after {sent}"
        return "sent all"


def test_a_ping_flood_is_closed_and_its_replies_stay_bounded(log_dir: Path) -> None:
    """A client that sends large pings and reads nothing is closed (1008) once 64 replies
    wait for it; the replies never exceed that; another client still gets its frames."""
    with served(log_dir, sndbuf=4096) as s, connect(s.ws_url()) as normal:
        opening(normal)
        outcome = asyncio.run(_flood(s.ws_url(), pings=8000, pad=8_000,
                                     closed=lambda: s.service.flood_closes >= 1))
        wait_for(lambda: s.service.flood_closes >= 1, "the flooding client closed")
        wait_for(lambda: s.service.subscriber_count == 1, "the flooding client forgotten")
        assert s.service.control_peak <= DEFAULT_CONTROL_BUFFER, outcome
        job = JobScript("after-flood", steps=2)
        last = s.append(job.whole())
        frames = []
        while not frames or frames[-1]["position"] != last:
            frames.append(recv(normal))
        assert "job_completed" == frames[-1]["type"]


def test_a_message_over_64_kib_closes_the_connection_with_1009(log_dir: Path) -> None:
    """uvicorn's limit is 16 MiB by default; the server's is 64 KiB."""
    with served(log_dir) as s, connect(s.ws_url(), max_size=None) as ws:
        opening(ws)
        ws.send(json.dumps({"type": "ping", "pad": "x" * (70 * 1024)}))
        with pytest.raises(ConnectionClosed) as closed:
            recv(ws)
        assert closed.value.rcvd is not None and 1009 == closed.value.rcvd.code


def test_a_ping_id_is_echoed_only_if_it_is_a_short_scalar(log_dir: Path) -> None:
    """Short scalars are echoed; long strings, objects and lone surrogates get an error frame
    and the connection stays open."""
    with served(log_dir) as s, connect(s.ws_url()) as ws:
        opening(ws)
        for good in ("abc", 12, 1.5, True, None, "é" * 20):
            ws.send(json.dumps({"type": "ping", "id": good}))
            reply = recv(ws)
            assert ("pong", good) == (reply["type"], reply["data"]["id"])
        for bad in ('"' + "x" * MAX_PING_ID_BYTES + '"', '{"a": 1}', "[1]", '"\\ud800"'):
            ws.send('{"type": "ping", "id": ' + bad + "}")
            reply = recv(ws)
            assert ("error", "bad_message") == (reply["type"], reply["data"]["error"]), bad
        ws.send(json.dumps({"type": "ping", "id": 1}))
        assert "pong" == recv(ws)["type"]


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with served(tmp_path_factory.mktemp("ws-fuzz") / "log") as s:
        yield s


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(st.one_of(st.text(max_size=300), st.binary(max_size=300),
                                   st.recursive(st.none() | st.booleans() | st.floats()
                                                | st.integers() | st.text(max_size=20),
                                                lambda inner: st.lists(inner, max_size=3)
                                                | st.dictionaries(st.text(max_size=5), inner,
                                                                  max_size=3),
                                                max_leaves=10).map(
                                       lambda v: json.dumps({"type": "ping", "id": v}))),
                         min_size=1, max_size=5))
def test_any_websocket_message_leaves_the_connection_and_server_working(
        shared_server: Any, messages: list[str | bytes]) -> None:
    """Arbitrary text and binary messages (JSON or not) never crash the handler: each gets a
    pong or an error frame, and a ping after them still gets its pong."""
    with connect(shared_server.ws_url()) as ws:
        opening(ws)
        for message in messages:
            ws.send(message)
            assert recv(ws)["type"] in ("pong", "error")
        ws.send(json.dumps({"type": "ping", "id": "last"}))
        last = recv(ws)
        assert ("pong", "last") == (last["type"], last["data"].get("id"))


def test_deep_nesting_gets_an_error_frame(log_dir: Path) -> None:
    """json.loads raised RecursionError on 30,000 nested arrays and the connection died."""
    with served(log_dir) as s, connect(s.ws_url()) as ws:
        opening(ws)
        ws.send('{"type": "ping", "x": ' + "[" * 30_000 + "]" * 30_000 + "}")
        reply = recv(ws)
        assert reply["type"] in ("pong", "error")
        ws.send(json.dumps({"type": "ping", "id": 2}))
        assert "pong" == recv(ws)["type"]


# -- 2. /events from an index; the expensive routes limited ---------------------------------------


class CountingLog(LocalLog):
    """A local log that counts the events its reads yield."""

    yielded = 0

    def read(self, start: int = 0) -> Iterator[Any]:
        for item in super().read(start):
            self.yielded += len(getattr(item, "events", ()))
            yield item

    def read_near(self, start: int, records: int = 32) -> Iterator[Any]:
        for item in super().read_near(start, records):
            self.yielded += len(getattr(item, "events", ()))
            yield item


def _interleaved(log: LocalLog, jobs: int, steps: int) -> list[JobScript]:
    scripts = [JobScript(f"job-{i}", steps=steps) for i in range(jobs)]
    for script in scripts:
        log.append(script.start())
    for step in range(steps):
        for script in scripts:
            log.append(script.step_range(step, step + 1))
    for script in scripts:
        log.append(script.finish())
    return scripts


def test_job_events_read_only_the_jobs_positions_and_strangers_none(tmp_path: Path) -> None:
    """An unknown job is a 404 without reading the log; a known job's events are read from
    its positions, not by a scan of every event."""
    log = CountingLog(tmp_path / "log")
    _interleaved(log, jobs=300, steps=3)  # 300 jobs' events, interleaved one by one
    service = TelemetryService(log, checkpoint_dir=tmp_path / "ckpt")
    with service:
        assert service.wait_ready(20)
        caught_up(service, log)
        client = TestClient(create_app(service))
        log.yielded = 0
        assert 404 == client.get("/api/jobs/nobody/events").status_code
        assert 0 == log.yielded
        body = client.get("/api/jobs/job-7/events?limit=10000").json()
        total = (log.last_position() or 0) + 1
        assert 2 + 3 * 2 + 2 == len(body["events"])
        assert {"job-7"} == {e["event"]["job"] for e in body["events"]}
        assert log.yielded < total / 4, (log.yielded, total)
        page = client.get("/api/jobs/job-7/events?limit=5").json()
        rest = client.get(f"/api/jobs/job-7/events?since={page['next_since']}"
                          f"&limit=10000").json()
        assert body["events"] == page["events"] + rest["events"]


def test_the_index_forgets_finished_jobs_as_the_jobs_list_does_and_survives_a_restart(
        tmp_path: Path) -> None:
    """keep_finished bounds the index; a restart from the checkpoint still serves the events
    of jobs applied before it."""
    log = LocalLog(tmp_path / "log")
    for i in range(4):
        log.append(JobScript(f"done-{i}", steps=2).whole())
    with TelemetryService(log, checkpoint_dir=tmp_path / "ckpt", keep_finished=2) as service:
        assert service.wait_ready(20)
        caught_up(service, log)
        client = TestClient(create_app(service))
        assert 404 == client.get("/api/jobs/done-0/events").status_code
        kept = client.get("/api/jobs/done-3/events").json()["events"]
        assert 8 == len(kept)
        assert {"done-2", "done-3"} == set(service.index.positions)
    with TelemetryService(log, checkpoint_dir=tmp_path / "ckpt", keep_finished=2) as again:
        assert again.wait_ready(20)
        assert kept == TestClient(create_app(again)).get("/api/jobs/done-3/events").json()[
            "events"]


def test_the_expensive_routes_answer_503_with_retry_after_when_full(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the limit reached, /events, /metrics and /api/jobs are 503 at once; /healthz and
    /api/jobs/{id} are not limited."""
    log = LocalLog(tmp_path / "log")
    log.append(JobScript("j", steps=2).whole())
    with TelemetryService(log, checkpoint_dir=tmp_path / "ckpt") as service:
        assert service.wait_ready(20)
        caught_up(service, log)
        release, entered = threading.Event(), threading.Event()
        real = service.job_events

        def slow(*args: Any, **kwargs: Any) -> Any:
            entered.set()
            release.wait(20)
            return real(*args, **kwargs)

        monkeypatch.setattr(service, "job_events", slow)
        client = TestClient(create_app(service, max_expensive=1))
        first: list[int] = []
        holder = threading.Thread(
            target=lambda: first.append(client.get("/api/jobs/j/events").status_code))
        holder.start()
        assert entered.wait(20)
        try:
            for path in ("/api/jobs/j/events", "/metrics", "/api/jobs"):
                busy = client.get(path)
                assert (503, "busy", "1") == (busy.status_code, busy.json()["error"],
                                              busy.headers["retry-after"]), path
            assert 200 == client.get("/healthz").status_code
            assert 200 == client.get("/api/jobs/j").status_code
        finally:
            release.set()
            holder.join(20)
        assert [200] == first
        assert 200 == client.get("/api/jobs/j/events").status_code


# -- 3. NaN and infinity in events ----------------------------------------------------------------


def _with(event: Event, **fields: Any) -> Event:
    return msgspec.structs.replace(event, **fields)


def test_nan_and_infinity_in_the_log_break_no_output(tmp_path: Path) -> None:
    """Every JSON route answers 200 with null for the non-finite values; /metrics leaves them
    out of the histograms, counts them, and its OpenMetrics parses."""
    log = LocalLog(tmp_path / "log")
    events = []
    for recorded in JobScript("nan-1", steps=3).whole():
        event = recorded
        if isinstance(recorded, JobStarted):
            event = _with(recorded, guidance_scale=math.nan)
        elif isinstance(recorded, StepEnded):
            event = _with(recorded, duration_s=[0.1, math.inf, math.nan][recorded.step])
        elif isinstance(recorded, StageEnded | JobCompleted):
            event = _with(recorded, duration_s=math.nan)
        events.append(event)
    log.append(events)
    with TelemetryService(log, checkpoint_dir=tmp_path / "ckpt") as service:
        assert service.wait_ready(20)
        caught_up(service, log)
        client = TestClient(create_app(service))
        for path in ("/api/jobs", "/api/jobs/nan-1", "/api/jobs/nan-1/events"):
            response = client.get(path)
            assert 200 == response.status_code, (path, response.text)
            assert "NaN" not in response.text and "Infinity" not in response.text
        started = client.get("/api/jobs/nan-1/events").json()["events"][0]["event"]
        assert None is started["guidance_scale"]
        text = client.get("/metrics", headers={
            "accept": "application/openmetrics-text; version=1.0.0"}).text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        for family in families.values():
            for sample in family.samples:
                if sample.name.endswith("_sum"):
                    assert math.isfinite(sample.value), sample
        skipped = {s.labels["metric"]: s.value
                   for s in families["wantel_observations_skipped"].samples}
        assert {"wantel_job_duration_seconds": 1, "wantel_stage_duration_seconds": 1,
                "wantel_denoise_step_duration_seconds": 2} == skipped
        steps = next(s for s in families["wantel_denoise_step_duration_seconds"].samples
                     if s.name.endswith("_count"))
        assert 1 == steps.value  # the one finite step
        plain = client.get("/metrics").text
        sums = [line for line in plain.splitlines() if "_sum{" in line]
        assert sums and not [line for line in sums if line.endswith(("NaN", "Inf"))]


def test_wantel_run_refuses_a_non_finite_guidance() -> None:
    """`--guidance nan` ran and exited 0; now one line and exit 2, before loading anything."""
    for value in ("nan", "inf", "-inf"):
        result = subprocess.run([*WANTEL, "run", "--model", "tiny-t2v", "--prompt", "x",
                                 f"--guidance={value}", "--log", "/nonexistent/x"],
                                capture_output=True, text=True, timeout=60)
        assert 2 == result.returncode, result.stderr
        assert "--guidance must be a number from 0" in result.stderr
        assert 1 == len(result.stderr.strip().splitlines())


# -- 4. query parameters ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def param_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TelemetryService]:
    root = tmp_path_factory.mktemp("params")
    log = LocalLog(root / "log")
    log.append(JobScript("j1", steps=2).whole())
    with TelemetryService(log, checkpoint_dir=root / "ckpt") as service:
        assert service.wait_ready(20)
        caught_up(service, log)
        yield service


def test_a_huge_since_is_a_400(param_service: TelemetryService) -> None:
    """?since=99999999999999999999 was an OverflowError (500); the docs promise 400."""
    client = TestClient(create_app(param_service))
    for value in ("99999999999999999999", "9" * 5000, "1_0", " 1", "١", "0x10", "-2"):
        response = client.get(f"/api/jobs/j1/events?since={quote(value)}")
        assert (400, "bad since") == (response.status_code, response.json()["error"]), value


ROUTES = ["/", "/healthz", "/readyz", "/metrics", "/api/jobs", "/api/jobs/j1",
          "/api/jobs/j1/events", "/api/jobs/nobody/events"]


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(ROUTES),
       params=st.lists(st.tuples(st.sampled_from(["limit", "since", "job", "token", "x"]),
                                 st.one_of(st.text(max_size=30),
                                           st.integers().map(str),
                                           st.sampled_from(["-1", "0", "10000", "10001",
                                                            "9007199254740991",
                                                            "9007199254740992"]))),
                       max_size=3))
def test_no_query_parameter_makes_a_500(param_service: TelemetryService, route: str,
                                        params: list[tuple[str, str]]) -> None:
    """Any query string on any route: a 2xx, or a 4xx with the JSON error shape."""
    client = TestClient(create_app(param_service), raise_server_exceptions=False)
    query = "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in params)
    response = client.get(route + ("?" + query if query else ""))
    assert response.status_code < 500, (route, query, response.text)
    if response.status_code >= 400:
        assert {"error", "detail"} == set(response.json())


# -- 5. risks ------------------------------------------------------------------------------------


class FlakyLog(LocalLog):
    """A local log whose reads fail while ``broken`` is set (an unreadable disk)."""

    broken = True

    def read(self, start: int = 0) -> Iterator[Any]:
        if self.broken:
            raise LogError("cannot read 00000000000000000000.wlog: Input/output error")
        return super().read(start)

    def cursor(self, start: int = 0) -> Any:
        if self.broken:
            raise LogError("cannot read 00000000000000000000.wlog: Input/output error")
        return super().cursor(start)


def test_the_follower_retries_and_the_probes_tell_the_truth(tmp_path: Path) -> None:
    """A read error stopped the follower for good with /healthz 200; now both probes say 503
    with the reason while it retries, and it catches up once the log reads again."""
    log = FlakyLog(tmp_path / "log")
    LocalLog(tmp_path / "log").append(JobScript("j", steps=2).whole())
    service = TelemetryService(log, checkpoint_dir=tmp_path / "ckpt")
    service.runner.follow_backoff = (0.01, 0.05)
    client = TestClient(create_app(service))
    with service:
        wait_for(lambda: service.failure is not None and service.failure.retries >= 2,
                 "retries")
        for path in ("/healthz", "/readyz"):
            failing = client.get(path)
            assert (503, "the log follower is failing") == (failing.status_code,
                                                            failing.json()["error"])
            assert "Input/output error" in failing.json()["detail"]["reason"]
        log.broken = False
        assert service.wait_ready(20)
        wait_for(lambda: client.get("/healthz").status_code == 200, "healthy again")
        assert 200 == client.get("/readyz").status_code
        assert 200 == client.get("/api/jobs/j").status_code


@pytest.mark.parametrize("token", ["", " s3cret", "s3cret ", "sécret", "s3 cret", "a\tb"])
def test_a_token_that_cannot_work_is_refused(token: str) -> None:
    """An empty token meant "no auth"; a padded or non-ASCII one never matched anyone."""
    with pytest.raises(ValueError):
        check_token(token)
    assert "s3cret-_.~+/=" == check_token("s3cret-_.~+/=")


@pytest.mark.parametrize("token", ["", " pad", "tök"])
def test_wantel_serve_refuses_such_a_token_in_one_line(tmp_path: Path, token: str) -> None:
    result = subprocess.run([*WANTEL, "serve", "--port", "0", "--log", str(tmp_path / "log"),
                             "--token", token], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "WANTEL_TOKEN": ""})
    assert 2 == result.returncode, result.stderr
    assert "--token" in result.stderr
    assert 1 == len(result.stderr.strip().splitlines()), result.stderr


def test_a_half_sent_request_is_disconnected_after_the_header_timeout(
        log_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn held a connection whose request head never ended; now it is closed. A whole
    request on a kept-alive connection is answered as before."""
    monkeypatch.setattr(HeaderTimeoutProtocol, "header_timeout", 0.3)
    with served(log_dir) as s:
        slow = socket.create_connection(("127.0.0.1", s.http.port))
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        slow.settimeout(10)
        assert b"" == slow.recv(100)  # closed by the server
        slow.close()
        fine = socket.create_connection(("127.0.0.1", s.http.port))
        fine.settimeout(10)
        fine.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert fine.recv(1000).startswith(b"HTTP/1.1 200")
        fine.close()


def test_uvicorns_own_lines_are_json_in_the_structured_log(log_dir: Path) -> None:
    """uvicorn installed plain-text handlers of its own; its lines now go through the root
    logger that configure_logging renders as JSON."""
    stream = io.StringIO()
    configure_logging(json=True, stream=stream)
    with served(log_dir) as s:
        garbage = socket.create_connection(("127.0.0.1", s.http.port))
        garbage.settimeout(10)
        garbage.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert garbage.recv(1000).startswith(b"HTTP/1.1 400")
        garbage.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    uvicorn = [line for line in lines if line.get("logger", "").startswith("uvicorn")]
    assert uvicorn, stream.getvalue()
    assert any("Invalid HTTP request" in line["event"] for line in uvicorn)


def _unused(ws: ClientConnection) -> None:  # keeps the sync client's type imported for mypy
    del ws
