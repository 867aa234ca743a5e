"""Structured logs: a job-lifecycle log fed from the event log.

How lines are rendered (JSON or console) is the application's choice, made once
(``wantel.logs.configure_logging``); this module only writes through structlog.

:class:`LifecycleLogger` turns lifecycle events read from the log into one line each, carrying
the ``trace_id`` and ``span_id`` of the matching span in the job's trace
(:mod:`exporters.otel`), so a log line links straight to its span in Jaeger and back. It is a
sink of a :class:`~telemetry.runner.ProjectionRunner` (``wantel serve`` attaches it to the
runner that serves the projections): the runner's engine de-duplicates, so every event it is
handed is new.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import structlog

from telemetry.events import (
    Event,
    ExpertSwitched,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobQueued,
    JobStarted,
    StageEnded,
    StageStarted,
    WorkerLost,
    WorkerStopped,
)
from telemetry.log.base import Batch, ReadItem
from telemetry.projections.jobs import JobView, abandoned_by
from telemetry.projections.readings import device_label, queue_wait_s
from telemetry.runner import Applied, Sink
from telemetry.tracing import job_trace_id, span_id_for

# -- lifecycle lines -------------------------------------------------------------------------


@dataclass
class _Job:
    """What a job's later lines need: model, trace, and which stage occurrence is which."""

    trace_id: str
    model: str | None = None
    queued_ts: int | None = None
    queued_traceparent: str | None = None
    opened_ts: int | None = None  # the run's JobQueued's, else JobStarted's (its ids' key)
    stage_counts: dict[str, int] = field(default_factory=dict)
    open_stages: dict[str, int] = field(default_factory=dict)


LIFECYCLE: Final = (JobQueued, JobStarted, StageEnded, ExpertSwitched, JobCompleted, JobFailed,
                    JobCancelled)
#: Events that change what later lines say, though they are not lines themselves.
_TRACKED: Final = (*LIFECYCLE, StageStarted)
#: The same, as a set of exact types: a runner hands this sink every event it applies, and
#: ``type(e) in`` a set is a hash lookup where ``isinstance`` against a tuple of msgspec
#: structs walks the tuple (the sink cost ~2 µs an event that way).
_TRACKED_TYPES: Final = frozenset(_TRACKED)
_TERMINAL: Final = (JobCompleted, JobFailed, JobCancelled)
#: Events that end their worker's running jobs (``job.abandoned`` lines).
_ABANDONING: Final = frozenset({WorkerLost, WorkerStopped})


class LifecycleLogger(Sink):
    """One structured line per lifecycle event, with the ``trace_id``/``span_id`` of its span.

    Lines: ``job.queued``, ``job.started``, ``stage.ended``, ``expert.switched``,
    ``job.completed`` (info), ``job.cancelled`` and ``job.abandoned`` (warning: its worker
    declared lost, or stopped mid-job), ``job.failed`` (error). Each carries
    ``job``, ``model``, ``seq``, ``worker``, the event's own time as ``timestamp`` (and
    ``ts_ns``), the span it belongs to — ``queue.wait`` for ``job.queued``, the stage span for
    ``stage.ended``, the denoise span for ``expert.switched``, the root otherwise — and its
    durations.

    As a runner's sink it writes the lines of what the runner applies once it follows the log
    (``live``): what was stored before the runner started was logged by whoever ran then, so
    it only tracks those jobs (their model, trace and stage counts) without writing. A job's
    lines end with its terminal line: anything after it is not a lifecycle step. Events are
    not de-duplicated here (the runner's engine does that): :meth:`handle` writes the lines of
    the events it is given. It never raises: a line that cannot be written is counted in
    :attr:`errors` and skipped.
    """

    name = "lifecycle-log"

    def __init__(self, logger: Any | None = None, *, max_jobs: int = 10_000) -> None:
        # Span roles come from the span exporter, so a line's span_id is its span's by
        # construction; imported here so configuring logging never loads the OpenTelemetry SDK.
        from exporters.otel import QUEUE_ROLE, ROOT_ROLE, stage_role

        self._root_role, self._queue_role, self._stage_role = ROOT_ROLE, QUEUE_ROLE, stage_role
        self._logger = logger if logger is not None else structlog.get_logger("wantel.jobs")
        self._jobs: OrderedDict[str, _Job] = OrderedDict()  # oldest popped in O(1)
        self._max_jobs = max_jobs
        self._ended: deque[str] = deque(maxlen=max_jobs)
        self._ended_set: set[str] = set()
        self.lines = 0
        self.errors = 0

    def on_applied(self, applied: Applied) -> None:
        """Write the lines of what the runner applied (only track, while it catches up);
        a ``job.abandoned`` warning for each job a ``WorkerLost``/``WorkerStopped`` ended
        (read from the runner's jobs projection, when it has one)."""
        if applied.kinds.isdisjoint(_TRACKED_TYPES) and applied.kinds.isdisjoint(_ABANDONING):
            return  # steps and samples only: nothing to write or track
        write, tracked, one = applied.live, _TRACKED_TYPES, self._one
        for event in applied.events:
            if type(event) in tracked:
                one(event, write=write)
            elif type(event) in _ABANDONING:
                jobs = applied.engine.states.get("jobs")
                for view in abandoned_by(jobs, event) if jobs is not None else ():
                    self._abandoned(view, event, write=write)

    def _abandoned(self, view: JobView, event: Event, *, write: bool) -> None:
        """The job's ``job.abandoned`` line (its root span's ids), and its lines end."""
        try:
            job = self._jobs.pop(view.job, None)
            if view.job in self._ended_set:
                return
            if self._ended.maxlen is not None and len(self._ended) == self._ended.maxlen:
                self._ended_set.discard(self._ended[0])
            self._ended.append(view.job)
            self._ended_set.add(view.job)
            if not write:
                return
            trace_id = job.trace_id if job is not None else job_trace_id(view.job)
            opened = job.opened_ts if job is not None else None
            self._logger.warning(
                "job.abandoned", job=view.job, model=view.model, trace_id=trace_id,
                span_id=span_id_for(view.job, self._root_role, opened), status="abandoned",
                reason=view.abandon_reason, worker=view.worker,
                declared_by=getattr(event, "declared_by", None),
                timestamp=_iso(event.ts), ts_ns=event.ts)
        except Exception:
            self.errors += 1
            return
        self.lines += 1

    def handle(self, items: Iterable[ReadItem | Event]) -> int:
        """Write the lines for ``items`` (log items or bare events); returns how many."""
        written = 0
        try:
            for item in items:
                if isinstance(item, Batch):
                    for event in item.events:
                        written += self._one(event)
                elif isinstance(item, Event):
                    written += self._one(item)
        except Exception:  # the iterable itself failed: nothing we can write about it
            self.errors += 1
        return written

    def _one(self, event: Event, *, write: bool = True) -> int:
        if type(event) not in _TRACKED_TYPES:
            return 0
        try:
            line = self._line(event, write=write)
            if line is None:
                return 0
            level, name, fields = line
            getattr(self._logger, level)(name, **fields)
        except Exception:
            self.errors += 1
            return 0
        self.lines += 1
        return 1

    def _line(self, event: Event, *,
              write: bool = True) -> tuple[str, str, dict[str, Any]] | None:
        """The event's line (``None``: none), after tracking what later lines need; with
        ``write`` False only the tracking (a catch-up: the span ids and timestamps of lines
        nobody writes were ~40 % of this sink's cost)."""
        job_id = event.job
        if job_id in self._ended_set:
            return None  # after the job's terminal line: no lifecycle step of it
        job = self._jobs.get(job_id)
        if job is None:
            job = self._jobs[job_id] = _Job(trace_id=job_trace_id(job_id))
            while len(self._jobs) > self._max_jobs:
                self._jobs.popitem(last=False)
        role = self._root_role
        level = "info"
        fields: dict[str, Any] = {}
        if isinstance(event, StageStarted):
            index = job.stage_counts.get(event.stage, 0)
            job.stage_counts[event.stage] = index + 1
            job.open_stages[event.stage] = index
            return None
        if isinstance(event, JobQueued):
            job.model, job.queued_ts = event.model, event.ts
            job.queued_traceparent = event.traceparent
            if job.opened_ts is None:
                job.opened_ts = event.ts
            job.trace_id = job_trace_id(job_id, queued=event.traceparent,
                                        opened_ts=job.opened_ts)
            name, role = "job.queued", self._queue_role
            fields = {"task": event.task}
        elif isinstance(event, JobStarted):
            job.model = event.model
            if job.opened_ts is None:
                job.opened_ts = event.ts
            job.trace_id = job_trace_id(job_id, event.traceparent, job.queued_traceparent,
                                        opened_ts=job.opened_ts)
            name = "job.started"
            device = event.device
            fields = {
                "variant": event.variant, "task": event.task,
                "resolution": f"{event.width}x{event.height}", "frames": event.num_frames,
                "steps": event.steps,
                "device": device_label(device),
            }
            if job.queued_ts is not None:
                fields["queue_wait_s"] = queue_wait_s(job.queued_ts, event.ts)
        elif isinstance(event, StageEnded):
            opened = job.open_stages.pop(event.stage, -1)
            index = opened
            if opened < 0:
                index = job.stage_counts.get(event.stage, 0)
                job.stage_counts[event.stage] = index + 1
            name, role = "stage.ended", self._stage_role(event.stage, index)
            fields = {"stage": event.stage, "duration_s": event.duration_s, "ok": event.ok}
            if not event.ok:
                level = "warning"
        elif isinstance(event, ExpertSwitched):
            denoise = job.open_stages.get("denoise")
            if denoise is not None:
                role = self._stage_role("denoise", denoise)
            name = "expert.switched"
            fields = {"stage": "denoise", "step": event.step, "from_expert": event.from_expert,
                      "to_expert": event.to_expert}
        elif isinstance(event, JobCompleted):
            name = "job.completed"
            fields = {"status": "completed", "duration_s": event.duration_s,
                      "frames": event.frames, "bytes": event.bytes}
        elif isinstance(event, JobFailed):
            name, level = "job.failed", "error"
            fields = {"status": "failed", "duration_s": event.duration_s, "stage": event.stage,
                      "step": event.step, "error_type": event.error_type,
                      "error": event.message, "oom": event.oom,
                      "category": event.category, "suggestions": list(event.suggestions)}
        elif isinstance(event, JobCancelled):
            name, level = "job.cancelled", "warning"
            fields = {"status": "cancelled", "duration_s": event.duration_s,
                      "stage": event.stage, "step": event.step, "reason": event.reason}
        else:  # pragma: no cover - _TRACKED is exhaustive above
            return None
        if isinstance(event, _TERMINAL):
            del self._jobs[job_id]
            if self._ended.maxlen is not None and len(self._ended) == self._ended.maxlen:
                self._ended_set.discard(self._ended[0])
            self._ended.append(job_id)
            self._ended_set.add(job_id)
        if not write:
            return None
        return level, name, {
            "job": job_id, "model": job.model, "trace_id": job.trace_id,
            "span_id": span_id_for(job_id, role, job.opened_ts), "seq": event.seq,
            "worker": event.worker,
            "timestamp": _iso(event.ts), "ts_ns": event.ts,
            **{k: v for k, v in fields.items() if v is not None},
        }


def _iso(ts_ns: int) -> str:
    """Nanoseconds since the epoch as ISO-8601 UTC with microseconds (``…Z``)."""
    moment = datetime.fromtimestamp(ts_ns / 1e9, UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


__all__ = ["LIFECYCLE", "LifecycleLogger"]
