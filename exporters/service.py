"""The live side of ``wantel serve``: one projection runner following the log, fanned out.

:class:`TelemetryService` owns a single :class:`~telemetry.runner.ProjectionRunner` over every
default projection, so ``/metrics``, ``/api`` and ``/ws/progress`` all read the same state at the
same position, and a checkpoint (``<checkpoint_dir>/serve.ckpt``) lets a restart resume without
double counting. The runner's thread catches up with the log, marks the service ready, then
follows it; other sinks (the lifecycle log lines) are attached with :meth:`add_sink`.

The WebSocket fan-out is one of the runner's sinks (:class:`FanOut`). For each batch the runner
applies, it frames every event that matters to a viewer (see ``docs/websocket.md``), each with
its job's view as of that batch (computed and encoded once per job and batch), encodes each
frame once and pushes the batch's frames to each subscriber's bounded queue. The batch was
applied under the runner's lock, which is also what a new subscriber takes to read its
snapshot and record the position its live frames start at: the snapshot and the first live
frame it receives can never overlap or leave a gap. A subscriber that stops reading never
slows the thread or the other subscribers: when its queue overflows it is emptied and marked
for a fresh snapshot instead, and no frame is built while no subscriber can take one. Nor while
the server itself is far behind the log (a burst, a backlog after a restart): the frames would
be stale before any client read them, so clients sleep and get one snapshot near the end.
"""

from __future__ import annotations

import asyncio
import threading
import time
from array import array
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import dropwhile
from pathlib import Path
from typing import Any, Final

import msgspec

from exporters.liveness import LivenessSink
from telemetry.engine import CheckpointStore, ProjectionEngine
from telemetry.events import (
    TERMINAL_TYPES,
    Event,
    ExpertSwitched,
    GpuSampled,
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
    WorkerLost,
    WorkerStopped,
    to_builtins,
)
from telemetry.liveness import WORKER_TIMEOUT_S
from telemetry.log.base import Batch, EventLog, Position
from telemetry.projections import default_projections
from telemetry.projections.eta import FinishedEta
from telemetry.projections.jobs import JobsState, JobView, abandoned_by, stage_pieces
from telemetry.projections.queues import Forecast, forecast, running_finish
from telemetry.projections.summary import job_summary
from telemetry.runner import Applied, ProjectionRunner, Sink
from telemetry.tracing import job_trace_id, traceparent_sampled

CHECKPOINT_NAME: Final = "serve.ckpt"
#: Frames a subscriber may have waiting before it is switched to a fresh snapshot: four of the
#: emitter's largest batches, so a client that keeps up never overflows on a burst.
DEFAULT_SUBSCRIBER_BUFFER: Final = 16_384
#: How many finished jobs a snapshot lists (newest first).
DEFAULT_RECENT: Final = 20
#: Replies (pongs, error frames) a subscriber may have waiting: a client that sends this many
#: messages more than it reads is closed (1008, ``too_many_messages``).
DEFAULT_CONTROL_BUFFER: Final = 64
#: What a WebSocket's receive loop returns when its client flooded it (see above).
FLOODED: Final = object()
#: Reading a job's events, a gap of more than this many positions to the next one is crossed
#: by a fresh read from the log (which seeks) rather than by reading through the gap.
_READ_THROUGH: Final = 256

#: Which events become frames, and the frame type each becomes. Worker heartbeats, drop reports
#: and calibrations are the server's business, not a viewer's: they advance positions silently.
FRAME_TYPES: Final[dict[type[Event], str]] = {
    JobQueued: "job_queued",
    JobStarted: "job_started",
    StageStarted: "stage_started",
    StageEnded: "stage_ended",
    StageProgress: "stage_progress",
    StepEnded: "step",
    ExpertSwitched: "expert_switched",
    MemorySampled: "memory",
    GpuSampled: "gpu",
    JobCompleted: "job_completed",
    JobFailed: "job_failed",
    JobCancelled: "job_cancelled",
}
TERMINAL_FRAMES: Final = frozenset({"job_completed", "job_failed", "job_cancelled",
                                    "job_abandoned"})
#: Events that end other streams' jobs: each job they abandon gets a ``job_abandoned`` frame.
_LIVENESS: Final = (WorkerLost, WorkerStopped)


def abandoned_frames(position: Position, event: Event,
                     states: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(job, frame)`` for each job ``event`` (a ``WorkerLost`` or ``WorkerStopped``, just
    applied) abandoned: its ``job_abandoned`` terminal frame, with the reason, the worker, who
    declared it (``WorkerLost``) and the job's view."""
    frames: list[tuple[str, dict[str, Any]]] = []
    for view in abandoned_by(states["jobs"], event):
        job = view.job
        summary = summarize(states, job)
        data: dict[str, Any] = {"reason": view.abandon_reason, "worker": event.worker,
                                "declared_by": getattr(event, "declared_by", None),
                                "last_seen_ts": _seconds(getattr(event, "last_seen_ts", None))}
        if summary is not None:
            data["view"] = summary
        frames.append((job, frame("job_abandoned", position, job, event.ts / 1e9, data)))
    return frames


#: Moved to the frame header, or (``prompt``, present only with an explicit opt-in at record
#: time) never broadcast to viewers: ``prompt_sha256`` identifies a prompt well enough.
_DROPPED_FIELDS: Final = ("type", "job", "ts", "prompt")

_encoder = msgspec.json.Encoder()
_encode = _encoder.encode
_encode_into = _encoder.encode_into


def frame(type_: str, position: Position | None, job: str | None, ts: float,
          data: dict[str, Any]) -> dict[str, Any]:
    """The one frame shape of ``/ws/progress``: ``{type, position, job, ts, data}``."""
    return {"type": type_, "position": position, "job": job, "ts": ts, "data": data}


def encode_frame(value: dict[str, Any]) -> str:
    """A frame as compact JSON text (encoded once, sent to every subscriber)."""
    return _encode(value).decode()


def event_frame(position: Position, event: Event,
                view: dict[str, Any] | msgspec.Raw | None = None) -> dict[str, Any] | None:
    """The frame an event becomes, or ``None`` for events no viewer needs.

    ``data`` holds the event's own fields (``ts`` moves to the header, in seconds, because
    nanoseconds since the epoch do not fit a JavaScript number; an opted-in ``prompt`` is left
    out). Live frames also carry ``view``: the job's summary as of the batch that applied the
    event (a live emitter's flush: the event and its neighbours), possibly already encoded
    (``msgspec.Raw``). Frames replayed from the log for a ``since`` resume have no view — the
    projections' past states are not kept — and the snapshot sent before ``caught_up`` brings
    the client up to date.
    """
    kind = FRAME_TYPES.get(type(event))
    if kind is None:
        return None
    data: dict[str, Any] = to_builtins(event)
    for name in _DROPPED_FIELDS:
        data.pop(name, None)
    if view is not None:
        data["view"] = view
    return frame(kind, position, event.job, event.ts / 1e9, data)


class _Frame(msgspec.Struct, gc=False):
    """A live frame: encoded as :func:`frame`'s dict is (the same keys, in the same order)."""

    type: str
    position: int
    job: str
    ts: float
    data: Any


def _frame_builder(kind: type[Event],
                   name: str) -> Callable[[Event, Position, msgspec.Raw], _Frame]:
    """What builds ``kind``'s live frame: ``build(event, position, view)`` -> a :class:`_Frame`
    whose ``data`` is a struct of the event's fields but ``job``, ``ts`` and ``prompt`` (in
    order, never omitted), then ``view`` (the job's view, already encoded: :func:`_view`).

    Generated per type, as :mod:`dataclasses` generates ``__init__``: the fields are read by
    name (a slot load each) straight into the struct's constructor, ~70 ns an event less than
    picking them out of ``msgspec.structs.astuple(event)`` with an ``itemgetter`` (a tuple
    built, then another). A struct, not a dict: building one is one C call, where a dict is a
    hash insert a key.
    """
    names = [field for field in kind.__struct_fields__ if field not in _DROPPED_FIELDS]
    for n in names:
        if not n.isidentifier() or n == "view":  # the generated code names each field
            raise ValueError(f"{kind.__name__}.{n}: cannot be a live frame's data field")
    data = msgspec.defstruct(f"{kind.__name__}Frame", [(n, Any) for n in (*names, "view")],
                             gc=False)
    source = (f"def build(event, position, view):\n"
              f"    return Frame(NAME, position, event.job, event.ts / 1e9, "
              f"Data({''.join(f'event.{n}, ' for n in names)}view))\n")
    namespace: dict[str, Any] = {"Frame": _Frame, "Data": data, "NAME": name}
    exec(compile(source, f"<frame builder {kind.__name__}>", "exec"), namespace)
    build: Callable[[Event, Position, msgspec.Raw], _Frame] = namespace["build"]
    return build


#: Per event type that becomes a frame: what builds its live frame.
_LIVE: Final = {kind: _frame_builder(kind, name) for kind, name in FRAME_TYPES.items()}


def _view(view: dict[str, Any]) -> msgspec.Raw:
    """A job's view, encoded once per job and batch (not once per frame)."""
    return msgspec.Raw(_encode(view))


def _live_frame(position: Position, event: Event, view: msgspec.Raw) -> str:
    """:func:`event_frame` with a view (as :func:`_view`), encoded: the same text, without the
    detour through builtins (msgspec encodes the nested structs and tuples the event's fields
    hold exactly as :func:`~telemetry.events.to_builtins` converts them).
    :meth:`FanOut.on_applied` runs this inlined, encoding into one reused buffer."""
    return _encode(_LIVE[type(event)](event, position, view)).decode()


def _seconds(ts: int | None) -> float | None:
    return None if ts is None else ts / 1e9


def queue_forecast(states: dict[str, Any], now: float | None = None) -> Forecast | None:
    """The queues' forecast at ``now`` (the wall clock by default): the exporter reads the
    clock, the fold never does. ``None`` for an engine without the queues projection."""
    if "queues" not in states:
        return None
    return forecast(states, time.time() if now is None else now)


class Forecaster:
    """The queues' forecast for many views read at one moment: worked out once, on the first
    view of a queued job that needs it (a running job's predicted finish needs no
    simulation of the queues: :func:`~telemetry.projections.queues.running_finish`)."""

    __slots__ = ("_forecast", "now", "states")

    def __init__(self, states: dict[str, Any], now: float | None = None) -> None:
        self.states = states
        self.now = time.time() if now is None else now
        self._forecast: Forecast | bool | None = False  # False: not worked out yet

    def forecast(self) -> Forecast | None:
        """The forecast (``None`` for an engine without the queues projection)."""
        if self._forecast is False:
            self._forecast = queue_forecast(self.states, self.now)
        return self._forecast  # type: ignore[return-value]


def _queue_fields(states: dict[str, Any], view: JobView,
                  ahead: Forecaster | None) -> dict[str, Any]:
    """``queue``, ``priority``, ``queue_position`` (1 = next; ``None`` once started),
    ``predicted_start`` and ``predicted_finish`` (``{"at", "p10", "p90"}``, unix seconds)."""
    fields: dict[str, Any] = {"queue": view.queue, "priority": view.priority,
                              "queue_position": None, "predicted_start": None,
                              "predicted_finish": None}
    if ahead is None or "queues" not in states:
        return fields
    if view.status == "queued":
        found = ahead.forecast()
        waiting = found.jobs.get(view.job) if found is not None else None
        if waiting is not None:
            fields["queue_position"] = waiting.position
            fields["predicted_start"] = waiting.start.as_json() if waiting.start else None
            fields["predicted_finish"] = waiting.finish.as_json() if waiting.finish else None
    elif view.status == "running":
        end = running_finish(states, view.job, ahead.now)
        fields["predicted_finish"] = end.as_json() if end is not None else None
    return fields


def summarize(states: dict[str, Any], job: str, *,
              ahead: Forecaster | bool | None = True) -> dict[str, Any] | None:
    """One job as the list, the snapshot and the live page show it; ``None`` if unknown.

    The figures are the read model's (:mod:`telemetry.projections.summary`): progress weighted
    by expected stage cost, not a bare step count; steps/s the smoothed rate while running, the
    measured mean after. ``ahead``: the :class:`Forecaster` shared by the views read at one
    moment (the job's place, predicted start and finish); ``True`` makes one for this job
    alone, ``False`` leaves those fields ``None``.
    """
    summary = job_summary(states, job)
    if summary is None:
        return None
    if ahead is True:
        ahead = Forecaster(states)
    elif ahead is False:
        ahead = None
    view = summary.view
    point = summary.latest_eta
    eta = None
    if point is not None and view.status == "running":
        eta = {"remaining_s": point.remaining_s, "p10_s": point.p10_s, "p90_s": point.p90_s,
               "estimating": point.estimating, "ts": point.ts / 1e9}
    return {
        "job": view.job,
        "status": view.status,
        "model": view.model,
        "family": view.family,
        "variant": view.variant,
        "task": view.task,
        "worker": view.worker,
        "width": view.width,
        "height": view.height,
        "num_frames": view.num_frames,
        "cfg": view.cfg,
        "stage": view.stage,
        "stage_pieces": stage_pieces(view),
        "step": view.steps_done,
        "steps": view.total_steps,
        "expert": view.expert,
        "progress": summary.progress,
        "eta": eta,
        "steps_per_second": summary.steps_per_second,
        "peak_memory_bytes": summary.peak_memory_bytes,
        "queued_ts": _seconds(view.queued_ts),
        "started_ts": _seconds(view.started_ts),
        "ended_ts": _seconds(view.ended_ts),
        "duration_s": view.duration_s,
        "eta_error": _eta_error(summary.finished_eta),
        "error": ({"type": view.error_type, "message": view.error_message, "oom": view.oom,
                   "stage": view.failed_stage, "step": view.failed_step,
                   "category": view.failure_category, "suggestions": list(view.suggestions)}
                  if view.status == "failed" else None),
        "cancel_reason": view.error_message if view.status == "cancelled" else None,
        "abandon_reason": view.abandon_reason if view.status == "abandoned" else None,
        "trace_id": _trace_id(view),
        **_queue_fields(states, view, ahead),
    }


def _trace_id(view: JobView) -> str | None:
    """The job's trace (:func:`telemetry.tracing.job_trace_id`, the span exporter's rule),
    ``None`` when its caller did not sample it: no span of it is exported."""
    if not traceparent_sampled(view.traceparent):
        return None
    opened = view.queued_ts if view.queued_ts is not None else view.started_ts
    return job_trace_id(view.job, view.traceparent, opened_ts=opened)


def _eta_error(done: FinishedEta | None) -> dict[str, Any] | None:
    """How wrong the job's ETAs were (signed relative error), once it completed."""
    if done is None:
        return None
    values = list(done.residuals.values())
    return {
        "mean_abs": sum(abs(v) for v in values) / len(values) if values else None,
        "before_start": done.before_start_error,
        "by_bucket": dict(done.residuals),
    }


def queues_data(ahead: Forecast | None) -> dict[str, Any]:
    """The queues and the workers serving them, as ``/api/jobs``' envelope shows them: each
    queue's depth (by model) and waiting jobs in order; each live worker's queues, slots,
    running jobs and predicted free time (``{"at", "p10", "p90"}`` unix seconds, and
    ``predicted_free_in_s`` from now; ``None`` while a running job has no estimate)."""
    if ahead is None:
        return {"queues": [], "workers": []}
    waiting: dict[str, list[str]] = {}
    for job, place in sorted(ahead.jobs.items(), key=lambda item: item[1].position):
        waiting.setdefault(place.queue, []).append(job)
    by_model: dict[str, dict[str, int]] = {}
    for (queue, model), depth in ahead.depth.items():
        by_model.setdefault(queue, {})[model] = depth
    names = sorted(set(waiting) | {q for w in ahead.workers.values() for q in w.queues})
    queues = [{"queue": name, "depth": len(waiting.get(name, ())),
               "by_model": by_model.get(name, {}), "waiting": waiting.get(name, []),
               "workers": sorted(w.worker for w in ahead.workers.values() if name in w.queues)}
              for name in names]
    workers = [{"worker": w.worker, "queues": list(w.queues), "slots": w.slots,
                "running": list(w.running),
                "predicted_free": w.free.as_json() if w.free is not None else None,
                "predicted_free_in_s": (max(w.free.at - ahead.now, 0.0)
                                        if w.free is not None else None)}
               for w in sorted(ahead.workers.values(), key=lambda w: w.worker)]
    return {"queues": queues, "workers": workers}


def snapshot_data(states: dict[str, Any], *, job: str | None = None,
                  recent: int = DEFAULT_RECENT) -> dict[str, Any]:
    """Running jobs (oldest first) and recently finished ones (newest first)."""
    jobs: JobsState = states["jobs"]
    ahead = Forecaster(states)
    if job is not None:
        summary = summarize(states, job, ahead=ahead)
        ended = summary is not None and job in jobs.finished
        running = [summary] if summary is not None and not ended else []
        return {"running": running, "finished": [summary] if ended else []}
    running_list = [s for j in jobs.active if (s := summarize(states, j, ahead=ahead)) is not None]
    finished_list: list[dict[str, Any]] = []
    for j in reversed(jobs.finished):
        if len(finished_list) >= recent:
            break
        summary = summarize(states, j, ahead=False)
        if summary is not None:
            finished_list.append(summary)
    return {"running": running_list, "finished": finished_list}


@dataclass
class Subscriber:
    """One WebSocket client's end of the fan-out: a bounded queue the service thread fills.

    The service thread pushes under ``_lock`` and wakes the client's event loop at most once
    per wait; the client's coroutine drains everything at once. Control frames (pong, errors)
    go in a separate queue so overflow never eats a reply; it holds at most
    ``control_capacity`` replies (:meth:`push_control` refuses one more: the client sends
    faster than it reads, and is closed).
    """

    loop: asyncio.AbstractEventLoop
    job: str | None
    capacity: int
    min_position: Position = 0
    overflowed: bool = False
    overflows: int = 0
    control_capacity: int = DEFAULT_CONTROL_BUFFER
    #: The most replies that were ever waiting at once.
    control_peak: int = 0
    _queue: deque[str] = field(default_factory=deque)
    _control: deque[str] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _signalled: bool = False
    closed: bool = False

    def push(self, texts: list[str], positions: list[Position],
             jobs: list[str] | None = None) -> None:
        """Queue frames (texts, with their positions in ascending order and, for a subscriber
        of one job, their jobs); called by the service's runner thread.

        Frames before :attr:`min_position` are left out here, under the subscriber's lock: a
        resync may have moved it since the caller looked.
        """
        with self._lock:
            if self.closed or self.overflowed or not texts:
                return
            start = 0
            if positions[0] < self.min_position:
                start = bisect_left(positions, self.min_position)
            chosen = texts[start:] if start else texts
            if self.job is not None:
                assert jobs is not None, "a subscriber of one job needs the frames' jobs"
                chosen = [text for text, job in zip(chosen, jobs[start:], strict=True)
                          if job == self.job]
            if not chosen:
                return
            queue = self._queue
            if len(queue) + len(chosen) > self.capacity:  # as one at a time would overflow
                queue.clear()
                self.overflowed = True
                self.overflows += 1
            else:
                queue.extend(chosen)
            if self._signalled:
                return
            self._signalled = True
        self._signal()

    def _signal(self) -> None:
        """Wake the client's loop (once ``_signalled`` was set under the lock)."""
        try:
            self.loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # the client's loop is gone; it will be unsubscribed
            self.closed = True

    def fall_behind(self) -> None:
        """The server is far behind the log: drop what is queued and owe a fresh snapshot, but
        let the client sleep until :meth:`wake` (a snapshot now would be stale at once)."""
        with self._lock:
            if self.closed or self.overflowed:
                return
            self._queue.clear()
            self.overflowed = True
            self.overflows += 1

    def wake(self) -> None:
        """Wake the client if it owes a snapshot and is not woken yet (the server is live)."""
        with self._lock:
            if self.closed or not self.overflowed or self._signalled:
                return
            self._signalled = True
        self._signal()

    def push_control(self, text: str) -> bool:
        """Queue a reply from the client's own loop (never dropped by the frames' overflow);
        False, and nothing queued, when ``control_capacity`` replies are waiting already."""
        with self._lock:
            if len(self._control) >= self.control_capacity:
                return False
            self._control.append(text)
            self.control_peak = max(self.control_peak, len(self._control))
        self._wake.set()
        return True

    async def next_frames(self) -> list[str] | None:
        """Wait for frames; ``None`` means the queue overflowed and a snapshot is due."""
        while True:
            with self._lock:
                if self._control:
                    items = list(self._control)
                    self._control.clear()
                    return items
                if self.overflowed:
                    return None
                if self._queue:
                    items = list(self._queue)
                    self._queue.clear()
                    self._signalled = False
                    return items
                self._wake.clear()
                self._signalled = False
            await self._wake.wait()

    def reset(self, min_position: Position) -> None:
        """After a resync snapshot: empty, no longer overflowed, frames from ``min_position``."""
        with self._lock:
            self._queue.clear()
            self.overflowed = False
            self.min_position = min_position


@dataclass(frozen=True)
class Subscription:
    """A new subscriber, its snapshot and where its live frames start."""

    subscriber: Subscriber
    snapshot: dict[str, Any]
    position: Position | None  # the last position the snapshot includes (None: empty log)
    live_from: Position


class FanOut(Sink):
    """The WebSocket fan-out, as a sink of the service's runner: frames to each subscriber.

    Subscribers are added and removed by :class:`TelemetryService` under the runner's lock;
    the tuple is replaced, never mutated, so a step in flight keeps the one it read.
    """

    name = "websocket"

    def __init__(self, *, coalesce_behind: int = DEFAULT_SUBSCRIBER_BUFFER) -> None:
        self.subscribers: tuple[Subscriber, ...] = ()
        #: While at least this many events are stored beyond the step being applied (a burst,
        #: a fleet's backlog), frames are not built: no client could read them before they were
        #: stale, and building them costs the catch-up more than the projections do. Clients
        #: get one ``overflow`` snapshot once the server is within this of the log's end.
        self.coalesce_behind = coalesce_behind
        self._sleeping: list[Subscriber] = []

    def on_applied(self, applied: Applied) -> None:
        """Frame the batch's events for everyone who can take them, and push.

        The per-event work is :func:`_live_frame` inlined (this loop runs for every event
        while a client is connected); a job's view is summarised and encoded once per batch.
        """
        if applied.behind >= self.coalesce_behind:
            for sub in self.subscribers:
                if not sub.closed and not sub.overflowed:
                    sub.fall_behind()
                    self._sleeping.append(sub)
            return
        if self._sleeping:  # near the end again: the snapshot they owe is current now
            for sub in self._sleeping:
                sub.wake()
            self._sleeping = []
        subscribers = [s for s in self.subscribers if not s.closed and not s.overflowed]
        if not subscribers or not applied.events:
            return
        floor = min(s.min_position for s in subscribers)
        if applied.next <= floor:
            return
        wanted: set[str] | None = None  # None: every job
        if all(s.job is not None for s in subscribers):
            wanted = {s.job for s in subscribers if s.job is not None}
        by_job = any(s.job is not None for s in subscribers)  # the frames' jobs are needed
        states = applied.engine.states
        views: dict[str, msgspec.Raw | None] = {}  # None: no view of the job (yet)
        texts: list[str] = []
        positions: list[Position] = []
        jobs: list[str] = []
        keep, place, name = texts.append, positions.append, jobs.append
        live, into = _LIVE, _encode_into
        buffer = bytearray()  # each frame is encoded into it: it keeps its memory, grown once
        last_job: str | None = None  # a flush is a run of one job's events: its view in locals
        view: msgspec.Raw | None = None
        ahead: Forecaster | None = None
        items: Iterator[tuple[Position, Event]] = applied.positioned()
        if wanted is not None:  # checks out of the loop that runs for every event
            items = ((position, event) for position, event in items
                     if event.job in wanted or isinstance(event, _LIVENESS))
        for position, event in dropwhile(lambda item: item[0] < floor, items):
            build = live.get(type(event))
            if build is None:
                if isinstance(event, _LIVENESS):  # the jobs it abandoned end: terminal frames
                    for job, ending in abandoned_frames(position, event, states):
                        if wanted is None or job in wanted:
                            keep(encode_frame(ending))
                            place(position)
                            if by_job:
                                name(job)
                    last_job = None  # views changed
                    views.clear()
                continue
            job = event.job
            if job != last_job:
                if job in views:
                    view = views[job]
                else:
                    if ahead is None:
                        ahead = Forecaster(states)  # one per batch, for every view
                    summary = summarize(states, job, ahead=ahead)
                    view = views[job] = None if summary is None else _view(summary)
                last_job = job
            if view is None:  # as event_frame leaves it: no view key
                made = event_frame(position, event)
                assert made is not None  # a type in FRAME_TYPES
                keep(encode_frame(made))
            else:  # _live_frame, inlined: encode_into a reused buffer saves ~0.1 us a frame
                into(build(event, position, view), buffer)
                keep(buffer.decode())
            place(position)
            if by_job:
                name(job)
        for sub in subscribers:
            sub.push(texts, positions, jobs if by_job else None)

    def shutdown(self, timeout: float | None = None) -> None:
        """Close every subscriber (their connections end)."""
        for sub in self.subscribers:
            sub.closed = True
        self.subscribers = ()


class UnknownJob(LookupError):
    """A job the service does not know (never seen, or forgotten as finished jobs are)."""


class _IndexState(msgspec.Struct, array_like=True):
    """:class:`JobIndex` in a checkpoint: each job's positions (int64, native order), and the
    finished jobs, oldest first."""

    positions: dict[str, bytes]
    finished: list[str]


class JobIndex(Sink):
    """Where each job's events are in the log: their positions, kept as the runner applies
    them, so ``/api/jobs/{id}/events`` reads those positions and nothing else.

    Only jobs the jobs projection tracks are indexed (worker streams are not jobs), and only
    as many finished ones as it keeps: the oldest finished job is forgotten first, and any the
    projection forgot (an abandoned job) go at the next sweep. 8 bytes a position. The index
    is kept in the runner's checkpoint, so a restart does not lose what came before it;
    a checkpoint written before the index existed leaves it knowing only what follows
    (:attr:`covers_from`: earlier events are found by reading the log, as before).
    """

    name = "job-index"

    def __init__(self, *, keep_finished: int) -> None:
        self.keep_finished = keep_finished
        self.positions: dict[str, array[int]] = {}
        self.finished: dict[str, None] = {}  # oldest first
        #: Events before this position may be missing from the index (see above).
        self.covers_from: Position = 0
        self.restored = False

    def on_applied(self, applied: Applied) -> None:
        jobs = applied.engine.states["jobs"].jobs
        positions = self.positions
        get, terminal = positions.get, _TERMINAL_EVENTS
        last_job: str | None = None
        found: array[int] | None = None
        for position, event in applied.positioned():
            job = event.job
            if job != last_job:  # a batch is mostly runs of one job's events
                last_job = job
                found = get(job)
                if found is None and job in jobs:
                    found = positions[job] = array("q")
            if found is None:
                continue
            found.append(position)
            if type(event) in terminal:
                self._finished(job)
        if len(positions) > len(jobs) + 1024:  # jobs the projection forgot without an end
            self.positions = {j: p for j, p in positions.items() if j in jobs}
            self.finished = {j: None for j in self.finished if j in self.positions}

    def _finished(self, job: str) -> None:
        finished = self.finished
        finished.pop(job, None)
        finished[job] = None
        while len(finished) > self.keep_finished:
            oldest = next(iter(finished))
            del finished[oldest]
            self.positions.pop(oldest, None)

    def get(self, job: str) -> array[int] | None:
        """The job's positions (growing while it runs), or ``None``."""
        return self.positions.get(job)

    def snapshot(self) -> bytes | None:
        return msgspec.msgpack.encode(_IndexState(
            positions={job: found.tobytes() for job, found in self.positions.items()},
            finished=list(self.finished)))

    def restore(self, data: bytes) -> None:
        state = msgspec.msgpack.decode(data, type=_IndexState)
        positions: dict[str, array[int]] = {}
        for job, raw in state.positions.items():
            found = positions[job] = array("q")
            found.frombytes(raw)
        self.positions = positions
        self.finished = {job: None for job in state.finished}
        self.restored = True


_TERMINAL_EVENTS: Final = frozenset(TERMINAL_TYPES)


class TelemetryService:
    """Follows a log with every projection; serves consistent reads and live frames."""

    def __init__(
        self,
        log: EventLog,
        *,
        checkpoint_dir: str | Path,
        keep_finished: int = 10_000,
        poll_interval: float = 0.01,
        checkpoint_interval: float = 5.0,
        subscriber_buffer: int = DEFAULT_SUBSCRIBER_BUFFER,
        control_buffer: int = DEFAULT_CONTROL_BUFFER,
        recent: int = DEFAULT_RECENT,
        worker_timeout_s: float = WORKER_TIMEOUT_S,
        declare_lost_as: str | None = None,
    ) -> None:
        """``declare_lost_as``: declare workers silent past ``worker_timeout_s`` lost, by
        appending ``WorkerLost`` under this name (:class:`exporters.liveness.LivenessSink`);
        ``None``: only read (the projections still sweep silent jobs, in event time)."""
        self.log = log
        #: Seconds a silent worker's running jobs wait before they count as abandoned.
        self.worker_timeout_s = worker_timeout_s
        self.checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME
        self.fanout = FanOut()
        self.index = JobIndex(keep_finished=keep_finished)
        engine = ProjectionEngine(default_projections(keep_finished=keep_finished,
                                                      worker_timeout_s=worker_timeout_s))
        self.runner = ProjectionRunner(log, engine, CheckpointStore(self.checkpoint_path),
                                       sinks=[self.fanout, self.index],
                                       checkpoint_interval=checkpoint_interval,
                                       poll_interval=poll_interval, name="wantel-serve")
        if not self.index.restored:  # a checkpoint from before the index: it misses these
            self.index.covers_from = engine.position
        self.liveness: LivenessSink | None = None
        if declare_lost_as is not None:
            self.liveness = LivenessSink(log, engine, timeout_s=worker_timeout_s,
                                         declared_by=declare_lost_as)
            self.runner.add_sink(self.liveness)
        self.poll_interval = poll_interval
        self.subscriber_buffer = subscriber_buffer
        self.control_buffer = control_buffer
        self.recent = recent
        self.started_at = time.time()
        #: WebSocket clients closed for sending more than they read.
        self.flood_closes = 0
        #: The most replies any WebSocket client has had waiting at once.
        self.control_peak = 0

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def engine(self) -> ProjectionEngine:
        """The engine whose states every endpoint reads (under ``lock``)."""
        return self.runner.engine

    @property
    def lock(self) -> threading.RLock:
        """Held while the engine changes; hold it to read ``engine.states`` consistently."""
        return self.runner.lock

    @property
    def error(self) -> BaseException | None:
        """What stopped the runner's thread, if something did (``/readyz`` reports it)."""
        return self.runner.error

    @property
    def failure(self) -> Any:
        """The follower's current failure while it retries (``None`` when it is well)."""
        return self.runner.failure

    @property
    def ready(self) -> bool:
        """True once everything stored at start-up has been applied."""
        return self.runner.caught_up.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until caught up (for scripts and tests); returns ``ready``."""
        return self.runner.caught_up.wait(timeout)

    @property
    def position(self) -> Position | None:
        """The last applied position (``None`` before the first event)."""
        next_position = self.engine.position
        return next_position - 1 if next_position > 0 else None

    def add_sink(self, sink: Sink) -> None:
        """Tell ``sink`` what the service's runner applies (before :meth:`start`)."""
        self.runner.add_sink(sink)

    def start(self) -> None:
        """Start catching up and following in the runner's background thread."""
        self.runner.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop following and write a checkpoint, so a restart resumes where this left off;
        shut the sinks down (subscribers are closed)."""
        self.runner.shutdown(timeout)
        with self.lock:
            self.fanout.shutdown()

    def __enter__(self) -> TelemetryService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- subscribers ---------------------------------------------------------------------------

    def subscribe(self, loop: asyncio.AbstractEventLoop, *, job: str | None = None,
                  since: Position | None = None) -> Subscription:
        """Register a subscriber and take its snapshot atomically with respect to new frames."""
        with self.lock:
            live_from = self.engine.position
            min_position = max(live_from, since + 1) if since is not None else live_from
            sub = Subscriber(loop=loop, job=job, capacity=self.subscriber_buffer,
                             min_position=min_position, control_capacity=self.control_buffer)
            self.fanout.subscribers = (*self.fanout.subscribers, sub)
            snap = snapshot_data(self.engine.states, job=job, recent=self.recent)
            return Subscription(subscriber=sub, snapshot=snap, position=self.position,
                                live_from=live_from)

    def resync(self, sub: Subscriber) -> tuple[dict[str, Any], Position | None]:
        """A fresh snapshot for a subscriber whose queue overflowed; live frames follow it."""
        with self.lock:
            sub.reset(self.engine.position)
            return snapshot_data(self.engine.states, job=sub.job, recent=self.recent), \
                self.position

    def unsubscribe(self, sub: Subscriber) -> None:
        """Forget a subscriber (its connection ended)."""
        with self.lock:
            sub.closed = True
            self.fanout.subscribers = tuple(s for s in self.fanout.subscribers if s is not sub)
            self.control_peak = max(self.control_peak, sub.control_peak)

    def count_flood(self) -> None:
        """A WebSocket client was closed for sending more than it read."""
        self.flood_closes += 1

    @property
    def subscriber_count(self) -> int:
        """How many WebSocket clients are connected."""
        return len(self.fanout.subscribers)

    # -- reading -------------------------------------------------------------------------------

    def read_states(self, fn: Callable[[dict[str, Any]], Any]) -> Any:
        """Run ``fn(states)`` under the lock: a consistent read of every projection."""
        with self.lock:
            return fn(self.engine.states)

    def replay(self, start: Position, end: Position, *, job: str | None = None,
               chunk: int = 512) -> Iterator[list[str]]:
        """Encoded frames for positions ``start ≤ p < end``, from the log, in chunks.

        Used for ``?since=`` resumes: the frames are built from the events alone (no view).
        """
        out: list[str] = []
        for item in self.log.read(start):
            if not isinstance(item, Batch):
                if item.next >= end:
                    break
                continue
            for position, event in item.positioned():
                if position >= end:
                    break
                if job is not None and event.job != job:
                    continue
                made = event_frame(position, event)
                if made is not None:
                    out.append(encode_frame(made))
                    if len(out) >= chunk:
                        yield out
                        out = []
            if item.next >= end:
                break
        if out:
            yield out

    def knows_job(self, job: str) -> bool:
        """Whether ``job`` is one the service can list events of (tracked, or still indexed):
        answered from memory."""
        if self.index.get(job) is not None:
            return True
        return bool(self.read_states(lambda states: job in states["jobs"].jobs))

    def job_events(self, job: str, *, since: Position = -1,
                   limit: int = 1000) -> tuple[list[dict[str, Any]], Position | None, bool]:
        """The job's events after ``since``: ``(events, last position, more)``.

        Only the job's own positions are read (:class:`JobIndex`); a run of them close
        together is read in one pass, a gap of more than a few hundred positions by a fresh
        read (the local log seeks to it). :class:`UnknownJob` if the job is not indexed.
        """
        found: list[dict[str, Any]] = []
        last: Position | None = None
        start = since + 1
        covers_from = self.index.covers_from
        if start < covers_from:  # before the index: the log scan it replaced, for those
            found, last, more = self._scan_job_events(job, start, covers_from, limit)
            if more:
                return found, last, True
            start = covers_from
        positions = self.index.get(job)
        if positions is None:  # not indexed: told of no event yet, or forgotten
            if found or covers_from or self.read_states(lambda st: job in st["jobs"].jobs):
                return found, last, False
            raise UnknownJob(job)
        first = bisect_left(positions, start)
        wanted = list(positions[first:first + limit - len(found) + 1])
        more = len(wanted) > limit - len(found)
        if more:
            wanted.pop()
        for position, event in self._read_positions(wanted):
            if event.job != job:  # positions never change hands; if they did, say nothing
                continue
            found.append({"position": position, "event": to_builtins(event)})
            last = position
        return found, last, more

    def _read_positions(self, wanted: list[Position]) -> Iterator[tuple[Position, Event]]:
        """The events at ``wanted`` (ascending), reading through short gaps and seeking over
        long ones."""
        at = 0
        read = getattr(self.log, "read_near", self.log.read)  # a local log decodes less
        while at < len(wanted):
            items = read(wanted[at])
            try:
                for item in items:
                    if not isinstance(item, Batch):
                        while at < len(wanted) and wanted[at] < item.next:
                            at += 1  # quarantined since it was indexed
                        if at == len(wanted) or wanted[at] - item.next > _READ_THROUGH:
                            break
                        continue
                    events, first = item.events, item.first
                    while at < len(wanted) and wanted[at] < item.next:
                        position = wanted[at]
                        if position >= first:
                            yield position, events[position - first]
                        at += 1
                    if at == len(wanted) or wanted[at] - item.next > _READ_THROUGH:
                        break
                else:
                    at = len(wanted)  # the log ends before them (it cannot, but never loop)
            finally:
                close = getattr(items, "close", None)
                if close is not None:
                    close()

    def _scan_job_events(self, job: str, start: Position, end: Position,
                         limit: int) -> tuple[list[dict[str, Any]], Position | None, bool]:
        """The job's events in ``[start, end)`` by reading the log through."""
        found: list[dict[str, Any]] = []
        last: Position | None = None
        for item in self.log.read(start):
            if not isinstance(item, Batch):
                if item.next >= end:
                    break
                continue
            for position, event in item.positioned():
                if position >= end:
                    return found, last, False
                if event.job != job:
                    continue
                if len(found) >= limit:
                    return found, last, True
                found.append({"position": position, "event": to_builtins(event)})
                last = position
            if item.next >= end:
                break
        return found, last, False
