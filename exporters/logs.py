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

import functools
import logging
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Final

import structlog

from exporters.logwriter import held_lines
from telemetry.events import (
    TERMINAL_TYPES,
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
    """What a job's later lines need: model, trace, and which stage occurrence is which.

    The ids are derived when a line first needs them and kept (each is a SHA-256): the trace
    id from :attr:`trace_from` (the ``JobStarted`` and ``JobQueued`` traceparents it was last
    set from) and :attr:`opened_ts`, each span id from its role and :attr:`opened_ts`; a change
    of what they are derived from forgets them (:meth:`opened`, :meth:`retrace`).
    """

    model: str | None = None
    queued_ts: int | None = None
    queued_traceparent: str | None = None
    opened_ts: int | None = None  # the run's JobQueued's, else JobStarted's (its ids' key)
    trace_from: tuple[str | None, str | None] = (None, None)
    trace_id: str | None = None  # None: not derived yet
    span_ids: dict[str, str] = field(default_factory=dict)  # by role
    stage_counts: dict[str, int] = field(default_factory=dict)
    open_stages: dict[str, int] = field(default_factory=dict)

    def opened(self, ts: int) -> None:
        """The run opened at ``ts``, unless an earlier event opened it."""
        if self.opened_ts is None:
            self.opened_ts = ts
            self.trace_id = None
            self.span_ids.clear()

    def retrace(self, started: str | None, queued: str | None) -> None:
        """Derive the trace id from these traceparents (and :attr:`opened_ts`) from now on
        (a queued job's ``JobStarted`` without a traceparent of its own keeps the id)."""
        if (started, queued) != self.trace_from:
            self.trace_from = (started, queued)
            self.trace_id = None

    def trace(self, job: str) -> str:
        """The job's trace id (:func:`~telemetry.tracing.job_trace_id`)."""
        found = self.trace_id
        if found is None:
            started, queued = self.trace_from
            found = self.trace_id = job_trace_id(job, started, queued, opened_ts=self.opened_ts)
        return found

    def span(self, job: str, role: str) -> str:
        """The id of the span playing ``role`` in the job's run
        (:func:`~telemetry.tracing.span_id_for`)."""
        found = self.span_ids.get(role)
        if found is None:
            found = self.span_ids[role] = span_id_for(job, role, self.opened_ts)
        return found


LIFECYCLE: Final = (JobQueued, JobStarted, StageEnded, ExpertSwitched, JobCompleted, JobFailed,
                    JobCancelled)
#: Events that change what later lines say, though they are not lines themselves.
_TRACKED: Final = (*LIFECYCLE, StageStarted)
#: The same, as a set of exact types: a runner hands this sink every event it applies, and
#: ``type(e) in`` a set is a hash lookup where ``isinstance`` against a tuple of msgspec
#: structs walks the tuple (the sink cost ~2 µs an event that way).
_TRACKED_TYPES: Final = frozenset(_TRACKED)
_TERMINAL_TYPES: Final = frozenset(TERMINAL_TYPES)
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

    Without ``logger`` it binds ``structlog.get_logger("wantel.jobs")`` when built, with the
    configuration then in force: configure logging first. Lines of a level that logger drops
    are not built. The lines of one :meth:`on_applied` step (or :meth:`handle` call) are
    written together at its end (:func:`exporters.logwriter.held_lines`).
    """

    name = "lifecycle-log"

    def __init__(self, logger: Any | None = None, *, max_jobs: int = 10_000) -> None:
        # Span roles come from the span exporter, so a line's span_id is its span's by
        # construction; imported here so configuring logging never loads the OpenTelemetry SDK.
        from exporters.otel import QUEUE_ROLE, ROOT_ROLE, stage_role

        self._root_role, self._queue_role, self._stage_role = ROOT_ROLE, QUEUE_ROLE, stage_role
        # Bound now, from the configuration in force (configure logging first): a lazy
        # ``get_logger`` proxy binds a fresh logger on every call, ~2 µs a line.
        self._logger = logger if logger is not None else structlog.get_logger(
            "wantel.jobs").bind()
        #: Whether the logger writes each level: a line it would drop is not built.
        self._writes = {level: _enabled(self._logger, level) for level in _LEVELS}
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
        try:
            with held_lines():  # the step's lines in one write (exporters.logwriter)
                self._applied(applied)
        except Exception:  # writing them failed
            self.errors += 1

    def _applied(self, applied: Applied) -> None:
        write, tracked, one = applied.live, _TRACKED_TYPES, self._one
        if applied.kinds.isdisjoint(_ABANDONING):  # the usual step: a comprehension picks
            for event in [e for e in applied.events if type(e) in tracked]:  # ~2x faster
                one(event, write=write)
            return
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
            if not self._writes["warning"]:
                return
            if job is None:
                job = _Job()
            self._logger.warning(
                "job.abandoned", job=view.job, model=view.model, trace_id=job.trace(view.job),
                span_id=job.span(view.job, self._root_role), status="abandoned",
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
            with held_lines():
                for item in items:
                    if isinstance(item, Batch):
                        for event in item.events:
                            written += self._one(event)
                    elif isinstance(item, Event):
                        written += self._one(item)
        except Exception:  # the iterable itself failed (or the write): nothing more to write
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
            job = self._jobs[job_id] = _Job()
            while len(self._jobs) > self._max_jobs:
                self._jobs.popitem(last=False)
        role = self._root_role
        level = "info"
        fields: dict[str, Any] = {}
        # The event is of one of _TRACKED_TYPES exactly (_one checks): ``type(event) is``,
        # not an ``isinstance`` walk through msgspec's struct types.
        if type(event) is StageStarted:
            index = job.stage_counts.get(event.stage, 0)
            job.stage_counts[event.stage] = index + 1
            job.open_stages[event.stage] = index
            return None
        if type(event) is JobQueued:
            job.model, job.queued_ts = event.model, event.ts
            job.queued_traceparent = event.traceparent
            job.opened(event.ts)
            job.retrace(None, event.traceparent)
            name, role = "job.queued", self._queue_role
            fields = {"task": event.task}
        elif type(event) is JobStarted:
            job.model = event.model
            job.opened(event.ts)
            job.retrace(event.traceparent, job.queued_traceparent)
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
        elif type(event) is StageEnded:
            opened = job.open_stages.pop(event.stage, -1)
            index = opened
            if opened < 0:
                index = job.stage_counts.get(event.stage, 0)
                job.stage_counts[event.stage] = index + 1
            name, role = "stage.ended", self._stage_role(event.stage, index)
            fields = {"stage": event.stage, "duration_s": event.duration_s, "ok": event.ok}
            if not event.ok:
                level = "warning"
        elif type(event) is ExpertSwitched:
            denoise = job.open_stages.get("denoise")
            if denoise is not None:
                role = self._stage_role("denoise", denoise)
            name = "expert.switched"
            fields = {"stage": "denoise", "step": event.step, "from_expert": event.from_expert,
                      "to_expert": event.to_expert}
        elif type(event) is JobCompleted:
            name = "job.completed"
            fields = {"status": "completed", "duration_s": event.duration_s,
                      "frames": event.frames, "bytes": event.bytes}
        elif type(event) is JobFailed:
            name, level = "job.failed", "error"
            fields = {"status": "failed", "duration_s": event.duration_s, "stage": event.stage,
                      "step": event.step, "error_type": event.error_type,
                      "error": event.message, "oom": event.oom,
                      "category": event.category, "suggestions": list(event.suggestions)}
        elif type(event) is JobCancelled:
            name, level = "job.cancelled", "warning"
            fields = {"status": "cancelled", "duration_s": event.duration_s,
                      "stage": event.stage, "step": event.step, "reason": event.reason}
        else:  # pragma: no cover - _TRACKED is exhaustive above
            return None
        if type(event) in _TERMINAL_TYPES:
            del self._jobs[job_id]
            if self._ended.maxlen is not None and len(self._ended) == self._ended.maxlen:
                self._ended_set.discard(self._ended[0])
            self._ended.append(job_id)
            self._ended_set.add(job_id)
        if not write or not self._writes[level]:
            return None  # nobody reads it: no ids, no timestamp
        line = {
            "job": job_id, "model": job.model, "trace_id": job.trace(job_id),
            "span_id": job.span(job_id, role), "seq": event.seq, "worker": event.worker,
            "timestamp": _iso(event.ts), "ts_ns": event.ts,
        }
        if None in fields.values():
            fields = {k: v for k, v in fields.items() if v is not None}
        line.update(fields)
        return level, name, line


_LEVELS: Final = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _enabled(logger: Any, level: str) -> bool:
    """Whether ``logger`` writes ``level`` lines: a structlog filtering logger says (its
    class's ``is_enabled_for``); any other is taken to write them all."""
    asks = getattr(type(logger), "is_enabled_for", None)
    if asks is None:
        return True
    try:
        return bool(asks(logger, _LEVELS[level]))
    except Exception:
        return True


#: ``_iso`` formats times from the epoch up to this (seconds; the end of year 9998) itself;
#: ``datetime`` formats the rest, and raises for what it cannot.
_FAST_UNTIL: Final = 253_370_764_800.0
_EPOCH_ORDINAL: Final = date(1970, 1, 1).toordinal()


@functools.lru_cache(maxsize=256)
def _iso_minute(minute: int) -> str:
    """``YYYY-MM-DDTHH:MM:`` of ``minute`` minutes after the epoch: a burst's lines fall in
    a few minutes (a job's in one or two), each formatted once."""
    day, minutes = divmod(minute, 1440)
    return (f"{date.fromordinal(_EPOCH_ORDINAL + day).isoformat()}T"
            f"{minutes // 60:02d}:{minutes % 60:02d}:")


def _iso(ts_ns: int) -> str:
    """Nanoseconds since the epoch as ISO-8601 UTC with microseconds (``…Z``): what
    ``datetime.fromtimestamp(ts_ns / 1e9, UTC)`` writes (:func:`_iso_datetime`), without
    making a ``datetime`` (a third of the cost of a line's fields): the same float seconds,
    their fraction rounded to microseconds half to even as CPython's ``datetime`` does."""
    seconds = ts_ns / 1e9
    if not 0.0 <= seconds < _FAST_UNTIL:
        return _iso_datetime(ts_ns)
    whole = int(seconds)
    micros = round((seconds - whole) * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    minute, second = divmod(whole, 60)
    return f"{_iso_minute(minute)}{second:02d}.{micros:06d}Z"


def _iso_datetime(ts_ns: int) -> str:
    """:func:`_iso` by way of ``datetime``: the reference, and every time ``_iso`` leaves."""
    moment = datetime.fromtimestamp(ts_ns / 1e9, UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


__all__ = ["LIFECYCLE", "LifecycleLogger"]
