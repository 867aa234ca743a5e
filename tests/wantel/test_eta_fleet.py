"""``wantel eta fit|eval --nats``: the ETA is calibrated and scored over the fleet's stream
(every worker's jobs), the same as over a log holding the same events (real nats-server)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from telemetry.events import EtaCalibrated, Event
from telemetry.log.base import Batch
from telemetry.log.local import LocalLog
from telemetry.log.nats import NatsLog, NatsOptions
from tests.nats_server import NatsServer
from wantel.cli import main

pytest.importorskip("nats")

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "eta-corpus"


def events_of(log_dir: Path) -> list[Event]:
    with LocalLog(log_dir, create=False) as log:
        return [e for item in log.read() if isinstance(item, Batch) for e in item.events]


def test_eval_and_fit_over_the_fleet_stream(nats_server: NatsServer, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The recorded corpus, published to the stream: `eta eval --nats --json` prints what
    `eta eval --log` prints of the same events, and `eta fit --nats` records its calibration in
    the stream, where every aggregator folds it."""
    local = tmp_path / "corpus"
    shutil.copytree(CORPUS, local)
    stream = NatsLog(NatsOptions(nats_server.url))
    try:
        stream.append(events_of(local))
    finally:
        stream.close()
    assert 0 == main(["eta", "eval", "--json", "--log", str(local)])
    from_log = json.loads(capsys.readouterr().out)
    assert 0 == main(["eta", "eval", "--json", "--nats", nats_server.url])
    from_stream = json.loads(capsys.readouterr().out)
    assert from_log == from_stream
    assert (28, 36) == (from_stream["train_jobs"], from_stream["test_jobs"])
    assert 0 == main(["eta", "fit", "--json", "--nats", nats_server.url])
    fitted = json.loads(capsys.readouterr().out)
    reader = NatsLog(NatsOptions(nats_server.url), create=False)
    try:
        calibrations = [e for item in reader.read() if isinstance(item, Batch)
                        for e in item.events if isinstance(e, EtaCalibrated)]
    finally:
        reader.close()
    assert [fitted["jobs"]] == [c.jobs for c in calibrations]
