"""The serving stack of ``wantel serve`` and ``wantel demo``: the log follower and its sinks,
the HTTP app and server, and span export, wired and started as one.

The same machinery runs inside ``wantel demo`` and in tests, so it is built from two reusable
pieces: :class:`BackgroundServer` (uvicorn on a socket this process already bound, in a thread)
and :class:`Serving` (service + app + server + optional OTLP span export, started and stopped
as one). Binding the socket here, before uvicorn starts, turns "port in use" into a one-line
error and lets tests and ``--port 0`` learn the real port without a race.

What follows the log is :class:`~telemetry.runner.ProjectionRunner`, with sinks:

* the service's runner (every projection; ``serve.ckpt``): the WebSocket fan-out (the
  service's own) and, with :meth:`Serving.log_lifecycle`, the lifecycle log lines;
* with span export, a second runner (the ETA projection only; ``otel.ckpt``) with the span
  sink: it pauses while the collector is down and checkpoints on its acknowledgement, which
  must not pause ``/metrics`` and the live page.
* with ``--webhook URL``, one runner per receiver (the jobs projection only;
  ``webhook-<digest of the URL>.ckpt``) with its webhook sink, for the same reason: a receiver
  that is down delays its own deliveries and nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import h11
import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.h11_impl import H11Protocol

from exporters.liveness import default_declarer
from exporters.server import check_token, check_trace_url, create_app
from exporters.service import TelemetryService
from exporters.webhooks import DEFAULT_RETRY_BACKOFF as WEBHOOK_BACKOFF
from exporters.webhooks import WebhookCollector, WebhookSink, check_url
from telemetry.engine import CheckpointStore, ProjectionEngine
from telemetry.errors import UsageError
from telemetry.liveness import WORKER_TIMEOUT_S
from telemetry.log.base import BrokenLog, EventLog, LogError
from telemetry.log.local import CHECKPOINT_DIR, LocalLog
from telemetry.projections.eta import EtaProjection
from telemetry.projections.jobs import JobsProjection
from telemetry.runner import ProjectionRunner
from wantel.commands.common import fleet_requested, nats_options
from wantel.config import (
    TOKEN_ENV,
    TRACE_URL_ENV,
    WEBHOOK_SECRET_ENV,
    otlp_configured,
    resolve_log_dir,
    resolve_token,
    resolve_trace_url,
    resolve_webhook_secret,
    resolve_worker_timeout,
)

#: Where ``serve --nats`` keeps its checkpoints when ``--state`` is not given.
DEFAULT_FLEET_STATE: Final = "wantel-fleet-state"

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 9464

#: The HTTP server's limits (``docs/server.md``, ``docs/security.md``).
#: Seconds a client has to send a request's line and headers, from connecting or from the end
#: of its previous response; then the connection is closed (uvicorn has no such timeout: a
#: thousand half-sent requests were held for good).
HEADER_TIMEOUT_S: Final = 10.0
#: Seconds an idle keep-alive connection is kept (uvicorn's default, stated).
KEEP_ALIVE_S: Final = 5
#: Connections (HTTP and WebSocket) plus requests in flight: beyond it, a request gets 503.
MAX_CONNECTIONS: Final = 1000
#: The longest request line plus headers, in bytes (h11's default, stated): 431 beyond.
MAX_HEADER_BYTES: Final = 16 * 1024
#: The largest WebSocket message a client may send (a ping is tens of bytes): beyond it the
#: connection is closed with 1009. uvicorn's default was 16 MiB.
WS_MAX_MESSAGE_BYTES: Final = 64 * 1024


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's line and headers: a client
    that connects, or finishes a response, and then sends less than a whole request head
    within :data:`HEADER_TIMEOUT_S` is disconnected (a slow-loris defence). Bodies and
    responses are not timed: wantel's routes take no body."""

    header_timeout: float = HEADER_TIMEOUT_S
    #: Connections closed for it, by every instance (for tests and ``/readyz``-style checks).
    timed_out = 0

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer: asyncio.TimerHandle | None = self.loop.call_later(
            self.header_timeout, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a whole request head arrived
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # the next request's head is timed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being answered
        type(self).timed_out += 1
        self.transport.close()


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket; ``port`` 0 picks a free one. Errors are the user's: one line."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


class BackgroundServer:
    """uvicorn serving ``app`` on ``sock`` from a daemon thread.

    uvicorn installs no signal handlers outside the main thread, so Ctrl-C stays with the
    caller, which stops the server with :meth:`stop`.
    """

    def __init__(self, app: Any, sock: socket.socket, *, log_level: str = "warning") -> None:
        self.sock = sock
        # log_config=None: uvicorn's loggers propagate to the root logger, which
        # wantel.logs.configure_logging renders as JSON lines like every other line (uvicorn's
        # own configuration gave them plain-text handlers of their own).
        config = uvicorn.Config(app, log_level=log_level, lifespan="off", log_config=None,
                                timeout_graceful_shutdown=2, ws_ping_interval=None,
                                http=HeaderTimeoutProtocol, timeout_keep_alive=KEEP_ALIVE_S,
                                limit_concurrency=MAX_CONNECTIONS,
                                h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                                ws_max_size=WS_MAX_MESSAGE_BYTES)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="wantel-http", daemon=True)

    @property
    def port(self) -> int:
        """The port actually bound."""
        return int(self.sock.getsockname()[1])

    @property
    def host(self) -> str:
        """The address actually bound."""
        return str(self.sock.getsockname()[0])

    def _run(self) -> None:
        self.server.run(sockets=[self.sock])

    def start(self, timeout: float = 10.0) -> None:
        """Start serving; returns once uvicorn accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)

    def stop(self, timeout: float = 5.0) -> None:
        """Close connections (WebSocket clients see 1012) and stop the thread."""
        self.server.should_exit = True
        if self._thread.ident is not None:
            self._thread.join(timeout)
        self.sock.close()


class Serving:
    """Service + ASGI app + HTTP server (+ OTLP span export): what ``serve`` and ``demo`` run."""

    def __init__(self, log: EventLog, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 token: str | None = None, otlp: str | None = None,
                 export_spans: bool = False,
                 checkpoint_dir: str | Path | None = None,
                 webhooks: Sequence[str] = (), webhook_secret: str | None = None,
                 webhook_backoff: tuple[float, float] = WEBHOOK_BACKOFF,
                 worker_timeout_s: float = WORKER_TIMEOUT_S,
                 trace_url: str | None = None, declare_lost: bool = True) -> None:
        """``checkpoint_dir`` defaults to a local log's ``checkpoints/``; any other log (the
        fleet stream) needs one named. ``declare_lost``: append ``WorkerLost`` for workers
        silent past ``worker_timeout_s`` (:mod:`exporters.liveness`)."""
        self.log = log
        self.token = token
        self.worker_timeout_s = worker_timeout_s
        if checkpoint_dir is None:
            if not isinstance(log, LocalLog):
                raise ValueError("a log that is not a local directory needs a checkpoint_dir")
            checkpoint_dir = log.path / CHECKPOINT_DIR
        self.checkpoint_dir = Path(checkpoint_dir)
        #: What is followed, for people: a directory, or the fleet stream's address.
        self.location = (f"{log.path}/" if isinstance(log, LocalLog)
                         else str(getattr(log, "location", type(log).__name__)))
        self.declare_lost = declare_lost
        self.service = TelemetryService(
            log, checkpoint_dir=self.checkpoint_dir, worker_timeout_s=worker_timeout_s,
            declare_lost_as=default_declarer() if declare_lost else None)
        #: One sink per receiver (a URL given twice is one receiver).
        self.webhooks = [WebhookSink(url, secret=webhook_secret, name="webhook")
                         for url in dict.fromkeys(webhooks)]
        self.webhook_backoff = webhook_backoff
        self._webhook_runners: list[ProjectionRunner] = []
        self.app: Starlette = create_app(
            self.service, token=token, trace_url=trace_url,
            collectors=[WebhookCollector(self.webhooks)] if self.webhooks else ())
        self.http = BackgroundServer(self.app, bind(host, port))
        self.otlp = otlp
        self.export_spans = export_spans or otlp is not None
        self._spans: ProjectionRunner | None = None

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:9464/``."""
        host = self.http.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.http.port}/"

    def urls(self) -> list[tuple[str, str]]:
        """What is served where, for the start-up banner."""
        base = self.url
        page = base + ("?token=<token>" if self.token else "")  # never echo the secret
        ws = "ws" + base.removeprefix("http") + "ws/progress"
        return [("live page", page), ("jobs API", base + "api/jobs"),
                ("metrics", base + "metrics"), ("WebSocket", ws),
                ("health", base + "healthz")]

    def log_lifecycle(self) -> None:
        """Write one structured log line per lifecycle event once caught up (trace ids
        included): a sink of the service's runner. Call before :meth:`start`."""
        from exporters.logs import LifecycleLogger

        self.service.add_sink(LifecycleLogger())

    def start(self) -> None:
        """Start following the log, serving HTTP and (if configured) exporting spans."""
        self.service.start()
        self.http.start()
        if self.export_spans:
            # Declaring lost workers, WorkerLost ends their jobs' traces ("worker lost"); the
            # span sink's own silence rule is the fallback, given twice as long.
            self._spans = _start_span_export(
                self.log, self.otlp, self.checkpoint_dir,
                self.worker_timeout_s * (2 if self.declare_lost else 1))
        for sink in self.webhooks:
            runner = webhook_runner(self.log, sink, self.checkpoint_dir,
                                    retry_backoff=self.webhook_backoff)
            runner.start()
            self._webhook_runners.append(runner)

    def stop(self) -> None:
        """Stop everything; the projection checkpoint is written last. Webhook runners stop
        without a last try: what a receiver has not acknowledged waits in the log for the
        next start."""
        self.http.stop()
        for runner in self._webhook_runners:
            runner.stop()
        self._webhook_runners.clear()
        if self._spans is not None:
            self._spans.shutdown()
        self.service.stop()

    def __enter__(self) -> Serving:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


SPANS_CHECKPOINT: Final = "otel.ckpt"


def span_export_runner(log: EventLog, exporter: Any, checkpoint_dir: Path,
                       worker_timeout_s: float = WORKER_TIMEOUT_S) -> ProjectionRunner:
    """A runner of its own for span export: the ETA projection (the span sink reads the ETAs
    each job was issued from it) and the span sink, checkpointed in ``otel.ckpt``; a job
    silent for ``worker_timeout_s`` (its worker too) is exported as abandoned."""
    from exporters.otel import SpanSink

    return ProjectionRunner(log, ProjectionEngine([EtaProjection()]),
                            CheckpointStore(checkpoint_dir / SPANS_CHECKPOINT),
                            sinks=[SpanSink(exporter, abandon_after_s=worker_timeout_s)],
                            poll_interval=0.05, name="wantel-otel")


def webhook_checkpoint(checkpoint_dir: Path, url: str) -> Path:
    """Where the runner of the receiver at ``url`` keeps its checkpoint."""
    return checkpoint_dir / f"webhook-{hashlib.sha256(url.encode()).hexdigest()[:16]}.ckpt"


def webhook_runner(log: EventLog, sink: WebhookSink, checkpoint_dir: Path, *,
                   retry_backoff: tuple[float, float] = WEBHOOK_BACKOFF) -> ProjectionRunner:
    """A runner of its own for one webhook receiver: the jobs projection (a body's job
    fields) and the sink, checkpointed per URL. A receiver seen for the first time (no
    checkpoint) gets the transitions from the log's end on, not its history."""
    store = CheckpointStore(webhook_checkpoint(checkpoint_dir, sink.url))
    first = store.load() is None
    if first:
        last = log.last_position()
        sink.deliver_from = 0 if last is None else last + 1
    runner = ProjectionRunner(log, ProjectionEngine([JobsProjection(keep_finished=1000)]),
                              store, sinks=[sink], poll_interval=0.05,
                              retry_backoff=retry_backoff, name="wantel-webhook")
    if first:  # where delivery starts must survive a restart before anything happens
        runner.checkpoint(force=True)
    return runner


def _start_span_export(log: EventLog, endpoint: str | None, checkpoint_dir: Path,
                       worker_timeout_s: float = WORKER_TIMEOUT_S) -> ProjectionRunner | None:
    """OTLP span export from the log (imported here: the OpenTelemetry SDK is slow to load).

    ``endpoint`` ``None`` lets the exporter read the ``OTEL_EXPORTER_OTLP_*`` environment.
    """
    from exporters.otel import exporter_from_config

    try:
        exporter = exporter_from_config(endpoint)
    except ValueError as exc:  # e.g. OTEL_EXPORTER_OTLP_PROTOCOL=http/json
        raise UsageError(f"OTLP export: {exc}") from None
    if exporter is None:
        return None
    runner = span_export_runner(log, exporter, checkpoint_dir, worker_timeout_s)
    runner.start()
    return runner


def open_serving(args: argparse.Namespace) -> Serving:
    """Build (not start) the serving stack from ``serve``/``demo`` flags; creates the log."""
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {args.port}")
    token = resolve_token(args.token)
    if token is not None:
        try:
            check_token(token)
        except ValueError as exc:
            raise UsageError(f"--token (or ${TOKEN_ENV}): {exc}") from None
    spans = otlp_configured(args.otlp)
    webhooks: list[str] = list(getattr(args, "webhook", None) or [])
    for url in webhooks:
        try:
            check_url(url)
        except ValueError as exc:
            raise UsageError(f"--webhook: {exc}") from None
    secret = resolve_webhook_secret(getattr(args, "webhook_secret", None))
    if not webhooks:
        secret = None  # nothing to sign
    elif secret is not None and not secret:
        raise UsageError(f"--webhook-secret (or ${WEBHOOK_SECRET_ENV}) is empty: give a "
                         "non-empty secret, or none to send unsigned webhooks")
    worker_timeout = resolve_worker_timeout(getattr(args, "worker_timeout", None))
    declare_lost = not getattr(args, "no_declare_lost", False)
    trace_url = resolve_trace_url(getattr(args, "trace_url", None))
    if trace_url is not None:
        try:
            check_trace_url(trace_url)
        except ValueError as exc:
            raise UsageError(f"--trace-url (or ${TRACE_URL_ENV}): {exc}") from None
    if fleet_requested(args):
        from telemetry.log.nats import NatsLog

        options = nats_options(args, reconnect=True)
        try:
            fleet = NatsLog(options)
        except LogError as exc:
            raise UsageError(str(exc)) from None
        state = Path(args.state or DEFAULT_FLEET_STATE) / CHECKPOINT_DIR
        return Serving(fleet, host=args.host, port=args.port, token=token,
                       otlp=args.otlp or None, export_spans=spans, checkpoint_dir=state,
                       webhooks=webhooks, webhook_secret=secret,
                       worker_timeout_s=worker_timeout, trace_url=trace_url,
                       declare_lost=declare_lost)
    try:
        log = LocalLog(resolve_log_dir(args.log))
    except BrokenLog:
        raise  # exit 1: the log needs fixing, the flags were right
    except LogError as exc:
        raise UsageError(str(exc)) from None
    return Serving(log, host=args.host, port=args.port, token=token, otlp=args.otlp or None,
                   export_spans=spans, webhooks=webhooks, webhook_secret=secret,
                   worker_timeout_s=worker_timeout, trace_url=trace_url,
                   declare_lost=declare_lost)


def print_banner(serving: Serving, command: str) -> None:
    """The URLs, first thing, so a user can open the page while the rest starts."""
    print(f"wantel {command}: following {serving.location}", flush=True)
    for name, url in serving.urls():
        print(f"  {name:<10} {url}", flush=True)
    for sink in serving.webhooks:
        signed = "signed" if sink.secret is not None else "UNSIGNED: set --webhook-secret"
        print(f"  {'webhook':<10} {sink.url} ({signed})", flush=True)
    if serving.export_spans:
        print(f"  {'spans':<10} OTLP to {serving.otlp or 'the OTEL_EXPORTER_OTLP_* endpoint'}",
              flush=True)
    if serving.http.host not in ("127.0.0.1", "::1", "localhost") and not serving.token:
        print(f"wantel {command}: warning: listening on {serving.http.host} without a token "
              f"(set --token or ${TOKEN_ENV})", file=sys.stderr, flush=True)
