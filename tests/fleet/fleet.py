"""Helpers of the fleet tests: worker and shipper processes, the union of local logs, the
fleet stream's events, and projection state digests that the interleaving cannot change."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec

from telemetry.engine import ProjectionEngine
from telemetry.events import Event
from telemetry.log.base import Batch, EventLog
from telemetry.log.local import LocalLog
from telemetry.log.nats import NatsLog, NatsOptions
from telemetry.projections import default_projections


def start_emitter(log_dir: Path, worker: str, jobs: int, pace: float = 0.002
                  ) -> subprocess.Popen[str]:
    """A scripted worker process (:mod:`tests.fleet.emitter_proc`) writing its local log."""
    return subprocess.Popen([sys.executable, "-m", "tests.fleet.emitter_proc", str(log_dir),
                             worker, str(jobs), str(pace)], stdout=subprocess.PIPE, text=True)


def wait_for_log(log_dir: Path) -> None:
    """Until the worker process has created its log (``wantel ship`` refuses a directory that
    is not one yet, with exit 2: a shipper starts after its worker's log exists)."""
    from tests.polling import wait_for

    wait_for((log_dir / "wantel-log.json").exists, f"the log {log_dir}", timeout=60)


def start_shipper(log_dir: Path, url: str, worker: str, *, stderr: Path | None = None
                  ) -> subprocess.Popen[bytes]:
    """``wantel ship --log DIR --nats URL --worker ID``, a process of its own."""
    out = stderr.open("ab") if stderr is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen([sys.executable, "-m", "wantel", "ship", "--log", str(log_dir),
                                 "--nats", url, "--worker", worker],
                                stdout=subprocess.DEVNULL, stderr=out)
    finally:
        if stderr is not None:
            out.close()  # type: ignore[union-attr]


def events_of(log: EventLog) -> list[Event]:
    """Every event ``log`` holds, in its order."""
    return [e for item in log.read() if isinstance(item, Batch) for e in item.events]


def local_events(path: Path) -> list[Event]:
    """Every event of a local log, in log order."""
    with LocalLog(path, create=False) as log:
        return events_of(log)


def stream_events(url: str) -> list[Event]:
    """Every event the fleet stream holds, in stream order."""
    log = NatsLog(NatsOptions(url), create=False)
    try:
        return events_of(log)
    finally:
        log.close()


def stream_count(url: str) -> int:
    """How many messages the fleet stream holds (0 before it exists)."""
    from telemetry.log.base import LogNotFound

    try:
        log = NatsLog(NatsOptions(url, timeout=2.0), create=False)
    except LogNotFound:
        return 0
    try:
        last = log.last_position()
        return 0 if last is None else last + 1
    finally:
        log.close()


def union(logs: list[Path], dest: Path) -> Path:
    """One fresh local log holding each log's events, one log after the other."""
    with LocalLog(dest) as merged:
        for path in logs:
            with LocalLog(path, create=False) as log:
                for item in log.read():
                    assert isinstance(item, Batch)
                    merged.append(item.events)
    return dest


def assert_exactly_once(local: list[Event], shipped: list[Event]) -> None:
    """Every local event is in ``shipped`` once, equal to itself, and nothing else is."""
    counts = Counter((e.job, e.seq) for e in shipped)
    assert {} == {key: n for key, n in counts.items() if n > 1}
    assert sorted((e.job, e.seq) for e in local) == sorted(counts)
    by_key = {(e.job, e.seq): e for e in shipped}
    assert [e for e in local if by_key[(e.job, e.seq)] != e] == []


def fold(events: list[Event]) -> ProjectionEngine:
    """Every projection ``wantel serve`` runs, folded over ``events``."""
    engine = ProjectionEngine(default_projections())
    engine.apply_batch(Batch(0, events))
    return engine


def _sorted_maps(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _sorted_maps(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted_maps(v) for v in value]
    return value


def state_digests(engine: ProjectionEngine) -> dict[str, str]:
    """Each projection's state digest: SHA-256 of its msgpack bytes (what a checkpoint stores,
    as tests/telemetry/test_fold_equivalence.py compares) with every mapping's keys sorted.
    The maps keyed by job or worker are insertion-ordered sets; the stream interleaves the
    workers, so the order they were inserted in differs from a concatenation's, and what they
    hold must not."""
    return {p.name: hashlib.sha256(msgspec.msgpack.encode(
        _sorted_maps(msgspec.to_builtins(engine.states[p.name])))).hexdigest()
        for p in engine.projections}


#: Projections that learn fleet-wide from jobs in the order they end (the ETA model's online
#: calibration, the memory model's priors across models): their state depends on how the
#: workers' logs interleave, so they are compared against the union folded in stream order.
ORDER_DEPENDENT_PROJECTIONS = frozenset({"eta", "memory"})
#: The same, as fields of `wantel replay --json`'s jobs.
ORDER_DEPENDENT_FIELDS = ("eta", "eta_history", "eta_residuals", "eta_before_start_error")


def comparable(doc: dict[str, Any]) -> dict[str, Any]:
    """A `wantel replay --json` document without what depends on the interleaving."""
    jobs = [{k: v for k, v in job.items() if k not in ORDER_DEPENDENT_FIELDS}
            for job in doc["jobs"]]
    return {"jobs": sorted(jobs, key=lambda job: job["job"]),
            "events_by_type": doc["health"]["events_by_type"],
            "duplicates": doc["health"]["duplicates"]}


def replay_json(argv: list[str]) -> dict[str, Any]:
    """``wantel replay --json ARGV`` run as a process, as a document."""
    done = subprocess.run([sys.executable, "-m", "wantel", "replay", "--json", *argv],
                          capture_output=True, text=True, timeout=120, check=False)
    assert 0 == done.returncode, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc
