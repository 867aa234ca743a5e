"""What wantel costs a Wan pipeline: added wall time per denoising step, and caller-thread time.

Run ``python benchmarks/overhead.py`` (about a minute on one CPU thread), ``--quick`` (7 rounds),
``--rounds N``, ``--json OUT``. On a GPU: ``--device cuda --wan13b`` (about 3-5 minutes on one
H100; it refuses to start without CUDA).

Workload. CPU: the tiny Wan 2.1 T2V pipeline (``inference.tiny_models``, real diffusers classes,
random weights) at 64×64, 17 frames, 8 steps, classifier-free guidance (2 transformer passes a
step), ``torch.set_num_threads(1)``. GPU (``--wan13b``): a real ``WanPipeline`` whose transformer
has the Wan 2.1 T2V-1.3B shape (30 layers, 12×128 heads, ffn 8960; bf16, random weights, built
directly on the GPU), the default ``AutoencoderKLWan`` (the real Wan 2.1 VAE shape, fp32, random
weights) and a small UMT5 text encoder whose width is the real 4096 (so the transformer's text
projection runs at its real shape) but with 2 layers, 2 heads and a 256-wide FFN (about 12M
parameters, 23 MB in bf16). The real 5.7B-parameter UMT5-XXL would cost about 11 GB and a load
from the Hub, and runs once per call, outside the denoising loop this benchmark is about; the
only effect of the stand-in is a slightly pessimistic per-call row (a real call is longer).
480×832, 33 frames, 8 steps by default.

Rounds. Everything runs in one process. After a warm-up, each round runs the pipeline three
ways, in an order that rotates from round to round so drift hits all three alike:

``plain``
    the pipeline alone;
``wantel``
    inside ``with instrument(pipe, emitter=emitter, job=...)``, the emitter shared across rounds
    and writing to a real :class:`~telemetry.log.local.LocalLog` (fsync ``always``) in a
    temporary directory — what a user runs;
``probed``
    the same, with timers around each of wantel's entry points on the inference thread (the
    transformers' forward pre-hooks, the step-end callback, the stage wrappers, the
    ``set_timesteps`` hook, the VAE decoder's forward hook, and ``pipe(...)``'s own wrapper
    minus the pipeline inside it). Its wall
    times are not used; its timers give the *measured* caller-thread cost. On CUDA these runs
    also switch ``torch.cuda.set_sync_debug_mode("error")`` on inside wantel's code and off
    inside the pipeline's: diffusers itself synchronises (the text encoder's sequence lengths,
    the decoded video's copy to the host), so a process-wide "error" would stop the plain
    pipeline; scoped this way, any synchronising call *made by wantel* raises and the benchmark
    fails, naming it.

What is reported:

* wall per step: a step is the time from one ``scheduler.step`` returning to the next (probes
  installed identically in all modes, outside wantel's own wrappers), so it holds wantel's
  step-end callback and the next step's forward passes with their pre-hooks; on CUDA the marks
  are CUDA events: device time. Each call gives its median step; added = the median over rounds
  of (wantel − plain) of the same round, which cancels the machine's drift between rounds, as a
  ratio of the plain median; goal ≤ 2 % (CPU), ≤ 0.5 % (CUDA). Also shown:
  the whole denoising loop (end of ``prepare_latents`` to the start of ``vae.decode``) and the
  whole ``pipe(...)`` (host clock, after a device synchronise on CUDA), each as the median of
  paired per-round differences. Every added figure has a 90 % bootstrap interval over rounds; a
  ``?`` after PASS/MISS means the interval straddles the goal (the machine was too noisy to
  decide).
* caller-thread cost per step, measured: the per-step entry points' time (forward pre-hooks +
  step-end callback, including the recorder's memory reading and ``emit``) ÷ steps, minus the
  timer's own cost; the mean (judged, goal ≤ 30 µs) and the median step. The mean also holds the
  time the emitter's thread held the GIL while the callback ran; the median mostly does not.
  The same cost computed as wantel − plain (wall per step) is shown too: it also contains what
  the timers cannot see (torch's slower dispatch of a module with hooks, diffusers building the
  callback's arguments, the emitter's thread taking the GIL or a core) and the noise.
* fixed per-job cost on the caller's thread, measured (``JobStarted``, stage wrappers, the CPU
  copy of the schedule, the VAE decoder's forward hook that records the decode's pieces,
  ``pipe(...)``'s argument binding), per call.
* events per step (``StepEnded`` + per-step ``MemorySampled``) and per call, read back from the
  log; events dropped by the emitter (must be 0).

The pipeline builders are plain functions (:func:`build_tiny`, :func:`build_wan13b_pipeline`) so
other scripts (a GPU check) can import them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import itertools
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import torch

from inference import instrument as instrument_module
from inference.instrument import instrument
from inference.tiny_models import _cast, _scheduler, _tokenizer, _tokenizer_vocab
from telemetry.emitter import Emitter
from telemetry.events import Event, MemorySampled, StepEnded
from telemetry.log.base import Batch
from telemetry.log.local import LocalLog

CPU_GOAL_RATIO: Final = 0.02
CUDA_GOAL_RATIO: Final = 0.005
GOAL_STEP_US: Final = 30.0

PROMPT: Final = "a cat dancing in the rain, cinematic, high quality"
NEGATIVE_PROMPT: Final = "blurry, low quality, static"

#: Wan 2.1 T2V-1.3B (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``, transformer/config.json).
WAN13B_TRANSFORMER: Final[dict[str, Any]] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}


@dataclass(frozen=True)
class Workload:
    """One generation request."""

    height: int
    width: int
    num_frames: int
    steps: int
    guidance_scale: float = 5.0

    def kwargs(self) -> dict[str, Any]:
        return {
            "prompt": PROMPT,
            "negative_prompt": NEGATIVE_PROMPT,
            "height": self.height,
            "width": self.width,
            "num_frames": self.num_frames,
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "output_type": "np",
        }


CPU_WORKLOAD: Final = Workload(height=64, width=64, num_frames=17, steps=8)
WAN13B_WORKLOAD: Final = Workload(height=480, width=832, num_frames=33, steps=8)


# -- pipelines (importable) -------------------------------------------------------------------


def build_tiny(device: str = "cpu", *, name: str = "tiny-t2v", seed: int = 0) -> Any:
    """The tiny pipeline of ``inference.tiny_models``, on ``device``."""
    from inference.tiny_models import build_tiny_pipeline

    return build_tiny_pipeline(name, seed=seed).to(device)


def build_wan13b_transformer(device: str | torch.device = "cuda", *,
                             dtype: torch.dtype = torch.bfloat16, **overrides: Any) -> Any:
    """A ``WanTransformer3DModel`` with the Wan 2.1 T2V-1.3B shape and random weights.

    Built directly on ``device`` (no host copy of 1.4B parameters), then cast to ``dtype`` the
    way ``from_pretrained(torch_dtype=...)`` does: ``_keep_in_fp32_modules`` stay fp32.
    ``overrides`` change config entries (a CPU smoke test uses ``num_layers=1``).
    """
    from diffusers import WanTransformer3DModel

    with torch.device(device):
        model = WanTransformer3DModel(**{**WAN13B_TRANSFORMER, **overrides})
    return _cast(model, dtype).eval().requires_grad_(False)


def build_wide_text_encoder(device: str | torch.device = "cuda", *,
                            dtype: torch.dtype = torch.bfloat16, d_model: int = 4096) -> Any:
    """A 2-layer ``UMT5EncoderModel`` of width ``d_model`` (about 11M parameters at 4096)."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=len(_tokenizer_vocab()), d_model=d_model, d_kv=64, d_ff=256, num_layers=2,
        num_heads=2, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    with torch.device(device):
        model = UMT5EncoderModel(config)
    return model.to(dtype).eval().requires_grad_(False)


def build_wan_vae(device: str | torch.device = "cuda", *, dtype: torch.dtype = torch.float32,
                  **overrides: Any) -> Any:
    """``AutoencoderKLWan`` with its default (Wan 2.1) config and random weights."""
    from diffusers import AutoencoderKLWan

    with torch.device(device):
        vae = AutoencoderKLWan(**overrides)
    return _cast(vae, dtype).eval().requires_grad_(False)


def build_wan13b_pipeline(device: str | torch.device = "cuda", *,
                          dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                          transformer_overrides: dict[str, Any] | None = None,
                          vae_overrides: dict[str, Any] | None = None) -> Any:
    """A real ``WanPipeline`` with a 1.3B-shaped transformer (see the module notes)."""
    from diffusers import WanPipeline

    target = torch.device(device)
    cuda_devices = []
    if target.type == "cuda":
        cuda_devices = [target.index if target.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        transformer = build_wan13b_transformer(device, dtype=dtype,
                                               **(transformer_overrides or {}))
        text_encoder = build_wide_text_encoder(
            device, dtype=dtype, d_model=transformer.config.text_dim)
        vae = build_wan_vae(device, **(vae_overrides or {}))
    pipe = WanPipeline(tokenizer=_tokenizer(), text_encoder=text_encoder, vae=vae,
                       scheduler=_scheduler(), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_count(module: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in module.parameters())


# -- clocks and probes ------------------------------------------------------------------------


class HostClock:
    """Marks on the host's performance counter (the device clock on CPU)."""

    def mark(self) -> int:
        return time.perf_counter_ns()

    def seconds(self, start: Any, end: Any) -> float:
        return float(end - start) / 1e9

    def synchronize(self) -> None:
        """Nothing to wait for."""


class CudaClock:
    """Marks are CUDA events, read after the call (the pipeline ends with a copy to the host)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mark(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def seconds(self, start: Any, end: Any) -> float:
        end.synchronize()
        return float(start.elapsed_time(end)) / 1e3

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


@contextlib.contextmanager
def _attribute(owner: Any, name: str, value: Any) -> Iterator[None]:
    """Set an instance attribute for the block, then restore exactly what was there."""
    missing = object()
    previous = owner.__dict__.get(name, missing)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if previous is missing:
            with contextlib.suppress(AttributeError):
                delattr(owner, name)
        else:
            setattr(owner, name, previous)


@contextlib.contextmanager
def step_probes(pipe: Any, clock: HostClock | CudaClock) -> Iterator[dict[str, Any]]:
    """Marks installed identically in every mode, outermost (over wantel's own wrappers).

    ``start``: the end of ``prepare_latents``; ``steps``: the end of each ``scheduler.step``
    (so consecutive marks enclose one whole step: wantel's step-end callback, the next step's
    forward passes with their pre-hooks, and its scheduler step); ``end``: the start of
    ``vae.decode``.
    """
    marks: dict[str, Any] = {"steps": []}
    steps: list[Any] = marks["steps"]
    prepare, decode, step = pipe.prepare_latents, pipe.vae.decode, pipe.scheduler.step

    def prepare_latents(*args: Any, **kwargs: Any) -> Any:
        result = prepare(*args, **kwargs)
        marks["start"] = clock.mark()
        return result

    def scheduler_step(*args: Any, **kwargs: Any) -> Any:
        result = step(*args, **kwargs)
        steps.append(clock.mark())
        return result

    def vae_decode(*args: Any, **kwargs: Any) -> Any:
        marks.setdefault("end", clock.mark())
        return decode(*args, **kwargs)

    with _attribute(pipe, "prepare_latents", prepare_latents), \
            _attribute(pipe.scheduler, "step", scheduler_step), \
            _attribute(pipe.vae, "decode", vae_decode):
        yield marks


class SyncScope:
    """``set_sync_debug_mode("error")`` inside wantel's code, the previous mode outside it."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._stack: list[Any] = []

    def enter(self, wantel: bool) -> None:
        if self.enabled:
            self._stack.append(torch.cuda.get_sync_debug_mode())
            torch.cuda.set_sync_debug_mode("error" if wantel else "default")

    def exit(self) -> None:
        if self.enabled:
            torch.cuda.set_sync_debug_mode(self._stack.pop())


@dataclass
class HookMeter:
    """Accumulated caller-thread time in wantel's entry points, in ns, by region."""

    scope: SyncScope = field(default_factory=lambda: SyncScope(False))
    ns: Counter[str] = field(default_factory=Counter)
    calls: Counter[str] = field(default_factory=Counter)
    samples: dict[str, list[int]] = field(default_factory=dict)  # per call, for sampled regions
    region_cost_ns: int = 0

    def timed(self, region: str, fn: Callable[..., Any], *, wantel: bool = True,
              sampled: bool = False) -> Any:
        """``fn`` wrapped so its time adds to ``region`` (keeping its signature).

        ``wantel``: ``fn`` is wantel's code (sync checking on inside it, and the switching done
        outside the timed region); else it is the pipeline's code called from inside wantel's
        (its switching is counted with it, so that it comes off the enclosing region).
        ``sampled`` also keeps each call's time, for medians.
        """
        clock = time.perf_counter_ns
        ns, calls, scope = self.ns, self.calls, self.scope
        samples = self.samples.setdefault(region, []) if sampled else None

        if wantel:

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                scope.enter(True)
                start = clock()
                try:
                    return fn(*args, **kwargs)
                finally:
                    elapsed = clock() - start
                    ns[region] += elapsed
                    calls[region] += 1
                    if samples is not None:
                        samples.append(elapsed)
                    scope.exit()

            return wrapper

        @functools.wraps(fn)
        def foreign(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            scope.enter(False)
            try:
                return fn(*args, **kwargs)
            finally:
                scope.exit()
                ns[region] += clock() - start
                calls[region] += 1

        return foreign

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Patch ``inference.instrument._Session`` for the block (before ``instrument()``)."""
        session = instrument_module._Session
        originals = {name: session.__dict__[name] for name in (
            "_pre_forward_hook", "_on_step_end", "_schedule_on_cpu", "call", "_wrap",
            "_decoder_hook")}
        meter = self

        def pre_forward_hook(self: Any, expert: Any) -> Any:
            return meter.timed("forward_pre_hook", originals["_pre_forward_hook"](self, expert),
                               sampled=True)

        def call(self: Any, original: Any, pipe: Any, args: Any, kwargs: Any) -> Any:
            inner = meter.timed("call_inner", original, wantel=False)
            return meter.timed("call_outer", originals["call"])(self, inner, pipe, args, kwargs)

        def wrap(self: Any, owner: Any, method: str, stage: Any) -> None:
            setattr(owner, method,
                    meter.timed("stage_inner", getattr(owner, method), wantel=False))
            originals["_wrap"](self, owner, method, stage)
            setattr(owner, method, meter.timed("stage_outer", getattr(owner, method)))

        patches = {
            "_pre_forward_hook": pre_forward_hook,
            "_on_step_end": self.timed("step_end", originals["_on_step_end"], sampled=True),
            "_schedule_on_cpu": self.timed("schedule", originals["_schedule_on_cpu"]),
            # Runs inside the decode (the pipeline's time, stage_inner): its own region.
            "_decoder_hook": self.timed("decoder_hook", originals["_decoder_hook"]),
            "call": call,
            "_wrap": wrap,
        }
        # The one synchronisation wantel makes on purpose, once a job (see inference.instrument:
        # the latents' finite check before the decode, which waits for the device anyway):
        # counted as "declared_sync", run under the pipeline's mode, so that it is not mistaken
        # for an accidental one and every other entry point stays checked.
        finite = instrument_module._check_finite
        try:
            for name, patch in patches.items():
                setattr(session, name, patch)
            instrument_module._check_finite = self.timed("declared_sync", finite, wantel=False)
            yield
        finally:
            for name, original in originals.items():
                setattr(session, name, original)
            instrument_module._check_finite = finite

    def calibrate(self, samples: int = 20_001) -> None:
        """The median cost of an empty timed region (two clock reads and a call layer)."""
        timed = self.timed("calibration", lambda: None)
        costs = []
        clock = time.perf_counter_ns
        for _ in range(samples):
            before = self.ns["calibration"]
            timed()
            costs.append(self.ns["calibration"] - before)
            clock()
        self.region_cost_ns = int(statistics.median(costs))
        del self.ns["calibration"], self.calls["calibration"]

    def net(self, region: str) -> int:
        """Time in ``region`` minus the timer's own cost."""
        return max(0, self.ns[region] - self.calls[region] * self.region_cost_ns)

    def median_net(self, region: str) -> float:
        """The median single call of a sampled region, minus the timer's own cost."""
        values = self.samples.get(region)
        if not values:
            return 0.0
        return max(0.0, statistics.median(values) - self.region_cost_ns)

    def clear(self) -> None:
        self.ns.clear()
        self.calls.clear()
        for values in self.samples.values():
            values.clear()

    def per_step_ns(self) -> int:
        return self.net("forward_pre_hook") + self.net("step_end")

    def per_job_ns(self) -> int:
        # an outer region also holds the inner region's timer: two timer costs per outer call
        # the declared sync's time is the device's (waiting for the loop), not wantel's work
        outer = (self.ns["call_outer"] - self.ns["call_inner"]
                 + self.ns["stage_outer"] - self.ns["stage_inner"] - self.ns["declared_sync"])
        return max(0, outer - 2 * (self.calls["call_outer"] + self.calls["stage_outer"])
                   * self.region_cost_ns) + self.net("schedule") + self.net("decoder_hook")


# -- the measurement --------------------------------------------------------------------------


@dataclass
class Run:
    """One call's times."""

    mode: str
    round: int
    call_s: float
    loop_s: float  # the denoising loop
    steps_s: list[float]  # each step after the first (scheduler.step end to the next one's)


@dataclass
class Config:
    """What was run."""

    model: str
    device: str
    height: int
    width: int
    num_frames: int
    steps: int
    guidance_scale: float
    rounds: int
    warmup: int
    torch_threads: int
    goal_ratio: float
    goal_step_us: float = GOAL_STEP_US
    torch_version: str = torch.__version__
    python: str = platform.python_version()
    machine: str = platform.machine()


def run_call(pipe: Any, workload: Workload, clock: HostClock | CudaClock, *, mode: str,
             round_index: int, emitter: Emitter | None = None,
             meter: HookMeter | None = None) -> Run:
    """One ``pipe(...)``: plain (no emitter), instrumented, or instrumented with timers."""
    kwargs = workload.kwargs()
    kwargs["generator"] = torch.Generator("cpu").manual_seed(round_index)
    gc.collect()
    with contextlib.ExitStack() as stack:
        if emitter is not None:
            if meter is not None:
                stack.enter_context(meter.installed())
            stack.enter_context(instrument(pipe, emitter=emitter,
                                           job=f"overhead-{mode}-{round_index}"))
        marks = stack.enter_context(step_probes(pipe, clock))
        clock.synchronize()
        start = time.perf_counter_ns()
        pipe(**kwargs)
        clock.synchronize()
        call_s = (time.perf_counter_ns() - start) / 1e9
    steps = marks["steps"]
    if "start" not in marks or "end" not in marks or len(steps) != workload.steps:
        raise RuntimeError("the denoising-loop probes did not fire: is this a WanPipeline?")
    return Run(mode=mode, round=round_index, call_s=call_s,
               loop_s=clock.seconds(marks["start"], marks["end"]),
               steps_s=[clock.seconds(a, b) for a, b in itertools.pairwise(steps)])


def _read_events(path: Path) -> list[Event]:
    log = LocalLog(path, create=False)
    try:
        return [e for item in log.read() if isinstance(item, Batch) for e in item.events]
    finally:
        log.close()


@dataclass
class Estimate:
    """A median difference, wantel − plain, with a bootstrap 90 % interval over rounds."""

    plain: float
    wantel: float
    added: float
    low: float
    high: float

    @property
    def ratio(self) -> float:
        return self.added / self.plain

    def verdict(self, goal: float) -> str:
        """PASS / MISS by the estimate; ``?`` when the interval straddles the goal."""
        result = "PASS" if self.added <= goal else "MISS"
        return result + ("?" if self.low <= goal < self.high else "")


def _paired(rounds: list[tuple[float, float]], *, resamples: int = 2000,
            seed: int = 0) -> Estimate:
    """The median of per-round differences (wantel − plain), bootstrapped over rounds."""
    def estimate(sample: list[tuple[float, float]]) -> float:
        return statistics.median(wantel - plain for plain, wantel in sample)

    rng = random.Random(seed)
    spread = sorted(estimate([rng.choice(rounds) for _ in rounds]) for _ in range(resamples))
    return Estimate(plain=statistics.median(p for p, _ in rounds),
                    wantel=statistics.median(w for _, w in rounds), added=estimate(rounds),
                    low=spread[int(0.05 * resamples)], high=spread[int(0.95 * resamples) - 1])


@dataclass
class Result:
    """Everything reported (times in µs unless named otherwise)."""

    config: Config
    runs: list[Run]
    step_us: Estimate
    loop_ms: Estimate
    call_ms: Estimate
    hook_step_us: float
    hook_step_median_us: float
    hook_step_detail_us: dict[str, float]
    hook_job_us: float
    timer_region_ns: int
    events_per_step: float
    events_per_call: float
    dropped: dict[str, int]
    sync_checked: bool


def measure(pipe: Any, workload: Workload, config: Config, *,
            clock: HostClock | CudaClock, sync_check: bool,
            progress: Callable[[str], None] = lambda _: None) -> Result:
    """Warm up, run ``config.rounds`` rounds of plain / wantel / probed, and summarise."""
    meter = HookMeter(scope=SyncScope(sync_check))
    meter.calibrate()
    runs: list[Run] = []
    modes = ("plain", "wantel", "probed")
    with tempfile.TemporaryDirectory(prefix="wantel-overhead-") as tmp:
        log_dir = Path(tmp) / "log"
        emitter = Emitter(LocalLog(log_dir), worker="overhead-bench")
        warm_start = time.monotonic()
        for index in range(config.warmup):
            for mode in modes:
                run_call(pipe, workload, clock, mode=f"warmup-{mode}", round_index=-1 - index,
                         emitter=None if mode == "plain" else emitter,
                         meter=meter if mode == "probed" else None)
        per_round = (time.monotonic() - warm_start) / max(1, config.warmup)
        progress(f"warm-up done ({per_round:.1f} s a round); about "
                 f"{per_round * config.rounds:.0f} s for {config.rounds} rounds")
        meter.clear()
        for index in range(config.rounds):
            order = modes[index % 3:] + modes[:index % 3]
            for mode in order:
                runs.append(run_call(pipe, workload, clock, mode=mode, round_index=index,
                                     emitter=None if mode == "plain" else emitter,
                                     meter=meter if mode == "probed" else None))
        emitter.close()
        stats = emitter.stats()
        events = _read_events(log_dir)

    steps = workload.steps
    by_mode: dict[str, dict[int, Run]] = {m: {} for m in modes}
    for run in runs:
        by_mode[run.mode][run.round] = run
    pairs = [(by_mode["plain"][i], by_mode["wantel"][i]) for i in range(config.rounds)]
    step_us = _paired([(statistics.median(p.steps_s) * 1e6, statistics.median(w.steps_s) * 1e6)
                       for p, w in pairs])
    loop_ms = _paired([(p.loop_s * 1e3, w.loop_s * 1e3) for p, w in pairs])
    call_ms = _paired([(p.call_s * 1e3, w.call_s * 1e3) for p, w in pairs])

    measured_steps = config.rounds * steps
    passes = meter.calls["forward_pre_hook"] / max(1, meter.calls["step_end"])
    wantel_jobs = {f"overhead-wantel-{i}" for i in range(config.rounds)}
    per_job = Counter(e.job for e in events if e.job in wantel_jobs)
    per_step = Counter(e.job for e in events if e.job in wantel_jobs and (
        isinstance(e, StepEnded) or (isinstance(e, MemorySampled) and e.step is not None)))
    return Result(
        config=config, runs=runs, step_us=step_us, loop_ms=loop_ms, call_ms=call_ms,
        hook_step_us=meter.per_step_ns() / measured_steps / 1e3,
        hook_step_median_us=(meter.median_net("step_end")
                             + passes * meter.median_net("forward_pre_hook")) / 1e3,
        hook_step_detail_us={region: meter.net(region) / measured_steps / 1e3
                             for region in ("forward_pre_hook", "step_end")},
        hook_job_us=meter.per_job_ns() / config.rounds / 1e3,
        timer_region_ns=meter.region_cost_ns,
        events_per_step=sum(per_step.values()) / (len(wantel_jobs) * steps),
        events_per_call=sum(per_job.values()) / len(wantel_jobs),
        dropped=dict(stats.dropped),
        sync_checked=sync_check,
    )


# -- reporting --------------------------------------------------------------------------------


def _number(value: float, unit: str) -> str:
    """Four significant digits or so, to fit the column."""
    digits = 3 if abs(value) < 10 else 2 if abs(value) < 100 else 1 if abs(value) < 1000 else 0
    return f"{value:.{digits}f} {unit}"


def table(result: Result) -> str:
    """The report, as printed."""
    c = result.config
    goal_pct = f"≤ {c.goal_ratio * 100:g} %"
    goal_us = f"≤ {c.goal_step_us:g} µs"
    lines = [
        f"wantel overhead: {c.model} on {c.device}, {c.width}×{c.height}, {c.num_frames} frames, "
        f"{c.steps} steps, CFG {c.guidance_scale:g}, torch threads {c.torch_threads}; "
        f"{c.rounds} rounds after {c.warmup} warm-up",
        "",
        f"{'metric':<46}{'plain':>11}{'wantel':>11}  {'added [90% interval]':<34}"
        f"{'goal':>9}  result",
    ]

    def row(*cells: str) -> None:
        metric, plain, wantel, added, goal, result = cells
        lines.append(f"{metric:<46}{plain:>11}{wantel:>11}  {added:<34}{goal:>9}  {result}")

    def ratio_row(metric: str, e: Estimate, unit: str, scale: float) -> None:
        pct = 100 / e.plain
        row(metric, _number(e.plain * scale, unit), _number(e.wantel * scale, unit),
            f"{e.added * pct:+.2f} % [{e.low * pct:+.2f}, {e.high * pct:+.2f}]", goal_pct,
            e.verdict(c.goal_ratio * e.plain))

    step = result.step_us
    ratio_row("wall per step (paired median)", step, "ms", 1e-3)
    ratio_row("wall per denoising loop (paired median)", result.loop_ms, "ms", 1)
    ratio_row("wall per call (paired median)", result.call_ms, "ms", 1)
    row("caller-thread cost per step, wantel − plain", "", "",
        f"{step.added:+.1f} µs [{step.low:+.1f}, {step.high:+.1f}]", goal_us,
        step.verdict(c.goal_step_us))
    hooks = result.hook_step_detail_us
    row("caller-thread cost per step, measured (mean)", "", "", f"{result.hook_step_us:.1f} µs",
        goal_us, "PASS" if result.hook_step_us <= c.goal_step_us else "MISS")
    row("  forward pre-hooks (all passes of a step)", "", "",
        f"{hooks['forward_pre_hook']:.1f} µs", "", "")
    row("  step-end callback", "", "", f"{hooks['step_end']:.1f} µs", "", "")
    row("  median step, measured", "", "", f"{result.hook_step_median_us:.1f} µs", "", "")
    row("fixed caller-thread cost per call, measured", "", "", f"{result.hook_job_us:.0f} µs",
        "", "")
    row("events per step (StepEnded + MemorySampled)", "", f"{result.events_per_step:.2f}", "",
        "", "")
    row("events per call", "", f"{result.events_per_call:.1f}", "", "", "")
    dropped = sum(result.dropped.values())
    row("events dropped by the emitter", "", f"{dropped}", "", "0",
        "PASS" if dropped == 0 else "MISS")
    lines += [
        "",
        "wall: medians of per-round paired differences (per step: of each call's median step "
        "after the",
        "first); [90% interval] bootstraps the rounds; '?' = the interval straddles the goal.",
        "wantel − plain also holds torch's dispatch of hooked modules and diffusers' callback "
        "plumbing.",
        "measured = perf_counter_ns around wantel's entry points on the inference thread, in "
        "separate",
        f"'probed' rounds, minus {result.timer_region_ns} ns of timer cost per region; the mean "
        "includes time the",
        "emitter's thread held the GIL meanwhile, the median step mostly does not.",
    ]
    if result.sync_checked:
        lines.append("sync check: wantel's code ran under torch.cuda.set_sync_debug_mode('error')"
                     " in the probed rounds; no synchronising call.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=None,
                        help="measured rounds (default 21 on CPU, 7 with --quick or --wan13b)")
    parser.add_argument("--quick", action="store_true", help="7 rounds, 1 warm-up")
    parser.add_argument("--json", metavar="OUT", type=Path, help="also write the results here")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--wan13b", action="store_true",
                        help="the Wan 2.1 T2V-1.3B-shaped pipeline (needs --device cuda)")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--frames", type=int)
    parser.add_argument("--steps", type=int)
    args = parser.parse_args(argv)

    if args.wan13b and args.device != "cuda":
        parser.error("--wan13b runs on a GPU: add --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"error: --device cuda needs a CUDA GPU, and torch.cuda.is_available() is False "
              f"here (torch {torch.__version__}); run the CPU mode without --device",
              file=sys.stderr)
        return 2
    rounds = args.rounds or (7 if (args.quick or args.wan13b) else 21)
    if rounds < 7:
        parser.error("--rounds must be at least 7 (medians of fewer are not worth reporting)")
    warmup = 1 if (args.quick or args.wan13b) else 2
    base = WAN13B_WORKLOAD if args.wan13b else CPU_WORKLOAD
    workload = Workload(height=args.height or base.height, width=args.width or base.width,
                        num_frames=args.frames or base.num_frames,
                        steps=args.steps or base.steps)

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.device == "cpu":
        torch.set_num_threads(1)
    device = torch.device(args.device)
    clock: HostClock | CudaClock = CudaClock(device) if device.type == "cuda" else HostClock()
    started = time.monotonic()
    if args.wan13b:
        pipe = build_wan13b_pipeline(device)
        model = (f"Wan2.1-T2V-1.3B-shaped WanPipeline "
                 f"({parameter_count(pipe.transformer) / 1e9:.2f}B params, bf16, random)")
    else:
        pipe = build_tiny(args.device)
        model = "tiny-t2v WanPipeline (inference.tiny_models, random)"
    progress(f"built {model} in {time.monotonic() - started:.1f} s")
    config = Config(
        model=model, device=torch.cuda.get_device_name(device) if device.type == "cuda" else
        (platform.processor() or platform.machine()),
        height=workload.height, width=workload.width, num_frames=workload.num_frames,
        steps=workload.steps, guidance_scale=workload.guidance_scale, rounds=rounds,
        warmup=warmup, torch_threads=torch.get_num_threads(),
        goal_ratio=CUDA_GOAL_RATIO if device.type == "cuda" else CPU_GOAL_RATIO)
    try:
        result = measure(pipe, workload, config, clock=clock,
                         sync_check=device.type == "cuda", progress=progress)
    except RuntimeError as exc:
        if "synchroniz" in str(exc).lower():
            print(f"FAIL: a synchronising CUDA call inside wantel's code: {exc}",
                  file=sys.stderr)
            return 1
        raise
    print(table(result))
    progress(f"total {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
