"""``wantel cat`` and ``wantel replay``, and the CLI's error contract (one line, exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from telemetry.codec import decode_one
from telemetry.engine import ProjectionEngine
from telemetry.events import MemorySampled
from telemetry.log.local import LocalLog
from telemetry.projections import default_projections
from tests.telemetry.test_engine import SECOND, a_job
from wantel.cli import main
from wantel.commands import common, replay
from wantel.commands.replay import job_summary, replay_streaming

WANTEL = [sys.executable, "-m", "wantel"]


@pytest.fixture(name="log_dir")
def _log_dir(tmp_path: Path) -> Path:
    """A log with one completed and one failed job."""
    path = tmp_path / "log"
    with LocalLog(path) as log:
        log.append(a_job("job-a"))
        log.append(a_job("job-b", fail_at=1))
    return path


class TestCat:
    def test_prints_every_event_as_json_lines(
        self, log_dir: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Each line is one stored event, decodable back to the same event."""
        assert 0 == main(["cat", "--log", str(log_dir)])
        lines = capsys.readouterr().out.splitlines()
        assert a_job("job-a") + a_job("job-b", fail_at=1) == [decode_one(x.encode()) for x in lines]

    def test_filters_by_job_and_shows_positions(
        self, log_dir: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--job keeps one job; --positions wraps each event with its position."""
        assert 0 == main(["cat", "--log", str(log_dir), "--job", "job-b", "--positions"])
        rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert {"job-b"} == {r["event"]["job"] for r in rows}
        assert list(range(len(a_job("job-a")), len(a_job("job-a")) + len(rows))) == [
            r["pos"] for r in rows
        ]

    def test_log_from_environment(
        self, log_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """$WANTEL_LOG names the log when --log is absent."""
        monkeypatch.setenv("WANTEL_LOG", str(log_dir))
        assert 0 == main(["cat", "--from", "3"])
        assert len(a_job("job-a")) + len(a_job("job-b", fail_at=1)) - 3 == len(
            capsys.readouterr().out.splitlines()
        )

    def test_follow_prints_appends_from_another_process(self, log_dir: Path) -> None:
        """`wantel cat --follow` prints events appended while it runs."""
        proc = subprocess.Popen([*WANTEL, "cat", "--follow", "--job", "job-c", "--log",
                                 str(log_dir)], stdout=subprocess.PIPE, text=True)
        try:
            with LocalLog(log_dir) as log:
                log.append(a_job("job-c"))
            lines: list[str] = []
            reader = threading.Thread(
                target=lambda: lines.extend(proc.stdout.readline() for _ in range(8)),  # type: ignore[union-attr]
                daemon=True,
            )
            reader.start()
            reader.join(30)
            assert len(a_job("job-c")) == len(lines)
            assert all('"job":"job-c"' in line for line in lines)
        finally:
            proc.terminate()
            proc.wait(10)


class TestReplay:
    def test_json_summary(self, log_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """--json gives status, steps, steps/s and stage durations per job, and health."""
        assert 0 == main(["replay", "--json", "--log", str(log_dir)])
        doc = json.loads(capsys.readouterr().out)
        by_job = {j["job"]: j for j in doc["jobs"]}
        assert "completed" == by_job["job-a"]["status"]
        assert (4, 4.0, {"denoise": 1.0}) == (
            by_job["job-a"]["steps_done"], by_job["job-a"]["steps_per_second"],
            by_job["job-a"]["stage_durations"])
        assert ("failed", "RuntimeError") == (by_job["job-b"]["status"],
                                              by_job["job-b"]["error_type"])
        assert 0 == doc["health"]["quarantined_records"]

    def test_table(self, log_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """The table has a row per job and a footer with the totals."""
        assert 0 == main(["replay", "--log", str(log_dir)])
        out = capsys.readouterr().out
        assert "job-a" in out and "completed" in out and "job-b" in out and "failed" in out
        assert "2 job(s) (1 completed, 1 failed)" in out

    def test_control_characters_in_ids_are_escaped_in_the_table(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A newline, a terminal escape or a bidi override in a job id or model name cannot
        break the table or drive the terminal: they are printed as escapes."""
        evil = "evil\x1b[2J\nfake row\u202e"
        with LocalLog(tmp_path / "log") as log:
            events = a_job(evil)
            events[0] = msgspec.structs.replace(events[0], variant="m\rx")
            log.append(events)
        assert 0 == main(["replay", "--log", str(tmp_path / "log")])
        out = capsys.readouterr().out
        _, row, footer = out.splitlines()
        assert row.startswith("evil\\x1b[2J\\nfake row\\u202e ") and " m\\rx " in row
        assert footer.startswith("1 job(s) (1 completed)")
        assert "\x1b" not in out and "\u202e" not in out and "\r" not in out

    def test_a_log_without_jobs_is_an_empty_json_list(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The streamed document is valid JSON even with nothing to list."""
        LocalLog(tmp_path / "empty").close()
        assert 0 == main(["replay", "--json", "--log", str(tmp_path / "empty")])
        doc = json.loads(capsys.readouterr().out)
        assert ([], 0) == (doc["jobs"], doc["position"])


class TestStreamingReplay:
    """``wantel replay`` retires a job once its summary is final, so memory stays flat."""

    @staticmethod
    def a_log(path: Path, jobs: int) -> LocalLog:
        """``jobs`` jobs, each appended whole (one batch), the last one left running."""
        with LocalLog(path) as log:
            for k in range(jobs):
                events = a_job(f"job-{k:03d}")
                log.append(events[:-1] if k == jobs - 1 else events)
        return LocalLog(path, create=False)

    def test_every_job_is_summarised_once_as_if_all_were_kept(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Retiring ended jobs as the log is read changes no summary and loses no job.

        The reader hands over many small frames as one batch, and ``replay_streaming`` retires
        after each slice of a batch: here a slice is one job's eight events, so the jobs held
        are bounded as tightly as retirement allows.
        """
        monkeypatch.setattr(replay, "SLICE", len(a_job("any")))
        log = self.a_log(tmp_path / "log", 40)
        kept = ProjectionEngine(default_projections())
        every = {v.job: job_summary(v, kept)
                 for v in replay_streaming(log.read(0), kept, retain=10**9)}
        streamed = ProjectionEngine(default_projections())
        held: list[int] = []
        summaries = {}
        for view in replay_streaming(log.read(0), streamed, retain=3):
            summaries[view.job] = job_summary(view, streamed)
            held.append(len(streamed.states["jobs"].jobs))
        assert every == summaries and 40 == len(summaries)
        assert "running" == summaries["job-039"]["status"]
        assert max(held) <= 3 + 1 + 1  # the retained, the one just ended, the one running

    def test_jobs_come_in_the_order_they_ended(self, tmp_path: Path) -> None:
        """Then the jobs that never ended."""
        log = self.a_log(tmp_path / "log", 5)
        engine = ProjectionEngine(default_projections())
        order = [v.job for v in replay_streaming(log.read(0), engine, retain=1)]
        assert ["job-000", "job-001", "job-002", "job-003", "job-004"] == order

    def test_a_late_event_of_a_held_job_still_counts(self, tmp_path: Path) -> None:
        """A memory sample written after its job's end lands in that job's summary."""
        with LocalLog(tmp_path / "log") as log:
            log.append(a_job("job-a"))
            log.append([MemorySampled(job="job-a", seq=99, ts=10 * SECOND, device="cpu",
                                      host_rss_bytes=123 << 20)])
        engine = ProjectionEngine(default_projections())
        (view,) = replay_streaming(LocalLog(tmp_path / "log").read(0), engine, retain=1)
        assert 123 << 20 == view.peak_rss_bytes


class TestErrors:
    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["cat", "--log", "/nonexistent/wantel"], "no event log at /nonexistent/wantel"),
            (["replay", "--log", "/"], "not a wantel log directory"),
            (["cat", "--bogus"], "unrecognized arguments: --bogus"),
            (["cat", "--from", "-3", "--log", "/tmp"], "a log position is >= 0"),
            (["cat", "--from", str(10**30), "--log", "/tmp"], "a log position is at most"),
            (["frobnicate"], "invalid choice: 'frobnicate'"),
        ],
    )
    def test_one_line_and_exit_2(self, argv: list[str], message: str) -> None:
        """User mistakes print one line on stderr and exit 2, with no traceback."""
        result = subprocess.run([*WANTEL, *argv], capture_output=True, text=True, timeout=60,
                                env={**os.environ, "WANTEL_LOG": ""})
        assert 2 == result.returncode
        assert message in result.stderr
        assert 1 == len(result.stderr.strip().splitlines())
        assert "Traceback" not in result.stderr

    @pytest.mark.parametrize(("damage", "message"), [
        ("meta", "wantel-log.json: expected a JSON object"),
        ("segment_bytes_0", "segment_bytes must be an integer from 256"),
        ("directory_segment", "is not a regular file"),
    ])
    @pytest.mark.parametrize("command", ["cat", "replay"])
    def test_a_broken_log_is_one_line_and_exit_1(
        self, log_dir: Path, damage: str, message: str, command: str
    ) -> None:
        """Malformed metadata or a segment that is a directory: one line naming the file,
        exit 1 (the log needs fixing), never a traceback."""
        meta = log_dir / "wantel-log.json"
        if damage == "meta":
            meta.write_text('["not", "an", "object"]')
        elif damage == "segment_bytes_0":
            meta.write_text('{"format": "wantel-log", "version": 1, "segment_bytes": 0}')
        else:
            (log_dir / "00000000000000099999.wlog").mkdir()
        result = subprocess.run([*WANTEL, command, "--log", str(log_dir)], capture_output=True,
                                text=True, timeout=60)
        assert 1 == result.returncode
        assert message in result.stderr
        assert 1 == len(result.stderr.strip().splitlines())
        assert "Traceback" not in result.stderr

    def test_help_lists_every_command(self) -> None:
        """`wantel --help` names each command with its purpose."""
        result = subprocess.run([*WANTEL, "--help"], capture_output=True, text=True, timeout=60)
        assert 0 == result.returncode
        for command in ("cat", "replay"):
            assert command in result.stdout

    def test_closed_pipe_is_not_an_error(self, log_dir: Path) -> None:
        """`wantel cat | head -1` ends quietly."""
        for _ in range(50):
            with LocalLog(log_dir) as log:
                log.append(a_job(f"bulk-{time.monotonic_ns()}", steps=50))
        result = subprocess.run(f"{' '.join(WANTEL)} cat --log {log_dir} | head -1",
                                shell=True, capture_output=True, text=True, timeout=60)
        assert 1 == len(result.stdout.splitlines())
        assert "Traceback" not in result.stderr


class TestVersion:
    @pytest.mark.parametrize(("environment", "expected"), [
        ({}, None),
        ({"WANTEL_PURE_PYTHON": "1"},
         "frame checks: Python ($WANTEL_PURE_PYTHON), "
         "NATS frame scan: Python ($WANTEL_PURE_PYTHON), "
         "ETA estimator: Python ($WANTEL_PURE_PYTHON)"),
        ({"WANTEL_PURE_PYTHON": "0"}, None),
    ])
    def test_says_whether_the_hot_loops_run_in_c(
        self, environment: dict[str, str], expected: str | None,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    ) -> None:
        """One line, the version and the accelerator's state; the switch is honoured."""
        monkeypatch.delenv("WANTEL_PURE_PYTHON", raising=False)
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(SystemExit) as exited:
            main(["--version"])
        assert 0 == exited.value.code
        line, = capsys.readouterr().out.splitlines()
        assert line.startswith("wantel 0.1.0 (")
        if expected is not None:
            assert line.endswith(f"({expected})")
        elif os.environ.get("WANTEL_REQUIRE_SPEEDUPS"):  # make test: both were built
            assert line.endswith("(frame checks: C, NATS frame scan: C, ETA estimator: C)")

    def test_the_console_script_prints_it_on_one_line(self) -> None:
        """The installed entry point prints the same single line, never re-wrapped."""
        done = subprocess.run([*WANTEL, "--version"], capture_output=True, text=True,
                              env={**os.environ, "COLUMNS": "40"}, check=True)
        line, = done.stdout.splitlines()
        assert line.startswith("wantel 0.1.0 (frame checks: ")

    def test_the_choice_reaches_what_commands_build(
        self, log_dir: Path, monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """``$WANTEL_PURE_PYTHON`` makes the log a command opens read with Python."""
        opened: list[LocalLog] = []
        real = common.LocalLog

        def recording(*args: Any, **kwargs: Any) -> LocalLog:
            log = real(*args, **kwargs)
            opened.append(log)
            return log

        monkeypatch.setattr(common, "LocalLog", recording)
        monkeypatch.setenv("WANTEL_PURE_PYTHON", "1")
        assert 0 == main(["replay", "--log", str(log_dir)])
        assert ["Python ($WANTEL_PURE_PYTHON)"] == [log.frame_checks for log in opened]


class TestWanExtra:
    @pytest.mark.parametrize("argv", [["run", "--model", "tiny-t2v", "--prompt", "x"],
                                      ["run", "--help"], ["demo"]])
    def test_a_command_that_needs_torch_names_the_extra(
        self, argv: list[str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Without torch, `run` and `demo` print one line naming the extra and exit 2."""
        import importlib.util

        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "torch" else real(name, *a))
        assert 2 == main(argv)
        line, = capsys.readouterr().err.splitlines()
        assert (f"wantel {argv[0]}: error: needs torch, which the base install leaves out: "
                "pip install 'wan-telemetry[wan]'") == line
