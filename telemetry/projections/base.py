"""What a projection is: a named, versioned, pure fold from events to a state.

``apply(state, event)`` must be deterministic: no I/O, no clock reads (time comes from the
events' ``ts``), no globals, no randomness. For speed a projection may update the state it is
given in place and return it; the engine owns every state and never shares it while folding.
States are msgspec ``Struct``s (or builtins) so a checkpoint can encode them, and replaying the
same log always yields byte-identical snapshots.
"""

from __future__ import annotations

from typing import Final, Protocol, TypeVar

from telemetry.events import Event

S = TypeVar("S")


class Projection(Protocol[S]):
    """A pure fold ``state × event → state``."""

    #: Unique among the projections an engine runs; keys its state in checkpoints and APIs.
    name: str
    #: Bump when the state's meaning changes: checkpoints of another version are discarded.
    version: int
    #: The state's type, used to decode checkpoints.
    state_type: type[S]
    # Optionally, ``handles: frozenset[type[Event]]``: the event types the fold reads. The
    # engine then routes only those to it (a projection without it sees every event).

    def initial(self) -> S:
        """The state before any event."""
        ...

    def apply(self, state: S, event: Event) -> S:
        """The state after ``event``."""
        ...


#: Jobs a projection tracks as running at most: a job whose worker died never sends its terminal
#: event, so without a bound a long-running server would grow forever.
MAX_RUNNING: Final = 10_000

V = TypeVar("V")


def bounded_insert(table: dict[str, V], key: str, value: V, limit: int = MAX_RUNNING) -> None:
    """``table[key] = value``, dropping the oldest entries beyond ``limit`` (dicts keep order)."""
    table[key] = value
    while len(table) > limit:
        del table[next(iter(table))]
