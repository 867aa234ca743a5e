"""Structured logs: one structlog configuration, and a job-lifecycle log fed from the event log.

:func:`configure_logging` is the single place wantel's processes set up logging: JSON lines when
the output is not a terminal (a log pipeline is reading) or when asked, a readable console
rendering on a terminal. The standard library's ``logging`` (the OpenTelemetry SDK, uvicorn)
is routed through the same renderer, so one process writes one format.

:class:`LifecycleLogger` turns lifecycle events read from the log into one line each, carrying
the ``trace_id`` and ``span_id`` of the matching span in the job's trace
(:mod:`exporters.otel`), so a log line links straight to its span in Jaeger and back.
"""

from __future__ import annotations

import logging
import sys
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

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
)
from telemetry.log.base import Batch, ReadItem
from telemetry.projections.readings import device_label, queue_wait_s
from telemetry.tracing import span_id_for, trace_id_for

LEVELS: Final = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
                 "error": logging.ERROR}
_HANDLER_MARK: Final = "_wantel_handler"


class _StampUnlessPresent:
    """ISO-8601 UTC ``timestamp``, unless the caller gave one (a lifecycle line carries the
    event's recorded time, not the time it was read)."""

    def __init__(self) -> None:
        self._stamper = structlog.processors.TimeStamper(fmt="iso", utc=True)

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
        if "timestamp" in event_dict:
            return event_dict
        return self._stamper(logger, name, event_dict)


def configure_logging(
    *,
    json: bool | None = None,
    level: str = "info",
    stream: TextIO | None = None,
    stdlib: bool = True,
) -> None:
    """Configure structlog (and, with ``stdlib``, the root ``logging`` handler) once.

    Args:
        json: JSON lines if True; console rendering if False; if None, JSON unless ``stream``
            is a terminal.
        level: the lowest level written (``debug``, ``info``, ``warning``, ``error``).
        stream: where lines go; ``sys.stderr`` by default, so stdout stays free for command
            output (``wantel cat`` prints events there).
        stdlib: also render standard-library log records (OpenTelemetry, uvicorn) the same way;
            calling again replaces the handler this function installed, never stacks another.
    """
    out = stream if stream is not None else sys.stderr
    as_json = json if json is not None else not _isatty(out)
    numeric = LEVELS.get(level.lower())
    if numeric is None:
        raise ValueError(f"log level {level!r}: expected one of {', '.join(LEVELS)}")
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _StampUnlessPresent(),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Processor
    if as_json:
        shared.append(structlog.processors.dict_tracebacks)
        renderer = structlog.processors.JSONRenderer(default=str)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=_isatty(out))
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    if stdlib:
        root = logging.getLogger()
        for handler in list(root.handlers):
            if getattr(handler, _HANDLER_MARK, False):
                root.removeHandler(handler)
        handler = logging.StreamHandler(out)
        handler.setFormatter(structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared]))
        setattr(handler, _HANDLER_MARK, True)
        root.addHandler(handler)
        root.setLevel(numeric)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False


# -- lifecycle lines -------------------------------------------------------------------------


@dataclass
class _Job:
    """What a job's later lines need: model, trace, and which stage occurrence is which."""

    trace_id: str
    model: str | None = None
    queued_ts: int | None = None
    queued_traceparent: str | None = None
    stage_counts: dict[str, int] = field(default_factory=dict)
    open_stages: dict[str, int] = field(default_factory=dict)
    seqs: set[int] = field(default_factory=set)


LIFECYCLE: Final = (JobQueued, JobStarted, StageEnded, ExpertSwitched, JobCompleted, JobFailed,
                    JobCancelled)
#: Events that change what later lines say, though they are not lines themselves.
_TRACKED: Final = (*LIFECYCLE, StageStarted)
_TERMINAL: Final = (JobCompleted, JobFailed, JobCancelled)


class LifecycleLogger:
    """One structured line per lifecycle event, with the ``trace_id``/``span_id`` of its span.

    Lines: ``job.queued``, ``job.started``, ``stage.ended``, ``expert.switched``,
    ``job.completed`` (info), ``job.cancelled`` (warning), ``job.failed`` (error). Each carries
    ``job``, ``model``, ``seq``, ``worker``, the event's own time as ``timestamp`` (and
    ``ts_ns``), the span it belongs to — ``queue.wait`` for ``job.queued``, the stage span for
    ``stage.ended``, the denoise span for ``expert.switched``, the root otherwise — and its
    durations. Feed it the items of a ``log.follow()`` loop; it de-duplicates by
    ``(job, seq)`` (delivery is at-least-once) and never raises: a line that cannot be written
    is counted in :attr:`errors` and skipped.
    """

    def __init__(self, logger: Any | None = None, *, max_jobs: int = 10_000) -> None:
        # Span roles come from the span exporter, so a line's span_id is its span's by
        # construction; imported here so configure_logging() never loads the OpenTelemetry SDK.
        from exporters.otel import QUEUE_ROLE, ROOT_ROLE, stage_role

        self._root_role, self._queue_role, self._stage_role = ROOT_ROLE, QUEUE_ROLE, stage_role
        self._logger = logger if logger is not None else structlog.get_logger("wantel.jobs")
        self._jobs: OrderedDict[str, _Job] = OrderedDict()  # oldest popped in O(1)
        self._max_jobs = max_jobs
        self._finished: deque[str] = deque(maxlen=max_jobs)
        self._finished_set: set[str] = set()
        self.lines = 0
        self.errors = 0

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

    def _one(self, event: Event) -> int:
        if not isinstance(event, _TRACKED):
            return 0
        try:
            line = self._line(event)
            if line is None:
                return 0
            level, name, fields = line
            getattr(self._logger, level)(name, **fields)
        except Exception:
            self.errors += 1
            return 0
        self.lines += 1
        return 1

    def _line(self, event: Event) -> tuple[str, str, dict[str, Any]] | None:
        job_id = event.job
        if job_id in self._finished_set:
            return None  # a late duplicate of a finished job
        job = self._jobs.get(job_id)
        if job is None:
            job = self._jobs[job_id] = _Job(trace_id=trace_id_for(job_id))
            while len(self._jobs) > self._max_jobs:
                self._jobs.popitem(last=False)
        if event.seq >= 0:
            if event.seq in job.seqs:
                return None
            job.seqs.add(event.seq)
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
            job.trace_id = trace_id_for(job_id, event.traceparent)
            name, role = "job.queued", self._queue_role
            fields = {"task": event.task}
        elif isinstance(event, JobStarted):
            job.model = event.model
            traceparent = (event.traceparent if event.traceparent is not None
                           else job.queued_traceparent)
            job.trace_id = trace_id_for(job_id, traceparent)
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
                      "error": event.message, "oom": event.oom}
        elif isinstance(event, JobCancelled):
            name, level = "job.cancelled", "warning"
            fields = {"status": "cancelled", "duration_s": event.duration_s,
                      "stage": event.stage, "step": event.step, "reason": event.reason}
        else:  # pragma: no cover - _TRACKED is exhaustive above
            return None
        if isinstance(event, _TERMINAL):
            del self._jobs[job_id]
            if self._finished.maxlen is not None and len(self._finished) == self._finished.maxlen:
                self._finished_set.discard(self._finished[0])
            self._finished.append(job_id)
            self._finished_set.add(job_id)
        return level, name, {
            "job": job_id, "model": job.model, "trace_id": job.trace_id,
            "span_id": span_id_for(job_id, role), "seq": event.seq, "worker": event.worker,
            "timestamp": _iso(event.ts), "ts_ns": event.ts,
            **{k: v for k, v in fields.items() if v is not None},
        }


def _iso(ts_ns: int) -> str:
    """Nanoseconds since the epoch as ISO-8601 UTC with microseconds (``…Z``)."""
    moment = datetime.fromtimestamp(ts_ns / 1e9, UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


__all__ = ["LIFECYCLE", "LifecycleLogger", "configure_logging"]
