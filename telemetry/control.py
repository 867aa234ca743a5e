"""The control channel: how a worker learns that its job should stop, without reading the log.

``POST /api/jobs/{id}/cancel`` appends :class:`~telemetry.events.CancelRequested` to the log
(the record) and drops a small file in the log directory (the signal)::

    <log>/control/cancel/<sha256 of the job id, 32 hex digits>.json
        {"job": "...", "by": "api", "reason": "requested", "ts": 1796630000123456789}

An instrumented pipeline looks for its job's file at each step boundary: one ``open()`` that
fails with ``FileNotFoundError`` while no cancel is pending (about two microseconds on a local
disk, against steps of tens of milliseconds at least), so the worker never reads the log, and
never polls anything but its own job's name. The file is written atomically (a reader never
sees half of one) and removed by the worker once its job has ended. Why files, not the log's
tail or a NATS subject: a worker may write a log it never reads (a remote fleet's shipper
reads it), following every appended event to find one cancel costs every worker the whole
log's write rate, and a file needs nothing running. The price: the worker and the server must
share the log directory (the same machine, or a shared volume); ``docs/api.md`` says so.

Pure Python, no third-party imports: ``inference`` (the worker side) and ``exporters`` (the
server side) both use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from telemetry.files import write_atomic

CONTROL_DIR: Final = "control"
CANCEL_DIR: Final = "cancel"
#: The longest reason kept (a reason is for people; the log's record is bounded the same way).
MAX_REASON: Final = 200


@dataclass(frozen=True)
class CancelNotice:
    """A pending cancel of one job."""

    job: str
    by: str
    reason: str
    ts: int


class CancelChannel:
    """The cancel files of one log directory (``<log>/control/cancel``)."""

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(log_dir) / CONTROL_DIR / CANCEL_DIR

    def path(self, job: str) -> Path:
        """Where ``job``'s cancel file is (named by a digest: a job id may hold anything)."""
        digest = hashlib.sha256(job.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return self.dir / f"{digest}.json"

    def request(self, job: str, *, by: str = "api", reason: str = "requested",
                ts: int = 0) -> Path:
        """Ask ``job``'s worker to stop (idempotent: a second request replaces the first)."""
        data = {"job": job, "by": by, "reason": reason[:MAX_REASON], "ts": ts}
        path = self.path(job)
        write_atomic(path, json.dumps(data).encode())
        return path

    def pending(self, job: str) -> CancelNotice | None:
        """The cancel waiting for ``job``, or ``None``: the worker's check at each step
        boundary. Never raises: a file that cannot be read or parsed still means "stop"."""
        try:
            with open(self.path(job), "rb") as handle:
                raw = handle.read(4096)
        except FileNotFoundError:
            return None
        except OSError:
            return CancelNotice(job=job, by="api", reason="requested", ts=0)
        try:
            data = json.loads(raw)
            return CancelNotice(job=job, by=str(data.get("by", "api")),
                                reason=str(data.get("reason", "requested"))[:MAX_REASON],
                                ts=int(data.get("ts", 0)))
        except (ValueError, TypeError, AttributeError):
            return CancelNotice(job=job, by="api", reason="requested", ts=0)

    def clear(self, job: str) -> None:
        """Forget ``job``'s cancel (its worker has acted on it, or the job ended)."""
        with contextlib.suppress(OSError):
            self.path(job).unlink()


def channel_of(log: object) -> CancelChannel | None:
    """The channel of a log that lives in a local directory (anything with a ``path``), else
    ``None`` (a NATS log has no directory to share)."""
    path = getattr(log, "path", None)
    if not isinstance(path, (str, os.PathLike)):
        return None
    return CancelChannel(path)


__all__ = ["CANCEL_DIR", "CONTROL_DIR", "MAX_REASON", "CancelChannel", "CancelNotice",
           "channel_of"]
