"""Trace and span ids derived from the log, so traces can be rebuilt and re-exported by replay.

A job's trace id is the caller's, when the job carries a W3C ``traceparent`` (the trace joins
theirs): ``JobStarted``'s when it has one, else ``JobQueued``'s (:func:`job_traceparent`);
otherwise it is derived from the job id. This module is the one place that rule is written
(:func:`job_trace_id`): span export and the lifecycle log lines name a job's trace through it,
and the metrics' exemplars must agree with them. Span ids are derived from the job id and the
span's role, so exporting the same job twice produces the same spans (a collector can
de-duplicate), and Prometheus exemplars can name the trace before any span is exported.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

_TRACEPARENT: Final = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")


def parse_traceparent(traceparent: str | None) -> tuple[str, str] | None:
    """``(trace_id, parent_span_id)`` of a valid W3C traceparent, else ``None``."""
    if not traceparent:
        return None
    match = _TRACEPARENT.match(traceparent.strip().lower())
    if match is None or set(match.group(1)) == {"0"} or set(match.group(2)) == {"0"}:
        return None
    return match.group(1), match.group(2)


def trace_id_for(job: str, traceparent: str | None = None) -> str:
    """32 hex digits: the caller's trace id, or one derived from the job id."""
    parsed = parse_traceparent(traceparent)
    if parsed is not None:
        return parsed[0]
    return hashlib.sha256(f"wantel-trace:{job}".encode()).hexdigest()[:32]


def job_traceparent(started: str | None, queued: str | None) -> str | None:
    """The traceparent a job carries: its ``JobStarted``'s (``started``) when that has one,
    else its ``JobQueued``'s (``queued``)."""
    return started if started is not None else queued


def job_trace_id(job: str, started: str | None = None, queued: str | None = None) -> str:
    """The trace id of ``job``, given the traceparents of its ``JobStarted`` and ``JobQueued``
    (``None`` where the event is absent or carries none)."""
    return trace_id_for(job, job_traceparent(started, queued))


def span_id_for(job: str, role: str) -> str:
    """16 hex digits for the span playing ``role`` in ``job`` (``root``, ``stage:decode:0``…)."""
    digest = hashlib.sha256(f"wantel-span:{job}:{role}".encode()).hexdigest()[:16]
    return digest if set(digest) != {"0"} else "0000000000000001"
