"""Telemetry health reported through the log itself: events the emitters had to drop.

Each emitter reports cumulative drop counts per reason in ``EventsDropped``; the total is the
sum over workers of each one's latest report. Events by type, duplicates, quarantined records
and projection errors are counted by the engine (``ProjectionEngine.health``), and lag is
computed at read time from the newest event's timestamp.
"""

from __future__ import annotations

import msgspec

from telemetry.events import Event, EventsDropped


class HealthState(msgspec.Struct, kw_only=True):
    """Latest drop counts per worker."""

    drops: dict[str, dict[str, int]] = {}

    def dropped(self) -> dict[str, int]:
        """Drops by reason, over all workers."""
        total: dict[str, int] = {}
        for counts in self.drops.values():
            for reason, count in counts.items():
                total[reason] = total.get(reason, 0) + count
        return total


class HealthProjection:
    """Keep each worker's latest drop report."""

    name = "health"
    version = 1
    state_type = HealthState
    handles = frozenset({EventsDropped})

    def initial(self) -> HealthState:
        """Nothing dropped."""
        return HealthState()

    def apply(self, state: HealthState, event: Event) -> HealthState:
        """Replace the worker's counts with its newer cumulative report."""
        if type(event) is EventsDropped:
            assert isinstance(event, EventsDropped)
            state.drops[event.worker or event.job] = dict(event.counts)
        return state
