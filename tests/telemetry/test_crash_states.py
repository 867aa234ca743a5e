"""Every state a power loss could leave the local log in (issue 16, item 1).

A workload — appends of whole jobs in batches of one to forty events, small segments so it
rotates, a projection checkpoint every few appends, a clean close — runs on a real log whose
file operations go through :class:`~tests.telemetry.crashsim.Recorder`. For each point of the
trace, :mod:`tests.telemetry.crashsim` builds crash states (synced data, plus any prefix of each
file's unsynced writes torn at 512-byte boundaries, plus any prefix of each directory's
unsynced entries, files and directories independently). On each state, as after a reboot:

* the log opens; a reader reads it with no exception and no silent hole (batches and
  :class:`~telemetry.log.base.Gap`/quarantine notices meet end to end);
* every event read is one some append wrote, at the position it was given (nothing that was
  never written appears), and no ``(job, seq)`` appears twice;
* every append that returned, and was synced by the fsync policy, is there whole;
* the projections replay it without error;
* the checkpoint is absent (before any save completed), or exactly one of the snapshots
  saved — the last completed or a later one — never garbage; the engine restores from it and
  reads on, and a checkpoint past the log's end is reported as a gap;
* a new writer appends, at a position past every position given before the crash (a reader
  may have seen them), and the log reads back with the new batch once.

``make test`` explores at least 1,000 distinct states; ``-m slow`` at least 10,000. Set
``WANTEL_CRASH_SEED`` to replay a seed printed by a failure.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from telemetry.engine import CheckpointStore, ProjectionEngine
from telemetry.events import Event
from telemetry.log import Batch, Gap, LocalLog, Quarantined, ReadItem
from telemetry.log.base import LogNotFound
from telemetry.projections import default_projections
from tests.telemetry.test_engine import a_job

from .crashsim import Model, Rebooted, Recorder, crash_states

CHECKPOINT = Path("log") / "checkpoints" / "engine"


@dataclass
class Append:
    """One append of the workload: trace indices where it began, wrote its frame and returned."""

    begin: int
    write: int | None
    ack: int
    positions: range
    events: list[Event]


@dataclass
class Save:
    """One checkpoint save: trace indices where it began and returned, and its bytes."""

    begin: int
    done: int
    data: bytes


@dataclass
class Workload:
    """What a workload did, for checking a crash state against."""

    policy: str
    trace: list[tuple[object, ...]]
    appends: list[Append] = field(default_factory=list)
    saves: list[Save] = field(default_factory=list)


class MarkedLog(LocalLog):
    """A :class:`LocalLog` that notes in the trace where each append begins and returns."""

    def __init__(self, path: Path, recorder: Recorder, workload: Workload, **options: object):
        super().__init__(path, ops=recorder, **options)  # type: ignore[arg-type]
        self.recorder, self.workload = recorder, workload

    def append(self, events: list[Event]) -> range:  # type: ignore[override]
        begin = self.recorder.mark("begin")
        positions = super().append(events)
        ack = self.recorder.mark("ack")
        trace = self.recorder.trace
        write = next((i for i in range(begin, ack) if trace[i][0] == "write"
                      and str(trace[i][1]).endswith(".wlog")), None)
        self.workload.appends.append(Append(begin, write, ack, positions, list(events)))
        return positions


def run_workload(root: Path, policy: str, rng: random.Random, *, jobs: int) -> Workload:
    """Jobs appended in random batches, a checkpoint every few appends, a clean close."""
    root.mkdir(parents=True)
    recorder = Recorder(root)
    workload = Workload(policy, recorder.trace)
    log = MarkedLog(root / "log", recorder, workload, fsync=policy,
                    segment_bytes=rng.choice([1024, 2048, 4096]), batch_interval=3600.0)
    store = CheckpointStore(root / CHECKPOINT, ops=recorder)
    engine = ProjectionEngine(default_projections())
    appends = 0
    for number in range(jobs):
        events = a_job(f"job-{number}", steps=rng.randint(1, 30))
        while events:
            size = rng.choice([1, 2, 5, rng.randint(1, 40)])
            log.append(events[:size])
            events = events[size:]
            appends += 1
            if appends % 4 == 0:
                engine.apply_items(log.read(engine.position))
                data = engine.snapshot()
                begin = recorder.mark("save")
                store.save(data)
                workload.saves.append(Save(begin, recorder.mark("saved"), data))
    log.close()
    return workload


def contiguous(items: list[ReadItem], context: str) -> tuple[int, int]:
    """Check that items meet end to end from 0; (end of the last batch, end of all)."""
    position = data_end = 0
    for item in items:
        first = item.first
        if first is not None:
            assert first == position, f"{context}: silent hole: {position} to {first}"
        else:
            assert item.next >= position, f"{context}: notice going back: {item}"
        position = item.next
        if isinstance(item, Batch):
            data_end = item.next
    return data_end, position


def check_state(log_dir: Path, workload: Workload, point: int, model: Model,
                context: str) -> None:
    """Every invariant of the module docstring, on the crash state at ``log_dir``."""
    pending = model.pending_writes()
    attempted = [a for a in workload.appends if a.write is not None and a.write < point]
    required = [a for a in workload.appends if a.ack < point
                and (workload.policy == "always" or a.write not in pending)]
    try:
        reader = LocalLog(log_dir, create=False, ops=Rebooted())
    except LogNotFound:
        assert not required, f"{context}: the log is gone, with acknowledged appends"
        reader = None
    if reader is not None:
        with reader:
            items = list(reader.read())
            _data_end, _ = contiguous(items, context)
            by_position: dict[int, Event] = {}
            for item in items:
                if isinstance(item, Batch):
                    by_position.update(item.positioned())
            expected: dict[int, Event] = {}
            for append in attempted:
                expected.update(zip(append.positions, append.events, strict=True))
            for position, event in by_position.items():
                assert expected.get(position) == event, (
                    f"{context}: position {position} holds {event!r}, never written there")
            keys = [(event.job, event.seq) for event in by_position.values()]
            assert len(keys) == len(set(keys)), f"{context}: a (job, seq) read twice"
            for append in required:
                missing = [p for p in append.positions if p not in by_position]
                assert not missing, f"{context}: acknowledged positions {missing} lost"
            engine = ProjectionEngine(default_projections())
            engine.apply_items(items)
            assert not engine.health.projection_errors, context
            check_checkpoint(log_dir.parent, reader, workload, point, context,
                             data_end=_data_end)
    check_next_writer(log_dir, attempted, context)


def check_checkpoint(root: Path, reader: LocalLog, workload: Workload, point: int,
                     context: str, *, data_end: int) -> None:
    """Old or new, never garbage; restorable; past the log's end, a reported gap."""
    begun = [save.data for save in workload.saves if save.begin < point]
    done = [index for index, save in enumerate(workload.saves) if save.done < point]
    path = root / CHECKPOINT
    if not path.exists():
        assert not done, f"{context}: a completed checkpoint is gone"
        return
    data = path.read_bytes()
    assert data in begun, f"{context}: the checkpoint is none of the snapshots saved"
    if done:
        assert begun.index(data) >= done[-1], f"{context}: the checkpoint went back"
    engine = ProjectionEngine(default_projections())
    assert engine.restore(data), f"{context}: the checkpoint does not restore"
    start = engine.position
    items = list(reader.read(start))
    engine.apply_items(items)
    if start > data_end:
        assert any(isinstance(item, Gap) for item in items), (
            f"{context}: checkpoint at {start} past the log's end {data_end}, not reported")


def check_next_writer(log_dir: Path, attempted: list[Append], context: str) -> None:
    """A new writer appends past every position given before; it reads back once."""
    seen = max((append.positions.stop for append in attempted), default=0)
    with LocalLog(log_dir, ops=Rebooted()) as writer:
        events = a_job("job-after-crash", steps=2)
        positions = writer.append(events)
        assert positions.start >= seen, (
            f"{context}: the next writer reused positions {positions.start}..{seen - 1}")
        items = list(writer.read())
    contiguous(items, context + " (after the next append)")
    read_back = [event for item in items if isinstance(item, Batch)
                 for position, event in item.positioned() if position in positions]
    assert events == read_back, f"{context}: the next writer's batch did not read back"
    assert not [item for item in items if isinstance(item, Quarantined)
                and not isinstance(item, Gap) and item.next > positions.start], context


def seed_of_run() -> int:
    """``WANTEL_CRASH_SEED`` if set, else a fresh seed (printed on failure)."""
    env = os.environ.get("WANTEL_CRASH_SEED")
    return int(env) if env else random.SystemRandom().randrange(2**32)


@pytest.fixture(name="scratch")
def _scratch() -> Iterator[Path]:
    """A directory in memory where there is one (states are written and read thousands of
    times), else in the temporary directory."""
    parent = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="wantel-crash-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def explore(scratch: Path, *, states_wanted: int, per_point: int, jobs: int) -> int:
    """Run workloads under each fsync policy and check their crash states until at least
    ``states_wanted`` distinct states have been checked; the number checked."""
    seed = seed_of_run()
    rng = random.Random(seed)
    seen: set[str] = set()
    counts: dict[str, int] = {}
    started = time.monotonic()
    rounds = 0
    while len(seen) < states_wanted:
        for policy in ("always", "batch", "never"):
            work = scratch / f"work-{rounds}-{policy}"
            workload = run_workload(work, policy, rng, jobs=jobs)
            for point, model, files, dirs in crash_states(workload.trace, rng, per_point):
                state = scratch / "state"
                digest = model.materialise(state, files, dirs)
                key = f"{policy}:{point}:{digest}"
                if key not in seen:
                    seen.add(key)
                    counts[policy] = counts.get(policy, 0) + 1
                    context = (f"seed={seed} (WANTEL_CRASH_SEED) round={rounds} policy={policy} "
                               f"point={point}/{len(workload.trace)} "
                               f"op={workload.trace[point - 1][:3]!r:.120}")
                    check_state(state / "log", workload, point, model, context)
                shutil.rmtree(state)
            shutil.rmtree(work)
        rounds += 1
    print(f"\ncrash states explored: {len(seen)} distinct ({counts}), seed={seed}, "
          f"{rounds} round(s), {time.monotonic() - started:.1f} s")
    return len(seen)


def test_every_crash_state_keeps_the_durability_contract(scratch: Path) -> None:
    """At least 1,000 distinct crash states keep every invariant of the module docstring."""
    assert explore(scratch, states_wanted=1000, per_point=6, jobs=3) >= 1000


@pytest.mark.slow
def test_every_crash_state_many(scratch: Path) -> None:
    """At least 10,000 distinct crash states keep every invariant."""
    assert explore(scratch, states_wanted=10_000, per_point=24, jobs=6) >= 10_000
