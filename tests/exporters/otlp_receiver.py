"""A real OTLP trace receiver for tests: what Jaeger or a collector would see, decoded.

No Jaeger or collector can be installed here, so the honest substitute is a receiver that speaks
the wire protocol the real SDK exporters speak: OTLP/HTTP (``POST /v1/traces`` with a protobuf
``ExportTraceServiceRequest``) on a stdlib ``http.server``, and OTLP/gRPC (``TraceService/Export``)
on a grpcio server. Both decode every span with ``opentelemetry-proto`` and keep it. Either can be
stopped and started again on the same port, to play a collector that goes down and comes back.
"""

from __future__ import annotations

import contextlib
import gzip
import socket
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


@dataclass(frozen=True)
class ReceivedEvent:
    """A span event as decoded from the wire."""

    name: str
    time_ns: int
    attributes: dict[str, Any]


@dataclass(frozen=True)
class ReceivedSpan:
    """A span as decoded from the wire; ids as lowercase hex, ``parent_span_id`` '' for roots."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[ReceivedEvent]
    status_code: int
    status_message: str
    resource: dict[str, Any]
    scope: str
    flags: int = 0


def value_of(value: AnyValue) -> Any:
    """An OTLP ``AnyValue`` as a Python value."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [value_of(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes_of(value.kvlist_value.values)
    return getattr(value, kind)


def attributes_of(pairs: Any) -> dict[str, Any]:
    """Repeated ``KeyValue`` as a dict."""
    result: dict[str, Any] = {}
    pair: KeyValue
    for pair in pairs:
        result[pair.key] = value_of(pair.value)
    return result


def decode_request(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    """Every span of one export request."""
    spans: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        resource = attributes_of(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(ReceivedSpan(
                    trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(), name=span.name, kind=span.kind,
                    start_ns=span.start_time_unix_nano, end_ns=span.end_time_unix_nano,
                    attributes=attributes_of(span.attributes),
                    events=[ReceivedEvent(e.name, e.time_unix_nano, attributes_of(e.attributes))
                            for e in span.events],
                    status_code=span.status.code, status_message=span.status.message,
                    resource=resource, scope=scope_spans.scope.name, flags=span.flags))
    return spans


@dataclass
class _Store:
    spans: list[ReceivedSpan] = field(default_factory=list)
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class OtlpReceiver:
    """Shared bookkeeping: received spans, start/stop on a fixed port, waiting with a deadline."""

    protocol = ""

    def __init__(self) -> None:
        self._store = _Store()
        self.port = _free_port()
        self.running = False

    @property
    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far, in arrival order (duplicates included)."""
        with self._store.lock:
            return list(self._store.spans)

    @property
    def requests(self) -> int:
        """How many export requests were accepted."""
        with self._store.lock:
            return self._store.requests

    def span_counts(self) -> Counter[str]:
        """How many times each span id arrived."""
        return Counter(span.span_id for span in self.spans)

    def clear(self) -> None:
        """Forget what was received."""
        with self._store.lock:
            self._store.spans.clear()
            self._store.requests = 0

    def _accept(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        decoded = decode_request(request)
        with self._store.lock:
            self._store.spans.extend(decoded)
            self._store.requests += 1

    def wait_for(self, predicate: Callable[[list[ReceivedSpan]], bool],
                 timeout: float = 20.0) -> list[ReceivedSpan]:
        """Poll until ``predicate(spans)`` holds; fail at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"receiver: condition not met in {timeout}s; "
                                     f"got {len(spans)} spans in {self.requests} requests")
            time.sleep(0.02)

    def start(self) -> None:
        """Listen on 127.0.0.1:``port``."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop listening; connections are refused until :meth:`start`."""
        raise NotImplementedError

    def __enter__(self) -> OtlpReceiver:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.running:
            self.stop()


class HttpReceiver(OtlpReceiver):
    """OTLP/HTTP protobuf on ``http://127.0.0.1:<port>/v1/traces``."""

    protocol = "http/protobuf"

    def __init__(self) -> None:
        super().__init__()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        """The full traces URL, as the HTTP exporter takes it."""
        return f"http://127.0.0.1:{self.port}/v1/traces"

    @property
    def base_url(self) -> str:
        """The base URL, as ``OTEL_EXPORTER_OTLP_ENDPOINT`` takes it."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Serve in a thread (``allow_reuse_address`` lets a restart take the same port)."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with receiver._connections_lock:
                    receiver._connections.add(self.connection)

            def finish(self) -> None:
                with receiver._connections_lock:
                    receiver._connections.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path != "/v1/traces":
                    self._reply(404, b"")
                    return
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver._accept(request)
                self._reply(200, trace_service_pb2.ExportTraceServiceResponse()
                            .SerializeToString())

            def _reply(self, code: int, payload: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self.running = True

    def stop(self) -> None:
        """Shut the server down, close its socket and cut kept-alive client connections."""
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        with self._connections_lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
            self._connections.clear()
        self._thread.join(5)
        self._server = None
        self.running = False


class GrpcReceiver(OtlpReceiver):
    """OTLP/gRPC ``TraceService/Export`` on ``127.0.0.1:<port>`` (insecure)."""

    protocol = "grpc"

    def __init__(self) -> None:
        super().__init__()
        self._server: grpc.Server | None = None

    @property
    def endpoint(self) -> str:
        """The URL the gRPC exporter takes."""
        return f"http://127.0.0.1:{self.port}"

    base_url = endpoint

    def start(self) -> None:
        """Serve on a small thread pool."""
        receiver = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                receiver._accept(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), server)
        bound = server.add_insecure_port(f"127.0.0.1:{self.port}")
        assert bound == self.port, f"could not bind 127.0.0.1:{self.port}"
        server.start()
        self._server = server
        self.running = True

    def stop(self) -> None:
        """Stop at once (no grace): in-flight calls fail, as when a collector dies."""
        assert self._server is not None
        self._server.stop(grace=None).wait(5)
        self._server = None
        self.running = False


def _free_port() -> int:
    """A port the kernel just handed out for 127.0.0.1 (bind to port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


RECEIVERS: dict[str, type[OtlpReceiver]] = {"http": HttpReceiver, "grpc": GrpcReceiver}
