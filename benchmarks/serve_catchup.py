#!/usr/bin/env python3
"""``wantel serve`` catching up a big log, with and without a WebSocket client connected.

Builds (once, cached in ``--log``) a log of ``--events`` events: four workers' jobs side by
side (JobStarted, stages, 50 steps, a memory sample every other step, JobCompleted), appended
``--frame`` events at a time as live emitters flush. Then, for each case, a fresh
:class:`~exporters.service.TelemetryService` (every projection, a fresh checkpoint directory)
catches up with the whole log, and the time from ``start()`` to ready (checkpoint written) is
reported as events/s:

``no client``
    nobody subscribed: the projections alone.
``client reading``
    one subscriber registered before the start (as if a browser had connected while the
    server was behind), drained as fast as it can by an asyncio loop in another thread, as
    uvicorn's loop drains it for a real socket (the socket's own cost is not included);
    it resyncs with a fresh snapshot whenever its queue overflows, as the endpoint does.
``client stalled``
    one subscriber that never reads (a background tab): its queue overflows once.

``wantel serve + WebSocket`` (and ``wantel serve alone``)
    end to end: a real ``wantel serve`` process on an empty log, a real WebSocket client
    (``websockets``, in this process) connected and reading every frame it is sent, then the
    prebuilt log's segment files moved into the served log at once (the server is suddenly
    ``--events`` behind, as when a fleet's burst arrives); the time until ``/readyz`` reports
    the last position. Here the client gets what a socket can carry: it overflows and is
    resynced with snapshots, as ``docs/websocket.md`` describes.

Only the service's public API is used, so the same script measures other code: ``--code DIR``
imports ``telemetry``/``exporters``/``wantel`` from a checkout at ``DIR`` (its C accelerators
built), for the in-process cases and the ``wantel serve`` it starts, e.g.::

    python benchmarks/serve_catchup.py --events 1000000 --log /tmp/catchup-log
    git archive <base> | tar -x -C /tmp/base   # + copy the built telemetry/*.so, log/*.so
    python benchmarks/serve_catchup.py --events 1000000 --log /tmp/catchup-log --code /tmp/base

Each case prints wall time and events/s, and the CPU time the server process used (all its
threads: the runner, the client's loop, uvicorn) and events per CPU-second: on a shared machine
the wall figure moves with whatever else runs, the CPU figure much less.

Goal: ≥ 300k events/s catching up with a client connected.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final


def _code() -> str:
    """``--code DIR``, read before anything is imported (argparse reads it again)."""
    for index, arg in enumerate(sys.argv):
        if arg == "--code" and index + 1 < len(sys.argv):
            return sys.argv[index + 1]
        if arg.startswith("--code="):
            return arg.split("=", 1)[1]
    return str(Path(__file__).resolve().parents[1])


def _use_code(code: str) -> None:
    """Import wantel from ``code``: an editable install of some checkout would win over
    ``sys.path``, so its finder is dropped first (here, and in the ``wantel serve`` child)."""
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, code)


#: How the ``wantel serve`` child starts: the same, then wantel's entry point.
SERVE: Final = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
                "repr(f).lower()]; sys.path.insert(0, {code!r}); from wantel.cli import main; "
                "sys.exit(main(sys.argv[1:]))")
CODE: Final = _code()
_use_code(CODE)

from serve_child import start_server  # noqa: E402 - beside this script

from exporters.service import TelemetryService  # noqa: E402 - from CODE
from telemetry.events import (  # noqa: E402
    DeviceInfo,
    Event,
    JobCompleted,
    JobStarted,
    MemorySampled,
    StageEnded,
    StageStarted,
    StepEnded,
)
from telemetry.log.local import LocalLog  # noqa: E402

GOAL: Final = 300_000
WORKERS: Final = 4
STEPS: Final = 50


def job_events(job: str, worker: str, base: int) -> list[Event]:
    """One job's events, seq from 0 (79 events)."""
    device = DeviceInfo(kind="cpu", name="cpu")
    events: list[Event] = [
        JobStarted(job=job, seq=0, ts=base, worker=worker, model="tiny-t2v", family="wan2.1",
                   variant="tiny-t2v", task="t2v", width=64, height=64, num_frames=17,
                   steps=STEPS, guidance_scale=5.0, cfg=True, device=device),
        StageStarted(job=job, seq=1, ts=base + 1, worker=worker, stage="denoise")]
    for i in range(STEPS):
        ts = base + (i + 1) * 10**7
        events.append(StepEnded(job=job, seq=len(events), ts=ts, worker=worker, step=i,
                                total_steps=STEPS, timestep=1.0, duration_s=0.01))
        if i % 2 == 0:
            events.append(MemorySampled(job=job, seq=len(events), ts=ts, worker=worker,
                                        device="cpu", host_rss_bytes=10**8 + i))
    events += [StageEnded(job=job, seq=len(events), ts=base + 51 * 10**7, worker=worker,
                          stage="denoise", duration_s=0.5),
               JobCompleted(job=job, seq=len(events) + 1, ts=base + 52 * 10**7,
                            worker=worker, duration_s=0.52)]
    return events


def frames(total: int, frame: int) -> Iterator[list[Event]]:
    """``total`` events as appends of ``frame`` events, the workers' jobs side by side."""
    made = 0
    streams: list[Iterator[Event]] = [iter(()) for _ in range(WORKERS)]
    counter = 0
    while made < total:
        for w in range(WORKERS):
            out: list[Event] = []
            while len(out) < frame:
                event = next(streams[w], None)
                if event is None:
                    counter += 1
                    streams[w] = iter(job_events(f"job-{counter}", f"w{w}",
                                                 1_800_000_000 * 10**9 + counter * 10**10))
                    continue
                out.append(event)
            out = out[:total - made]
            made += len(out)
            if out:
                yield out
            if made >= total:
                return


def build(path: Path, total: int, frame: int) -> None:
    """Write the log unless ``path`` already holds one of ``total`` events."""
    if path.exists():
        log = LocalLog(path, create=False)
        last = log.last_position()
        log.close()
        if last == total - 1:
            return
        shutil.rmtree(path)
    print(f"building a log of {total:,} events in {path} …", flush=True)
    log = LocalLog(path, fsync="never")
    for chunk in frames(total, frame):
        log.append(chunk)
    log.close()


class Client:
    """A subscriber drained by an asyncio loop in its own thread (or never, if ``stalled``)."""

    def __init__(self, service: TelemetryService, *, stalled: bool) -> None:
        self.service = service
        self.frames = 0
        self.snapshots = 0
        self.loop = asyncio.new_event_loop()
        self.sub: Any = service.subscribe(self.loop).subscriber
        self.stalled = stalled
        self._done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.loop.run_until_complete(self._drain())

    async def _drain(self) -> None:
        while not self._done.is_set():
            if self.stalled:
                await asyncio.sleep(0.05)
                continue
            try:
                texts = await asyncio.wait_for(self.sub.next_frames(), 0.05)
            except TimeoutError:
                continue
            if texts is None:
                self.service.resync(self.sub)
                self.snapshots += 1
                continue
            self.frames += len(texts)

    def close(self) -> None:
        self._done.set()
        self.thread.join(10)
        self.loop.close()


def catch_up(log_dir: Path, case: str) -> tuple[float, float, str]:
    """Seconds (wall, and CPU of this process: every thread) for a fresh service to catch up
    with the log; a note on the client."""
    with tempfile.TemporaryDirectory(prefix="wantel-catchup-") as scratch:
        log = LocalLog(log_dir, create=False)
        service = TelemetryService(log, checkpoint_dir=scratch)
        client = Client(service, stalled=case == "client stalled") if case != "no client" \
            else None
        began, cpu = time.perf_counter(), time.process_time()
        service.start()
        if not service.wait_ready(3600):
            raise SystemExit("the service did not catch up")
        took, cpu = time.perf_counter() - began, time.process_time() - cpu
        note = ""
        if client is not None:
            time.sleep(0.2)  # let the client drain what is queued, for the note
            note = (f"{client.frames:,} frames received, {client.snapshots} resync "
                    f"snapshot(s), {client.sub.overflows} overflow(s)")
            client.close()
        service.stop()
        log.close()
    return took, cpu, note


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def readyz(port: int) -> dict[str, Any]:
    """What ``/readyz`` reports."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=300) as response:
        found: dict[str, Any] = json.loads(response.read())
    return found


def served_position(port: int) -> int:
    """The last position ``/readyz`` reports (-1 before the first)."""
    position = readyz(port)["position"]
    return -1 if position is None else int(position)


def end_to_end(log_dir: Path, total: int, *, client: bool,
               wantel: list[str]) -> tuple[float, float, str]:
    """Seconds for a real ``wantel serve`` to apply ``total`` events that appear at once."""
    from websockets.sync.client import connect

    with tempfile.TemporaryDirectory(prefix="wantel-catchup-e2e-") as scratch:
        served = Path(scratch) / "log"
        LocalLog(served).close()
        shutil.copy(log_dir / "wantel-log.json", served / "wantel-log.json")
        segments = sorted(log_dir.glob("*.wlog"))
        for segment in segments:  # copied under names the log ignores, renamed in at t0
            shutil.copy(segment, served / f"{segment.name}.incoming")
        proc, port = start_server(served, wantel)
        counts: dict[str, Any] = {"frames": 0, "snapshots": 0, "max": -1, "ended": None}
        stop = threading.Event()
        ws = connect(f"ws://127.0.0.1:{port}/ws/progress", max_size=None) if client else None

        def read() -> None:
            assert ws is not None
            while not stop.is_set():
                try:
                    frame = json.loads(ws.recv(timeout=0.2))
                except TimeoutError:
                    continue
                except Exception as exc:  # the connection ended: say so in the note
                    counts["ended"] = f"{type(exc).__name__}: {exc}"
                    return
                counts["frames"] += 1
                counts["snapshots"] += frame["type"] == "snapshot"
                counts["max"] = max(counts["max"], frame["position"] or -1)

        reader = threading.Thread(target=read, daemon=True)
        if ws is not None:
            reader.start()
            deadline = time.monotonic() + 30  # the handshake ends before the subscription
            while readyz(port)["subscribers"] < 1 or counts["frames"] < 2:
                if time.monotonic() > deadline:
                    raise SystemExit("the WebSocket client was not subscribed")
                time.sleep(0.01)
        try:
            began, cpu = time.perf_counter(), cpu_seconds(proc.pid)
            for segment in segments:
                os.rename(served / f"{segment.name}.incoming", served / segment.name)
            while served_position(port) < total - 1:
                time.sleep(0.05)
            took, cpu = time.perf_counter() - began, cpu_seconds(proc.pid) - cpu
            time.sleep(0.5)
        finally:
            stop.set()
            if ws is not None:
                reader.join(5)
                ws.close()
            proc.terminate()
            proc.wait(30)
    note = (f"{counts['frames']:,} frames received ({counts['snapshots']} snapshots), "
            f"last position seen {counts['max']:,}"
            + (f"; the connection ended early ({counts['ended']})" if counts["ended"] else "")
            if client else "")
    return took, cpu, note


def main() -> int:
    """Build or reuse the log, time each case ``--rounds`` times, print medians and the goal."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--frame", type=int, default=16,
                        help="events per append (default 16)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--log", type=Path, default=None,
                        help="where to keep the log between runs (default: a temporary one)")
    parser.add_argument("--code", default=CODE,
                        help="the checkout whose code to measure (default: this one)")
    parser.add_argument("--cases", default="no client,client reading,client stalled,"
                        "wantel serve alone,wantel serve + WebSocket")
    args = parser.parse_args()
    scratch = None
    if args.log is None:
        scratch = tempfile.mkdtemp(prefix="wantel-catchup-log-")
        args.log = Path(scratch) / "log"
    try:
        build(args.log, args.events, args.frame)
        import exporters.service as code

        print(f"wantel serve catching up {args.events:,} events (frames of {args.frame}, "
              f"{WORKERS} workers side by side), code: {Path(code.__file__).parents[1]}, "
              f"median of {args.rounds}")
        verdicts = []
        for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
            if case.startswith("wantel serve"):
                wantel = [sys.executable, "-c", SERVE.format(code=CODE)]
                runs = [end_to_end(args.log, args.events, client="WebSocket" in case,
                                   wantel=wantel)
                        for _ in range(args.rounds)]
            else:
                runs = [catch_up(args.log, case) for _ in range(args.rounds)]
            seconds = statistics.median(t for t, _, _ in runs)
            cpu = statistics.median(c for _, c, _ in runs)
            rate = args.events / seconds
            print(f"  {case:<26} {seconds:7.2f} s {rate / 1e3:6.0f}k events/s   "
                  f"CPU {cpu:6.2f} s {args.events / cpu / 1e3:6.0f}k events/CPU-s   "
                  f"{runs[-1][2]}", flush=True)
            if case in ("client reading", "wantel serve + WebSocket"):
                verdicts.append(rate >= GOAL)
                print(f"  goal: ≥ {GOAL // 1000}k events/s with a client connected  ->  "
                      f"{'PASS' if rate >= GOAL else 'MISS'}", flush=True)
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
        return 0 if all(verdicts) else 1
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
