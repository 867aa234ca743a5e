"""``GET /v1/videos/{id}`` and ``/v1/videos``: a job in the shape of the OpenAI video job
object, checked against the JSON schema in docs/ through the life of real jobs."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from telemetry.events import Event, JobQueued
from tests.exporters.test_server import JobScript, Served, served
from tests.polling import wait_for

SCHEMA = json.loads((Path(__file__).parents[2] / "docs" / "schemas"
                     / "openai-video.schema.json").read_text(encoding="utf-8"))
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def get(s: Served, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(s.base + path.lstrip("/"), timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def applied(s: Served, position: int) -> None:
    """Wait until the service has applied ``position`` (0 included)."""
    wait_for(lambda: s.service.position is not None and s.service.position >= position,
             f"position {position}")


def video(s: Served, job: str) -> dict[str, Any]:
    status, body = get(s, f"/v1/videos/{job}")
    assert 200 == status, body
    VALIDATOR.validate(body)
    return body


def queued(script: JobScript) -> Event:
    event = JobQueued(job=script.job, seq=0, ts=script.ts, model=script.model, task="t2v")
    script.seq = 1
    return event


def test_a_job_through_its_life_matches_the_schema(tmp_path: Path) -> None:
    """Queued, in progress step by step (integer progress that never goes down), completed:
    each read validates against the schema and says what the job is doing."""
    with served(tmp_path / "log") as s:
        script = JobScript("vid-1", steps=4)
        applied(s, s.append([queued(script)]))
        first = video(s, "vid-1")
        assert {"id": "vid-1", "object": "video", "model": "tiny-t2v", "status": "queued",
                "progress": 0, "completed_at": None, "size": None, "seconds": None,
                "error": None, "expires_at": None} == {k: first[k] for k in first
                                                        if k != "created_at"}
        assert script.t0 // 10**9 == first["created_at"]
        applied(s, s.append(script.start()))
        running = video(s, "vid-1")
        assert ("in_progress", "32x32", "0.3125") == (running["status"], running["size"],
                                                      running["seconds"])
        seen = [running["progress"]]
        for step in range(4):
            applied(s, s.append(script.step_range(step, step + 1)))
            seen.append(video(s, "vid-1")["progress"])
        assert seen == sorted(seen), seen
        assert 0 < seen[-1] <= 99
        applied(s, s.append(script.finish()))
        done = video(s, "vid-1")
        assert ("completed", 100, None) == (done["status"], done["progress"], done["error"])
        assert done["completed_at"] >= done["created_at"]


@pytest.mark.parametrize(("ending", "code", "message"), [
    ("failed", "out_of_memory", "out of memory"),
    ("cancelled", "cancelled", "user asked"),
])
def test_a_job_that_did_not_complete_is_failed_with_an_error(
        tmp_path: Path, ending: str, code: str, message: str) -> None:
    """Failed and cancelled jobs read as OpenAI's ``failed`` with ``{code, message}``."""
    with served(tmp_path / "log") as s:
        applied(s, s.append(JobScript("bad", steps=2).whole(ending)))
        body = video(s, "bad")
    assert "failed" == body["status"]
    assert {"code": code, "message": message} == body["error"]
    assert body["completed_at"] is not None


def test_the_list_pages_like_openais(tmp_path: Path) -> None:
    """``/v1/videos`` lists newest first by default, pages with ``after`` and ``limit``, and
    every item validates."""
    with served(tmp_path / "log") as s:
        last = 0
        for i in range(5):
            last = s.append(JobScript(f"j{i}", steps=1).whole())
        applied(s, last)
        status, page = get(s, "/v1/videos?limit=2")
        assert 200 == status
        assert ("list", ["j4", "j3"], "j4", "j3", True) == (
            page["object"], [v["id"] for v in page["data"]], page["first_id"],
            page["last_id"], page["has_more"])
        for item in page["data"]:
            VALIDATOR.validate(item)
        _, rest = get(s, "/v1/videos?limit=10&after=j3")
        assert (["j2", "j1", "j0"], False) == ([v["id"] for v in rest["data"]],
                                               rest["has_more"])
        _, ascending = get(s, "/v1/videos?order=asc&limit=1")
        assert ["j0"] == [v["id"] for v in ascending["data"]]


@pytest.mark.parametrize(("path", "status", "param"), [
    ("/v1/videos/nobody", 404, "id"),
    ("/v1/videos?after=nobody", 404, "after"),
    ("/v1/videos?limit=0", 400, "limit"),
    ("/v1/videos?limit=abc", 400, "limit"),
    ("/v1/videos?limit=101", 400, "limit"),
    ("/v1/videos?order=sideways", 400, "order"),
])
def test_bad_requests_get_openai_shaped_errors(tmp_path: Path, path: str, status: int,
                                               param: str) -> None:
    """Unknown ids and bad parameters: 4xx with OpenAI's error object, naming the parameter."""
    with served(tmp_path / "log") as s:
        got, body = get(s, path)
    assert status == got
    assert param == body["error"]["param"]
    assert body["error"]["message"]
