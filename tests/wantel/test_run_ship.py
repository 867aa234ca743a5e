"""Shipping from the worker: ``wantel run --nats`` and ``instrument(..., ship=...)`` ship the
local log from a background thread (real tiny pipelines, a real nats-server); a broker that is
away never stops the generation, and ``wantel ship --once`` delivers the rest exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from telemetry.events import JobCompleted, WorkerStopped
from tests.nats_server import NatsServer
from tests.wantel.test_ship import assert_exactly_once, local_events, stream_events
from wantel.cli import main

pytest.importorskip("nats")

TINY = ["--model", "tiny-t2v", "--prompt", "p", "--height", "32", "--width", "32",
        "--frames", "5", "--steps", "2"]


def test_a_run_with_nats_is_in_the_fleet_replay(
        nats_server: NatsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`wantel run --nats URL`: the job appears completed in `wantel replay --nats URL`, and
    the stream holds every event of the run's local log once (its WorkerStopped included:
    the run ships for a moment after its emitter closed)."""
    log_dir = tmp_path / "log"
    code = main(["run", *TINY, "--job", "shipped-1", "--log", str(log_dir),
                 "--out", str(tmp_path / "v.mp4"), "--json", "--nats", nats_server.url])
    out = capsys.readouterr()
    assert 0 == code, out.err
    assert "not shipped" not in out.err
    local = local_events(log_dir)
    assert isinstance(local[-1], WorkerStopped)
    assert_exactly_once(local, stream_events(nats_server.url))
    assert 0 == main(["replay", "--nats", nats_server.url, "--json"])
    replayed = json.loads(capsys.readouterr().out)
    jobs = {job["job"]: job for job in replayed["jobs"]}
    assert "completed" == jobs["shipped-1"]["status"]


def test_with_the_broker_unreachable_the_run_finishes_and_ship_delivers_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Nobody listens at the URL: the run still completes (exit 0, its video written) with
    one warning line naming what is left; once the broker is up, `wantel ship --once`
    delivers every event exactly once, and a second `--once` adds nothing."""
    server = NatsServer(tmp_path / "store")  # its port is picked; nothing listens there yet
    log_dir = tmp_path / "log"
    code = main(["run", *TINY, "--job", "offline-1", "--log", str(log_dir),
                 "--out", str(tmp_path / "v.mp4"), "--json", "--nats", server.url])
    out = capsys.readouterr()
    assert 0 == code, out.err
    assert "completed" == json.loads(out.out)["status"]
    assert (tmp_path / "v.mp4").stat().st_size > 0
    warnings = [line for line in out.err.splitlines() if "not shipped" in line]
    assert 1 == len(warnings), out.err
    assert "wantel ship --log" in warnings[0]
    server.start()
    try:
        for _ in range(2):
            assert 0 == main(["ship", "--log", str(log_dir), "--nats", server.url, "--once"])
            assert_exactly_once(local_events(log_dir), stream_events(server.url))
    finally:
        server.stop()


CHILD = textwrap.dedent("""
    import sys

    import torch

    from inference.instrument import instrument
    from inference.tiny_models import build_tiny_pipeline
    from telemetry.log.local import LocalLog

    torch.set_num_threads(1)
    pipe = build_tiny_pipeline("tiny-t2v")
    with instrument(pipe, log=LocalLog(sys.argv[1]), job="embedded-1", ship=sys.argv[2]):
        pipe(prompt="p", height=32, width=32, num_frames=5, num_inference_steps=2,
             output_type="np")
""")


def test_instrument_ships_from_the_process_and_at_exit(nats_server: NatsServer,
                                                       tmp_path: Path) -> None:
    """A service's own process: `instrument(pipe, log=..., ship=URL)` ships its job, and at
    exit the process's WorkerStopped goes out too (the emitter closes before the shipper
    drains)."""
    log_dir = tmp_path / "log"
    done = subprocess.run([sys.executable, "-c", CHILD, str(log_dir), nats_server.url],
                          capture_output=True, text=True, timeout=300)
    assert 0 == done.returncode, done.stderr
    local = local_events(log_dir)
    shipped = stream_events(nats_server.url)
    assert_exactly_once(local, shipped)
    assert any(isinstance(e, JobCompleted) and e.job == "embedded-1" for e in shipped)
    assert isinstance(shipped[-1], WorkerStopped)


def test_a_stopped_shipper_ships_the_stop_of_a_worker_that_stopped_just_before(
        nats_server: NatsServer, tmp_path: Path) -> None:
    """Scale-down of a node: its worker closes (WorkerStopped in the local log) and `wantel
    ship` gets SIGTERM right after; the shipper ships what the log holds before it exits, so
    the fleet sees the stop and declares nothing lost."""
    import signal

    from telemetry.emitter import Emitter
    from telemetry.events import StepEnded
    from telemetry.log.base import LogError
    from telemetry.log.local import LocalLog
    from tests.polling import wait_for

    log_dir = tmp_path / "log"
    emitter = Emitter(LocalLog(log_dir), worker="node-1", heartbeat_interval=None)
    emitter.emit(StepEnded(job="j", ts=1, step=0, total_steps=2))
    assert emitter.flush(10)
    proc = subprocess.Popen([sys.executable, "-m", "wantel", "ship", "--log", str(log_dir),
                             "--nats", nats_server.url], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        def shipped() -> int:
            try:
                return len(stream_events(nats_server.url))
            except LogError:  # no stream until the shipper makes it
                return 0

        wait_for(lambda: shipped() == 1, "the first event shipped", timeout=60)
        emitter.emit(StepEnded(job="j", ts=2, step=1, total_steps=2))
        emitter.close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert 0 == proc.returncode, err
    local = local_events(log_dir)
    assert isinstance(local[-1], WorkerStopped)
    assert_exactly_once(local, stream_events(nats_server.url))


def test_ship_needs_a_log_in_a_directory() -> None:
    """`instrument(..., ship=URL)` on a log with no directory (its checkpoint has nowhere to
    go) is refused on entry, before the pipeline is touched."""
    from inference.instrument import instrument
    from telemetry.log.memory import MemoryLog

    with pytest.raises(ValueError, match="local log in a directory"), \
            instrument(object(), log=MemoryLog(), ship="nats://127.0.0.1:1"):
        pass


@pytest.mark.parametrize(("command", "url"), [
    (["run", *TINY], "http://127.0.0.1:4222"),
    (["ship", "--once"], "nats://127.0.0.1:99999"),
    (["replay"], "nats://a:1,ftp://user:secret@b"),
])
def test_a_url_that_cannot_name_nats_servers_is_one_line_and_exit_2(
        command: list[str], url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Another scheme or a port out of range is bad input: one line, exit 2, before anything
    runs or connects; a password in it is not repeated."""
    (tmp_path / "log").mkdir()
    code = main([*command, "--log", str(tmp_path / "log"), "--nats", url])
    err = capsys.readouterr().err.strip().splitlines()
    assert 2 == code
    assert 1 == len(err) and "--nats" in err[0]
    assert "secret" not in err[0]
    assert not (tmp_path / "log" / "wantel-log.json").exists()  # no run began


def test_sigterm_mid_run_is_a_clean_stop_that_reaches_the_fleet(nats_server: NatsServer,
                                                                 tmp_path: Path) -> None:
    """`docker stop` / a scale-down sends SIGTERM: `wantel run --nats` cancels the job at once
    (exit 130), its emitter closes with WorkerStopped, and both reach the stream before it
    exits; an aggregator then has nothing to declare lost."""
    import signal

    from telemetry.events import JobCancelled, StepEnded
    from telemetry.log.base import LogNotFound
    from tests.polling import wait_for

    log_dir = tmp_path / "log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "wantel", "run", "--model", "tiny-t2v", "--prompt", "p",
         "--height", "32", "--width", "32", "--frames", "5", "--steps", "200", "--job",
         "stopped-1", "--log", str(log_dir), "--out", str(tmp_path / "v.mp4"), "--json",
         "--nats", nats_server.url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def stepping() -> bool:
            try:
                return any(isinstance(e, StepEnded) for e in local_events(log_dir))
            except LogNotFound:
                return False

        wait_for(stepping, "the job's first step", timeout=120)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert 130 == proc.returncode, err
    assert "cancelled" == json.loads(out)["status"]
    local = local_events(log_dir)
    assert isinstance(local[-1], WorkerStopped)
    assert any(isinstance(e, JobCancelled) and e.job == "stopped-1" for e in local)
    assert_exactly_once(local, stream_events(nats_server.url))
