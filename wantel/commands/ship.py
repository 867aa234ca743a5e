"""``wantel ship``: follow a worker's local log and ship it to the fleet's NATS JetStream stream.

The local log stays the source of truth; the shipper publishes every event at least once
(``Nats-Msg-Id = <job>:<seq>``, so the server drops a retried copy), records the last
acknowledged position in the log directory (``checkpoints/ship-WANTEL_EVENTS.ckpt``) and resumes
from it after a restart. While the broker is away, shipping waits and retries with a doubling
back-off; the events wait in the local log. See :mod:`telemetry.ship` and ``docs/fleet.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import socket
import sys
import threading
from types import FrameType

from wantel.commands.common import add_nats_flags, nats_options, open_local_for_reading
from wantel.config import NATS_ENV, resolve_log_dir, resolve_worker


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of ``wantel ship``."""
    parser.description = (
        "Follow a worker's local log and ship every event to the fleet's NATS JetStream "
        "stream (WANTEL_EVENTS, subject wantel.events.<worker>). An event counts as shipped "
        "once the server acknowledged it; the last acknowledged position is kept in the log "
        "directory, so a restart resumes there. A broker outage costs delay, never data.")
    add_nats_flags(parser)
    parser.add_argument("--worker", metavar="ID",
                        help="the subject's worker token (default: $WANTEL_WORKER, else this "
                             "host's name)")
    parser.add_argument("--replicas", type=_replicas, default=1, metavar="N",
                        help="the stream's replicas if this shipper creates it: 1 (default) on "
                             "a single server, 3 on a 3-node JetStream cluster so the stream "
                             "survives losing a node; a stream that exists keeps its own")
    parser.description += (
        " Stopped (Ctrl-C, SIGTERM), it ships what the log holds for up to 2 s more — the "
        "last events of workers that stopped before it, their WorkerStopped — and leaves the "
        "rest for its next run.")
    parser.add_argument("--once", action="store_true",
                        help="ship what the log holds now, then exit; an unreachable broker at "
                             "the start is an error (without --once the shipper waits for it)")


def _replicas(text: str) -> int:
    """``--replicas``: 1 to 5, JetStream's bounds."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 5:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 5, not {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    """Ship until Ctrl-C or SIGTERM (or, with ``--once``, until caught up)."""
    from telemetry.log.nats import NatsLog, redact
    from telemetry.ship import DRAIN_S, BackgroundShipper

    options = dataclasses.replace(nats_options(args, reconnect=True, required="ship"),
                                  replicas=args.replicas)
    worker = resolve_worker(args.worker, default=socket.gethostname())
    local = open_local_for_reading(args)
    log_dir = resolve_log_dir(args.log)
    shipping = BackgroundShipper(local, log_dir, options.stream,
                                 lambda: NatsLog(options, worker=worker), warn=True)
    runner, sink = shipping.runner, shipping.sink
    if args.once:  # a wrong URL or bad credentials: one line and exit 2, before anything
        sink.connect_now()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, on_signal)
    print(f"wantel ship: {log_dir}/ → {redact(options.url)} stream {options.stream} as "
          f"{worker}{' (once)' if args.once else ''}", file=sys.stderr, flush=True)
    try:
        if args.once:
            runner.catch_up(stop, block=True)
        else:
            shipping.start()
            while not stop.wait(0.5):
                if not runner.running:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        if args.once:
            stop.set()
            runner.shutdown()
        else:  # what the workers wrote as they stopped (their WorkerStopped) goes out too
            shipping.stop(DRAIN_S)
        signal.signal(signal.SIGTERM, previous)
        local.close()
    held = runner.held_back()
    print(f"wantel ship: {sink.shipped} event(s) shipped; acknowledged up to position "
          f"{runner.engine.position if held is None else held}", file=sys.stderr)
    if held is not None:
        reason = f": {sink.last_error}" if sink.last_error else ""
        print(f"wantel ship: stopped with events not shipped; they stay in the log and the "
              f"next run ships them{reason}", file=sys.stderr)
        return 1
    return 0


__all__ = ["NATS_ENV", "configure", "run"]
