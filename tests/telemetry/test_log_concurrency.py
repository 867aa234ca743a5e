"""Several processes appending to one local log at once, and a follower in another process."""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from telemetry.codec import SCHEMA_FINGERPRINT, encode_many
from telemetry.events import Event
from telemetry.log import Batch, LocalLog, Quarantined, ReadItem, framing
from telemetry.log.local import segment_name

from . import writer_proc as wp

WRITERS = 4
EVENTS = 10_000
BATCH = 100
DEADLINE = 120.0  # for a stuck child: generous on a loaded 2-core machine, never a latency bound


def start_writers(log_dir: Path, jobs: list[str], *, events: int, batch: int,
                  fsync: str = "always") -> list:
    """Start one ``concurrent`` writer per job, wait until all are ready, release them together."""
    children = [
        wp.Child("concurrent", log_dir, job, "--events", events, "--batch", batch,
                 "--fsync", fsync)
        for job in jobs
    ]
    deadline = time.monotonic() + DEADLINE
    for child in children:
        child.expect("READY", deadline)
    for child in children:
        child.send("go")
    return children


def finish_writers(children: list) -> None:
    """Each writer printed ``DONE`` and exited 0."""
    deadline = time.monotonic() + DEADLINE
    for child in children:
        child.expect("DONE", deadline)
        assert child.finish(DEADLINE) == 0, child.stderr()


def check_whole_batches(items: list[ReadItem], jobs: list[str], *, events: int,
                        batch: int) -> None:
    """Exactly ``events`` per job, once each, in whole batches, in order; positions contiguous.

    A read may hand several appends over as one ``Batch``, so the appends are found by
    position: every append is ``batch`` events, so each stretch of ``batch`` positions from 0
    must be one writer's whole append, untouched by any other.
    """
    quarantined = [item for item in items if isinstance(item, Quarantined)]
    assert quarantined == [], "interleaved or damaged bytes were found"
    position = 0
    stored: list[Event] = []
    for item in items:
        assert isinstance(item, Batch)
        assert item.first == position, f"positions jump from {position} to {item.first}"
        position = item.next
        stored.extend(item.events)
    seqs: dict[str, list[int]] = defaultdict(list)
    for start in range(0, len(stored), batch):
        append = stored[start : start + batch]
        job, first = append[0].job, append[0].seq
        assert [(e.job, e.seq) for e in append] == [(job, s) for s in range(first, first + batch)]
        assert first % batch == 0
        for event in append:
            assert event == wp.step_event(job, event.seq, job)
        seqs[job].extend(e.seq for e in append)
    assert sorted(seqs) == sorted(jobs)
    for job in jobs:
        assert seqs[job] == list(range(events)), f"{job}: order or count wrong"
    assert position == events * len(jobs)


@pytest.mark.parametrize("segment_bytes", [64 << 20, 64 << 10], ids=["one-segment", "64KiB"])
def test_four_writer_processes_store_every_batch_once_and_whole(tmp_path, segment_bytes):
    """4 processes × 10,000 events: all present once, none interleaved, per-writer order kept."""
    log_dir = tmp_path / "log"
    LocalLog(log_dir, segment_bytes=segment_bytes).close()
    jobs = [f"writer-{i}" for i in range(WRITERS)]
    children = start_writers(log_dir, jobs, events=EVENTS, batch=BATCH)
    try:
        finish_writers(children)
    finally:
        for child in children:
            child.close()
    log = LocalLog(log_dir, create=False)
    try:
        items = list(log.read())
        assert log.last_position() == WRITERS * EVENTS - 1
    finally:
        log.close()
    check_whole_batches(items, jobs, events=EVENTS, batch=BATCH)
    if segment_bytes == 64 << 10:
        assert len(list(log_dir.glob("*.wlog"))) > 10, "rotation was not exercised"


class Follower:
    """``LocalLog.follow`` on a thread of this process, collecting what it yields."""

    def __init__(self, log_dir: Path, *, start: int = 0) -> None:
        self.log = LocalLog(log_dir, create=False)
        self.stop = threading.Event()
        self.items: queue.Queue[ReadItem | BaseException] = queue.Queue()
        self.thread = threading.Thread(target=self._run, args=(start,), daemon=True)
        self.thread.start()

    def _run(self, start: int) -> None:
        try:
            for item in self.log.follow(start, stop=self.stop, poll_interval=0.002):
                self.items.put(item)
        except BaseException as exc:  # surfaced to the test by collect()
            self.items.put(exc)

    def collect(self, end: int, timeout: float) -> list[ReadItem]:
        """Items until the follower has passed position ``end``; fails after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        got: list[ReadItem] = []
        position = 0
        while position < end:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"follower reached {position} of {end} in time: {got[-3:]}"
            try:
                item = self.items.get(timeout=remaining)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                raise item
            got.append(item)
            position = item.next
        return got

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.log.close()


def test_follower_sees_another_process_appends(tmp_path):
    """A follower started on an empty log sees every event another process appends, in order."""
    log_dir = tmp_path / "log"
    LocalLog(log_dir).close()
    follower = Follower(log_dir)
    try:
        children = start_writers(log_dir, ["job-followed"], events=2_000, batch=50)
        try:
            finish_writers(children)
        finally:
            for child in children:
                child.close()
        items = follower.collect(2_000, timeout=10.0)
    finally:
        follower.close()
    check_whole_batches(items, ["job-followed"], events=2_000, batch=50)
    assert follower.items.empty(), "the follower yielded more than was appended"




# A race: fails in roughly 1 run in 3 here. Make it strict once the bug is fixed.
@pytest.mark.parametrize("fsync", ["always", "never"])
def test_follower_keeps_up_with_four_writers_across_rotations(tmp_path, fsync):
    """A follower meeting 4 writers and a rotation every few frames sees each event once."""
    log_dir = tmp_path / "log"
    LocalLog(log_dir, segment_bytes=16 << 10).close()
    jobs = [f"writer-{i}" for i in range(WRITERS)]
    follower = Follower(log_dir)
    try:
        children = start_writers(log_dir, jobs, events=5_000, batch=25, fsync=fsync)
        try:
            finish_writers(children)
        finally:
            for child in children:
                child.close()
        items = follower.collect(WRITERS * 5_000, timeout=30.0)
    finally:
        follower.close()
    check_whole_batches(items, jobs, events=5_000, batch=25)


def _batch(first: int) -> list:
    return [wp.step_event("job-race", s, "w") for s in range(first, first + 15)]


def _hook_second_listing(reader: LocalLog, action) -> None:
    """Run ``action`` just before ``reader`` lists its directory for the second time.

    The first listing opens the first segment; the second is the cursor looking for a newer
    segment after it met the end of (or a torn frame in) the one it is reading: the moment
    another process's appends land in a real race.
    """
    real, calls = reader.segments, []

    def segments():
        calls.append(1)
        if len(calls) == 2:
            action()
        return real()

    reader.segments = segments  # type: ignore[method-assign]


def test_follower_at_segment_end_does_not_skip_frames_appended_before_rotation(tmp_path):
    """A reader at a segment's end keeps frames appended there before another writer rotates."""
    writer = LocalLog(tmp_path / "log", segment_bytes=3072)  # two 15-event frames fill one
    reader = LocalLog(tmp_path / "log", create=False)
    try:
        writer.append(_batch(0))
        _hook_second_listing(reader, lambda: (writer.append(_batch(15)),
                                               writer.append(_batch(30))))
        items = list(reader.read())
    finally:
        reader.close()
        writer.close()
    assert len(list((tmp_path / "log").glob("*.wlog"))) == 2
    assert [(type(i).__name__, i.first, i.next) for i in items] == [
        ("Batch", 0, 15), ("Batch", 15, 30), ("Batch", 30, 45)
    ]


def test_follower_at_half_written_frame_does_not_quarantine_it_after_rotation(tmp_path):
    """A frame a reader saw half-written is read whole once done, even if the log rotated."""
    log_dir = tmp_path / "log"
    writer = LocalLog(log_dir, segment_bytes=3072)  # two 15-event frames fill one
    reader = LocalLog(log_dir, create=False)
    body = framing.encode_body(encode_many(_batch(15)))
    frame = framing.encode_header(body, 15, 15, SCHEMA_FINGERPRINT) + body
    segment = log_dir / segment_name(0)

    def write(data: bytes) -> None:  # another process's single write(), seen half done
        with open(segment, "ab") as out:
            out.write(data)

    try:
        writer.append(_batch(0))
        write(frame[: len(frame) // 2])
        _hook_second_listing(reader, lambda: (write(frame[len(frame) // 2 :]),
                                               writer.append(_batch(30))))
        items = list(reader.read())
    finally:
        reader.close()
        writer.close()
    assert len(list(log_dir.glob("*.wlog"))) == 2
    assert [(type(i).__name__, i.first, i.next) for i in items] == [
        ("Batch", 0, 15), ("Batch", 15, 30), ("Batch", 30, 45)
    ]
