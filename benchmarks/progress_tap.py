"""What the in-process live view costs the generation's thread: ``emit`` through the tap.

Run ``python benchmarks/progress_tap.py``. Each round emits 20,000 ``StepEnded`` to a fresh
emitter over a memory log three ways, in the same process: the emitter alone (the baseline),
through the :class:`~inference.progress.EventTap` every ``instrument()`` recorder now uses
(an append to the live view's list), and with ``on_progress`` set (its daemon thread folds
the events while they are emitted, so it competes for the GIL; in a real job steps are
milliseconds apart and the fold runs between them). Prints the medians over 7 rounds and the
ratios to the baseline.
"""

from __future__ import annotations

import statistics
import time

from inference.progress import EventTap, LiveView
from telemetry.emitter import Emitter
from telemetry.events import StepEnded
from telemetry.log.memory import MemoryLog

N = 20_000
ROUNDS = 7


def per_event_ns(make_target: object) -> float:
    emitter = Emitter(MemoryLog(), heartbeat_interval=None, capacity=10**6)
    target = make_target(emitter)  # type: ignore[operator]
    events = [StepEnded(job="j", ts=1, step=i, total_steps=N, duration_s=0.01) for i in range(N)]
    start = time.perf_counter_ns()
    for event in events:
        target.emit(event)
    elapsed = (time.perf_counter_ns() - start) / N
    emitter.close()
    return elapsed


def main() -> None:
    ways = {
        "emitter alone": lambda e: e,
        "through the tap": lambda e: EventTap(e, LiveView()),
        "with on_progress": lambda e: EventTap(e, LiveView(on_progress=lambda view: None)),
    }
    results: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(ROUNDS):
        for name, make in ways.items():
            results[name].append(per_event_ns(make))
    base = statistics.median(results["emitter alone"])
    print(f"emit per event, median of {ROUNDS} rounds x {N} events")
    for name, values in results.items():
        value = statistics.median(values)
        print(f"  {name:18} {value:7.0f} ns  (+{value - base:5.0f} ns, x{value / base:.2f})")


if __name__ == "__main__":
    main()
