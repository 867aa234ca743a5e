"""The second GPU check's CPU dry run (``--cpu-smoke``), so the one prepared device run of
issue 21 cannot rot unnoticed: every section runs end to end on tiny shapes (about 20 s), as a
subprocess, exactly as the device runs it, with the real ``wantel eta eval``, ``wantel advise``
and ``wantel serve`` it calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("config", "warmup", "sync", "overhead", "eta_corpus", "two_experts", "eta_eval",
            "vram", "oom", "identity", "emitter", "rows", "notes", "table", "total_s")


@pytest.mark.timeout(150)
def test_cpu_smoke_runs_every_section(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("OUT", None)
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check2.py", "--cpu-smoke", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=140)
    assert 0 == done.returncode, done.stderr[-3000:]
    assert {"gpu_check2.json", "metrics.txt", "wantel-logs.tar.gz"} == \
        {p.name for p in tmp_path.iterdir()}
    result = json.loads((tmp_path / "gpu_check2.json").read_text())
    assert [] == [name for name in SECTIONS if name not in result]
    failed = {name: result[name].get("error") for name in SECTIONS
              if isinstance(result[name], dict) and result[name].get("status") == "error"}
    assert {} == failed
    assert result["table"] in done.stdout
    assert all(row["result"] != "FAIL" for row in result["rows"])
    # The corpus: >= 16 runs of the 1.3B-shaped pipeline, 3 two-expert runs switching where
    # the schedule says, every run scored by the real CLI and given a predicted peak.
    runs = result["eta_corpus"]["runs"]
    assert len(runs) >= 16
    expected = result["two_experts"]["expected_switch_step"]
    assert [[[expected, "high_noise", "low_noise"]]] * 3 == result["two_experts"]["switches"]
    online = result["eta_eval"]["eta"]["online"]
    assert {r["job"] for r in runs} == set(online["jobs"])
    assert result["eta_eval"]["eta"]["split"]["test_jobs"] > 0
    assert len(result["vram"]["runs"]) == len(runs) + 3
    assert all(r["predicted_bytes"] for r in result["vram"]["runs"])
    # The oversized jobs fail as device OOM (simulated on a CPU) with suggestions.
    for case in result["oom"]["cases"].values():
        assert case["failure"]["oom"] and "oom_device" == case["failure"]["category"]
        assert case["failure"]["suggestions"]
    # /metrics came from a real `wantel serve` over HTTP and holds the jobs.
    assert "wantel_jobs_total" in (tmp_path / "metrics.txt").read_text()
    with tarfile.open(tmp_path / "wantel-logs.tar.gz") as archive:
        assert {"eta", "experts"} <= {name.split("/")[0] for name in archive.getnames()}
    assert {} == {name: stats["dropped"] for name, stats in result["emitter"].items()
                  if isinstance(stats, dict) and stats.get("dropped")}
