"""Hostile clients against a real ``wantel serve`` child: figures, no assertions (issue 16).

1. **Ping flood**: WebSocket clients that send pings and never read, until ``--flood-mb`` of
   pings (default 1024: 1 GB) went out; a flooded connection is closed by the server, and the
   flooder reconnects. Prints the child's RSS before, at its peak (``VmHWM``) and after
   (goal: < 100 MB growth).
2. **/events flood** on a log of ``--events`` events (default 120,000): the time of one
   request for an unknown and for a known job, then ``--requests`` (default 400) concurrent
   ``/api/jobs/{id}/events`` requests in flight while ``/healthz`` is timed (goal: p99
   < 100 ms); how many got 200 and how many 503 (the concurrency limit).

Run: ``python benchmarks/ping_flood.py [--flood-mb 1024] [--events 120000] [--requests 400]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.serve_child import start_server
from telemetry.events import DeviceInfo, JobStarted, StepEnded
from telemetry.log.local import LocalLog

WANTEL = [sys.executable, "-m", "wantel"]


def rss_mb(pid: int) -> tuple[float, float]:
    """The process's resident set now and at its peak, in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


async def flood(port: int, total_bytes: int, message_bytes: int) -> tuple[int, int, float]:
    """Send pings of ``message_bytes`` reading nothing; reconnect when closed. Returns
    (bytes sent, connections closed by the server, seconds)."""
    body = json.dumps({"type": "ping", "id": 1, "pad": "x" * (message_bytes - 40)})
    sent = closed = 0
    began = time.perf_counter()
    while sent < total_bytes:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            async with connect(f"ws://127.0.0.1:{port}/ws/progress", sock=sock, max_queue=1,
                               ping_interval=None, close_timeout=0.1,
                               max_size=None) as ws:
                while sent < total_bytes:
                    sent += len(body)  # offered: a closed connection refuses the rest
                    await asyncio.wait_for(ws.send(body), 2.0)
        except (ConnectionClosed, TimeoutError, OSError):
            closed += 1
    return sent, closed, time.perf_counter() - began


def build_log(path: Path, events: int) -> None:
    """``events`` events of jobs of 200 steps each, 20 running at a time, interleaved."""
    log = LocalLog(path)
    now = time.time_ns()
    written, job = 0, 0
    while written < events:
        names = [f"bench-{job + i}" for i in range(20)]
        job += 20
        batch = [JobStarted(job=name, seq=0, ts=now, model="tiny-t2v", family="wan2.1",
                            variant="tiny-t2v", task="t2v", width=32, height=32, num_frames=5,
                            steps=200, guidance_scale=5.0, cfg=True,
                            device=DeviceInfo(kind="cpu", name="cpu")) for name in names]
        log.append(batch)
        written += len(batch)
        for step in range(200):
            log.append([StepEnded(job=name, seq=step + 1, ts=now + step, step=step,
                                  total_steps=200, duration_s=0.1) for name in names])
            written += len(names)
            if written >= events:
                break
    log.close()


async def events_flood(port: int, requests: int) -> None:
    base = f"http://127.0.0.1:{port}"
    limits = httpx.Limits(max_connections=requests + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        for name, job in (("unknown job", "nobody"), ("known job (first page)", "bench-3")):
            began = time.perf_counter()
            response = await client.get(f"/api/jobs/{job}/events")
            took = (time.perf_counter() - began) * 1000
            print(f"  /events, {name:<22} {response.status_code}  {took:8.1f} ms")
        statuses: list[int] = []

        async def one(index: int) -> None:
            response = await client.get(f"/api/jobs/bench-{index % 200}/events?limit=10000")
            statuses.append(response.status_code)

        # /healthz is probed from a thread of its own with its own connection, so the
        # figures are the server's, not this loop's (busy opening 400 connections).
        latencies: list[float] = []
        done = threading.Event()

        def probe() -> None:
            with httpx.Client(base_url=base, timeout=60) as probe_client:
                while not done.is_set() or len(latencies) < 20:
                    began = time.perf_counter()
                    health = probe_client.get("/healthz")
                    latencies.append((time.perf_counter() - began) * 1000)
                    assert health.status_code == 200
                    time.sleep(0.02)

        prober = threading.Thread(target=probe)
        prober.start()
        await asyncio.gather(*(one(i) for i in range(requests)))
        done.set()
        await asyncio.to_thread(prober.join)
        latencies.sort()
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        print(f"  {requests} concurrent /events: {statuses.count(200)} x 200, "
              f"{statuses.count(503)} x 503 (busy)")
        print(f"  /healthz meanwhile: {len(latencies)} probes, median "
              f"{statistics.median(latencies):.1f} ms, p99 {p99:.1f} ms, max "
              f"{latencies[-1]:.1f} ms (goal p99 < 100 ms)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood-mb", type=int, default=1024)
    parser.add_argument("--message-kb", type=int, default=60)
    parser.add_argument("--events", type=int, default=120_000)
    parser.add_argument("--requests", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp) / "log"
        build_log(log_dir, args.events)
        proc, port = start_server(log_dir, WANTEL)
        try:
            deadline = time.monotonic() + 300
            while httpx.get(f"http://127.0.0.1:{port}/readyz").status_code != 200:
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not catch up")
                time.sleep(0.1)
            print(f"wantel serve on a log of {args.events:,} events")
            print("events flood:")
            asyncio.run(events_flood(port, args.requests))
            for message_kb in (args.message_kb, 1024):
                before, _ = rss_mb(proc.pid)
                print(f"ping flood: {args.flood_mb} MB of {message_kb} KB pings, "
                      f"reading nothing")
                sent, closed, took = asyncio.run(
                    flood(port, args.flood_mb << 20, message_kb << 10))
                after, peak = rss_mb(proc.pid)
                print(f"  sent {sent / 2**20:,.0f} MB in {took:.1f} s; the server closed "
                      f"{closed} flooding connections")
                print(f"  server RSS: before {before:.0f} MB, peak {peak:.0f} MB, after "
                      f"{after:.0f} MB: growth {after - before:+.0f} MB (goal < 100 MB)")
            health = httpx.get(f"http://127.0.0.1:{port}/healthz").status_code
            print(f"  /healthz afterwards: {health}")
        finally:
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
