"""`wantel run`: bad input is refused before any model loads; a good run is summarised."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch
from PIL import Image

from telemetry.events import JobCompleted, JobStarted
from telemetry.log.local import LocalLog
from tests.polling import wait_for
from tests.telemetry.log_contract import events_of
from wantel.cli import main


@pytest.fixture(name="no_model_loads")
def _no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything tries to build or load a pipeline."""
    from inference import models

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the request was checked")

    monkeypatch.setattr(models.ModelChoice, "load", refuse)


@pytest.mark.usefixtures("no_model_loads")
class TestBadInput:
    @pytest.mark.parametrize(
        ("extra", "message"),
        [
            (["--model", "tiny-t2x"], "unknown model 'tiny-t2x'"),
            (["--model", "tiny-t2v", "--height", "40"],
             "height=40 is not a positive multiple of 16 (try 32 or 48)"),
            (["--model", "tiny-ti2v", "--width", "48"], "multiple of 32"),
            (["--model", "tiny-t2v", "--frames", "10"], "num_frames=10 is not 4k+1 (try 9 or 13)"),
            (["--model", "tiny-i2v"], "pass --image IMG"),
            (["--model", "tiny-t2v", "--image", "x.png"], "does not take an image"),
            (["--model", "tiny-i2v", "--image", "/nonexistent.png"], "no such file"),
            (["--model", "tiny-t2v", "--out", "/nonexistent/dir/v.mp4"], "does not exist"),
            (["--model", "tiny-t2v", "--out", "v.txt"], "must end in .mp4"),
            (["--model", "tiny-t2v", "--device", "cuda"], "no CUDA device"),
            (["--model", "tiny-t2v", "--steps", "0"], "--steps must be at least 1"),
            (["--model", "tiny-t2v", "--dtype", "int8"], "--dtype int8"),
            (["--model", "tiny-t2v", "--steps", "1000000000"], "at most 1000, got 1000000000"),
            (["--model", "tiny-t2v", "--seed", str(2**70)], "--seed must be from 0 to 2**64-1"),
            (["--model", "tiny-t2v", "--seed", "-1"], "--seed must be from 0 to 2**64-1"),
            (["--model", "tiny-t2v", "--frames", "100001"], "--frames must be at most 1025"),
            (["--model", "tiny-t2v", "--height", "65536"], "--height must be at most 4096"),
            (["--model", "tiny-t2v", "--width", "8192"], "--width must be at most 4096"),
            (["--model", "tiny-t2v", "--guidance", "nan"], "--guidance must be a number from 0"),
            (["--model", "tiny-t2v", "--guidance", "inf"], "--guidance must be a number from 0"),
            (["--model", "tiny-t2v", "--guidance", "1000"], "--guidance must be a number from 0"),
            (["--model", "tiny-t2v", "--sample-interval", "1e9"], "--sample-interval must be"),
            (["--model", "tiny-t2v", "--sample-interval", "nan"], "--sample-interval must be"),
            (["--model", "tiny-t2v", "--sample-interval", "0.0001"], "--sample-interval must"),
            (["--model", "tiny-t2v", "--job", "worker/me"], "reserved for the log's own"),
            (["--model", "tiny-t2v", "--job", "wantel/eta"], "reserved for the log's own"),
            (["--model", "tiny-t2v", "--job", "x\udc80"], "lone surrogate"),
            (["--model", "tiny-t2v", "--device", "cpu", "--offload", "model"],
             "--offload model needs an accelerator"),
            (["--model", "tiny-t2v", "--device", "cpu", "--offload", "sequential"],
             "this job runs on the CPU (--device cpu); drop --offload"),
            (["--model", "tiny-t2v", "--num-videos", "0"], "--num-videos must be 1 to 16, got 0"),
            (["--model", "tiny-t2v", "--num-videos", "17"], "--num-videos must be 1 to 16"),
            (["--model", "tiny-t2v", "--priority", "3"], "--priority needs --queue NAME"),
            (["--model", "tiny-t2v", "--queue", ""], "a queue name is a non-empty string"),
            (["--model", "tiny-t2v", "--queue", "q" * 65], "at most 64 characters"),
            (["--model", "tiny-t2v", "--queue", "a\nb"], "only printable characters"),
        ],
    )
    def test_one_clear_line_and_exit_2(
        self, extra: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        """Each mistake is named with what would work, before any model is loaded."""
        code = main(["run", "--prompt", "p", "--log", str(tmp_path / "log"), *extra])
        err = capsys.readouterr().err
        assert 2 == code
        assert message in err
        assert 1 == len(err.strip().splitlines())

    def test_a_decompression_bomb_image_is_one_line(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A tiny PNG claiming 100,000 × 100,000 pixels (PIL's DecompressionBombError, a
        traceback before) and one merely too large are refused by size, in one line."""
        for side, message in ((100_000, "too large to decode safely"),
                              (9_000, "9000x9000 is too large")):
            bomb = tmp_path / f"bomb-{side}.png"
            bomb.write_bytes(_png_header(side, side))
            code = main(["run", "--model", "tiny-i2v", "--prompt", "p", "--image", str(bomb),
                         "--log", str(tmp_path / "log")])
            err = capsys.readouterr().err
            assert 2 == code
            assert message in err and 1 == len(err.strip().splitlines())

    def test_a_job_id_the_log_already_has_is_refused(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The second `wantel run --job X` on a log used to "complete" while every view dropped
        its events as duplicates; now it is one line and exit 2, before any model loads."""
        from tests.telemetry.test_engine import a_job

        with LocalLog(tmp_path / "log") as log:
            log.append(a_job("taken"))
        code = main(["run", "--model", "tiny-t2v", "--prompt", "p", "--job", "taken",
                     "--log", str(tmp_path / "log"), "--out", str(tmp_path / "v.mp4")])
        err = capsys.readouterr().err
        assert 2 == code
        assert ("wantel run: error: job 'taken' is already in the log" in err
                and "pass another --job" in err and 1 == len(err.strip().splitlines()))

    def test_not_a_model_directory(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A directory without model_index.json is not mistaken for a model."""
        code = main(["run", "--model", str(tmp_path), "--prompt", "p"])
        assert 2 == code
        assert "not a diffusers model directory" in capsys.readouterr().err

    def test_not_an_image(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A file that is not an image is refused by name."""
        fake = tmp_path / "photo.png"
        fake.write_text("not really a png")
        code = main(["run", "--model", "tiny-i2v", "--prompt", "p", "--image", str(fake)])
        assert 2 == code
        assert "not a readable image" in capsys.readouterr().err

    @pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present here")
    def test_offload_without_an_accelerator(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--offload model with --device auto on a machine without CUDA: one line, exit 2,
        saying why."""
        code = main(["run", "--model", "tiny-t2v", "--prompt", "p", "--offload", "model"])
        err = capsys.readouterr().err
        assert 2 == code
        assert "--offload model needs an accelerator" in err
        assert "(no CUDA device is available here)" in err
        assert 1 == len(err.strip().splitlines())

    def test_unknown_offload_mode(self, capsys: pytest.CaptureFixture[str]) -> None:
        """argparse names the offload modes there are."""
        with pytest.raises(SystemExit) as exited:
            main(["run", "--model", "tiny-t2v", "--prompt", "p", "--offload", "group"])
        assert 2 == exited.value.code
        assert "'none', 'model', 'sequential'" in capsys.readouterr().err

    def test_missing_required_flag(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--model and --prompt are required; argparse says so in one line."""
        with pytest.raises(SystemExit) as exited:
            main(["run", "--prompt", "p"])
        assert 2 == exited.value.code
        assert "--model" in capsys.readouterr().err


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` × ``height`` and holds almost nothing (PIL reads the size
    from the header without decoding)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b""))


class TestGoodRun:
    def test_json_summary_and_prompt_privacy(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--json summarises the job; the prompt is stored only as a digest by default."""
        image = tmp_path / "in.png"
        Image.new("RGB", (32, 32)).save(image)
        code = main(["run", "--model", "tiny-i2v", "--prompt", "a private idea", "--image",
                     str(image), "--height", "32", "--width", "32", "--frames", "5",
                     "--steps", "2", "--log", str(tmp_path / "log"),
                     "--out", str(tmp_path / "v.mp4"), "--json", "--job", "j1"])
        assert 0 == code
        summary = json.loads(capsys.readouterr().out)
        assert ("j1", "completed", 2, str(tmp_path / "v.mp4")) == (
            summary["job"], summary["status"], summary["steps"], summary["output"])
        assert {"load", "text_encode", "image_encode", "denoise", "decode", "save"} <= set(
            summary["stage_durations"])
        (started,) = [e for e in events_of(LocalLog(tmp_path / "log").read())
                      if isinstance(e, JobStarted)]
        assert started.prompt is None
        assert len(started.prompt_sha256 or "") == 64
        raw = b"".join(p.read_bytes() for p in (tmp_path / "log").glob("*.wlog"))
        assert b"a private idea" not in raw

    def test_the_output_may_go_inside_the_log_it_creates(self, tmp_path: Path) -> None:
        """`--log DIR --out DIR/o.mp4` on a new DIR used to fail ("directory DIR does not
        exist"): the output folder was checked before the log created it."""
        log_dir = tmp_path / "new-log"
        code = main(["run", "--model", "tiny-t2v", "--prompt", "p", "--height", "32",
                     "--width", "32", "--frames", "5", "--steps", "1", "--log", str(log_dir),
                     "--out", str(log_dir / "o.mp4"), "--json"])
        assert 0 == code
        assert (log_dir / "o.mp4").stat().st_size > 0

    def test_queue_is_recorded_before_loading(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--queue NAME --priority N: a JobQueued in that queue, before the load stage, and
        the job's view names its queue and has no place in it once started."""
        from telemetry.events import JobQueued

        code = main(["run", "--model", "tiny-t2v", "--prompt", "p", "--height", "32",
                     "--width", "32", "--frames", "5", "--steps", "1", "--queue", "hd",
                     "--priority", "7", "--log", str(tmp_path / "log"), "--job", "qj",
                     "--out", str(tmp_path / "v.mp4"), "--json"])
        assert 0 == code
        events = list(events_of(LocalLog(tmp_path / "log").read()))
        mine = [e for e in events if e.job == "qj"]
        assert isinstance(mine[0], JobQueued)
        assert (mine[0].queue, mine[0].priority, mine[0].model) == ("hd", 7, "tiny-t2v")
        loads = [i for i, e in enumerate(mine) if getattr(e, "stage", None) == "load"]
        assert loads and loads[0] > 0  # queued first, then loaded
        assert 0 == mine[0].seq
        summary = json.loads(capsys.readouterr().out)
        assert "completed" == summary["status"]

    def test_record_prompt_opt_in(self, tmp_path: Path) -> None:
        """--record-prompt stores the prompt text."""
        code = main(["run", "--model", "tiny-t2v", "--prompt", "keep me", "--height", "32",
                     "--width", "32", "--frames", "5", "--steps", "2", "--record-prompt",
                     "--log", str(tmp_path / "log"), "--out", str(tmp_path / "v.mp4"), "--json"])
        assert 0 == code
        (started,) = [e for e in events_of(LocalLog(tmp_path / "log").read())
                      if isinstance(e, JobStarted)]
        assert "keep me" == started.prompt


    def test_speed_flags_are_applied_and_recorded(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--vae-tiling and --num-videos 2: the pipeline is changed, JobStarted's options say so
        (read back from the pipeline), and both videos are written."""
        code = main(["run", "--model", "tiny-t2v", "--prompt", "p", "--height", "32",
                     "--width", "32", "--frames", "5", "--steps", "2", "--vae-tiling",
                     "--num-videos", "2", "--log", str(tmp_path / "log"),
                     "--out", str(tmp_path / "v.mp4"), "--job", "two"])
        assert 0 == code
        assert "and 1 more beside it" in capsys.readouterr().out
        events = events_of(LocalLog(tmp_path / "log").read())
        started = next(e for e in events if e.job == "two")
        assert isinstance(started, JobStarted)
        assert {"offload": "none", "dtype": "float32", "quantization": "none",
                "lora_count": 0, "lora_names": "", "attention_backend": "WanAttnProcessor",
                "compiled": False, "vae_tiling": True, "vae_slicing": False,
                "num_videos": 2, "stages": "load,save"} == started.options
        completed = [e for e in events if isinstance(e, JobCompleted)]
        assert [(str(tmp_path / "v.mp4"), 10)] == [(e.output_path, e.frames) for e in completed]
        for name in ("v.mp4", "v-2.mp4"):
            assert 5 == len(list(iio.imiter(tmp_path / name)))

    @pytest.mark.parametrize("model", ["tiny-i2v", "tiny-i2v-a14b"])
    def test_image_to_video_makes_several_videos_per_prompt(
        self, model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--num-videos 3 from one image: Wan 2.1 I2V's pipeline repeats its CLIP image
        embedding per prompt, not per video, and its transformer failed ("Sizes of tensors
        must match", huggingface/diffusers#13578); wantel repeats it per video. Wan 2.2's
        I2V (no CLIP embedding) needs nothing. Three videos are written either way."""
        image = tmp_path / "in.png"
        Image.new("RGB", (32, 32), (10, 200, 30)).save(image)
        code = main(["run", "--model", model, "--prompt", "p", "--image", str(image),
                     "--height", "32", "--width", "32", "--frames", "5", "--steps", "2",
                     "--num-videos", "3", "--log", str(tmp_path / "log"),
                     "--out", str(tmp_path / "v.mp4"), "--job", "three"])
        assert 0 == code, capsys.readouterr().err
        assert "and 2 more beside it" in capsys.readouterr().out
        for name in ("v.mp4", "v-2.mp4", "v-3.mp4"):
            assert 5 == len(list(iio.imiter(tmp_path / name)))

    @pytest.mark.slow
    def test_compile_runs_on_the_cpu(self, tmp_path: Path) -> None:
        """--compile: the transformer runs through torch.compile (a minute of compiling on a
        CPU), and the job records it."""
        code = main(["run", "--model", "tiny-t2v", "--prompt", "p", "--height", "32",
                     "--width", "32", "--frames", "5", "--steps", "2", "--compile",
                     "--device", "cpu", "--log", str(tmp_path / "log"),
                     "--out", str(tmp_path / "v.mp4"), "--json"])
        assert 0 == code
        (started,) = [e for e in events_of(LocalLog(tmp_path / "log").read())
                      if isinstance(e, JobStarted)]
        assert started.options["compiled"] is True


def test_help_teaches_the_models(capsys: pytest.CaptureFixture[str]) -> None:
    """`wantel run --help` lists the tiny variants and the size rules."""
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "tiny-t2v-a14b" in out and "4k+1" in out
    for flag in ("--offload {none,model,sequential}", "--vae-tiling", "--compile",
                 "--num-videos N"):
        assert flag in out
    assert sys.executable  # the help needs no model and no GPU


def test_the_progress_lines_are_a_sink_of_a_runner(tmp_path: Path) -> None:
    """`wantel run`'s display follows the log through a runner: a line at each stage or status
    change of its job (other jobs' events print nothing), and the job's final view once
    stopped."""
    import io

    from tests.telemetry.test_engine import a_job
    from wantel.commands.run import ProgressLines, _Display

    log = LocalLog(tmp_path / "log")
    log.append(a_job("before"))
    out = io.StringIO()
    display = _Display(log, "mine", (log.last_position() or 0) + 1, live=False,
                       sink=ProgressLines("mine", interval=3600, stream=out))
    display.start()
    try:
        assert display.runner.caught_up.wait(10)
        events = a_job("mine")
        for event in events[:4]:
            log.append([event])
        log.append(a_job("other"))
        end = (log.last_position() or 0) + 1
        wait_for(lambda: display.runner.engine.position == end, "the other job applied")
        drawn = out.getvalue().splitlines()
        log.append(events[4:])
    finally:
        view = display.stop()
    lines = out.getvalue().splitlines()
    assert view is not None and ("completed", 4) == (view.status, view.steps_done)
    # its start (unless read with the stage's start), then the stage; no line per step, none
    # for the other job
    assert [line.split()[5] for line in drawn] in (["stage=-", "stage=denoise"],
                                                   ["stage=denoise"])
    assert "status=completed" in lines[-1] and "progress=100%" in lines[-1]
    assert all(line.startswith("wantel run: job=mine model=tiny-t2v") for line in lines)
    assert "before" not in display.runner.engine.states["jobs"].jobs
