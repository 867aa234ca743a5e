"""The in-process live view of an instrumented job: ``handle.progress()`` and ``on_progress``.

The job's own events, as its recorder emits them, are folded here by the same projections
every other view uses (jobs, ETA, throughput, memory: :mod:`telemetry.projections`) and read
through the same read model (:func:`telemetry.projections.summary.job_summary`); the ETA is
the live estimator's (:mod:`telemetry.eta.live`) at the newest event's time. Nothing here
reads the log.

The generation's thread only appends each event to a list (:class:`EventTap`, a few hundred
nanoseconds). Folding happens on whoever asks — ``handle.progress()`` on the caller's thread,
or, with ``on_progress``, a daemon thread woken after each step, which folds what arrived and
calls the callback once with the newest view: a slow callback skips views (the latest wins),
never events, and never delays a step. An exception in the callback is logged once (with its
traceback) and counted; the generation never sees it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from telemetry.emitter import Emitter
from telemetry.events import (
    TERMINAL_TYPES,
    Event,
    JobStarted,
    StageEnded,
    StageProgress,
    StageStarted,
    StepEnded,
)
from telemetry.projections.eta import EtaProjection
from telemetry.projections.jobs import JobsProjection
from telemetry.projections.memory import MemoryProjection
from telemetry.projections.summary import job_summary
from telemetry.projections.throughput import ThroughputProjection

log = logging.getLogger("wantel.instrument")

#: Events after which ``on_progress`` is called (the newest view, once per wake-up).
_WAKE: Final[tuple[type[Event], ...]] = (StepEnded, StageStarted, StageEnded, StageProgress,
                                         JobStarted, *TERMINAL_TYPES)
#: How long leaving the context waits for the callback to take the final view (seconds).
FINAL_CALL_TIMEOUT_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class Progress:
    """A job's live view, as its own events say.

    ``progress`` is 0–1, weighted by each stage's expected cost (the ETA model's; never
    decreasing), 1 once completed. ``eta_s`` and its p10–p90 interval are seconds left as of
    ``ts`` (the newest event's time, unix seconds); ``estimating`` until two steps are seen.
    ``steps_per_second`` is smoothed while running; ``peak_memory_bytes`` the allocator's peak
    on a GPU, the process RSS on a CPU.
    """

    job: str
    status: str
    stage: str | None
    step: int
    steps: int | None
    progress: float | None
    eta_s: float | None
    eta_p10_s: float | None
    eta_p90_s: float | None
    estimating: bool
    steps_per_second: float | None
    peak_memory_bytes: int | None
    ts: float | None


class LiveView:
    """Folds the jobs of one ``instrument()`` context in-process; feeds ``on_progress``."""

    def __init__(self, on_progress: Callable[[Progress], Any] | None = None) -> None:
        self._projections: list[Any] = [JobsProjection(), EtaProjection(),
                                        ThroughputProjection(), MemoryProjection()]
        self._states: dict[str, Any] = {p.name: p.initial() for p in self._projections}
        self._routes: dict[type[Event], list[Any]] = {}
        self._pending: list[Event] = []
        self._pending_lock = threading.Lock()
        self._fold_lock = threading.Lock()
        self._newest_ts = 0
        #: The highest progress shown per job: readings never go backwards.
        self._shown: dict[str, float] = {}
        self.job: str | None = None
        self.on_progress = on_progress
        self.callback_errors = 0
        self.fold_errors = 0
        self._wake = threading.Event()
        self._stop = False
        self._delivered = threading.Event()
        self._thread: threading.Thread | None = None
        if on_progress is not None:
            self._thread = threading.Thread(target=self._run, name="wantel-progress",
                                            daemon=True)
            self._thread.start()

    # -- the generation's side: append only ---------------------------------------------

    def push(self, event: Event) -> None:
        """Take one of the job's events (any thread; never raises, never blocks for long)."""
        with self._pending_lock:
            self._pending.append(event)
        if self._thread is not None and isinstance(event, _WAKE):
            self._wake.set()

    # -- the readers' side ----------------------------------------------------------------

    def _fold(self) -> None:
        with self._pending_lock:
            events, self._pending = self._pending, []
        for event in events:
            if isinstance(event, JobStarted):
                self.job = event.job
            self._newest_ts = max(self._newest_ts, event.ts)
            kind = type(event)
            route = self._routes.get(kind)
            if route is None:
                route = self._routes[kind] = [
                    p for p in self._projections if kind in getattr(p, "handles", (kind,))]
            for projection in route:
                try:
                    self._states[projection.name] = projection.apply(
                        self._states[projection.name], event)
                except Exception:  # a fold's bug must not reach the generation
                    self.fold_errors += 1

    def progress(self, job: str | None = None) -> Progress | None:
        """The newest view of ``job`` (default: the latest job started in the context);
        ``None`` before its ``JobStarted``."""
        with self._fold_lock:
            self._fold()
            return self._view(job or self.job)

    def _view(self, job: str | None) -> Progress | None:
        if job is None:
            return None
        summary = job_summary(self._states, job)
        if summary is None:
            return None
        view = summary.view
        remaining = low = high = None
        estimating = True
        progress = summary.progress
        running = self._states["eta"].running.get(job)
        if running is not None and view.status == "running":
            # The live estimator at the newest event (not only at the steps the ETA
            # projection records an issue at), read without issuing: a read must not change
            # the ETAs the fold issues later.
            estimate = running.live.peek(max(self._newest_ts, view.last_ts or 0))
            remaining, low, high = estimate.remaining_s, estimate.p10_s, estimate.p90_s
            estimating = estimate.estimating
            # Never below what this view showed before (a reading between issues is not
            # kept by the estimator, so the view keeps its own floor).
            progress = max(progress or 0.0, estimate.progress, self._shown.get(job, 0.0))
            self._shown[job] = progress
        elif view.status == "completed":
            remaining = low = high = 0.0
            estimating = False
        return Progress(
            job=job, status=view.status, stage=view.stage, step=view.steps_done,
            steps=view.total_steps, progress=progress, eta_s=remaining, eta_p10_s=low,
            eta_p90_s=high, estimating=estimating,
            steps_per_second=summary.steps_per_second,
            peak_memory_bytes=summary.peak_memory_bytes,
            ts=(view.last_ts / 1e9) if view.last_ts else None)

    # -- the callback thread --------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            stopping = self._stop
            try:
                current = self.progress()
            except Exception:  # never let the thread die: the next wake-up tries again
                self.fold_errors += 1
                current = None
            if current is not None:
                self._call(current)
            if stopping:
                self._delivered.set()
                return

    def _call(self, current: Progress) -> None:
        callback = self.on_progress
        if callback is None:
            return
        try:
            callback(current)
        except Exception:
            self.callback_errors += 1
            if self.callback_errors == 1:
                log.exception("on_progress raised (the generation goes on; later errors of "
                              "this callback are counted, not logged)")

    def close(self, timeout: float = FINAL_CALL_TIMEOUT_S) -> None:
        """Give the callback the final view (waiting at most ``timeout`` s), then stop."""
        if self._thread is None or self._stop:
            return
        self._stop = True
        self._wake.set()
        self._delivered.wait(timeout)


class EventTap:
    """An emitter as a recorder sees it: every event goes to the emitter, then to the view."""

    def __init__(self, emitter: Emitter, view: LiveView) -> None:
        self._emitter = emitter
        self._view = view

    def emit(self, event: Event) -> None:
        """Emit, then show the live view (which never raises)."""
        self._emitter.emit(event)
        self._view.push(event)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._emitter, name)


__all__ = ["EventTap", "LiveView", "Progress"]
