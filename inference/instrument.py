"""Attach wantel to a diffusers pipeline the caller built; their ``pipe(...)`` stays unchanged.

::

    with instrument(pipe, log=LocalLog("wantel-log")) as telemetry:
        video = pipe(prompt=..., num_frames=81)      # a job: every stage and step recorded
    telemetry.job                                    # its id

What is hooked, and why there (diffusers facts, checked on 0.42):

* ``pipe(...)`` itself — through a subclass swapped in for the context (a special method cannot
  be overridden per instance) — for the job's lifecycle, its request, and to inject
  ``callback_on_step_end``, which runs once per step after the transformer passes and the
  scheduler step. A caller's own callback still runs, after ours.
* forward pre-hooks on ``transformer`` / ``transformer_2`` (or a UNet's ``unet``): the first
  pass of a step marks its start and tells which expert runs it; the count of passes is 2 with
  classifier-free guidance where the pipeline runs cond and uncond apart (Wan), 1 where it
  batches them (CogVideoX, Stable Diffusion).
* ``encode_prompt``, ``encode_image``, ``prepare_latents``, ``vae.decode`` and
  ``video_processor.postprocess_video`` (an image pipeline's ``image_processor.postprocess``),
  wrapped as instance attributes: torch hooks never fire on ``pipe.vae`` (the pipeline calls
  ``decode``, not ``forward``). Any diffusers pipeline with a denoising loop and
  ``callback_on_step_end`` has most of these: the stages it lacks are simply not recorded.
* ``scheduler.set_timesteps``: a CPU copy of the schedule is computed from the scheduler's
  config, so each step's timestep and sigma are known without reading a device tensor.

Nothing here synchronises the device (see :mod:`inference.timing`) but one check, once per
job, that the latents about to be decoded are finite (the decode waits for the device anyway):
NaN or infinite latents fail the job as ``numerical`` (:class:`~inference.failures.
NonFiniteLatents`) instead of decoding a black video. Nothing else changes what the pipeline
computes. Leaving the context restores the pipeline exactly.

Job ids. A job id the log already holds would make a second job whose events every view drops
as duplicates (their ``(job, seq)`` are the first job's), so ``instrument(job="X")`` raises
:class:`JobIdInUse` (a ``ValueError``) when entered, before the pipeline runs, if ``X`` is
in the log or in this process's emitter; the later calls of one context, which wantel names
``X-2``, ``X-3``…, take the next free number instead. A reserved or unencodable id (see
:func:`telemetry.events.job_id_problem`) is a ``ValueError`` too. Random ids (no ``job=``)
are never looked up. The lookup reads the log (a byte search of its segments, ~GB/s);
``check_job=False`` skips it where ids are unique by construction.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import torch

from inference.failures import NonFiniteLatents
from inference.memory import MemoryReader
from inference.pieces import decoder_calls
from inference.progress import EventTap, LiveView, Progress
from inference.recorder import JobRecorder
from inference.speed_options import each_module, speed_options
from inference.timing import timer_for
from telemetry.control import CancelChannel, channel_of
from telemetry.emitter import Emitter, process_emitter
from telemetry.ship import process_shipper

if TYPE_CHECKING:
    from telemetry.log.nats import NatsOptions
from telemetry.events import DeviceInfo, Expert, Stage, job_id_problem
from telemetry.log.base import EventLog
from telemetry.pipelines import classify_pipeline
from telemetry.wan import width_of

#: Pipeline attributes wrapped as stages: (path to the object, method, stage).
STAGE_METHODS: Final[tuple[tuple[str, str, Stage], ...]] = (
    ("", "encode_prompt", "text_encode"),
    ("", "encode_image", "image_encode"),
    ("", "prepare_latents", "latent_init"),
    ("vae", "decode", "decode"),
    ("video_processor", "postprocess_video", "postprocess"),
    # An image pipeline's (Stable Diffusion, Flux, PixArt…): wrapped only where the pipeline
    # has no video processor (Wan's I2V ``image_processor`` is CLIP's, which has none).
    ("image_processor", "postprocess", "postprocess"),
)
#: The denoiser modules whose forward passes mark a step: a DiT (``transformer``, and Wan 2.2
#: A14B's ``transformer_2``) or a UNet (Stable Diffusion, AnimateDiff…).
DENOISERS: Final = ("transformer", "unet")


_ABSENT: Final = object()  # "no instance attribute was there before we wrapped"


#: ``JobCancelled.reason`` of a job stopped by ``POST /api/jobs/{id}/cancel``.
REQUESTED: Final = "requested"


class JobCancelledError(Exception):
    """Raised out of ``pipe(...)`` when :meth:`Instrumented.cancel`, or a cancel requested
    over HTTP (``str(exc)`` is then ``"requested"``), stopped the job."""


class PipelineInUse(RuntimeError):
    """``instrument()`` was entered on a pipeline this thread is already instrumenting."""


#: One lock per pipeline object: concurrent ``instrument()`` contexts on one pipeline run one
#: after the other (see :func:`instrument`). Weak keys: a pipeline's lock goes with it.
_PIPELINE_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_PIPELINE_OWNERS: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_REGISTRY_LOCK: Final = threading.Lock()


@contextlib.contextmanager
def _exclusive(pipe: Any) -> Iterator[None]:
    """Hold ``pipe`` for this thread: another thread waits; this thread again is an error."""
    me = threading.get_ident()
    with _REGISTRY_LOCK:
        lock = _PIPELINE_LOCKS.get(pipe)
        if lock is None:
            lock = _PIPELINE_LOCKS[pipe] = threading.Lock()
        if _PIPELINE_OWNERS.get(pipe) == me:
            raise PipelineInUse(
                f"this thread is already inside instrument() on this {type(pipe).__name__}: "
                "nest the pipe(...) calls in the one context (each call is a job) instead of "
                "entering instrument() again")
    with lock:
        _PIPELINE_OWNERS[pipe] = me
        try:
            yield
        finally:
            _PIPELINE_OWNERS.pop(pipe, None)


class JobIdInUse(ValueError):
    """``instrument(job=...)`` named a job the log (or this process's emitter) already has."""


@dataclass
class _StepState:
    """What the hooks learn during the current step."""

    start: Any = None
    passes: int = 0
    expert: Expert | None = None


@dataclass
class _Pieces:
    """The decode under way: how many pieces it will run in (``None``: not known) and has."""

    total: int | None
    done: int = 0


@dataclass
class Instrumented:
    """The handle ``instrument()`` yields: job ids, the live view, and cancellation."""

    jobs: list[str] = field(default_factory=list)
    _cancel: threading.Event = field(default_factory=threading.Event)
    _reason: str = "cancelled"
    _live: LiveView = field(default_factory=LiveView)

    @property
    def job(self) -> str | None:
        """The id of the latest job run in this context."""
        return self.jobs[-1] if self.jobs else None

    def progress(self, job: str | None = None) -> Progress | None:
        """The job's live view (default: the latest job of this context), folded in-process
        from its own events by wantel's projections: status, stage, step/steps, progress 0–1,
        ETA seconds with p10/p90, steps/s, peak memory (:class:`~inference.progress.Progress`).
        ``None`` before the job started. Safe from any thread; costs a fold of the events
        since the last call (microseconds each)."""
        return self._live.progress(job)

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop the running job at its next step boundary (``JobCancelled``, then it raises)."""
        self._reason = reason
        self._cancel.set()


class _Session:
    """The hooks and wrappers of one ``instrument()`` context."""

    def __init__(
        self,
        pipe: Any,
        emitter: Emitter,
        handle: Instrumented,
        *,
        job: str | None,
        recorder: JobRecorder | None,
        model: str | None,
        variant: str | None,
        traceparent: str | None,
        options: dict[str, Any] | None,
        record_prompt: bool,
        check_job: bool = True,
    ) -> None:
        if "callback_on_step_end" not in inspect.signature(type(pipe).__call__).parameters:
            raise TypeError(
                f"{type(pipe).__name__} has no callback_on_step_end: wantel cannot see its steps"
            )
        self.pipe = pipe
        self.emitter = emitter
        self.handle = handle
        self.job = job
        self.given_recorder = recorder
        self.model = model
        self.variant = variant
        self.traceparent = traceparent
        self.options = options or {}
        self.record_prompt = record_prompt
        self.check_job = check_job
        self.recorder: JobRecorder | None = None
        self.step = _StepState()
        self.previous_expert: Expert | None = None
        self.denoise_start: Any = None
        self.cpu_timesteps: list[float] = []
        self.cpu_sigmas: list[float] = []
        self.secrets: tuple[str, ...] = ()
        self._original_class = type(pipe)
        self._hooks: list[Any] = []
        self._wrapped: list[tuple[Any, str, Any]] = []
        self._calls = 0
        self._given_emitter: Emitter | None = None
        self.recorders: list[JobRecorder] = []
        self._device: torch.device | None = None
        self._readers: dict[str, MemoryReader] = {}
        #: ``POST /api/jobs/{id}/cancel``'s files, where the log is a local directory.
        self.control: CancelChannel | None = channel_of(emitter.log)
        #: Set when a requested cancel was seen: the loop is interrupted, decode is skipped.
        self.cancel_requested = False
        #: The decode under way's pieces (:meth:`_decoder_hook`), else ``None``.
        self.decode_pieces: _Pieces | None = None

    # -- attach / detach ------------------------------------------------------------------

    def attach(self) -> None:
        original = self._original_class
        session = self

        def call(pipe: Any, *args: Any, **kwargs: Any) -> Any:
            return session.call(original.__call__, pipe, args, kwargs)

        instrumented = type(original.__name__, (original,), {
            "__call__": call, "__module__": original.__module__,
            "__qualname__": original.__qualname__, "_wantel_instrumented": True,
        })
        self.pipe.__class__ = instrumented
        for name, expert in self._experts().items():
            module = getattr(self.pipe, name)
            hook = self._pre_forward_hook(expert)
            # Prepended: the step starts before any other hook (offloading, caching) runs.
            self._hooks.append(module.register_forward_pre_hook(hook, prepend=True))
        decoder = getattr(getattr(self.pipe, "vae", None), "decoder", None)
        if isinstance(decoder, torch.nn.Module):
            self._hooks.append(decoder.register_forward_hook(self._decoder_hook))
        has_video_processor = getattr(self.pipe, "video_processor", None) is not None
        for path, method, stage in STAGE_METHODS:
            if path == "image_processor" and has_video_processor:
                continue
            owner = getattr(self.pipe, path, None) if path else self.pipe
            if owner is not None and callable(getattr(owner, method, None)):
                self._wrap(owner, method, stage)
        scheduler = getattr(self.pipe, "scheduler", None)
        if scheduler is not None:
            self._wrap_set_timesteps(scheduler)

    def detach(self) -> None:
        self.pipe.__class__ = self._original_class
        if self.given_recorder is not None and self._given_emitter is not None:
            self.given_recorder.emitter = self._given_emitter
        for hook in self._hooks:
            hook.remove()
        for owner, method, previous in reversed(self._wrapped):
            if previous is _ABSENT:
                with contextlib.suppress(AttributeError):
                    delattr(owner, method)
            else:  # the caller had its own instance-level wrapper: put it back
                setattr(owner, method, previous)
        self._hooks.clear()
        self._wrapped.clear()
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def _experts(self) -> dict[str, Expert | None]:
        """``transformer`` → high_noise and ``transformer_2`` → low_noise when both exist;
        a single denoiser (a transformer, or a UNet) runs every step as no expert."""
        has_second = getattr(self.pipe, "transformer_2", None) is not None
        experts: dict[str, Expert | None] = {}
        for name in DENOISERS:
            if isinstance(getattr(self.pipe, name, None), torch.nn.Module):
                experts[name] = "high_noise" if has_second and name == "transformer" else None
                break
        if has_second:
            experts["transformer_2"] = "low_noise"
        return experts

    def _wrap(self, owner: Any, method: str, stage: Stage) -> None:
        original = getattr(owner, method)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            recorder = self.recorder
            if recorder is None or recorder.stage == stage:
                return original(*args, **kwargs)
            if self.cancel_requested and stage in ("decode", "postprocess"):
                # diffusers' interrupt flag skipped the remaining steps; decoding the
                # half-denoised latents would cost the most of the job for nothing.
                raise JobCancelledError(REQUESTED)
            if stage in ("decode", "postprocess"):
                self._close_denoise(recorder)
            with recorder.stage_span(stage):
                if stage == "decode" and args:
                    _check_finite(args[0])
                    self.decode_pieces = _Pieces(decoder_calls(owner, args[0]))
                try:
                    result = original(*args, **kwargs)
                finally:
                    self.decode_pieces = None
            if stage == "latent_init" and self.denoise_start is None:
                # The loop starts right after the latents exist; a failure before the first
                # transformer pass is then still attributed to the denoise stage.
                self.denoise_start = recorder.stage_started("denoise")
            return result

        self._wrapped.append((owner, method, vars(owner).get(method, _ABSENT)))
        setattr(owner, method, wrapper)  # an instance attribute shadows the class's method

    def _wrap_set_timesteps(self, scheduler: Any) -> None:
        original = scheduler.set_timesteps

        def set_timesteps(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            if self.recorder is not None:
                self._schedule_on_cpu(scheduler, args, kwargs)
            return result

        self._wrapped.append((scheduler, "set_timesteps",
                              vars(scheduler).get("set_timesteps", _ABSENT)))
        scheduler.set_timesteps = set_timesteps

    def _schedule_on_cpu(self, scheduler: Any, args: tuple[Any, ...],
                         kwargs: dict[str, Any]) -> None:
        """The same schedule computed on the CPU, so no step has to read a device tensor."""
        timesteps = scheduler.timesteps
        sigmas = getattr(scheduler, "sigmas", None)
        if timesteps.device.type != "cpu" or (sigmas is not None and sigmas.device.type != "cpu"):
            try:
                scheduler = type(scheduler).from_config(scheduler.config)
                scheduler.set_timesteps(*args, **{**kwargs, "device": "cpu"})
            except Exception:
                self.cpu_timesteps, self.cpu_sigmas = [], []
                return
            timesteps, sigmas = scheduler.timesteps, getattr(scheduler, "sigmas", None)
        # tolist(): one conversion, not a 0-d tensor per element (the same Python floats)
        self.cpu_timesteps = [float(t) for t in timesteps.tolist()]
        self.cpu_sigmas = [float(s) for s in sigmas.tolist()] if sigmas is not None else []
        alphas = getattr(scheduler, "alphas_cumprod", None)
        if sigmas is None and isinstance(alphas, torch.Tensor) and alphas.device.type == "cpu":
            # A DDPM-family scheduler (DDIM: CogVideoX, Stable Diffusion) keeps no sigmas; its
            # noise level at timestep t is sqrt((1 - ᾱ_t) / ᾱ_t), the k-diffusion sigma.
            try:
                cumprod = alphas[timesteps.to("cpu").long()].double()
                self.cpu_sigmas = [float(x) for x in ((1 - cumprod) / cumprod).sqrt().tolist()]
            except (IndexError, RuntimeError):
                self.cpu_sigmas = []

    # -- per step ---------------------------------------------------------------------------

    def _pre_forward_hook(self, expert: Expert | None) -> Callable[[Any, Any], None]:
        def hook(module: Any, args: Any) -> None:
            recorder = self.recorder
            if recorder is None:
                return
            step = self.step
            if step.passes == 0:
                step.start = recorder.timer.mark()
                step.expert = expert
                if self.denoise_start is None:
                    self.denoise_start = recorder.stage_started("denoise")
            step.passes += 1

        return hook

    def _decoder_hook(self, module: Any, args: Any, output: Any) -> None:
        """A piece of the VAE decode finished (:mod:`inference.pieces`): record how many of
        how many, while the count is known and not exceeded."""
        pieces, recorder = self.decode_pieces, self.recorder
        if pieces is None or pieces.total is None or recorder is None:
            return
        pieces.done += 1
        if pieces.done <= pieces.total:
            recorder.stage_progress("decode", pieces.done, pieces.total, recorder.timer.mark())
            recorder.pump()

    def _on_step_end(self, pipe: Any, index: int, total: int) -> None:
        recorder = self.recorder
        if recorder is None:
            return
        end = recorder.timer.mark()
        step, self.step = self.step, _StepState()
        if step.expert is not None and self.previous_expert not in (None, step.expert):
            recorder.expert_switched(step=index, mark=step.start or end,
                                     old=self.previous_expert,
                                     new=step.expert)
        self.previous_expert = step.expert or self.previous_expert
        recorder.step_ended(
            step=index, total_steps=total, start=step.start if step.start is not None else end,
            end=end, timestep=_at(self.cpu_timesteps, index), sigma=_at(self.cpu_sigmas, index),
            expert=step.expert, passes=step.passes)
        if index == total - 1:
            self._close_denoise(recorder, end)
        recorder.pump()

    def _check_cancelled(self) -> None:
        if self.handle._cancel.is_set():
            raise JobCancelledError(self.handle._reason)

    def _check_requested(self, pipe: Any, job: str) -> None:
        """A cancel requested over HTTP (the control channel): stop through diffusers' own
        interrupt flag, which skips the remaining steps; the decode wrapper then ends the job.
        Never raises for a channel it cannot read (telemetry never breaks a generation)."""
        if self.control is None or self.cancel_requested:
            return
        try:
            notice = self.control.pending(job)
        except Exception:
            return
        if notice is not None:
            self.cancel_requested = True
            pipe._interrupt = True

    def _close_denoise(self, recorder: JobRecorder, end: Any = None, *, ok: bool = True) -> None:
        if self.denoise_start is not None:
            recorder.stage_ended("denoise", self.denoise_start, end=end, ok=ok)
            self.denoise_start = None

    # -- the call -------------------------------------------------------------------------

    def call(self, original: Callable[..., Any], pipe: Any, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
        signature = _signature(original)
        bound = signature.bind(pipe, *args, **kwargs)
        request = _Request(signature, bound.arguments)
        recorder = self._new_recorder(pipe)
        owns_lifecycle = not recorder.started
        self.secrets = _secrets(request.get("prompt"), request.get("negative_prompt"))
        if owns_lifecycle:
            self._emit_job_started(recorder, pipe, request)
        total = int(request.get("num_inference_steps") or 0)
        user_callback = request.get("callback_on_step_end")

        def on_step_end(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> Any:
            self._on_step_end(pipe, index, len(self.cpu_timesteps) or total)
            result = {} if user_callback is None else user_callback(pipe, index, timestep, tensors)
            self._check_cancelled()  # after the caller's callback, which may itself cancel
            self._check_requested(pipe, recorder.job)
            return result

        bound.arguments["callback_on_step_end"] = on_step_end
        if user_callback is not None and hasattr(user_callback, "tensor_inputs"):
            bound.arguments["callback_on_step_end_tensor_inputs"] = user_callback.tensor_inputs
        self.recorder, self.step, self.previous_expert = recorder, _StepState(), None
        self.denoise_start, self.cpu_timesteps, self.cpu_sigmas = None, [], []
        self.cancel_requested = False
        try:
            self._check_requested(pipe, recorder.job)  # cancelled while it was queued
            if self.cancel_requested:
                raise JobCancelledError(REQUESTED)
            output = original(*bound.args, **bound.kwargs)
            if self.cancel_requested:  # output_type="latent": nothing was left to skip
                raise JobCancelledError(REQUESTED)
        except (JobCancelledError, KeyboardInterrupt) as exc:
            stage = recorder.stage
            self._close_denoise(recorder, ok=False)
            recorder.cancelled(str(exc) or type(exc).__name__, stage=stage)
            raise
        except BaseException as exc:
            stage = recorder.stage
            self._close_denoise(recorder, ok=False)
            recorder.failed(exc, secrets=self.secrets, stage=stage)
            raise
        finally:
            self.recorder = None
            self.handle._cancel.clear()
            if self.cancel_requested and self.control is not None:
                self.control.clear(recorder.job)  # acted on
        self._close_denoise(recorder)
        if getattr(pipe, "_interrupt", False):
            recorder.cancelled("interrupted")
        elif owns_lifecycle:
            recorder.completed(frames=request.get("num_frames"))
        else:
            recorder.pump()
        return output

    def _new_recorder(self, pipe: Any) -> JobRecorder:
        self._calls += 1
        if self.given_recorder is not None and self._calls == 1:
            recorder = self.given_recorder
            # Its events go to the live view too (its JobStarted was emitted before).
            self._given_emitter = recorder.emitter
            recorder.emitter = EventTap(recorder.emitter, self.handle._live)  # type: ignore[assignment]
            if recorder.started_event is not None:
                self.handle._live.push(recorder.started_event)
        else:
            if self.job is None:
                job = uuid.uuid4().hex
            elif self._calls == 1:
                job = self.job  # checked when the context was entered
            else:
                job = self._next_free(self._calls)
            device = self.device(pipe)
            recorder = JobRecorder(EventTap(self.emitter, self.handle._live),  # type: ignore[arg-type]
                                   job, timer=timer_for(device),
                                   memory=self.memory_reader(device))
        self.handle.jobs.append(recorder.job)
        self.recorders.append(recorder)
        return recorder

    def _next_free(self, number: int) -> str:
        """``job-N`` for the smallest N >= ``number`` that no job has taken yet."""
        while True:
            job = f"{self.job}-{number}"
            if not self.check_job or not _in_use(self.emitter, job):
                return job
            number += 1

    def device(self, pipe: Any) -> torch.device:
        """The pipeline's execution device, looked up once per context (it costs ms)."""
        if self._device is None:
            self._device = _execution_device(pipe)
        return self._device

    def memory_reader(self, device: torch.device) -> MemoryReader:
        """One reader per device for the whole context (it holds a file descriptor)."""
        key = str(device)
        if key not in self._readers:
            self._readers[key] = MemoryReader(device)
        return self._readers[key]

    def _emit_job_started(self, recorder: JobRecorder, pipe: Any, request: _Request) -> None:
        facts = describe_pipeline(pipe)
        guidance = float(request.get("guidance_scale") or 1.0)
        guidance_2 = request.get("guidance_scale_2")
        generator = request.get("generator")
        videos = request.get("num_videos_per_prompt")
        if videos is None:  # an image pipeline's batch
            videos = request.get("num_images_per_prompt")
        options = {**speed_options(pipe, num_videos=1 if videos is None else videos),
                   **self.options}
        if facts["task"] == "ti2v" and request.get("image") is not None:
            options.setdefault("image", True)  # TI2V's image mode: the first frame is given
        recorder.job_started(
            model=self.model or facts["model"], family=facts["family"],
            variant=self.variant or facts["variant"], task=facts["task"],
            width=int(request.get("width") or default_size(pipe)[1]),
            height=int(request.get("height") or default_size(pipe)[0]),
            num_frames=int(request.get("num_frames") or 1),
            steps=int(request.get("num_inference_steps") or 0),
            guidance_scale=guidance,
            guidance_scale_2=float(guidance_2) if guidance_2 is not None else None,
            cfg=guidance > 1.0, boundary_ratio=facts["boundary_ratio"],
            seed=generator.initial_seed() if isinstance(generator, torch.Generator) else None,
            device=device_info(self.device(pipe)), options=options,
            prompt=request.get("prompt"), record_prompt=self.record_prompt,
            traceparent=self.traceparent,
        )


class _Request:
    """The call's arguments, falling back to the signature's defaults."""

    def __init__(self, signature: inspect.Signature, arguments: dict[str, Any]) -> None:
        self.signature = signature
        self.arguments = arguments

    def get(self, name: str) -> Any:
        if name in self.arguments:
            return self.arguments[name]
        parameter = self.signature.parameters.get(name)
        if parameter is None or parameter.default is inspect.Parameter.empty:
            return None
        return parameter.default


#: ``inspect.signature`` of each pipeline class's ``__call__`` (tens of µs a call to rebuild).
_SIGNATURES: weakref.WeakKeyDictionary[Any, inspect.Signature] = weakref.WeakKeyDictionary()


def _signature(function: Callable[..., Any]) -> inspect.Signature:
    try:
        found = _SIGNATURES.get(function)
    except TypeError:  # not weakly referenceable
        return inspect.signature(function)
    if found is None:
        found = _SIGNATURES[function] = inspect.signature(function)
    return found


def _secrets(*prompts: Any) -> tuple[str, ...]:
    """The prompt texts a failure message must not quote (strings, or lists of them)."""
    found: list[str] = []
    for prompt in prompts:
        if isinstance(prompt, str):
            found.append(prompt)
        elif isinstance(prompt, list | tuple):
            found.extend(p for p in prompt if isinstance(p, str))
    return tuple(found)


def _in_use(emitter: Emitter, job: str) -> bool:
    """Whether ``job`` is taken; a log that cannot be read answers no (telemetry never
    stops a generation), and the append will say what is wrong with the log."""
    try:
        return emitter.has_job(job)
    except Exception:
        return False


def _check_finite(latents: Any) -> None:
    """Raise :class:`NonFiniteLatents` if the latents about to be decoded hold NaN or inf.

    Decoding them costs the most of a job and writes a black video; failing here says why
    (category ``numerical``). One reduction over the latents, once per job: it waits for the
    device, as the decode that follows does anyway.
    """
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        return
    finite = torch.isfinite(latents)
    if bool(finite.all()):
        return
    bad = int(finite.numel() - int(finite.sum()))
    raise NonFiniteLatents(
        f"the denoised latents hold NaN or infinity ({bad} of {finite.numel()} values); "
        "decoding them would write a black video")


def _at(values: list[float], index: int) -> float | None:
    return values[index] if 0 <= index < len(values) else None


def _execution_device(pipe: Any) -> torch.device:
    try:
        device = _fast_execution_device(pipe)
        if device is None:
            device = pipe._execution_device
    except Exception:
        device = torch.device("cpu")
    return device if isinstance(device, torch.device) else torch.device(str(device))


def _fast_execution_device(pipe: Any) -> Any:
    """diffusers' ``DiffusionPipeline._execution_device``, answered in one pass; ``None`` where
    the pipeline's class overrides that property (or ``device``) or this diffusers lacks what
    it reads.

    diffusers walks every module of every component with ``hasattr`` (which raises and catches
    an ``AttributeError`` on each module without the attribute), and ``pipe.device`` walks each
    model again for the same hooks: several ms a call at the Wan 1.3B shape, on the caller's
    thread before the device has any work. The same rules, reading each module's ``__dict__``
    once: the first group-offloading hook's onload device; else, for the first component
    outside ``_exclude_from_cpu_offload``, ``pipe.device`` if it has no accelerate hook, else
    the first submodule hook's ``execution_device``; else ``pipe.device`` (the first component
    not on the CPU or meta, else the first; with no group hook anywhere a diffusers model's
    device is its first parameter's or buffer's). ``tests/inference/test_instrument.py`` holds
    it equal to diffusers' on plain, model-, sequentially- and group-offloaded pipelines.
    """
    try:
        from diffusers.hooks.group_offloading import _GROUP_OFFLOADING
        from diffusers.models.modeling_utils import ModelMixin
        from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    except ImportError:
        return None
    if not (_defined_by(type(pipe), "_execution_device", DiffusionPipeline)
            and _defined_by(type(pipe), "device", DiffusionPipeline)):
        return None
    models = [(name, model) for name, model in pipe.components.items()
              if isinstance(model, torch.nn.Module)]
    for _, model in models:
        for module in each_module(model):
            registry = module.__dict__.get("_diffusers_hook")
            if registry is not None:
                hook = registry.get_hook(_GROUP_OFFLOADING)
                if hook is not None:
                    return hook.config.onload_device

    def pipeline_device() -> torch.device:  # DiffusionPipeline.device, no group hook anywhere
        names = _SIGNATURE_MODULES.get(type(pipe))
        if names is None:
            names = _SIGNATURE_MODULES[type(pipe)] = tuple(pipe._get_signature_keys(pipe)[0])
        devices: list[torch.device] = []
        for name in names:
            module = getattr(pipe, name, None)
            if not isinstance(module, torch.nn.Module):
                continue
            device: torch.device
            if _defined_by(type(module), "device", ModelMixin):
                first = next(itertools.chain(module.parameters(), module.buffers()), None)
                device = first.device if first is not None else module.device  # type: ignore[assignment]
            else:
                device = module.device  # type: ignore[assignment]
            if device.type not in ("cpu", "meta"):
                return device
            devices.append(device)
        return devices[0] if devices else torch.device("cpu")

    for name, model in models:
        if name in pipe._exclude_from_cpu_offload:
            continue
        if not hasattr(model, "_hf_hook"):
            return pipeline_device()
        for module in each_module(model):
            hook = module.__dict__.get("_hf_hook")
            if hook is not None and getattr(hook, "execution_device", None) is not None:
                return torch.device(hook.execution_device)
    return pipeline_device()


#: A pipeline class's module names as ``DiffusionPipeline.device`` lists them (its
#: ``__init__`` signature and ``_optional_components``: fixed per class).
_SIGNATURE_MODULES: weakref.WeakKeyDictionary[type, tuple[str, ...]] = \
    weakref.WeakKeyDictionary()


def _defined_by(kind: type, name: str, owner: type) -> bool:
    """Whether ``kind`` gets attribute ``name`` from ``owner`` (no subclass overrides it)."""
    return next((k for k in kind.__mro__ if name in k.__dict__), None) is owner


def device_info(device: torch.device) -> DeviceInfo:
    """Kind, name and memory of a torch device (no synchronisation: properties are cached)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return DeviceInfo(kind="cuda", name=props.name, total_memory_bytes=props.total_memory,
                          index=index)
    import platform

    return DeviceInfo(kind=device.type, name=platform.processor() or platform.machine())


def default_size(pipe: Any) -> tuple[int, int]:
    """(height, width) a pipeline generates when the call names none, as diffusers works it
    out: a UNet's ``sample_size`` (Stable Diffusion), a transformer's ``sample_height`` /
    ``sample_width`` (CogVideoX), or the pipeline's ``default_sample_size`` (SD3, Flux),
    times the VAE's spatial factor; (0, 0) where it shows none (the job's size is unknown)."""
    factor = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(
        pipe, "vae_scale_factor", None)
    if not isinstance(factor, int) or factor <= 0:
        return (0, 0)
    unet = getattr(pipe, "unet", None)
    sample = getattr(getattr(unet, "config", None), "sample_size", None)
    if isinstance(sample, int):
        return (sample * factor, sample * factor)
    config = getattr(getattr(pipe, "transformer", None), "config", None)
    height, width = (getattr(config, "sample_height", None), getattr(config, "sample_width", None))
    if isinstance(height, int) and isinstance(width, int):
        return (height * factor, width * factor)
    sample = getattr(pipe, "default_sample_size", None)
    if isinstance(sample, int):
        return (sample * factor, sample * factor)
    return (0, 0)


def describe_pipeline(pipe: Any) -> dict[str, Any]:
    """Facts read from any diffusers pipeline (detected, not assumed): family, task, variant
    (:func:`telemetry.pipelines.classify_pipeline`: Wan's rules for a Wan class, its size by
    its transformer's width; the class name's for any other), boundary."""
    config = getattr(pipe, "config", {})
    boundary = config.get("boundary_ratio") if hasattr(config, "get") else None
    expand = bool(config.get("expand_timesteps")) if hasattr(config, "get") else False
    name = type(pipe).__name__
    transformer = getattr(getattr(pipe, "transformer", None), "config", None)
    family, task, variant = classify_pipeline(
        name, two_experts=getattr(pipe, "transformer_2", None) is not None,
        expand_timesteps=expand, boundary_ratio=boundary,
        width=width_of(transformer) if hasattr(transformer, "get") else None)
    model = str(config.get("_name_or_path") or name) if hasattr(config, "get") else name
    return {"family": family, "task": task, "variant": variant, "boundary_ratio": boundary,
            "model": model}


@contextlib.contextmanager
def instrument(
    pipe: Any,
    *,
    log: EventLog | None = None,
    emitter: Emitter | None = None,
    job: str | None = None,
    recorder: JobRecorder | None = None,
    traceparent: str | None = None,
    model: str | None = None,
    variant: str | None = None,
    options: dict[str, Any] | None = None,
    record_prompt: bool = False,
    check_job: bool = True,
    on_progress: Callable[[Progress], Any] | None = None,
    ship: NatsOptions | str | None = None,
) -> Iterator[Instrumented]:
    """Record every ``pipe(...)`` call in this context as a job.

    Give ``log`` (the process's one emitter for it is used and flushed on exit) or an
    ``emitter``. ``job``
    names the first job (later calls get ``job-2``, …, the next number no job has; a random id
    without it). A ``job`` the log or the emitter already has raises :class:`JobIdInUse`
    here, before any pipeline call (``check_job=False`` skips that lookup, which reads the
    log); a reserved or unencodable one raises ``ValueError``. Each job's
    ``JobStarted.options`` holds what :func:`~inference.speed_options.speed_options` reads from
    the pipeline at that call (offload, dtype, quantization, LoRAs, attention backend, compile,
    VAE tiling/slicing, videos per prompt), with ``options`` given here over them. ``recorder``
    continues a job whose ``JobStarted`` the caller already emitted (the job runner does this to
    include model loading; its caller checked the id). ``traceparent`` joins the caller's trace.

    One pipeline, several threads: a diffusers pipeline keeps each call's state on itself and
    its scheduler (timesteps, step index, guidance, the interrupt flag), so two calls of one
    pipeline object at once corrupt each other with or without wantel. Contexts on one pipeline
    therefore run one after the other: a second thread's ``instrument()`` waits until the
    first context exits, then records its own job. Run one pipeline per thread (sharing the
    weights: ``type(pipe).from_pipe(pipe, scheduler=copy.deepcopy(pipe.scheduler))``) for
    calls that truly overlap. Entering ``instrument()`` again on the same pipeline from the
    same thread raises :class:`PipelineInUse` (it would wait for itself).

    The handle's :meth:`Instrumented.progress` is the job's live view, folded in-process from
    its own events by wantel's projections (:mod:`inference.progress`). ``on_progress`` is
    called with that view after each step and stage change, on a daemon thread (the step only
    appends its events to a list; a slow callback skips views, the latest wins), and once more
    with the final view when the context exits (waiting at most 5 s). An exception it raises
    is logged once and never reaches the generation.

    ``ship`` (a NATS URL, or :class:`~telemetry.log.nats.NatsOptions`): also ship the log to
    the fleet's JetStream stream, from the process's one background shipper of that log and
    stream (:func:`telemetry.ship.process_shipper`), started here on first use: the local log
    stays the source of truth, the pipeline never waits for the broker, and at interpreter
    exit the shipper ships for up to 2 s after the emitter's ``WorkerStopped``, leaving the
    rest to ``wantel ship``. It needs a log in a directory (``log=LocalLog(DIR)``, or an
    emitter of one) and the ``[nats]`` extra.
    """
    if (log is None) == (emitter is None):
        raise ValueError("give exactly one of log= or emitter=")
    if job is not None and (problem := job_id_problem(job)) is not None:
        raise ValueError(f"job={job!r}: {problem}")
    own_emitter = emitter is None
    # log=: the process's one emitter for that log (telemetry.emitter.process_emitter), so
    # every instrument() call in a process shares one worker stream and its seq.
    active = emitter if emitter is not None else process_emitter(log)  # type: ignore[arg-type]
    if ship is not None:
        process_shipper(active.log, ship, worker=active.worker)
    if job is not None and recorder is None and check_job and _in_use(active, job):
        raise JobIdInUse(
            f"job {job!r} is already in the log: a second job under that id would be dropped "
            "by every view as a duplicate; give each job its own id (or leave job= out for a "
            "random one)")
    handle = Instrumented(_live=LiveView(on_progress))
    session: _Session | None = None
    try:
        with _exclusive(pipe):
            session = _Session(pipe, active, handle, job=job, recorder=recorder, model=model,
                               variant=variant, traceparent=traceparent, options=options,
                               record_prompt=record_prompt, check_job=check_job)
            session.attach()
            try:
                yield handle
            finally:
                session.detach()
    finally:
        if own_emitter:
            # The process's shared emitter: let device marks still in flight resolve, then
            # flush (the job's events are in the log when the block ends); it stays open for
            # the next call and is closed at exit.
            for job_recorder in session.recorders if session is not None else ():
                job_recorder.wait_resolved(timeout=30.0)
            active.flush()
        handle._live.close()  # the final view to on_progress, every event of the job seen
