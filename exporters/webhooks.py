"""Webhooks: a signed JSON POST per job state change, delivered at least once.

:class:`WebhookSink` is a :class:`~telemetry.runner.ProjectionRunner` sink, shaped like the
span sink (:class:`exporters.otel.SpanSink`): on each transition it applies — ``JobQueued``,
``JobStarted``, ``JobCompleted``, ``JobFailed``, ``JobCancelled`` — it builds the body and holds
it as pending; the runner calls :meth:`WebhookSink.force_flush`, which POSTs pending bodies in
log order and keeps each until the receiver answers 2xx. While a body is pending the sink
reports its position in :meth:`~WebhookSink.pending_since`, so the runner stops reading (the
transitions wait in the log, not in memory), retries with its doubling back-off and writes no
checkpoint past it; once the receiver acknowledges, the runner checkpoints at once. A restart
therefore resumes from the last acknowledged position: nothing acknowledged is sent again, and
nothing unacknowledged is lost. Only a crash between the receiver's 2xx and the checkpoint's
fsync repeats a delivery, with the same ``Wantel-Webhook-Id`` (receivers de-duplicate by it).

Each receiver gets a runner of its own (``wantel/serving.py``): one that is down delays only
its own deliveries, never ``/metrics``, the live page or another receiver.

The body (``docs/api.md``, "Webhooks")::

    {"id": "<job>:<seq>", "type": "job.completed", "created_at": 1765090000.123,
     "position": 42, "data": {"job": "...", "status": "completed", "model": ..., ...}}

Signing is the common scheme (Stripe's): with a secret, every POST carries
``Wantel-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">``; :func:`verify`
checks one (constant-time, with a tolerance on ``t`` against replays).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import msgspec
import structlog
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from telemetry import __version__
from telemetry.events import (
    Event,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobQueued,
    JobStarted,
    WorkerLost,
    WorkerStopped,
)
from telemetry.log.base import Position
from telemetry.projections.jobs import JobsState, JobView, abandoned_by
from telemetry.runner import Applied, Sink

_log = structlog.get_logger("wantel.webhooks")

#: The webhook event type of each transition.
EVENT_TYPES: Final[dict[type[Event], str]] = {
    JobQueued: "job.queued",
    JobStarted: "job.started",
    JobCompleted: "job.completed",
    JobFailed: "job.failed",
    JobCancelled: "job.cancelled",
}
#: The job's status after each transition (the jobs projection's words).
STATUS_AFTER: Final[dict[type[Event], str]] = {
    JobQueued: "queued",
    JobStarted: "running",
    JobCompleted: "completed",
    JobFailed: "failed",
    JobCancelled: "cancelled",
}
#: Events that abandon their worker's running jobs: a ``job.abandoned`` body per such job.
ABANDONING: Final = (WorkerLost, WorkerStopped)
SIGNATURE_HEADER: Final = "Wantel-Signature"
ID_HEADER: Final = "Wantel-Webhook-Id"
EVENT_HEADER: Final = "Wantel-Event"
#: Seconds a receiver should accept between the signature's ``t`` and its own clock.
DEFAULT_TOLERANCE_S: Final = 300
#: Seconds a POST may take (connect, send, answer) before it counts as unreachable.
DEFAULT_TIMEOUT_S: Final = 10.0
#: The first and the longest wait between tries while a receiver refuses (the runner's
#: doubling back-off): a receiver back after an outage gets its backlog within this.
DEFAULT_RETRY_BACKOFF: Final = (0.5, 30.0)
#: The largest body sent. Bodies are small (a job's fields; error messages are bounded when
#: recorded); one over this, from a hand-written log, is sent with ``data`` cut to the
#: identifying fields and ``"truncated": true`` rather than refused by a receiver forever.
MAX_BODY_BYTES: Final = 64 * 1024
MAX_URL_LENGTH: Final = 2048
#: ``wantel_webhook_deliveries_total{result}``: one per POST tried.
RESULTS: Final = ("delivered", "http_error", "unreachable")

_encode: Final = msgspec.json.Encoder().encode


def check_url(url: str) -> str:
    """``url`` if webhooks can be POSTed to it, else ``ValueError`` saying why in a phrase."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("the URL is empty")
    if url != url.strip() or any(c.isspace() or ord(c) < 0x20 for c in url):
        raise ValueError(f"{url!r} holds whitespace or control characters")
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"the URL is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{url!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{url!r}: expected an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError(f"{url!r} names no host")
    if port == 0:
        raise ValueError(f"{url!r}: port 0 cannot be reached")
    if parts.fragment:
        raise ValueError(f"{url!r}: a fragment (#…) is never sent; remove it")
    return url


def sign(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """The ``Wantel-Signature`` header value: ``t=<timestamp>,v1=<hex HMAC-SHA256 of
    "<timestamp>.<body>" under secret>``."""
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str | bytes, header: str | None, body: bytes, *,
           tolerance_s: float = DEFAULT_TOLERANCE_S, now: float | None = None) -> bool:
    """Whether ``header`` (a ``Wantel-Signature`` value) signs ``body`` under ``secret``, with
    a timestamp within ``tolerance_s`` of ``now``. Any ``v1`` in the header may match (a
    sender rotating secrets may send one per secret)."""
    if not header:
        return False
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    clock = time.time() if now is None else now
    if abs(clock - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected, c) for c in candidates)


def _seconds(ts: int | None) -> float | None:
    return None if ts is None else ts / 1e9


def delivery_id(event: Event, position: Position) -> str:
    """A stable id for one transition: ``<job>:<seq>`` (the log's de-duplication key)."""
    return f"{event.job}:{event.seq if event.seq >= 0 else f'p{position}'}"


def body_of(event: Event, position: Position, view: JobView | None) -> dict[str, Any]:
    """The JSON body for one transition: what the event says, with the job's view (the jobs
    projection's, as of the event's batch) for what it does not."""
    kind = type(event)
    data: dict[str, Any] = {"job": event.job, "status": STATUS_AFTER[kind],
                            "worker": event.worker}
    if view is not None:
        data.update({
            "model": view.model, "variant": view.variant, "task": view.task,
            "width": view.width, "height": view.height, "num_frames": view.num_frames,
            "steps": view.total_steps, "steps_done": view.steps_done,
            "queued_at": _seconds(view.queued_ts), "started_at": _seconds(view.started_ts),
            "traceparent": view.traceparent, "queue": view.queue, "priority": view.priority})
        data["worker"] = event.worker or view.worker
    if isinstance(event, JobQueued):
        data.update(model=event.model, task=event.task, queued_at=event.ts / 1e9,
                    queue=event.queue, priority=event.priority)
    elif isinstance(event, JobStarted):
        data.update(model=event.model, variant=event.variant, task=event.task,
                    width=event.width, height=event.height, num_frames=event.num_frames,
                    steps=event.steps, started_at=event.ts / 1e9)
    elif isinstance(event, (JobCompleted, JobFailed, JobCancelled)):
        data.update(ended_at=event.ts / 1e9, duration_s=event.duration_s)
        if isinstance(event, JobCompleted):
            data.update(output_path=event.output_path, frames=event.frames,
                        bytes=event.bytes)
        elif isinstance(event, JobFailed):
            data["error"] = {"type": event.error_type, "message": event.message,
                             "oom": event.oom, "stage": event.stage, "step": event.step,
                             "category": event.category,
                             "suggestions": list(event.suggestions)}
        else:
            data.update(reason=event.reason, stage=event.stage, step=event.step)
    return {"id": delivery_id(event, position), "type": EVENT_TYPES[kind],
            "created_at": event.ts / 1e9, "position": position, "data": data}


def abandoned_body(event: Event, position: Position, view: JobView) -> dict[str, Any]:
    """The body announcing that ``event`` (a ``WorkerLost`` or ``WorkerStopped``) abandoned
    the job of ``view``: ``job.abandoned``, with the reason, the worker and who declared it.
    Its id is ``<job>:abandoned:<the event's stream>:<seq>``: stable, one per job."""
    data: dict[str, Any] = {
        "job": view.job, "status": "abandoned", "worker": view.worker, "model": view.model,
        "variant": view.variant, "task": view.task, "width": view.width,
        "height": view.height, "num_frames": view.num_frames, "steps": view.total_steps,
        "steps_done": view.steps_done, "queued_at": _seconds(view.queued_ts),
        "started_at": _seconds(view.started_ts), "traceparent": view.traceparent,
        "ended_at": event.ts / 1e9, "reason": view.abandon_reason,
        "declared_by": getattr(event, "declared_by", None),
        "last_seen_at": _seconds(getattr(event, "last_seen_ts", None))}
    return {"id": f"{view.job}:abandoned:{delivery_id(event, position)}",
            "type": "job.abandoned", "created_at": event.ts / 1e9, "position": position,
            "data": data}


def encode_body(body: dict[str, Any]) -> bytes:
    """``body`` as JSON, at most :data:`MAX_BODY_BYTES` (cut to the identifying fields)."""
    raw = _encode(body)
    if len(raw) <= MAX_BODY_BYTES:
        return raw
    data = body["data"]
    kept = {k: data.get(k) for k in ("job", "status", "model", "worker")}
    raw = _encode({**body, "data": {**kept, "truncated": True}})
    return raw[:MAX_BODY_BYTES] if len(raw) > MAX_BODY_BYTES else raw


def post(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> int:
    """POST ``body`` to ``url`` and return the status (redirects are not followed: a
    receiver that moved answers 3xx, which is not an acknowledgement)."""
    parts = urlsplit(url)
    connection_type = (http.client.HTTPSConnection if parts.scheme == "https"
                       else http.client.HTTPConnection)
    connection = connection_type(parts.hostname or "", parts.port, timeout=timeout)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request("POST", target, body=body, headers=dict(headers))
        response = connection.getresponse()
        response.read(64 * 1024)  # a receiver's answer is not ours to keep
        return response.status
    finally:
        connection.close()


@dataclass(frozen=True)
class _Pending:
    position: Position
    id: str
    type: str
    body: bytes


class _WebhookState(msgspec.Struct, kw_only=True):
    """What a :class:`WebhookSink` keeps in its runner's checkpoint."""

    deliver_from: int = 0
    counts: dict[str, int] = {}


class WebhookSink(Sink):
    """Job transitions POSTed to ``url``, signed with ``secret``, at least once and in order.

    Args:
        url: the receiver (:func:`check_url` says which are accepted).
        secret: the HMAC key; ``None`` sends no ``Wantel-Signature`` (not recommended).
        timeout: seconds a POST may take.
        deliver_from: transitions at earlier positions are history, not sent (a receiver
            added to a server whose log already holds jobs gets only what happens next); a
            checkpoint's value replaces it.
        name: the sink's name (unique per runner).
    """

    cut_before: frozenset[type[Event]] = frozenset((*EVENT_TYPES, *ABANDONING))

    def __init__(self, url: str, *, secret: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, deliver_from: Position = 0,
                 name: str = "webhook") -> None:
        self.url = check_url(url)
        self.secret = secret
        self.timeout = timeout
        self.deliver_from = deliver_from
        self.name = name
        self._pending: deque[_Pending] = deque()
        self._counts: dict[str, int] = dict.fromkeys(RESULTS, 0)
        self._lock = threading.Lock()  # the counts are read by /metrics' thread
        self.last_error: str | None = None

    @property
    def counts(self) -> dict[str, int]:
        """POSTs tried, by result (:data:`RESULTS`), since the receiver was first configured
        (kept in the checkpoint)."""
        with self._lock:
            return dict(self._counts)

    @property
    def pending(self) -> int:
        """Bodies waiting for the receiver's acknowledgement."""
        return len(self._pending)

    def on_applied(self, applied: Applied) -> None:
        """Hold a body for each transition applied (at or after :attr:`deliver_from`)."""
        jobs: JobsState | None = applied.engine.states.get("jobs")
        for position, event in applied.positioned():
            if isinstance(event, ABANDONING) and position >= self.deliver_from:
                for ended in abandoned_by(jobs, event) if jobs is not None else ():
                    announced = abandoned_body(event, position, ended)
                    self._pending.append(_Pending(position, announced["id"], announced["type"],
                                                  encode_body(announced)))
                continue
            kind = EVENT_TYPES.get(type(event))
            if kind is None or position < self.deliver_from:
                continue
            view = jobs.jobs.get(event.job) if jobs is not None else None
            try:
                body = encode_body(body_of(event, position, view))
            except Exception as exc:  # one odd event must not stop every other delivery
                _log.warning("cannot build a webhook body", job=event.job, url=self.url,
                             error=f"{type(exc).__name__}: {exc}")
                continue
            self._pending.append(_Pending(position, delivery_id(event, position), kind, body))

    def pending_since(self) -> Position | None:
        """The position of the oldest transition the receiver has not acknowledged."""
        return self._pending[0].position if self._pending else None

    def headers(self, pending: _Pending, timestamp: int) -> dict[str, str]:
        """The headers of one POST (signed at ``timestamp``, the time it is sent)."""
        headers = {"Content-Type": "application/json", "User-Agent": f"wantel/{__version__}",
                   ID_HEADER: pending.id, EVENT_HEADER: pending.type}
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = sign(self.secret, timestamp, pending.body)
        return headers

    def force_flush(self, timeout: float | None = None) -> bool:
        """POST pending bodies in order until one is refused; True when none is left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._pending:
            if deadline is not None and time.monotonic() > deadline:
                return False
            pending = self._pending[0]
            result, error = "delivered", ""
            try:
                status = post(self.url, pending.body, self.headers(pending, int(time.time())),
                              self.timeout)
                if not 200 <= status < 300:
                    result, error = "http_error", f"HTTP {status}"
            except (OSError, http.client.HTTPException) as exc:
                result, error = "unreachable", f"{type(exc).__name__}: {exc}"
            with self._lock:
                self._counts[result] += 1
            if result != "delivered":
                if self.last_error != error:
                    _log.warning("webhook delivery failed; will retry", url=self.url,
                                 id=pending.id, error=error, pending=len(self._pending))
                self.last_error = error
                return False
            self.last_error = None
            self._pending.popleft()
        return True

    def snapshot(self) -> bytes:
        """Where delivery starts and the counts (checkpoints are written only when nothing
        is pending, so there are no bodies to keep)."""
        return msgspec.msgpack.encode(_WebhookState(deliver_from=self.deliver_from,
                                                    counts=self.counts))

    def restore(self, data: bytes) -> None:
        """Take back a checkpoint's state."""
        state = msgspec.msgpack.decode(data, type=_WebhookState)
        self.deliver_from = state.deliver_from
        with self._lock:
            self._counts = dict.fromkeys(RESULTS, 0) | state.counts


class WebhookCollector(Collector):
    """``wantel_webhook_deliveries_total{result}`` and ``wantel_webhook_pending`` over sinks,
    read at scrape time."""

    def __init__(self, sinks: Iterable[WebhookSink]) -> None:
        self.sinks = tuple(sinks)

    def collect(self) -> Iterator[Metric]:
        """Fresh families from the sinks' counts."""
        totals = dict.fromkeys(RESULTS, 0)
        pending = 0
        for sink in self.sinks:
            for result, count in sink.counts.items():
                totals[result] = totals.get(result, 0) + count
            pending += sink.pending
        deliveries = CounterMetricFamily(
            "wantel_webhook_deliveries", "Webhook POSTs tried, by result (delivered: the "
            "receiver answered 2xx; http_error: another status; unreachable: no answer)",
            labels=["result"])
        for result, count in totals.items():
            deliveries.add_metric([result], count)
        waiting = GaugeMetricFamily(
            "wantel_webhook_pending", "Webhook bodies waiting for a receiver's acknowledgement")
        waiting.add_metric([], pending)
        yield deliveries
        yield waiting


__all__ = [
    "DEFAULT_RETRY_BACKOFF",
    "DEFAULT_TOLERANCE_S",
    "EVENT_TYPES",
    "ID_HEADER",
    "MAX_BODY_BYTES",
    "RESULTS",
    "SIGNATURE_HEADER",
    "WebhookCollector",
    "WebhookSink",
    "body_of",
    "check_url",
    "sign",
    "verify",
]
