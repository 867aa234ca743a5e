"""`wantel run`'s display: a rich progress bar on a terminal, structured lines without one."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from telemetry.emitter import Emitter
from telemetry.engine import ProjectionEngine
from telemetry.events import Event
from telemetry.log.local import LocalLog
from telemetry.projections import default_projections
from telemetry.runner import ProjectionRunner
from tests.telemetry.log_contract import events_of
from wantel.commands.run import ProgressDisplay, format_bytes, format_hms, format_rate

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("rate", "text"), [
    (2.5, "2.50 it/s"), (1.0, "1.00 it/s"), (0.5, "2.00 s/it"), (1 / 37.4, "37.4 s/it"),
    (0.0, None), (None, None), (float("nan"), None),
])
def test_the_rate_reads_as_it_per_s_or_s_per_it(rate: float | None, text: str | None) -> None:
    """At 14B speeds a step takes tens of seconds: s/it, never '0.0 steps/s'."""
    assert text == format_rate(rate)


@pytest.mark.parametrize(("seconds", "text"), [
    (7.4, "0:00:07"), (1843.3, "0:30:43"), (3723, "1:02:03"), (-3, "0:00:00"), (None, "?"),
])
def test_durations_read_as_h_mm_ss(seconds: float | None, text: str) -> None:
    """ETAs and durations as h:mm:ss, not '1843.3s'."""
    assert text == format_hms(seconds)


def test_memory_reads_in_mib_or_gib() -> None:
    """Peak memory in MiB below a GiB, in GiB above."""
    assert ("315 MiB", "12.4 GiB", None) == (
        format_bytes(315 * 2**20), format_bytes(int(12.4 * 2**30)), format_bytes(None))


@pytest.fixture(name="recorded", scope="module")
def _recorded(tmp_path_factory: pytest.TempPathFactory) -> list[Event]:
    """The events of a real tiny Wan 2.2 A14B run (two experts, CFG, decode, save)."""
    import torch

    from inference.runner import GenerationRequest, generate, prepare

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("run")
    log = LocalLog(tmp / "log")
    with Emitter(log) as emitter:
        generate(prepare(GenerationRequest(
            model="tiny-t2v-a14b", prompt="waves", frames=5, height=32, width=32, steps=12,
            out=str(tmp / "v.mp4"), job="rec")), emitter)
    events = [e for e in events_of(log.read()) if e.job == "rec"]
    log.close()
    return events


def test_the_interactive_display_never_goes_back(recorded: list[Event], tmp_path: Path) -> None:
    """Replayed event by event into a recording terminal, the bar's percentage only rises,
    to 100; the line shows the stage, the step, a rate, the ETA as h:mm:ss with its interval
    and the peak memory."""
    console = Console(file=io.StringIO(), force_terminal=True, width=160, record=True)
    display = ProgressDisplay("rec", console=console)
    log = LocalLog(tmp_path / "log")
    runner = ProjectionRunner(log, ProjectionEngine(default_projections()), sinks=[display])
    for event in recorded:
        log.append([event])
        runner.catch_up()
    runner.shutdown()
    text = console.export_text()
    shown = [int(p) for p in re.findall(r"(\d+)%", text)]
    assert len(recorded) // 2 < len(display.drawn)
    assert display.drawn == sorted(display.drawn) and 100 == display.drawn[-1]
    assert shown == sorted(shown) and 100 == shown[-1]
    assert re.search(r"ETA \d:\d\d:\d\d \(\d:\d\d:\d\d–\d:\d\d:\d\d\)", text)
    assert re.search(r"\d+\.\d\d (it/s|s/it)", text)
    assert "denoise" in text and "step 12/12" in text and "peak " in text


def test_without_a_terminal_a_run_prints_progress_lines(tmp_path: Path) -> None:
    """`wantel run … > file`: structured lines at each stage change and every interval, then
    the completed line; nothing is drawn for a terminal."""
    out = tmp_path / "out.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with out.open("w") as stdout:
        code = subprocess.run(
            [sys.executable, "-m", "wantel", "run", "--model", "tiny-t2v", "--prompt", "a fox",
             "--steps", "6", "--log", str(tmp_path / "log"), "--out", str(tmp_path / "v.mp4"),
             "--progress-interval", "0.01"],
            stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
            timeout=240).returncode
    lines = out.read_text().splitlines()
    progress = [line for line in lines if line.startswith("wantel run: job=")]
    stages = [re.search(r" stage=(\S+)", line).group(1)  # type: ignore[union-attr]
              for line in progress]
    percents = [int(re.search(r" progress=(\d+)%", line).group(1))  # type: ignore[union-attr]
                for line in progress]
    assert 0 == code
    assert {"load", "text_encode", "denoise", "decode", "save"} <= set(stages)
    assert percents == sorted(percents) and 100 == percents[-1]
    assert "status=completed" in progress[-1]
    assert any(" eta=0:00:" in line and " eta_p10=" in line for line in progress)
    assert any(re.search(r" rate=\d+\.\d\d(it/s|s/it)", line) for line in progress)
    assert lines[-1].startswith("wantel run: job ") and "completed ->" in lines[-1]
    assert "\x1b[" not in out.read_text()  # no terminal control codes in a log


def test_a_bad_progress_interval_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--progress-interval 0 (or negative, or nan) is refused before anything loads."""
    from wantel.cli import main

    for bad in ("0", "-1", "nan"):
        assert 2 == main(["run", "--model", "tiny-t2v", "--prompt", "x",
                          "--progress-interval", bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert 1 == len(err) and "--progress-interval" in err[0]
