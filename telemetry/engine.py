"""The projection engine (a pure core) and its checkpoint file.

:class:`ProjectionEngine` folds log items into every projection's state. It de-duplicates by
``(job, seq)`` — delivery is at-least-once — and isolates failures: a projection that raises on
an event has the event and error recorded and counted, and the other projections carry on. It
also keeps the telemetry-health counters that belong to the log rather than to any job (events by
type, duplicates, quarantined records, projection errors). It does no I/O.

:class:`~telemetry.runner.ProjectionRunner` is the shell (in :mod:`telemetry.runner`, and
importable from here too): it restores the engine from a checkpoint (position + snapshot, written
atomically by :class:`CheckpointStore`), reads the log from there, follows it live, tells its
sinks what it applied, and checkpoints again, so a restart resumes without double counting.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import msgspec

from telemetry.dedup import fresh_events
from telemetry.events import TERMINAL_TYPES, Event
from telemetry.files import REAL_OPS, FileOps, write_atomic
from telemetry.log.base import Batch, Gap, Position, Quarantined, ReadItem
from telemetry.projections.base import Projection, as_batch_projection
from telemetry.runner import ProjectionRunner  # the shell, re-exported (see __all__)

_TERMINAL: Final = frozenset(TERMINAL_TYPES)

MAX_RECORDED_FAILURES: Final = 100
MAX_RECORDED_GAPS: Final = 100
KEEP_SEQ_OF_FINISHED: Final = 10_000


class ProjectionFailure(msgspec.Struct, kw_only=True):
    """A projection raised on an event; recorded so it can be inspected and exported."""

    projection: str
    position: int
    event_type: str
    job: str
    seq: int
    error: str


class Health(msgspec.Struct, kw_only=True):
    """Telemetry health that only the engine can see."""

    events_by_type: dict[str, int] = {}
    duplicates: int = 0
    quarantined_records: int = 0
    quarantined_regions: int = 0
    #: Holes in the log's positions (:class:`~telemetry.log.base.Gap`): how many, and how
    #: many positions they cover; the latest few as ``[first, next]``, so a hole read again
    #: (a restart from a checkpoint past the log's end) is counted once.
    gaps: int = 0
    gap_positions: int = 0
    recent_gaps: list[tuple[int, int]] = []
    projection_errors: dict[str, int] = {}
    recent_failures: list[ProjectionFailure] = []
    last_event_ts: int | None = None


class _Snapshot(msgspec.Struct, kw_only=True):
    """What a checkpoint holds; ``states`` are each projection's msgpack bytes."""

    fingerprint: str
    position: int
    last_seq: dict[str, int]
    finished_jobs: list[str] = []
    health: Health
    states: dict[str, bytes]


def _routing(projection: Projection[Any]) -> tuple[frozenset[type] | None, frozenset[type]]:
    """What the engine hands ``projection``: the types it reads (``handles``; ``None``: every
    event) and those it also takes unfiltered (``handles`` plus ``passes``).

    Filtering a batch costs a pass over it per projection; a fold that skips a frequent type
    it does not read in its own loop declares it in ``passes``, and a batch holding only
    types it reads or passes is handed over whole.
    """
    handles = getattr(projection, "handles", None)
    if handles is None:
        return None, frozenset()
    return handles, handles | getattr(projection, "passes", frozenset())


class ProjectionEngine:
    """Applies log items to a set of projections; deterministic and free of I/O."""

    def __init__(self, projections: Sequence[Projection[Any]]) -> None:
        names = [p.name for p in projections]
        if len(set(names)) != len(names):
            raise ValueError(f"projection names must be unique, got {names}")
        self.projections = tuple(projections)
        self.states: dict[str, Any] = {p.name: p.initial() for p in projections}
        self.position: Position = 0  # the next position to apply
        self.last_seq: dict[str, int] = {}
        #: What the latest :meth:`apply_fresh` found in its one pass over the new events: their
        #: types, and the newest ``ts`` (0 if none is positive). A runner hands them to its
        #: sinks, so a sink skips a step without the types it reads without a pass of its own.
        self.step_kinds: frozenset[type] = frozenset()
        self.step_newest_ts = 0
        self.health = Health()
        self._folds = [(as_batch_projection(p), p.name, *_routing(p)) for p in projections]
        # An ordered set that bounds last_seq. An OrderedDict, not a dict: a dict whose oldest
        # key is deleted again and again finds the next one past every earlier deletion's
        # hole (~4 µs a finished job at 10,000), an OrderedDict pops it in O(1).
        self.finished_jobs: OrderedDict[str, None] = OrderedDict()

    @property
    def fingerprint(self) -> str:
        """Which projections, at which versions: a checkpoint is only valid for the same set."""
        return ",".join(f"{p.name}:{p.version}" for p in self.projections)

    def apply_items(self, items: Iterable[ReadItem]) -> int:
        """Apply everything in ``items``; returns how many events were new."""
        applied = 0
        for item in items:
            if isinstance(item, Batch):
                applied += self.apply_batch(item)
            else:
                self.apply_quarantined(item)
        return applied

    def apply_batch(self, batch: Batch) -> int:
        """Apply a batch, skipping positions already applied and duplicate ``(job, seq)``;
        returns how many events were new (see :meth:`apply_fresh`)."""
        return len(self.apply_fresh(batch))

    def apply_fresh(self, batch: Batch) -> list[Event]:
        """Apply a batch, skipping positions already applied and duplicate ``(job, seq)``;
        returns the new events, in log order (what a runner tells its sinks).

        The batch is de-duplicated first (:func:`telemetry.dedup.fresh_events`: the engine's
        only per-event work), then each projection folds the new events
        of the types it handles in one ``apply_many`` call, each fold running its own loop with
        its lookups hoisted.
        """
        events = batch.events
        start = 0
        if batch.first < self.position:
            start = self.position - batch.first
            if start >= len(events):
                return []
            events = events[start:]
        fresh, newest, tally, ended = fresh_events(events, self.last_seq, _TERMINAL)
        self.health.duplicates += len(events) - len(fresh)
        self.position = max(self.position, batch.next)
        if not fresh:
            return fresh
        counts = self.health.events_by_type
        for kind, count in tally.items():
            name = kind.__name__
            counts[name] = counts.get(name, 0) + count
        if newest > (self.health.last_event_ts or 0):
            self.health.last_event_ts = newest
        for event in ended:  # bound the de-duplication table
            self._forget_finished(event.job)
        present = self.step_kinds = frozenset(tally)
        self.step_newest_ts = newest
        states = self.states
        for projection, name, handles, accepts in self._folds:
            if handles is None or present <= accepts:
                if handles is not None and handles.isdisjoint(present):
                    continue
                mine = fresh
            elif handles.isdisjoint(present):
                continue
            else:
                mine = [event for event in fresh if type(event) in handles]

            def failed(event: Event, exc: Exception, name: str = name) -> None:
                self._record_failure(name, self._position_of(batch, event), event, exc)

            state = states[name]
            try:
                new_state = projection.apply_many(state, mine, failed)
            except Exception as exc:  # a fold that let an error escape its own loop
                failed(mine[0], exc)
                continue
            if new_state is not state:  # folds usually update in place
                states[name] = new_state
        return fresh

    @staticmethod
    def _position_of(batch: Batch, event: Event) -> int:
        """Where ``event`` sits in the log (failures are rare: a scan is fine)."""
        for index, candidate in enumerate(batch.events):
            if candidate is event:
                return batch.first + index
        return batch.first

    def _forget_finished(self, job: str) -> None:
        """Keep de-duplication state for the last ``KEEP_SEQ_OF_FINISHED`` finished jobs only.

        A redelivery of a job that finished that long ago is not plausible (a local log's
        duplicates are an emitter's retried append, written next to the original; a stream's
        redeliveries come within its ack wait), and without the bound the engine's memory
        would grow with every job ever run. Ten thousand jobs is ~2 MB of table.
        """
        finished = self.finished_jobs
        finished[job] = None
        while len(finished) > KEEP_SEQ_OF_FINISHED:
            oldest, _ = finished.popitem(last=False)
            self.last_seq.pop(oldest, None)

    def apply_quarantined(self, notice: Quarantined) -> None:
        """Count damaged records the log skipped, or positions it lost, and move past them.

        A :class:`~telemetry.log.base.Gap` is counted even when it lies before the engine's
        position (the log lost events this engine had applied: a checkpoint past the end),
        once per hole."""
        if isinstance(notice, Gap):
            hole = (notice.first or 0, notice.next)
            if hole not in self.health.recent_gaps:
                self.health.gaps += 1
                self.health.gap_positions += notice.count or 0
                self.health.recent_gaps.append(hole)
                del self.health.recent_gaps[:-MAX_RECORDED_GAPS]
            self.position = max(self.position, notice.next)
            return
        if notice.next <= self.position:
            return
        self.health.quarantined_regions += 1
        self.health.quarantined_records += notice.count or 1
        self.position = notice.next

    def _record_failure(self, name: str, position: int, event: Event, exc: Exception) -> None:
        errors = self.health.projection_errors
        errors[name] = errors.get(name, 0) + 1
        failures = self.health.recent_failures
        failures.append(ProjectionFailure(
            projection=name, position=position, event_type=type(event).__name__,
            job=event.job, seq=event.seq, error=f"{type(exc).__name__}: {exc}",
        ))
        del failures[:-MAX_RECORDED_FAILURES]

    # -- snapshots ------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The engine's whole state as bytes; equal logs give equal bytes."""
        encode = msgspec.msgpack.encode
        return encode(_Snapshot(
            fingerprint=self.fingerprint,
            position=self.position,
            last_seq=self.last_seq,
            finished_jobs=list(self.finished_jobs),
            health=self.health,
            states={p.name: encode(self.states[p.name]) for p in self.projections},
        ))

    def restore(self, data: bytes) -> bool:
        """Load a snapshot; returns False (and changes nothing) if it is for other projections."""
        try:
            snap = msgspec.msgpack.decode(data, type=_Snapshot)
            if snap.fingerprint != self.fingerprint:
                return False
            states = {
                p.name: msgspec.msgpack.decode(snap.states[p.name], type=p.state_type)
                for p in self.projections
            }
        except (msgspec.DecodeError, msgspec.ValidationError, KeyError):
            return False
        self.states, self.position = states, snap.position
        self.last_seq, self.health = snap.last_seq, snap.health
        self.finished_jobs = OrderedDict.fromkeys(snap.finished_jobs)
        return True


class CheckpointStore:
    """One engine's checkpoint file, replaced atomically (write, fsync, rename, fsync dir)."""

    def __init__(self, path: str | os.PathLike[str], *, ops: FileOps = REAL_OPS) -> None:
        """``ops``: the file operations saves go through (a recorder in crash tests)."""
        self.path = Path(path)
        self.ops = ops

    def load(self) -> bytes | None:
        """The last checkpoint written, or ``None``."""
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def save(self, data: bytes) -> None:
        """Replace the checkpoint; a crash leaves either the old one or the new one."""
        write_atomic(self.path, data, ops=self.ops)


__all__ = [
    "KEEP_SEQ_OF_FINISHED",
    "MAX_RECORDED_FAILURES",
    "CheckpointStore",
    "Health",
    "ProjectionEngine",
    "ProjectionFailure",
    "ProjectionRunner",
]
