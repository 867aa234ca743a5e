"""The GPU check's CPU smoke mode, so the script a GPU session runs once cannot rot unnoticed.

``benchmarks/gpu_check.py --device cpu --small`` runs every section of the check (warm-up, the
sync-check call, plain / wantel / wantel+NVML rounds, the synchronised accuracy call, the
two-expert layout) on tiny shapes in about 15 s. It runs as a subprocess, exactly as a session
with a GPU runs the real thing, and the JSON it writes must hold every section: a GPU session
gets one try, and a section that broke since would cost it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_check import two_sided
from benchmarks.overhead import Estimate

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("config", "warmup", "sync", "overhead", "nvml", "steps", "memory", "two_experts",
            "emitter", "rows", "notes", "table", "total_s")


@pytest.mark.timeout(60)
def test_small_cpu_run_writes_every_section(tmp_path: Path) -> None:
    """The whole script on CPU: exit 0, every section present, none of them raised."""
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("OUT", None)
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--small", "--json",
         str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=55)
    assert 0 == done.returncode, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [] == [name for name in SECTIONS if name not in result]
    failed = {name: result[name].get("error") for name in SECTIONS
              if isinstance(result[name], dict) and result[name].get("status") == "error"}
    assert {} == failed
    assert result["table"] in done.stdout
    # Exact facts hold on any device: the switch happens where the schedule says, nothing drops.
    expert = result["two_experts"]
    assert [[[expert["expected_switch_step"], "high_noise", "low_noise"]]] * 2 == \
        expert["switches"]
    assert {} == result["emitter"]["dropped"]
    assert "completed" == result["sync"]["outcome"]
    steps = result["steps"]
    assert len(steps["synchronised_s"]) == len(steps["step_ended_s"]) == result["config"]["steps"]
    assert all(row["result"] != "FAIL" for row in result["rows"])


def test_two_sided_verdict() -> None:
    """"Ratio ≈ 1" is judged both ways; '?' marks an interval that disagrees with the estimate."""
    def estimate(added: float, low: float, high: float) -> Estimate:
        return Estimate(plain=100.0, wantel=100.0 + added, added=added, low=low, high=high)

    assert "PASS" == two_sided(estimate(0.1, -0.2, 0.3), 0.5)
    assert "PASS?" == two_sided(estimate(0.1, -0.9, 0.3), 0.5)
    assert "MISS" == two_sided(estimate(-2.0, -3.0, -1.0), 0.5)
    assert "MISS?" == two_sided(estimate(1.0, 0.2, 1.5), 0.5)
