"""A fleet worker for tests: emits a few realistic jobs through the Emitter into its own local
log while a shipper thread ships that log to the fleet stream; exits once all is shipped.

    python -m tests.wantel.fleet_worker LOG_DIR NATS_URL WORKER JOBS
"""

from __future__ import annotations

import sys
import time

from telemetry.emitter import Emitter
from telemetry.events import (
    UNSEQUENCED,
    DeviceInfo,
    JobCompleted,
    JobStarted,
    MemorySampled,
    StageEnded,
    StageStarted,
    StepEnded,
)
from telemetry.log.local import LocalLog
from telemetry.log.nats import NatsLog, NatsOptions
from telemetry.ship import shipper

STEPS = 12


def emit_job(emitter: Emitter, job: str, worker: str, base: int) -> None:
    """One job's events, as a tiny run would emit them (the emitter numbers them)."""
    emitter.emit(JobStarted(job=job, seq=UNSEQUENCED, ts=base, worker=worker, model="tiny-t2v",
                            family="wan2.1", variant="tiny-t2v", task="t2v", width=64, height=64,
                            num_frames=17, steps=STEPS, guidance_scale=5.0, cfg=True,
                            device=DeviceInfo(kind="cpu", name="cpu")))
    emitter.emit(StageStarted(job=job, seq=UNSEQUENCED, ts=base + 1, worker=worker,
                              stage="denoise"))
    for i in range(STEPS):
        ts = base + (i + 1) * 10**7
        emitter.emit(StepEnded(job=job, seq=UNSEQUENCED, ts=ts, worker=worker, step=i,
                               total_steps=STEPS, timestep=1.0,
                               duration_s=0.01 * (1 + i % 3)))
        emitter.emit(MemorySampled(job=job, seq=UNSEQUENCED, ts=ts, worker=worker, device="cpu",
                                   host_rss_bytes=10**8 + i))
        time.sleep(0.002)
    end = base + (STEPS + 1) * 10**7
    emitter.emit(StageEnded(job=job, seq=UNSEQUENCED, ts=end, worker=worker, stage="denoise",
                            duration_s=0.12))
    emitter.emit(JobCompleted(job=job, seq=UNSEQUENCED, ts=end + 1, worker=worker, duration_s=0.13))


def main() -> None:
    log_dir, url, worker, jobs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    local = LocalLog(log_dir)
    runner, _sink = shipper(local, log_dir, "WANTEL_EVENTS",
                           lambda: NatsLog(NatsOptions(url, reconnect=True), worker=worker))
    runner.start()
    emitter = Emitter(local, worker=worker, heartbeat_interval=0.05)
    for n in range(jobs):
        emit_job(emitter, f"{worker}-job-{n}", worker, 1_800_000_000 * 10**9 + n * 10**10)
    emitter.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        last = local.last_position()
        if last is not None and runner.engine.position > last and runner.held_back() is None:
            break
        time.sleep(0.02)
    else:
        sys.exit("the shipper did not catch up")
    runner.shutdown()
    local.close()


if __name__ == "__main__":
    main()
