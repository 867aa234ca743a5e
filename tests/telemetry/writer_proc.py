"""A writer process for the log crash, concurrency and emitter-failure tests.

Run by ``sys.executable`` with a mode as its first argument; it prints one line per milestone to
stdout (flushed at once, so a parent that kills it knows exactly what was acknowledged):

``crash LOG JOB --start-seq N --count C --min-batch A --max-batch B --fsync P --seed S --run R``
    Append ``C`` batches (0: until killed) of ``StepEnded`` events for ``JOB`` with consecutive
    ``seq`` from ``N``, each batch ``A``–``B`` events. Prints ``TRY <first_seq> <last_seq>``
    before each ``append()`` and ``ACK <last_seq>`` after it returns. The events' ``worker`` is
    ``run-R`` so the parent can tell which run wrote a batch.

``concurrent LOG JOB --events N --batch B --fsync P``
    Open the log, print ``READY``, wait for one line on stdin (so several writers start
    together), append ``N`` events in batches of ``B``, print ``DONE``.

``emit-fsize LOG --emits N --capacity C``
    An emitter under ``RLIMIT_FSIZE``: one event is appended, then the limit is lowered to the
    segment's size so every append fails with ``EFBIG``; ``N`` events are emitted
    (``EMITTED``), it waits for the failure to be counted (``STALLED <stats json>``), raises
    the limit back, flushes and prints ``FINAL <stats json>``.

``emit-wait LOG --emits N --capacity C``
    Like ``emit-fsize`` on an existing log the parent made unwritable: after ``STALLED`` it
    waits for a line on stdin (the parent made it writable again) before flushing.

``emit-rmdir LOG --emits N --capacity C [--expect-error]``
    Appends one event, prints ``STARTED`` and waits for a stdin line (the parent removes the log
    directory), emits (``EMITTED``), optionally waits for an error, prints ``STALLED``, waits
    for another line (the parent recreates the directory, or not), flushes, ``FINAL``.

Every mode logs through structlog to stderr, one line per message. The parent side is
:class:`Child`, which the test modules load from this file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from typing import Any

import structlog

from telemetry.emitter import Emitter
from telemetry.events import MemorySampled, StageEnded, StageStarted, StepEnded
from telemetry.log import LocalLog

#: ``ts`` of every event the tests write: fixed, so records are reproducible byte for byte.
TS = 1_700_000_000_000_000_000


def step_event(job: str, seq: int, worker: str) -> StepEnded:
    """The event a writer stores at ``seq``: its fields are derivable from ``seq`` alone."""
    return StepEnded(job=job, seq=seq, ts=TS + seq, worker=worker, step=seq, total_steps=seq + 1,
                     timestep=seq * 0.5, duration_s=0.001)


class Child:
    """Parent side: this script run as a subprocess, its stdout read line by line with deadlines.

    stderr is drained by a thread into memory, so structlog lines never fill a pipe and block
    the child, and no file of the child's (which a file-size limit would hit) is involved.
    """

    def __init__(self, *args: object, stderr: Any = subprocess.PIPE,
                 prefix: tuple[str, ...] = (), **popen: Any) -> None:
        self.args = [str(a) for a in args]
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, __file__, *self.args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, **popen,
        )
        assert self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()
        self._buf = b""
        self._eof = False
        self.lines: list[str] = []
        self._err: list[bytes] = []
        self._err_thread: threading.Thread | None = None
        if self.proc.stderr is not None:
            self._err_thread = threading.Thread(target=self._drain_stderr, daemon=True)
            self._err_thread.start()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        while chunk := self.proc.stderr.read1(1 << 16):
            self._err.append(chunk)

    def line(self, deadline: float) -> str | None:
        """The next stdout line, or ``None`` at end of output; TimeoutError past ``deadline``."""
        while b"\n" not in self._buf:
            if self._eof:
                return None  # an unfinished last line (killed mid-print) is not a line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no line from {self.args} in time; stderr: {self.stderr()}")
            ready, _, _ = select.select([self._fd], [], [], remaining)
            if ready:
                chunk = os.read(self._fd, 1 << 16)
                self._eof = not chunk
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\n", 1)
        text = raw.decode()
        self.lines.append(text)
        return text

    def expect(self, prefix: str, deadline: float) -> str:
        """The next line, which must start with ``prefix``; returns the rest of it."""
        text = self.line(deadline)
        if text is None or not text.startswith(prefix):
            raise AssertionError(f"expected {prefix!r} from {self.args}, got {text!r}; "
                                 f"exit {self.proc.poll()}; stderr: {self.stderr()}")
        return text[len(prefix):].strip()

    def send(self, text: str = "go") -> None:
        """One line to the child's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def drain(self, deadline: float) -> list[str]:
        """Every remaining stdout line, up to end of output."""
        rest = []
        while (text := self.line(deadline)) is not None:
            rest.append(text)
        return rest

    def kill(self) -> None:
        """SIGKILL, and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def finish(self, timeout: float) -> int:
        """Wait for exit; kill it if it does not exit in ``timeout``; the exit status."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def stderr(self) -> str:
        """What the child wrote to stderr so far (all of it, once it has exited)."""
        if self.proc.poll() is not None and self._err_thread is not None:
            self._err_thread.join(10)
        return b"".join(self._err).decode(errors="replace")

    def close(self) -> None:
        """Kill if still running; close the pipes."""
        self.kill()
        if self._err_thread is not None:
            self._err_thread.join(10)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def say(line: str) -> None:
    """One line to the parent, flushed at once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def crash(args: argparse.Namespace) -> None:
    """Append batches until ``--count`` is reached or the process is killed."""
    rng = random.Random(args.seed)
    log = LocalLog(args.log, fsync=args.fsync, segment_bytes=args.segment_bytes)
    worker = f"run-{args.run}"
    seq = args.start_seq
    done = 0
    while args.count == 0 or done < args.count:
        size = rng.randint(args.min_batch, args.max_batch)
        events = [step_event(args.job, s, worker) for s in range(seq, seq + size)]
        say(f"TRY {seq} {seq + size - 1}")
        log.append(events)
        say(f"ACK {seq + size - 1}")
        seq += size
        done += 1
    log.close()


def concurrent(args: argparse.Namespace) -> None:
    """Wait for the go line, then append ``--events`` events in batches of ``--batch``."""
    log = LocalLog(args.log, fsync=args.fsync, segment_bytes=args.segment_bytes)
    say("READY")
    sys.stdin.readline()
    for first in range(0, args.events, args.batch):
        last = min(first + args.batch, args.events)
        log.append([step_event(args.job, s, args.job) for s in range(first, last)])
    log.close()
    say("DONE")


def stats_json(emitter: Emitter) -> str:
    """The emitter's stats as one JSON line."""
    return json.dumps(asdict(emitter.stats()), sort_keys=True)


def emit_many(emitter: Emitter, count: int) -> None:
    """``count`` events of every priority, in a pattern: 1 stage pair in 8 steps, 2 samples."""
    job = "job-emit"
    for i in range(count):
        kind = i % 11
        if kind == 0:
            emitter.emit(StageStarted(job=job, ts=TS + i, stage="denoise"))
        elif kind == 1:
            emitter.emit(StageEnded(job=job, ts=TS + i, stage="denoise", duration_s=1.0))
        elif kind < 4:
            emitter.emit(MemorySampled(job=job, ts=TS + i, device="cpu", host_rss_bytes=i))
        else:
            emitter.emit(StepEnded(job=job, ts=TS + i, step=i, total_steps=count,
                                   timestep=float(i)))


def wait_for_error(emitter: Emitter, timeout: float = 60.0) -> None:
    """Poll until the emitter has counted at least one append error."""
    deadline = time.monotonic() + timeout
    while not emitter.stats().errors:
        if time.monotonic() > deadline:
            raise SystemExit(f"no append error counted within {timeout}s: {stats_json(emitter)}")
        time.sleep(0.01)


def make_emitter(log: LocalLog, capacity: int) -> Emitter:
    """A small-queue emitter that retries fast, so the tests do not wait on backoff."""
    return Emitter(log, worker="w-fail", capacity=capacity, max_batch=64, flush_interval=0.005,
                   retry_backoff=(0.005, 0.05), heartbeat_interval=None)


def emit_fsize(args: argparse.Namespace) -> None:
    """Append fails with EFBIG under a lowered RLIMIT_FSIZE, then succeeds once it is raised."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead of killing
    log = LocalLog(args.log, segment_bytes=1 << 30)
    emitter = make_emitter(log, args.capacity)
    emitter.emit(StageStarted(job="job-emit", ts=TS - 1, stage="load"))
    if not emitter.flush(30):
        raise SystemExit("first flush failed")
    (_, segment), = log.segments()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (segment.stat().st_size, hard))
    emit_many(emitter, args.emits)
    say("EMITTED")
    wait_for_error(emitter)
    say(f"STALLED {stats_json(emitter)}")
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    finish(emitter, log, args.flush_timeout)


def emit_wait(args: argparse.Namespace) -> None:
    """Appends fail (the parent filled the disk); after a stdin line they must succeed."""
    log = LocalLog(args.log, create=False)
    emitter = make_emitter(log, args.capacity)
    emit_many(emitter, args.emits)
    say("EMITTED")
    wait_for_error(emitter)
    say(f"STALLED {stats_json(emitter)}")
    sys.stdin.readline()
    finish(emitter, log, args.flush_timeout)


def emit_rmdir(args: argparse.Namespace) -> None:
    """The parent removes the directory after ``STARTED``; emit, then finish after stdin."""
    log = LocalLog(args.log, segment_bytes=args.segment_bytes)
    emitter = make_emitter(log, args.capacity)
    emitter.emit(StageStarted(job="job-emit", ts=TS - 1, stage="load"))
    if not emitter.flush(30):
        raise SystemExit("first flush failed")
    say("STARTED")
    sys.stdin.readline()
    emit_many(emitter, args.emits)
    say("EMITTED")
    if args.expect_error:
        wait_for_error(emitter)
    say(f"STALLED {stats_json(emitter)}")
    sys.stdin.readline()
    finish(emitter, log, args.flush_timeout)


def finish(emitter: Emitter, log: LocalLog, timeout: float) -> None:
    """Flush (the log should work again), close, report."""
    flushed = emitter.flush(timeout)
    emitter.close(timeout if flushed else 0.5)
    log.close()
    say(f"FINAL {json.dumps({'flushed': flushed, **asdict(emitter.stats())}, sort_keys=True)}")


def main(argv: list[str] | None = None) -> None:
    """Parse the mode and its arguments; run it."""
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["crash", "concurrent", "emit-fsize", "emit-wait",
                                         "emit-rmdir"])
    parser.add_argument("log")
    parser.add_argument("job", nargs="?", default="job")
    parser.add_argument("--start-seq", type=int, default=0)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--min-batch", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=300)
    parser.add_argument("--fsync", default="always")
    parser.add_argument("--segment-bytes", type=int, default=64 << 20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run", type=int, default=0)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--emits", type=int, default=100_000)
    parser.add_argument("--capacity", type=int, default=256)
    parser.add_argument("--expect-error", action="store_true")
    parser.add_argument("--flush-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    modes: dict[str, Any] = {"crash": crash, "concurrent": concurrent, "emit-fsize": emit_fsize,
                             "emit-wait": emit_wait, "emit-rmdir": emit_rmdir}
    modes[args.mode](args)


if __name__ == "__main__":
    main()
