"""The queues projection: each queue's waiting jobs in order, and the workers that serve it.

A job enters a queue with ``JobQueued`` (its ``queue`` and ``priority``) and leaves it when it
starts or ends (a job cancelled while it waits leaves without starting). Order in a queue:
higher ``priority`` first, then arrival (the order the log holds the ``JobQueued`` records).
A worker *serves* a queue once it has started a job from it; how many jobs it runs at once
(its slots) is the most it has been seen running together (a process with two worker threads
has two). Completed jobs' durations are kept per model (the newest :data:`HISTORY`), the
prior of a waiting job's duration — and apart, those of jobs whose worker had completed one
before they started (*warm*): a process's first jobs pay what it does once (lazy set-up, a
pipeline's first call in each thread), as the ETA's warm device level knows, and a service
that holds its pipelines runs every later job warm.

The fold keeps no clock. What needs one — when each waiting job will start and finish, when
each worker will be free — is :func:`forecast`, a read of this state, the jobs state and the
ETA state at a ``now`` the caller gives (the server's wall clock, or an event's time).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import msgspec

from telemetry.events import Event, JobCancelled, JobCompleted, JobFailed, JobQueued, JobStarted
from telemetry.liveness import WORKER_TIMEOUT_S
from telemetry.projections.eta import EtaState, current
from telemetry.projections.jobs import JobsState

#: Completed durations kept per model: the prior of a waiting job's duration.
HISTORY: Final = 32
#: The log spread a model's job durations are assumed to have before many are seen: repeated
#: identical runs vary by ~5-6 % on a quiet machine, but jobs that share a process (worker
#: threads, the service's own HTTP serving) and a busy CPU vary by ±30 % from one minute to
#: the next (measured: tiny jobs beside the example service of docs/api.md).
PRIOR_SIGMA: Final = 0.25
#: How many jobs' worth of weight that assumption has against the observed spread.
PRIOR_WEIGHT: Final = 4.0
Z90: Final = 1.2816  # the standard normal's 90th percentile


class Waiting(msgspec.Struct, kw_only=True, array_like=True, gc=False):
    """A job waiting in a queue."""

    queue: str
    priority: int
    arrival: int  # the fold's count of JobQueued records: ties in priority go by it
    model: str
    queued_ts: int
    worker: str | None = None  # who queued it (the service's emitter)


class Running(msgspec.Struct, kw_only=True, array_like=True, gc=False):
    """A started job: where it came from (``queue`` is None if it was never queued) and who
    runs it."""

    worker: str | None
    model: str
    started_ts: int
    queue: str | None = None
    warm: bool = False  # its worker had completed a job when it started


class WorkerSlots(msgspec.Struct, kw_only=True):
    """A worker as the queues see it: the queues it serves, its running jobs, its slots."""

    queues: dict[str, None] = {}
    running: dict[str, None] = {}
    slots: int = 1
    last_end_ts: int | None = None  # when its latest job ended
    completed: int = 0  # jobs it has completed


class QueuesState(msgspec.Struct, kw_only=True):
    """Waiting jobs (all queues), running jobs, workers, and recent durations by model."""

    waiting: dict[str, Waiting] = {}
    running: dict[str, Running] = {}
    workers: dict[str, WorkerSlots] = {}
    durations: dict[str, list[float]] = {}
    #: The same, of warm jobs only (their worker had completed one when they started).
    warm_durations: dict[str, list[float]] = {}
    #: The newest :data:`HISTORY` hand-overs: seconds from a worker's job ending to its next
    #: job starting, for jobs that were already waiting when it ended (the service's own
    #: dispatch, and the pipeline call's set-up before ``JobStarted``).
    handovers: list[float] = []
    arrivals: int = 0

    def order(self, queue: str) -> list[str]:
        """The jobs waiting in ``queue``, the next to start first."""
        entries = [(job, w) for job, w in self.waiting.items() if w.queue == queue]
        entries.sort(key=lambda item: (-item[1].priority, item[1].arrival))
        return [job for job, _ in entries]

    def queues(self) -> list[str]:
        """Every queue with a waiting job or a serving worker, sorted."""
        names = {w.queue for w in self.waiting.values()}
        for worker in self.workers.values():
            names.update(worker.queues)
        return sorted(names)


class QueuesProjection:
    """Fold ``JobQueued``, ``JobStarted`` and the endings into :class:`QueuesState`."""

    name = "queues"
    #: 2: warm jobs' durations kept apart (a process's first jobs no longer inflate the
    #: expected duration of a service's later ones).
    version = 2
    state_type = QueuesState
    handles = frozenset({JobQueued, JobStarted, JobCompleted, JobFailed, JobCancelled})

    def initial(self) -> QueuesState:
        """No queue, no worker."""
        return QueuesState()

    def apply(self, state: QueuesState, event: Event) -> QueuesState:
        """A queued job joins its queue (unless it already started); a started one leaves it,
        runs on its worker (who now serves that queue and has at least as many slots as jobs
        it runs; if it waited for the slot the worker's latest end freed, that hand-over's
        length joins the hand-overs); an ended one leaves wherever it is, a completed one's
        duration joins its model's history."""
        if isinstance(event, JobQueued):
            _queued(state, event)
        elif isinstance(event, JobStarted):
            _started(state, event)
        elif isinstance(event, JobCompleted | JobFailed | JobCancelled):
            _ended(state, event)
        return state


def _queued(state: QueuesState, event: JobQueued) -> None:
    """Waits in ``event.queue`` from now on, behind everything of its priority already there
    (queued again: it moves to its new place)."""
    if event.job in state.running:
        return
    state.arrivals += 1
    state.waiting[event.job] = Waiting(queue=event.queue, priority=event.priority,
                                       arrival=state.arrivals, model=event.model,
                                       queued_ts=event.ts, worker=event.worker)


def _started(state: QueuesState, event: JobStarted) -> None:
    """Leaves its queue and runs on its worker; the worker serves the queue and has at least
    as many slots as the jobs it now runs."""
    waiting = state.waiting.pop(event.job, None)
    queue = waiting.queue if waiting is not None else None
    worker = None if event.worker is None else state.workers.get(event.worker)
    state.running[event.job] = Running(worker=event.worker, model=event.model,
                                       started_ts=event.ts, queue=queue,
                                       warm=worker is not None and worker.completed > 0)
    if event.worker is None:
        return
    if worker is None:
        worker = state.workers[event.worker] = WorkerSlots()
    ended = worker.last_end_ts
    if (waiting is not None and ended is not None and waiting.queued_ts <= ended <= event.ts
            and len(worker.running) < worker.slots):
        # It waited for this worker's slot, which the latest end freed.
        state.handovers.append((event.ts - ended) / 1e9)
        del state.handovers[:-HISTORY]
        worker.last_end_ts = None  # one hand-over per end
    worker.running[event.job] = None
    if queue is not None:
        worker.queues[queue] = None
    worker.slots = max(worker.slots, len(worker.running))


def _ended(state: QueuesState, event: Event) -> None:
    """Leaves its queue or its worker; a completed job's duration joins its model's history."""
    state.waiting.pop(event.job, None)
    running = state.running.pop(event.job, None)
    if running is None:
        return
    worker = None if running.worker is None else state.workers.get(running.worker)
    if worker is not None:
        worker.running.pop(event.job, None)
        worker.last_end_ts = event.ts
    if isinstance(event, JobCompleted):
        _remember(state.durations, running.model, event.duration_s)
        if running.warm:
            _remember(state.warm_durations, running.model, event.duration_s)
        if worker is not None:
            worker.completed += 1


def _remember(histories: dict[str, list[float]], model: str, seconds: float) -> None:
    """``seconds`` joins ``model``'s history, which keeps the newest :data:`HISTORY`."""
    history = histories.setdefault(model, [])
    history.append(seconds)
    del history[:-HISTORY]


# -- the read model: what needs a clock ------------------------------------------------------


class Interval(NamedTuple):
    """A predicted moment (unix seconds) or duration (seconds), with its p10–p90 interval."""

    at: float
    p10: float
    p90: float

    def plus(self, other: Interval) -> Interval:
        """This moment after ``other`` (a duration), each bound with its own bound."""
        return Interval(self.at + other.at, self.p10 + other.p10, self.p90 + other.p90)

    def as_json(self) -> dict[str, float]:
        """``{"at", "p10", "p90"}``."""
        return {"at": self.at, "p10": self.p10, "p90": self.p90}


class JobForecast(NamedTuple):
    """A waiting job: its queue, its place (1 = next), and when it should start and end
    (``None`` while no live worker serves its queue or a duration ahead is unknown)."""

    queue: str
    position: int
    start: Interval | None
    finish: Interval | None


@dataclass(frozen=True, slots=True)
class WorkerForecast:
    """A live worker: when it can take a job next (the earliest end among its running jobs,
    ``now`` with a free slot; ``None`` while a running job has no estimate yet)."""

    worker: str
    queues: tuple[str, ...]
    slots: int
    running: tuple[str, ...]
    free: Interval | None


@dataclass
class Forecast:
    """Every waiting job's place and predicted start and finish, every live worker's free
    time, and the depth of each queue by model, at ``now``."""

    now: float
    jobs: dict[str, JobForecast] = field(default_factory=dict)
    finishes: dict[str, Interval] = field(default_factory=dict)  # running jobs' ends
    workers: dict[str, WorkerForecast] = field(default_factory=dict)
    depth: dict[tuple[str, str], int] = field(default_factory=dict)  # (queue, model) → jobs


def expected_duration(states: dict[str, Any], model: str, now_s: float) -> Interval | None:
    """How long a job of ``model`` should take once started, from the first of these that
    says: the mean predicted total of its model's running jobs whose ETA has measured steps,
    or has learned from this log's completed jobs (what the ETA model knows of this
    machine, warm or cold, and what those jobs show now); its model's recent completed warm
    jobs, two or more (a service's later jobs are warm), else all its recent completed jobs,
    two or more (a fleet of one process per job has only cold ones), taken as log-normal
    (:func:`_log_normal`); the running jobs' ETAs at their bare priors; the one completed
    job's duration. Else unknown."""
    queues: QueuesState = states["queues"]
    measured, estimating = _running_totals(states, model)
    eta: EtaState = states["eta"]
    learned = measured + estimating if eta.learned.jobs > 0 else measured
    if learned:
        return _mean(learned)
    history = queues.warm_durations.get(model, [])
    if len(history) < 2:
        history = queues.durations.get(model, [])
    if len(history) >= 2:
        return _log_normal(history)
    if estimating:
        return _mean(estimating)
    return Interval(history[0], history[0], history[0]) if history else None


def _running_totals(states: dict[str, Any], model: str) -> tuple[list[Interval], list[Interval]]:
    """The predicted totals of ``model``'s running jobs (elapsed + their ETA's remaining):
    those whose ETA has measured steps, and those still at their prior ("estimating")."""
    queues: QueuesState = states["queues"]
    eta: EtaState = states["eta"]
    measured: list[Interval] = []
    estimating: list[Interval] = []
    for job, running in queues.running.items():
        if running.model != model:
            continue
        point = current(eta, job)
        if point is None:
            continue
        elapsed = max((point.ts - running.started_ts) / 1e9, 0.0)
        total = Interval(elapsed + point.remaining_s, elapsed + point.p10_s,
                         elapsed + point.p90_s)
        (estimating if point.estimating else measured).append(total)
    return measured, estimating


def _mean(totals: list[Interval]) -> Interval:
    """The mean of predicted totals, each quantile apart."""
    n = len(totals)
    return Interval(sum(t.at for t in totals) / n, sum(t.p10 for t in totals) / n,
                    sum(t.p90 for t in totals) / n)


def _log_normal(values: list[float]) -> Interval:
    """The predictive median and 10th/90th percentiles of the next value, taking ``values``
    as log-normal: the log spread shrunk towards :data:`PRIOR_SIGMA` with
    :data:`PRIOR_WEIGHT` pseudo-observations (a few jobs say little about their spread), and
    widened by ``sqrt(1 + 1/n)`` for the unknown mean."""
    logs = [math.log(max(v, 1e-6)) for v in values]
    n = len(logs)
    mean = sum(logs) / n
    sample = sum((x - mean) ** 2 for x in logs) / (n - 1) if n > 1 else 0.0
    variance = ((n - 1) * sample + PRIOR_WEIGHT * PRIOR_SIGMA ** 2) / (n - 1 + PRIOR_WEIGHT)
    spread = Z90 * math.sqrt(variance * (1 + 1 / n))
    return Interval(math.exp(mean), math.exp(mean - spread), math.exp(mean + spread))


def _spread(ordered: list[float]) -> Interval | None:
    """The median and 10th/90th percentiles of sorted values; ``None`` for none."""
    if not ordered:
        return None
    return Interval(_quantile(ordered, 0.5), _quantile(ordered, 0.1), _quantile(ordered, 0.9))


def _quantile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of sorted values, linearly interpolated."""
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _running_end(states: dict[str, Any], job: str, running: Running, now_s: float,
                 durations: dict[str, Interval | None]) -> Interval | None:
    """When a running job should end: its latest ETA moved on to ``now`` (never before
    ``now``); while that ETA is still only its prior ("estimating": under two steps seen) and
    the model has a history, or without an ETA, the model's expected duration after its
    start (:func:`expected_duration`, memoised in ``durations``)."""
    point = current(states["eta"], job)
    queues: QueuesState = states["queues"]
    if point is not None and (not point.estimating
                              or len(queues.durations.get(running.model, ())) < 2):
        remaining, low, high = point.aged(now_s - point.ts / 1e9)
        return Interval(now_s + remaining, now_s + low, now_s + high)
    if running.model not in durations:
        durations[running.model] = expected_duration(states, running.model, now_s)
    expected = durations[running.model]
    if expected is None:
        return None
    started = running.started_ts / 1e9
    return Interval(max(started + expected.at, now_s), max(started + expected.p10, now_s),
                    max(started + expected.p90, now_s))


def running_finish(states: dict[str, Any], job: str, now_s: float) -> Interval | None:
    """When the running ``job`` should end, as :func:`forecast` reckons it (without
    simulating the queues: what a running job's view needs)."""
    entry = states["queues"].running.get(job)
    return None if entry is None else _running_end(states, job, entry, now_s, {})


def _lost(queues: QueuesState, jobs: JobsState, horizon: int) -> set[str]:
    """Waiting jobs whose queue went with its process: the worker that queued them has been
    silent past the liveness timeout (its in-memory queue is gone; they will not start)."""
    lost: set[str] = set()
    for job, waiting in queues.waiting.items():
        if waiting.worker is None:
            continue
        seen = jobs.workers.get(waiting.worker)
        if seen is not None and seen.last_ts < horizon:
            lost.add(job)
    return lost


def forecast(states: dict[str, Any], now_s: float, *,
             worker_timeout_s: float = WORKER_TIMEOUT_S) -> Forecast:
    """The queues at ``now_s`` (unix seconds): a read of folded state, never a fold.

    Each queue is simulated on its own, as list scheduling: the slots of the live workers that
    serve it become free when their running jobs should end, plus a hand-over (the median and
    p10/p90 of the recent ones: the service's dispatch and the call's set-up before
    ``JobStarted``); a free slot, now. Each waiting job, in order, starts on the slot free
    first and holds it for its model's expected duration (:func:`expected_duration`) and a
    hand-over. The p10 and p90 bounds are carried through the same
    assignment, each from its own bounds. A slot whose end is unknown (a running job with no
    estimate yet) is left out; a job whose duration is unknown, and everything behind it on
    its slot, gets no prediction. Jobs of other queues that a shared worker will take first
    are not foreseen. Jobs queued by a process that has been silent past the liveness timeout
    are left out (its queue went with it): they have no place and count in no depth.
    """
    queues: QueuesState = states["queues"]
    jobs: JobsState = states["jobs"]
    result = Forecast(now=now_s)
    horizon = jobs.now_ts - int(worker_timeout_s * 1e9)
    handover = _spread(sorted(queues.handovers)) or Interval(0.0, 0.0, 0.0)
    durations: dict[str, Interval | None] = {}  # by model, worked out once
    live: dict[str, list[Interval | None]] = {}
    for name, worker in queues.workers.items():
        seen = jobs.workers.get(name)
        if seen is not None and seen.last_ts < horizon:
            continue  # silent past the timeout: its jobs are abandoned, it serves no queue
        ends: list[Interval | None] = []
        running: list[str] = []
        for job in worker.running:
            view = jobs.jobs.get(job)
            entry = queues.running.get(job)
            if entry is None or (view is not None and view.status != "running"):
                continue
            end = _running_end(states, job, entry, now_s, durations)
            if end is not None:
                result.finishes[job] = end
            ends.append(end.plus(handover) if end is not None else None)
            running.append(job)
        idle = Interval(now_s, now_s, now_s)
        ends.extend(idle for _ in range(max(worker.slots - len(ends), 0)))
        live[name] = ends
        known = [end for end in ends if end is not None]
        free = min(known) if len(known) == len(ends) and known else None
        result.workers[name] = WorkerForecast(worker=name, queues=tuple(worker.queues),
                                              slots=worker.slots, running=tuple(running),
                                              free=free)
    lost = _lost(queues, jobs, horizon)
    by_queue: dict[str, list[tuple[int, int, str, str]]] = {}
    for job, waiting in queues.waiting.items():
        if job in lost:
            continue
        key = (waiting.queue, waiting.model)
        result.depth[key] = result.depth.get(key, 0) + 1
        by_queue.setdefault(waiting.queue, []).append(
            (-waiting.priority, waiting.arrival, job, waiting.model))
    for queue, waiting_jobs in by_queue.items():
        waiting_jobs.sort()
        # The free times of the slots serving the queue, earliest first (unknown ones out).
        free_at = [end for name, worker in queues.workers.items()
                   if queue in worker.queues and name in live
                   for end in live[name] if end is not None]
        heapq.heapify(free_at)
        for position, (_, _, job, model) in enumerate(waiting_jobs, start=1):
            start: Interval | None = None
            finish: Interval | None = None
            if free_at:
                start = heapq.heappop(free_at)
                if model not in durations:
                    durations[model] = expected_duration(states, model, now_s)
                duration = durations[model]
                if duration is not None:
                    finish = start.plus(duration)
                    heapq.heappush(free_at, finish.plus(handover))
            result.jobs[job] = JobForecast(queue, position, start, finish)
    return result


__all__ = ["HISTORY", "Forecast", "Interval", "JobForecast", "QueuesProjection", "QueuesState",
           "WorkerForecast", "expected_duration", "forecast", "running_finish"]
