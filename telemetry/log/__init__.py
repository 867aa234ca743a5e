"""The append-only event log: one interface (:class:`EventLog`) and its backends."""

from __future__ import annotations

import os
from pathlib import Path

from telemetry.log.base import (
    Batch,
    BrokenLog,
    EventLog,
    Gap,
    LogError,
    LogNotFound,
    Position,
    Quarantined,
    ReadItem,
)
from telemetry.log.local import FsyncPolicy, LocalLog
from telemetry.log.memory import MemoryLog

__all__ = [
    "Batch",
    "BrokenLog",
    "EventLog",
    "FsyncPolicy",
    "Gap",
    "LocalLog",
    "LogError",
    "LogNotFound",
    "MemoryLog",
    "Position",
    "Quarantined",
    "ReadItem",
    "open_log",
]


def open_log(location: str | os.PathLike[str], *, create: bool = False) -> EventLog:
    """Open the log at ``location``: a directory path (the local backend).

    ``create=False`` (readers) raises :class:`LogNotFound` instead of making an empty log.
    """
    return LocalLog(Path(location), create=create)
