"""The HTTP/WebSocket face of wantel: an ASGI app over a :class:`TelemetryService`.

``create_app(service)`` returns a plain Starlette app, so a user can run it with ``wantel serve``
or mount it inside their own Starlette/FastAPI service (``docs/server.md``). Every endpoint
reads the service's projections under its lock; nothing here folds events or keeps state of
its own, except one Prometheus registry.

Errors are JSON ``{"error": ..., "detail": ...}`` with the right 4xx/5xx, including Starlette's
own 404/405. With a token, everything except ``/healthz`` needs ``Authorization: Bearer T``; the
live page and the WebSocket also take ``?token=T``, because a browser can set no header on a
page load or a WebSocket handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from html import escape
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

import msgspec
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from exporters.service import (
    FLOODED,
    TelemetryService,
    UnknownJob,
    encode_frame,
    frame,
    queue_forecast,
    queues_data,
    snapshot_data,
    summarize,
)
from exporters.videos import DEFAULT_LIMIT as VIDEOS_DEFAULT_LIMIT
from exporters.videos import MAX_LIMIT as VIDEOS_MAX_LIMIT
from exporters.videos import list_videos, video_object
from telemetry.control import MAX_REASON, channel_of
from telemetry.events import CONTROL_STREAM, CancelRequested
from telemetry.projections.eta import EtaState
from telemetry.projections.jobs import TERMINAL_STATUSES, JobsState

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

#: WebSocket close codes (RFC 6455): policy violation for bad requests and refused tokens,
#: "try again later" while the server is still catching up with the log.
WS_POLICY_VIOLATION: Final = 1008
WS_TRY_AGAIN_LATER: Final = 1013
OPEN_PATHS: Final = frozenset({"/healthz"})
#: The longest ``id`` a ping may carry to be echoed, as JSON bytes.
MAX_PING_ID_BYTES: Final = 64
#: How long a closing handshake may wait for a client that does not read.
CLOSE_WAIT_S: Final = 1.0
QUERY_TOKEN_PATHS: Final = frozenset({"/", "/ws/progress"})
DEFAULT_LIST_LIMIT: Final = 50
MAX_LIST_LIMIT: Final = 10_000
#: The largest log position a parameter may name: 2**53 - 1, the largest integer a JavaScript
#: client holds exactly (a log of a million events a second takes 285 years to reach it).
MAX_POSITION: Final = 2**53 - 1
#: How many requests to the expensive routes (``/metrics``, ``/api/jobs``,
#: ``/api/jobs/{id}/events``) may be in flight at once; more get 503 with ``Retry-After``, so
#: a burst of them never starves ``/healthz``, the WebSocket feed or the log follower.
DEFAULT_MAX_EXPENSIVE: Final = 4
RETRY_AFTER_S: Final = 1
#: An integer parameter: ASCII digits with an optional minus sign, at most 18 digits (``int()``
#: also takes ``" 1_0 "`` and other scripts' digits, and 4,300 of them before it gives up).
_INTEGER: Final = re.compile(r"-?[0-9]{1,18}")


class ApiError(Exception):
    """An error answered as JSON ``{"error", "detail"}`` with ``status``."""

    def __init__(self, status: int, error: str, detail: Any = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


_json_encoder: Final = msgspec.json.Encoder(enc_hook=str)


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (the fallback path only)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def encode_json(content: Any) -> bytes:
    """JSON for a response body, whatever an event put in it: NaN and infinities become
    ``null`` (``json.dumps`` refuses them, so one recorded NaN made every list a 500), and a
    string that is not valid Unicode (a lone surrogate) is escaped rather than refused."""
    try:
        return _json_encoder.encode(content)
    except UnicodeEncodeError:
        return json.dumps(_finite(content), ensure_ascii=True, default=str).encode()


class SafeJSONResponse(JSONResponse):
    """A JSON response whose body never fails to encode (:func:`encode_json`)."""

    def render(self, content: Any) -> bytes:
        return encode_json(content)


def error_response(status: int, error: str, detail: Any = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The one error shape every endpoint uses."""
    return SafeJSONResponse({"error": error, "detail": detail}, status_code=status,
                            headers=headers)


def openai_error(status: int, message: str, code: str, param: str | None = None) -> Response:
    """An error in the OpenAI API's shape, for the ``/v1`` routes (what an OpenAI client
    parses): ``{"error": {"message", "type", "param", "code"}}``."""
    return SafeJSONResponse({"error": {"message": message, "type": "invalid_request_error",
                                       "param": param, "code": code}}, status_code=status)


def _int_param(request: HTTPConnection, name: str, default: int, *, minimum: int,
               maximum: int) -> int:
    """An integer query parameter within ``[minimum, maximum]``, else a 400."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if _INTEGER.fullmatch(raw) is None:
        shown = raw if len(raw) <= 40 else raw[:40] + "…"
        raise ApiError(400, f"bad {name}", f"{name} must be an integer between {minimum} and "
                                           f"{maximum}, got {shown!r}")
    value = int(raw)
    if not minimum <= value <= maximum:
        raise ApiError(400, f"bad {name}",
                       f"{name} must be an integer between {minimum} and {maximum}, got {value}")
    return value


class Busy:
    """At most ``limit`` requests to the expensive routes at once (on the app's event loop:
    a plain counter); one more is refused at once with 503 and ``Retry-After``, never queued:
    a queue of them is what kept a server busy for minutes."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the concurrency limit must be at least 1, got {limit}")
        self.limit = limit
        self.in_flight = 0
        self.refused = 0

    @contextlib.contextmanager
    def slot(self, what: str) -> Any:
        if self.in_flight >= self.limit:
            self.refused += 1
            raise ApiError(503, "busy", {"route": what, "limit": self.limit,
                                         "retry_after_s": RETRY_AFTER_S},
                           headers={"retry-after": str(RETRY_AFTER_S)})
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


def _authorized(conn: HTTPConnection, token: str, path: str) -> bool:
    """A constant-time comparison of the bearer header (or, where allowed, ``?token=``)."""
    scheme, _, given = conn.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
        return True
    query = conn.query_params.get("token")
    return (path in QUERY_TOKEN_PATHS and query is not None
            and hmac.compare_digest(query.encode(), token.encode()))


_UNAUTHORIZED: Final = (
    "unauthorized",
    "this server needs a token: send 'Authorization: Bearer <token>' (the live page and the "
    "WebSocket also accept ?token=<token>)",
)


#: The placeholder the trace link's URL template replaces in ``index.html``.
TRACE_URL_META: Final = '<meta name="wantel-trace-url" content="">'
#: What a trace URL template must hold: where the trace id goes.
TRACE_ID_FIELD: Final = "{trace_id}"


def check_trace_url(template: str) -> str:
    """``template`` if it can link a trace (an http(s) URL holding ``{trace_id}``), else
    ``ValueError`` saying why."""
    if TRACE_ID_FIELD not in template:
        raise ValueError(f"the trace URL template must hold {TRACE_ID_FIELD} (e.g. "
                         f"http://jaeger:16686/trace/{TRACE_ID_FIELD}), got {template!r}")
    if not template.startswith(("http://", "https://")):
        raise ValueError(f"the trace URL template must be an http(s):// URL, got {template!r}")
    return template


def _live_page(trace_url: str | None = None) -> str:
    """index.html with its stylesheet and script inlined, so the page is one authorized load;
    ``trace_url`` (a template with ``{trace_id}``) makes each job link to its trace."""
    static = resources.files("exporters") / "static"
    html = (static / "index.html").read_text(encoding="utf-8")
    if trace_url:
        html = html.replace(TRACE_URL_META, TRACE_URL_META.replace(
            'content=""', f'content="{escape(trace_url, quote=True)}"'))
    css = (static / "live.css").read_text(encoding="utf-8")
    js = (static / "live.js").read_text(encoding="utf-8")
    html = html.replace('<link rel="stylesheet" href="live.css">', f"<style>\n{css}</style>")
    return html.replace('<script src="live.js"></script>', f"<script>\n{js}</script>")


def check_token(token: str) -> str:
    """``token`` if a client can send it as a bearer token, else ``ValueError`` saying why.

    An empty token would mean "no auth" by accident; one with spaces around it, or a character
    outside visible ASCII, can never match what an HTTP client sends (header values are
    stripped and Latin-1), so the server would refuse everyone — say so at start instead.
    """
    if token == "":
        raise ValueError("the token is empty: give a non-empty token, or none to serve "
                         "without one")
    if token != token.strip():
        raise ValueError("the token starts or ends with whitespace, which no HTTP client "
                         "sends: remove it")
    bad = sorted({c for c in token if not "!" <= c <= "~"})
    if bad:
        shown = ", ".join(repr(c) for c in bad[:5])
        raise ValueError(f"the token may hold only visible ASCII characters (no spaces): "
                         f"it has {shown}")
    return token


def create_app(service: TelemetryService, *, token: str | None = None,
               max_expensive: int = DEFAULT_MAX_EXPENSIVE,
               collectors: Iterable[Collector] = (),
               trace_url: str | None = None) -> Starlette:
    """The ASGI app: ``/metrics``, ``/api/jobs…``, ``/ws/progress``, ``/``, probes.

    ``token``: when set, every route but ``/healthz`` requires it (:func:`check_token` says
    which tokens can work). ``max_expensive``: how many requests to the expensive routes may
    be in flight at once (:class:`Busy`). ``collectors``: more metric families for
    ``/metrics`` (the webhook sinks' counts). ``trace_url``: a URL template with ``{trace_id}``
    (:func:`check_trace_url`), where the live page links each job's trace (Jaeger:
    ``http://jaeger:16686/trace/{trace_id}``). The Prometheus collector is imported here, not
    at module load, so the rest of the server works without it.
    """
    if token is not None:
        check_token(token)
    if trace_url is not None:
        check_trace_url(trace_url)
    busy = Busy(max_expensive)
    metrics = _metrics_endpoint(service, busy, collectors)
    page = _live_page(trace_url)

    def follower() -> dict[str, Any] | None:
        """The follower's failure, while it is failing (it retries with a back-off)."""
        failure = service.failure
        if failure is None:
            return None
        return {"reason": failure.reason, "failing_since": failure.since,
                "retries": failure.retries, "next_retry_s": failure.next_retry_s}

    async def healthz(request: Request) -> Response:
        failing = follower()
        if failing is not None:
            return error_response(503, "the log follower is failing", failing)
        return SafeJSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        detail: dict[str, Any] = {"position": service.position,
                                  "subscribers": service.subscriber_count}
        failing = follower()
        if failing is not None:
            return error_response(503, "the log follower is failing", {**detail, **failing})
        if service.error is not None:
            return error_response(503, "the log follower stopped",
                                  {**detail, "reason": f"{type(service.error).__name__}: "
                                                       f"{service.error}"})
        if not service.ready:
            return error_response(503, "catching up with the log", detail)
        return SafeJSONResponse({"ready": True, **detail})

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"cache-control": "no-store"})

    async def list_jobs(request: Request) -> Response:
        limit = _int_param(request, "limit", DEFAULT_LIST_LIMIT, minimum=0,
                           maximum=MAX_LIST_LIMIT)

        def read(states: dict[str, Any]) -> dict[str, Any]:
            snap = snapshot_data(states, recent=limit)
            return {"position": service.position, "ready": service.ready, **snap,
                    **queues_data(queue_forecast(states))}

        with busy.slot("/api/jobs"):
            return SafeJSONResponse(await run_in_threadpool(service.read_states, read))

    async def get_job(request: Request) -> Response:
        job = request.path_params["job"]
        found = service.read_states(lambda states: _job_detail(states, job))
        if found is None:
            raise ApiError(404, "no such job", {"job": job})
        return SafeJSONResponse(found)

    async def job_events(request: Request) -> Response:
        job = request.path_params["job"]
        since = _int_param(request, "since", -1, minimum=-1, maximum=MAX_POSITION)
        limit = _int_param(request, "limit", 1000, minimum=1, maximum=MAX_LIST_LIMIT)
        if not service.knows_job(job):  # answered from memory: no log read for a stranger
            raise ApiError(404, "no such job", {"job": job})
        with busy.slot("/api/jobs/{id}/events"):
            try:
                events, last, more = await run_in_threadpool(service.job_events, job,
                                                              since=since, limit=limit)
            except UnknownJob:  # forgotten since (the index keeps as many as the jobs list)
                raise ApiError(404, "no such job", {"job": job}) from None
        return SafeJSONResponse({"job": job, "events": events, "next_since": last,
                                 "more": more})

    async def get_video(request: Request) -> Response:
        job = request.path_params["job"]
        found = service.read_states(lambda states: video_object(states, job))
        if found is None:
            return openai_error(404, f"no video (job) with id {job!r}", "not_found", "id")
        return SafeJSONResponse(found)

    async def list_video_objects(request: Request) -> Response:
        try:
            limit = _int_param(request, "limit", VIDEOS_DEFAULT_LIMIT, minimum=1,
                               maximum=VIDEOS_MAX_LIMIT)
        except ApiError as exc:
            return openai_error(400, str(exc.detail), "invalid_value", "limit")
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            return openai_error(400, f"order must be 'asc' or 'desc', got {order[:40]!r}",
                                "invalid_value", "order")
        after = request.query_params.get("after") or None
        page = service.read_states(lambda states: list_videos(states, limit=limit,
                                                              after=after, order=order))
        if page is None:
            return openai_error(404, f"after: no video (job) with id {after!r}", "not_found",
                                "after")
        return SafeJSONResponse(page)

    cancel_seq = _Counter()

    async def cancel_job(request: Request) -> Response:
        job = request.path_params["job"]
        if token is None and not _loopback(request):
            raise ApiError(403, "cancel needs a token", "without --token, only clients on "
                           "this machine (loopback) may cancel jobs: set a token to cancel "
                           "from elsewhere")
        reason = await _cancel_reason(request)
        channel = channel_of(service.log)
        if channel is None:
            raise ApiError(501, "cancel needs a local log", "the worker learns of a cancel "
                           "through a file in the log directory (docs/api.md, 'Cancel')")

        def check(states: dict[str, Any]) -> tuple[str | None, int]:
            view = states["jobs"].jobs.get(job)
            return (None if view is None else view.status,
                    service.engine.last_seq.get(CONTROL_STREAM, -1) + 1)

        status, seq = service.read_states(check)
        if status is None:
            raise ApiError(404, "no such job", {"job": job})
        if status in TERMINAL_STATUSES:
            raise ApiError(409, "the job has already ended", {"job": job, "status": status})
        by = "token" if token is not None else "api"
        event = CancelRequested(job=CONTROL_STREAM, seq=cancel_seq.next(seq),
                                ts=time.time_ns(), target=job, by=by, reason=reason)
        positions = await run_in_threadpool(service.log.append, [event])
        await run_in_threadpool(lambda: channel.request(job, by=by, reason=reason,
                                                        ts=event.ts))
        return SafeJSONResponse({"job": job, "status": "cancel_requested",
                                 "position": positions[-1], "reason": reason},
                                status_code=202)

    routes = [
        Route("/", index, name="live_page"),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/api/jobs", list_jobs),
        Route("/api/jobs/{job:str}", get_job),
        Route("/api/jobs/{job:str}/events", job_events),
        Route("/api/jobs/{job:str}/cancel", cancel_job, methods=["POST"]),
        WebSocketRoute("/ws/progress", _progress_endpoint(service)),
        Route("/v1/videos", list_video_objects),
        Route("/v1/videos/{job:str}", get_video),
    ]

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.error, exc.detail, exc.headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        detail = {"path": request.url.path, "method": request.method}
        return error_response(exc.status_code, str(exc.detail).lower(), detail, exc.headers)

    async def internal_error(request: Request, exc: Exception) -> Response:
        # Still JSON, and no traceback for the client: the server log has it.
        return error_response(500, "internal error", type(exc).__name__)

    middleware = [Middleware(TokenGuard, token=token)] if token is not None else []
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={ApiError: api_error, HTTPException: http_error,
                                        Exception: internal_error})
    app.state.service = service
    app.state.busy = busy
    return app


#: The largest body ``POST /api/jobs/{id}/cancel`` reads (``{"reason": "..."}``).
MAX_CANCEL_BODY: Final = 4096


class _Counter:
    """The control stream's next ``seq``: the engine's last plus one, never one handed out
    before (two cancels in a row, before the first is applied, must not share a ``seq``: the
    second would be dropped as a duplicate)."""

    def __init__(self) -> None:
        self._next = 0

    def next(self, at_least: int) -> int:
        value = self._next = max(self._next, at_least)
        self._next += 1
        return value


def _loopback(request: Request) -> bool:
    host = request.client.host if request.client is not None else ""
    return host == "::1" or host.startswith("127.") or host == "localhost"


async def _cancel_reason(request: Request) -> str:
    """The optional ``{"reason": "..."}`` body of a cancel; ``"requested"`` without one."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_CANCEL_BODY:
        raise ApiError(413, "body too large", f"a cancel's body is at most {MAX_CANCEL_BODY} "
                                              f"bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_CANCEL_BODY:
            raise ApiError(413, "body too large",
                           f"a cancel's body is at most {MAX_CANCEL_BODY} bytes")
    if not body.strip():
        return "requested"
    try:
        data = json.loads(body)
    except ValueError:
        raise ApiError(400, "bad body", 'send no body, or JSON {"reason": "<text>"}') from None
    reason = data.get("reason", "requested") if isinstance(data, dict) else None
    if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON:
        raise ApiError(400, "bad reason", f"reason must be a non-empty string of at most "
                                          f"{MAX_REASON} characters")
    return reason


class TokenGuard:
    """ASGI middleware: the bearer-token check, before routing, for HTTP and WebSocket alike.

    A refused WebSocket gets the same 401 JSON as HTTP, through the ASGI denial-response
    extension where the server has it (uvicorn does), else a close with 1008.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        root: str = scope.get("root_path", "")
        local = path[len(root):] if root and path.startswith(root) else path
        if local in OPEN_PATHS or _authorized(HTTPConnection(scope), self.token, local):
            await self.app(scope, receive, send)
            return
        response = error_response(401, *_UNAUTHORIZED,
                                  headers={"www-authenticate": 'Bearer realm="wantel"'})
        if scope["type"] == "http":
            await response(scope, receive, send)
            return
        websocket = WebSocket(scope, receive, send)
        if "websocket.http.response" in scope.get("extensions", {}):
            await websocket.send_denial_response(response)
        else:
            await websocket.close(code=WS_POLICY_VIOLATION, reason="unauthorized")


def _job_detail(states: dict[str, Any], job: str) -> dict[str, Any] | None:
    """Projection, stage timeline, ETA history and residuals, throughput and memory of a job."""
    jobs: JobsState = states["jobs"]
    view = jobs.jobs.get(job)
    if view is None:
        return None
    eta: EtaState = states["eta"]
    summary = summarize(states, job)
    running = eta.running.get(job)
    finished = eta.finished.get(job)
    history = running.issued if running is not None else (finished.history if finished else [])
    mem = states["memory"].running.get(job) or states["memory"].finished.get(job)
    projection: dict[str, Any] = msgspec.to_builtins(view)
    timeline = projection.pop("stages")
    for span in timeline:
        span["start_ts"] = span["start_ts"] / 1e9
        if span["end_ts"] is not None:
            span["end_ts"] = span["end_ts"] / 1e9
    return {
        "summary": summary,
        "projection": projection,
        "stages": timeline,
        "stage_durations": view.stage_durations(),
        "eta": {
            "history": [{"ts": p.ts / 1e9, "remaining_s": p.remaining_s, "p10_s": p.p10_s,
                         "p90_s": p.p90_s, "progress": p.progress,
                         "estimating": p.estimating} for p in history],
            "residuals": dict(finished.residuals) if finished is not None else None,
            "before_start_error": finished.before_start_error if finished is not None else None,
        },
        "memory": ({"peaks": dict(mem.peaks), "stage_peaks": dict(mem.stage_peaks),
                    "device": mem.device, "predicted_kind": mem.predicted_kind,
                    "predicted_peak_bytes": mem.predicted_bytes,
                    "prediction_error": mem.prediction_error} if mem is not None else None),
        "predicted_peak_memory_bytes": mem.predicted_bytes if mem is not None else None,
    }


def _metrics_endpoint(service: TelemetryService, busy: Busy,
                      collectors: Iterable[Collector] = ()
                      ) -> Callable[[Request], Awaitable[Response]]:
    """``/metrics`` through the Prometheus exporter's collector, or a JSON 503 without it."""
    try:
        from exporters.prometheus import Exposition
    except ImportError as exc:
        reason = f"{type(exc).__name__}: {exc}"

        async def unavailable(request: Request) -> Response:
            return error_response(503, "metrics are not available in this build", reason)

        return unavailable
    exposition = Exposition(service.runner, worker_timeout_s=service.worker_timeout_s)
    for collector in collectors:
        exposition.registry.register(collector)

    async def metrics(request: Request) -> Response:
        with busy.slot("/metrics"):
            body, content_type = await run_in_threadpool(
                exposition.render, request.headers.get("accept", ""))
        return Response(body, media_type=None, headers={"content-type": content_type})

    return metrics


# -- /ws/progress -------------------------------------------------------------------------------


def _control(type_: str, service: TelemetryService, data: dict[str, Any],
             job: str | None = None) -> str:
    return encode_frame(frame(type_, service.position, job, time.time(), data))


def _progress_endpoint(service: TelemetryService) -> Callable[[WebSocket], Awaitable[None]]:
    """The catch-up subscription: [replay] → snapshot → caught_up → live deltas."""

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        params = websocket.query_params
        job = params.get("job") or None
        since: int | None = None
        raw_since = params.get("since")
        if raw_since is not None and raw_since != "":
            since = await _check_since(service, raw_since)
            if since is None:
                detail = (f"since must be an integer position between -1 and the log's last "
                          f"position ({service.log.last_position()}), got {raw_since!r}")
                await _refuse(websocket, service, "bad_since", detail, WS_POLICY_VIOLATION)
                return
        if not service.ready:
            await _refuse(websocket, service, "not_ready",
                          "the server is still catching up with the log; retry shortly",
                          WS_TRY_AGAIN_LATER)
            return
        loop = asyncio.get_running_loop()
        subscription = service.subscribe(loop, job=job, since=since)
        sub = subscription.subscriber
        sender = asyncio.create_task(_send_loop(websocket, service, subscription, since, job))
        receiver = asyncio.create_task(_receive_loop(websocket, service, sub, job))
        try:
            done, pending = await asyncio.wait({sender, receiver},
                                              return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        finally:
            service.unsubscribe(sub)
        if (receiver in done and not receiver.cancelled() and receiver.exception() is None
                and receiver.result() is FLOODED):
            # It sent more than it read: tell it why, and close. A client that reads nothing
            # gets neither (each send is given a second), and its connection holds no more
            # than the transport's buffer until the kernel gives up on it.
            service.count_flood()
            detail = (f"more than {sub.control_capacity} replies waiting: read the replies "
                      f"before sending more")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(websocket.send_text(_control(
                    "error", service, {"error": "too_many_messages", "detail": detail}, job)),
                    CLOSE_WAIT_S)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(websocket.close(code=WS_POLICY_VIOLATION,
                                                       reason="too_many_messages"),
                                       CLOSE_WAIT_S)
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(websocket.close(), CLOSE_WAIT_S)

    return endpoint


async def _check_since(service: TelemetryService, raw: str) -> int | None:
    """``since`` must name a position the log has (or -1 for "from the start")."""
    if _INTEGER.fullmatch(raw) is None:
        return None
    value = int(raw)
    if value < -1:
        return None
    if value == -1:
        return value
    last = await asyncio.to_thread(service.log.last_position)
    if last is None or value > last:
        return None
    return value


async def _refuse(websocket: WebSocket, service: TelemetryService, error: str, detail: str,
                  code: int) -> None:
    await websocket.send_text(_control("error", service, {"error": error, "detail": detail}))
    await websocket.close(code=code, reason=error)


async def _send_loop(websocket: WebSocket, service: TelemetryService, subscription: Any,
                     since: int | None, job: str | None) -> None:
    sub = subscription.subscriber
    try:
        replayed = 0
        if since is not None and since + 1 < subscription.live_from:
            chunks = service.replay(since + 1, subscription.live_from, job=job)
            while True:
                chunk = await asyncio.to_thread(next, chunks, None)
                if chunk is None:
                    break
                for text in chunk:
                    await websocket.send_text(text)
                replayed += len(chunk)
        position = subscription.position
        if since is not None and (position is None or since > position):
            position = since
        await websocket.send_text(encode_frame(frame(
            "snapshot", subscription.position, job, time.time(),
            {**subscription.snapshot, "reason": "connect"})))
        await websocket.send_text(encode_frame(frame(
            "caught_up", position, job, time.time(), {"replayed": replayed})))
        while True:
            texts = await sub.next_frames()
            if texts is None:
                snap, at = service.resync(sub)
                await websocket.send_text(encode_frame(frame(
                    "snapshot", at, job, time.time(), {**snap, "reason": "overflow"})))
                continue
            for text in texts:
                await websocket.send_text(text)
    except (WebSocketDisconnect, OSError, RuntimeError):
        return


class _ClientMessage(msgspec.Struct):
    """What a client may send: ``{"type": "ping"}``, with an optional scalar ``id`` to echo.
    Other fields are ignored; decoding is msgspec's, which refuses deep nesting and
    non-finite numbers rather than raising something unexpected."""

    type: str
    id: str | int | float | bool | msgspec.UnsetType | None = msgspec.UNSET


_decode_message: Final = msgspec.json.Decoder(_ClientMessage).decode
_PING_ONLY: Final = 'the only client message is {"type": "ping"} with an optional "id"'


def _reply(service: TelemetryService, message: Mapping[str, Any], job: str | None) -> str:
    """The reply to one client message: a pong, or a ``bad_message`` error frame."""
    text = message.get("text")
    try:
        parsed = None if text is None else _decode_message(text)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):  # deep nesting
        parsed = None
    if parsed is None or parsed.type != "ping":
        detail = "send JSON text frames, not binary" if text is None else _PING_ONLY
        return _control("error", service, {"error": "bad_message", "detail": detail}, job)
    if parsed.id is msgspec.UNSET:
        return _control("pong", service, {}, job)
    try:
        fits = len(_json_encoder.encode(parsed.id)) <= MAX_PING_ID_BYTES
    except UnicodeEncodeError:  # a lone surrogate, escaped in the JSON it came in
        fits = False
    if not fits:
        return _control("error", service, {
            "error": "bad_message",
            "detail": f"a ping's id must be a JSON scalar of at most {MAX_PING_ID_BYTES} "
                      f"bytes (valid Unicode)"}, job)
    return _control("pong", service, {"id": parsed.id}, job)


async def _receive_loop(websocket: WebSocket, service: TelemetryService, sub: Any,
                        job: str | None) -> object:
    """Answer pings; report malformed messages (the connection stays open). Returns
    :data:`FLOODED` when the client has sent more than it reads: its replies would pile up
    (the caller closes the connection)."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return None
        if not sub.push_control(_reply(service, message, job)):
            return FLOODED
