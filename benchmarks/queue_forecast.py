"""What the queues' read model costs: one forecast (list scheduling over the serving workers)
at 0, 100, 1,000 and 10,000 waiting jobs, 10 workers each running a job.

Run ``python benchmarks/queue_forecast.py``. A forecast is read per ``/metrics`` scrape, per
``/api/jobs`` request, per WebSocket batch that carries a queued job's view, and by the start
scorer at each queue change (at most every 250 ms of event time between them). Prints the
median of 15 forecasts at each size and the ratio to the forecast with no waiting job, and
the cost per waiting job.
"""

from __future__ import annotations

import statistics
import time

from telemetry.engine import ProjectionEngine
from telemetry.events import DeviceInfo, Event, JobCompleted, JobQueued, JobStarted
from telemetry.log.base import Batch
from telemetry.projections import default_projections
from telemetry.projections.queues import forecast

S = 1_000_000_000
T0 = 1_800_000_000 * S


def queued(job: str, at: float, priority: int = 0) -> JobQueued:
    return JobQueued(job=job, seq=0, ts=T0 + int(at * S), model="m", task="t2v",
                     priority=priority, worker="svc")


def started(job: str, at: float, worker: str) -> JobStarted:
    return JobStarted(job=job, seq=1, ts=T0 + int(at * S), model="m", family="wan2.1",
                      variant="tiny-t2v", task="t2v", width=32, height=32, num_frames=9,
                      steps=8, guidance_scale=5.0, cfg=True, worker=worker,
                      device=DeviceInfo(kind="cpu", name="cpu"))


def main() -> None:
    history: list[Event] = []
    for i in range(20):
        history += [queued(f"h{i}", 0), started(f"h{i}", 1, f"w{i % 10}"),
                    JobCompleted(job=f"h{i}", seq=2, ts=T0 + 2 * S, duration_s=1.0)]
    history += [e for i in range(10) for e in (queued(f"r{i}", 3), started(f"r{i}", 3, f"w{i}"))]
    base = None
    for waiting in (0, 100, 1_000, 10_000):
        events = history + [queued(f"x{i}", 4 + i * 1e-4, priority=i % 3)
                            for i in range(waiting)]
        engine = ProjectionEngine(default_projections())
        engine.apply_batch(Batch(0, events))
        times = []
        for _ in range(15):
            start = time.perf_counter()
            forecast(engine.states, T0 / 1e9 + 5)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        base = base or median
        each = f", {median / waiting * 1e6:.1f} µs a waiting job" if waiting else ""
        print(f"{waiting:>6} waiting: {median * 1e3:8.3f} ms a forecast (x{median / base:.0f} "
              f"the empty queue's){each}")


if __name__ == "__main__":
    main()
