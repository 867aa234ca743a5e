"""OpenTelemetry traces rebuilt from the log: one trace per job, exported by OTLP.

Spans are a projection of the log, not something measured on the inference thread: a job's
spans are built from its recorded events only when its terminal event is read, with the events'
own timestamps, deterministic ids (:mod:`telemetry.tracing`) and no clock reads. So a trace can
be rebuilt and re-exported from the log at any time, and exporting the same job twice yields
the same span ids.

The trace of a job::

    video.generate                  root, INTERNAL; the caller's span is its parent when the job
    │                               carries a valid W3C traceparent
    ├── queue.wait                  JobQueued → JobStarted, when the job was queued
    ├── stage.load
    ├── stage.text_encode
    ├── stage.denoise               one span event per step (+ expert.switched)
    ├── stage.decode
    └── …

Why span events for steps, not a span per step: a 40–50 step job gives 40–50 events, which
cost one repeated protobuf field on one span and show in Jaeger as a timeline inside the
denoise span; 50 child spans would bury the stage spans in the trace view, cost a span id,
parent id and resource reference each, and carry no duration the event lacks (``duration_s``
is an attribute). See ``docs/traces.md``.

:class:`SpanSink` is span export as a sink of a :class:`~telemetry.runner.ProjectionRunner`
(the one loop that follows a log): it exports each finished job through any
:class:`~opentelemetry.sdk.trace.export.SpanExporter`, and the runner checkpoints only once the
exporter returned ``SUCCESS``; :func:`exporter_from_config` builds the OTLP exporter from
``--otlp`` or the standard ``OTEL_EXPORTER_OTLP_*`` variables.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final
from urllib.parse import unquote, urlsplit

import msgspec
import structlog
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event as SpanEvent
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import AttributeValue

from telemetry import tracing
from telemetry.codec import decode_one, encode
from telemetry.eta.evaluate import ours_at
from telemetry.eta.jobs import job_records
from telemetry.eta.live import LiveJob
from telemetry.eta.model import BUCKETS, CHECKPOINTS, bucket_of
from telemetry.events import (
    EtaCalibrated,
    Event,
    ExpertSwitched,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobQueued,
    JobStarted,
    StageEnded,
    StageProgress,
    StageStarted,
    StepEnded,
    WorkerLost,
    WorkerStopped,
)
from telemetry.guidance import describe_failure
from telemetry.liveness import WORKER_TIMEOUT_S
from telemetry.log.base import Position
from telemetry.projections.eta import EtaPoint, EtaProjection, EtaState
from telemetry.projections.readings import device_label, queue_wait_s, stage_role, stage_start
from telemetry.runner import Applied, Sink
from telemetry.tracing import parse_traceparent, span_id_for

_log = structlog.get_logger("wantel.otel")

SERVICE_NAME: Final = "wantel"
SCOPE: Final = InstrumentationScope("wantel.exporters.otel", "1")
ROOT_SPAN: Final = "video.generate"
ROOT_ROLE: Final = "root"
QUEUE_ROLE: Final = "queue"
#: ETA checkpoints, as fractions of the job's actual duration: the evaluator's 10, 25 and 50 %.
ETA_FRACTIONS: Final = CHECKPOINTS[1:4]
TERMINALS: Final = (JobCompleted, JobFailed, JobCancelled)
#: The event types a trace is built from; the runner buffers only these.
SPAN_SOURCES: Final = (
    JobQueued, JobStarted, StageStarted, StageEnded, StageProgress, StepEnded, ExpertSwitched,
    *TERMINALS)

_DEFAULT_RESOURCE: tuple[tuple[str | None, str | None], Resource] | None = None


def job_trace_id(started: JobStarted | None, queued: JobQueued | None, job: str) -> str:
    """The job's trace id, by the one rule in :func:`telemetry.tracing.job_trace_id` (the same
    the metrics' exemplars and the lifecycle log lines use)."""
    return tracing.job_trace_id(job, *_traceparents(started, queued),
                                opened_ts=_opened_ts(started, queued))


def _opened_ts(started: JobStarted | None, queued: JobQueued | None) -> int | None:
    """The ``ts`` of the run's opening event: its ``JobQueued``, else its ``JobStarted``."""
    return queued.ts if queued is not None else started.ts if started is not None else None


def traceparent_of(started: JobStarted | None, queued: JobQueued | None) -> str | None:
    """The traceparent a job carries (:func:`telemetry.tracing.job_traceparent`)."""
    return tracing.job_traceparent(*_traceparents(started, queued))


def _traceparents(started: JobStarted | None,
                  queued: JobQueued | None) -> tuple[str | None, str | None]:
    return (started.traceparent if started is not None else None,
            queued.traceparent if queued is not None else None)


def default_resource(environ: Mapping[str, str] | None = None) -> Resource:
    """The SDK's resource (``telemetry.sdk.*``) with ``OTEL_RESOURCE_ATTRIBUTES`` and
    ``OTEL_SERVICE_NAME`` as the OpenTelemetry specification reads them — the service name is
    ``OTEL_SERVICE_NAME``, else ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES``, else
    ``wantel`` (never the SDK's ``unknown_service``). Read when called (a sink reads it once,
    when it is built); the last result is kept for the same variables.
    """
    global _DEFAULT_RESOURCE  # noqa: PLW0603 - a cache keyed by what it was built from
    env = os.environ if environ is None else environ
    key = (env.get("OTEL_SERVICE_NAME"), env.get("OTEL_RESOURCE_ATTRIBUTES"))
    if _DEFAULT_RESOURCE is None or _DEFAULT_RESOURCE[0] != key:
        attributes: dict[str, AttributeValue] = {}
        for pair in (key[1] or "").split(","):
            name, sep, value = pair.partition("=")
            if sep and name.strip():
                attributes[name.strip()] = unquote(value.strip())
        if key[0] and key[0].strip():
            attributes["service.name"] = key[0].strip()
        if not str(attributes.get("service.name", "")).strip():
            attributes["service.name"] = SERVICE_NAME
        # Resource.create would read os.environ itself; these attributes win over it.
        _DEFAULT_RESOURCE = (key, Resource.create(attributes))
    return _DEFAULT_RESOURCE[1]


# -- events → spans (pure) -------------------------------------------------------------------


@dataclass
class _OpenStage:
    role: str
    start: int
    events: list[SpanEvent] = field(default_factory=list)


@dataclass
class _JobView:
    """One job's events, sorted and de-duplicated, with the few facts spans need."""

    job: str
    events: list[Event]
    calibration: EtaCalibrated | None
    queued: JobQueued | None = None
    started: JobStarted | None = None
    terminal: Event | None = None

    @property
    def opened_ts(self) -> int | None:
        """The run's key in its ids (:func:`telemetry.tracing.run_key`)."""
        return _opened_ts(self.started, self.queued)


def _view_of(events: Iterable[Event]) -> _JobView | None:
    calibration: EtaCalibrated | None = None
    by_seq: dict[int, Event] = {}
    unsequenced: list[Event] = []
    job: str | None = None
    for event in events:
        if isinstance(event, EtaCalibrated):
            calibration = event
            continue
        if not isinstance(event, SPAN_SOURCES):
            continue
        if job is None:
            job = event.job
        elif event.job != job:
            raise ValueError(f"spans_for_job got events of {job!r} and {event.job!r}")
        if event.seq < 0:
            unsequenced.append(event)
        else:
            by_seq.setdefault(event.seq, event)
    if job is None:
        return None
    ordered = [by_seq[seq] for seq in sorted(by_seq)] + unsequenced
    view = _JobView(job=job, events=ordered, calibration=calibration)
    for event in ordered:
        if isinstance(event, JobQueued) and view.queued is None:
            view.queued = event
        elif isinstance(event, JobStarted) and view.started is None:
            view.started = event
        elif isinstance(event, TERMINALS) and view.terminal is None:
            view.terminal = event
    return view


def spans_for_job(
    events: Iterable[Event], *, resource: Resource | None = None,
    eta_issued: Sequence[EtaPoint] | None = None, eta_start: LiveJob | None = None,
    final: bool = True, abandoned_after_s: float | None = None,
    abandon_reason: str | None = None,
) -> list[ReadableSpan]:
    """The spans of one job, root first, built from its events alone.

    ``events`` are one job's events in log order (duplicates by ``seq`` are dropped; types
    spans don't use are ignored). An :class:`~telemetry.events.EtaCalibrated` among them is
    taken as the calibration in force when the job started, for the ETA attributes.
    ``eta_issued``: the ETAs the ETA projection issued during the job, read from an engine's
    state (see :class:`SpanSink`); ``None`` runs the projection over these events instead.
    ``eta_start``: the job's estimator as the projection started it (online learning
    included), for the ETAs at 10/25/50 % of the duration; ``None``: one started from the
    calibration alone.

    ``final`` False: only the spans already finished in a job still running — each stage
    that ended, and ``queue.wait`` once the job started — as a :class:`SpanSink` exports them
    while the job runs; the root and the stages still open come with ``final``.
    ``abandoned_after_s``: the job has no terminal event and is declared abandoned (its worker
    and the job were silent that long): the root and the open stages end at its last event,
    with an ``ERROR`` status. ``abandon_reason``: the job was abandoned by an event instead —
    its worker declared lost (``WorkerLost``: ``worker lost``) or stopped mid-job
    (``WorkerStopped``: ``worker stopped``) — which the status description says.

    A job whose traceparent is not sampled (:func:`telemetry.tracing.traceparent_sampled`)
    has no spans. Ids come from :mod:`telemetry.tracing` (the job id and the ``ts`` of the
    run's opening event), so a rebuilt span has the id it was exported with.

    ``ReadableSpan`` objects are built directly rather than through a ``TracerProvider`` with a
    custom ``IdGenerator``: every id comes from :func:`telemetry.tracing.span_id_for` by role,
    which an ``IdGenerator`` (asked for "the next id" with no context) cannot know without
    thread-local plumbing; and a tracer would need a global provider and a span processor just
    to hand us back the snapshot we can write down ourselves. The price is that SDK span
    limits are not applied — the attributes here are few and bounded.
    """
    view = _view_of(events)
    if view is None:
        return []
    traceparent = traceparent_of(view.started, view.queued)
    if not tracing.traceparent_sampled(traceparent):
        return []
    resource = resource or default_resource()
    job = view.job
    opened = view.opened_ts
    trace_id = job_trace_id(view.started, view.queued, job)
    trace_id_int = int(trace_id, 16)
    flags = TraceFlags(TraceFlags.SAMPLED)
    root_ctx = SpanContext(trace_id_int, int(span_id_for(job, ROOT_ROLE, opened), 16), False,
                           flags)
    parent: SpanContext | None = None
    caller = parse_traceparent(traceparent)
    if caller is not None:
        parent = SpanContext(trace_id_int, int(caller[1], 16), True, flags)

    # The root starts at JobQueued (or JobStarted); min() keeps every child inside it even when
    # another process's clock stamped an event a little earlier.
    root_start = min(e.ts for e in view.events)
    terminal = view.terminal
    abandoned = terminal is None and (abandoned_after_s is not None
                                      or abandon_reason is not None)
    root_end = terminal.ts if terminal is not None else max(e.ts for e in view.events)

    def child(name: str, role: str, start: int, end: int, *,
              attributes: dict[str, AttributeValue] | None = None,
              span_events: Sequence[SpanEvent] = (), status: Status | None = None) -> ReadableSpan:
        ctx = SpanContext(trace_id_int, int(span_id_for(job, role, opened), 16), False, flags)
        return ReadableSpan(
            name=name, context=ctx, parent=root_ctx, resource=resource,
            attributes={"wantel.job": job, **(attributes or {})}, events=tuple(span_events),
            kind=SpanKind.INTERNAL, status=status or Status(StatusCode.UNSET),
            start_time=start, end_time=max(start, end), instrumentation_scope=SCOPE)

    children: list[ReadableSpan] = []
    root_events: list[SpanEvent] = []
    open_stages: dict[str, _OpenStage] = {}
    stage_counts: dict[str, int] = {}
    denoise: _OpenStage | None = None

    if view.queued is not None and (final or view.started is not None):
        wait_end = view.started.ts if view.started is not None else root_end
        children.append(child("queue.wait", QUEUE_ROLE, view.queued.ts, wait_end))

    for event in view.events:
        if isinstance(event, StageStarted):
            index = stage_counts.get(event.stage, 0)
            stage_counts[event.stage] = index + 1
            opened_stage = _OpenStage(role=stage_role(event.stage, index), start=event.ts)
            open_stages[event.stage] = opened_stage
            if event.stage == "denoise":
                denoise = opened_stage
        elif isinstance(event, StageEnded):
            opened_or_none = open_stages.pop(event.stage, None)
            if opened_or_none is None:  # its start was lost: infer it from the duration
                index = stage_counts.get(event.stage, 0)
                stage_counts[event.stage] = index + 1
                opened_or_none = _OpenStage(role=stage_role(event.stage, index),
                                            start=stage_start(event))
            if denoise is opened_or_none:
                denoise = None
            children.append(child(
                f"stage.{event.stage}", opened_or_none.role, opened_or_none.start, event.ts,
                attributes={"wantel.stage": event.stage, "wantel.stage.ok": event.ok,
                            "wantel.stage.duration_s": event.duration_s},
                span_events=opened_or_none.events,
                status=None if event.ok else Status(StatusCode.ERROR, f"stage {event.stage}")))
        elif isinstance(event, StepEnded):
            target = denoise.events if denoise is not None else root_events
            target.append(SpanEvent("denoise.step", _step_attributes(event), event.ts))
        elif isinstance(event, StageProgress):
            in_stage = open_stages.get(event.stage)
            (in_stage.events if in_stage is not None else root_events).append(SpanEvent(
                f"{event.stage}.piece", {"wantel.piece": event.done,
                                         "wantel.pieces": event.total}, event.ts))
        elif isinstance(event, ExpertSwitched):
            target = denoise.events if denoise is not None else root_events
            target.append(SpanEvent("expert.switched", {
                "wantel.step": event.step, "wantel.expert.from": event.from_expert,
                "wantel.expert.to": event.to_expert}, event.ts))
    if not final:
        return children

    # Stages still open when the job ended (it failed or was cancelled inside them, or its
    # worker went silent).
    closed_by = (type(terminal).__name__ if terminal is not None
                 else "abandoned" if abandoned else "end of events")
    for stage, opened_stage in open_stages.items():
        children.append(child(
            f"stage.{stage}", opened_stage.role, opened_stage.start, root_end,
            attributes={"wantel.stage": stage, "wantel.stage.closed_by": closed_by},
            span_events=opened_stage.events,
            status=Status(StatusCode.ERROR, f"stage {stage} did not end")
            if isinstance(terminal, JobFailed) or abandoned else None))

    attributes, status = _root_attributes(view, eta_issued, eta_start)
    if isinstance(terminal, JobFailed):
        root_events.append(SpanEvent("exception", {
            "exception.type": terminal.error_type, "exception.message": terminal.message},
            terminal.ts))
    elif abandoned:
        if abandon_reason is not None:
            message = abandon_reason
            attributes["wantel.abandon_reason"] = abandon_reason
        else:
            assert abandoned_after_s is not None
            message = (f"abandoned: no event from the job or its worker for "
                       f"{abandoned_after_s:g} s after its last one")
            attributes["wantel.abandoned_after_s"] = abandoned_after_s
        attributes["wantel.status"] = "abandoned"
        attributes["error.type"] = "abandoned"
        status = Status(StatusCode.ERROR, message)
    root = ReadableSpan(
        name=ROOT_SPAN, context=root_ctx, parent=parent, resource=resource,
        attributes=attributes, events=tuple(root_events), kind=SpanKind.INTERNAL,
        status=status, start_time=root_start, end_time=max(root_start, root_end),
        instrumentation_scope=SCOPE)
    return [root, *children]


def _step_attributes(event: StepEnded) -> dict[str, AttributeValue]:
    attributes: dict[str, AttributeValue] = {
        "wantel.step": event.step, "wantel.total_steps": event.total_steps,
        "wantel.passes": event.passes}
    if event.timestep is not None:
        attributes["wantel.timestep"] = event.timestep
    if event.sigma is not None:
        attributes["wantel.sigma"] = event.sigma
    if event.expert is not None:
        attributes["wantel.expert"] = event.expert
    if event.duration_s is not None:
        attributes["wantel.step.duration_s"] = event.duration_s
    return attributes


def _root_attributes(view: _JobView, eta_issued: Sequence[EtaPoint] | None,
                     eta_start: LiveJob | None = None
                     ) -> tuple[dict[str, AttributeValue], Status]:
    attributes: dict[str, AttributeValue] = {
        "wantel.job": view.job, "gen_ai.operation.name": "generate_content",
        "gen_ai.provider.name": "diffusers"}
    queued, started, terminal = view.queued, view.started, view.terminal
    model = started.model if started is not None else queued.model if queued else None
    if model is not None:
        attributes["wantel.model"] = model
        attributes["gen_ai.request.model"] = model
    if queued is not None:
        attributes["wantel.task"] = queued.task
    if started is not None:
        device = started.device
        attributes.update({
            "wantel.family": started.family, "wantel.variant": started.variant,
            "wantel.task": started.task,
            "wantel.resolution": f"{started.width}x{started.height}",
            "wantel.width": started.width, "wantel.height": started.height,
            "wantel.frames": started.num_frames, "wantel.steps": started.steps,
            "wantel.cfg": started.cfg, "wantel.guidance_scale": started.guidance_scale,
            "wantel.device": device_label(device),
            "wantel.device.name": device.name,
        })
        if started.seed is not None:
            attributes["wantel.seed"] = started.seed
        if started.worker is not None:
            attributes["wantel.worker"] = started.worker
        if queued is not None:
            attributes["wantel.queue_wait_s"] = queue_wait_s(queued.ts, started.ts)
    status = Status(StatusCode.UNSET)
    if isinstance(terminal, JobCompleted):
        attributes["wantel.status"] = "completed"
        attributes["wantel.duration_s"] = terminal.duration_s
        if terminal.frames is not None:
            attributes["wantel.output.frames"] = terminal.frames
        if terminal.bytes is not None:
            attributes["wantel.output.bytes"] = terminal.bytes
    elif isinstance(terminal, JobFailed):
        attributes.update({"wantel.status": "failed", "wantel.duration_s": terminal.duration_s,
                           "error.type": terminal.error_type, "wantel.oom": terminal.oom})
        if terminal.stage is not None:
            attributes["wantel.failed.stage"] = terminal.stage
        if terminal.step is not None:
            attributes["wantel.failed.step"] = terminal.step
        status = Status(StatusCode.ERROR, describe_failure(
            terminal.error_type, terminal.message, terminal.category, terminal.suggestions))
    elif isinstance(terminal, JobCancelled):
        attributes.update({"wantel.status": "cancelled",
                           "wantel.duration_s": terminal.duration_s,
                           "wantel.cancel.reason": terminal.reason})
    else:
        attributes["wantel.status"] = "running"
    if started is not None and terminal is not None:
        attributes.update(eta_attributes(view.events, view.calibration, issued=eta_issued,
                                         start=eta_start))
    return attributes, status


def eta_attributes(
    events: Sequence[Event], calibration: EtaCalibrated | None = None, *,
    issued: Sequence[EtaPoint] | None = None, start: LiveJob | None = None,
) -> dict[str, AttributeValue]:
    """The ETA story of one finished job, as root-span attributes.

    ``issued`` is every ETA the ETA projection issued during the job, oldest first — what
    the dashboards showed. A :class:`SpanSink` reads it from its engine's state; without it
    (``None``) the projection is run here over the job's events, with the same result.

    ``wantel.eta.prior_s`` / ``wantel.eta.prior_error``
        the ETA issued at ``JobStarted`` (before any work) and its signed relative error.
    ``wantel.eta.at_10pct_s`` (25, 50)
        the live model's remaining-time estimate at 10/25/50 % of the job's *actual*
        duration (:func:`telemetry.eta.evaluate.ours_at`, as ``wantel eta eval`` scores it,
        from ``start``: the estimator the projection started the job with, online learning
        included — else one started from the calibration alone),
        and ``…_error`` its signed relative error against the actual remaining time
        (completed jobs only). No projection issues an ETA at those moments (they are known
        only once the job has ended), so these are always computed here.
    ``wantel.eta.residual`` and ``wantel.eta.residual.<bucket>``
        the final residual: the mean signed relative error of every ETA issued during the job
        (at each stage boundary and step), overall and per progress bucket — exactly what the
        ETA projection folds into ``wantel_eta_relative_error`` (completed jobs only).
    """
    records = job_records([e for e in events if not isinstance(e, EtaCalibrated)])
    if not records or records[0].end_ts is None:
        return {}
    record = records[0]
    end_ts: int = records[0].end_ts
    projection = EtaProjection()
    state: EtaState = projection.initial()
    if calibration is not None:
        state = projection.apply(state, calibration)
    if issued is None:
        for event in record.events:
            if not isinstance(event, TERMINALS):
                state = projection.apply(state, event)
        running = state.running.get(record.job)
        issued = running.issued if running is not None else ()
    attributes: dict[str, AttributeValue] = {}
    duration = record.duration_s
    for fraction in ETA_FRACTIONS:
        estimate = ours_at(record, state.calibration, fraction, start)
        if estimate is None:
            continue
        key = f"wantel.eta.at_{round(fraction * 100)}pct"
        attributes[f"{key}_s"] = estimate.remaining_s
        actual = duration * (1 - fraction)
        if record.completed and actual > 1e-3:
            attributes[f"{key}_error"] = (estimate.remaining_s - actual) / actual
    if not issued:
        return attributes
    prior = issued[0]
    attributes["wantel.eta.prior_s"] = prior.remaining_s
    if not record.completed:
        return attributes
    by_bucket: dict[str, list[float]] = {}
    for index, point in enumerate(issued):
        actual = (end_ts - point.ts) / 1e9
        if actual <= 1e-3:
            continue
        error = (point.remaining_s - actual) / actual
        if index == 0:
            attributes["wantel.eta.prior_error"] = error
            continue
        by_bucket.setdefault(bucket_of(point.progress), []).append(error)
    errors = [e for bucket in BUCKETS for e in by_bucket.get(bucket, [])]
    if errors:
        attributes["wantel.eta.residual"] = sum(errors) / len(errors)
    for bucket in BUCKETS:
        if bucket in by_bucket:
            values = by_bucket[bucket]
            attributes[f"wantel.eta.residual.{bucket}"] = sum(values) / len(values)
    return attributes


# -- configuration ---------------------------------------------------------------------------

PROTOCOLS: Final = ("http/protobuf", "grpc")
TRACES_PATH: Final = "/v1/traces"


def exporter_from_config(
    endpoint: str | None,
    *,
    protocol: str | None = None,
    headers: Mapping[str, str] | str | None = None,
    timeout: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> SpanExporter | None:
    """The OTLP span exporter that ``--otlp URL`` or the environment asks for, else ``None``.

    All configuration is read here, when the exporter is built (never at import):

    * ``endpoint`` (``--otlp``) wins; else ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (used as
      is), else ``OTEL_EXPORTER_OTLP_ENDPOINT`` (a base URL: ``/v1/traces`` is appended for
      HTTP). An ``--otlp`` URL without a path is treated as a base URL too, so
      ``--otlp http://jaeger:4318`` works.
    * ``protocol``; else ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL``, else
      ``OTEL_EXPORTER_OTLP_PROTOCOL``; else ``grpc`` for a ``grpc://``/``grpcs://`` URL, else
      ``http/protobuf`` (the specification's default). ``http/json`` is not offered by the
      Python SDK, so it is refused with a ``ValueError`` rather than silently replaced.
    * ``OTEL_SDK_DISABLED=true`` turns export off.
    * headers, timeout, compression, TLS files: ``headers``/``timeout`` when given, else the
      SDK exporter reads its own ``OTEL_EXPORTER_OTLP_*`` variables.
    """
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    url = (endpoint or "").strip()
    is_base = True
    if not url:
        url = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        is_base = False
        if not url:
            url = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
            is_base = True
    if not url:
        return None
    if "://" not in url:
        url = f"http://{url}"
    parts = urlsplit(url)
    chosen = (protocol or env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
              or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
              or ("grpc" if parts.scheme in ("grpc", "grpcs") else "http/protobuf"))
    chosen = chosen.strip().lower()
    if chosen not in PROTOCOLS:
        raise ValueError(f"OTLP protocol {chosen!r} is not supported; use one of "
                         f"{', '.join(PROTOCOLS)}")
    scheme = {"grpc": "http", "grpcs": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https"):
        raise ValueError(f"OTLP endpoint {url!r}: expected an http(s):// or grpc(s):// URL")
    header_map = _parse_headers(headers) if headers is not None else None
    if chosen == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )

        return GrpcSpanExporter(endpoint=f"{scheme}://{parts.netloc}",
                                insecure=scheme == "http", headers=header_map,
                                timeout=timeout)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpanExporter,
    )

    path = parts.path
    if is_base and (not endpoint or path in ("", "/")):
        path = path.rstrip("/") + TRACES_PATH
    full = f"{scheme}://{parts.netloc}{path}" + (f"?{parts.query}" if parts.query else "")
    return HttpSpanExporter(endpoint=full, headers=header_map, timeout=timeout)


def _parse_headers(headers: Mapping[str, str] | str) -> dict[str, str]:
    """``k=v,k2=v2`` (the ``OTEL_EXPORTER_OTLP_HEADERS`` form) or a mapping."""
    if not isinstance(headers, str):
        return dict(headers)
    parsed: dict[str, str] = {}
    for pair in headers.split(","):
        key, sep, value = pair.partition("=")
        if sep and key.strip():
            parsed[key.strip().lower()] = value.strip()
    return parsed


# -- the sink --------------------------------------------------------------------------------


class _SpanState(msgspec.Struct, kw_only=True):
    """What a :class:`SpanSink` keeps in its runner's checkpoint: the jobs open there."""

    version: int = 3
    open: dict[str, list[bytes]] = {}  # job → its buffered events (telemetry.codec)
    issued: dict[str, list[EtaPoint]] = {}  # job → the ETAs issued so far (the engine's)
    starts: dict[str, LiveJob] = {}  # job → its estimator as the projection started it
    calibration: bytes | None = None
    exported: dict[str, list[str]] = {}  # job → ids of its spans already exported
    heard: dict[str, int] = {}  # job → when it was last heard from (ns since the epoch)
    workers: dict[str, int] = {}  # worker → when it was last heard from
    closed: list[str] = []  # jobs declared abandoned, oldest first: their later events wait
    # for a new run (a JobQueued or JobStarted)


@dataclass(frozen=True)
class ExportStats:
    """What a :class:`SpanSink` has done; a snapshot, safe to read from any thread."""

    jobs_exported: int = 0
    spans_exported: int = 0
    export_failures: int = 0
    open_jobs: int = 0
    pending_jobs: int = 0
    pending_spans: int = 0
    evicted_jobs: int = 0
    abandoned_jobs: int = 0
    last_error: str | None = None


@dataclass
class _Pending:
    job: str
    position: Position  # of the event that made the spans known: what acknowledging covers
    spans: list[ReadableSpan]
    final: bool  # the job's root is among them


@dataclass
class _Run:
    """One open job (a run of it: a reused id opens a run per JobQueued/JobStarted)."""

    events: list[Event]
    position: Position  # of its last event
    heard: int  # when it was last heard from, ns since the epoch
    worker: str | None = None
    started: bool = False
    exported: set[str] = field(default_factory=set)  # span ids handed to the exporter


#: How many abandoned jobs a sink remembers, to ignore their late events.
MAX_CLOSED: Final = 10_000


class SpanSink(Sink):
    """Span export as a :class:`~telemetry.runner.ProjectionRunner` sink: a job's spans go to
    ``exporter`` as soon as they are known; none is lost or sent twice.

    The runner de-duplicates and positions the events; this sink buffers each open job's span
    sources. A span is exported once it has ended: ``queue.wait`` at ``JobStarted``, each
    stage at its ``StageEnded``, and the root ``video.generate`` (with the stages still open)
    at the job's terminal event — or, for a job that never gets one (its process was killed,
    its host lost), when the job is **declared abandoned**: neither it nor its worker was heard
    from for ``abandon_after_s`` (the wall clock here, as the jobs projection does in event
    time: :data:`telemetry.liveness.WORKER_TIMEOUT_S` by default). Its root then ends at its
    last event with an ``ERROR`` status (``wantel.status="abandoned"``). The sink checks that
    while the runner follows live and is caught up: at each step and, through
    :attr:`tick_interval`, while the log is idle. A job that speaks again after that is not
    reopened; a new ``JobQueued``/``JobStarted`` under its id opens a new run (a new trace).

    The root carries the ETA attributes read from the engine's ETA projection state (the ETAs
    it issued during the job: the runner hands this sink the state just before each terminal
    event, see ``cut_before``). Built spans are held as pending; the runner then calls
    :meth:`force_flush`, which hands them to ``exporter.export()``: until that returns
    ``SUCCESS`` the sink reports them in :meth:`pending_since`, so the runner stops reading
    (the events wait in the log, not in memory) and retries with back-off, and writes no
    checkpoint past them. Once the collector accepts them, the runner checkpoints at once,
    with the open jobs' buffers and the ids of their spans already exported (:meth:`snapshot`):
    a restart neither loses nor repeats a span; only a crash between the collector's
    acknowledgement and the checkpoint's fsync can repeat one, with the same span id
    (collectors and Jaeger de-duplicate by id). ``force_flush()`` of the exporter itself is
    never trusted: it returns True even when the receiver is down.

    A job whose traceparent says its caller did not sample it exports nothing.

    Give span export a runner of its own (an engine with the ETA projection; see
    ``wantel/serving.py``): pausing for a collector that is down must not pause the
    projections that ``/metrics`` and the live page read. Without an ``eta`` projection in
    the engine, the ETA attributes are computed from the job's events instead.

    :meth:`shutdown` shuts the exporter down.
    """

    name = "spans"
    cut_before: frozenset[type[Event]] = frozenset(TERMINALS)

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_batch_spans: int = 512,
        max_open_jobs: int = 10_000,
        resource: Resource | None = None,
        abandon_after_s: float = WORKER_TIMEOUT_S,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        if not abandon_after_s > 0:
            raise ValueError(f"abandon_after_s must be > 0, got {abandon_after_s}")
        self.exporter = exporter
        self.abandon_after_s = abandon_after_s
        #: Seconds between the runner's idle calls of :meth:`on_tick`.
        self.tick_interval = min(1.0, abandon_after_s / 4)
        self._abandon_after_ns = int(abandon_after_s * 1e9)
        self._clock = clock
        self._max_batch_spans = max_batch_spans
        self._max_open_jobs = max_open_jobs
        self._resource = resource or default_resource()
        self._open: OrderedDict[str, _Run] = OrderedDict()  # oldest popped in O(1)
        self._workers: dict[str, int] = {}
        self._closed: OrderedDict[str, None] = OrderedDict()
        self._issued: dict[str, list[EtaPoint]] = {}
        self._starts: dict[str, LiveJob] = {}
        self._calibration: EtaCalibrated | None = None
        self._pending: list[_Pending] = []
        self._last_sweep = 0
        self._stats = ExportStats()
        self._stats_lock = threading.Lock()

    @property
    def stats(self) -> ExportStats:
        """Counters, as of the last step."""
        with self._stats_lock:
            return self._stats

    def _update(self, **changes: object) -> None:
        with self._stats_lock:
            self._stats = replace(self._stats, **changes)  # type: ignore[arg-type]

    def _publish(self) -> None:
        self._update(open_jobs=len(self._open), pending_jobs=len(self._pending),
                     pending_spans=sum(len(p.spans) for p in self._pending))

    # -- the runner's calls ------------------------------------------------------------------

    def on_applied(self, applied: Applied) -> None:
        """Buffer span sources; hold the spans each event finishes as pending."""
        eta: EtaState | None = applied.engine.states.get("eta")
        finished = applied.engine.finished_jobs
        # Live, a job was heard from when its event was read (the clocks of other hosts may
        # be off); while catching up, at its own time.
        now = self._clock() if applied.live else None
        touched: set[str] = set()
        for position, event in applied.positioned():
            if isinstance(event, EtaCalibrated):
                self._calibration = event
                continue
            if isinstance(event, (WorkerLost, WorkerStopped)):
                self._worker_gone(event)
                if isinstance(event, WorkerLost):
                    continue  # its ``worker`` is the lost one, not who wrote it
            heard = now if now is not None else event.ts
            worker = event.worker
            if worker is not None and heard > self._workers.get(worker, 0):
                self._workers[worker] = heard
            if not isinstance(event, SPAN_SOURCES):
                continue
            job = event.job
            run = self._run_for(job, event, position, heard, finished)
            if run is None:
                continue
            run.events.append(event)
            run.position = max(run.position, position)
            run.heard = max(run.heard, heard)
            if isinstance(event, JobStarted):
                run.started, run.worker = True, event.worker
            if isinstance(event, TERMINALS):
                self._close(job, run, position, eta_issued=(
                    self._issued.pop(job, ()) if eta is not None else None))
                continue
            if isinstance(event, (StageEnded, JobStarted)):
                self._hold(job, run, position, final=False)
            if eta is not None:
                touched.add(job)
        if eta is not None:  # the ETAs issued so far, read before any terminal is applied
            running = eta.running
            for job in touched:
                live = running.get(job)
                if live is not None and live.issued and job in self._open:
                    self._issued[job] = list(live.issued)
                    if job not in self._starts:  # first seen: its estimator as it started
                        self._starts[job] = live.live.restart()
        if now is not None and applied.behind == 0 and now - self._last_sweep >= 1e9:
            self._sweep(now)
        self._publish()

    def on_tick(self) -> None:
        """The runner follows live and the log is idle: declare the silent jobs abandoned."""
        self._sweep(self._clock())
        self._publish()

    def _worker_gone(self, event: WorkerLost | WorkerStopped) -> None:
        """The worker was declared lost, or stopped: each started run of it ends now, its
        root with an ``ERROR`` status saying which (``worker lost`` / ``worker stopped``),
        as the jobs projection abandons them. A declaration that one of its runs refutes (an
        event of it after ``last_seen_ts``) ends nothing, as there."""
        lost = isinstance(event, WorkerLost)
        runs = [(job, run) for job, run in self._open.items()
                if run.started and run.worker == event.worker]
        if isinstance(event, WorkerLost) and any(
                max(e.ts for e in run.events) > event.last_seen_ts for _, run in runs):
            return
        reason = "worker lost" if lost else "worker stopped"
        for job, run in runs:
            _log.warning("job abandoned; its trace ends with an error", job=job,
                         worker=run.worker, reason=reason)
            self._close(job, run, run.position, abandoned=True, reason=reason)

    def _run_for(self, job: str, event: Event, position: Position, heard: int,
                 finished: Mapping[str, None]) -> _Run | None:
        """The open run ``event`` belongs to (opened if it begins one), or ``None``: the event
        follows its job's end and opens nothing."""
        run = self._open.get(job)
        opening = isinstance(event, (JobQueued, JobStarted))
        if run is not None:
            if not (opening and run.started):
                return run
            # A reused id began again without ending: the earlier run is over.
            self._close(job, run, run.position, abandoned=True)
        elif not opening and (job in finished or job in self._closed):
            # The runner cut before each terminal, so a job already finished here ended
            # earlier: what follows its end is no part of its trace.
            return None
        self._closed.pop(job, None)
        run = self._open[job] = _Run(
            events=[self._calibration] if self._calibration is not None else [],
            position=position, heard=heard)
        self._evict()
        return run

    def _hold(self, job: str, run: _Run, position: Position, *, final: bool,
              eta_issued: Sequence[EtaPoint] | None = None, abandoned: bool = False,
              reason: str | None = None) -> None:
        """Build the run's spans and hold the ones not handed over yet as pending."""
        try:
            spans = spans_for_job(
                run.events, resource=self._resource, final=final,
                eta_issued=eta_issued, eta_start=self._starts.get(job) if final else None,
                abandoned_after_s=self.abandon_after_s if abandoned else None,
                abandon_reason=reason)
        except Exception as exc:  # one malformed job must not stop every other trace
            _log.warning("cannot build spans", job=job, error=f"{type(exc).__name__}: {exc}")
            return
        fresh = [span for span in spans if _span_hex(span) not in run.exported]
        if fresh:  # none: nothing new, or a job its caller did not sample
            run.exported.update(_span_hex(span) for span in fresh)
            self._pending.append(_Pending(job, position, fresh, final))

    def _close(self, job: str, run: _Run, position: Position, *, abandoned: bool = False,
               eta_issued: Sequence[EtaPoint] | None = None, reason: str | None = None) -> None:
        """The run ended (or was declared abandoned): its last spans, root included."""
        self._hold(job, run, position, final=True, eta_issued=eta_issued, abandoned=abandoned,
                   reason=reason)
        del self._open[job]
        self._issued.pop(job, None)
        self._starts.pop(job, None)
        if abandoned:
            self._closed[job] = None
            while len(self._closed) > MAX_CLOSED:
                self._closed.popitem(last=False)
            self._update(abandoned_jobs=self.stats.abandoned_jobs + 1)

    def _sweep(self, now: int) -> None:
        """Declare abandoned each started job not heard from, nor its worker, for
        ``abandon_after_s`` (a queued job waits as long as its queue holds it)."""
        self._last_sweep = now
        horizon = now - self._abandon_after_ns
        for job, run in list(self._open.items()):
            if not run.started or run.heard >= horizon:
                continue
            if run.worker is not None and self._workers.get(run.worker, 0) >= horizon:
                continue
            _log.warning("job declared abandoned; its trace ends with an error", job=job,
                         worker=run.worker, silent_s=round((now - run.heard) / 1e9, 1))
            self._close(job, run, run.position, abandoned=True)

    def pending_since(self) -> Position | None:
        """The position of the oldest event whose spans the collector has not accepted yet."""
        return min(p.position for p in self._pending) if self._pending else None

    def force_flush(self, timeout: float | None = None) -> bool:
        """Export every pending span, ``max_batch_spans`` at a time, each batch tried once;
        True when none is left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._pending:
            if deadline is not None and time.monotonic() > deadline:
                return False
            batch: list[_Pending] = []
            count = 0
            for pending in self._pending:
                if batch and count + len(pending.spans) > self._max_batch_spans:
                    break
                batch.append(pending)
                count += len(pending.spans)
            spans = [span for pending in batch for span in pending.spans]
            error: str | None = None
            if spans:
                try:
                    result = self.exporter.export(spans)
                    if result is not SpanExportResult.SUCCESS:
                        error = f"exporter returned {result.name}"
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
            if error is not None:
                self._update(export_failures=self.stats.export_failures + 1, last_error=error)
                self._publish()
                _log.warning("span export failed; will retry", error=error, spans=len(spans))
                return False
            del self._pending[:len(batch)]
            stats = self.stats
            self._update(jobs_exported=stats.jobs_exported + sum(p.final for p in batch),
                         spans_exported=stats.spans_exported + len(spans), last_error=None)
        self._publish()
        return True

    def shutdown(self, timeout: float | None = None) -> None:
        """Shut the exporter down."""
        self.exporter.shutdown()

    def snapshot(self) -> bytes:
        """The open jobs' buffered events, ETAs and exported span ids (checkpoints are written
        only when nothing is pending, so there are no spans to keep)."""
        runs = self._open
        return msgspec.msgpack.encode(_SpanState(
            open={job: [encode(e) for e in run.events] for job, run in runs.items()},
            issued={job: points for job, points in self._issued.items() if job in runs},
            starts={job: live for job, live in self._starts.items() if job in runs},
            calibration=encode(self._calibration) if self._calibration is not None else None,
            exported={job: sorted(run.exported) for job, run in runs.items() if run.exported},
            heard={job: run.heard for job, run in runs.items()},
            workers=dict(self._workers), closed=list(self._closed)))

    def restore(self, data: bytes) -> None:
        """Take back the open jobs of a checkpoint."""
        state = msgspec.msgpack.decode(data, type=_SpanState)
        self._open = OrderedDict()
        for job, raw_events in state.open.items():
            events = [decode_one(raw) for raw in raw_events]
            started = next((e for e in events if isinstance(e, JobStarted)), None)
            heard = state.heard.get(job, max((e.ts for e in events), default=0))
            self._open[job] = _Run(
                events=events, position=0, heard=heard, started=started is not None,
                worker=started.worker if started is not None else None,
                exported=set(state.exported.get(job, ())))
        self._issued = dict(state.issued)
        self._starts = dict(state.starts)
        self._workers = dict(state.workers)
        self._closed = OrderedDict.fromkeys(state.closed)
        calibration = decode_one(state.calibration) if state.calibration is not None else None
        self._calibration = calibration if isinstance(calibration, EtaCalibrated) else None
        self._publish()

    def _evict(self) -> None:
        while len(self._open) > self._max_open_jobs:
            oldest, _ = self._open.popitem(last=False)
            self._issued.pop(oldest, None)
            self._starts.pop(oldest, None)
            _log.warning("too many open jobs; dropping the oldest's trace", job=oldest)
            self._update(evicted_jobs=self.stats.evicted_jobs + 1)


def _span_hex(span: ReadableSpan) -> str:
    context = span.context
    assert context is not None
    return f"{context.span_id:016x}"


__all__ = [
    "ETA_FRACTIONS",
    "MAX_CLOSED",
    "QUEUE_ROLE",
    "ROOT_ROLE",
    "ROOT_SPAN",
    "SERVICE_NAME",
    "ExportStats",
    "SpanSink",
    "default_resource",
    "eta_attributes",
    "exporter_from_config",
    "job_trace_id",
    "spans_for_job",
    "stage_role",
    "traceparent_of",
]
