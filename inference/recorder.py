"""One job's events, in order, with device-measured times, emitted without blocking.

A :class:`JobRecorder` turns what the instrumentation sees (a stage began, a step ended, the job
failed) into events. Times are device marks (see :mod:`inference.timing`); on CUDA a mark
resolves only once the GPU has reached it, so events wait in an ordered queue and each
:meth:`JobRecorder.pump` emits the prefix that is ready — the job's events stay in order and the
host never waits for the device. Whatever is still unresolved when the job ends is handed to a
background thread that keeps polling, so the caller's thread returns at once.

User text — the prompt, error messages, reasons — passes through :func:`prompt_digest`,
:func:`sanitise` and :func:`storable`, which never raise: a prompt that works in plain
diffusers (a lone surrogate, an object whose ``str`` fails) must work with wantel too.

A job's first event is always its ``JobStarted``: whatever is recorded before it (``wantel
run`` measures ``load`` before the pipeline whose options ``JobStarted`` carries exists) waits
in the queue and follows it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from inference.failures import category_of
from inference.memory import MemoryReader
from inference.timing import HostTimer, Timer
from telemetry.emitter import Emitter
from telemetry.events import (
    DeviceInfo,
    Event,
    Expert,
    ExpertSwitched,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobStarted,
    MemorySampled,
    Stage,
    StageEnded,
    StageProgress,
    StageStarted,
    StepEnded,
)
from telemetry.guidance import PredictPeak, shape_of, suggest

MAX_MESSAGE: Final = 500
RESOLVE_TIMEOUT_S: Final = 120.0
#: What a failure message is stored as when it quotes any part of the prompt.
WITHHELD: Final = "(message withheld: it quoted the prompt)"
#: A run of this many letters, digits and symbols of the prompt (compared case-folded, with
#: escapes decoded and punctuation and spaces dropped) found in a message withholds it.
QUOTE_WINDOW: Final = 12
#: Prompts shorter than this (in the same compared form) are not looked for: "fox" in a
#: message says nothing about whose prompt it was.
MIN_SECRET: Final = 4


def prompt_digest(prompt: object, key: bytes | None) -> str | None:
    """HMAC-SHA256 of the prompt (a string, or a list of them) under the log's secret ``key``:
    runs of one prompt can be grouped within a log, but a guessed prompt cannot be confirmed
    from the digest without the key. ``None`` without a key or a prompt; never raises."""
    if prompt is None or key is None:
        return None
    try:
        if isinstance(prompt, str):
            text = prompt
        elif isinstance(prompt, list | tuple):
            text = "\x1f".join(str(p) for p in prompt)
        else:
            text = str(prompt)
        # surrogatepass: a lone surrogate is a valid Python str and diffusers accepts it.
        return hmac.new(key, text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
    except Exception:
        return None


def storable(text: object, limit: int | None = None) -> str:
    """``text`` as a string every encoder takes (lone surrogates escaped as ``\\udXXX``),
    cut to ``limit`` characters; never raises."""
    try:
        value = text if isinstance(text, str) else str(text)
    except Exception:
        value = f"<unprintable {type(text).__name__}>"
    if limit is not None and len(value) > limit:
        value = value[: limit - 1] + "…"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def sanitise(message: object, secrets: tuple[str, ...] = ()) -> str:
    """An error message safe to store: one line, bounded length, encodable — and nothing of
    the prompt: a message that quotes any part of a secret (:func:`quotes`), in any of the
    usual forms (repr, JSON-escaped, unicode-escaped, truncated, case-changed, with its
    newlines) is replaced by :data:`WITHHELD` whole. Never raises."""
    try:
        text = " ".join(storable(message, 16 * MAX_MESSAGE).split())
        if len(text) > MAX_MESSAGE:
            text = text[: MAX_MESSAGE - 1] + "…"
        if any(quotes(text, secret) for secret in secrets):
            return WITHHELD
        return text
    except Exception:
        return WITHHELD if secrets else "<unprintable message>"


def quotes(message: str, secret: object) -> bool:
    """Whether ``message`` holds any part of ``secret`` (a string, or a list of strings): a
    run of :data:`QUOTE_WINDOW` of its characters (the whole secret when shorter), or, at the
    message's end, its first characters (a quote cut short)."""
    if isinstance(secret, list | tuple):
        return any(quotes(message, part) for part in secret)
    if not isinstance(secret, str):
        return False
    folded_secret = _fold(secret)
    if len(folded_secret) < MIN_SECRET:
        return False
    folded = _fold(message)
    window = min(QUOTE_WINDOW, len(folded_secret))
    pieces = {folded_secret[i : i + window] for i in range(len(folded_secret) - window + 1)}
    if any(folded[i : i + window] in pieces for i in range(len(folded) - window + 1)):
        return True
    cut = message.rstrip().endswith(("…", "..."))
    return cut and any(folded.endswith(folded_secret[:k])
                       for k in range(MIN_SECRET, window + 1))


_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|x([0-9a-fA-F]{2})|(.))",
                     re.DOTALL)


def _unescape_one(match: re.Match[str]) -> str:
    code = match.group(1) or match.group(2) or match.group(3)
    if code is not None:
        value = int(code, 16)
        return chr(value) if value <= 0x10FFFF else ""
    return {"n": "\n", "t": "\t", "r": "\r"}.get(match.group(4), match.group(4))


def _fold(text: str) -> str:
    """The form in which a prompt and a message are compared: escapes decoded (twice: a JSON
    document of a repr), surrogate pairs joined, NFKC, case-folded, and only letters, digits
    and symbols kept (quotes, backslashes, spaces and newlines dropped)."""
    for _ in range(2):
        text = _ESCAPE.sub(_unescape_one, text)
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(c for c in text if unicodedata.category(c)[0] in "LNS")


def _text_of(exc: BaseException) -> str:
    """``str(exc)``, or the exception's type where that is empty or itself fails."""
    try:
        return str(exc) or type(exc).__name__
    except Exception:
        return type(exc).__name__


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA (or MPS) out-of-memory, by type where torch has one, else by message."""
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is a dependency of inference/
        pass
    return "out of memory" in _text_of(exc).lower()


@dataclass
class _Deferred:
    """An event waiting for its marks to resolve."""

    marks: tuple[Any, ...]
    build: Callable[[list[int]], Event]  # receives each mark's ns since the job's origin


def _unbuildable(offsets: list[int]) -> Event:
    raise AssertionError("the not-started placeholder is never emitted")


#: Heads a recorder's queue until its ``JobStarted`` is recorded, so that a job's first event is
#: always its ``JobStarted`` even when something was recorded before it (``wantel run`` records
#: ``load`` before the pipeline its options are read from exists); it also keeps every fast
#: path, which emits only when the queue is empty, off until then.
_NOT_STARTED: Final = _Deferred((), _unbuildable)


class JobRecorder:
    """Builds and emits one job's events; used by the instrumentation and the job runner."""

    def __init__(
        self,
        emitter: Emitter,
        job: str,
        *,
        timer: Timer,
        memory: MemoryReader | None = None,
        wall_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.emitter = emitter
        self.job = job
        self.timer = timer
        self.memory = memory
        self.origin = timer.mark()
        self.origin_wall_ns = wall_ns()
        self.started = False
        self.finished = False
        self.stage: Stage | None = None
        self.failed_in_stage: Stage | None = None
        self.steps_done = 0
        #: The job's ``JobStarted`` once emitted: its shape and options feed the suggestions.
        self.started_event: JobStarted | None = None
        #: The VRAM model's predictor, where one is wired in (memory-based suggestions).
        self.predict_peak: PredictPeak | None = None
        self._queue: deque[_Deferred] = deque((_NOT_STARTED,))
        self._lock = threading.Lock()
        self._immediate = isinstance(timer, HostTimer)
        if memory is not None:
            memory.reset_peak()  # the job's peak-memory window opens at its origin

    # -- ordering and resolution ----------------------------------------------------------

    def _defer(self, marks: tuple[Any, ...], build: Callable[[list[int]], Event]) -> None:
        if self._immediate and not self._queue:
            # Host timers resolve at once: emit now, skipping the queue (the common CPU path).
            origin = self.origin
            self.emitter.emit(build([mark - origin for mark in marks]))
            return
        with self._lock:
            self._queue.append(_Deferred(marks, build))

    def _ts(self, since_origin_ns: int) -> int:
        return self.origin_wall_ns + since_origin_ns

    def pump(self) -> bool:
        """Emit every event whose marks have resolved, in order; True if none is left."""
        if not self._queue:  # the common case on host timers: nothing waits, take no lock
            return True
        with self._lock:
            while self._queue:
                head = self._queue[0]
                if head is _NOT_STARTED:
                    return False
                offsets = []
                for mark in head.marks:
                    offset = self.timer.elapsed_ns(self.origin, mark)
                    if offset is None:
                        return False
                    offsets.append(offset)
                self._queue.popleft()
                self.emitter.emit(head.build(offsets))
            return True

    def wait_resolved(self, timeout: float) -> bool:
        """Poll until every event is emitted (only when closing: this waits for the device)."""
        deadline = time.monotonic() + timeout
        while not self.pump():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def finish(self) -> None:
        """Emit what is ready; leave the rest to a background resolver (CUDA only)."""
        if not self.pump():
            _Resolver.shared().add(self)

    # -- lifecycle ------------------------------------------------------------------------

    def job_started(
        self,
        *,
        model: str,
        family: str,
        variant: str,
        task: str,
        width: int,
        height: int,
        num_frames: int,
        steps: int,
        guidance_scale: float,
        cfg: bool,
        device: DeviceInfo,
        guidance_scale_2: float | None = None,
        boundary_ratio: float | None = None,
        seed: int | None = None,
        options: dict[str, Any] | None = None,
        prompt: object = None,
        record_prompt: bool = False,
        traceparent: str | None = None,
    ) -> None:
        """Emit ``JobStarted``, stamped at the origin, then whatever was recorded before it."""
        event = JobStarted(
            job=self.job, ts=self.origin_wall_ns, model=model, family=family, variant=variant,
            task=task,  # type: ignore[arg-type]
            width=width, height=height, num_frames=num_frames, steps=steps,
            guidance_scale=guidance_scale, guidance_scale_2=guidance_scale_2, cfg=cfg,
            boundary_ratio=boundary_ratio, seed=seed, device=device, options=options or {},
            prompt_sha256=prompt_digest(prompt, self._prompt_key()),
            prompt=storable(prompt) if record_prompt and isinstance(prompt, str) else None,
            traceparent=traceparent,
        )
        self.started_event = event
        with self._lock:
            if self._queue and self._queue[0] is _NOT_STARTED:
                self._queue.popleft()
            self._queue.appendleft(_Deferred((), lambda _: event))
        self.started = True
        self.pump()

    def _prompt_key(self) -> bytes | None:
        """The log's key for prompt digests; ``None`` (no digest) if the log cannot give one,
        never an unkeyed digest and never an exception."""
        try:
            return self.emitter.log.prompt_key()
        except Exception:
            return None

    def stage_started(self, stage: Stage) -> Any:
        """Open a stage now; returns its start mark for :meth:`stage_ended`."""
        start = self.timer.mark()
        self.stage = stage
        job = self.job
        self._defer((start,), lambda t: StageStarted(job=job, ts=self._ts(t[0]), stage=stage))
        return start

    def stage_ended(self, stage: Stage, start: Any, *, ok: bool = True, end: Any = None) -> None:
        """Close a stage (at ``end``, or now) and sample memory."""
        end = end if end is not None else self.timer.mark()
        if self.stage == stage:
            self.stage = None
        job = self.job
        self._defer((start, end), lambda t: StageEnded(
            job=job, ts=self._ts(t[1]), stage=stage, duration_s=(t[1] - t[0]) / 1e9, ok=ok))
        self.memory_sampled(end, stage=stage)

    @contextlib.contextmanager
    def stage_span(self, stage: Stage) -> Iterator[None]:
        """``with recorder.stage_span("decode"): ...``; a failure closes it with ``ok=False``."""
        start = self.stage_started(stage)
        try:
            yield
        except BaseException:
            self.failed_in_stage = stage
            self.stage_ended(stage, start, ok=False)
            raise
        self.stage_ended(stage, start)
        self.pump()

    def step_ended(
        self,
        *,
        step: int,
        total_steps: int,
        start: Any,
        end: Any,
        timestep: float | None,
        sigma: float | None,
        expert: Expert | None,
        passes: int,
    ) -> None:
        """A denoising step finished between ``start`` and ``end``."""
        self.steps_done = step + 1
        job = self.job
        if self._immediate and not self._queue:
            # The hot path on host timers: build and emit directly (no closure, no queue).
            emit = self.emitter.emit
            emit(StepEnded(job=job, ts=self.origin_wall_ns + (end - self.origin), step=step,
                           total_steps=total_steps, timestep=timestep, sigma=sigma,
                           expert=expert, passes=passes, duration_s=(end - start) / 1e9))
            memory = self.memory
            if memory is not None:
                emit(MemorySampled(job=job, ts=self.origin_wall_ns + (end - self.origin),
                                   device=memory.device_name, step=step, **memory.read_step()))
            return
        self._defer((start, end), lambda t: StepEnded(
            job=job, ts=self._ts(t[1]), step=step, total_steps=total_steps,
            timestep=timestep, sigma=sigma,
            expert=expert, passes=passes, duration_s=(t[1] - t[0]) / 1e9))
        self.memory_sampled(end, step=step)

    def stage_progress(self, stage: Stage, done: int, total: int, mark: Any) -> None:
        """``done`` of the ``total`` pieces of ``stage`` had finished at ``mark``."""
        job = self.job
        self._defer((mark,), lambda t: StageProgress(
            job=job, ts=self._ts(t[0]), stage=stage, done=done, total=total))

    def expert_switched(self, *, step: int, mark: Any, old: Expert, new: Expert) -> None:
        """Wan 2.2 A14B moved from one expert to the other at ``step``."""
        job = self.job
        self._defer((mark,), lambda t: ExpertSwitched(
            job=job, ts=self._ts(t[0]), step=step, from_expert=old, to_expert=new))

    def memory_sampled(self, mark: Any, *, stage: Stage | None = None,
                       step: int | None = None) -> None:
        """Allocator (or RSS) readings now, stamped with ``mark``'s device time.

        At a step only the cheap readings are taken (see :mod:`inference.memory`).
        """
        if self.memory is None:
            return
        fields = self.memory.read() if step is None else self.memory.read_step()
        job, device = self.job, self.memory.device_name
        self._defer((mark,), lambda t: MemorySampled(
            job=job, ts=self._ts(t[0]), device=device, stage=stage, step=step, **fields))

    def completed(self, *, output_path: str | None = None, frames: int | None = None,
                  size_bytes: int | None = None) -> None:
        """The job produced its output."""
        end, job = self.timer.mark(), self.job
        self._defer((end,), lambda t: JobCompleted(
            job=job, ts=self._ts(t[0]), duration_s=t[0] / 1e9, output_path=output_path,
            frames=frames, bytes=size_bytes))
        self._finish()

    def failed(self, exc: BaseException, *, secrets: tuple[str, ...] = (),
               stage: Stage | None = None) -> None:
        """The job raised ``exc`` (which the caller re-raises unchanged) in ``stage``."""
        end, job = self.timer.mark(), self.job
        stage = stage or self.stage or self.failed_in_stage
        step = self.steps_done if stage == "denoise" else None
        message = sanitise(_text_of(exc), secrets)
        oom = is_out_of_memory(exc)
        category, suggestions = self.guidance(exc, stage=stage, step=step, message=message)
        self._defer((end,), lambda t: JobFailed(
            job=job, ts=self._ts(t[0]), duration_s=t[0] / 1e9, stage=stage, step=step,
            error_type=type(exc).__name__, message=message, oom=oom, category=category,
            suggestions=suggestions))
        self._finish()

    def guidance(self, exc: BaseException, *, stage: Stage | None, step: int | None,
                 message: str) -> tuple[str, tuple[str, ...]]:
        """The failure's category and suggestions (never raises: a failure to advise must not
        hide the failure itself)."""
        try:
            category = category_of(exc, stage=stage, message=message)
        except Exception:
            category = "internal"
        try:
            started = self.started_event
            shape = shape_of(started) if started is not None else None
            capacity = started.device.total_memory_bytes if started is not None else None
            options = started.options if started is not None else {}
            found = suggest(category, shape, options, capacity, self.predict_peak,
                            stage=stage, step=step, message=message)
            return category, tuple(sanitise(line) for line in found)
        except Exception:
            return category, ()

    def cancelled(self, reason: str, *, stage: Stage | None = None) -> None:
        """The job was interrupted at a step boundary (or by Ctrl-C) in ``stage``."""
        end, job = self.timer.mark(), self.job
        stage = stage or self.stage or self.failed_in_stage
        step = self.steps_done if stage == "denoise" else None
        reason = sanitise(reason)
        self._defer((end,), lambda t: JobCancelled(
            job=job, ts=self._ts(t[0]), duration_s=t[0] / 1e9, stage=stage, step=step,
            reason=reason))
        self._finish()

    def _finish(self) -> None:
        self.finished = True
        self.stage = None
        self.finish()


class _Resolver:
    """One daemon thread that finishes emitting jobs whose device marks were still pending."""

    _instance: _Resolver | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        self._jobs: list[tuple[JobRecorder, float]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        threading.Thread(target=self._run, name="wantel-resolver", daemon=True).start()

    @classmethod
    def shared(cls) -> _Resolver:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def add(self, recorder: JobRecorder) -> None:
        with self._lock:
            self._jobs.append((recorder, time.monotonic() + RESOLVE_TIMEOUT_S))
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(0.005)
            self._wake.clear()
            with self._lock:
                jobs = list(self._jobs)
            done = []
            for recorder, deadline in jobs:
                try:
                    finished = recorder.pump()
                except Exception:  # a broken CUDA context: give up on this job's marks
                    finished = True
                if finished or time.monotonic() > deadline:
                    done.append(recorder)
            if done:
                with self._lock:
                    self._jobs = [(r, d) for r, d in self._jobs if r not in done]
            if not jobs:
                self._wake.wait(1.0)
