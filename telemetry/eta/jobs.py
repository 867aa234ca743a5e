"""Completed jobs as the ETA model sees them: shape, phase durations, step durations, events."""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from telemetry.eta.shape import JobShape
from telemetry.events import (
    TERMINAL_TYPES,
    Event,
    JobCompleted,
    JobStarted,
    StageEnded,
    StepEnded,
)


@dataclass
class JobRecord:
    """One job's events and the figures derived from them."""

    job: str
    started: JobStarted
    events: list[Event] = field(default_factory=list)
    stage_durations: dict[str, float] = field(default_factory=dict)
    step_durations: list[float] = field(default_factory=list)
    end_ts: int | None = None
    completed: bool = False

    @property
    def shape(self) -> JobShape:
        """The job's cost-relevant shape."""
        return JobShape.of(self.started)

    @property
    def duration_s(self) -> float:
        """From ``JobStarted`` to the terminal event."""
        return ((self.end_ts or self.started.ts) - self.started.ts) / 1e9

    def in_split(self, part: str, fraction: float = 0.5) -> bool:
        """Deterministic train/test split by job id (stable across runs and machines)."""
        is_train = (zlib.crc32(self.job.encode()) % 10_000) / 10_000 < fraction
        return is_train if part == "train" else not is_train


def job_records(events: Iterable[Event]) -> list[JobRecord]:
    """Group a log's events into jobs (in order of their ``JobStarted``)."""
    records: dict[str, JobRecord] = {}
    seen: set[tuple[str, int]] = set()
    for event in events:
        key = (event.job, event.seq)
        if key in seen:
            continue
        seen.add(key)
        if isinstance(event, JobStarted):
            records[event.job] = JobRecord(job=event.job, started=event)
        record = records.get(event.job)
        if record is None:
            continue
        record.events.append(event)
        if isinstance(event, StageEnded):
            record.stage_durations[event.stage] = (
                record.stage_durations.get(event.stage, 0.0) + event.duration_s)
        elif isinstance(event, StepEnded) and event.duration_s is not None:
            record.step_durations.append(event.duration_s)
        elif isinstance(event, TERMINAL_TYPES):
            record.end_ts = event.ts
            record.completed = isinstance(event, JobCompleted)
    return list(records.values())
