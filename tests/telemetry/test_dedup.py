"""The engine's per-event pass (``telemetry.dedup.fresh_events``): what is new in a batch.

A property test holds it to the obvious event-by-event rule, down to the order of the table's
keys (a checkpoint holds it) and the identity of the events; the cases below pin the rule's
edges.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telemetry.dedup import fresh_events
from telemetry.events import (
    EVENT_TYPES,
    TERMINAL_TYPES,
    JobCompleted,
    MemorySampled,
    StageStarted,
    StepEnded,
)


def _template(cls: type) -> Any:
    """One valid instance of ``cls`` to copy with other job, seq and ts."""
    values: dict[str, Any] = {}
    for field in msgspec.structs.fields(cls):
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
JOBS = ["a", "b", "job-00000001", "jöb", "职位-1", *"cdefgh"]
# Beyond 64 bits too: seqs and times are Python ints.
NUMBERS = st.one_of(st.integers(-3, 12), st.integers(-(2**70), 2**70))
batch_spec = st.lists(st.tuples(st.sampled_from(EVENT_TYPES), st.sampled_from(JOBS), NUMBERS,
                                NUMBERS), max_size=60)
table_spec = st.dictionaries(st.sampled_from(JOBS), NUMBERS, max_size=8)


def _one_by_one(events: list[Any], table: dict[str, int],
                watch: frozenset[type]) -> tuple[list[Any], int, dict[type, int], list[Any]]:
    """The rule, an event at a time: new if its seq is beyond its job's last one."""
    fresh: list[Any] = []
    newest, counts = 0, {}
    for event in events:
        if event.seq > table.get(event.job, -1):
            table[event.job] = event.seq
            fresh.append(event)
            newest = max(newest, event.ts)
            counts[type(event)] = counts.get(type(event), 0) + 1
    return fresh, newest, counts, [e for e in fresh if type(e) in watch]


class TestFreshEvents:
    @settings(max_examples=300, deadline=None)
    @given(spec=batch_spec, table=table_spec, watch=st.frozensets(st.sampled_from(EVENT_TYPES)))
    def test_the_same_as_event_by_event(self, spec: list[tuple[type, str, int, int]],
                                        table: dict[str, int], watch: frozenset[type]) -> None:
        """Fresh events, newest time, counts in first-seen order, watched events and the
        table (its key order included) are what the one-by-one rule gives."""
        events = [msgspec.structs.replace(TEMPLATES[kind], job=job, seq=seq, ts=ts)
                  for kind, job, seq, ts in spec]
        expected_table, actual_table = dict(table), dict(table)
        expected = _one_by_one(events, expected_table, watch)
        fresh, newest, counts, watched = fresh_events(tuple(events), actual_table, watch)
        assert [id(e) for e in expected[0]] == [id(e) for e in fresh]
        assert expected[1] == newest
        assert list(expected[2].items()) == list(counts.items())
        assert [id(e) for e in expected[3]] == [id(e) for e in watched]
        assert list(expected_table.items()) == list(actual_table.items())

    def test_a_stale_and_a_repeated_event_are_dropped(self) -> None:
        """A redelivery and an event older than one applied are not fresh."""
        step = TEMPLATES[StepEnded]
        events = [
            msgspec.structs.replace(step, job="a", seq=3, ts=30),
            msgspec.structs.replace(step, job="b", seq=0, ts=50),
            msgspec.structs.replace(step, job="a", seq=3, ts=99),  # a redelivery
            msgspec.structs.replace(step, job="a", seq=2, ts=99),  # older than one applied
            msgspec.structs.replace(step, job="a", seq=4, ts=40),
        ]
        table = {"a": 1}
        fresh, newest_ts, counts, watched = fresh_events(events, table,
                                                         frozenset(TERMINAL_TYPES))
        assert [events[0], events[1], events[4]] == fresh
        assert (50, {StepEnded: 3}, []) == (newest_ts, counts, watched)
        assert {"a": 4, "b": 0} == table

    def test_counts_follow_the_first_new_event_of_each_type(self) -> None:
        """A type whose first event was stale is counted from its first new one, in that order."""
        stale = msgspec.structs.replace(TEMPLATES[MemorySampled], job="a", seq=0, ts=1)
        step = msgspec.structs.replace(TEMPLATES[StepEnded], job="b", seq=0, ts=2)
        sample = msgspec.structs.replace(TEMPLATES[MemorySampled], job="b", seq=1, ts=3)
        done = msgspec.structs.replace(TEMPLATES[JobCompleted], job="b", seq=2, ts=4)
        _, _, counts, watched = fresh_events([stale, step, sample, done], {"a": 5},
                                             {JobCompleted})
        assert [(StepEnded, 1), (MemorySampled, 1), (JobCompleted, 1)] == list(counts.items())
        assert [done] == watched

    def test_an_event_without_a_job_raises(self) -> None:
        """The error comes at that event; the table holds the runs that ended before it."""
        good = msgspec.structs.replace(TEMPLATES[StageStarted], job="a", seq=0, ts=1)
        other = msgspec.structs.replace(TEMPLATES[StageStarted], job="b", seq=0, ts=1)
        table: dict[str, int] = {}
        with pytest.raises(AttributeError):
            fresh_events([good, other, object()], table, frozenset())
        assert {"a": 0} == table  # written when the run of "a" ended; "b"'s run never did
