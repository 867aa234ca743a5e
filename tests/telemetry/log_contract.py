"""The log contract, written once and run against every backend (eventsourcing's pattern).

A backend's test module subclasses :class:`LogContract` and implements ``make_log``.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import pytest

from telemetry.events import Event, JobCompleted, StepEnded
from telemetry.log.base import Batch, EventLog, LogError, ReadItem


def steps(job: str, first_seq: int, count: int) -> list[Event]:
    """``count`` StepEnded events of ``job`` with consecutive seqs."""
    return [
        StepEnded(job=job, seq=s, ts=1_000 + s, step=s, total_steps=10**6, timestep=1.0,
                  duration_s=0.5)
        for s in range(first_seq, first_seq + count)
    ]


def events_of(items: Iterator[ReadItem] | list[ReadItem]) -> list[Event]:
    """All events of the batches, in order."""
    return [e for item in items if isinstance(item, Batch) for e in item.events]


def positions_of(items: list[ReadItem]) -> list[int]:
    """All positions of the batches, in order."""
    return [p for item in items if isinstance(item, Batch) for p, _ in item.positioned()]


def runs_of(items: list[ReadItem]) -> list[tuple[int, int]]:
    """The runs of consecutive positions the batches hold, as (first, count): how many
    messages one delivery brings is the transport's business, where the gaps fall is not."""
    runs: list[tuple[int, int]] = []
    for position in positions_of(items):
        if runs and runs[-1][0] + runs[-1][1] == position:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((position, 1))
    return runs


class LogContract(ABC):
    """Behaviour every :class:`EventLog` backend must have."""

    @abstractmethod
    def make_log(self, tmp_path: Path) -> EventLog:
        """A fresh, empty log."""

    @pytest.fixture(name="log")
    def _log(self, tmp_path: Path) -> Iterator[EventLog]:
        log = self.make_log(tmp_path)
        yield log
        log.close()

    def test_empty_log_reads_nothing(self, log: EventLog) -> None:
        """A new log has no events and no last position."""
        assert [] == list(log.read())
        assert log.last_position() is None

    def test_append_returns_consecutive_positions(self, log: EventLog) -> None:
        """Each batch gets the positions right after the previous batch's."""
        first = log.append(steps("a", 0, 3))
        second = log.append(steps("a", 3, 2))
        assert len(first) == 3 and len(second) == 2
        assert second.start == first.stop
        assert log.last_position() == second.stop - 1

    def test_read_returns_events_in_order_and_equal(self, log: EventLog) -> None:
        """What was appended is read back, equal and in order."""
        written = steps("a", 0, 5) + steps("b", 0, 5)
        log.append(written[:5])
        log.append(written[5:])
        items = list(log.read())
        assert written == events_of(items)
        assert positions_of(items) == sorted(set(positions_of(items)))

    def test_read_from_a_position(self, log: EventLog) -> None:
        """Reading from a position returns exactly the events from there on."""
        positions = log.append(steps("a", 0, 10))
        start = positions[4]
        items = list(log.read(start))
        assert steps("a", 4, 6) == events_of(items)
        assert list(positions)[4:] == positions_of(items)

    def test_read_past_the_end_is_empty(self, log: EventLog) -> None:
        """A position after the last event yields nothing."""
        positions = log.append(steps("a", 0, 3))
        assert [] == list(log.read(positions.stop))

    def test_empty_append_changes_nothing(self, log: EventLog) -> None:
        """Appending no events returns an empty range and stores nothing."""
        assert 0 == len(log.append([]))
        assert log.last_position() is None

    def test_follow_sees_appends_from_another_thread(self, log: EventLog) -> None:
        """A follower receives events appended after it started."""
        log.append(steps("a", 0, 2))
        seen: list[Event] = []
        stop = threading.Event()

        def follow() -> None:
            for item in log.follow(0, stop=stop, poll_interval=0.005):
                if isinstance(item, Batch):
                    seen.extend(item.events)

        thread = threading.Thread(target=follow)
        thread.start()
        try:
            log.append(steps("a", 2, 3))
            log.append([JobCompleted(job="a", seq=5, ts=9_000, duration_s=1.0)])
            deadline = time.monotonic() + 10
            while len(seen) < 6 and time.monotonic() < deadline:
                time.sleep(0.005)
        finally:
            stop.set()
            thread.join(10)
        assert [*steps("a", 0, 5), JobCompleted(job="a", seq=5, ts=9_000, duration_s=1.0)] == seen

    def test_follow_ends_after_idle_timeout(self, log: EventLog) -> None:
        """With an idle timeout, follow returns once nothing new arrives."""
        log.append(steps("a", 0, 2))
        assert steps("a", 0, 2) == events_of(list(log.follow(0, idle_timeout=0.05)))

    def test_closed_log_refuses_appends(self, tmp_path: Path) -> None:
        """Appending after close is an error, not a silent loss."""
        log = self.make_log(tmp_path)
        log.close()
        with pytest.raises(LogError):
            log.append(steps("a", 0, 1))
