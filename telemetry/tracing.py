"""Trace and span ids derived from the log, so traces can be rebuilt and re-exported by replay.

A job's trace id is the caller's, when the job carries a W3C ``traceparent`` (the trace joins
theirs): ``JobStarted``'s when it has one, else ``JobQueued``'s (:func:`job_traceparent`);
otherwise it is derived from the job id and the ``ts`` of the run's opening event — its
``JobQueued`` when it was queued, else its ``JobStarted`` (``opened_ts``) — so a job id that
an older log reuses still gets a trace per run. This module is the one place that rule is
written (:func:`job_trace_id`): span export, the lifecycle log lines, the live page's trace
link and the metrics' exemplars all name a job's trace through it. Span ids are derived from
the same run key and the span's role, so exporting the same job twice produces the same
spans (a collector can de-duplicate), and Prometheus exemplars can name the trace before any
span is exported. A run whose opening event was lost (``opened_ts`` unknown) falls back to
ids from the job id alone.

The caller's sampled flag is respected: a job whose traceparent says "not sampled"
(:func:`traceparent_sampled`) is not exported at all.
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


def traceparent_sampled(traceparent: str | None) -> bool:
    """Whether a job carrying ``traceparent`` is to be traced: True unless it is a valid W3C
    traceparent whose ``sampled`` flag (bit 0 of the trace flags) is off. A job without one
    (or with an invalid one) starts a trace of its own, sampled."""
    if parse_traceparent(traceparent) is None:
        return True
    assert traceparent is not None
    return bool(int(traceparent.strip()[-2:], 16) & 0x01)


def run_key(job: str, opened_ts: int | None = None) -> str:
    """What a run's ids are derived from: the job id, and the ``ts`` of the run's opening
    event (``JobQueued``, else ``JobStarted``) where known."""
    return job if opened_ts is None else f"{job}@{opened_ts}"


def trace_id_for(job: str, traceparent: str | None = None, opened_ts: int | None = None) -> str:
    """32 hex digits: the caller's trace id, or one derived from the job id and the ``ts`` of
    the run's opening event (:func:`run_key`)."""
    parsed = parse_traceparent(traceparent)
    if parsed is not None:
        return parsed[0]
    return hashlib.sha256(f"wantel-trace:{run_key(job, opened_ts)}".encode()).hexdigest()[:32]


def job_traceparent(started: str | None, queued: str | None) -> str | None:
    """The traceparent a job carries: its ``JobStarted``'s (``started``) when that has one,
    else its ``JobQueued``'s (``queued``)."""
    return started if started is not None else queued


def job_trace_id(job: str, started: str | None = None, queued: str | None = None, *,
                 opened_ts: int | None = None) -> str:
    """The trace id of ``job``, given the traceparents of its ``JobStarted`` and ``JobQueued``
    (``None`` where the event is absent or carries none) and the ``ts`` of the run's opening
    event (``JobQueued``, else ``JobStarted``; ``None`` if neither was seen)."""
    return trace_id_for(job, job_traceparent(started, queued), opened_ts)


def span_id_for(job: str, role: str, opened_ts: int | None = None) -> str:
    """16 hex digits for the span playing ``role`` in ``job``'s run opened at ``opened_ts``
    (roles: ``root``, ``queue``, ``stage:decode:0``…)."""
    key = run_key(job, opened_ts)
    digest = hashlib.sha256(f"wantel-span:{key}:{role}".encode()).hexdigest()[:16]
    # All zeros is not a valid span id; a comparison, not set(digest): ~0.3 µs of ~0.8 a span
    # (the lifecycle log derives one for most of its lines).
    return digest if digest != "0000000000000000" else "0000000000000001"
