"""The engine's per-event pass: the C accelerator gives exactly what the Python reference gives.

Every case runs the reference (``fresh_events_py``) and the implementation under test on equal
inputs and compares everything they return or change, down to the order of the table's keys
(a checkpoint holds it) and the identity of the events.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telemetry import accelerate
from telemetry.dedup import fresh_events_py
from telemetry.engine import ProjectionEngine
from telemetry.events import (
    EVENT_TYPES,
    TERMINAL_TYPES,
    JobCompleted,
    MemorySampled,
    StageStarted,
    StepEnded,
)

from .accelerators import assert_built_where_required, both

try:
    from telemetry._speedups import fresh_events as compiled_fresh_events
except ImportError:  # pragma: no cover - where the accelerator was not built
    compiled_fresh_events = None

Impl = Callable[..., Any]
IMPLEMENTATIONS = both(fresh_events_py, compiled_fresh_events, "telemetry._speedups")


def test_the_accelerator_is_built_where_the_suite_requires_it() -> None:
    assert_built_where_required(compiled_fresh_events, "telemetry._speedups")
    assert "C" == ProjectionEngine([]).engine_pass


class TestTheEngineChooses:
    def test_the_c_version_where_it_was_built(self) -> None:
        """By default an engine runs the C pass, or the reference where C was not built."""
        engine = ProjectionEngine([])
        if compiled_fresh_events is None:
            assert ("Python (C not built)", fresh_events_py) == (engine.engine_pass,
                                                                 engine.fresh_events)
        else:
            assert ("C", compiled_fresh_events) == (engine.engine_pass, engine.fresh_events)

    def test_the_reference_when_built_with_compiled_false(self) -> None:
        """``compiled=False`` picks the Python reference."""
        engine = ProjectionEngine([], compiled=False)
        assert ("Python (compiled=False)", fresh_events_py) == (engine.engine_pass,
                                                                engine.fresh_events)

    def test_the_process_default_the_application_set(self) -> None:
        """An engine built after ``configure(compiled=False)`` runs Python; one built before,
        or asking for C, keeps C."""
        before = ProjectionEngine([])
        accelerate.configure(compiled=False, reason="$WANTEL_PURE_PYTHON")
        after = ProjectionEngine([])
        assert ("Python ($WANTEL_PURE_PYTHON)", fresh_events_py) == (after.engine_pass,
                                                                     after.fresh_events)
        assert before.fresh_events is ProjectionEngine([], compiled=True).fresh_events


def _template(cls: type) -> Any:
    """One valid instance of ``cls`` to copy with other job, seq and ts."""
    fields = msgspec.structs.fields(cls)
    values: dict[str, Any] = {}
    for field in fields:
        if field.required:
            values[field.name] = _value_for(field.type)
    return cls(**values)


def _value_for(annotation: Any) -> Any:
    text = str(annotation)
    if "str" in text or "Literal" in text:
        args = getattr(annotation, "__args__", ())
        return args[0] if args and isinstance(args[0], str) else "x"
    if "float" in text:
        return 1.0
    if "int" in text:
        return 1
    if "bool" in text:
        return True
    return None


TEMPLATES = {cls: _template(cls) for cls in EVENT_TYPES}


class Plain:
    """Not a msgspec Struct: its fields are in an instance dict (the generic lookup)."""

    def __init__(self, job: Any, seq: Any, ts: Any) -> None:
        self.job, self.seq, self.ts = job, seq, ts


class Slotted:
    """Ordinary ``__slots__``: slots, but not a Struct's."""

    __slots__ = ("job", "seq", "ts")

    def __init__(self, job: Any, seq: Any, ts: Any) -> None:
        self.job, self.seq, self.ts = job, seq, ts


class Computed(StepEnded, frozen=True, kw_only=True):
    """A Struct subclass whose ``ts`` is a property: a slot lookup would read the wrong one."""

    @property  # type: ignore[misc]
    def ts(self) -> int:  # type: ignore[override]
        return 7


class Intercepted(StepEnded, frozen=True, kw_only=True):
    """A Struct subclass that intercepts attribute access: its slots are not what it reads."""

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        return value + 1 if name == "seq" else value


def _make(kind: int, job: Any, seq: int, ts: int) -> Any:
    if kind < len(EVENT_TYPES):
        return msgspec.structs.replace(TEMPLATES[EVENT_TYPES[kind]], job=job, seq=seq, ts=ts)
    if kind == len(EVENT_TYPES):
        return Plain(job, seq, ts)
    if kind == len(EVENT_TYPES) + 1:
        return Slotted(job, seq, ts)
    if kind == len(EVENT_TYPES) + 2:
        return Computed(job=job, seq=seq, ts=ts, step=0, total_steps=1)
    return Intercepted(job=job, seq=seq, ts=ts, step=0, total_steps=1)


KINDS = len(EVENT_TYPES) + 4
# More jobs than the C version holds at once (8), strs of every width, and jobs that are not strs.
JOBS: list[Any] = ["a", "b", "job-00000001", "job-00000002", "jöb", "职位-1", "😀", *"cdefgh",
                   None, 3]
# Beyond 64 bits on both sides: the C version's fast comparison must give way to Python's.
NUMBERS = st.one_of(st.integers(-3, 12), st.integers(-(2**70), 2**70))

batch_spec = st.lists(
    st.tuples(st.integers(0, KINDS - 1), st.sampled_from(JOBS), NUMBERS, NUMBERS),
    max_size=60,
)
table_spec = st.dictionaries(st.sampled_from(JOBS), NUMBERS, max_size=8)
watch_spec = st.frozensets(
    st.sampled_from([*EVENT_TYPES, Plain, Slotted, Computed, Intercepted]))


def _compare(impl: Impl, events: list[Any], table: dict[str, Any], watch: Any) -> None:
    expected_table, actual_table = dict(table), dict(table)
    expected = fresh_events_py(events, expected_table, watch)
    actual = impl(events, actual_table, watch)
    fresh, newest_ts, counts, watched = actual
    assert [id(e) for e in fresh] == [id(e) for e in expected[0]]
    assert newest_ts == expected[1] and type(newest_ts) is type(expected[1])
    assert type(counts) is dict and list(counts.items()) == list(expected[2].items())
    assert [id(e) for e in watched] == [id(e) for e in expected[3]]
    assert list(actual_table.items()) == list(expected_table.items())


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@settings(max_examples=400, deadline=None)
@given(spec=batch_spec, table=table_spec, watch=watch_spec)
def test_the_same_events_times_counts_and_table_as_the_reference(
    impl: Impl, spec: list[tuple[int, Any, int, int]], table: dict[Any, int], watch: Any
) -> None:
    events = [_make(*item) for item in spec]
    _compare(impl, events, table, watch)
    _compare(impl, tuple(events), table, watch)  # a read batch may hold a tuple


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_stale_and_a_repeated_event_are_dropped(impl: Impl) -> None:
    step = TEMPLATES[StepEnded]
    events = [
        msgspec.structs.replace(step, job="a", seq=3, ts=30),
        msgspec.structs.replace(step, job="b", seq=0, ts=50),
        msgspec.structs.replace(step, job="a", seq=3, ts=99),  # a redelivery
        msgspec.structs.replace(step, job="a", seq=2, ts=99),  # older than one applied
        msgspec.structs.replace(step, job="a", seq=4, ts=40),
    ]
    table = {"a": 1}
    fresh, newest_ts, counts, watched = impl(events, table, frozenset(TERMINAL_TYPES))
    assert fresh == [events[0], events[1], events[4]]
    assert (newest_ts, counts, watched) == (50, {StepEnded: 3}, [])
    assert table == {"a": 4, "b": 0}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_counts_follow_the_first_new_event_of_each_type(impl: Impl) -> None:
    """A type whose first event was stale is counted from its first new one, in that order."""
    stale = msgspec.structs.replace(TEMPLATES[MemorySampled], job="a", seq=0, ts=1)
    step = msgspec.structs.replace(TEMPLATES[StepEnded], job="b", seq=0, ts=2)
    sample = msgspec.structs.replace(TEMPLATES[MemorySampled], job="b", seq=1, ts=3)
    done = msgspec.structs.replace(TEMPLATES[JobCompleted], job="b", seq=2, ts=4)
    _, _, counts, watched = impl([stale, step, sample, done], {"a": 5}, {JobCompleted})
    assert list(counts.items()) == [(StepEnded, 1), (MemorySampled, 1), (JobCompleted, 1)]
    assert watched == [done]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_an_event_without_a_job_raises_as_python_does(impl: Impl) -> None:
    """The error comes at the same event, with the table as the reference leaves it."""
    good = msgspec.structs.replace(TEMPLATES[StageStarted], job="a", seq=0, ts=1)
    other = msgspec.structs.replace(TEMPLATES[StageStarted], job="b", seq=0, ts=1)
    table: dict[str, int] = {}
    with pytest.raises(AttributeError):
        impl([good, other, object()], table, frozenset())
    assert table == {"a": 0}  # written when the run of "a" ended; "b"'s run never did


@pytest.mark.skipif(compiled_fresh_events is None, reason="telemetry._speedups was not built")
def test_the_c_version_wants_a_dict_and_a_sequence() -> None:
    assert compiled_fresh_events is not None
    with pytest.raises(TypeError, match="last_seq must be a dict"):
        compiled_fresh_events([], OrderedDict(), frozenset())
    with pytest.raises(TypeError, match="events must be a sequence"):
        compiled_fresh_events(42, {}, frozenset())
    with pytest.raises(TypeError, match="takes 3 arguments"):
        compiled_fresh_events([], {})  # type: ignore[call-arg]


@pytest.mark.skipif(compiled_fresh_events is None, reason="telemetry._speedups was not built")
def test_the_c_version_leaks_no_references() -> None:
    """Every path that takes a reference gives it back: counts and blocks stay flat."""
    assert compiled_fresh_events is not None
    step = TEMPLATES[StepEnded]
    events = [msgspec.structs.replace(step, job=f"j{i % 3}", seq=i // 3 + (i % 5 == 0), ts=i)
              for i in range(300)]
    events.append(Plain("j1", 2**80, 2**80))
    watch = frozenset({StepEnded})

    def run() -> None:
        table: dict[str, int] = {"j0": 5}
        compiled_fresh_events(events, table, watch)
        with contextlib.suppress(AttributeError):
            compiled_fresh_events([*events, object()], table, watch)

    run()
    gc.collect()
    before = (sys.getrefcount(events[0]), sys.getrefcount(events[0].job), sys.getrefcount(-1),
              sys.getallocatedblocks())
    for _ in range(2000):
        run()
    gc.collect()
    after = (sys.getrefcount(events[0]), sys.getrefcount(events[0].job), sys.getrefcount(-1),
             sys.getallocatedblocks())
    assert after[:3] == before[:3]
    assert after[3] - before[3] < 200  # a leak would be thousands of blocks
