"""The base install: ``pip install wan-telemetry`` serves, replays and exports with no torch.

A sidecar next to an inference service (or an aggregator of a fleet's log) has no use for
torch and diffusers; only ``wantel run`` and ``wantel demo`` need them, from the ``[wan]`` extra.
This test builds the package from a copy of the source into a fresh virtual environment with no
extra (pip fetches the base dependencies from the package index, or its wheel cache: about a
minute), then checks that torch is not there and that the sidecar's commands work without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
import venv
from pathlib import Path

import pytest

from telemetry.log.local import LocalLog
from tests.telemetry.test_engine import a_job

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parents[1]
#: What a source distribution holds (pyproject.toml's packages, setup.py's C files).
SOURCES = ("pyproject.toml", "setup.py", "README.md", "wantel", "telemetry", "inference",
           "exporters", "dashboards")
#: What never goes into the copy: build outputs of the developer's own install.
BUILD_OUTPUTS = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")


@pytest.fixture(scope="module", name="base_venv")
def _base_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with ``pip install .`` (no extra) done in it; its bin/."""
    root = tmp_path_factory.mktemp("base-install")
    source = root / "src"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=BUILD_OUTPUTS)
        else:
            shutil.copy2(ROOT / name, source / name)
    venv.create(root / "venv", with_pip=True)
    bin_dir = root / "venv" / "bin"
    done = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", str(source)],
                          capture_output=True, text=True, timeout=600)
    assert 0 == done.returncode, f"pip install . failed:\n{done.stdout}\n{done.stderr}"
    return bin_dir


@pytest.fixture(scope="module", name="log_dir")
def _log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log with one completed and one failed job, written by this (full) install."""
    path = tmp_path_factory.mktemp("base-install-log") / "log"
    with LocalLog(path) as log:
        log.append(a_job("job-a"))
        log.append(a_job("job-b", fail_at=1))
    return path


def _clean_env() -> dict[str, str]:
    """The environment without this interpreter's paths: the venv must stand on its own."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def _run(bin_dir: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bin_dir / argv[0]), *argv[1:]], capture_output=True, text=True,
                          timeout=120, env=_clean_env(), cwd=bin_dir.parent)


class TestBaseInstall:
    def test_has_no_torch(self, base_venv: Path) -> None:
        """Neither torch nor diffusers is installed without the extra."""
        for module in ("torch", "diffusers"):
            done = _run(base_venv, "python", "-c", f"import {module}")
            assert 0 != done.returncode
            assert "ModuleNotFoundError" in done.stderr

    def test_version_and_help(self, base_venv: Path) -> None:
        """``wantel --version`` and ``--help`` need nothing from the extra."""
        version = _run(base_venv, "wantel", "--version")
        assert 0 == version.returncode, version.stderr
        assert version.stdout.startswith("wantel 0.1.0 (frame checks: ")
        assert 0 == _run(base_venv, "wantel", "--help").returncode

    def test_replay(self, base_venv: Path, log_dir: Path) -> None:
        """``wantel replay --json`` summarises the log's jobs."""
        done = _run(base_venv, "wantel", "replay", "--log", str(log_dir), "--json")
        assert 0 == done.returncode, done.stderr
        jobs = {job["job"]: job["status"] for job in json.loads(done.stdout)["jobs"]}
        assert {"job-a": "completed", "job-b": "failed"} == jobs

    def test_serve_answers_metrics_and_jobs(self, base_venv: Path, log_dir: Path,
                                            tmp_path: Path) -> None:
        """``wantel serve --port 0`` serves ``/metrics`` and ``/api/jobs`` from the log."""
        log = tmp_path / "log"
        shutil.copytree(log_dir, log)
        server = subprocess.Popen([str(base_venv / "wantel"), "serve", "--log", str(log),
                                   "--port", "0"], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=_clean_env())
        try:
            assert server.stdout is not None
            base = None
            for line in server.stdout:  # the banner names the URLs first thing
                found = re.search(r"metrics\s+(http://\S+/)metrics", line)
                if found:
                    base = found.group(1)
                    break
            assert base is not None, "no metrics URL in the banner"
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(base + "readyz", timeout=5) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, "the server never became ready"
                time.sleep(0.1)
            with urllib.request.urlopen(base + "metrics", timeout=10) as response:
                metrics = response.read().decode()
            with urllib.request.urlopen(base + "api/jobs", timeout=10) as response:
                jobs = json.loads(response.read())
        finally:
            server.terminate()
            server.wait(30)
        totals = [line for line in metrics.splitlines() if line.startswith("wantel_jobs_total{")]
        for status in ("completed", "failed"):
            assert any(f'status="{status}"' in line and line.endswith("} 1.0")
                       for line in totals), totals
        assert {"job-a", "job-b"} == {job["job"] for job in jobs["running"] + jobs["finished"]}

    def test_exporters_import(self, base_venv: Path) -> None:
        """Span export, the Prometheus collector and lifecycle logs load without torch."""
        done = _run(base_venv, "python", "-c",
                    "import exporters.otel, exporters.prometheus, exporters.logs, "
                    "exporters.server")
        assert 0 == done.returncode, done.stderr

    @pytest.mark.parametrize("command", ["run", "demo"])
    def test_commands_that_need_the_extra_say_so(self, base_venv: Path, command: str) -> None:
        """``wantel run`` and ``wantel demo`` fail with one line naming the extra, exit 2."""
        argv = ["--model", "tiny-t2v", "--prompt", "x"] if command == "run" else []
        done = _run(base_venv, "wantel", command, *argv)
        assert 2 == done.returncode
        line, = done.stderr.strip().splitlines()
        assert "pip install 'wan-telemetry[wan]'" in line
        assert line.startswith(f"wantel {command}: error: needs torch")
