"""Pieces shared by the subcommands that read the log."""

from __future__ import annotations

import argparse
import sys

from telemetry.log.base import Gap, LogNotFound, Quarantined
from telemetry.log.local import LocalLog
from wantel.config import resolve_log_dir


def open_log_for_reading(args: argparse.Namespace) -> LocalLog:
    """The log named by ``--log``/``$WANTEL_LOG``/default; a clear error if there is none."""
    path = resolve_log_dir(args.log)
    try:
        return LocalLog(path, create=False)
    except LogNotFound as exc:
        raise LogNotFound(
            f"{exc}; run a job first (wantel run …) or point --log / $WANTEL_LOG at a log"
        ) from None


def warn_quarantined(command: str, notice: Quarantined) -> None:
    """One line on stderr for records the log had to skip, or positions it lost."""
    if isinstance(notice, Gap):
        print(f"wantel {command}: warning: gap: positions {notice.first}-{notice.next - 1} "
              f"({notice.count}) are missing at {notice.where}: {notice.reason}",
              file=sys.stderr)
        return
    count = f"{notice.count} record(s)" if notice.count else "records"
    print(
        f"wantel {command}: warning: skipped {count} at {notice.where}: {notice.reason}",
        file=sys.stderr,
    )
