"""Crash safety of the local log: writer processes SIGKILLed at random moments, and torn tails.

Each round starts ``writer_proc.py crash`` on a log, reads its ``TRY``/``ACK`` lines, kills it
with SIGKILL at a random point, and checks the log from scratch; the next round restarts a
writer on the same log (which must truncate any torn tail the last one left). Some rounds also
append a random prefix of a valid frame to the newest segment, as a crash in mid-``write()``
would. Set ``WANTEL_CRASH_SEED`` to replay a seed printed by a failure (kill moments still
depend on scheduling, so a replay is likely, not certain, to hit the same case).
"""

from __future__ import annotations

import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from telemetry.codec import SCHEMA_FINGERPRINT, encode_many
from telemetry.log import Batch, LocalLog, Quarantined, ReadItem, framing
from telemetry.log.local import segment_name

from . import writer_proc as wp

JOB = "job-crash"
LINE_TIMEOUT = 30.0  # generous: a deadline for a stuck child, never a latency expectation

#: (segment_bytes, min_batch, max_batch, fsync) per log; small segments make rotation frequent.
CONFIGS = [
    (64 << 20, 1, 300, "always"),
    (64 << 10, 1, 300, "always"),
    (64 << 10, 1, 20, "always"),
    (16 << 10, 1, 60, "never"),
    (64 << 10, 100, 300, "batch"),
]


@dataclass
class History:
    """What every writer run on one log tried to append and saw acknowledged."""

    tries: dict[str, set[tuple[int, int]]] = field(default_factory=lambda: defaultdict(set))
    last_try: dict[str, tuple[int, int]] = field(default_factory=dict)
    acks: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    torn_injected: int = 0


def seed_of_run() -> int:
    """The seed: ``WANTEL_CRASH_SEED`` if set, else a fresh one (printed on failure)."""
    env = os.environ.get("WANTEL_CRASH_SEED")
    return int(env) if env else random.SystemRandom().randrange(2**32)


def frames_on_disk(log_dir: Path) -> tuple[list[tuple[int, int, list[int]]], int]:
    """Independent of the reader: per segment (base, tail_bytes, frame firsts), and the end.

    Walks each segment's frames by header; ``tail_bytes`` is what follows the last complete,
    CRC-valid frame. Returns the list and the position after the last frame.
    """
    out = []
    end = 0
    names = sorted(p for p in os.listdir(log_dir) if p.endswith(".wlog"))
    for name in names:
        data = (log_dir / name).read_bytes()
        offset, firsts = 0, []
        while True:
            header = framing.parse_header(data, offset)
            if header is None or offset + header.frame_len > len(data):
                break
            body = data[offset + framing.HEADER_SIZE : offset + header.frame_len]
            if not framing.body_is_intact(header, body):
                break
            firsts.append(header.first)
            end = header.end_position
            offset += header.frame_len
        out.append((int(name.removesuffix(".wlog")), len(data) - offset, firsts))
    return out, end


def read_everything(log_dir: Path) -> tuple[list[ReadItem], int | None]:
    """What a fresh reader of the log sees, and its ``last_position()``."""
    log = LocalLog(log_dir, create=False)
    try:
        return list(log.read()), log.last_position()
    finally:
        log.close()


def verify(log_dir: Path, history: History, context: str) -> int:
    """Check every crash invariant on the log as it is now; the number of events stored."""
    items, last = read_everything(log_dir)
    quarantined = [item for item in items if isinstance(item, Quarantined)]
    assert not quarantined, f"{context}: reader quarantined {quarantined}"
    position, events = 0, []
    for batch in items:
        assert isinstance(batch, Batch)
        assert batch.first == position, f"{context}: batch at {batch.first}, expected {position}"
        assert batch.events, f"{context}: empty batch at {batch.first}"
        position = batch.next
        events.extend(batch.events)
    segments, end = frames_on_disk(log_dir)
    assert end == position, f"{context}: frames on disk end at {end}, reader at {position}"
    # A read may hand several frames over as one batch; the frames on disk say where each
    # append's records are. Each frame holds exactly one batch some writer tried, never a part.
    firsts = [first for _, _, segment_firsts in segments for first in segment_firsts]
    seqs, stored = [], defaultdict(list)
    ends = [*firsts[1:], end] if firsts else []  # a writer killed before its first frame
    for first, after in zip(firsts, ends, strict=True):
        frame = events[first:after]
        run = frame[0].worker
        assert run is not None
        span = (frame[0].seq, frame[-1].seq)
        assert span in history.tries[run], f"{context}: {run} never tried {span}"
        for event in frame:
            assert event == wp.step_event(JOB, event.seq, run), f"{context}: bad {event}"
        seqs.extend(event.seq for event in frame)
        stored[run].append(span)
    assert len(seqs) == len(events), f"{context}: the reader saw records no frame holds"
    assert seqs == list(range(len(seqs))), (
        f"{context}: seq is not a gap-free prefix: {_first_break(seqs)}"
    )
    assert last == (position - 1 if position else None), f"{context}: last_position {last}"
    for run, acked in history.acks.items():
        stored_lasts = [span[1] for span in stored[run]]
        # Everything acknowledged is there, plus at most the one batch in flight at the kill.
        assert stored_lasts[: len(acked)] == acked, (
            f"{context}: {run} acknowledged {acked}, the log holds {stored_lasts}"
        )
        extra = stored[run][len(acked):]
        assert extra in ([], [history.last_try.get(run)]), (
            f"{context}: {run} has unacknowledged batches {extra}"
        )
    for index, (base, tail, firsts) in enumerate(segments):
        if firsts:
            assert firsts[0] == base, f"{context}: segment {base} starts at {firsts[0]}"
        if index < len(segments) - 1:
            assert tail == 0, f"{context}: {tail} stray bytes in closed segment {base}"
    return len(seqs)


def _first_break(seqs: list[int]) -> str:
    for index, seq in enumerate(seqs):
        if seq != index:
            return f"index {index} holds seq {seq} (around: {seqs[max(0, index - 3):index + 3]})"
    return "ok"


def inject_torn_tail(log_dir: Path, rng: random.Random, next_position: int) -> bool:
    """Append a strict prefix of a valid frame to the newest segment, if its tail is clean."""
    segments, _ = frames_on_disk(log_dir)
    if not segments or segments[-1][1] != 0:
        return False  # no segment yet, or a real torn tail is already there
    events = [wp.step_event(JOB, 10**9 + i, "run-torn") for i in range(rng.randint(1, 50))]
    body = framing.encode_body(encode_many(events))
    frame = framing.encode_header(body, len(events), next_position, SCHEMA_FINGERPRINT) + body
    cut = rng.choice([1, framing.HEADER_SIZE - 1, framing.HEADER_SIZE,
                      rng.randint(1, len(frame) - 1), len(frame) - 1])
    with open(log_dir / segment_name(segments[-1][0]), "ab") as segment:
        segment.write(frame[:cut])
    return True


def crash_round(log_dir: Path, config: tuple[int, int, int, str], run: int, *,
                rng: random.Random, history: History, next_seq: int, context: str) -> None:
    """Start a writer on the log at ``next_seq``, kill it at a random moment, record its lines."""
    segment_bytes, min_batch, max_batch, fsync = config
    child = wp.Child(
        "crash", log_dir, JOB, "--start-seq", next_seq, "--min-batch", min_batch,
        "--max-batch", max_batch, "--fsync", fsync, "--segment-bytes", segment_bytes,
        "--seed", rng.randrange(2**32), "--run", run,
    )
    name = f"run-{run}"
    trigger, count = rng.choice(["ACK", "TRY"]), rng.randint(1, 12)
    jitter = rng.choice([0.0, 0.0, rng.random() * 0.002])
    try:
        deadline = time.monotonic() + LINE_TIMEOUT
        seen = 0
        while seen < count:
            text = child.line(deadline)
            assert text is not None, f"{context}: writer exited early: {child.stderr()}"
            _record(history, name, text)
            seen += text.startswith(trigger)
        if jitter:
            time.sleep(jitter)  # moves the kill moment around; nothing waits on it
        child.kill()
        for text in child.drain(time.monotonic() + LINE_TIMEOUT):
            _record(history, name, text)
    finally:
        child.close()


def _record(history: History, run: str, text: str) -> None:
    kind, *numbers = text.split()
    if kind == "TRY":
        span = (int(numbers[0]), int(numbers[1]))
        history.tries[run].add(span)
        history.last_try[run] = span
    elif kind == "ACK":
        history.acks[run].append(int(numbers[0]))


def run_crash_rounds(tmp_path: Path, logs: int, kills_per_log: int) -> int:
    """``logs`` logs × ``kills_per_log`` kills with checks after each; the number of kills."""
    seed = seed_of_run()
    rng = random.Random(seed)
    kills = acked = torn = 0
    for log_index in range(logs):
        config = CONFIGS[log_index % len(CONFIGS)]
        log_dir = tmp_path / f"log-{log_index}"
        LocalLog(log_dir, segment_bytes=config[0]).close()
        history = History()
        stored = 0
        for run in range(kills_per_log):
            context = (f"seed={seed} (WANTEL_CRASH_SEED) log={log_index} config={config} "
                       f"run={run}")
            crash_round(log_dir, config, run, rng=rng, history=history, next_seq=stored,
                        context=context)
            kills += 1
            stored = verify(log_dir, history, context)
            if rng.random() < 0.3 and inject_torn_tail(log_dir, rng, stored):
                history.torn_injected += 1
                assert verify(log_dir, history, context + " (after torn tail)") == stored
        acked += sum(len(a) for a in history.acks.values())
        torn += history.torn_injected
    assert acked > 0 and torn > 0, f"seed={seed}: rounds exercised nothing ({acked}, {torn})"
    print(f"seed={seed}: {kills} kills, {acked} batches acknowledged, {torn} torn tails injected")
    return kills


def test_sigkilled_writers_lose_no_acknowledged_batch_and_leave_no_partial_record(tmp_path):
    """60 SIGKILLs at random moments: acked batches survive, nothing partial or gapped is read."""
    kills = run_crash_rounds(tmp_path, logs=10, kills_per_log=6)
    assert kills >= 50


@pytest.mark.slow
def test_sigkilled_writers_many_rounds(tmp_path):
    """500 SIGKILLs at random moments keep every crash invariant of the default test."""
    kills = run_crash_rounds(tmp_path, logs=50, kills_per_log=10)
    assert kills >= 500


def _append_frames(log_dir: Path, sizes: list[int], segment_bytes: int = 64 << 20) -> None:
    """Append one batch of consecutive seqs per size."""
    log = LocalLog(log_dir, segment_bytes=segment_bytes)
    seq = 0
    try:
        for size in sizes:
            log.append([wp.step_event(JOB, s, "run-0") for s in range(seq, seq + size)])
            seq += size
    finally:
        log.close()


def _read_all(log_dir: Path) -> tuple[list[int], list[Quarantined], int | None]:
    """The seqs a fresh reader sees, its quarantine notices, and ``last_position()``."""
    items, last = read_everything(log_dir)
    seqs = [e.seq for item in items if isinstance(item, Batch) for e in item.events]
    return seqs, [i for i in items if isinstance(i, Quarantined)], last


def _append_after(log_dir: Path, first_seq: int, count: int) -> range:
    """A new writer process's view: open the log, append one batch, close."""
    writer = LocalLog(log_dir)
    try:
        return writer.append([wp.step_event(JOB, s, "run-1")
                              for s in range(first_seq, first_seq + count)])
    finally:
        writer.close()


@pytest.mark.parametrize("cut", ["1 byte", "half header", "header only", "mid body", "last byte"])
def test_torn_tail_is_invisible_to_readers_and_truncated_by_next_writer(tmp_path, cut):
    """A frame cut short at the end is never read, never quarantined; the next writer cuts it."""
    log_dir = tmp_path / "log"
    _append_frames(log_dir, [3, 5, 7])
    segment = log_dir / segment_name(0)
    (_, tail, firsts), = frames_on_disk(log_dir)[0]
    assert firsts == [0, 3, 8] and tail == 0
    frame = _frame(range(15, 24), first=15)  # a writer died while writing this one
    frame_len = len(frame)
    offset = {
        "1 byte": 1,
        "half header": framing.HEADER_SIZE // 2,
        "header only": framing.HEADER_SIZE,
        "mid body": framing.HEADER_SIZE + (frame_len - framing.HEADER_SIZE) // 2,
        "last byte": frame_len - 1,
    }[cut]
    with open(segment, "ab") as file:
        file.write(frame[:offset])

    seqs, quarantined, last = _read_all(log_dir)
    assert seqs == list(range(15)), "a reader must stop before the torn frame"
    assert quarantined == []
    assert last == 14

    follower = LocalLog(log_dir, create=False)
    try:
        followed = list(follower.follow(0, idle_timeout=0.05))
    finally:
        follower.close()
    assert {type(item) for item in followed} == {Batch}
    assert [e.seq for item in followed for e in item.events] == list(range(15))

    assert _append_after(log_dir, 15, 4) == range(15, 19)
    (_, tail, firsts), = frames_on_disk(log_dir)[0]
    assert firsts == [0, 3, 8, 15] and tail == 0, "torn bytes were left behind"
    seqs, quarantined, last = _read_all(log_dir)
    assert seqs == list(range(19))
    assert quarantined == []
    assert last == 18


def _frame(seqs: range, *, first: int) -> bytes:
    """A whole frame of step events ``seqs`` at position ``first``."""
    events = [wp.step_event(JOB, seq, "run-0") for seq in seqs]
    body = framing.encode_body(encode_many(events))
    return framing.encode_header(body, len(events), first, SCHEMA_FINGERPRINT) + body


def _frame_len_at_end(data: bytes) -> int:
    """The length of the last frame of a segment with no torn tail."""
    offset, length = 0, 0
    while offset < len(data):
        header = framing.parse_header(data, offset)
        assert header is not None
        offset, length = offset + header.frame_len, header.frame_len
    return length


def test_torn_tail_after_rotation_is_truncated_in_the_newest_segment(tmp_path):
    """With small segments, a torn frame in the newest segment is cut there; older ones stay."""
    log_dir = tmp_path / "log"
    _append_frames(log_dir, [10] * 21, segment_bytes=4096)
    segments, end = frames_on_disk(log_dir)
    assert len(segments) >= 3 and end == 210
    torn_first = 210
    frame = _frame(range(torn_first, torn_first + 10), first=torn_first)
    with open(log_dir / segment_name(segments[-1][0]), "ab") as newest:  # died mid-write
        newest.write(frame[: len(frame) // 2])

    seqs, quarantined, last = _read_all(log_dir)
    assert seqs == list(range(torn_first))
    assert quarantined == []
    assert last == torn_first - 1

    assert _append_after(log_dir, torn_first, 5) == range(torn_first, torn_first + 5)
    seqs, quarantined, _ = _read_all(log_dir)
    assert seqs == list(range(torn_first + 5))
    assert quarantined == []
    after, _ = frames_on_disk(log_dir)
    assert [base for base, _, _ in after] == [base for base, _, _ in segments]
    assert after[-1][1] == 0 and after[-1][2][-1] == torn_first
