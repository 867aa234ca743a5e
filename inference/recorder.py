"""One job's events, in order, with device-measured times, emitted without blocking.

A :class:`JobRecorder` turns what the instrumentation sees (a stage began, a step ended, the job
failed) into events. Times are device marks (see :mod:`inference.timing`); on CUDA a mark
resolves only once the GPU has reached it, so events wait in an ordered queue and each
:meth:`JobRecorder.pump` emits the prefix that is ready — the job's events stay in order and the
host never waits for the device. Whatever is still unresolved when the job ends is handed to a
background thread that keeps polling, so the caller's thread returns at once.

A job's first event is always its ``JobStarted``: whatever is recorded before it (``wantel
run`` measures ``load`` before the pipeline whose options ``JobStarted`` carries exists) waits
in the queue and follows it.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

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
    StageStarted,
    StepEnded,
)

MAX_MESSAGE: Final = 500
RESOLVE_TIMEOUT_S: Final = 120.0


def prompt_digest(prompt: object) -> str | None:
    """SHA-256 of the prompt (a string, or a list of them): lets runs be grouped, not read."""
    if prompt is None:
        return None
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list | tuple):
        text = "\x1f".join(str(p) for p in prompt)
    else:
        text = str(prompt)
    return hashlib.sha256(text.encode()).hexdigest()


def sanitise(message: str, secrets: tuple[str, ...] = ()) -> str:
    """An error message safe to store: no prompt text, one line, bounded length."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            message = message.replace(secret, "<redacted>")
    message = re.sub(r"\s+", " ", message).strip()
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 1] + "…"
    return message


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA (or MPS) out-of-memory, by type where torch has one, else by message."""
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is a dependency of inference/
        pass
    return "out of memory" in str(exc).lower()


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
            prompt_sha256=prompt_digest(prompt),
            prompt=prompt if record_prompt and isinstance(prompt, str) else None,
            traceparent=traceparent,
        )
        with self._lock:
            if self._queue and self._queue[0] is _NOT_STARTED:
                self._queue.popleft()
            self._queue.appendleft(_Deferred((), lambda _: event))
        self.started = True
        self.pump()

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
        message = sanitise(str(exc) or type(exc).__name__, secrets)
        oom = is_out_of_memory(exc)
        self._defer((end,), lambda t: JobFailed(
            job=job, ts=self._ts(t[0]), duration_s=t[0] / 1e9, stage=stage, step=step,
            error_type=type(exc).__name__, message=message, oom=oom))
        self._finish()

    def cancelled(self, reason: str, *, stage: Stage | None = None) -> None:
        """The job was interrupted at a step boundary (or by Ctrl-C) in ``stage``."""
        end, job = self.timer.mark(), self.job
        stage = stage or self.stage or self.failed_in_stage
        step = self.steps_done if stage == "denoise" else None
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
