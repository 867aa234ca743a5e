"""What one liveness check of ``wantel serve`` costs over a large fleet's state.

``exporters.liveness.LivenessSink.check`` runs on the service's runner thread at most once a
second (and whenever the log is idle); it walks every worker and every running job. This
prints the best of five checks for two fleet sizes, every worker alive (the common case: all
of them are looked at, none declared):

    .venv/bin/python scripts/liveness_check_cost.py
"""

from __future__ import annotations

import time

from exporters.liveness import LivenessSink
from telemetry.engine import ProjectionEngine
from telemetry.log.memory import MemoryLog
from telemetry.projections import default_projections
from telemetry.projections.jobs import JobsState, JobView, WorkerView


def main() -> None:
    for workers, running in ((1_000, 100), (10_000, 1_000)):
        engine = ProjectionEngine(default_projections())
        jobs: JobsState = engine.states["jobs"]
        now = time.time_ns()
        for w in range(workers):
            jobs.workers[f"w{w}"] = WorkerView(worker=f"w{w}", last_ts=now)
        for j in range(running):
            jobs.jobs[f"j{j}"] = JobView(job=f"j{j}", status="running", worker=f"w{j}",
                                         last_ts=now)
            jobs.active[f"j{j}"] = None
        sink = LivenessSink(MemoryLog(), engine, timeout_s=60)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            sink.check()
            times.append(time.perf_counter() - start)
        best = min(times)
        print(f"{workers} workers, {running} running jobs: one check {best * 1e3:.2f} ms "
              f"(once a second: {best * 100:.3f} % of a core)")


if __name__ == "__main__":
    main()
