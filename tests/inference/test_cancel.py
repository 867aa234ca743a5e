"""``POST /api/jobs/{id}/cancel`` against a real tiny pipeline: the request is recorded, the
worker sees it at its next step boundary through the control channel and stops through
diffusers' interrupt flag, ending ``JobCancelled(reason="requested")``."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from inference.instrument import JobCancelledError, instrument
from inference.tiny_models import build_tiny_pipeline
from telemetry.control import CancelChannel
from telemetry.emitter import Emitter
from telemetry.events import (
    CONTROL_STREAM,
    CancelRequested,
    JobCancelled,
    JobQueued,
    StageStarted,
    StepEnded,
)
from tests.exporters.test_server import JobScript, Served, served
from tests.inference.test_instrument import call_kwargs, of_type
from tests.polling import wait_for
from tests.telemetry.log_contract import events_of

TOKEN = "s3cret-token"


def post(s: Served, path: str, body: bytes | None = None,
         token: str | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(s.base + path.lstrip("/"), data=body or b"",
                                     method="POST")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def known(s: Served, job: str) -> bool:
    return bool(s.service.read_states(lambda states: job in states["jobs"].jobs))


def test_a_cancel_lands_within_one_denoising_step(tmp_path: Path) -> None:
    """Requested during step 3 of 20, the job records no step after 3, never decodes, ends
    ``JobCancelled(reason="requested")`` in denoise, and the call raises."""
    pipe = build_tiny_pipeline("tiny-t2v")
    asked_at: list[int] = []
    with served(tmp_path / "log") as s, Emitter(s.log, heartbeat_interval=None) as emitter:

        def request_cancel_at_step_3(pipe: Any, index: int, timestep: Any,
                                     tensors: dict[str, Any]) -> dict[str, Any]:
            if index == 3:
                assert emitter.flush(10)
                wait_for(lambda: known(s, "to-stop"), "the server to know the job")
                status, body = post(s, "/api/jobs/to-stop/cancel")
                assert 202 == status, body
                asked_at.append(index)
            return {}

        with instrument(pipe, emitter=emitter, job="to-stop"), \
                pytest.raises(JobCancelledError, match="requested"):
            pipe(**call_kwargs("tiny-t2v", steps=20),
                 callback_on_step_end=request_cancel_at_step_3)
        assert emitter.flush(10)
        events = list(events_of(s.log.read()))
        wait_for(lambda: s.service.read_states(
            lambda states: states["jobs"].jobs["to-stop"].status) == "cancelled",
            "the server to see the job cancelled")
        again, _ = post(s, "/api/jobs/to-stop/cancel")
    assert [3] == asked_at
    steps = [e.step for e in of_type(events, StepEnded) if e.job == "to-stop"]
    assert list(range(4)) == steps, "steps ran after the cancel was requested"
    assert not [e for e in of_type(events, StageStarted) if e.stage == "decode"]
    [cancelled] = of_type(events, JobCancelled)
    assert ("requested", "denoise", 4) == (cancelled.reason, cancelled.stage, cancelled.step)
    [request] = of_type(events, CancelRequested)
    assert (CONTROL_STREAM, "to-stop", "api") == (request.job, request.target, request.by)
    assert request.ts < cancelled.ts
    assert CancelChannel(tmp_path / "log").pending("to-stop") is None  # consumed
    assert 409 == again


def test_a_job_cancelled_while_queued_stops_before_its_first_step(tmp_path: Path) -> None:
    """A cancel of a queued job is waiting when the worker starts it: no step runs."""
    pipe = build_tiny_pipeline("tiny-t2v")
    with served(tmp_path / "log") as s, Emitter(s.log, heartbeat_interval=None) as emitter:
        emitter.emit(JobQueued(job="queued-1", ts=1, model="tiny-t2v", task="t2v"))
        assert emitter.flush(10)
        wait_for(lambda: known(s, "queued-1"), "the server to know the job")
        assert 202 == post(s, "/api/jobs/queued-1/cancel", b'{"reason": "user left"}')[0]
        with instrument(pipe, emitter=emitter, job="queued-1"), \
                pytest.raises(JobCancelledError):
            pipe(**call_kwargs("tiny-t2v", steps=4))
        assert emitter.flush(10)
        events = [e for e in events_of(s.log.read()) if e.job == "queued-1"]
    assert not of_type(events, StepEnded)
    [cancelled] = of_type(events, JobCancelled)
    assert "requested" == cancelled.reason


def test_the_http_contract(tmp_path: Path) -> None:
    """401 without the token, 404 for an unknown job, 409 for a finished one, 400/413 for a
    bad body; 202 appends CancelRequested (with the reason) and writes the control file."""
    with served(tmp_path / "log", token=TOKEN) as s:
        running = JobScript("running", steps=3)
        s.append(running.start())
        last = s.append(JobScript("done", steps=1).whole())
        wait_for(lambda: (s.service.position or 0) >= last, "the jobs applied")
        assert 401 == post(s, "/api/jobs/running/cancel")[0]
        status, body = post(s, "/api/jobs/nobody/cancel", token=TOKEN)
        assert (404, "no such job") == (status, body["error"])
        status, body = post(s, "/api/jobs/done/cancel", token=TOKEN)
        assert (409, "completed") == (status, body["detail"]["status"])
        assert 400 == post(s, "/api/jobs/running/cancel", b"{not json", token=TOKEN)[0]
        assert 400 == post(s, "/api/jobs/running/cancel", b'{"reason": 5}', token=TOKEN)[0]
        assert 413 == post(s, "/api/jobs/running/cancel", b"x" * 5000, token=TOKEN)[0]
        status, body = post(s, "/api/jobs/running/cancel", b'{"reason": "too slow"}',
                            token=TOKEN)
        assert (202, "cancel_requested", "too slow") == (status, body["status"],
                                                         body["reason"])
        status, second = post(s, "/api/jobs/running/cancel", token=TOKEN)
        assert 202 == status and second["position"] > body["position"]
        requests = of_type(list(events_of(s.log.read())), CancelRequested)
    assert [("running", "token", "too slow"), ("running", "token", "requested")] == [
        (r.target, r.by, r.reason) for r in requests]
    assert [0, 1] == [r.seq for r in requests]  # two in a row: neither dropped as a duplicate
    notice = CancelChannel(tmp_path / "log").pending("running")
    assert notice is not None and "requested" == notice.reason
