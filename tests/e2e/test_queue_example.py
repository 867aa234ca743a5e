"""docs/api.md's service example, run as it is (examples/queue_service.py) on a real uvicorn:
6 tiny jobs, 2 worker threads, watched through every view at every poll."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from exporters.webhooks import verify
from tests.e2e.servers import free_port
from tests.exporters.test_webhooks import Receiver
from tests.polling import wait_for

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "queue_service.py"
SCHEMA = json.loads((ROOT / "docs" / "schemas" / "openai-video.schema.json").read_text())
MODEL = "tiny-t2v"
SECRET = "example-secret"
#: Submitted in this order; the last jumps the queue.
PRIORITIES = (0, 0, 0, 0, 0, 5)
#: Two worker threads take their jobs within moments of each other: which JobStarted is
#: written first is a race of a few milliseconds, not an ordering the queue promises.
START_RACE_S = 0.25


def test_the_example_in_the_docs_is_the_file() -> None:
    """docs/api.md shows exactly the file this test runs."""
    doc = (ROOT / "docs" / "api.md").read_text()
    code = EXAMPLE.read_text()
    assert f"```python\n{code}```" in doc


def http(url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            raw = answer.read()
            status = answer.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    text = raw.decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def metric(text: str, name: str, labels: str) -> float | None:
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


@pytest.mark.parametrize("warmup", [
    pytest.param(4, id="with-history"),
    # A fresh log: the first predictions rest on the published priors alone, which for tiny
    # models on a shared CPU are far off (reported, not asserted).
    pytest.param(0, id="fresh-log", marks=pytest.mark.slow),
])
def test_queue_service_example(tmp_path: Path, warmup: int) -> None:
    receiver = Receiver().start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "WANTEL_LOG": str(tmp_path / "log"), "PORT": str(port),
           "WEBHOOKS": receiver.url, "WANTEL_WEBHOOK_SECRET": SECRET, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    stderr = (tmp_path / "stderr.txt").open("w")
    server = subprocess.Popen([sys.executable, str(EXAMPLE)], cwd=tmp_path, env=env,
                              stdout=stderr, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _up(base) or server.poll() is not None, "the example to listen",
                 timeout=120)
        assert server.poll() is None, (tmp_path / "stderr.txt").read_text()
        wait_for(lambda: http(f"{base}/wantel/readyz")[0] == 200, "ready", timeout=30)
        # The service has run before: its model's durations are in the log's history.
        earlier = [http(f"{base}/videos", {"prompt": "warm-up"})[1]["id"] for _ in range(warmup)]
        wait_for(lambda: all(_status(base, job) == "completed" for job in earlier),
                 "the warm-up jobs", timeout=120)
        jobs: list[str] = []
        for index, priority in enumerate(PRIORITIES):
            status, answer = http(f"{base}/videos", {"prompt": f"fox {index}",
                                                      "priority": priority})
            assert status == 202, answer
            jobs.append(answer["id"])
        rank = {job: (-p, i) for i, (job, p) in enumerate(zip(jobs, PRIORITIES, strict=True))}
        positions: dict[str, list[int]] = {job: [] for job in jobs}
        predicted: dict[str, list[tuple[float, dict[str, float]]]] = {}  # (seen at, start)
        statuses: dict[str, list[str]] = {job: [] for job in jobs}
        waiting_seen: list[list[str]] = []
        live_views = depth_checks = 0
        deadline = time.monotonic() + 240
        while True:
            assert time.monotonic() < deadline, "the 6 jobs did not complete in time"
            first = _snapshot(base)
            metrics = http(f"{base}/wantel/metrics")[1]
            second = _snapshot(base)
            for snap in (first, second):
                waiting = _check_queue(snap, rank, positions, predicted)
                if waiting:
                    waiting_seen.append(waiting)
            if _waiting(first) == _waiting(second):  # nothing moved around the scrape
                depth = metric(metrics, "wantel_queue_depth",
                               f'model="{MODEL}",queue="default"') or 0.0
                assert depth == len(_waiting(first)), (depth, _waiting(first))
                depth_checks += 1
            for job in jobs:
                if statuses[job] and statuses[job][-1] == "completed":
                    continue
                status, video = http(f"{base}/wantel/v1/videos/{job}")
                if status == 404:
                    continue  # not in the log yet: the server follows it
                jsonschema.validate(video, SCHEMA)
                if not statuses[job] or statuses[job][-1] != video["status"]:
                    statuses[job].append(video["status"])
            for job in jobs:
                if statuses[job] and statuses[job][-1] == "completed":
                    continue
                status, view = http(f"{base}/videos/{job}/progress")
                if status == 200 and view["live"] is not None:
                    assert view["live"]["job"] == job
                    assert 0 <= (view["live"]["progress"] or 0) <= 1
                    live_views += 1
            if all(s and s[-1] == "completed" for s in statuses.values()):
                break
            time.sleep(0.1)  # a poll interval: the server's CPU (and GIL) is the jobs' too
        details = {job: http(f"{base}/wantel/api/jobs/{job}")[1]["summary"] for job in jobs}
        started = {job: details[job]["started_ts"] for job in jobs}
        # The queue's order is the order jobs started in.
        for waiting in waiting_seen:
            for ahead, behind in itertools.pairwise(waiting):
                assert started[ahead] <= started[behind] + START_RACE_S, (ahead, behind)
        # Each job's place only ever moved forward, and ended at the front.
        for job, seen in positions.items():
            assert seen == sorted(seen, reverse=True), (job, seen)
        for seen in statuses.values():
            assert seen[-1] == "completed"
            assert seen == [s for s in ("queued", "in_progress", "completed") if s in seen], seen
        assert sum("queued" in seen for seen in statuses.values()) >= 3  # 6 jobs, 2 workers
        for job in jobs:
            assert (details[job]["queue"], details[job]["queue_position"]) == ("default", None)
            video = http(f"{base}/wantel/v1/videos/{job}")[1]
            assert (video["progress"], video["status"]) == (100, "completed")
        # Predicted starts against the real ones, at two checkpoints of each job's actual
        # wait (so none is scored at a moment of its own choosing): the first prediction the
        # client saw, and the latest it had seen halfway through the wait.
        report = {}
        for checkpoint in ("first", "half"):
            chosen = {}
            for job, seen in predicted.items():
                queued = details[job]["queued_ts"]
                halfway = queued + 0.5 * (started[job] - queued)
                before = [start for at, start in seen if at <= halfway]
                pick = seen[0][1] if checkpoint == "first" else (before[-1] if before else None)
                if pick is not None:
                    chosen[job] = pick
            covered = sum(p["p10"] <= started[j] <= p["p90"] for j, p in chosen.items())
            report[checkpoint] = (covered, len(chosen), ", ".join(
                f"{p['at'] - started[j]:+.2f} ({p['p10'] - started[j]:+.2f}, "
                f"{p['p90'] - started[j]:+.2f})" for j, p in chosen.items()))
        final_metrics = http(f"{base}/wantel/metrics")[1]
        # The server's scores of the predicted starts, and of the finishes predicted with
        # them (scored as each job completed).
        scores: dict[str, dict[str, tuple[float | None, ...]]] = {"start": {}, "finish": {}}
        for what, by_checkpoint in scores.items():
            for checkpoint in ("first", "half"):
                labels = f'checkpoint="{checkpoint}",queue="default"'
                by_checkpoint[checkpoint] = (
                    metric(final_metrics, f"wantel_queue_{what}_interval_covered_total",
                           labels),
                    metric(final_metrics, f"wantel_queue_{what}_relative_error_bucket",
                           f'checkpoint="{checkpoint}",le="+Inf",queue="default"'),
                    metric(final_metrics,
                           f"wantel_queue_{what}_absolute_relative_error_total", labels))
        print(f"\n[{warmup} warm-up jobs] jobs with a predicted start: {len(predicted)} of 6")
        for checkpoint, (covered, count, errors) in report.items():
            print(f"  client, {checkpoint}: {covered}/{count} inside p10-p90; predicted - "
                  f"actual start, s (p10, p90): {errors}")
        for what, by_checkpoint in scores.items():
            print(f"  server, predicted {what} (covered, scored, sum |rel err|): "
                  f"{by_checkpoint}")
        print(f"  depth checked {depth_checks} times, {len(waiting_seen)} queue states, "
              f"{live_views} in-process views")
        assert len(predicted) >= 3
        first_scored = scores["start"]["first"][1]
        assert first_scored is not None and first_scored >= 3
        if warmup:
            # Most land inside (7 or 8 of the 8 first and half-way predictions in most runs);
            # on a shared 2-core machine a busy minute can slow the jobs by a third against
            # what was learned, so the test asks for at least half. Both checkpoints are
            # counted: four predictions alone miss three times by chance too often.
            covered = report["first"][0] + report["half"][0]
            count = report["first"][1] + report["half"][1]
            assert covered >= count / 2, "the interval missed most predicted starts"
        assert live_views > 0
        workers = http(f"{base}/wantel/api/jobs")[1]["workers"]
        assert len(workers) == 1 and workers[0]["slots"] == 2  # one process, two threads
        assert workers[0]["queues"] == ["default"]
        # The webhook: every transition of every job, signed, in order.
        wait_for(lambda: sum(b["type"] == "job.completed" for b in receiver.bodies())
                 == 6 + warmup, "a job.completed webhook per job", timeout=30)
        for record in receiver.received:
            assert verify(SECRET, record.headers.get("Wantel-Signature"), record.raw)
        for job in earlier + jobs:
            types = [b["type"] for b in receiver.bodies() if b["data"]["job"] == job]
            assert types == ["job.queued", "job.started", "job.completed"], (job, types)
        (jumped,) = [b["data"] for b in receiver.bodies()
                     if b["type"] == "job.queued" and b["data"]["job"] == jobs[-1]]
        assert (jumped["queue"], jumped["priority"]) == ("default", PRIORITIES[-1])
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        stderr.close()
        receiver.stop()


def _status(base: str, job: str) -> str | None:
    status, detail = http(f"{base}/wantel/api/jobs/{job}")
    return detail["summary"]["status"] if status == 200 else None


def _up(base: str) -> bool:
    try:
        return http(f"{base}/wantel/healthz")[0] == 200
    except OSError:
        return False


def _snapshot(base: str) -> dict[str, Any]:
    status, snap = http(f"{base}/wantel/api/jobs?limit=50")
    assert status == 200, snap
    return snap  # type: ignore[no-any-return]


def _waiting(snap: dict[str, Any]) -> list[str]:
    queues = {q["queue"]: q for q in snap["queues"]}
    return list(queues["default"]["waiting"]) if "default" in queues else []


def _check_queue(snap: dict[str, Any], rank: dict[str, tuple[int, int]],
                 positions: dict[str, list[int]],
                 predicted: dict[str, list[tuple[float, dict[str, float]]]]) -> list[str]:
    """One consistent read: the waiting list is the queued jobs in priority-then-arrival
    order, each job's position is its place in it, and the depth is its length."""
    views = {v["job"]: v for v in snap["running"]}
    queued = sorted((job for job, v in views.items() if v["status"] == "queued"),
                    key=rank.__getitem__)
    waiting = _waiting(snap)
    assert waiting == queued, (waiting, queued)
    queues = {q["queue"]: q for q in snap["queues"]}
    if waiting:
        assert queues["default"]["depth"] == len(waiting)
        assert queues["default"]["by_model"] == {MODEL: len(waiting)}
    for place, job in enumerate(waiting, start=1):
        assert views[job]["queue_position"] == place
        positions[job].append(place)
        start = views[job]["predicted_start"]
        if start is not None:
            assert start["p10"] <= start["at"] <= start["p90"]
            predicted.setdefault(job, []).append((time.time(), start))
    for view in views.values():
        if view["status"] == "running":
            assert view["queue_position"] is None and view["predicted_start"] is None
    return waiting
