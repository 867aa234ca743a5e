"""Hypothesis strategies for events: every type, every field, values JSON can carry exactly."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from telemetry.events import EVENT_TYPES, Event

_INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_FLOAT = st.floats(allow_nan=False, allow_infinity=False)


def _register() -> None:
    st.register_type_strategy(int, _INT64)
    st.register_type_strategy(float, _FLOAT)


def event_of(cls: type[Event]) -> st.SearchStrategy[Event]:
    """Any valid instance of ``cls``, with a non-negative seq."""
    _register()
    return st.builds(cls, seq=st.integers(0, 2**40), ts=st.integers(0, 2**63 - 1))


any_event: st.SearchStrategy[Any] = st.one_of([event_of(cls) for cls in EVENT_TYPES])
