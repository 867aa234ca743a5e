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
import time
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from typing import Any, Final

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
    TelemetryService,
    encode_frame,
    frame,
    snapshot_data,
    summarize,
)
from telemetry.projections.eta import EtaState
from telemetry.projections.jobs import JobsState

#: WebSocket close codes (RFC 6455): policy violation for bad requests and refused tokens,
#: "try again later" while the server is still catching up with the log.
WS_POLICY_VIOLATION: Final = 1008
WS_TRY_AGAIN_LATER: Final = 1013
OPEN_PATHS: Final = frozenset({"/healthz"})
QUERY_TOKEN_PATHS: Final = frozenset({"/", "/ws/progress"})
DEFAULT_LIST_LIMIT: Final = 50
MAX_LIST_LIMIT: Final = 10_000


class ApiError(Exception):
    """An error answered as JSON ``{"error", "detail"}`` with ``status``."""

    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(error)
        self.status, self.error, self.detail = status, error, detail


def error_response(status: int, error: str, detail: Any = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The one error shape every endpoint uses."""
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def _int_param(request: HTTPConnection, name: str, default: int, *, minimum: int,
               maximum: int | None = None) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"bad {name}", f"{name} must be an integer, got {raw!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ApiError(400, f"bad {name}", f"{name} must be {bound}, got {value}")
    return value


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


def _live_page() -> str:
    """index.html with its stylesheet and script inlined, so the page is one authorized load."""
    static = resources.files("exporters") / "static"
    html = (static / "index.html").read_text(encoding="utf-8")
    css = (static / "live.css").read_text(encoding="utf-8")
    js = (static / "live.js").read_text(encoding="utf-8")
    html = html.replace('<link rel="stylesheet" href="live.css">', f"<style>\n{css}</style>")
    return html.replace('<script src="live.js"></script>', f"<script>\n{js}</script>")


def create_app(service: TelemetryService, *, token: str | None = None) -> Starlette:
    """The ASGI app: ``/metrics``, ``/api/jobs…``, ``/ws/progress``, ``/``, probes.

    ``token``: when set, every route but ``/healthz`` requires it. The Prometheus collector is
    imported here, not at module load, so the rest of the server works without it.
    """
    metrics = _metrics_endpoint(service)
    page = _live_page()

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        detail = {"position": service.position, "subscribers": service.subscriber_count}
        if service.error is not None:
            return error_response(503, "the log follower stopped",
                                  {**detail, "reason": f"{type(service.error).__name__}: "
                                                       f"{service.error}"})
        if not service.ready:
            return error_response(503, "catching up with the log", detail)
        return JSONResponse({"ready": True, **detail})

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"cache-control": "no-store"})

    async def list_jobs(request: Request) -> Response:
        limit = _int_param(request, "limit", DEFAULT_LIST_LIMIT, minimum=0,
                           maximum=MAX_LIST_LIMIT)

        def read(states: dict[str, Any]) -> dict[str, Any]:
            snap = snapshot_data(states, recent=limit)
            return {"position": service.position, "ready": service.ready, **snap}

        return JSONResponse(service.read_states(read))

    async def get_job(request: Request) -> Response:
        job = request.path_params["job"]
        found = service.read_states(lambda states: _job_detail(states, job))
        if found is None:
            raise ApiError(404, "no such job", {"job": job})
        return JSONResponse(found)

    async def job_events(request: Request) -> Response:
        job = request.path_params["job"]
        since = _int_param(request, "since", -1, minimum=-1)
        limit = _int_param(request, "limit", 1000, minimum=1, maximum=MAX_LIST_LIMIT)
        events, last, more = await run_in_threadpool(service.job_events, job, since=since,
                                                      limit=limit)
        known = service.read_states(lambda states: job in states["jobs"].jobs)
        if not events and not known and since == -1:
            raise ApiError(404, "no such job", {"job": job})
        return JSONResponse({"job": job, "events": events, "next_since": last, "more": more})

    routes = [
        Route("/", index, name="live_page"),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/api/jobs", list_jobs),
        Route("/api/jobs/{job:str}", get_job),
        Route("/api/jobs/{job:str}/events", job_events),
        WebSocketRoute("/ws/progress", _progress_endpoint(service)),
    ]

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.error, exc.detail)

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
    return app


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
                    "device": mem.device} if mem is not None else None),
    }


def _metrics_endpoint(service: TelemetryService) -> Callable[[Request], Awaitable[Response]]:
    """``/metrics`` through the Prometheus exporter's collector, or a JSON 503 without it."""
    try:
        from exporters.prometheus import Exposition
    except ImportError as exc:
        reason = f"{type(exc).__name__}: {exc}"

        async def unavailable(request: Request) -> Response:
            return error_response(503, "metrics are not available in this build", reason)

        return unavailable
    exposition = Exposition(service.runner)

    async def metrics(request: Request) -> Response:
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
            _done, pending = await asyncio.wait({sender, receiver},
                                               return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        finally:
            service.unsubscribe(sub)
        with contextlib.suppress(Exception):
            await websocket.close()

    return endpoint


async def _check_since(service: TelemetryService, raw: str) -> int | None:
    """``since`` must name a position the log has (or -1 for "from the start")."""
    try:
        value = int(raw)
    except ValueError:
        return None
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


async def _receive_loop(websocket: WebSocket, service: TelemetryService, sub: Any,
                        job: str | None) -> None:
    """Answer pings; report malformed messages (the connection stays open)."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is None:
            sub.push_control(_control("error", service, {
                "error": "bad_message", "detail": "send JSON text frames, not binary"}, job))
            continue
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and parsed.get("type") == "ping":
            data = {"id": parsed["id"]} if "id" in parsed else {}
            sub.push_control(_control("pong", service, data, job))
        else:
            sub.push_control(_control("error", service, {
                "error": "bad_message", "detail": 'the only client message is {"type":"ping"}'},
                job))
