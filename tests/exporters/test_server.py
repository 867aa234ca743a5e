"""The HTTP API and the WebSocket feed, against a real uvicorn on a loopback port.

HTTP-only behaviour goes through Starlette's in-process TestClient; everything on
``/ws/progress`` uses a real server and the ``websockets`` client, because backpressure, close
codes and the handshake's 401 only exist on a real socket.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from exporters import service as service_module
from exporters.server import create_app
from exporters.service import (
    Subscriber,
    TelemetryService,
    encode_frame,
    event_frame,
    summarize,
)
from telemetry.events import (
    DeviceInfo,
    Event,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobStarted,
    MemorySampled,
    StageEnded,
    StageProgress,
    StageStarted,
    StepEnded,
)
from telemetry.log.local import LocalLog
from telemetry.log.memory import MemoryLog
from tests.polling import wait_for
from tests.telemetry.strategies import any_event
from wantel.serving import BackgroundServer, bind

MIB = 2**20
Frame = dict[str, Any]


# -- helpers --------------------------------------------------------------------------------------


class JobScript:
    """Synthetic events of one job, with gap-free ``seq`` and advancing timestamps."""

    def __init__(self, job: str, *, steps: int = 4, model: str = "tiny-t2v",
                 worker: str | None = None, gap_s: float = 0.02, ago_s: float = 0.0) -> None:
        self.job, self.steps, self.model, self.worker = job, steps, model, worker
        self.gap_s = gap_s  # between events, and each step's duration
        self.seq = 0
        self.ts = time.time_ns() - int(ago_s * 1e9)
        self.t0 = self.ts

    def _next(self, cls: type[Event], **fields: Any) -> Event:
        self.ts += int(self.gap_s * 1e9)
        event = cls(job=self.job, seq=self.seq, ts=self.ts, worker=self.worker, **fields)
        self.seq += 1
        return event

    def start(self) -> list[Event]:
        """JobStarted and the start of the denoise stage."""
        return [
            self._next(JobStarted, model=self.model, family="wan2.1", variant=self.model,
                       task="t2v", width=32, height=32, num_frames=5, steps=self.steps,
                       guidance_scale=5.0, cfg=True, device=DeviceInfo(kind="cpu", name="cpu")),
            self._next(StageStarted, stage="denoise"),
        ]

    def step_range(self, first: int, end: int) -> list[Event]:
        """StepEnded for steps ``first … end-1``, each with a memory sample."""
        out: list[Event] = []
        for i in range(first, end):
            out.append(self._next(StepEnded, step=i, total_steps=self.steps, passes=2,
                                  duration_s=self.gap_s))
            out.append(self._next(MemorySampled, device="cpu", stage="denoise", step=i,
                                  host_rss_bytes=(300 + i) * MIB))
        return out

    def finish(self, status: str = "completed") -> list[Event]:
        """The end of denoise and the terminal event."""
        out = [self._next(StageEnded, stage="denoise", duration_s=self.gap_s * self.steps)]
        duration = (self.ts - self.t0) / 1e9
        if status == "completed":
            out.append(self._next(JobCompleted, duration_s=duration, frames=5))
        elif status == "failed":
            out.append(self._next(JobFailed, duration_s=duration, stage="denoise",
                                  error_type="OutOfMemoryError", message="out of memory",
                                  oom=True))
        else:
            out.append(self._next(JobCancelled, duration_s=duration, stage="denoise",
                                  reason="user asked"))
        return out

    def whole(self, status: str = "completed") -> list[Event]:
        """Every event of the job, start to end."""
        return self.start() + self.step_range(0, self.steps) + self.finish(status)


class Served:
    """A running service + uvicorn, with ways to reach it."""

    def __init__(self, service: TelemetryService, http: BackgroundServer, log: LocalLog):
        self.service, self.http, self.log = service, http, log

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http.port}/"

    def ws_url(self, query: str = "") -> str:
        return f"ws://127.0.0.1:{self.http.port}/ws/progress" + (f"?{query}" if query else "")

    def append(self, events: list[Event]) -> int:
        """Append and return the last position."""
        return self.log.append(events)[-1]

    def applied(self, position: int) -> None:
        """Wait until the service has applied ``position``."""
        wait_for(lambda: (self.service.position or -1) >= position, f"position {position}")


@contextmanager
def served(log_dir: Path, *, token: str | None = None, checkpoint_dir: Path | None = None,
           sndbuf: int | None = None, trace_url: str | None = None,
           **service_options: Any) -> Iterator[Served]:
    """A service over ``log_dir`` served by uvicorn on a port the kernel picked.

    ``sndbuf`` fixes the send buffer of accepted sockets (Linux inherits it from the listening
    socket), so backpressure shows after kilobytes rather than the megabytes autotuning allows.
    """
    log = LocalLog(log_dir)
    service = TelemetryService(log, checkpoint_dir=checkpoint_dir or log_dir / "checkpoints",
                               **service_options)
    sock = bind("127.0.0.1", 0)
    if sndbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    http = BackgroundServer(create_app(service, token=token, trace_url=trace_url), sock)
    service.start()
    http.start()
    try:
        assert service.wait_ready(20)
        yield Served(service, http, log)
    finally:
        http.stop()
        service.stop()
        log.close()


def recv(ws: ClientConnection, timeout: float = 10.0) -> Frame:
    """The next frame, decoded."""
    frame: Frame = json.loads(ws.recv(timeout=timeout))
    return frame


def recv_until(ws: ClientConnection, done: Callable[[Frame], bool],
               timeout: float = 20.0) -> list[Frame]:
    """Frames up to and including the first for which ``done`` is true."""
    deadline = time.monotonic() + timeout
    frames: list[Frame] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no matching frame in {timeout} s; got "
                                 f"{[f['type'] for f in frames][-20:]}")
        frames.append(recv(ws, left))
        if done(frames[-1]):
            return frames


def opening(ws: ClientConnection) -> tuple[Frame, Frame]:
    """The snapshot and caught_up frames every connection starts with (after any replay)."""
    snapshot = recv(ws)
    caught_up = recv(ws)
    assert ("snapshot", "caught_up") == (snapshot["type"], caught_up["type"])
    return snapshot, caught_up


def at_position(position: int) -> Callable[[Frame], bool]:
    """A ``recv_until`` test: the frame of this log position."""
    return lambda frame: bool(frame["position"] == position)


def is_terminal(frame: Frame) -> bool:
    return frame["type"] in ("job_completed", "job_failed", "job_cancelled")


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path / "log"


# -- the WebSocket feed -----------------------------------------------------------------------


def test_snapshot_then_deltas_while_a_real_tiny_job_runs(log_dir: Path, tmp_path: Path) -> None:
    """A real tiny job streams job_started, stages, steps with views, then job_completed."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from inference.runner import GenerationRequest, generate, prepare
    from telemetry.emitter import Emitter

    with served(log_dir) as s, connect(s.ws_url()) as ws:
        snapshot, caught_up = opening(ws)
        assert {"running": [], "finished": [], "reason": "connect"} == snapshot["data"]
        assert caught_up["position"] == snapshot["position"]
        request = GenerationRequest(model="tiny-t2v", prompt="a fox", frames=5, height=32,
                                    width=32, steps=3, out=str(tmp_path / "fox.mp4"))
        with Emitter(s.log) as emitter:
            outcome = generate(prepare(request), emitter)
        frames = recv_until(ws, is_terminal)
    types = [f["type"] for f in frames]
    assert "job_started" == types[0]
    assert "job_completed" == types[-1]
    assert {"stage_started", "stage_ended", "step", "memory"} <= set(types)
    assert [0, 1, 2] == [f["data"]["step"] for f in frames if f["type"] == "step"]
    positions = [f["position"] for f in frames]
    assert sorted(positions) == positions and len(set(positions)) == len(positions)
    assert {outcome.job} == {f["job"] for f in frames}
    first_view = frames[0]["data"]["view"]
    assert ("running", True) == (first_view["status"], first_view["eta"]["estimating"])
    last_step = [f for f in frames if f["type"] == "step"][-1]["data"]["view"]
    assert (3, 3) == (last_step["step"], last_step["steps"])
    final = frames[-1]["data"]["view"]
    assert ("completed", 1.0, None) == (final["status"], final["progress"], final["eta"])
    assert final["duration_s"] > 0 and final["peak_memory_bytes"] > 0


def test_resume_with_since_replays_then_snapshot_then_caught_up(log_dir: Path) -> None:
    """?since=P replays frames after P (exclusive) from the log, then snapshot, caught_up, live."""
    a = JobScript("job-a", steps=4)
    with served(log_dir) as s:
        with connect(s.ws_url()) as ws:
            opening(ws)
            s.append(a.start() + a.step_range(0, 2))
            seen = recv_until(ws, lambda f: f["type"] == "step" and f["data"]["step"] == 1)
        resume_at = seen[-1]["position"]
        last = s.append(a.step_range(2, 4) + a.finish())
        s.applied(last)
        with connect(s.ws_url(f"since={resume_at}")) as ws:
            replayed = recv_until(ws, lambda f: f["type"] == "snapshot")
            caught_up = recv(ws)
            tail = s.append([JobScript("job-b").start()[0]])
            live = recv(ws)
    replay, snapshot = replayed[:-1], replayed[-1]
    expected = [p for p in range(resume_at + 1, last + 1)]
    assert expected == [f["position"] for f in replay]
    assert ["memory", "step", "memory", "stage_ended", "job_completed"] == \
        [f["type"] for f in replay][-5:]
    assert all("view" not in f["data"] for f in replay)
    assert ("caught_up", last, {"replayed": len(replay)}) == \
        (caught_up["type"], caught_up["position"], caught_up["data"])
    assert (last, ["job-a"]) == (snapshot["position"],
                                 [j["job"] for j in snapshot["data"]["finished"]])
    assert ("job_started", tail, "job-b") == (live["type"], live["position"], live["job"])
    assert "running" == live["data"]["view"]["status"]


def test_terminal_frames_for_completed_failed_and_cancelled_jobs(log_dir: Path) -> None:
    """Each way a job can end has its own explicit frame, carrying the final view."""
    with served(log_dir) as s, connect(s.ws_url()) as ws:
        opening(ws)
        endings = {"ok": "completed", "oom": "failed", "stop": "cancelled"}
        for job, status in endings.items():
            s.append(JobScript(job, steps=2).whole(status))
        got: dict[str, Frame] = {}
        while len(got) < 3:
            frame = recv_until(ws, is_terminal)[-1]
            got[frame["job"]] = frame
    assert {"ok": "job_completed", "oom": "job_failed", "stop": "job_cancelled"} == \
        {job: f["type"] for job, f in got.items()}
    assert {job: status for job, status in endings.items()} == \
        {job: f["data"]["view"]["status"] for job, f in got.items()}
    assert {"type": "OutOfMemoryError", "message": "out of memory", "oom": True,
            "stage": "denoise", "step": None, "category": "internal",
            "suggestions": []} == got["oom"]["data"]["view"]["error"]
    assert "user asked" == got["stop"]["data"]["reason"]


def test_a_decodes_pieces_are_frames_whose_view_shows_them(log_dir: Path) -> None:
    """Each piece of a decode is a ``stage_progress`` frame; its view (as of the batch that
    brought it: one piece a batch here) is in stage decode at that piece (``stage_pieces``),
    its progress and ETA moving with it."""
    with served(log_dir) as s, connect(s.ws_url()) as ws:
        opening(ws)
        job = JobScript("d", steps=2)
        events = job.start() + job.step_range(0, 2)
        events.append(job._next(StageEnded, stage="denoise", duration_s=0.04))
        events.append(job._next(StageStarted, stage="decode"))
        pieces = []
        for done in (1, 2):
            s.append([*events, job._next(StageProgress, stage="decode", done=done, total=3)])
            events = []
            pieces.append(recv_until(ws, lambda f: f["type"] == "stage_progress")[-1])
    assert [([1, 3], "decode"), ([2, 3], "decode")] == [
        (f["data"]["view"]["stage_pieces"], f["data"]["view"]["stage"]) for f in pieces]
    first, second = (f["data"]["view"] for f in pieces)
    assert first["progress"] <= second["progress"] < 1
    assert second["eta"]["remaining_s"] > 0


def test_job_filter_sends_only_that_jobs_frames(log_dir: Path) -> None:
    """?job=ID narrows the snapshot and the deltas to one job."""
    a, b = JobScript("job-a", steps=3), JobScript("job-b", steps=3)
    with served(log_dir) as s:
        s.applied(s.append(b.start()))
        with connect(s.ws_url("job=job-a")) as ws:
            snapshot, _ = opening(ws)
            s.append(a.start() + b.step_range(0, 3) + a.step_range(0, 3) + b.finish()
                     + a.finish())
            frames = recv_until(ws, is_terminal)
    assert {"running": [], "finished": [], "reason": "connect"} == snapshot["data"]
    assert {"job-a"} == {f["job"] for f in frames}
    assert "job_completed" == frames[-1]["type"]
    assert 2 + 3 * 2 + 2 == len(frames)


def test_ping_gets_pong_and_junk_gets_an_error_frame(log_dir: Path) -> None:
    """A ping is answered with a pong echoing its id; a bad message is reported, not fatal."""
    with served(log_dir) as s, connect(s.ws_url()) as ws:
        opening(ws)
        ws.send(json.dumps({"type": "ping", "id": 7}))
        pong = recv(ws)
        ws.send("not json")
        error = recv(ws)
        ws.send(json.dumps({"type": "ping"}))
        second = recv(ws)
    assert ("pong", {"id": 7}) == (pong["type"], pong["data"])
    assert ("error", "bad_message") == (error["type"], error["data"]["error"])
    assert ("pong", {}) == (second["type"], second["data"])


def test_slow_client_does_not_stall_a_fast_one_and_gets_a_fresh_snapshot(
        log_dir: Path) -> None:
    """A client that stops reading overflows its own buffer only, then is resynced."""
    steps = 3000
    job = JobScript("busy", steps=steps)
    events = job.start() + job.step_range(0, steps) + job.finish()
    with served(log_dir, subscriber_buffer=500, sndbuf=8192) as s:
        raw = socket.create_connection(("127.0.0.1", s.http.port))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with connect(s.ws_url(), sock=raw, max_queue=1) as slow, \
                connect(s.ws_url()) as fast:
            opening(slow)
            opening(fast)
            fast_frames: list[Frame] = []
            for i in range(0, len(events), 100):  # the fast client keeps up with each batch
                last = s.append(events[i:i + 100])
                fast_frames += recv_until(fast, at_position(last))
            # The slow client has read nothing since its opening frames; now it drains.
            slow_frames = recv_until(
                slow, lambda f: f["type"] == "snapshot" and f["data"]["reason"] == "overflow",
                timeout=60)
    assert len(events) == len(fast_frames)
    assert "snapshot" not in {f["type"] for f in fast_frames}
    assert len(slow_frames) < len(events)
    resync = slow_frames[-1]["data"]
    assert (["busy"], "completed") == ([j["job"] for j in resync["finished"]],
                                       resync["finished"][0]["status"])
    assert steps == resync["finished"][0]["step"]


@pytest.mark.parametrize("since", ["abc", "-2", "999999", "1.5"])
def test_bad_since_gets_an_error_frame_then_close_1008(log_dir: Path, since: str) -> None:
    """A since that is not a position of this log is refused with an error frame and 1008."""
    with served(log_dir) as s:
        s.applied(s.append(JobScript("j").start()))
        with connect(s.ws_url(f"since={since}")) as ws:
            error = recv(ws)
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
    assert ("error", "bad_since") == (error["type"], error["data"]["error"])
    assert closed.value.rcvd is not None
    assert 1008 == closed.value.rcvd.code


def test_websocket_needs_the_token_in_the_query(log_dir: Path) -> None:
    """Without a token the handshake is refused with 401 JSON; ?token= opens it."""
    with served(log_dir, token="s3cret") as s:
        with pytest.raises(InvalidStatus) as refused, connect(s.ws_url()):
            pass
        with connect(s.ws_url("token=s3cret")) as ws:
            snapshot, _ = opening(ws)
    response = refused.value.response
    assert 401 == response.status_code
    assert "unauthorized" == json.loads(response.body)["error"]
    assert "snapshot" == snapshot["type"]


# -- HTTP -------------------------------------------------------------------------------------


@pytest.fixture
def service(tmp_path: Path) -> Iterator[TelemetryService]:
    """A caught-up service over a log holding one finished and one running job."""
    log = LocalLog(tmp_path / "log")
    done, running = JobScript("done-1", steps=3), JobScript("run-1", steps=10)
    log.append(done.whole() + running.start() + running.step_range(0, 4))
    svc = TelemetryService(log, checkpoint_dir=tmp_path / "ckpt")
    svc.start()
    assert svc.wait_ready(20)
    wait_for(lambda: svc.position is not None and svc.position >= log.last_position(),  # type: ignore[operator]
             "catch-up")
    yield svc
    svc.stop()
    log.close()


def test_auth_401_json_without_token_200_with_and_healthz_open(
        service: TelemetryService) -> None:
    """With a token, every route but /healthz needs it; the page also takes ?token=."""
    client = TestClient(create_app(service, token="s3cret"))
    bearer = {"authorization": "Bearer s3cret"}
    refused = client.get("/api/jobs")
    assert 401 == refused.status_code
    assert "unauthorized" == refused.json()["error"]
    assert "Bearer" in refused.headers["www-authenticate"]
    assert 401 == client.get("/metrics").status_code
    assert 401 == client.get("/api/jobs", headers={"authorization": "Bearer wrong"}).status_code
    assert 401 == client.get("/api/jobs?token=s3cret").status_code  # query only for page/WS
    assert 200 == client.get("/api/jobs", headers=bearer).status_code
    assert 200 == client.get("/metrics", headers=bearer).status_code
    assert 200 == client.get("/healthz").status_code
    assert 401 == client.get("/").status_code
    assert 200 == client.get("/?token=s3cret").status_code


def test_errors_are_json_with_the_right_status(service: TelemetryService) -> None:
    """Unknown jobs and routes are 404, bad parameters 400, wrong methods 405: all JSON."""
    client = TestClient(create_app(service))
    cases = {
        "/api/jobs/nope": (404, "no such job"),
        "/api/jobs/nope/events": (404, "no such job"),
        "/no/such/route": (404, "not found"),
        "/api/jobs?limit=x": (400, "bad limit"),
        "/api/jobs?limit=-1": (400, "bad limit"),
        "/api/jobs/run-1/events?since=x": (400, "bad since"),
        "/api/jobs/run-1/events?since=-5": (400, "bad since"),
    }
    got = {}
    for path, _ in cases.items():
        response = client.get(path)
        got[path] = (response.status_code, response.json()["error"])
        assert {"error", "detail"} == set(response.json())
    assert cases == got
    posted = client.post("/api/jobs")
    assert (405, "method not allowed") == (posted.status_code, posted.json()["error"])


def test_an_unexpected_failure_is_a_json_500(service: TelemetryService,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug behind an endpoint still answers JSON (500), without a traceback."""

    def broken(fn: Callable[[dict[str, Any]], Any]) -> Any:
        raise KeyError("boom")

    monkeypatch.setattr(service, "read_states", broken)
    response = TestClient(create_app(service), raise_server_exceptions=False).get("/api/jobs")
    assert (500, {"error": "internal error", "detail": "KeyError"}) == \
        (response.status_code, response.json())


def test_jobs_list_running_first_with_progress_eta_rate_and_memory(
        service: TelemetryService) -> None:
    """/api/jobs lists running jobs with step i/N, ETA, steps/s, memory; then finished ones."""
    body = TestClient(create_app(service)).get("/api/jobs").json()
    (running,), (finished,) = body["running"], body["finished"]
    assert ("run-1", "running", "denoise", 4, 10) == (
        running["job"], running["status"], running["stage"], running["step"], running["steps"])
    assert running["eta"]["p10_s"] <= running["eta"]["remaining_s"] <= running["eta"]["p90_s"]
    assert 0 < running["progress"] < 1
    assert 50.0 == pytest.approx(running["steps_per_second"])
    assert 303 * MIB == running["peak_memory_bytes"]
    assert ("done-1", "completed", 1.0) == (finished["job"], finished["status"],
                                             finished["progress"])
    assert finished["duration_s"] > 0
    assert finished["eta_error"]["by_bucket"]


def test_job_detail_has_timeline_and_eta_history(service: TelemetryService) -> None:
    """/api/jobs/{id} returns the projection, stage timeline and ETA history/residuals."""
    client = TestClient(create_app(service))
    done = client.get("/api/jobs/done-1").json()
    running = client.get("/api/jobs/run-1").json()
    assert ["denoise"] == [s["stage"] for s in done["stages"]]
    assert done["stages"][0]["end_ts"] > done["stages"][0]["start_ts"]
    assert done["eta"]["residuals"] and done["eta"]["history"]
    assert "completed" == done["projection"]["status"]
    assert 303 * MIB == running["memory"]["peaks"]["host_rss"]
    assert None is running["stages"][0]["end_ts"]
    assert running["eta"]["history"][0]["estimating"]


def test_job_detail_has_the_predicted_peak_and_its_error(service: TelemetryService) -> None:
    """/api/jobs/{id}: the peak predicted at the start (host RSS on a CPU) and, once the job
    completed, (predicted − observed) ÷ observed against its recorded peak."""
    client = TestClient(create_app(service))
    done = client.get("/api/jobs/done-1").json()
    running = client.get("/api/jobs/run-1").json()
    predicted = done["predicted_peak_memory_bytes"]
    assert predicted > 100 * MIB
    assert "host_rss" == done["memory"]["predicted_kind"]
    observed = done["memory"]["peaks"]["host_rss"]
    assert (predicted - observed) / observed == pytest.approx(done["memory"]["prediction_error"])
    assert running["predicted_peak_memory_bytes"] > 100 * MIB
    assert None is running["memory"]["prediction_error"]


def test_job_events_from_the_log_with_positions_and_since(service: TelemetryService) -> None:
    """/api/jobs/{id}/events returns the job's events with positions; ?since= is exclusive."""
    client = TestClient(create_app(service))
    everything = client.get("/api/jobs/run-1/events").json()
    positions = [e["position"] for e in everything["events"]]
    assert 2 + 4 * 2 == len(positions)
    assert "JobStarted" == everything["events"][0]["event"]["type"]
    after = client.get(f"/api/jobs/run-1/events?since={positions[3]}").json()
    assert positions[4:] == [e["position"] for e in after["events"]]
    page = client.get("/api/jobs/run-1/events?limit=3").json()
    assert (positions[:3], positions[2], True) == (
        [e["position"] for e in page["events"]], page["next_since"], page["more"])


def test_readyz_is_503_until_caught_up(tmp_path: Path) -> None:
    """/readyz says 503 (JSON) before the first catch-up and 200 after; /healthz is 200."""
    log = LocalLog(tmp_path / "log")
    log.append(JobScript("j").start())
    svc = TelemetryService(log, checkpoint_dir=tmp_path / "ckpt")
    client = TestClient(create_app(svc))
    before = client.get("/readyz")
    svc.start()
    svc.wait_ready(20)
    after = client.get("/readyz")
    svc.stop()
    assert (503, "catching up with the log") == (before.status_code, before.json()["error"])
    assert (200, True) == (after.status_code, after.json()["ready"])
    assert 200 == client.get("/healthz").status_code


def test_live_page_is_served_with_its_script_inlined(service: TelemetryService) -> None:
    """/ is one self-contained HTML page (no external fetch), with the WebSocket client."""
    page = TestClient(create_app(service)).get("/")
    assert "text/html; charset=utf-8" == page.headers["content-type"]
    assert "ws/progress" in page.text and "<script src=" not in page.text
    assert 'rel="stylesheet"' not in page.text


def test_restart_mid_job_resumes_from_checkpoint_without_double_counting(
        tmp_path: Path) -> None:
    """Stopping the service mid-job and starting a new one continues the job's counters."""
    log_dir, ckpt = tmp_path / "log", tmp_path / "ckpt"
    job = JobScript("long", steps=6, model="tiny-t2v")
    with served(log_dir, checkpoint_dir=ckpt) as s:
        s.applied(s.append(job.start() + job.step_range(0, 3)))
        first = TestClient(create_app(s.service)).get("/api/jobs").json()
    assert (ckpt / "serve.ckpt").is_file()
    log = LocalLog(log_dir)
    last = log.append(job.step_range(3, 6) + job.finish())[-1]
    log.close()
    with served(log_dir, checkpoint_dir=ckpt) as s:
        resumed_from = s.service.engine.health.events_by_type.get("StepEnded")
        s.applied(last)
        client = TestClient(create_app(s.service))
        after = client.get("/api/jobs").json()
        metrics = client.get("/metrics")
        engine_steps = s.service.engine.health.events_by_type["StepEnded"]
    assert (3, "running") == (first["running"][0]["step"], first["running"][0]["status"])
    assert 3 <= (resumed_from or 0)  # restored from the checkpoint, not replayed from zero
    assert 6 == engine_steps
    assert (["long"], 6, "completed") == ([j["job"] for j in after["finished"]],
                                          after["finished"][0]["step"],
                                          after["finished"][0]["status"])
    if metrics.status_code == 503:
        pytest.skip(f"/metrics unavailable: {metrics.json()['detail']}")
    series = [line for line in metrics.text.splitlines()
              if line.startswith("wantel_denoise_steps_total{")]
    assert ['wantel_denoise_steps_total{model="tiny-t2v"} 6.0'] == series


def test_live_frames_come_from_the_batch_with_the_jobs_view_as_of_it(tmp_path: Path) -> None:
    """The runner's fan-out sink frames a whole batch: each frame is event_frame's text, with
    its job's view as of the batch (no prompt, no view for a job nobody started)."""
    log = MemoryLog()
    service = TelemetryService(log, checkpoint_dir=tmp_path / "c")
    loop = asyncio.new_event_loop()
    sub = service.subscribe(loop).subscriber
    a, b = JobScript("a", steps=3), JobScript("b", steps=2)
    started = a.start()
    secret = JobStarted(**{**{n: getattr(started[0], n) for n in JobStarted.__struct_fields__},
                           "prompt": "a private idea"})
    ghost = MemorySampled(job="ghost", seq=0, ts=started[0].ts, device="cpu",
                          host_rss_bytes=MIB)
    events = ([secret, started[1]] + b.whole() + a.step_range(0, 3) + [ghost]
              + a.finish("failed"))
    log.append(events)
    assert len(events) == service.runner.catch_up()
    texts = loop.run_until_complete(sub.next_frames())
    states = service.engine.states
    expected = [encode_frame(made) for position, event in enumerate(events)
                if (made := event_frame(position, event, summarize(states, event.job)))]
    assert expected == texts
    assert "a private idea" not in "".join(texts)
    assert [None] == [json.loads(t)["data"].get("view") for t in texts if '"ghost"' in t]
    service.stop()
    loop.close()


@settings(max_examples=300, deadline=None)
@given(event=any_event, position=st.integers(0, 2**40))
def test_a_live_frame_is_event_frames_text_for_any_event(event: Event, position: int) -> None:
    """The fan-out's own frame path (a struct filled by a function generated per event type,
    the view as encoded bytes, encoded into a reused buffer) gives event_frame's text, for every
    type and any field values."""
    view = {"job": event.job, "status": "running", "progress": 0.5, "eta": None}
    made = event_frame(position, event, view)
    if made is None:  # not a viewer's event: the fan-out has no builder for it either
        assert type(event) not in service_module._LIVE
        return
    live = service_module._live_frame(position, event, service_module._view(view))
    assert encode_frame(made) == live


def test_no_frame_is_built_while_every_subscriber_overflowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subscriber that stopped reading overflows once; then frames are no longer built
    (catching up runs at full speed) until it resyncs, and it gets frames from there."""
    log = MemoryLog()
    service = TelemetryService(log, checkpoint_dir=tmp_path / "c", subscriber_buffer=4)
    loop = asyncio.new_event_loop()
    sub = service.subscribe(loop).subscriber
    job = JobScript("a", steps=4)
    log.append(job.start() + job.step_range(0, 4))
    service.runner.catch_up()
    assert (True, 1) == (sub.overflowed, sub.overflows)
    built: list[object] = []
    encode = service_module._encode

    def counting(value: object) -> bytes:
        built.append(value)
        return encode(value)

    monkeypatch.setattr(service_module, "_encode", counting)
    log.append(job.finish())
    service.runner.catch_up()
    assert ([], None) == (built, loop.run_until_complete(sub.next_frames()))
    snapshot, position = service.resync(sub)
    assert (position, ["a"]) == (len(log.read().__next__().events) - 1,
                                 [j["job"] for j in snapshot["finished"]])
    log.append([JobScript("b").start()[0]])
    service.runner.catch_up()
    assert built  # a subscriber can take frames again
    (text,) = loop.run_until_complete(sub.next_frames())
    assert ("job_started", "b") == (json.loads(text)["type"], json.loads(text)["job"])
    service.stop()
    loop.close()


def test_a_subscriber_takes_only_frames_from_its_position_and_of_its_job() -> None:
    """push() filters under the subscriber's lock (a resync may have moved its position since
    the fan-out looked), and a burst it cannot hold overflows it as a frame at a time would."""
    loop = asyncio.new_event_loop()
    texts, positions, jobs = ["a3", "b4", "a5", "b6"], [3, 4, 5, 6], ["a", "b", "a", "b"]
    every = Subscriber(loop=loop, job=None, capacity=10, min_position=4)
    only_a = Subscriber(loop=loop, job="a", capacity=10, min_position=0)
    small = Subscriber(loop=loop, job=None, capacity=3, min_position=0)
    for sub in (every, only_a, small):
        sub.push(texts, positions, jobs)
    assert (["b4", "a5", "b6"], ["a3", "a5"]) == (list(every._queue), list(only_a._queue))
    assert (True, 1, []) == (small.overflowed, small.overflows, list(small._queue))
    loop.close()


def test_service_forgets_a_closed_subscriber(tmp_path: Path) -> None:
    """A subscriber whose connection ended no longer receives frames or counts."""
    log = LocalLog(tmp_path / "log")
    with TelemetryService(log, checkpoint_dir=tmp_path / "c") as svc:
        svc.wait_ready(20)
        loop = asyncio.new_event_loop()
        sub = svc.subscribe(loop).subscriber
        assert 1 == svc.subscriber_count
        svc.unsubscribe(sub)
        assert 0 == svc.subscriber_count
        loop.close()
    log.close()



# -- the commands -----------------------------------------------------------------------------


def test_wantel_serve_prints_its_urls_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """`wantel serve --port 0` prints its URLs, serves, and on SIGTERM exits 0 with a checkpoint."""
    log_dir = tmp_path / "log"
    log = LocalLog(log_dir)
    log.append(JobScript("before", steps=2).whole())
    log.close()
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-m", "wantel", "serve", "--log", str(log_dir), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root)
    try:
        assert proc.stdout is not None
        banner = [proc.stdout.readline() for _ in range(6)]
        port = int(banner[1].rsplit(":", 1)[1].strip("/\n"))
        body = wait_for(lambda: _get_json(f"http://127.0.0.1:{port}/api/jobs"), "the API")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert ["before"] == [j["job"] for j in body["finished"]]
    assert banner[0].startswith(f"wantel serve: following {log_dir}")
    assert 0 == code
    assert (log_dir / "checkpoints" / "serve.ckpt").is_file()


def _get_json(url: str) -> Any:
    try:
        response = httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def test_wantel_demo_runs_n_jobs_while_serving(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`wantel demo --jobs 2 --port 0` prints the URL first, runs two tiny jobs, then stops."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from wantel.cli import main

    log_dir = tmp_path / "log"
    code = main(["demo", "--log", str(log_dir), "--port", "0", "--jobs", "2",
                 "--out-dir", str(tmp_path / "out")])
    lines = capsys.readouterr().out.splitlines()
    statuses = {}
    for item in LocalLog(log_dir, create=False).read():
        for event in getattr(item, "events", []):
            if isinstance(event, JobCompleted):
                statuses[event.job] = "completed"
    assert 0 == code
    assert lines[0].startswith("wantel demo: following")
    assert "live page" in lines[1]
    assert 2 == len([line for line in lines if line.endswith(" s") and "completed" in line])
    assert ["completed", "completed"] == list(statuses.values())
    assert (log_dir / "checkpoints" / "serve.ckpt").is_file()


def test_no_frame_is_built_while_the_server_is_far_behind_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst lands while a client is connected: frames the client could only read once stale
    are not built; the client sleeps, then owes one snapshot, taken near the log's end."""
    log = LocalLog(tmp_path / "log")
    service = TelemetryService(log, checkpoint_dir=tmp_path / "c")
    service.fanout.coalesce_behind = 500
    loop = asyncio.new_event_loop()
    sub = service.subscribe(loop).subscriber
    jobs = [JobScript(f"j{i}", steps=100) for i in range(20)]
    for job in jobs:  # 20 jobs of ~105 events, flushed three at a time as emitters do
        events = job.start() + job.step_range(0, 100) + job.finish()
        for i in range(0, len(events), 3):
            log.append(events[i:i + 3])
    total = log.last_position()
    assert total is not None and total > 2000
    built: list[object] = []
    into = service_module._encode_into

    def counting(value: object, buffer: bytearray) -> None:
        built.append(value)
        into(value, buffer)

    monkeypatch.setattr(service_module, "_encode_into", counting)
    service.runner.catch_up()
    assert (True, 1) == (sub.overflowed, sub.overflows)
    assert len(built) < 1100  # only the last batch or so: within coalesce_behind of the end
    assert sub._signalled  # woken near the end, to take its snapshot
    assert loop.run_until_complete(sub.next_frames()) is None
    snapshot, position = service.resync(sub)
    assert (position, 20) == (total, len(snapshot["finished"][:20]))
    service.stop()
    log.close()
    loop.close()


def test_queued_jobs_carry_their_place_and_predicted_start_over_websocket(
        log_dir: Path) -> None:
    """A worker runs one job while two wait: the snapshot shows each waiting job's place and
    predicted start and finish; the running one its predicted finish; a job_queued frame
    arriving later carries its own place behind them."""
    from telemetry.events import JobQueued

    def queued(job: str, priority: int = 0) -> JobQueued:
        return JobQueued(job=job, seq=0, ts=time.time_ns(), model="tiny-t2v", task="t2v",
                         queue="gpu", priority=priority, worker="svc")

    history = [JobScript(f"h{i}", worker="w", ago_s=30.0) for i in range(2)]
    running = JobScript("r", worker="w")
    running.seq = 1  # its JobQueued took seq 0
    with served(log_dir) as s:
        events: list[Event] = [e for h in history for e in h.whole()]
        events += [queued("r"), *running.start(), *running.step_range(0, 2)]
        events += [queued("a"), queued("b", priority=1)]
        s.applied(s.append(events))
        with connect(s.ws_url()) as ws:
            snapshot, _ = opening(ws)
            s.append([queued("c")])
            frame = recv_until(ws, lambda f: f["type"] == "job_queued")[-1]
    views = {v["job"]: v for v in snapshot["data"]["running"]}
    assert (views["b"]["queue"], views["b"]["queue_position"]) == ("gpu", 1)  # priority first
    assert views["a"]["queue_position"] == 2
    for job in ("a", "b"):
        start, finish = views[job]["predicted_start"], views[job]["predicted_finish"]
        assert start is not None and finish is not None
        assert start["p10"] <= start["at"] <= start["p90"] and finish["at"] > start["at"]
    assert views["b"]["predicted_start"]["at"] <= views["a"]["predicted_start"]["at"]
    assert views["r"]["queue_position"] is None and views["r"]["predicted_start"] is None
    assert views["r"]["predicted_finish"] is not None
    assert (frame["job"], frame["data"]["view"]["queue_position"]) == ("c", 3)
    assert frame["data"]["queue"] == "gpu"
