"""The jobs projection: each job's status, current stage, steps done and stage timeline.

This is the read model behind ``wantel replay``, ``/api/jobs`` and the live page's rows.
Durations come from the events (measured where they happened), never from a clock here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Final

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
    StageProgress,
    StageStarted,
    StepEnded,
    WorkerHeartbeat,
    WorkerLost,
    WorkerStopped,
)
from telemetry.liveness import WORKER_TIMEOUT_S as TIMEOUT_S
from telemetry.projections.base import NO_JOB, OnFailure, RuleTable, oldest_first
from telemetry.projections.readings import memory_readings, stage_start

TERMINAL_STATUSES: Final = frozenset({"completed", "failed", "cancelled", "abandoned"})


class StageSpan(msgspec.Struct, kw_only=True):
    """One stage of one job: when it started and, once ended, how long it took."""

    stage: str
    start_ts: int
    end_ts: int | None = None
    duration_s: float | None = None
    ok: bool | None = None
    #: Of a stage that reports its pieces (``StageProgress``: Wan's decode), how many of how
    #: many had finished, as last reported.
    pieces_done: int | None = None
    pieces_total: int | None = None


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
    #: Why it failed (``telemetry.guidance.CATEGORIES``) and what to try, as ``JobFailed`` says.
    failure_category: str | None = None
    suggestions: tuple[str, ...] = ()
    failed_step: int | None = None
    failed_stage: str | None = None
    output_path: str | None = None
    traceparent: str | None = None
    #: The queue it was queued in and its priority there (``None`` if never queued).
    queue: str | None = None
    priority: int | None = None
    #: Why an ``abandoned`` job was: ``worker lost`` (a ``WorkerLost`` declaration),
    #: ``worker stopped`` (its worker shut down mid-job), ``worker silent`` (the projection's
    #: own sweep, in event time, where no aggregator declared anything).
    abandon_reason: str | None = None

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
    #: ``stopped`` (its ``WorkerStopped`` is its latest word) or ``lost`` (declared lost, and
    #: nothing from it since); ``None`` while it may be alive. Any later heartbeat or
    #: lifecycle event of the worker clears it.
    gone: str | None = None
    #: ``last_seen_ts`` of the latest ``WorkerLost`` applied to it: a second declaration of
    #: the same silence counts once.
    lost_seen_ts: int | None = None


class JobsState(msgspec.Struct, kw_only=True):
    """All jobs by id, in the order they first appeared, and the workers running them."""

    jobs: dict[str, JobView] = {}
    workers: dict[str, WorkerView] = {}
    active: dict[str, None] = {}  # jobs queued or running (an ordered set)
    finished: dict[str, None] = {}  # ended jobs, oldest first (an ordered set)
    now_ts: int = 0  # the newest event time seen: the projection's "now"
    swept_ts: int = 0

    def alive_workers(self, timeout_s: float) -> list[WorkerView]:
        """Workers heard from within ``timeout_s`` of the newest event that have neither
        stopped nor been declared lost since."""
        horizon = self.now_ts - int(timeout_s * 1e9)
        return [w for w in self.workers.values() if w.last_ts >= horizon and w.gone is None]


class JobsProjection(RuleTable):
    """Fold lifecycle, stage and step events into :class:`JobView`\\ s.

    A job whose worker has been silent for ``abandon_after_s`` (in event time: the newest
    event's ``ts``, never the clock) becomes ``abandoned``. With ``keep_finished``, only that
    many ended jobs are kept (a long-running server's memory stays flat).

    :meth:`apply` states the rules, one handler per event type. :meth:`apply_many` is the
    engine's fast path over a batch, held to the same state byte for byte by
    ``tests/telemetry/test_fold_equivalence.py``. It folds ~2.3× faster than the rules, which
    keeps a replay with this projection above 1M events/s (``docs/design-notes.md``).
    """

    name = "jobs"
    #: 4: a stage's pieces (``StageProgress``) on its span.
    version = 4
    state_type = JobsState
    handles = frozenset({
        JobQueued, JobStarted, StageStarted, StageEnded, StageProgress, StepEnded,
        MemorySampled, WorkerHeartbeat, JobCompleted, JobFailed, JobCancelled, WorkerStopped,
        WorkerLost,
    })

    def __init__(self, *, abandon_after_s: float = TIMEOUT_S, keep_finished: int | None = None):
        self.abandon_after_ns = int(abandon_after_s * 1e9)
        self.sweep_every_ns = max(self.abandon_after_ns // 4, 1_000_000_000)
        self.keep_finished = keep_finished
        self._rules = {
            StepEnded: self._step,
            MemorySampled: self._sampled,
            StageStarted: self._stage_started,
            StageEnded: self._stage_ended,
            StageProgress: self._stage_progress,
            WorkerHeartbeat: self._heartbeat,
            WorkerStopped: self._stopped,
            WorkerLost: self._lost,
            **{kind: partial(self._lifecycle, change) for kind, change in _LIFECYCLE.items()},
        }

    def initial(self) -> JobsState:
        """No jobs yet."""
        return JobsState()

    # -- the rules, one per event type -----------------------------------------------------

    def _step(self, state: JobsState, event: StepEnded) -> None:
        """A step ended: the job has done at least ``step + 1`` steps (a late step never
        lowers the count), of the total and with the expert the step names, and the step's
        measured time adds to the job's time in steps. A step of a job whose start was lost
        makes the job: it still exists."""
        view = _heard(state, event)
        view.steps_done = max(view.steps_done, event.step + 1)
        view.total_steps, view.expert = event.total_steps, event.expert
        if event.duration_s is not None:
            view.step_time_s += event.duration_s
        self._tick(state, event.ts)

    def _sampled(self, state: JobsState, event: MemorySampled) -> None:
        """A memory sample raises its job's peaks. It is no sign of life and moves no clock:
        samples are taken between the events that are (its job's steps and stages)."""
        view = state.jobs.get(event.job)
        if view is not None:
            _raise_peaks(view, event)

    def _stage_started(self, state: JobsState, event: StageStarted) -> None:
        """The job is now in ``stage``; its timeline gets an open span."""
        self._tick(state, event.ts)
        _open_stage(_heard(state, event), event)

    def _stage_ended(self, state: JobsState, event: StageEnded) -> None:
        """The stage's open span ends (:func:`_close_stage`)."""
        self._tick(state, event.ts)
        _close_stage(_heard(state, event), event)

    def _stage_progress(self, state: JobsState, event: StageProgress) -> None:
        """A piece of a stage finished: a sign of life (a long decode reports nothing else),
        and the stage's open span holds how many of how many (never fewer than before)."""
        self._tick(state, event.ts)
        span = _open_span(_heard(state, event), event.stage)
        if span is not None and event.done > (span.pieces_done or 0):
            span.pieces_done, span.pieces_total = event.done, event.total

    def _lifecycle(self, change: Callable[[JobView, Any], None], state: JobsState,
                   event: Event) -> None:
        """A job was queued, started or ended: ``change`` sets what the event says, the
        worker that sent it is alive, and the job joins the active or the ended jobs (a job
        id run again is live again)."""
        self._tick(state, event.ts)
        view = _heard(state, event)
        change(view, event)
        self._seen_worker(state, event.worker, event.ts)
        if view.status in TERMINAL_STATUSES:
            state.active.pop(event.job, None)
            state.finished[event.job] = None
            self._forget_old(state)
        else:
            state.active[event.job] = None
            state.finished.pop(event.job, None)

    def _heartbeat(self, state: JobsState, event: WorkerHeartbeat) -> None:
        """The worker is alive, on that host and pid, with those devices."""
        self._tick(state, event.ts)
        seen = self._seen_worker(state, event.worker, event.ts)
        if seen is not None:
            seen.host, seen.pid, seen.devices = event.host, event.pid, event.devices

    def _stopped(self, state: JobsState, event: WorkerStopped) -> None:
        """The worker shut down cleanly: not alive from here, never "lost"; a job of it still
        running (the process exited mid-job) is abandoned at once, ``worker stopped`` (before
        the clock moves: a sweep then must not call it silent)."""
        seen = self._seen_worker(state, event.worker, event.ts)
        if seen is not None:
            seen.host, seen.pid, seen.gone = event.host, event.pid, "stopped"
            self._abandon_jobs_of(state, seen.worker, event.ts, "worker stopped")
        self._tick(state, event.ts)

    def _lost(self, state: JobsState, event: WorkerLost) -> None:
        """An aggregator declared the worker lost. Applied once per ``(worker,
        last_seen_ts)``, and not at all when the log already holds a later word of the worker
        or of one of its running jobs (the declaration is refuted: the worker spoke after the
        silence it was declared lost for). Then the worker is not alive, and its running jobs
        are abandoned, ``worker lost``. Then the clock moves to the declaration's time (after:
        the sweep that may start must not call the worker's jobs merely silent)."""
        self._declared(state, event)
        self._tick(state, event.ts)

    def _declared(self, state: JobsState, event: WorkerLost) -> None:
        """:meth:`_lost`'s rule, before the clock moves."""
        worker = event.worker
        if worker is None:
            return
        seen = state.workers.get(worker)
        if seen is None:  # declared lost on what this state never saw (forgotten, or none)
            seen = state.workers[worker] = WorkerView(worker=worker, last_ts=event.last_seen_ts)
        if seen.lost_seen_ts == event.last_seen_ts or seen.last_ts > event.last_seen_ts:
            return
        for job in state.active:
            view = state.jobs.get(job)
            if (view is not None and view.worker == worker and view.status == "running"
                    and (view.last_ts or 0) > event.last_seen_ts):
                return
        seen.gone, seen.lost_seen_ts = "lost", event.last_seen_ts
        self._abandon_jobs_of(state, worker, event.ts, "worker lost")

    def _abandon_jobs_of(self, state: JobsState, worker: str, ts: int, reason: str) -> None:
        """Mark abandoned, ended at ``ts`` for ``reason``, every running job of ``worker``."""
        for job in list(state.active):
            view = state.jobs.get(job)
            if view is None or view.status != "running" or view.worker != worker:
                continue
            view.status, view.stage = "abandoned", None
            view.ended_ts, view.abandon_reason = ts, reason
            state.active.pop(job)
            state.finished[job] = None
        self._forget_old(state)

    # -- time, workers, and what is kept ---------------------------------------------------

    def _tick(self, state: JobsState, ts: int) -> None:
        """The projection's clock is the newest event time seen; every ``sweep_every_ns``
        of it, running jobs whose worker went silent are swept (:meth:`_sweep`).

        A step moves the clock once its job's view has it, so the sweep it starts never
        abandons that job; every other event moves it first (the order replays have always
        had, which snapshots keep).
        """
        if ts > state.now_ts:
            state.now_ts = ts
            if ts - state.swept_ts >= self.sweep_every_ns:
                self._sweep(state)

    @staticmethod
    def _seen_worker(state: JobsState, worker: str | None, ts: int) -> WorkerView | None:
        """The worker was heard from at ``ts`` (a late event never makes it younger): alive
        again if it had stopped or was declared lost."""
        if worker is None:
            return None
        seen = state.workers.get(worker)
        if seen is None:
            seen = state.workers[worker] = WorkerView(worker=worker, last_ts=ts)
        else:
            seen.last_ts = max(seen.last_ts, ts)
            seen.gone = None
        return seen

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
                view.abandon_reason = "worker silent"
                state.active.pop(job)
                state.finished[job] = None
        self._forget_old(state)

    def _forget_old(self, state: JobsState) -> None:
        """Keep the newest ``keep_finished`` ended jobs, if bounded."""
        if self.keep_finished is None:
            return
        if len(state.finished) <= self.keep_finished:
            return
        finished = state.finished = oldest_first(state.finished)
        while len(finished) > self.keep_finished:
            oldest, _ = finished.popitem(last=False)
            state.jobs.pop(oldest, None)

    # -- the fast path ---------------------------------------------------------------------

    def apply_many(self, state: JobsState, events: Sequence[Event],
                   failed: OnFailure) -> JobsState:
        """:meth:`apply` over ``events``, each failure reported to ``failed``.

        Steps are three events in five of a replay. Their fields — last event time, steps
        done, total, expert, time in steps — are held back from the job's view while the batch
        is folded and stored once (:func:`_store_held`): the current job's in locals, other
        jobs' in ``held`` (jobs run side by side, so a batch alternates between them; entries
        are replaced, never popped, which would resize the dict every few steps). Stage
        boundaries update the held time and leave the steps held; memory
        samples touch no held field. Any other event goes to :meth:`apply` once the held
        fields are stored and the clock is in the state; so do a sweep (:meth:`_swept`) and
        a failure. The arithmetic is the rules', in the same order.
        """
        jobs = state.jobs
        held: dict[str, _Held] = {}
        held_of, job_of, apply = held.get, jobs.get, self.apply
        now = state.now_ts
        sweep_at = state.swept_ts + self.sweep_every_ns  # ``ts >= sweep_at``: no subtraction
        # The view whose step fields are in the locals below, and its job (set together).
        run: JobView | None = None
        run_job: object = NO_JOB
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
                        else:  # its view (made if its start was lost: the job still exists)
                            run = job_of(event.job) or _new_view(jobs, event.job)
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
                            run, run_job = None, NO_JOB  # the sweep may forget views
                            sweep_at = self._swept(state, now, held)
                elif type(event) is MemorySampled:  # as frequent: only its job's peaks change
                    view = run if event.job == run_job else job_of(event.job)
                    if view is not None:
                        _raise_peaks(view, event)
                elif type(event) is StageStarted or type(event) is StageEnded:
                    ts = event.ts
                    if ts > now:
                        now = ts
                        if ts >= sweep_at:
                            if run is not None:
                                held[run_job] = (run, last_ts, done, total, expert, step_time)  # type: ignore[index]
                            run, run_job = None, NO_JOB
                            sweep_at = self._swept(state, now, held)
                    if event.job == run_job:
                        view, last_ts = run, ts
                    elif held and (entry := held_of(event.job)) is not None:  # held: stamp it
                        view = entry[0]
                        held[event.job] = (view, ts, entry[2], entry[3], entry[4], entry[5])
                    else:
                        view = job_of(event.job) or _new_view(jobs, event.job)
                        view.last_ts = ts
                    if type(event) is StageStarted:
                        _open_stage(view, event)  # type: ignore[arg-type]  # run is set with run_job
                    elif type(event) is StageEnded:  # always: mypy narrows only on the call
                        _close_stage(view, event)  # type: ignore[arg-type]
                else:
                    if run is not None:
                        held[run_job] = (run, last_ts, done, total, expert, step_time)  # type: ignore[index]
                        run, run_job = None, NO_JOB
                    if held:
                        _store_held(held)
                    state.now_ts = now
                    apply(state, event)
                    now, sweep_at = state.now_ts, state.swept_ts + self.sweep_every_ns
            except Exception as exc:
                if run is not None:
                    held[run_job] = (run, last_ts, done, total, expert, step_time)  # type: ignore[index]
                    run, run_job = None, NO_JOB
                _store_held(held)
                # The event's time counts even though it failed, in whichever of the local and
                # the state saw it first.
                now = max(now, state.now_ts)
                state.now_ts, sweep_at = now, state.swept_ts + self.sweep_every_ns
                failed(event, exc)
        if run is not None:
            held[run_job] = (run, last_ts, done, total, expert, step_time)  # type: ignore[index]
        _store_held(held)
        state.now_ts = now
        return state

    def _swept(self, state: JobsState, now: int, held: dict[str, _Held]) -> int:
        """A fast path's sweep: the held step fields stored, the clock in the state, the sweep
        (:meth:`_sweep`); when the next one is due."""
        _store_held(held)
        state.now_ts = now
        self._sweep(state)
        return state.swept_ts + self.sweep_every_ns


def abandoned_by(state: JobsState, event: Event) -> list[JobView]:
    """The jobs ``event`` (a ``WorkerLost`` or ``WorkerStopped`` just applied) abandoned,
    oldest first: its worker's jobs ``abandoned`` at the event's time. For sinks that announce
    each of them (the WebSocket's ``job_abandoned`` frames, ``job.abandoned`` webhooks)."""
    worker = event.worker
    found: list[JobView] = []
    if worker is None or not isinstance(event, (WorkerLost, WorkerStopped)):
        return found
    for job in reversed(state.finished):  # abandoned now: at the newest end, in end order
        view = state.jobs.get(job)
        if view is None or view.ended_ts is None:
            continue
        if view.ended_ts < event.ts:
            break  # ended before the event: so did every older one
        if view.status == "abandoned" and view.worker == worker and view.ended_ts == event.ts:
            found.append(view)
    found.reverse()
    return found


def _heard(state: JobsState, event: Event) -> JobView:
    """The event's job, heard from at the event's time; made if its start was lost."""
    view = state.jobs.get(event.job)
    if view is None:
        view = state.jobs[event.job] = JobView(job=event.job)
    view.last_ts = event.ts
    return view


def _open_stage(view: JobView, event: StageStarted) -> None:
    """The job is in the stage from the event's time: an open span on its timeline."""
    view.stage = event.stage
    view.stages.append(StageSpan(stage=event.stage, start_ts=event.ts))


def _close_stage(view: JobView, event: StageEnded) -> None:
    """The latest open span of the stage ends, with the measured duration and outcome; if the
    stage's start was lost, a span is made from the end and the duration
    (:func:`~telemetry.projections.readings.stage_start`). The job leaves the stage."""
    span = _open_span(view, event.stage)
    if span is None:
        span = StageSpan(stage=event.stage, start_ts=stage_start(event))
        view.stages.append(span)
    span.end_ts, span.duration_s, span.ok = event.ts, event.duration_s, event.ok
    if view.stage == event.stage:
        view.stage = None


def _open_span(view: JobView, stage: str) -> StageSpan | None:
    """The latest span of ``stage`` on the job's timeline that has not ended, if any."""
    for span in reversed(view.stages):
        if span.stage == stage and span.end_ts is None:
            return span
    return None


def stage_pieces(view: JobView) -> tuple[int, int] | None:
    """How many of how many pieces the stage the job is in has finished, if it reports them."""
    span = None if view.stage is None else _open_span(view, view.stage)
    if span is None or span.pieces_done is None or span.pieces_total is None:
        return None
    return span.pieces_done, span.pieces_total


def _raise_peaks(view: JobView, event: MemorySampled) -> None:
    """The job's peaks rise to the sample's readings (:func:`memory_readings`): the first
    reading of a kind sets its peak, a higher one raises it."""
    allocated, reserved, _, rss = memory_readings(event)
    if allocated is not None and (view.peak_allocated_bytes is None
                                  or allocated > view.peak_allocated_bytes):
        view.peak_allocated_bytes = allocated
    if reserved is not None and (view.peak_reserved_bytes is None
                                 or reserved > view.peak_reserved_bytes):
        view.peak_reserved_bytes = reserved
    if rss is not None and (view.peak_rss_bytes is None or rss > view.peak_rss_bytes):
        view.peak_rss_bytes = rss


def _queued(view: JobView, event: JobQueued) -> None:
    """Queued at the event's time, in its queue at its priority; the model, task and trace
    context the request names, unless the job's start already said them."""
    view.queued_ts = event.ts
    view.queue, view.priority = event.queue, event.priority
    view.model = view.model or event.model
    view.task = view.task or event.task
    view.traceparent = view.traceparent or event.traceparent


def _started(view: JobView, event: JobStarted) -> None:
    """Running, with what the worker says it runs (its trace context, else the queued one)."""
    view.status = "running"
    view.started_ts = event.ts
    view.model, view.family, view.variant = event.model, event.family, event.variant
    view.task, view.worker = event.task, event.worker
    view.width, view.height, view.num_frames = event.width, event.height, event.num_frames
    view.total_steps, view.cfg = event.steps, event.cfg
    view.traceparent = event.traceparent or view.traceparent


def _ended(view: JobView, event: Event, status: str, duration_s: float) -> None:
    """Ended with ``status`` after ``duration_s`` (measured by the worker); in no stage."""
    view.status = status
    view.ended_ts = event.ts
    view.duration_s = duration_s
    view.stage = None


def _completed(view: JobView, event: JobCompleted) -> None:
    """Completed, with where its output went."""
    _ended(view, event, "completed", event.duration_s)
    view.output_path = event.output_path


def _failed(view: JobView, event: JobFailed) -> None:
    """Failed: the error, whether it ran out of memory, and at which step."""
    _ended(view, event, "failed", event.duration_s)
    view.error_type, view.error_message, view.oom = event.error_type, event.message, event.oom
    view.failure_category, view.suggestions = event.category, event.suggestions
    view.failed_step, view.failed_stage = event.step, event.stage


def _cancelled(view: JobView, event: JobCancelled) -> None:
    """Cancelled, and why."""
    _ended(view, event, "cancelled", event.duration_s)
    view.error_message = event.reason


#: What each lifecycle event changes in its job's view (:meth:`JobsProjection._lifecycle`).
_LIFECYCLE: Final[dict[type[Event], Callable[[JobView, Any], None]]] = {
    JobQueued: _queued,
    JobStarted: _started,
    JobCompleted: _completed,
    JobFailed: _failed,
    JobCancelled: _cancelled,
}

#: A job's view and the step fields held back from it: last event time, steps done, total
#: steps, expert, time in steps.
_Held = tuple[JobView, int, int, int | None, str | None, float]


def _new_view(jobs: dict[str, JobView], job_id: str) -> JobView:
    """The view of a job whose start was lost (it still exists), made."""
    view = jobs[job_id] = JobView(job=job_id)
    return view


def _store_held(held: dict[str, _Held]) -> None:
    """Store the step fields held back from each job's view, and forget them."""
    for view, last_ts, done, total, expert, step_time in held.values():
        view.last_ts, view.steps_done, view.total_steps = last_ts, done, total
        view.expert, view.step_time_s = expert, step_time
    held.clear()
