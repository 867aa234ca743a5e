"""The GPU check (issue #7): does wantel cost nothing, add no synchronisation, and tell the truth?

One script, one process, one table, meant for a single call on one H100 (under 7 minutes)::

    python3 benchmarks/gpu_check.py                      # CUDA; JSON to $OUT/gpu_check.json
    python3 benchmarks/gpu_check.py --device cpu --small # the same code on tiny shapes, < 1 min

Workload (CUDA). A real diffusers ``WanPipeline`` built by :func:`overhead.build_wan13b_pipeline`:
a ``WanTransformer3DModel`` with Wan 2.1 T2V-1.3B's width and depth (30 layers, 12×128 heads,
ffn 8960), random weights created directly on the GPU in bf16; a 2-layer UMT5 text encoder of
the real width 4096; the real-shaped ``AutoencoderKLWan`` (fp32, random). 480×832, 33 frames,
8 steps, classifier-free guidance (two transformer passes a step). ``--small`` swaps in tiny
shapes (2 layers of 2×12 heads, a 3-channel-base VAE, 32×32, 5 frames, 4 steps).

What runs, in order (each section is written to the JSON as soon as it is done, so a run cut
short by its time limit still returns what it measured):

1. warm-up: one plain and one instrumented call (first-call kernel selection stays out).
2. ``sync``: a control (``.item()`` under ``set_sync_debug_mode("error")`` must raise, or the
   check would be vacuous); the plain pipeline under a process-wide "error" (diffusers itself
   synchronises: that is why the mode is scoped); then one instrumented call with "error" on
   inside every wantel entry point and "default" inside the pipeline's code
   (:class:`overhead.SyncScope` through :class:`overhead.HookMeter`). It must complete.
3. ``overhead`` and ``nvml``: rounds of three calls in an order that rotates per round, so drift
   hits all alike: ``plain``; ``wantel`` (instrumented, one shared emitter writing a real
   :class:`~telemetry.log.local.LocalLog` with fsync); ``nvml`` (the same plus a
   :class:`~inference.nvml.GpuSampler` at 10 Hz on the same emitter). Per call: the host wall
   time (device synchronised before and after), the denoising loop and each step as CUDA events
   at the end of every ``scheduler.step`` (:func:`overhead.run_call`). Reported: medians and the
   median of per-round paired differences (wantel − plain, nvml − wantel) with a bootstrap 90 %
   interval; goal ≤ 0.5 %. The round count adapts to ``--budget-s`` (never under 3).
4. ``steps`` and ``memory``: one instrumented call (sampler on) measured a second way at the
   same two boundaries wantel uses: a forward pre-hook on the transformer(s), registered after
   wantel's (which is prepended), marks the first pass of each step, and a user
   ``callback_on_step_end`` — run by wantel after its own step-end callback — marks the step's
   end; each mark is ``torch.cuda.synchronize()`` then ``perf_counter``. Each step's
   synchronised host duration is compared with the ``StepEnded.duration_s`` of *the same step*
   (goal: mean absolute relative difference < 2 %). The same run, not a paired one, because
   the question is whether wantel's events measure a step correctly: comparing the same steps
   at the same boundaries leaves only the measurement method as a difference, while a paired
   run adds run-to-run noise of the same order as the goal. The synchronisation does change
   how that run executes (the GPU idles between steps), so a second, informational row
   compares the median ``StepEnded`` of the free-running ``wantel`` calls of section 3 with
   the synchronised median. After the call: the allocator
   peak wantel reported (max ``MemorySampled.peak_allocated_bytes``) against
   ``torch.cuda.max_memory_allocated()`` (wantel resets the peak at job start, so both cover the
   job), and NVML's device-used figure from the sampler against ``nvidia-smi
   --query-gpu=memory.used --format=csv,noheader,nounits`` read after the call.
5. ``two_experts``: the same pipeline with a second, independently random 1.3B-shaped
   transformer as ``transformer_2`` and ``boundary_ratio=0.875`` (the Wan 2.2 A14B layout):
   two instrumented calls; the step of ``ExpertSwitched`` against the step the schedule
   predicts (first timestep below 875), and each expert's median ``StepEnded``.

Exit status: 0 when every check ran (a MISS is a finding, reported, not a crash), 1 when a check
FAILED (wantel synchronised, events missing, a wrong switch step, a section raised), 2 when the
requested device is not there.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog
import torch

try:
    from benchmarks import overhead
except ModuleNotFoundError:  # run as `python benchmarks/gpu_check.py` without the repo on the path
    import overhead  # type: ignore[no-redef]

from inference.instrument import instrument
from inference.nvml import GpuSampler, decode_throttle_reasons
from telemetry.emitter import Emitter
from telemetry.events import (
    TERMINAL_TYPES,
    Event,
    ExpertSwitched,
    GpuSampled,
    JobStarted,
    MemorySampled,
    StepEnded,
)
from telemetry.files import write_atomic
from telemetry.log.local import LocalLog

GOAL_OVERHEAD: Final = 0.005  # wantel − plain, and sampler on − off, as a ratio of the reference
GOAL_STEP_AGREEMENT: Final = 0.02  # mean |StepEnded − synchronised| / synchronised
GOAL_PEAK_AGREEMENT: Final = 0.01  # |wantel's allocator peak − torch's| / torch's
GOAL_DEVICE_USED_BYTES: Final = 1 << 30  # |NVML used − nvidia-smi used|: see the row's note
SAMPLER_INTERVAL_S: Final = 0.1  # 10 Hz: ten times the default, to make any cost visible
BOUNDARY_RATIO: Final = 0.875  # Wan 2.2 T2V-A14B's
WORKER: Final = "gpu-check"
MIN_ROUNDS: Final = 3
MiB: Final = 1 << 20
GiB: Final = 1 << 30

#: ``--small``: tiny layers on the same classes (the shapes of inference.tiny_models).
SMALL_TRANSFORMER: Final[dict[str, Any]] = {
    "num_attention_heads": 2, "attention_head_dim": 12, "ffn_dim": 32, "num_layers": 2,
    "text_dim": 32, "rope_max_seq_len": 64,
}
SMALL_VAE: Final[dict[str, Any]] = {
    "base_dim": 3, "z_dim": 16, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
    "temperal_downsample": [False, True, True], "latents_mean": [0.0] * 16,
    "latents_std": [1.0] * 16,
}
SMALL_WORKLOAD: Final = overhead.Workload(height=32, width=32, num_frames=5, steps=4)


# -- the report -------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table (and of the JSON's ``rows``)."""

    section: str
    check: str
    reference: str = ""
    wantel: str = ""
    difference: str = ""
    goal: str = ""
    result: str = "info"  # PASS, MISS (a "?" when the interval straddles the goal), FAIL, info


@dataclass
class Report:
    """Sections and rows, rewritten to ``path`` after every section (a cut-short run keeps them)."""

    path: Path | None
    sections: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def add(self, name: str, data: dict[str, Any]) -> None:
        self.sections[name] = data
        self.save()

    def row(self, *cells: str, result: str = "info") -> None:
        """Append a row from its first cells (section, check, reference, wantel, ...)."""
        self.rows.append(Row(*cells, result=result))  # type: ignore[arg-type]

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[dict[str, Any]]:
        """Collect a section's data; a section that raises is recorded as FAIL, not fatal."""
        data: dict[str, Any] = {"status": "ok"}
        try:
            yield data
        except Exception as exc:
            data["status"] = "error"
            data["error"] = f"{type(exc).__name__}: {exc}"
            data["traceback"] = traceback.format_exc(limit=8)
            self.row(name, "section raised", "", "", data["error"][:60], "", result="FAIL")
            _progress(f"{name}: FAILED with {data['error']}")
        finally:
            data["elapsed_s"] = round(time.monotonic() - self.started, 1)
            self.add(name, data)

    def as_json(self) -> dict[str, Any]:
        return {**self.sections, "rows": [asdict(r) for r in self.rows], "notes": self.notes,
                "table": table(self), "total_s": round(time.monotonic() - self.started, 1)}

    def save(self) -> None:
        if self.path is None:
            return
        write_atomic(self.path,
                     (json.dumps(self.as_json(), indent=2, default=str) + "\n").encode())


def table(report: Report) -> str:
    """The table as printed: every row, then the notes that say how to read it."""
    config = report.sections.get("config", {})
    head = [
        f"wantel GPU check: {config.get('model', '?')} on {config.get('device_name', '?')}",
        f"{config.get('width')}×{config.get('height')}, {config.get('num_frames')} frames, "
        f"{config.get('steps')} steps, CFG {config.get('guidance_scale')}; "
        f"{config.get('rounds', '?')} rounds (plain / wantel / wantel+NVML "
        f"{1 / SAMPLER_INTERVAL_S:g} Hz) after 1 warm-up; torch {torch.__version__}, "
        f"diffusers {config.get('diffusers', '?')}",
    ]
    return rows_and_notes(report, head)


def rows_and_notes(report: Report, head: list[str]) -> str:
    """``head``, then the rows under their column titles, then the notes (both checks' tables
    share this layout)."""
    titles = (f"{'section':<12}{'check':<44}{'reference':>12}{'wantel':>12}  "
              f"{'difference':<30}{'goal':>9}  result")
    lines = [f"{r.section:<12}{r.check:<44}{r.reference:>12}{r.wantel:>12}  {r.difference:<30}"
             f"{r.goal:>9}  {r.result}" for r in report.rows]
    return "\n".join([*head, "", titles, *lines, "", *report.notes])


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _pct(value: float) -> str:
    return f"{value * 100:+.2f} %"


def _ms(seconds: float) -> str:
    return overhead._number(seconds * 1e3, "ms")


def _gib(value: float) -> str:
    return f"{value / GiB:.3f} GiB"


# -- helpers ----------------------------------------------------------------------------------


@dataclass
class Context:
    """What every section needs."""

    pipe: Any
    workload: overhead.Workload
    device: torch.device
    clock: overhead.HostClock | overhead.CudaClock
    emitter: Emitter
    log_dir: Path
    small: bool
    dtype: torch.dtype

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def synchronize(self) -> None:
        self.clock.synchronize()

    def judge(self, verdict: str) -> str:
        """A timing verdict; in parentheses (shown, not judged) off the GPU or with ``--small``.

        The goals are the GPU's: on a shared CPU with millisecond steps the same figures are
        mostly scheduler noise and the host's own bookkeeping.
        """
        return verdict if self.cuda and not self.small else f"({verdict})"


def two_sided(e: overhead.Estimate, goal: float) -> str:
    """PASS when ``|added| ≤ goal`` ("ratio ≈ 1"); ``?`` when the interval disagrees."""
    inside = abs(e.added) <= goal
    interval_inside = -goal <= e.low and e.high <= goal
    interval_outside = e.high < -goal or e.low > goal
    sure = interval_inside if inside else interval_outside
    return ("PASS" if inside else "MISS") + ("" if sure else "?")


def _job(mode: str, round_index: int) -> str:
    """The job id :func:`overhead.run_call` gives an instrumented call."""
    return f"overhead-{mode}-{round_index}"


def settle(ctx: Context, jobs: set[str], timeout: float = 30.0) -> list[Event]:
    """The log's events once every job in ``jobs`` has its terminal event there.

    On CUDA a job's last events resolve on wantel's resolver thread after ``pipe(...)`` returns
    (their device marks complete a moment later); reading the log before that would miss them.
    """
    deadline = time.monotonic() + timeout
    while True:
        ctx.emitter.flush()
        events = overhead._read_events(ctx.log_dir)
        done = {e.job for e in events if isinstance(e, TERMINAL_TYPES)}
        if jobs <= done or time.monotonic() > deadline:
            missing = jobs - done
            if missing:
                raise RuntimeError(f"no terminal event for jobs {sorted(missing)}")
            return events
        time.sleep(0.05)


def of_job(events: list[Event], job: str, kind: type[Event]) -> list[Any]:
    return [e for e in events if e.job == job and isinstance(e, kind)]


def step_durations(events: list[Event], job: str) -> list[float]:
    """``StepEnded.duration_s`` of ``job``, in step order."""
    steps = sorted(of_job(events, job, StepEnded), key=lambda e: e.step)
    return [float(e.duration_s) for e in steps if e.duration_s is not None]


def job_window(events: list[Event], job: str) -> tuple[int, int]:
    """Wall-clock ns from ``JobStarted`` to the terminal event."""
    start = of_job(events, job, JobStarted)[0].ts
    end = max(e.ts for e in events if e.job == job and isinstance(e, TERMINAL_TYPES))
    return start, end


def nvidia_smi_used_bytes(device: torch.device) -> int | None:
    """``nvidia-smi --query-gpu=memory.used`` for ``device`` (matched by PCI address), in bytes."""
    if shutil.which("nvidia-smi") is None:
        return None
    command = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
    used = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if used.returncode != 0:
        return None
    values = [line.strip() for line in used.stdout.splitlines() if line.strip()]
    index = 0
    if len(values) > 1:  # nvidia-smi lists devices in PCI order: find torch's device there
        buses = subprocess.run(["nvidia-smi", "--query-gpu=pci.bus_id",
                                "--format=csv,noheader"], capture_output=True, text=True,
                               timeout=30).stdout.split()
        props = torch.cuda.get_device_properties(device)
        wanted = (props.pci_domain_id, props.pci_bus_id, props.pci_device_id)
        for position, bus in enumerate(buses):
            domain, bus_id, rest = bus.split(":")
            if (int(domain, 16), int(bus_id, 16), int(rest.split(".")[0], 16)) == wanted:
                index = position
    return int(float(values[index]) * MiB)


def nvidia_smi(fields: str) -> str | None:
    """A free-form ``nvidia-smi --query-gpu`` answer for the environment section."""
    if shutil.which("nvidia-smi") is None:
        return None
    done = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=30)
    return done.stdout.strip() if done.returncode == 0 else None


def nvml_handle(pynvml: Any, device: torch.device) -> tuple[int, Any] | None:
    """NVML's index and handle of torch's ``device``, matched by PCI address (NVML's order
    need not be CUDA's); ``None`` if NVML does not list it. NVML must be initialised."""
    props = torch.cuda.get_device_properties(device)
    wanted = (props.pci_domain_id, props.pci_bus_id, props.pci_device_id)
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pci = pynvml.nvmlDeviceGetPciInfo(handle)
        if (pci.domain, pci.bus, pci.device) == wanted:
            return index, handle
    return None


def throttle_mask(device: torch.device) -> tuple[int | None, str]:
    """Read the clock-event reasons of ``device`` once, directly through NVML.

    A ``GpuSampled`` with no reasons looks the same whether NVML said "none" or could not be
    asked, so the check confirms here that the query itself works on this device.
    """
    try:
        import pynvml
    except ImportError as exc:
        return None, f"pynvml not importable: {exc}"
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return None, f"nvmlInit failed: {exc}"
    try:
        found = nvml_handle(pynvml, device)
        if found is None:
            return None, "torch's device not found among NVML's"
        function = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        return int(function(found[1])), "ok"
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _sync_site(exc: BaseException, packages: tuple[str, ...]) -> str:
    """``package/path.py:line`` of the innermost frame in one of ``packages`` (else the last).

    torch raises the sync-debug error from its own frame; the useful line is the caller's:
    diffusers' for the plain pipeline, wantel's (``inference``, ``telemetry``) for ours.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = Path(frame.filename).as_posix()
        for package in packages:
            marker = f"/{package}/"
            if marker in path:
                return f"{package}/{path.rsplit(marker, 1)[1]}:{frame.lineno}"
    last = frames[-1] if frames else None
    return f"{last.filename}:{last.lineno}" if last else "?"


# -- the sections -----------------------------------------------------------------------------


def warm_up(ctx: Context, report: Report) -> float:
    """One plain and one instrumented call; returns the slower one's wall time (s)."""
    times = []
    with report.section("warmup") as data:
        for mode in ("plain", "wantel"):
            run = overhead.run_call(ctx.pipe, ctx.workload, ctx.clock, mode=f"warmup-{mode}",
                                    round_index=-1,
                                    emitter=None if mode == "plain" else ctx.emitter)
            times.append(run.call_s)
            _progress(f"warm-up {mode}: {run.call_s:.2f} s")
        data["call_s"] = times
    return max(times[-1], 1e-3)


def sync_section(ctx: Context, report: Report) -> float:
    """The sync-debug checks (section 2 of the module notes); returns the probed call's time."""
    call_s = 0.0
    with report.section("sync") as data:
        if not ctx.cuda:
            data["status"] = "skipped"
            data["reason"] = "set_sync_debug_mode is CUDA's; the probed call still runs"
        else:
            scope = overhead.SyncScope(True)
            probe = torch.ones(1, device=ctx.device)
            scope.enter(True)
            try:
                probe.item()
                control = "did not raise"
            except RuntimeError:
                control = "raised"
            finally:
                scope.exit()
            data["control"] = control
            report.row("sync", ".item() under 'error' (control)", "raises", control, "",
                       "raises", result="PASS" if control == "raised" else "FAIL")

            kwargs = ctx.workload.kwargs()
            kwargs["generator"] = torch.Generator("cpu").manual_seed(0)
            torch.cuda.set_sync_debug_mode("error")
            try:
                ctx.pipe(**kwargs)
                plain = "completes"
            except RuntimeError as exc:
                plain = f"raises at {_sync_site(exc, ('diffusers', 'transformers'))}"
            finally:
                torch.cuda.set_sync_debug_mode("default")
            ctx.synchronize()
            data["plain_pipeline_process_wide_error"] = plain
            report.row("sync", "plain pipeline, 'error' process-wide", "", "",
                       plain.rsplit("/", 1)[-1], "", result="info")

        meter = overhead.HookMeter(scope=overhead.SyncScope(ctx.cuda))
        meter.calibrate(samples=2001)
        try:
            run = overhead.run_call(ctx.pipe, ctx.workload, ctx.clock, mode="probed",
                                    round_index=0, emitter=ctx.emitter, meter=meter)
            outcome, error = "completed", None
            call_s = run.call_s
        except RuntimeError as exc:
            if "synchroniz" not in str(exc).lower():
                raise
            site = _sync_site(exc, ("inference", "telemetry", "benchmarks"))
            outcome, error = "raised", f"{exc} at {site}"
        ctx.synchronize()
        checked = {region: count for region, count in meter.calls.items()
                   if region in ("forward_pre_hook", "step_end", "stage_outer", "call_outer",
                                 "schedule")}
        data.update(outcome=outcome, error=error, wantel_entries_checked=checked,
                    caller_thread_us_per_step=meter.per_step_ns() / ctx.workload.steps / 1e3,
                    caller_thread_us_per_job=meter.per_job_ns() / 1e3)
        entries = sum(checked.values())
        if ctx.cuda:
            report.row("sync", "wantel's code under 'error' (scoped)", "", outcome,
                       f"{entries} entries checked", "no sync",
                       result="PASS" if outcome == "completed" else "FAIL")
        else:
            report.row("sync", "wantel's code under 'error' (scoped)", "", outcome,
                       "not checkable on cpu", "", result="skipped")
        report.row("sync", "caller-thread cost per step, measured", "",
                   f"{data['caller_thread_us_per_step']:.1f} µs", "", "", result="info")
        if outcome != "completed":
            _progress(f"sync check FAILED: {error}")
        else:
            _progress(f"sync check: {outcome} ({call_s:.2f} s)")
    return call_s


def plan_rounds(report: Report, call_s: float, *, budget_s: float, most: int) -> int:
    """Rounds that fit the time left: 3 calls a round, then 4 calls and a build after them."""
    left = budget_s - (time.monotonic() - report.started)
    after = 4 * call_s + 15.0
    fitting = int((left - after) // (3 * call_s))
    rounds = max(MIN_ROUNDS, min(most, fitting))
    if fitting < MIN_ROUNDS:
        report.notes.append(f"warning: {MIN_ROUNDS} rounds at {call_s:.1f} s a call may not fit "
                            f"the {budget_s:.0f} s budget ({left:.0f} s left after warm-up)")
    _progress(f"{rounds} rounds planned ({call_s:.2f} s a call, {left:.0f} s of budget left)")
    return rounds


def overhead_section(ctx: Context, report: Report, rounds: int) -> dict[str, Any]:
    """Rounds of plain / wantel / nvml calls; the overhead and the sampler's effect."""
    shared: dict[str, Any] = {}
    with report.section("overhead") as data:
        modes = ("plain", "wantel", "nvml")
        runs: dict[tuple[str, int], overhead.Run] = {}
        ticks: list[dict[str, Any]] = []
        for index in range(rounds):
            for mode in modes[index % 3:] + modes[:index % 3]:
                emitter = None if mode == "plain" else ctx.emitter
                if mode == "nvml":
                    sampler = GpuSampler(ctx.emitter, interval=SAMPLER_INTERVAL_S, worker=WORKER)
                    sampled_from = time.monotonic()
                    with sampler:
                        run = overhead.run_call(ctx.pipe, ctx.workload, ctx.clock, mode=mode,
                                                round_index=index, emitter=emitter)
                    ticks.append({"available": sampler.available, "ticks": sampler.ticks,
                                  "errors": sampler.errors, "call_s": run.call_s,
                                  "sampled_s": time.monotonic() - sampled_from})
                else:
                    run = overhead.run_call(ctx.pipe, ctx.workload, ctx.clock, mode=mode,
                                            round_index=index, emitter=emitter)
                runs[(mode, index)] = run
            _progress(f"round {index + 1}/{rounds}: " + ", ".join(
                f"{m} {runs[(m, index)].call_s:.3f} s" for m in modes))

        def paired(a: str, b: str, value: Callable[[overhead.Run], float]) -> overhead.Estimate:
            return overhead._paired([(value(runs[(a, i)]), value(runs[(b, i)]))
                                     for i in range(rounds)])

        def step(run: overhead.Run) -> float:
            return statistics.median(run.steps_s)

        estimates = {
            "call_s": paired("plain", "wantel", lambda r: r.call_s),
            "step_s": paired("plain", "wantel", step),
            "loop_s": paired("plain", "wantel", lambda r: r.loop_s),
            "sampler_step_s": paired("wantel", "nvml", step),
            "sampler_call_s": paired("wantel", "nvml", lambda r: r.call_s),
        }
        labels = {
            "call_s": "wall per call (paired median)",
            "step_s": "wall per step (paired median)",
            "loop_s": "denoising loop (paired median)",
        }
        for key, label in labels.items():
            e = estimates[key]
            report.row("overhead", label, _ms(e.plain), _ms(e.wantel),
                       f"{_pct(e.ratio)} [{_pct(e.low / e.plain)}, {_pct(e.high / e.plain)}]",
                       f"≤ {GOAL_OVERHEAD * 100:g} %",
                       result=ctx.judge(e.verdict(GOAL_OVERHEAD * e.plain)))
        data.update(rounds=rounds, estimates={k: asdict(v) for k, v in estimates.items()},
                    runs=[asdict(r) for r in runs.values()], sampler=ticks)
        shared.update(estimates=estimates, ticks=ticks, runs=runs, rounds=rounds)
    return shared


def nvml_section(ctx: Context, report: Report, measured: dict[str, Any]) -> None:
    """What the sampler reported during the ``nvml`` calls, and whether it showed on steps."""
    with report.section("nvml") as data:
        ticks = measured.get("ticks", [])
        if not ticks or not ticks[0]["available"]:
            data["status"] = "skipped"
            data["reason"] = "NVML not available here (no NVIDIA driver, or no pynvml)"
            report.row("nvml", "sampler fields", "", "unavailable", "no NVML here", "",
                       result="FAIL" if ctx.cuda else "skipped")
        else:
            events = settle(ctx, {_job("nvml", i) for i in range(measured["rounds"])})
            windows = [job_window(events, _job("nvml", i)) for i in range(measured["rounds"])]
            samples = [e for e in events if isinstance(e, GpuSampled) and e.job.startswith(
                "worker/") and (not ctx.cuda or e.device == str(ctx.device))]
            inside = [s for s in samples if any(a <= s.ts <= b for a, b in windows)]
            mask, how = throttle_mask(ctx.device)

            def values(name: str) -> list[float]:
                return [getattr(s, name) for s in inside or samples
                        if getattr(s, name) is not None]

            utilisation, temperature, power = (values("utilization_ratio"),
                                               values("temperature_celsius"),
                                               values("power_watts"))
            reasons = sorted({r for s in samples for r in s.throttle_reasons})
            complete = all(s.utilization_ratio is not None and s.temperature_celsius is not None
                           and s.power_watts is not None for s in samples)
            seconds = sum(t["sampled_s"] for t in ticks)
            rate = sum(t["ticks"] for t in ticks) / seconds if seconds else 0.0
            errors: dict[str, int] = {}
            for t in ticks:
                for name, count in t["errors"].items():
                    errors[name] = errors.get(name, 0) + count
            data.update(samples=len(samples), samples_in_jobs=len(inside),
                        all_fields_present=complete, errors=errors, ticks_per_s=rate,
                        utilization_median=statistics.median(utilisation) if utilisation
                        else None,
                        temperature_c=[min(temperature), max(temperature)] if temperature
                        else None,
                        power_w=[min(power), max(power)] if power else None,
                        throttle_reasons_seen=reasons, throttle_mask_now=mask,
                        throttle_mask_now_decoded=list(decode_throttle_reasons(mask))
                        if mask is not None else None, throttle_query=how)
            ok = complete and bool(inside) and mask is not None and not errors
            summary = (f"util {data['utilization_median'] or 0:.2f}, "
                       f"{max(temperature or [0]):.0f} °C, {max(power or [0]):.0f} W")
            report.row("nvml", "util / temp / power / clock reasons", "", f"{len(samples)} smp",
                       summary, "all set", result="PASS" if ok else "FAIL")
            report.row("nvml", "clock-event reasons (seen / query)", "",
                       "ok" if mask is not None else "no",
                       (",".join(reasons) or "none")[:30], "", result="info")
            report.row("nvml", "sampling rate during calls", f"{1 / SAMPLER_INTERVAL_S:g} Hz",
                       f"{rate:.1f} Hz", "", "", result="info")
        estimates = measured.get("estimates")
        if estimates:
            for key, label in (("sampler_step_s", "step time, sampler 10 Hz vs off"),
                               ("sampler_call_s", "wall per call, sampler 10 Hz vs off")):
                e = estimates[key]
                report.row("nvml", label, _ms(e.plain), _ms(e.wantel),
                           f"ratio {1 + e.ratio:.4f} [{1 + e.low / e.plain:.4f}, "
                           f"{1 + e.high / e.plain:.4f}]",
                           f"±{GOAL_OVERHEAD * 100:g} %",
                           result=ctx.judge(two_sided(e, GOAL_OVERHEAD * e.plain)))
            data["step_ratio_on_off"] = 1 + estimates["sampler_step_s"].ratio


def accuracy_section(ctx: Context, report: Report, measured: dict[str, Any]) -> None:
    """One synchronised, instrumented call: step durations and memory against references."""
    job = "gpu-check-synchronised"
    starts: list[float] = []
    ends: list[float] = []
    in_step = False

    def now() -> float:
        if ctx.cuda:
            torch.cuda.synchronize(ctx.device)
        return time.perf_counter()

    def first_pass(module: Any, args: Any) -> None:
        nonlocal in_step
        if not in_step:  # after wantel's pre-hook (prepended), which recorded the start event
            in_step = True
            starts.append(now())

    def on_step_end(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> Any:
        nonlocal in_step
        ends.append(now())  # runs after wantel's step-end callback, which recorded the end
        in_step = False
        return {}

    with report.section("steps") as data:
        kwargs = ctx.workload.kwargs()
        kwargs.update(generator=torch.Generator("cpu").manual_seed(0),
                      callback_on_step_end=on_step_end)
        gc.collect()
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        sampler = GpuSampler(ctx.emitter, interval=SAMPLER_INTERVAL_S, worker=WORKER)
        hooks = [module.register_forward_pre_hook(first_pass) for module in
                 (ctx.pipe.transformer, getattr(ctx.pipe, "transformer_2", None))
                 if module is not None]
        try:
            with sampler, instrument(ctx.pipe, emitter=ctx.emitter, job=job):
                ctx.pipe(**kwargs)
                ctx.synchronize()
        finally:
            for hook in hooks:
                hook.remove()
        torch_peak = torch.cuda.max_memory_allocated(ctx.device) if ctx.cuda else None
        torch_reserved = torch.cuda.memory_reserved(ctx.device) if ctx.cuda else None
        smi_used = nvidia_smi_used_bytes(ctx.device) if ctx.cuda else None
        free_jobs = {_job("wantel", i) for i in range(measured.get("rounds", 0))}
        events = settle(ctx, {job} | free_jobs)

        measured_steps = step_durations(events, job)
        if not (len(starts) == len(ends) == len(measured_steps) == ctx.workload.steps):
            raise RuntimeError(f"{len(starts)} step starts, {len(ends)} ends and "
                               f"{len(measured_steps)} StepEnded durations for "
                               f"{ctx.workload.steps} steps")
        reference = [b - a for a, b in zip(starts, ends, strict=True)]
        relative = [abs(w - h) / h for w, h in zip(measured_steps, reference, strict=True)]
        mean_rel = statistics.fmean(relative)
        data.update(synchronised_s=reference, step_ended_s=measured_steps,
                    relative_difference=relative, mean_abs_relative_difference=mean_rel)
        report.row("steps", "CUDA events vs synchronised, same steps"
                   if ctx.cuda else "host marks vs synchronised, same steps",
                   _ms(statistics.median(reference)), _ms(statistics.median(measured_steps)),
                   f"mean |Δ| {mean_rel * 100:.2f} % (max {max(relative) * 100:.2f} %)",
                   f"< {GOAL_STEP_AGREEMENT * 100:g} %",
                   result=ctx.judge("PASS" if mean_rel < GOAL_STEP_AGREEMENT else "MISS"))
        free = [d for i in range(measured.get("rounds", 0))
                for d in step_durations(events, _job("wantel", i))]
        if free:
            median_free = statistics.median(free)
            median_sync = statistics.median(reference)
            data["free_running_step_ended_median_s"] = median_free
            report.row("steps", "free-running StepEnded vs synchronised", _ms(median_sync),
                       _ms(median_free), _pct(median_free / median_sync - 1), "", result="info")
        _progress(f"steps: mean |Δ| {mean_rel * 100:.3f} %")

    with report.section("memory") as data:
        samples = of_job(events, job, MemorySampled)
        peaks = [s.peak_allocated_bytes for s in samples if s.peak_allocated_bytes is not None]
        if not ctx.cuda:
            rss = [s.host_rss_bytes for s in samples if s.host_rss_bytes is not None]
            data.update(status="skipped", reason="no device allocator on cpu",
                        wantel_host_rss_max_bytes=max(rss) if rss else None)
            report.row("memory", "allocator peak / device used", "", "n/a", "cpu: host RSS only",
                       "", result="skipped")
            return
        start, end = job_window(events, job)
        used = [s for s in events if isinstance(s, MemorySampled) and s.job.startswith("worker/")
                and s.device_used_bytes is not None and start <= s.ts <= end]
        wantel_peak = max(peaks) if peaks else None
        data.update(wantel_peak_allocated_bytes=wantel_peak, torch_max_memory_allocated=torch_peak,
                    torch_memory_reserved=torch_reserved, nvidia_smi_used_bytes=smi_used,
                    nvml_used_last_bytes=used[-1].device_used_bytes if used else None,
                    nvml_used_max_bytes=max(s.device_used_bytes for s in used) if used else None,
                    nvml_process_bytes_last=used[-1].process_device_bytes if used else None,
                    nvml_samples=len(used))
        if wantel_peak is None or not torch_peak:
            report.row("memory", "allocator peak vs max_memory_allocated", "", "missing", "",
                       "", result="FAIL")
        else:
            gap = (wantel_peak - torch_peak) / torch_peak
            report.row("memory", "allocator peak vs max_memory_allocated", _gib(torch_peak),
                       _gib(wantel_peak), _pct(gap), f"≤ {GOAL_PEAK_AGREEMENT * 100:g} %",
                       result="PASS" if abs(gap) <= GOAL_PEAK_AGREEMENT else "MISS")
        if not used or smi_used is None:
            report.row("memory", "NVML used vs nvidia-smi after", "", "missing",
                       "no NVML sample" if not used else "no nvidia-smi", "", result="FAIL")
        else:
            last = int(used[-1].device_used_bytes)
            delta = last - smi_used
            report.row("memory", "NVML used (last sample) vs nvidia-smi", _gib(smi_used),
                       _gib(last), f"{delta / MiB:+.0f} MiB", "≤ 1 GiB",
                       result="PASS" if abs(delta) <= GOAL_DEVICE_USED_BYTES else "MISS")
            if torch_reserved is not None:
                report.row("memory", "nvidia-smi used − torch reserved", _gib(torch_reserved),
                           "", f"{(smi_used - torch_reserved) / MiB:+.0f} MiB", "", result="info")


def two_expert_section(ctx: Context, report: Report, *, runs: int) -> None:
    """The Wan 2.2 A14B layout at 1.3B shape: the switch step and each expert's step time."""
    from diffusers import WanPipeline

    with report.section("two_experts") as data:
        overrides = SMALL_TRANSFORMER if ctx.small else {}
        devices = [ctx.device.index or 0] if ctx.cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(1)
            transformer_2 = overhead.build_wan13b_transformer(ctx.device, dtype=ctx.dtype,
                                                              **overrides)
        base = ctx.pipe
        scheduler = type(base.scheduler).from_config(base.scheduler.config)
        pipe = WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder,
                           vae=base.vae, scheduler=scheduler, transformer=base.transformer,
                           transformer_2=transformer_2, boundary_ratio=BOUNDARY_RATIO)
        pipe.set_progress_bar_config(disable=True)

        schedule = type(base.scheduler).from_config(base.scheduler.config)
        schedule.set_timesteps(ctx.workload.steps, device="cpu")
        boundary = BOUNDARY_RATIO * schedule.config.num_train_timesteps
        timesteps = [float(t) for t in schedule.timesteps]
        expected = next((i for i, t in enumerate(timesteps) if t < boundary), None)

        jobs = []
        for index in range(runs):
            overhead.run_call(pipe, ctx.workload, ctx.clock, mode="two-expert",
                              round_index=index, emitter=ctx.emitter)
            jobs.append(_job("two-expert", index))
        events = settle(ctx, set(jobs))
        switches = [[(e.step, e.from_expert, e.to_expert)
                     for e in of_job(events, job, ExpertSwitched)] for job in jobs]
        by_expert: dict[str, list[float]] = {}
        for job in jobs:
            for e in of_job(events, job, StepEnded):
                if e.duration_s is not None and e.expert is not None:
                    by_expert.setdefault(e.expert, []).append(float(e.duration_s))
        medians = {k: statistics.median(v) for k, v in by_expert.items()}
        data.update(boundary_timestep=boundary, timesteps=timesteps, expected_switch_step=expected,
                    switches=switches, step_s_by_expert=by_expert,
                    median_step_s_by_expert=medians,
                    params=overhead.parameter_count(transformer_2))
        observed = {s[0][0] for s in switches if s}
        good = (len(observed) == 1 and all(len(s) == 1 for s in switches)
                and observed == {expected}
                and all(s[0][1:] == ("high_noise", "low_noise") for s in switches))
        report.row("experts", "ExpertSwitched step vs schedule",
                   f"step {expected}", "step " + ",".join(str(s) for s in sorted(observed)),
                   f"t={timesteps[expected]:.0f} < {boundary:g}" if expected is not None else "",
                   "equal", result="PASS" if good else "FAIL")
        for expert in ("high_noise", "low_noise"):
            if expert in medians:
                report.row("experts", f"{expert} median step ({len(by_expert[expert])} steps)",
                           "", _ms(medians[expert]), "", "", result="info")
        if {"high_noise", "low_noise"} <= medians.keys():
            report.row("experts", "low / high median step", "", "",
                       f"ratio {medians['low_noise'] / medians['high_noise']:.4f}", "",
                       result="info")
        del pipe, transformer_2
        gc.collect()


def emitter_section(ctx: Context, report: Report) -> None:
    """Close the emitter once every job's events are in the log; nothing may have dropped."""
    with report.section("emitter") as data:
        try:
            ctx.synchronize()
            started = {e.job for e in overhead._read_events(ctx.log_dir)
                       if isinstance(e, JobStarted)}
            settle(ctx, started)
            data["jobs"] = len(started)
        finally:
            ctx.emitter.close()
        stats = ctx.emitter.stats()
        dropped = sum(stats.dropped.values())
        data.update(emitted=stats.emitted, appended=stats.appended, dropped=stats.dropped,
                    errors=stats.errors)
        report.row("emitter", "events dropped", "", str(dropped), f"{stats.emitted} emitted",
                   "0", result="PASS" if dropped == 0 else "FAIL")


NOTES: Final = (
    "overhead: each figure is the median of per-round paired differences (a round runs plain,",
    "  wantel and wantel+NVML in rotating order); [..] is a bootstrap 90 % interval over rounds;",
    "  '?' = the interval straddles the goal. Steps are CUDA events at each scheduler.step end.",
    "(verdict) in parentheses: shown, not judged (CPU or --small: the goals are the GPU's).",
    "sync: diffusers synchronises by itself (text-encoder sequence lengths, the two-expert",
    "  boundary test, the copy of the video to the host), so a process-wide 'error' stops even",
    "  the plain pipeline. The mode is therefore switched to 'error' on entry to every wantel",
    "  hook, wrapper and callback and back to 'default' inside the pipeline code they call;",
    "  the control row shows that the mode does raise here.",
    "steps: wantel's StepEnded (CUDA events, never synchronised) against perf_counter after",
    "  torch.cuda.synchronize() at the same step start (first transformer pass) and end",
    "  (step-end callback), in the same call, on the same steps.",
    "memory: NVML's 'used' (v1) also counts memory the driver reserves, which nvidia-smi",
    "  >= R535 lists apart, hence a small constant gap; torch's figures are this process's.",
)


# -- main -------------------------------------------------------------------------------------


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in ("diffusers", "transformers", "accelerate", "nvidia-ml-py", "msgspec",
                 "structlog", "wan-telemetry"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    out = os.environ.get("OUT")
    parser.add_argument("--json", metavar="OUT", type=Path,
                        default=Path(out) / "gpu_check.json" if out else None,
                        help="write the results here (default $OUT/gpu_check.json when OUT is set)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--small", action="store_true",
                        help="tiny shapes (the CPU smoke mode: the whole script in seconds)")
    parser.add_argument("--budget-s", type=float, default=390.0,
                        help="time the script plans to fit in (rounds adapt; default 390)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="most measured rounds (default 7; 3 with --small; never under 3)")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--frames", type=int)
    parser.add_argument("--steps", type=int)
    args = parser.parse_args(argv)

    # structlog prints to stdout by default; keep stdout for the table.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"error: --device cuda needs a CUDA GPU and torch {torch.__version__} sees none; "
              "use --device cpu --small for the smoke mode", file=sys.stderr)
        return 2
    if args.device == "cpu" and not args.small:
        parser.error("--device cpu runs the 1.3B shape for hours: add --small")
    if args.rounds is not None and args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds must be at least {MIN_ROUNDS}")
    report = Report(path=args.json)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        torch.set_num_threads(1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = SMALL_WORKLOAD if args.small else overhead.WAN13B_WORKLOAD
    workload = overhead.Workload(height=args.height or base.height,
                                 width=args.width or base.width,
                                 num_frames=args.frames or base.num_frames,
                                 steps=args.steps or base.steps)

    pipe = overhead.build_wan13b_pipeline(
        device, dtype=dtype, transformer_overrides=SMALL_TRANSFORMER if args.small else None,
        vae_overrides=SMALL_VAE if args.small else None)
    params = overhead.parameter_count(pipe.transformer)
    shape = "tiny (--small)" if args.small else "Wan2.1-T2V-1.3B-shaped"
    size = f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e3:.0f}k"
    model = f"{shape} WanPipeline ({size} params, {str(dtype)[6:]}, random)"
    _progress(f"built {model} in {time.monotonic() - report.started:.1f} s")
    report.add("config", {
        "model": model, "transformer_params": params, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else (platform.processor() or platform.machine()),
        "height": workload.height, "width": workload.width, "num_frames": workload.num_frames,
        "steps": workload.steps, "guidance_scale": workload.guidance_scale, "small": args.small,
        "budget_s": args.budget_s, "sampler_interval_s": SAMPLER_INTERVAL_S,
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        **_versions(),
        "driver": nvidia_smi("driver_version") if device.type == "cuda" else None,
        "gpu": nvidia_smi("name,memory.total,clocks.max.sm,power.limit")
        if device.type == "cuda" else None,
    })
    report.notes.extend(NOTES)

    with tempfile.TemporaryDirectory(prefix="wantel-gpu-check-") as tmp:
        log_dir = Path(tmp) / "log"
        emitter = Emitter(LocalLog(log_dir), worker=WORKER)
        clock: overhead.HostClock | overhead.CudaClock = (
            overhead.CudaClock(device) if device.type == "cuda" else overhead.HostClock())
        ctx = Context(pipe=pipe, workload=workload, device=device, clock=clock, emitter=emitter,
                      log_dir=log_dir, small=args.small, dtype=dtype)
        warm_s = warm_up(ctx, report)
        probed_s = sync_section(ctx, report)
        call_s = max(warm_s, probed_s)
        most = args.rounds or (MIN_ROUNDS if args.small else 7)
        rounds = plan_rounds(report, call_s, budget_s=args.budget_s, most=most)
        report.sections["config"]["rounds"] = rounds
        measured = overhead_section(ctx, report, rounds)
        nvml_section(ctx, report, measured)
        accuracy_section(ctx, report, measured)
        two_expert_section(ctx, report, runs=2)
        emitter_section(ctx, report)

    report.save()
    print(table(report))
    _progress(f"total {time.monotonic() - report.started:.0f} s; "
              f"JSON: {args.json if args.json else '(not written: no --json, no $OUT)'}")
    return 1 if any(r.result == "FAIL" for r in report.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
