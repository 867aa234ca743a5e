"""``wantel serve``: follow the log; serve /metrics, the HTTP API, WebSocket progress, live page."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType

from wantel.commands.common import add_nats_flags
from wantel.config import (
    OTLP_ENVS,
    TOKEN_ENV,
    TRACE_URL_ENV,
    WEBHOOK_SECRET_ENV,
    WORKER_TIMEOUT_ENV,
)
from wantel.serving import (
    DEFAULT_FLEET_STATE,
    DEFAULT_HOST,
    DEFAULT_PORT,
    open_serving,
    print_banner,
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of ``wantel serve``: the serving ones and the fleet's."""
    configure_serving(parser)
    configure_fleet(parser)


def configure_serving(parser: argparse.ArgumentParser) -> None:
    """The serving flags (``wantel demo`` shares them)."""
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"TCP port (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--token", metavar="T",
                        help=f"require this bearer token on everything but /healthz "
                             f"(default: ${TOKEN_ENV}, else no token)")
    parser.add_argument("--otlp", metavar="URL",
                        help=f"export spans by OTLP to this collector (default: ${OTLP_ENVS[0]}"
                             f" or ${OTLP_ENVS[1]}; neither: no span export)")
    parser.add_argument("--webhook", metavar="URL", action="append",
                        help="POST a signed JSON body to this http(s) URL on every job state "
                             "change (queued, started, completed, failed, cancelled, "
                             "abandoned), at least "
                             "once, resumed after restarts; repeat for more receivers "
                             "(docs/api.md, 'Webhooks')")
    parser.add_argument("--webhook-secret", metavar="S",
                        help=f"sign webhooks with HMAC-SHA256 under this key, in the "
                             f"Wantel-Signature header (default: ${WEBHOOK_SECRET_ENV}, else "
                             f"unsigned)")
    parser.add_argument("--worker-timeout", type=float, metavar="S",
                        help="seconds a worker may go unheard (no event from it or its jobs) "
                             "before its running jobs are declared abandoned: on the live "
                             "page, in /metrics, and in traces, whose root span then ends "
                             f"with an error (default: ${WORKER_TIMEOUT_ENV}, else 60)")
    parser.add_argument("--no-declare-lost", action="store_true",
                        help="only read the log: do not append WorkerLost for workers silent "
                             "past --worker-timeout (by default this aggregator declares them "
                             "lost, once however many aggregators follow the log, and their "
                             "running jobs become abandoned, reason 'worker lost', in every "
                             "view; docs/fleet.md, 'Liveness')")
    parser.add_argument("--trace-url", metavar="TEMPLATE",
                        help="link each job on the live page to its trace: a URL with "
                             "{trace_id}, e.g. http://jaeger:16686/trace/{trace_id} (Jaeger) "
                             "or a Grafana Explore URL for Tempo "
                             f"(default: ${TRACE_URL_ENV}, else no link)")


def configure_fleet(parser: argparse.ArgumentParser) -> None:
    """``serve``'s own flags for following the fleet stream."""
    add_nats_flags(parser, reading=True)
    parser.add_argument("--state", metavar="DIR",
                        help="with --nats: where to keep the projections' checkpoints "
                             f"(default ./{DEFAULT_FLEET_STATE}); two aggregators of one "
                             "stream each need their own")


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C or SIGTERM, then stop cleanly (checkpoint written)."""
    serving = open_serving(args)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        serving.log_lifecycle()
        serving.start()
        print_banner(serving, "serve")
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    finally:
        print("wantel serve: stopping…", file=sys.stderr, flush=True)
        serving.stop()
        signal.signal(signal.SIGTERM, previous)
    return 0
