"""``wantel advise`` (issue 20, item 3) against a copy of the recorded CPU corpus, and ``wantel
run``'s warning before loading a job predicted not to fit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from telemetry.log.local import LocalLog
from wantel.cli import main

CORPUS = Path(__file__).parents[1] / "fixtures" / "eta-corpus"
H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture(name="log_dir")
def _log_dir(tmp_path: Path) -> Path:
    target = tmp_path / "log"
    shutil.copytree(CORPUS, target)
    return target


def _advise(capsys: pytest.CaptureFixture[str], log_dir: Path, *flags: str) -> dict:
    assert 0 == main(["advise", "--log", str(log_dir), "--json", *flags])
    return json.loads(capsys.readouterr().out)


def test_text_advice_names_duration_interval_peak_and_capacity(
        log_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["advise", "--log", str(log_dir), "--model", "tiny-t2v", "--frames", "33",
                 "--height", "128", "--width", "192", "--device", "cpu", "--capacity", "8GiB"])
    out = capsys.readouterr().out
    assert 0 == code
    assert "duration:" in out and "p10-p90" in out
    assert "peak memory (host_rss)" in out and "of 8.00 GiB: fits" in out
    assert "most frames at 192x128" in out


def test_the_history_calibrates_both_estimates(
        log_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A shape the corpus ran: the before-start estimate and the peak land near what it
    took (within 35 % and 15 %), learned from its 64 jobs."""
    advice = _advise(capsys, log_dir, "--model", "tiny-i2v", "--frames", "49", "--height",
                     "160", "--width", "224", "--steps", "17", "--device", "cpu")
    assert advice["calibrated_on_jobs"] == {"eta": 64, "memory": 64}
    # corpus job: tiny-i2v 224×160, 49 frames, 17 steps, CFG: peak host RSS 520.2 MiB
    assert advice["predicted_peak_bytes"] == pytest.approx(520.2 * 2**20, rel=0.15)
    assert advice["duration_p10_s"] <= advice["duration_s"] <= advice["duration_p90_s"]


def test_a14b_at_720p_on_one_h100_needs_offload(
        log_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Both experts, UMT5-XXL and the VAE resident do not fit 80 GB; model offload does, and
    the advice names it, with the most frames and the highest resolution that fit as is."""
    advice = _advise(capsys, log_dir, "--model", "Wan2.2-T2V-A14B", "--frames", "81",
                     "--height", "720", "--width", "1280", "--device", H100,
                     "--capacity", "80GB")
    assert advice["peak_kind"] == "torch_allocated"
    assert advice["fits"] is False
    assert advice["fitting_offload"] == "model"
    by_offload = advice["peak_by_offload_bytes"]
    assert by_offload["none"] > by_offload["model"] > by_offload["sequential"]
    width, height = advice["max_resolution"]
    assert width < 1280 and height < 720 and width * 9 == pytest.approx(height * 16, rel=0.1)
    offloaded = _advise(capsys, log_dir, "--model", "Wan2.2-T2V-A14B", "--frames", "81",
                        "--height", "720", "--width", "1280", "--device", H100,
                        "--capacity", "80GB", "--offload", "model")
    assert offloaded["fits"] is True and offloaded["max_frames"] >= 81


@pytest.mark.parametrize(("flags", "message"), [
    (["--model", "nope"], "unknown model 'nope'"),
    (["--model", "tiny-t2v", "--frames", "34"], "--frames must be 4k+1"),
    (["--model", "tiny-t2v", "--height", "100"], "--height must be a multiple of 16"),
    (["--model", "tiny-ti2v", "--width", "48"], "--width must be a multiple of 32"),
    (["--model", "tiny-t2v", "--capacity", "lots"], "--capacity: not an amount of memory"),
])
def test_bad_input_is_one_line_and_exit_2(
        log_dir: Path, capsys: pytest.CaptureFixture[str], flags: list[str],
        message: str) -> None:
    base = {"--model": "tiny-t2v", "--frames": "33", "--height": "64", "--width": "64"}
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        base[flag] = value
    argv = ["advise", "--log", str(log_dir), *[x for kv in base.items() for x in kv]]
    assert 2 == main(argv)
    err = capsys.readouterr().err
    assert message in err and 1 == len(err.strip().splitlines())


def test_an_empty_or_missing_log_is_one_line_and_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    LocalLog(tmp_path / "empty").close()
    for log in (tmp_path / "empty", tmp_path / "missing"):
        assert 2 == main(["advise", "--log", str(log), "--model", "tiny-t2v", "--frames", "33",
                          "--height", "64", "--width", "64"])
        err = capsys.readouterr().err
        assert 1 == len(err.strip().splitlines()) and "run a job first" in err


def test_run_warns_before_loading_a_job_predicted_not_to_fit(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tiny job of 1025 frames at 1024×1024 on this CPU needs more than its RAM (~80 bytes
    of RSS a pixel): the warning names the predicted peak and the capacity; a small one
    says nothing."""
    from inference.runner import GenerationRequest, prepare
    from wantel.commands.run import warn_if_too_big

    log = LocalLog(tmp_path / "log")
    big = prepare(GenerationRequest(model="tiny-t2v", prompt="p", frames=1025, height=1024,
                                    width=1024, out=str(tmp_path / "a.mp4")))
    line = warn_if_too_big(big, log)
    assert line is not None and "exceeds" in line and "GiB" in line
    assert line in capsys.readouterr().err
    small = prepare(GenerationRequest(model="tiny-t2v", prompt="p", frames=9, height=64,
                                      width=64, out=str(tmp_path / "b.mp4")))
    assert warn_if_too_big(small, log) is None
    log.close()
