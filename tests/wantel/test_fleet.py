"""The fleet: several worker processes ship to one stream, and the fleet view equals replaying
the union of their local logs (real nats-server, real processes, the real Emitter)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from telemetry.log.base import Batch
from telemetry.log.local import LocalLog
from tests.nats_server import NatsServer
from wantel.cli import main

pytest.importorskip("nats")

WORKERS = 4
JOBS = 3


def replay_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """``wantel replay --json`` as a document."""
    assert 0 == main(["replay", "--json", *argv])
    doc: dict[str, Any] = json.loads(capsys.readouterr().out)
    return doc


#: The online ETA model is calibrated by jobs in the order they end fleet-wide, so its history
#: depends on how the workers' logs interleave (the stream's order is not a concatenation's):
#: both are right, and they differ. Everything else about a job must be equal.
ORDER_DEPENDENT = ("eta", "eta_history", "eta_residuals", "eta_before_start_error")


def comparable(doc: dict[str, Any]) -> dict[str, Any]:
    """Jobs by id and the event counts: what must not depend on how the logs interleave."""
    jobs = [{k: v for k, v in job.items() if k not in ORDER_DEPENDENT} for job in doc["jobs"]]
    return {"jobs": sorted(jobs, key=lambda job: job["job"]),
            "events_by_type": doc["health"]["events_by_type"],
            "duplicates": doc["health"]["duplicates"]}


def test_four_workers_one_stream_one_view(nats_server: NatsServer, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """4 worker processes each emit jobs and ship them; `wantel replay --json --nats` equals
    replaying the union of the workers' local logs, and `cat --nats` prints every event."""
    procs = [subprocess.Popen([sys.executable, "-m", "tests.wantel.fleet_worker",
                               str(tmp_path / f"w{n}"), nats_server.url, f"node-{n}:1{n}:99",
                               str(JOBS)]) for n in range(WORKERS)]
    for proc in procs:
        assert 0 == proc.wait(120)
    union = tmp_path / "union"
    with LocalLog(union) as merged:
        for n in range(WORKERS):
            with LocalLog(tmp_path / f"w{n}", create=False) as worker_log:
                for item in worker_log.read():
                    assert isinstance(item, Batch)
                    merged.append(item.events)
    fleet = replay_json(["--nats", nats_server.url], capsys)
    local = replay_json(["--log", str(union)], capsys)
    assert WORKERS * JOBS == len(fleet["jobs"])
    assert {"completed"} == {job["status"] for job in fleet["jobs"]}
    assert comparable(local) == comparable(fleet)

    assert 0 == main(["cat", "--nats", nats_server.url])
    fleet_lines = capsys.readouterr().out.splitlines()
    assert 0 == main(["cat", "--log", str(union)])
    union_lines = capsys.readouterr().out.splitlines()
    assert sorted(union_lines) == sorted(fleet_lines)  # every event, once, byte for byte


def test_reading_a_fleet_that_is_not_there(tmp_path: Path, nats_server: NatsServer,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """No stream yet: replay --nats says so in one line and exits 2."""
    assert 2 == main(["replay", "--nats", nats_server.url])
    err = capsys.readouterr().err
    assert "no stream WANTEL_EVENTS" in err and 1 == len(err.strip().splitlines())


def test_serve_follows_the_fleet_stream(nats_server: NatsServer, tmp_path: Path) -> None:
    """`wantel serve --nats` lists every worker's jobs in /api/jobs, live."""
    import urllib.request

    from tests.polling import wait_for
    from wantel.cli import build_parser
    from wantel.serving import open_serving

    args = build_parser("serve").parse_args(
        ["serve", "--nats", nats_server.url, "--port", "0", "--state", str(tmp_path / "st")])
    serving = open_serving(args)
    serving.start()
    try:
        procs = [subprocess.Popen([sys.executable, "-m", "tests.wantel.fleet_worker",
                                   str(tmp_path / f"w{n}"), nats_server.url, f"node-{n}",
                                   "1"]) for n in range(2)]
        for proc in procs:
            assert 0 == proc.wait(120)

        def jobs() -> list[Any]:
            with urllib.request.urlopen(serving.url + "api/jobs", timeout=5) as response:
                body = json.loads(response.read())
            done: list[Any] = body["finished"]
            return done if len(done) == 2 else []

        found = wait_for(jobs, "both workers' jobs in /api/jobs", timeout=30)
        assert {"node-0-job-0", "node-1-job-0"} == {j["job"] for j in found}
    finally:
        serving.stop()
    assert (tmp_path / "st" / "checkpoints").is_dir()
