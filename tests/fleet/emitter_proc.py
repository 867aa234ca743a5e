"""A scripted fleet worker for tests: emits realistic jobs through the real Emitter into its own
local log, and nothing else (shipping is a separate ``wantel ship`` process, as in production).

    python -m tests.fleet.emitter_proc LOG_DIR WORKER JOBS [PACE_S]

Each job is what a tiny run emits (start, a denoise stage, steps with memory samples, the end),
with event times fixed by the job's number so every worker's log is reproducible; ``PACE_S``
is the pause after each step (wall time), so a job takes about ``STEPS × PACE_S``. The process
prints ``done`` once the emitter is closed, i.e. every event is in the local log. A tiny
``wantel run`` costs ~10 s of CPU per job on this shared 2-core machine; this process costs
milliseconds, so the fleet tests can afford four workers, outages and kill trials.
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

STEPS = 12
BASE_TS = 1_800_000_000 * 10**9


def emit_job(emitter: Emitter, job: str, worker: str, base: int, *, pace: float,
             model: str = "tiny-t2v") -> None:
    """One job's events, as a tiny run would emit them (the emitter numbers them), a step
    every ``pace`` seconds."""
    emitter.emit(JobStarted(job=job, seq=UNSEQUENCED, ts=base, worker=worker, model=model,
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
        if pace:
            time.sleep(pace)
    end = base + (STEPS + 1) * 10**7
    emitter.emit(StageEnded(job=job, seq=UNSEQUENCED, ts=end, worker=worker, stage="denoise",
                            duration_s=0.12))
    emitter.emit(JobCompleted(job=job, seq=UNSEQUENCED, ts=end + 1, worker=worker,
                              duration_s=0.13))


def main() -> None:
    log_dir, worker, jobs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    pace = float(sys.argv[4]) if len(sys.argv) > 4 else 0.002
    local = LocalLog(log_dir)
    # No heartbeats: their times come from the wall clock, and the fleet tests compare the
    # fleet view with replaying the union of the logs (heartbeats would fold the same, but
    # they make the logs differ run to run).
    emitter = Emitter(local, worker=worker, heartbeat_interval=None)
    for n in range(jobs):
        # One model per worker: each worker's ETA learns on its own.
        emit_job(emitter, f"{worker}-job-{n}", worker, BASE_TS + n * 10**10, pace=pace,
                 model=f"tiny-t2v-{worker}")
    emitter.close()
    local.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()
