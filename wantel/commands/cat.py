"""``wantel cat``: print the log's events as JSON Lines, optionally following it live."""

from __future__ import annotations

import argparse
import sys

from telemetry.codec import encode_complete
from telemetry.log.base import MAX_POSITION, Batch
from wantel.commands.common import add_nats_flags, open_log_for_reading, warn_quarantined


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of ``wantel cat``."""
    parser.add_argument("--job", help="only this job's events")
    add_nats_flags(parser, reading=True)
    parser.add_argument(
        "--follow", "-f", action="store_true", help="keep printing new events until Ctrl-C"
    )
    parser.add_argument(
        "--from", dest="start", type=_position, default=0, metavar="POSITION",
        help="start at this log position (default: 0, the beginning)",
    )
    parser.add_argument(
        "--positions", action="store_true",
        help='prefix each line with its log position: {"pos": N, "event": {...}}',
    )


def _position(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a log position: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a log position is >= 0, got {value}")
    if value > MAX_POSITION:
        raise argparse.ArgumentTypeError(
            f"a log position is at most {MAX_POSITION} (2**63-1), got {text[:40]}"
            f"{'…' if len(text) > 40 else ''}")
    return value


def run(args: argparse.Namespace) -> int:
    """Print events; with ``--follow`` keep going until interrupted.

    ``--follow`` reads the log with a plain :meth:`~telemetry.log.base.EventLog.follow`, not a
    :class:`~telemetry.runner.ProjectionRunner`: ``cat`` prints the raw records, duplicates
    and all, and applies nothing, so it has no engine to de-duplicate, no state to checkpoint
    and no sink to tell.
    """
    log = open_log_for_reading(args)
    items = log.follow(args.start) if args.follow else log.read(args.start)
    out = sys.stdout.buffer
    for item in items:
        if not isinstance(item, Batch):
            warn_quarantined("cat", item)
            continue
        lines = []
        for position, event in item.positioned():
            if args.job is not None and event.job != args.job:
                continue
            record = encode_complete(event)
            if args.positions:
                record = b'{"pos":%d,"event":%s}' % (position, record)
            lines.append(record)
        if lines:
            out.write(b"\n".join(lines) + b"\n")
            if args.follow:
                out.flush()
    out.flush()
    return 0
