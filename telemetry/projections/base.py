"""What a projection is: a named, versioned, pure fold from events to a state.

``apply(state, event)`` must be deterministic: no I/O, no clock reads (time comes from the
events' ``ts``), no globals, no randomness. For speed a projection may update the state it is
given in place and return it; the engine owns every state and never shares it while folding.
States are msgspec ``Struct``s (or builtins) so a checkpoint can encode them, and replaying the
same log always yields byte-identical snapshots.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol, TypeVar

from telemetry.events import Event

S = TypeVar("S")

#: Told about an event a fold raised on; the fold then goes on with the next event.
OnFailure = Callable[[Event, Exception], None]


class Projection(Protocol[S]):
    """A pure fold ``state × event → state``."""

    #: Unique among the projections an engine runs; keys its state in checkpoints and APIs.
    name: str
    #: Bump when the state's meaning changes: checkpoints of another version are discarded.
    version: int
    #: The state's type, used to decode checkpoints.
    state_type: type[S]
    # Optionally, ``handles: frozenset[type[Event]]``: the event types the fold reads. The
    # engine then routes only those to it (a projection without it sees every event). And
    # ``passes: frozenset[type[Event]]``: types it does not read but skips cheaply itself; a
    # batch of only handled and passed types is handed over unfiltered (filtering costs a
    # pass over the batch).

    def initial(self) -> S:
        """The state before any event."""
        ...

    def apply(self, state: S, event: Event) -> S:
        """The state after ``event``."""
        ...


class BatchProjection(Projection[S], Protocol[S]):
    """A projection with a fast path: it also folds a run of events in one call.

    ``apply_many(state, events, failed)`` must equal folding ``apply`` over ``events`` in
    order; an event it raises on is reported to ``failed`` and the loop goes on (whatever that
    event had already changed stays changed, exactly as with ``apply``). One call per batch
    lets a fold bind its tables and constants once instead of once per event, and keep what a
    run of events changes in locals. ``apply`` stays the statement of the rules; a fast path
    sits beside it only where a benchmark shows it pays, and a property test holds the two to
    the same state (``tests/telemetry/test_fold_equivalence.py``). The engine folds a
    projection without one event by event (:func:`as_batch_projection`).
    """

    def apply_many(self, state: S, events: Sequence[Event], failed: OnFailure) -> S:
        """The state after every event of ``events``."""
        ...


class _EachEvent:
    """Adapts a projection with only ``apply`` to the engine's ``apply_many``."""

    def __init__(self, projection: Projection[Any]) -> None:
        self.projection = projection

    def apply_many(self, state: Any, events: Sequence[Event], failed: OnFailure) -> Any:
        apply = self.projection.apply
        for event in events:
            try:
                state = apply(state, event)
            except Exception as exc:
                failed(event, exc)
        return state


def as_batch_projection(projection: Projection[Any]) -> BatchProjection[Any]:
    """``projection`` itself if it folds batches, else an adapter that folds event by event."""
    if callable(getattr(projection, "apply_many", None)):
        return projection  # type: ignore[return-value]
    return _EachEvent(projection)  # type: ignore[return-value]


class RuleTable:
    """A fold whose rule is one handler per event type: ``apply`` looks the event's type up in
    ``_rules`` (built by the subclass's ``__init__``, handlers that change the state in place)
    and hands the event to its handler; other types change nothing.

    The dispatch is written once here; the handlers, one per type, are each projection's
    statement of its rule.
    """

    _rules: dict[type[Event], Callable[[Any, Any], object]]

    def apply(self, state: S, event: Event) -> S:
        """The state after ``event``: the rule for its type (other types change nothing)."""
        rule = self._rules.get(type(event))
        if rule is not None:
            rule(state, event)
        return state


class RulesOnly:
    """``projection`` without its fast path: an engine folds it event by event through its
    ``apply``, the rules, with the same name and version (so the same checkpoints).

    What benchmarks measure a fast path against, and what tests hold it to.
    """

    def __init__(self, projection: Projection[Any]) -> None:
        self.projection = projection
        self.name, self.version = projection.name, projection.version
        self.state_type = projection.state_type
        handles = getattr(projection, "handles", None)
        if handles is not None:  # ``passes`` is for a fast path: filtering costs less than
            self.handles = handles  # a call of ``apply`` per event it would skip
        self.initial = projection.initial
        self.apply = projection.apply


#: A fast path's "no current job" before a run starts and after it ends: not ``None``, which an
#: event built in code may carry as its ``job`` (the log's decoder refuses it) and which would
#: then match a run that ended and be folded into the wrong job.
NO_JOB: Final = object()

#: Jobs a projection tracks as running at most: a job whose worker died never sends its terminal
#: event, so without a bound a long-running server would grow forever.
MAX_RUNNING: Final = 10_000

K = TypeVar("K")
V = TypeVar("V")


def oldest_first(table: dict[K, V]) -> OrderedDict[K, V]:
    """``table`` as an OrderedDict (itself, or a copy the caller stores in its place), whose
    oldest entries ``popitem(last=False)`` takes in O(1).

    Folds keep ordered sets and bounded tables in dicts (checkpoints decode them as dicts), and a
    dict whose oldest key is deleted again and again finds the next one past the hole each
    earlier deletion left, until it resizes: ~4 µs a deletion at 10,000 entries, at every job's
    end once a bound is reached. A fold turns its table into an OrderedDict, once, when it first
    evicts from it; it encodes as the same map.
    """
    return table if type(table) is OrderedDict else OrderedDict(table)


def bounded_insert(table: dict[K, V], key: K, value: V, limit: int = MAX_RUNNING) -> dict[K, V]:
    """``table[key] = value``, dropping the oldest entries beyond ``limit``; returns the table
    to go on with, which the caller stores in place of ``table`` (and rebinds any alias of it):
    ``table`` itself, or, the first time it drops an entry, an OrderedDict (:func:`oldest_first`).
    """
    table[key] = value
    if len(table) <= limit:
        return table
    ordered = oldest_first(table)
    while len(ordered) > limit:
        ordered.popitem(last=False)
    return ordered
