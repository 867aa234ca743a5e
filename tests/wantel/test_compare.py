"""``wantel compare`` (issue 20, item 4) on a copy of the recorded corpus and a log with a
failure, checked against figures computed from the events themselves."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest

from telemetry.eta.jobs import job_records
from telemetry.events import DeviceInfo, JobFailed, JobStarted
from telemetry.log.base import Batch
from telemetry.log.local import LocalLog
from wantel.cli import main

CORPUS = Path(__file__).parents[1] / "fixtures" / "eta-corpus"


@pytest.fixture(name="log_dir")
def _log_dir(tmp_path: Path) -> Path:
    target = tmp_path / "log"
    shutil.copytree(CORPUS, target)
    return target


def _rows(capsys: pytest.CaptureFixture[str], log_dir: Path, *flags: str) -> list[dict]:
    assert 0 == main(["compare", "--log", str(log_dir), "--json", *flags])
    return json.loads(capsys.readouterr().out)


def test_by_model_matches_the_events(log_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Jobs and the p50 duration per model are what the log's own events say."""
    rows = _rows(capsys, log_dir, "--by", "model")
    log = LocalLog(log_dir, create=False)
    records = job_records(e for item in log.read() if isinstance(item, Batch)
                          for e in item.events)
    log.close()
    assert {r["model"] for r in rows} == {r.started.model for r in records}
    assert sum(r["jobs"] for r in rows) == len(records) == 64
    for row in rows:
        mine = [r.duration_s for r in records if r.started.model == row["model"]]
        assert row["p50_duration_s"] == pytest.approx(statistics.median(mine))
        assert row["p90_duration_s"] >= row["p50_duration_s"]
        assert row["steps_per_second"] > 0 and row["seconds_per_frame"] > 0
        assert row["peak_memory_bytes"] > 100 * 2**20
        assert 0 <= row["eta_error"] < 1 and 0 == row["failure_rate"]


def test_a_failure_counts_in_its_group_by_worker(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = LocalLog(tmp_path / "log")
    start = JobStarted(job="f", seq=0, ts=10**18, worker="w1", model="tiny-t2v",
                       family="wan2.1", variant="tiny-t2v", task="t2v", width=64, height=64,
                       num_frames=9, steps=4, guidance_scale=5.0, cfg=True,
                       device=DeviceInfo(kind="cpu", name="cpu"))
    log.append([start, JobFailed(job="f", seq=1, ts=10**18 + 10**9, worker="w1",
                                 stage="denoise", error_type="MemoryError", message="x",
                                 duration_s=1.0)])
    log.close()
    (row,) = _rows(capsys, tmp_path / "log", "--by", "worker")
    assert row["worker"] == "w1" and row["jobs"] == 1 and row["failure_rate"] == 1.0
    assert row["p50_duration_s"] is None and sum(row["failures"].values()) == 1


def test_table_and_bad_input(log_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert 0 == main(["compare", "--log", str(log_dir), "--by", "variant"])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["variant", "jobs", "p50"] and len(table) == 6
    for argv, message in ((["--since", "soon"], "--since: not a duration"),
                          (["--since", "1s"], "no jobs started in the last 1s")):
        assert 2 == main(["compare", "--log", str(log_dir), *argv])
        err = capsys.readouterr().err
        assert message in err and 1 == len(err.strip().splitlines())
    with pytest.raises(SystemExit) as exited:  # argparse's own one-line error
        main(["compare", "--log", str(log_dir), "--by", "colour"])
    assert 2 == exited.value.code
    err = capsys.readouterr().err
    assert "invalid choice: 'colour'" in err and 1 == len(err.strip().splitlines())
