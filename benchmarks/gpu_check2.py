"""The GPU check, round two (issue 21): the per-call overhead, the ETA and VRAM models on GPU
timings, and device identity, in one prepared run on one H100 (under 7 minutes of script)::

    bash benchmarks/gpu_check2.sh                          # on the device machine; $OUT
    python3 benchmarks/gpu_check2.py --cpu-smoke --out /tmp/g2   # the same code, tiny, ~1 min

Sections, in order (each written to ``$OUT/gpu_check2.json`` as soon as it is done, so a run
cut short still returns what it measured; docs/gpu-check.md says what each goal means):

1. ``warmup`` and ``sync`` (from :mod:`benchmarks.gpu_check`): one plain and one instrumented
   call; wantel's entry points under ``set_sync_debug_mode("error")``, its one declared
   synchronisation (the latents' finite check before the decode) counted apart.
2. ``overhead``: ``--rounds`` (≥ 16) rounds of ``plain`` / ``wantel`` in rotating order on the
   Wan 2.1 T2V-1.3B-shaped pipeline (480×832, 33 frames, 8 steps, CFG): wall per call, per
   step, per denoising loop and outside the loop (call − loop), medians of per-round paired
   differences with bootstrap 90 % intervals. Goal: per call ≤ 0.5 %, whole interval inside.
3. ``eta_corpus``: runs of the same pipeline at several resolutions, frame counts, step counts,
   CFG on and off (4 shapes × 5 runs, round-robin, then one shape seen once), recorded by
   ``instrument()`` into a real ``LocalLog`` with the NVML sampler on; then ``two_experts``:
   a pipeline of two A14B-shaped transformers (40 × 128 heads, FFN 13824, ``--expert-layers``
   layers each) with ``boundary_ratio`` 0.875, 3 runs into a second log.
4. ``eta_eval``: the real ``wantel eta eval --online`` (never fitted) and the held-out split
   (``--train 0.5``) on both logs. Goals: MAPE at 10 % ≤ 8 %, at 50 % ≤ 4 %, p10–p90
   coverage 75–85 %, before-start ≤ 15 % from the 4th run of a shape on.
5. ``vram``: each run's predicted peak (the memory projection, replayed: what ``/api/jobs``
   showed when the job started) against its allocator peak (``max_memory_allocated``); goal:
   median |error| ≤ 5 %. Then ``oom``: ``wantel advise`` on a deliberately oversized job
   (``--oom-size``² pixels, where the decode alone needs well over the card), and the job run
   for real: it must OOM, and its ``JobFailed`` category and suggestions are recorded.
6. ``identity``: the real ``wantel serve`` on the corpus log, ``/metrics`` scraped over HTTP:
   every device series carries the NVML UUID and the host; the GPU dashboard's panels' metrics
   are there with their device labels.
7. ``emitter``: nothing dropped.

Outputs under ``--out`` (default ``$OUT``; at most 8 files): ``gpu_check2.json`` (everything,
with the table), ``metrics.txt`` (the scrape), ``wantel-logs.tar.gz`` (both logs, to re-score
later); ``benchmarks/gpu_check2.sh`` adds ``gpu_check2.log``.

Exit status: 0 when every section ran (a MISS is a finding), 1 when a check FAILED or a section
raised, 2 without the requested device.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import structlog
import torch

try:
    from benchmarks import gpu_check, overhead
except ModuleNotFoundError:  # run as `python benchmarks/gpu_check2.py`
    import gpu_check  # type: ignore[no-redef]
    import overhead  # type: ignore[no-redef]

from inference.instrument import instrument
from inference.nvml import GpuSampler
from telemetry.emitter import Emitter
from telemetry.events import TERMINAL_TYPES, Event, ExpertSwitched, GpuSampled, JobFailed, StepEnded
from telemetry.log.base import Batch
from telemetry.log.local import LocalLog
from telemetry.projections.memory import MemoryProjection

Report = gpu_check.Report
progress = gpu_check._progress
_pct, _ms, _gib = gpu_check._pct, gpu_check._ms, gpu_check._gib

GOAL_OVERHEAD: Final = 0.005
GOAL_MAPE_10: Final = 8.0
GOAL_MAPE_50: Final = 4.0
GOAL_COVERAGE: Final = (0.75, 0.85)
GOAL_BEFORE: Final = 15.0
GOAL_VRAM: Final = 0.05
MIN_ROUNDS: Final = 16
WORKER: Final = "gpu-check2"
MODEL_13B: Final = "Wan2.1-T2V-1.3B-shaped (random)"
MODEL_A14B: Final = "Wan2.2-T2V-A14B-shaped (random, few layers)"
BOUNDARY_RATIO: Final = 0.875
GiB: Final = 1 << 30

#: Wan 2.2 T2V-A14B's expert shape (each expert is a 14B WanTransformer3DModel): the width,
#: heads and FFN of the real config, with fewer layers (``--expert-layers``) to fit and to run
#: in seconds.
A14B_TRANSFORMER: Final[dict[str, Any]] = {
    "num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824, "num_layers": 4,
}
SMALL_A14B: Final[dict[str, Any]] = {**gpu_check.SMALL_TRANSFORMER, "num_attention_heads": 3,
                                     "attention_head_dim": 16, "ffn_dim": 48}


@dataclass(frozen=True)
class Shape:
    """One request of the corpus."""

    name: str
    height: int
    width: int
    frames: int
    steps: int
    guidance: float

    def workload(self) -> overhead.Workload:
        return overhead.Workload(height=self.height, width=self.width, num_frames=self.frames,
                                 steps=self.steps, guidance_scale=self.guidance)


#: The corpus on the GPU: 4 shapes × 5 runs in round-robin order (so each shape's 4th run comes
#: after every shape was seen), then one shape seen once. About 40 s on an H100.
GPU_SHAPES: Final = (
    Shape("480x832x17 s8 cfg", 480, 832, 17, 8, 5.0),
    Shape("320x576x33 s10 cfg", 320, 576, 33, 10, 5.0),
    Shape("480x832x17 s6 no-cfg", 480, 832, 17, 6, 1.0),
    Shape("320x576x17 s12 cfg", 320, 576, 17, 12, 5.0),
)
GPU_ONCE: Final = Shape("368x640x25 s8 cfg", 368, 640, 25, 8, 5.0)
GPU_EXPERTS: Final = Shape("480x832x17 s8 cfg", 480, 832, 17, 8, 5.0)
SMOKE_SHAPES: Final = (
    Shape("32x32x5 s4 cfg", 32, 32, 5, 4, 5.0),
    Shape("48x32x9 s3 cfg", 48, 32, 9, 3, 5.0),
    Shape("32x48x5 s4 no-cfg", 32, 48, 5, 4, 1.0),
    Shape("48x48x5 s2 cfg", 48, 48, 5, 2, 5.0),
)
SMOKE_ONCE: Final = Shape("32x32x9 s3 cfg", 32, 32, 9, 3, 5.0)
SMOKE_EXPERTS: Final = Shape("32x32x5 s4 cfg", 32, 32, 5, 4, 5.0)
RUNS_PER_SHAPE: Final = 5
EXPERT_RUNS: Final = 3


# -- the report -------------------------------------------------------------------------------


class Report2(gpu_check.Report):
    """gpu_check's report (sections written as they end) with this check's table."""

    def as_json(self) -> dict[str, Any]:
        data = super().as_json()
        data["table"] = table(self)
        return data


def table(report: gpu_check.Report) -> str:
    config = report.sections.get("config", {})
    head = [
        f"wantel GPU check 2: {config.get('model', '?')} on {config.get('device_name', '?')}",
        f"driver {config.get('driver')}; torch {config.get('torch')}, diffusers "
        f"{config.get('diffusers')}; overhead {config.get('width')}×{config.get('height')}, "
        f"{config.get('num_frames')} frames, {config.get('steps')} steps, CFG, "
        f"{config.get('rounds', '?')} rounds (plain / wantel, rotating)",
    ]
    return gpu_check.rows_and_notes(report, head)


# -- helpers ----------------------------------------------------------------------------------


@dataclass
class Log:
    """One real log of the check, with its emitter."""

    name: str
    path: Path
    emitter: Emitter

    def events(self) -> list[Event]:
        return overhead._read_events(self.path)

    def settle(self, jobs: set[str], timeout: float = 60.0) -> list[Event]:
        """The log's events once every job in ``jobs`` has its terminal event there."""
        deadline = time.monotonic() + timeout
        while True:
            self.emitter.flush()
            events = self.events()
            done = {e.job for e in events if isinstance(e, TERMINAL_TYPES)}
            if jobs <= done:
                return events
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no terminal event for {sorted(jobs - done)}")
            time.sleep(0.05)


@dataclass
class CorpusRun:
    """One run of the corpus."""

    job: str
    log: str
    shape: str
    run_of_shape: int  # 0 for a shape's first run
    height: int
    width: int
    frames: int
    steps: int
    guidance: float
    wall_s: float
    torch_peak_bytes: int | None


def run_job(ctx: gpu_check.Context, pipe: Any, shape: Shape, log: Log, job: str, *,
            model: str, variant: str, seed: int) -> tuple[float, int | None]:
    """One instrumented call: its wall time and (CUDA) its allocator peak."""
    kwargs = shape.workload().kwargs()
    kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
    gc.collect()
    ctx.synchronize()
    start = time.perf_counter()
    with instrument(pipe, emitter=log.emitter, job=job, model=model, variant=variant):
        pipe(**kwargs)
    ctx.synchronize()
    wall = time.perf_counter() - start
    # wantel reset the peak when the job started: this is the job's own peak
    peak = int(torch.cuda.max_memory_allocated(ctx.device)) if ctx.cuda else None
    return wall, peak


def wantel_cli(*args: str, timeout: float = 120.0) -> dict[str, Any]:
    """``python -m wantel ARGS --json``, the real command; its JSON, or the error."""
    command = [sys.executable, "-m", "wantel", *args, "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-500:]}",
                "command": " ".join(command[1:])}
    result: dict[str, Any] = json.loads(done.stdout)
    result["command"] = " ".join(command[1:])
    return result


def nvml_identity(device: torch.device) -> dict[str, Any]:
    """The device's UUID straight from NVML (matched to torch's by PCI address)."""
    try:
        import pynvml
    except ImportError as exc:
        return {"error": f"pynvml: {exc}"}
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return {"error": f"nvmlInit: {exc}"}
    try:
        found = gpu_check.nvml_handle(pynvml, device)
        if found is None:
            return {"error": "torch's device not among NVML's"}
        index, handle = found
        uuid = pynvml.nvmlDeviceGetUUID(handle)
        return {"index": index, "uuid": uuid.decode() if isinstance(uuid, bytes) else str(uuid)}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def judged(ctx: gpu_check.Context, verdict: str) -> str:
    """A verdict on GPU timings or GPU memory: shown in parentheses off the GPU."""
    return ctx.judge(verdict)


def expected_switch(pipe: Any, steps: int) -> int | None:
    schedule = type(pipe.scheduler).from_config(pipe.scheduler.config)
    schedule.set_timesteps(steps, device="cpu")
    boundary = BOUNDARY_RATIO * schedule.config.num_train_timesteps
    return next((i for i, t in enumerate(schedule.timesteps) if float(t) < boundary), None)


def build_umt5_xxl(device: torch.device, dtype: torch.dtype) -> Any:
    """A ``UMT5EncoderModel`` of UMT5-XXL's shape (24 layers, width 4096, 64 heads, gated FFN
    10240, the 256,384-token vocabulary: 5.68B parameters, 11.4 GB in bf16), random weights
    built on the device. Wan's pipelines keep it on the device, so the memory model counts
    it; the corpus runs with it so that the VRAM prediction is checked on the real layout."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=256_384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0)
    with torch.device(device):
        model = UMT5EncoderModel(config)
    return model.to(dtype).eval().requires_grad_(False)


def corpus_pipeline(ctx: gpu_check.Context) -> Any:
    """The overhead's pipeline with UMT5-XXL's shape as its text encoder (on the GPU; the
    smoke keeps the tiny one): the same transformer and VAE, a fresh scheduler."""
    if ctx.small:
        return ctx.pipe
    from diffusers import WanPipeline

    base = ctx.pipe
    with torch.random.fork_rng(devices=[ctx.device.index or 0]):
        torch.manual_seed(3)
        encoder = build_umt5_xxl(ctx.device, ctx.dtype)
    gc.collect()
    torch.cuda.empty_cache()
    pipe = WanPipeline(tokenizer=base.tokenizer, text_encoder=encoder, vae=base.vae,
                       scheduler=type(base.scheduler).from_config(base.scheduler.config),
                       transformer=base.transformer)
    pipe.set_progress_bar_config(disable=True)
    # One unrecorded call first: random weights 24 layers deep could in principle feed the
    # transformer values that end in non-finite latents, which wantel fails as "numerical";
    # then the corpus runs on the overhead's pipeline rather than not at all.
    trial = GPU_SHAPES[-1].workload().kwargs()
    trial["generator"] = torch.Generator("cpu").manual_seed(0)
    trial["output_type"] = "latent"
    try:
        latents = pipe(**trial).frames
        if not bool(torch.isfinite(latents).all()):
            raise ValueError("non-finite latents")
    except Exception as exc:
        progress(f"corpus pipeline with UMT5-XXL failed its trial call ({exc}); the corpus "
                 "runs on the overhead's pipeline (2-layer text encoder)")
        del pipe, encoder
        gc.collect()
        torch.cuda.empty_cache()
        return base
    progress(f"corpus pipeline: UMT5-XXL-shaped text encoder, "
             f"{overhead.parameter_count(encoder) / 1e9:.2f}B parameters")
    return pipe


# -- sections ---------------------------------------------------------------------------------


def overhead_section(ctx: gpu_check.Context, report: gpu_check.Report, rounds: int) -> None:
    """Rounds of plain / wantel, order alternating: per call, step, loop, outside the loop."""
    with report.section("overhead") as data:
        modes = ("plain", "wantel")
        runs: dict[tuple[str, int], overhead.Run] = {}
        for index in range(rounds):
            for mode in modes if index % 2 == 0 else modes[::-1]:
                runs[(mode, index)] = overhead.run_call(
                    ctx.pipe, ctx.workload, ctx.clock, mode=mode, round_index=index,
                    emitter=None if mode == "plain" else ctx.emitter)
            progress(f"round {index + 1}/{rounds}: " + ", ".join(
                f"{m} {runs[(m, index)].call_s:.3f} s" for m in modes))

        def paired(value: Callable[[overhead.Run], float]) -> overhead.Estimate:
            return overhead._paired([(value(runs[("plain", i)]), value(runs[("wantel", i)]))
                                     for i in range(rounds)])

        estimates = {
            "call_s": paired(lambda r: r.call_s),
            "step_s": paired(lambda r: statistics.median(r.steps_s)),
            "loop_s": paired(lambda r: r.loop_s),
            "outside_loop_s": paired(lambda r: r.call_s - r.loop_s),
        }
        labels = {"call_s": "wall per call (paired median)",
                  "step_s": "wall per step (paired median)",
                  "loop_s": "denoising loop (paired median)"}
        for key, label in labels.items():
            e = estimates[key]
            report.row("overhead", label, _ms(e.plain), _ms(e.wantel),
                       f"{_pct(e.ratio)} [{_pct(e.low / e.plain)}, {_pct(e.high / e.plain)}]",
                       f"≤ {GOAL_OVERHEAD * 100:g} %",
                       result=judged(ctx, e.verdict(GOAL_OVERHEAD * e.plain)))
        outside = estimates["outside_loop_s"]
        call = estimates["call_s"]
        report.row("overhead", "outside the loop (call − loop), paired", _ms(outside.plain),
                   _ms(outside.wantel), f"{outside.added * 1e3:+.1f} ms [{outside.low * 1e3:+.1f}"
                   f", {outside.high * 1e3:+.1f}] = {_pct(outside.added / call.plain)} of a call",
                   "", result="info")
        data.update(rounds=rounds, estimates={k: asdict(v) for k, v in estimates.items()},
                    runs=[asdict(r) for r in runs.values()])


def corpus_section(ctx: gpu_check.Context, report: gpu_check.Report, log: Log, pipe: Any, *,
                   shapes: tuple[Shape, ...], once: Shape, variant: str,
                   sampler_interval: float) -> list[CorpusRun]:
    """The 1.3B corpus into ``log``, the NVML sampler on (its samples carry the UUID)."""
    runs: list[CorpusRun] = []
    with report.section("eta_corpus") as data:
        plan = [(shape, index) for index in range(RUNS_PER_SHAPE) for shape in shapes]
        plan.append((once, 0))
        sampler = GpuSampler(log.emitter, interval=sampler_interval, worker=WORKER)
        with sampler:
            for number, (shape, index) in enumerate(plan):
                job = f"eta-{number:02d}"
                wall, peak = run_job(ctx, pipe, shape, log, job, model=MODEL_13B,
                                     variant=variant, seed=number)
                runs.append(CorpusRun(job, log.name, shape.name, index, shape.height,
                                      shape.width, shape.frames, shape.steps, shape.guidance,
                                      wall, peak))
                progress(f"corpus {job} {shape.name} run {index + 1}: {wall:.2f} s"
                         + (f", peak {peak / GiB:.2f} GiB" if peak else ""))
        log.settle({r.job for r in runs})
        data.update(runs=[asdict(r) for r in runs], sampler_available=sampler.available,
                    sampler_ticks=sampler.ticks, sampler_errors=sampler.errors)
        report.row("corpus", f"runs recorded ({len(shapes)} shapes × {RUNS_PER_SHAPE} + 1)",
                   "", str(len(runs)), f"{sum(r.wall_s for r in runs):.0f} s in all", "≥ 16",
                   result="PASS" if len(runs) >= 16 else "FAIL")
    return runs


def experts_section(ctx: gpu_check.Context, report: gpu_check.Report, log: Log, base: Any, *,
                    shape: Shape, layers: int, variant: str) -> list[CorpusRun]:
    """A two-expert pipeline of A14B-shaped transformers (fewer layers): switch and timings."""
    from diffusers import WanPipeline

    runs: list[CorpusRun] = []
    with report.section("two_experts") as data:
        overrides = SMALL_A14B if ctx.small else {**A14B_TRANSFORMER, "num_layers": layers}
        devices = [ctx.device.index or 0] if ctx.cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(2)
            high = overhead.build_wan13b_transformer(ctx.device, dtype=ctx.dtype, **overrides)
            low = overhead.build_wan13b_transformer(ctx.device, dtype=ctx.dtype, **overrides)
        pipe = WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder,
                           vae=base.vae, scheduler=type(base.scheduler).from_config(
                               base.scheduler.config),
                           transformer=high, transformer_2=low, boundary_ratio=BOUNDARY_RATIO)
        pipe.set_progress_bar_config(disable=True)
        params = overhead.parameter_count(high)
        progress(f"two experts: 2 × {params / 1e9:.2f}B parameters ({overrides['num_layers']} "
                 "layers each)")
        for number in range(EXPERT_RUNS):
            job = f"experts-{number:02d}"
            wall, peak = run_job(ctx, pipe, shape, log, job, model=MODEL_A14B, variant=variant,
                                 seed=100 + number)
            runs.append(CorpusRun(job, log.name, shape.name, number, shape.height, shape.width,
                                  shape.frames, shape.steps, shape.guidance, wall, peak))
            progress(f"two experts {job}: {wall:.2f} s")
        events = log.settle({r.job for r in runs})
        expected = expected_switch(pipe, shape.steps)
        switches = [[(e.step, e.from_expert, e.to_expert) for e in events
                     if e.job == r.job and isinstance(e, ExpertSwitched)] for r in runs]
        by_expert: dict[str, list[float]] = {}
        for e in events:
            if isinstance(e, StepEnded) and e.expert is not None and e.duration_s is not None:
                by_expert.setdefault(e.expert, []).append(float(e.duration_s))
        good = all(s == [(expected, "high_noise", "low_noise")] for s in switches)
        report.row("experts", "ExpertSwitched step vs schedule", f"step {expected}",
                   ",".join(str(s[0][0]) if s else "none" for s in switches), "", "equal",
                   result="PASS" if good else "FAIL")
        for expert, values in sorted(by_expert.items()):
            report.row("experts", f"{expert} median step ({len(values)} steps)", "",
                       _ms(statistics.median(values)), "", "", result="info")
        data.update(runs=[asdict(r) for r in runs], params_per_expert=params,
                    layers=overrides["num_layers"], expected_switch_step=expected,
                    switches=switches, step_s_by_expert=by_expert)
        del pipe, high, low
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
    return runs


def eta_eval_section(ctx: gpu_check.Context, report: gpu_check.Report, logs: list[Log],
                     runs: list[CorpusRun]) -> None:
    """``wantel eta eval`` (online, and the held-out split) on each log; the goals on the
    1.3B corpus."""
    with report.section("eta_eval") as data:
        for log in logs:
            online = wantel_cli("eta", "eval", "--online", "--log", str(log.path))
            # the held-out split needs jobs on both sides: only the 1.3B corpus has enough
            split = (wantel_cli("eta", "eval", "--train", "0.5", "--log", str(log.path))
                     if log.name == "eta" else {"skipped": "too few jobs to split"})
            data[log.name] = {"online": online, "split": split}
            for label, result in (("online", online), ("held-out", split)):
                if "skipped" in result:
                    continue
                if "error" in result:
                    report.row("eta", f"{log.name}: eval {label}", "", "error",
                               result["error"][:30], "", result="FAIL")
                    continue
                mape = result["mape"]["ours"]
                coverage = result.get("coverage_p10_p90")
                main = log.name == "eta"
                tag = f"{log.name} {label} ({result.get('test_jobs')} jobs)"
                m10, m50 = mape.get("10"), mape.get("50")
                report.row("eta", f"{tag}: MAPE at 10 %", "", _num(m10, "%"),
                           f"tqdm {_num(result['mape']['tqdm'].get('10'), '%')}",
                           f"≤ {GOAL_MAPE_10:g} %" if main else "",
                           result=_goal(ctx, main, m10 is not None and m10 <= GOAL_MAPE_10))
                report.row("eta", f"{tag}: MAPE at 50 %", "", _num(m50, "%"),
                           f"tqdm {_num(result['mape']['tqdm'].get('50'), '%')}",
                           f"≤ {GOAL_MAPE_50:g} %" if main else "",
                           result=_goal(ctx, main, m50 is not None and m50 <= GOAL_MAPE_50))
                inside = coverage is not None and GOAL_COVERAGE[0] <= coverage <= GOAL_COVERAGE[1]
                report.row("eta", f"{tag}: p10–p90 coverage", "",
                           _num(None if coverage is None else coverage * 100, "%"), "",
                           "75–85 %" if main else "", result=_goal(ctx, main, inside))
                if label == "online":
                    later = [abs(result["jobs"][r.job]["before"]) * 100 for r in runs
                             if r.log == log.name and r.run_of_shape >= 3
                             and result["jobs"].get(r.job, {}).get("before") is not None]
                    if later:
                        before = statistics.fmean(later)
                        data[log.name]["before_from_4th_run_mape"] = before
                        report.row("eta", f"{log.name} online: before start, 4th run on",
                                   "", _num(before, "%"), f"{len(later)} runs",
                                   f"≤ {GOAL_BEFORE:g} %" if main else "",
                                   result=_goal(ctx, main, before <= GOAL_BEFORE))


def _num(value: float | None, unit: str) -> str:
    return "n/a" if value is None else f"{value:.1f} {unit}"


def _goal(ctx: gpu_check.Context, judged_here: bool, ok: bool) -> str:
    if not judged_here:
        return "info"
    return ctx.judge("PASS" if ok else "MISS")


def vram_section(ctx: gpu_check.Context, report: gpu_check.Report, logs: list[Log],
                 runs: list[CorpusRun]) -> None:
    """Each run's predicted peak (the memory projection, as it was when the job started)
    against the allocator's peak."""
    with report.section("vram") as data:
        finished: dict[str, Any] = {}
        for log in logs:
            projection = MemoryProjection()
            state = projection.initial()
            for item in LocalLog(log.path, create=False).read():
                if isinstance(item, Batch):
                    for event in item.events:
                        state = projection.apply(state, event)
            finished.update(state.finished)
        rows = []
        for run in runs:
            memory = finished.get(run.job)
            if memory is None:
                continue
            kind = memory.predicted_kind
            observed = run.torch_peak_bytes if ctx.cuda else memory.peaks.get(kind or "")
            observed_log = memory.peaks.get(kind or "")
            predicted = memory.predicted_bytes
            error = (predicted - observed) / observed if predicted and observed else None
            rows.append({"job": run.job, "shape": run.shape, "kind": kind,
                         "predicted_bytes": predicted, "prior_bytes": memory.prior_bytes,
                         "observed_bytes": observed, "observed_in_log_bytes": observed_log,
                         "error": error,
                         "prior_error": (memory.prior_bytes - observed) / observed
                         if memory.prior_bytes and observed else None})
        data["runs"] = rows
        kind = rows[0]["kind"] if rows else None
        for name in ("eta", "experts"):  # the goal is the 1.3B corpus's; the experts: info
            mine = [r for r in rows if r["job"].startswith(f"{name}-")]
            errors = [abs(r["error"]) for r in mine if r["error"] is not None]
            prior = [abs(r["prior_error"]) for r in mine if r["prior_error"] is not None]
            if not errors:
                report.row("vram", f"{name}: predicted vs allocator peak", "", "missing", "",
                           "", result="FAIL")
                continue
            median = statistics.median(errors)
            data[name] = {"median_abs_error": median, "max_abs_error": max(errors),
                          "prior_median_abs_error": statistics.median(prior) if prior else None,
                          "runs": len(errors)}
            main = name == "eta"
            report.row("vram", f"{name}: predicted vs peak ({kind}), {len(errors)} runs", "",
                       f"{median * 100:.1f} %", f"max {max(errors) * 100:.0f} %; prior "
                       f"{statistics.median(prior) * 100 if prior else float('nan'):.0f} %",
                       f"≤ {GOAL_VRAM * 100:g} %" if main else "",
                       result=judged(ctx, "PASS" if median <= GOAL_VRAM else "MISS")
                       if main else "info")
        if ctx.cuda:
            agree = [r for r in rows if r["observed_in_log_bytes"] == r["observed_bytes"]]
            report.row("vram", "logged peak = max_memory_allocated", "", f"{len(agree)}/"
                       f"{len(rows)}", "", "all", result="PASS" if len(agree) == len(rows)
                       else "MISS")


@dataclass(frozen=True)
class OomCase:
    """An oversized job: run at the card's full memory, or with the allocator capped."""

    name: str
    shape: Shape
    fraction: float | None  # torch.cuda.set_per_process_memory_fraction, None: the whole card


def oom_section(ctx: gpu_check.Context, report: gpu_check.Report, log: Log, pipe: Any, *,
                cases: tuple[OomCase, ...], fitting: Shape, variant: str) -> None:
    """For each case: ``wantel advise`` says whether it fits (at the capacity it runs under),
    then the job runs for real and must fail with an allocator OOM (simulated off the GPU),
    its ``JobFailed`` category and suggestions recorded. Two cases: the whole card, with a
    resolution whose decode alone needs far more than 80 GB (at such sizes a single video
    tensor passes 2³¹ elements, and a kernel may refuse it before the allocator does, which
    is then recorded as what it was); and a 1280×720 job under a 30 % allocator cap, which
    can only end in the allocator's own OOM. Plus ``advise`` on a corpus shape (it fits)."""
    with report.section("oom") as data:
        total = (torch.cuda.get_device_properties(ctx.device).total_memory if ctx.cuda
                 else None)
        common = ["advise", "--log", str(log.path), "--model", MODEL_13B]
        small = wantel_cli(*common, "--frames", str(fitting.frames), "--height",
                           str(fitting.height), "--width", str(fitting.width), "--steps",
                           str(fitting.steps))
        data["advise_corpus_shape"] = small
        fits_small = small.get("fits")
        report.row("oom", f"advise {fitting.name}: fits?", "fits",
                   "fits" if fits_small else "does not" if fits_small is False else "error",
                   "", "agree", result=judged(ctx, "PASS" if fits_small else "MISS"))
        data["cases"] = {}
        oom_seen = False
        for number, case in enumerate(cases):
            shape = case.shape
            capacity = [] if case.fraction is None or total is None else [
                "--capacity", str(int(case.fraction * total))]
            advice = wantel_cli(*common, "--frames", str(shape.frames), "--height",
                                str(shape.height), "--width", str(shape.width), "--steps",
                                str(shape.steps), *([] if shape.guidance > 1 else ["--no-cfg"]),
                                *capacity)
            job = f"oom-{number:02d}"
            restore = None
            if not ctx.cuda:  # a CPU cannot be made to OOM safely: the failure is simulated
                decode = pipe.vae.decode

                def simulated(*args: Any, **kwargs: Any) -> Any:
                    raise torch.OutOfMemoryError(
                        "CUDA out of memory. Tried to allocate 20.00 GiB (simulated on a CPU)")

                pipe.vae.decode, restore = simulated, decode
            elif case.fraction is not None:
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.set_per_process_memory_fraction(case.fraction, ctx.device)
            raised = None
            started = time.monotonic()
            try:
                run_job(ctx, pipe, shape, log, job, model=MODEL_13B, variant=variant,
                        seed=900 + number)
            except Exception as exc:  # the OOM (anything else is recorded as what it was)
                raised = f"{type(exc).__name__}: {str(exc)[:300]}"
            finally:
                if restore is not None:
                    pipe.vae.decode = restore
                if ctx.cuda:
                    torch.cuda.set_per_process_memory_fraction(1.0, ctx.device)
                gc.collect()
                if ctx.cuda:
                    torch.cuda.empty_cache()
            elapsed = time.monotonic() - started
            events = log.settle({job})
            failed = [e for e in events if e.job == job and isinstance(e, JobFailed)]
            failure = failed[0] if failed else None
            oom = failure is not None and failure.oom
            oom_seen = oom_seen or oom
            data["cases"][case.name] = {
                "job": job, "shape": asdict(shape), "fraction": case.fraction,
                "advise": advice, "raised": raised, "elapsed_s": elapsed,
                "simulated": not ctx.cuda, "failure": None if failure is None else {
                    "category": failure.category, "oom": failure.oom, "stage": failure.stage,
                    "error_type": failure.error_type, "message": failure.message,
                    "suggestions": list(failure.suggestions)}}
            fits = advice.get("fits")
            predicted = advice.get("predicted_peak_bytes")
            report.row("oom", f"{case.name}: advise fits?", "does not",
                       "fits" if fits else "does not" if fits is False else "error",
                       f"{_gib(predicted)} of {_gib(advice['capacity_bytes'])}"
                       if predicted and advice.get("capacity_bytes") else
                       str(advice.get("error", ""))[:30], "agree",
                       result=judged(ctx, "PASS" if fits is False else "MISS"))
            outcome = "OOM" if oom else (raised or "completed")
            report.row("oom", f"{case.name}: run", "OOM", outcome[:12],
                       "simulated on cpu" if not ctx.cuda else
                       f"{failure.stage or ''} after {elapsed:.1f} s" if failure else
                       outcome[:30], "OOM", result=judged(ctx, "PASS" if oom else "MISS"))
            if failure is not None:
                report.row("oom", f"{case.name}: category / suggestions", "oom_device",
                           failure.category, f"{len(failure.suggestions)} suggestions", "",
                           result=judged(ctx, "PASS" if failure.category == "oom_device"
                                         and failure.suggestions else "MISS"))
        report.row("oom", "a real allocator OOM recorded", "", "yes" if oom_seen else "no",
                   "simulated on cpu" if not ctx.cuda else "", "yes",
                   result=("PASS" if oom_seen else "FAIL") if ctx.cuda else "skipped")


def identity_section(ctx: gpu_check.Context, report: gpu_check.Report, log: Log,
                     out: Path, jobs: int) -> None:
    """The real ``wantel serve`` on the corpus log; ``/metrics`` scraped; device labels."""
    from prometheus_client.parser import text_string_to_metric_families

    from dashboards.specs import GPU

    with report.section("identity") as data:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        errors = tempfile.TemporaryFile()  # noqa: SIM115 - closed below, after the server
        server = subprocess.Popen(
            [sys.executable, "-m", "wantel", "serve", "--log", str(log.path), "--host",
             "127.0.0.1", "--port", str(port)], stdout=errors, stderr=subprocess.STDOUT)
        text = ""
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if server.poll() is not None:
                    break
                with contextlib.suppress(OSError):
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                                timeout=5) as response:
                        text = response.read().decode()
                    done = sum(float(v) for v in re.findall(
                        r'^wantel_jobs_total\{[^}]*\} ([0-9.e+]+)$', text, re.M))
                    if done >= jobs:
                        break
                time.sleep(0.2)
        finally:
            server.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(10)
            if server.poll() is None:
                server.kill()
            errors.seek(0)
            data["serve_output_tail"] = errors.read().decode(errors="replace")[-2000:]
            errors.close()
        (out / "metrics.txt").write_text(text)
        if not text:
            report.row("identity", "/metrics scraped", "", "nothing", "", "", result="FAIL")
            return
        samples = [s for family in text_string_to_metric_families(text)
                   for s in family.samples]
        device_series = [s for s in samples if "UUID" in s.labels]
        host = socket.gethostname()
        expected = nvml_identity(ctx.device) if ctx.cuda else {}
        sampled = sorted({e.uuid for e in log.events() if isinstance(e, GpuSampled)
                          and e.uuid})
        gpu_series = [s for s in device_series if s.name.startswith("wantel_gpu_")
                      or s.labels.get("gpu")]
        labelled = [s for s in gpu_series if s.labels.get("UUID") == expected.get("uuid")
                    and s.labels.get("Hostname") == host and s.labels.get("gpu") != ""]
        data.update(port=port, samples=len(samples), device_series=len(device_series),
                    gpu_series=len(gpu_series), labelled=len(labelled), host=host,
                    nvml=expected, sampled_uuids=sampled,
                    unlabelled=[f"{s.name}{s.labels}" for s in gpu_series
                                if s not in labelled][:20])
        if ctx.cuda:
            report.row("identity", "GPU series with NVML UUID + host", expected.get(
                "uuid", "?")[:12], f"{len(labelled)}/{len(gpu_series)}", host[:30], "all",
                result="PASS" if gpu_series and len(labelled) == len(gpu_series) else "FAIL")
        else:
            report.row("identity", "/metrics scraped (no GPU: no UUID here)", "",
                       f"{len(samples)} smp", f"{len(device_series)} device series", "",
                       result="skipped")
        names = {s.name for s in samples}
        panels = []
        for row in GPU.rows:
            for panel in row.panels:
                metrics = sorted({m for q in panel.queries
                                  for m in re.findall(r"\bwantel_[a-z0-9_]+", q.expr)})
                present = [m for m in metrics if any(n == m or n.startswith(m + "_")
                                                     or m.startswith(n) for n in names)]
                by_device = any("UUID" in q.expr for q in panel.queries)
                series = [s for s in samples if any(s.name.startswith(m) for m in metrics)]
                with_labels = [s for s in series if all(s.labels.get(k) for k in (
                    "device", "gpu", "UUID", "Hostname"))] if by_device else series
                panels.append({"panel": panel.title, "metrics": metrics, "present": present,
                               "series": len(series), "with_device_labels": len(with_labels)})
        data["gpu_dashboard_panels"] = panels
        complete = [p for p in panels if p["series"] and p["with_device_labels"] == p["series"]]
        empty = [p["panel"] for p in panels if not p["series"]]
        report.row("identity", "GPU dashboard panels with data + labels", str(len(panels)),
                   str(len(complete)), ("empty: " + ", ".join(empty))[:30] if empty else "",
                   "all", result=judged(ctx, "PASS" if len(complete) == len(panels)
                                        else "MISS"))


def emitter_section(report: gpu_check.Report, logs: list[Log]) -> None:
    with report.section("emitter") as data:
        dropped = 0
        for log in logs:
            log.emitter.close()
            stats = log.emitter.stats()
            data[log.name] = {"emitted": stats.emitted, "appended": stats.appended,
                              "dropped": stats.dropped, "errors": stats.errors}
            dropped += sum(stats.dropped.values())
        report.row("emitter", "events dropped (all logs)", "", str(dropped), "", "0",
                   result="PASS" if dropped == 0 else "FAIL")


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    out_env = os.environ.get("OUT")
    parser.add_argument("--out", type=Path, default=Path(out_env) if out_env else None,
                        help="folder for the results (default $OUT)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="the whole script on the CPU with tiny shapes and 3 rounds")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"overhead rounds (default {MIN_ROUNDS}; 3 with --cpu-smoke)")
    parser.add_argument("--expert-layers", type=int, default=4,
                        help="layers of each A14B-shaped expert (default 4)")
    parser.add_argument("--oom-size", type=int, default=2560,
                        help="the oversized job's side in pixels (default 2560: its decode "
                             "alone needs ~130 GB)")
    parser.add_argument("--oom-fraction", type=float, default=0.3,
                        help="the allocator cap of the second OOM case (default 0.3: ~25 GB "
                             "of an H100, under the 1280x720 job's ~35 GB)")
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("give --out DIR (or set $OUT)")
    if args.rounds is not None and args.rounds < 3:
        parser.error("--rounds must be at least 3")
    if args.oom_size % 16 or args.oom_size <= 0:
        parser.error("--oom-size must be a positive multiple of 16")
    if not 0 < args.oom_fraction < 1:
        parser.error("--oom-fraction must be between 0 and 1")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    small = args.cpu_smoke
    if not small and not torch.cuda.is_available():
        print(f"error: this check needs a CUDA GPU and torch {torch.__version__} sees none; "
              "use --cpu-smoke for the CPU dry run", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report2(path=args.out / "gpu_check2.json")
    device = torch.device("cpu") if small else torch.device("cuda", torch.cuda.current_device())
    if small:
        torch.set_num_threads(1)
    dtype = torch.float32 if small else torch.bfloat16
    workload = gpu_check.SMALL_WORKLOAD if small else overhead.WAN13B_WORKLOAD
    rounds = args.rounds or (3 if small else MIN_ROUNDS)
    pipe = overhead.build_wan13b_pipeline(
        device, dtype=dtype, transformer_overrides=gpu_check.SMALL_TRANSFORMER if small else None,
        vae_overrides=gpu_check.SMALL_VAE if small else None)
    params = overhead.parameter_count(pipe.transformer)
    model = (f"{'tiny (--cpu-smoke)' if small else 'Wan2.1-T2V-1.3B-shaped'} WanPipeline "
             f"({params / 1e9:.2f}B params, {str(dtype)[6:]}, random)" if not small else
             f"tiny (--cpu-smoke) WanPipeline ({params / 1e3:.0f}k params, float32, random)")
    progress(f"built {model} in {time.monotonic() - report.started:.1f} s")
    report.add("config", {
        "model": model, "transformer_params": params, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else (platform.processor() or platform.machine()), "host": socket.gethostname(),
        "height": workload.height, "width": workload.width, "num_frames": workload.num_frames,
        "steps": workload.steps, "guidance_scale": workload.guidance_scale, "rounds": rounds,
        "cpu_smoke": small, "expert_layers": args.expert_layers, "oom_size": args.oom_size,
        "oom_fraction": args.oom_fraction,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), **gpu_check._versions(),
        "driver": gpu_check.nvidia_smi("driver_version") if not small else None,
        "gpu": gpu_check.nvidia_smi("name,memory.total,clocks.max.sm,power.limit,uuid")
        if not small else None,
        "argv": sys.argv[1:],
    })
    report.notes.extend(NOTES)
    shapes, once, experts = ((SMOKE_SHAPES, SMOKE_ONCE, SMOKE_EXPERTS) if small
                             else (GPU_SHAPES, GPU_ONCE, GPU_EXPERTS))
    variant, expert_variant = ("tiny-t2v", "tiny-t2v-a14b") if small else ("t2v-1.3B",
                                                                            "t2v-A14B")
    with tempfile.TemporaryDirectory(prefix="wantel-gpu-check2-") as tmp:
        base = Path(tmp)
        overhead_log = base / "overhead"
        emitter = Emitter(LocalLog(overhead_log), worker=WORKER)
        clock: overhead.HostClock | overhead.CudaClock = (
            overhead.HostClock() if small else overhead.CudaClock(device))
        ctx = gpu_check.Context(pipe=pipe, workload=workload, device=device, clock=clock,
                                emitter=emitter, log_dir=overhead_log, small=small, dtype=dtype)
        gpu_check.warm_up(ctx, report)
        gpu_check.sync_section(ctx, report)
        progress(f"{rounds} overhead rounds")
        overhead_section(ctx, report, rounds)
        logs = [Log(name, base / name, Emitter(LocalLog(base / name), worker=WORKER))
                for name in ("eta", "experts")]
        eta_log, experts_log = logs
        corpus = corpus_pipeline(ctx)
        report.sections["config"]["corpus_text_encoder_params"] = overhead.parameter_count(
            corpus.text_encoder)
        runs = corpus_section(ctx, report, eta_log, corpus, shapes=shapes, once=once,
                              variant=variant, sampler_interval=0.2 if small else 1.0)
        runs += experts_section(ctx, report, experts_log, corpus, shape=experts,
                                layers=args.expert_layers, variant=expert_variant)
        eta_eval_section(ctx, report, logs, runs)
        vram_section(ctx, report, logs, runs)
        side = 64 if small else args.oom_size
        capped = Shape("1280x720x5 s1 no-cfg", 720, 1280, 5, 1, 1.0) if not small else \
            Shape("64x48x5 s1 no-cfg", 48, 64, 5, 1, 1.0)
        oom_section(ctx, report, eta_log, corpus, fitting=shapes[0], variant=variant, cases=(
            OomCase(f"{side}x{side}, whole card", Shape(f"{side}x{side}x5 s1 no-cfg", side,
                                                        side, 5, 1, 1.0), None),
            OomCase(f"{capped.width}x{capped.height}, cap {args.oom_fraction:g}", capped,
                    args.oom_fraction)))
        identity_section(ctx, report, eta_log, args.out, jobs=len(
            [r for r in runs if r.log == "eta"]) + 1)
        emitter_section(report, [Log("overhead", overhead_log, emitter), *logs])
        with tarfile.open(args.out / "wantel-logs.tar.gz", "w:gz") as archive:
            for log in logs:
                archive.add(log.path, arcname=log.name)
    report.save()
    print(table(report))
    progress(f"total {time.monotonic() - report.started:.0f} s; results in {args.out}")
    return 1 if any(r.result == "FAIL" for r in report.rows) else 0


NOTES: Final = (
    "overhead: medians of per-round paired differences (plain / wantel, order alternating);",
    "  [..] a bootstrap 90 % interval over rounds; '?' = the interval straddles the goal.",
    "(verdict) in parentheses: shown, not judged (--cpu-smoke: the goals are the GPU's).",
    "sync: 'declared_sync' is the latents' finite check before the decode, wantel's one",
    "  intended synchronisation (the decode waits for the device anyway); every other entry",
    "  point runs under set_sync_debug_mode('error').",
    "eta: the real `wantel eta eval`; online = never fitted, each job scored from the jobs",
    "  before it; held-out = fitted on half the jobs by id, scored on the rest.",
    "vram: the memory projection's prediction when each job started (online: the prior",
    "  calibrated by the jobs before it) vs torch.cuda.max_memory_allocated for the job.",
    "oom: on a CPU the out-of-memory error is raised in place of the decode (simulated).",
)


if __name__ == "__main__":
    sys.exit(main())
