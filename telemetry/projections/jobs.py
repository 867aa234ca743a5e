"""The jobs projection: each job's status, current stage, steps done and stage timeline.

This is the read model behind ``wantel replay``, ``/api/jobs`` and the live page's rows.
Durations come from the events (measured where they happened), never from a clock here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import msgspec

from telemetry.events import (
    Event,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobQueued,
    JobStarted,
    MemorySampled,
    StageEnded,
    StageStarted,
    StepEnded,
    WorkerHeartbeat,
)
from telemetry.liveness import WORKER_TIMEOUT_S as TIMEOUT_S
from telemetry.projections.base import BatchFold, OnFailure, oldest_first

TERMINAL_STATUSES: Final = frozenset({"completed", "failed", "cancelled", "abandoned"})


class StageSpan(msgspec.Struct, kw_only=True):
    """One stage of one job: when it started and, once ended, how long it took."""

    stage: str
    start_ts: int
    end_ts: int | None = None
    duration_s: float | None = None
    ok: bool | None = None


class JobView(msgspec.Struct, kw_only=True):
    """Everything the jobs projection knows about one job."""

    job: str
    status: str = "queued"
    model: str | None = None
    family: str | None = None
    variant: str | None = None
    task: str | None = None
    worker: str | None = None
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None
    total_steps: int | None = None
    steps_done: int = 0
    step_time_s: float = 0.0
    cfg: bool | None = None
    expert: str | None = None
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    peak_rss_bytes: int | None = None
    stage: str | None = None
    stages: list[StageSpan] = []
    queued_ts: int | None = None
    started_ts: int | None = None
    ended_ts: int | None = None
    duration_s: float | None = None
    last_ts: int | None = None
    error_type: str | None = None
    error_message: str | None = None
    oom: bool | None = None
    failed_step: int | None = None
    output_path: str | None = None
    traceparent: str | None = None

    @property
    def steps_per_second(self) -> float | None:
        """Denoising throughput over the steps seen, from their measured durations."""
        if self.steps_done == 0 or self.step_time_s <= 0:
            return None
        return self.steps_done / self.step_time_s

    @property
    def peak_memory_bytes(self) -> int | None:
        """The peak that matters on this device: allocator-allocated on GPUs, RSS on CPU."""
        return self.peak_allocated_bytes or self.peak_rss_bytes

    def stage_durations(self) -> dict[str, float]:
        """Seconds per finished stage, summed if a stage ran more than once."""
        totals: dict[str, float] = {}
        for span in self.stages:
            if span.duration_s is not None:
                totals[span.stage] = totals.get(span.stage, 0.0) + span.duration_s
        return totals


class WorkerView(msgspec.Struct, kw_only=True):
    """A process that emits events: when it was last heard from."""

    worker: str
    last_ts: int
    host: str | None = None
    pid: int | None = None
    devices: tuple[str, ...] = ()


class JobsState(msgspec.Struct, kw_only=True):
    """All jobs by id, in the order they first appeared, and the workers running them."""

    jobs: dict[str, JobView] = {}
    workers: dict[str, WorkerView] = {}
    active: dict[str, None] = {}  # jobs queued or running (an ordered set)
    finished: dict[str, None] = {}  # ended jobs, oldest first (an ordered set)
    now_ts: int = 0  # the newest event time seen: the projection's "now"
    swept_ts: int = 0

    def alive_workers(self, timeout_s: float) -> list[WorkerView]:
        """Workers heard from within ``timeout_s`` of the newest event."""
        horizon = self.now_ts - int(timeout_s * 1e9)
        return [w for w in self.workers.values() if w.last_ts >= horizon]


class JobsProjection(BatchFold):
    """Fold lifecycle, stage and step events into :class:`JobView`\\ s.

    A job whose worker has been silent for ``abandon_after_s`` (in event time: the newest
    event's ``ts``, never the clock) becomes ``abandoned``. With ``keep_finished``, only that
    many ended jobs are kept (a long-running server's memory stays flat).
    """

    name = "jobs"
    version = 2
    state_type = JobsState
    handles = frozenset({
        JobQueued, JobStarted, StageStarted, StageEnded, StepEnded, MemorySampled,
        WorkerHeartbeat, JobCompleted, JobFailed, JobCancelled,
    })

    def __init__(self, *, abandon_after_s: float = TIMEOUT_S, keep_finished: int | None = None):
        self.abandon_after_ns = int(abandon_after_s * 1e9)
        self.sweep_every_ns = max(self.abandon_after_ns // 4, 1_000_000_000)
        self.keep_finished = keep_finished

    def initial(self) -> JobsState:
        """No jobs yet."""
        return JobsState()

    def apply_many(self, state: JobsState, events: Sequence[Event],
                   failed: OnFailure) -> JobsState:
        """Update the job each event belongs to, and its worker's liveness.

        Steps are three events in five of a replay. Their fields — last event time, steps
        done, total, expert, time in steps — are held back from the job's view while the batch
        is folded and stored once: the current job's in locals, other jobs' in ``held`` (jobs
        run side by side, so a batch alternates between them). They are stored before anything
        that reads or replaces views (a lifecycle event or heartbeat, a sweep, a failure) and
        at the end of the batch. The arithmetic is the same, in the same order.
        """
        jobs = state.jobs
        job_of = jobs.get
        # Step fields not yet in their views, by job; the current job's entry is stale (its
        # fields are in locals) and is replaced before ``held`` is read. Entries are replaced,
        # never popped: deleting and reinserting would make the dict resize every few steps.
        held: dict[str, _Held] = {}
        held_of = held.get
        sweep_every = self.sweep_every_ns
        now = state.now_ts
        sweep_at = state.swept_ts + sweep_every  # ``ts >= sweep_at``: no subtraction per event
        # The view whose step fields are held in the locals below, and its job (set together:
        # where ``run`` is not None neither is ``run_job``, which mypy cannot see).
        run: JobView | None = None
        run_job: str | None = None
        last_ts = done = 0
        total: int | None = None
        expert: str | None = None
        step_time = 0.0
        for event in events:
            try:
                # ``type(event) is X`` rather than a saved type: mypy narrows only on the call.
                if type(event) is StepEnded:  # the most frequent job event: a hot path, inlined
                    if event.job != run_job:
                        if run is not None:
                            held[run_job] = (run, last_ts, done, total, expert, step_time)  # type: ignore[index]
                        entry = held_of(event.job)
                        if entry is not None:
                            run, last_ts, done, total, expert, step_time = entry
                        else:
                            run = job_of(event.job)
                            if run is None:  # its start was lost: the job still exists
                                run = jobs[event.job] = JobView(job=event.job)
                            done, step_time = run.steps_done, run.step_time_s
                        run_job = event.job
                    ts = last_ts = event.ts
                    step = event.step + 1
                    if step > done:  # noqa: PLR1730 - no max() on the hot path
                        done = step
                    total, expert = event.total_steps, event.expert
                    if event.duration_s is not None:
                        step_time += event.duration_s
                    if ts > now:
                        now = ts
                        if ts >= sweep_at:
                            assert run is not None  # set above: this step's job
                            held[event.job] = (run, last_ts, done, total, expert, step_time)
                            _store_held(held)
                            run = run_job = None  # the sweep may forget views
                            state.now_ts = now
                            self._sweep(state)
                            sweep_at = state.swept_ts + sweep_every
                    continue
                elif type(event) is MemorySampled:  # as frequent: only its job's peaks change
                    view = run if event.job == run_job else job_of(event.job)
                    if view is not None:
                        _raise_peaks(view, event)
                    continue
                elif type(event) is StageStarted or type(event) is StageEnded:
                    # A stage boundary touches no step field but the job's last event time,
                    # which is held with them: the job's steps stay held across it.
                    ts = event.ts
                    if ts > now:
                        now = ts
                        if ts >= sweep_at:
                            if run is not None:
                                held[run_job] = (run, last_ts, done, total, expert, step_time)  # type: ignore[index]
                                run = run_job = None
                            _store_held(held)
                            state.now_ts = now
                            self._sweep(state)
                            sweep_at = state.swept_ts + sweep_every
                    if event.job == run_job:
                        view, last_ts = run, ts
                    elif held and (entry := held.get(event.job)) is not None:
                        view = entry[0]
                        held[event.job] = (view, ts, entry[2], entry[3], entry[4], entry[5])
                    else:
                        view = job_of(event.job)
                        if view is None:
                            view = jobs[event.job] = JobView(job=event.job)
                        view.last_ts = ts
                    assert view is not None  # the run's view, or one held, found or made
                    if type(event) is StageStarted:
                        view.stage = event.stage
                        view.stages.append(StageSpan(stage=event.stage, start_ts=ts))
                    else:
                        _stage_ended(view, event)
                    continue
                if run is not None:
                    held[run_job] = (run, last_ts, done, total, expert, step_time)  # type: ignore[index]
                    run = run_job = None
                if held:
                    _store_held(held)
                self._apply_other(state, event, now)
                now, sweep_at = state.now_ts, state.swept_ts + sweep_every
            except Exception as exc:
                if run is not None:
                    held[run_job] = (run, last_ts, done, total, expert, step_time)  # type: ignore[index]
                    run = run_job = None
                _store_held(held)
                # The event's time counts even though it failed, in whichever of the local and
                # the state saw it first; the state holds it before ``failed`` (which may raise:
                # a batch of one) so a batch and its events one by one agree.
                if state.now_ts > now:  # noqa: PLR1730 - both only ever rise
                    now = state.now_ts
                state.now_ts, sweep_at = now, state.swept_ts + sweep_every
                failed(event, exc)
        if run is not None:
            held[run_job] = (run, last_ts, done, total, expert, step_time)  # type: ignore[index]
        _store_held(held)
        state.now_ts = now
        return state

    def _apply_other(self, state: JobsState, event: Event, now: int) -> None:
        """Every event but a step and a memory sample (``state.now_ts`` is
        brought up to ``now`` first: the step path keeps it in a local)."""
        state.now_ts = now
        kind = type(event)
        ts = event.ts
        if ts > now:
            state.now_ts = ts
            if ts - state.swept_ts >= self.sweep_every_ns:
                self._sweep(state)
        handler = _HANDLERS.get(kind)
        if handler is None:
            if kind is WorkerHeartbeat:
                self._heartbeat(state, event)
            return
        view = state.jobs.get(event.job)
        if view is None:
            view = state.jobs[event.job] = JobView(job=event.job)
        # A job's own events prove its worker alive (the sweep reads view.last_ts), so only
        # lifecycle events and heartbeats touch the workers table.
        view.last_ts = ts
        handler(view, event)
        if handler in _LIFECYCLE_HANDLERS:  # status changes only here
            self._seen_worker(state, event.worker, ts)
            if view.status in TERMINAL_STATUSES:
                state.active.pop(event.job, None)
                state.finished[event.job] = None
                self._forget_old(state)
            else:
                state.active[event.job] = None
                state.finished.pop(event.job, None)  # a job id run again is live again

    @staticmethod
    def _seen_worker(state: JobsState, worker: str | None, ts: int) -> WorkerView | None:
        if worker is None:
            return None
        seen = state.workers.get(worker)
        if seen is None:
            seen = state.workers[worker] = WorkerView(worker=worker, last_ts=ts)
        elif ts > seen.last_ts:
            seen.last_ts = ts
        return seen

    def _heartbeat(self, state: JobsState, event: Event) -> None:
        assert isinstance(event, WorkerHeartbeat)
        seen = self._seen_worker(state, event.worker, event.ts)
        if seen is not None:
            seen.host, seen.pid, seen.devices = event.host, event.pid, event.devices

    def _sweep(self, state: JobsState) -> None:
        """Mark abandoned the running jobs whose worker, and the job itself, went silent."""
        state.swept_ts = state.now_ts
        horizon = state.now_ts - self.abandon_after_ns
        for job in list(state.active):
            view = state.jobs.get(job)
            if view is None or view.status != "running" or view.worker is None:
                continue
            if (view.last_ts or 0) >= horizon:
                continue  # the job itself spoke recently
            worker = state.workers.get(view.worker)
            if worker is not None and worker.last_ts < horizon:
                view.status = "abandoned"
                view.stage = None
                state.active.pop(job)
                state.finished[job] = None
        self._forget_old(state)

    def _forget_old(self, state: JobsState) -> None:
        if self.keep_finished is None:
            return
        if len(state.finished) <= self.keep_finished:
            return
        finished = state.finished = oldest_first(state.finished)
        while len(finished) > self.keep_finished:
            oldest, _ = finished.popitem(last=False)
            state.jobs.pop(oldest, None)


def _queued(view: JobView, event: Event) -> None:
    assert isinstance(event, JobQueued)
    view.queued_ts = event.ts
    view.model = view.model or event.model
    view.task = view.task or event.task
    view.traceparent = view.traceparent or event.traceparent


def _started(view: JobView, event: Event) -> None:
    assert isinstance(event, JobStarted)
    view.status = "running"
    view.started_ts = event.ts
    view.model, view.family, view.variant = event.model, event.family, event.variant
    view.task, view.worker = event.task, event.worker
    view.width, view.height, view.num_frames = event.width, event.height, event.num_frames
    view.total_steps, view.cfg = event.steps, event.cfg
    view.traceparent = event.traceparent or view.traceparent


def _stage_started(view: JobView, event: Event) -> None:
    assert isinstance(event, StageStarted)
    view.stage = event.stage
    view.stages.append(StageSpan(stage=event.stage, start_ts=event.ts))


def _stage_ended(view: JobView, event: Event) -> None:
    assert isinstance(event, StageEnded)
    for span in reversed(view.stages):
        if span.stage == event.stage and span.end_ts is None:
            break
    else:  # the start was lost (dropped or before a damaged record): reconstruct it
        start = event.ts - int(event.duration_s * 1e9)
        span = StageSpan(stage=event.stage, start_ts=start)
        view.stages.append(span)
    span.end_ts, span.duration_s, span.ok = event.ts, event.duration_s, event.ok
    if view.stage == event.stage:
        view.stage = None


#: A job's view and the step fields held back from it: last event time, steps done, total
#: steps, expert, time in steps.
_Held = tuple[JobView, int, int, int | None, str | None, float]


def _store_held(held: dict[str, _Held]) -> None:
    """Store the step fields held back from each job's view, and forget them."""
    for view, last_ts, done, total, expert, step_time in held.values():
        view.last_ts, view.steps_done, view.total_steps = last_ts, done, total
        view.expert, view.step_time_s = expert, step_time
    held.clear()


def _raise_peaks(view: JobView, event: MemorySampled) -> None:
    """Raise the job's peaks to the sample's readings (the first reading sets them)."""
    allocated = event.peak_allocated_bytes or event.allocated_bytes
    if allocated is not None:
        old = view.peak_allocated_bytes
        if old is None or allocated > old:
            view.peak_allocated_bytes = max(old or 0, allocated)
    reserved = event.peak_reserved_bytes or event.reserved_bytes
    if reserved is not None:
        old = view.peak_reserved_bytes
        if old is None or reserved > old:
            view.peak_reserved_bytes = max(old or 0, reserved)
    rss = event.host_rss_bytes or 0
    peak_rss = event.host_peak_rss_bytes or 0
    if peak_rss > rss:  # noqa: PLR1730 - a hot path: no max() call
        rss = peak_rss
    if rss:
        old = view.peak_rss_bytes
        if old is None or rss > old:
            view.peak_rss_bytes = rss


def _ended(view: JobView, event: Event, status: str, duration_s: float) -> None:
    view.status = status
    view.ended_ts = event.ts
    view.duration_s = duration_s
    view.stage = None


def _completed(view: JobView, event: Event) -> None:
    assert isinstance(event, JobCompleted)
    _ended(view, event, "completed", event.duration_s)
    view.output_path = event.output_path


def _failed(view: JobView, event: Event) -> None:
    assert isinstance(event, JobFailed)
    _ended(view, event, "failed", event.duration_s)
    view.error_type, view.error_message, view.oom = event.error_type, event.message, event.oom
    view.failed_step = event.step


def _cancelled(view: JobView, event: Event) -> None:
    assert isinstance(event, JobCancelled)
    _ended(view, event, "cancelled", event.duration_s)
    view.error_message = event.reason


_HANDLERS: Final = {
    JobQueued: _queued,
    JobStarted: _started,
    StageStarted: _stage_started,
    StageEnded: _stage_ended,
    JobCompleted: _completed,
    JobFailed: _failed,
    JobCancelled: _cancelled,
}

_LIFECYCLE_HANDLERS: Final = frozenset({_queued, _started, _completed, _failed, _cancelled})
