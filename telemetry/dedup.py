"""Which events of a batch are new: the engine's one pass over every event it applies.

Delivery is at-least-once, so the engine keeps each job's last applied ``seq`` and applies an
event only if its ``seq`` is beyond it. :func:`fresh_events` does that for a batch and, in the
same pass, finds what the engine needs to know of the new events: the newest ``ts``, how many
of each type (for the health counters and to route the batch to the projections that read
those types) and which of them are of the types it watches (the terminal ones, which bound the
de-duplication table).

This pass visits every event of a replay. It had a C twin (``telemetry/_speedups.c``), which
cut the pass's own instructions by three quarters but ``wantel replay`` by only ~5 % (the folds
are most of a replay), so it was removed (``docs/design-notes.md`` has the measurement). The
table's key order is part of the contract: snapshots hold it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from itertools import compress
from typing import Any, Final

FreshEvents = tuple[list[Any], Any, dict[type, int], list[Any]]
"""What :func:`fresh_events` returns: the new events in order, their newest ``ts`` (0 if none
is positive), how many of each type in the order types first appear, and those of the watched
types in order."""

_BEFORE_FIRST: Final = object()


def fresh_events(
    events: Sequence[Any], last_seq: dict[str, int], watch: Collection[type]
) -> FreshEvents:
    """The events whose ``seq`` is beyond their job's last one in ``last_seq`` (updated).

    A batch holds runs of one job's events (one emitter's flush), so the job's last seq is
    kept in a local across its run and written back when the run ends; where jobs alternate
    (a run of small frames, a process running several), that is once an event. A job's entry
    is written only when the job had a new event, and keys are added in the order jobs are
    first written (snapshots hold the table's order).
    """
    fresh: list[Any] = []
    keep = fresh.append
    job: object = _BEFORE_FIRST  # not None: a job id of None (never valid) is still a job
    known = newest = -1
    newest_ts = 0
    for event in events:
        event_job = event.job  # loaded once: a batch mixes types, so loads are generic
        if event_job != job:
            if newest != known:
                last_seq[job] = newest  # type: ignore[index]  # set only after a job
            job = event_job
            try:  # a subscript, not .get(): with jobs side by side this runs per event
                known = newest = last_seq[job]  # type: ignore[index]  # a str: an event's job
            except KeyError:  # the job's first event
                known = newest = -1
        seq = event.seq
        if seq > newest:
            newest = seq
            keep(event)
            ts = event.ts
            if ts > newest_ts:  # noqa: PLR1730 - a hot path: no max() call
                newest_ts = ts
    if newest != known:
        last_seq[job] = newest  # type: ignore[index]
    kinds = list(map(type, fresh))
    counts = dict(Counter(kinds))  # a plain dict, in first-seen order
    watched = (list(compress(fresh, map(watch.__contains__, kinds)))
               if any(kind in watch for kind in counts) else [])  # the scan only if needed
    return fresh, newest_ts, counts, watched

