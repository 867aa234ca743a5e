"""What wantel adds to each ``pipe(...)`` outside the denoising loop, part by part, on the CPU.

::

    python benchmarks/call_parts.py            # about 30 s on one CPU thread
    python benchmarks/call_parts.py --json OUT --log-events 200000

Why: the first H100 check measured the whole call's overhead at the goal's edge (+0.50 %,
about +13 ms a call outside the loop) and a fixed caller-thread cost of 6.0 ms a job. What
runs before the pipeline's first kernel (``JobStarted``: the execution device, the speed
options, the pipeline's facts) and after its last copy to the host is on the user's wall in
full, since the device has nothing queued to hide it behind. Those parts walk the pipeline's
modules, so their cost grows with the model: each is timed here on the tiny pipeline and on a
pipeline with the Wan 2.1 T2V-1.3B transformer and the real Wan VAE built on the ``meta``
device (the real module tree, ~860 + ~260 modules, no weights: nothing runs, the walks are the
same), each beside the diffusers call it replaces or the step it precedes.

Also timed: entering and leaving ``instrument()`` with ``job=`` (the id lookup reads the log)
and with ``log=`` (leaving waits for the device marks and flushes, fsync included), on a real
``LocalLog`` holding ``--log-events`` events.

Medians of ``--samples`` calls, in µs, after one untimed call. Figures are host time on this
machine; a GPU host's faster cores scale them down, they do not change their ranking.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

try:
    from benchmarks import overhead
except ModuleNotFoundError:  # run as `python benchmarks/call_parts.py`
    import overhead  # type: ignore[no-redef]

from inference import instrument as instrument_module
from inference.instrument import describe_pipeline, device_info, instrument
from inference.memory import MemoryReader
from inference.recorder import JobRecorder
from inference.speed_options import speed_options
from inference.timing import timer_for
from telemetry.emitter import Emitter
from telemetry.events import StepEnded
from telemetry.log.local import LocalLog


def median_us(fn: Callable[[], Any], samples: int) -> float:
    """The median of ``samples`` timed calls, in µs, after one untimed call."""
    fn()
    times = []
    for _ in range(samples):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


def meta_wan13b(text_encoder: Any) -> Any:
    """A ``WanPipeline`` with the 1.3B transformer and the Wan VAE on ``meta`` (no weights)."""
    from diffusers import WanPipeline

    from inference.tiny_models import _scheduler, _tokenizer

    transformer = overhead.build_wan13b_transformer("meta", dtype=torch.bfloat16)
    vae = overhead.build_wan_vae("meta")
    return WanPipeline(tokenizer=_tokenizer(), text_encoder=text_encoder, vae=vae,
                       scheduler=_scheduler(), transformer=transformer)


def parts(pipe: Any, samples: int) -> dict[str, float]:
    """Each per-call part of ``instrument()`` outside the loop, in µs."""
    device = torch.device("cpu")
    reader = MemoryReader(device)
    emitter_log = tempfile.TemporaryDirectory(prefix="wantel-parts-")
    emitter = Emitter(LocalLog(Path(emitter_log.name) / "log"), worker="parts")
    call = type(pipe).__call__
    try:
        return {
            "execution device (wantel, one pass)":
                median_us(lambda: instrument_module._execution_device(pipe), samples),
            "execution device (diffusers' pipe._execution_device)":
                median_us(lambda: pipe._execution_device, samples),
            "speed_options": median_us(lambda: speed_options(pipe), samples),
            "describe_pipeline": median_us(lambda: describe_pipeline(pipe), samples),
            "device_info": median_us(lambda: device_info(device), samples),
            "call signature (cached)": median_us(lambda: instrument_module._signature(call),
                                                 samples),
            "JobRecorder (timer, peak reset)": median_us(
                lambda: JobRecorder(emitter, "parts", timer=timer_for(device), memory=reader),
                samples),
            "memory reading at a stage end": median_us(reader.read, samples),
        }
    finally:
        emitter.close()
        reader.close()
        emitter_log.cleanup()


def context_costs(pipe: Any, log_events: int, samples: int) -> dict[str, float]:
    """Entering and leaving ``instrument()`` (no call inside), on a log of ``log_events``."""
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="wantel-parts-") as tmp:
        path = Path(tmp) / "log"
        log = LocalLog(path)
        with Emitter(log, worker="filler") as filler:
            for index in range(log_events):
                filler.emit(StepEnded(job=f"old-{index // 100}", ts=index, step=index % 100,
                                      total_steps=100, duration_s=0.1))
        emitter = Emitter(LocalLog(path), worker="parts")
        counter = iter(range(10**9))
        try:
            def enter_with_job() -> None:
                with instrument(pipe, emitter=emitter, job=f"new-{next(counter)}"):
                    pass

            def enter_without_job() -> None:
                with instrument(pipe, emitter=emitter):
                    pass

            def enter_with_log() -> None:
                with instrument(pipe, log=log, job=f"new-{next(counter)}"):
                    pass

            results["instrument(emitter=) enter + exit"] = median_us(enter_without_job, samples)
            results["instrument(emitter=, job=) enter + exit (id lookup)"] = median_us(
                enter_with_job, samples)
            results["instrument(log=, job=) enter + exit (lookup, flush)"] = median_us(
                enter_with_log, samples)
        finally:
            emitter.close()
            log.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=201, help="timed calls a part (201)")
    parser.add_argument("--log-events", type=int, default=100_000,
                        help="events in the log the context costs are measured on (100000)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.samples < 1 or args.log_events < 0:
        parser.error("--samples must be at least 1 and --log-events at least 0")
    torch.set_num_threads(1)
    tiny = overhead.build_tiny("cpu")
    wan13b = meta_wan13b(tiny.text_encoder)
    modules = {"tiny": sum(1 for c in tiny.components.values() if isinstance(c, torch.nn.Module)
                           for _ in c.modules()),
               "wan13b": sum(1 for c in wan13b.components.values()
                             if isinstance(c, torch.nn.Module) for _ in c.modules())}
    figures = {"tiny": parts(tiny, args.samples), "wan13b-meta": parts(wan13b, args.samples)}
    contexts = context_costs(tiny, args.log_events, max(5, args.samples // 10))
    print(f"wantel per-call parts outside the loop, µs (median of {args.samples}); modules: "
          f"tiny {modules['tiny']}, Wan 1.3B-shaped {modules['wan13b']}")
    print(f"{'part':<58}{'tiny':>10}{'1.3B (meta)':>13}")
    for name in figures["tiny"]:
        print(f"{name:<58}{figures['tiny'][name]:>10.1f}{figures['wan13b-meta'][name]:>13.1f}")
    print(f"\ninstrument() entered and left, no call inside, log of {args.log_events} events:")
    for name, value in contexts.items():
        print(f"{name:<58}{value:>10.1f}")
    if args.json:
        args.json.write_text(json.dumps({"parts_us": figures, "context_us": contexts,
                                         "modules": modules, "log_events": args.log_events,
                                         "samples": args.samples}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
