"""The emitter when its log cannot be written: file-size limit, full disk, permissions, rmdir.

The tests run as root, where chmod alone stops nothing, so each failure is one root cannot
override: ``RLIMIT_FSIZE`` (with ``SIGXFSZ`` ignored, writes fail with ``EFBIG``), a 256 KiB
tmpfs filled up (``ENOSPC``; skipped where ``mount`` is not allowed), a read-only directory for a
child running as ``nobody`` (``EACCES``), and the log directory removed under a running emitter.
Each child (``writer_proc.py emit-*``) emits 100,000 events into a 256-event queue, reports its
stats, then the problem is taken away and it must deliver what it kept.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from telemetry.engine import ProjectionEngine
from telemetry.events import EventsDropped, StageStarted
from telemetry.log import Batch, Gap, LocalLog, Quarantined
from telemetry.log.local import segment_name
from telemetry.projections.jobs import JobsProjection

from . import writer_proc as wp

DEADLINE = 120.0  # for a stuck child, never a latency expectation
EMITS = 100_000
CAPACITY = 256
APPEND_FAILED = "telemetry log append failed"


def run_until_stalled(child: Any) -> dict[str, Any]:
    """``emit()`` returned 100,000 times, then the append failure was counted: the stats."""
    deadline = time.monotonic() + DEADLINE
    child.expect("EMITTED", deadline)
    return json.loads(child.expect("STALLED", deadline))


def finish(child: Any) -> dict[str, Any]:
    """The final stats; the child exited 0."""
    final = json.loads(child.expect("FINAL", time.monotonic() + DEADLINE))
    assert child.finish(DEADLINE) == 0, child.stderr()
    return final


def check_stalled(stalled: dict[str, Any], kind: str) -> None:
    """Errors are counted by kind and the full queue dropped events, by reason."""
    assert set(stalled["errors"]) == {kind}, stalled
    assert stalled["errors"][kind] >= 1
    full = {k: v for k, v in stalled["dropped"].items() if k.startswith("queue_full_")}
    assert full and all(v > 0 for v in full.values()), stalled
    # Bounded: the queue, one drained batch, and the drop report and heartbeat that ride along.
    assert stalled["queued"] + stalled["in_flight"] <= 2 * CAPACITY + 2, "memory is not bounded"


def check_logged_once(stderr: str, kinds: list[str]) -> None:
    """The append failure was logged exactly once per kind, and nothing was lost at shutdown."""
    lines = [line for line in stderr.splitlines() if APPEND_FAILED in line]
    assert len(lines) == len(kinds), stderr
    for line, kind in zip(lines, kinds, strict=True):
        assert f"error={kind}" in line, line
    assert "lost at shutdown" not in stderr


def check_delivered(log_dir: Path, final: dict[str, Any], *, removed_with_dir: int = 0,
                    gaps: tuple[Gap, ...] = ()) -> None:
    """Everything the emitter kept arrived once, in order, seq gap-free; drops were reported.

    ``removed_with_dir`` events were appended before the test removed the log directory: they
    went with it, so the surviving stream of ``job-emit`` starts at that seq. ``gaps``: the
    holes the test made (segments it deleted), reported as such.
    """
    assert final["flushed"] is True, final
    assert final["queued"] == 0 and final["in_flight"] == 0, final
    assert "log_unavailable" not in final["dropped"], final
    log = LocalLog(log_dir, create=False)
    try:
        items = list(log.read())
    finally:
        log.close()
    assert list(gaps) == [item for item in items if isinstance(item, Quarantined)]
    events = [e for item in items if isinstance(item, Batch) for e in item.events]
    assert len(events) == final["appended"] - removed_with_dir
    by_job: dict[str, list[Any]] = defaultdict(list)
    for event in events:
        by_job[event.job].append(event)
    for job, stream in by_job.items():
        first = removed_with_dir if job == "job-emit" else 0
        expected = list(range(first, first + len(stream)))
        assert [e.seq for e in stream] == expected, f"{job}: gap or duplicate"
    emitted = by_job["job-emit"]
    assert emitted, "none of the retried events arrived"
    stamps = [e.ts for e in emitted]
    assert stamps == sorted(set(stamps)), "emission order lost, or an event stored twice"
    reports = [e for e in by_job["worker/w-fail"] if isinstance(e, EventsDropped)]
    assert reports
    assert reports[-1].counts == final["dropped"]
    engine = ProjectionEngine([JobsProjection()])
    assert engine.apply_items(items) == len(events)
    assert engine.health.duplicates == 0
    assert sum(engine.health.events_by_type.values()) == len(events)
    assert "job-emit" in engine.states["jobs"].jobs


def test_file_size_limit_counts_efbig_and_delivers_once_raised(tmp_path):
    """Under RLIMIT_FSIZE emit() returns, EFBIG is counted and logged once; raised: delivered."""
    child = wp.Child("emit-fsize", tmp_path / "log", "--emits", EMITS, "--capacity", CAPACITY)
    try:
        check_stalled(run_until_stalled(child), "EFBIG")
        final = finish(child)
    finally:
        child.close()
    check_logged_once(child.stderr(), ["EFBIG"])
    check_delivered(tmp_path / "log", final)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, unmounted afterwards; skips where mounting is not permitted."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mountpoint)],
                           capture_output=True, text=True, check=False)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the file system is full; returns it (delete it to free the space)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as out:
        chunk = b"\0" * 4096
        try:
            while True:
                out.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def test_full_tmpfs_counts_enospc_and_delivers_once_space_is_freed(small_tmpfs):
    """On a full disk emit() returns, ENOSPC is counted and logged once; freed: delivered."""
    log_dir = small_tmpfs / "log"
    LocalLog(log_dir).close()
    filler = fill(small_tmpfs)
    child = wp.Child("emit-wait", log_dir, "--emits", EMITS, "--capacity", CAPACITY)
    try:
        check_stalled(run_until_stalled(child), "ENOSPC")
        filler.unlink()
        child.send("go")
        final = finish(child)
    finally:
        child.close()
    check_logged_once(child.stderr(), ["ENOSPC"])
    check_delivered(log_dir, final)


@contextlib.contextmanager
def nobody_dir() -> Iterator[Path]:
    """A directory in /tmp (which ``nobody`` can reach; pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="wantel-eacces-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


SETPRIV = shutil.which("setpriv")


def reachable_by_anyone(path: Path) -> bool:
    """Whether a user with no rights of its own (``nobody``) can read ``path``: every directory
    above it searchable by others and the file readable by others."""
    path = path.resolve()
    if not path.stat().st_mode & stat.S_IROTH:
        return False
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in path.parents)


@pytest.mark.skipif(os.geteuid() != 0 or SETPRIV is None,
                    reason="needs root and setpriv(1) to run the child as nobody")
@pytest.mark.skipif(not reachable_by_anyone(Path(wp.__file__)),
                    reason="the checkout is not readable by nobody (cloned into a 0700 "
                           "directory such as mktemp -d's?)")
def test_read_only_directory_counts_eacces_and_delivers_once_writable():
    """A child without write access to the log directory counts EACCES; chmod back: delivered."""
    nobody = 65534
    with nobody_dir() as parent:
        log_dir = parent / "log"
        log = LocalLog(log_dir)
        log.append([StageStarted(job="job-before", seq=0, ts=1, stage="load")])
        log.close()
        for segment in log_dir.glob("*.wlog"):
            segment.unlink()  # the child must create the active segment: denied
        for path in [log_dir, *log_dir.iterdir()]:
            os.chown(path, nobody, nobody)
        log_dir.chmod(0o555)
        assert SETPRIV is not None
        as_nobody = (SETPRIV, f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups")
        child = wp.Child("emit-wait", log_dir, "--emits", EMITS, "--capacity", CAPACITY,
                         prefix=as_nobody)
        try:
            check_stalled(run_until_stalled(child), "EACCES")
            log_dir.chmod(0o755)
            child.send("go")
            final = finish(child)
        finally:
            child.close()
        check_logged_once(child.stderr(), ["EACCES"])
        deleted = Gap(0, 1, 1, segment_name(1), "no segment holds these positions (a deleted "
                      "or emptied segment)")
        check_delivered(log_dir, final, gaps=(deleted,))


def start_rmdir_child(log_dir: Path, *extra: object) -> Any:
    """An emitter that appended once; then its log directory is removed under it."""
    child = wp.Child("emit-rmdir", log_dir, "--emits", EMITS, "--capacity", CAPACITY, *extra)
    child.expect("STARTED", time.monotonic() + DEADLINE)
    shutil.rmtree(log_dir)
    child.send("go")
    return child


def test_removed_log_directory_with_rotation_counts_enoent_and_exits_cleanly(tmp_path):
    """Log dir removed (segment full): emit() returns, ENOENT counted once, losses counted."""
    log_dir = tmp_path / "log"
    child = start_rmdir_child(log_dir, "--segment-bytes", 256, "--expect-error",
                              "--flush-timeout", 0.5)
    try:
        stalled = run_until_stalled(child)
        check_stalled(stalled, "ENOENT")
        child.send("stay removed")
        final = finish(child)
    finally:
        child.close()
    assert final["flushed"] is False
    lost = final["queued"] + final["in_flight"]
    assert lost > 0
    assert final["dropped"]["log_unavailable"] == lost, "events lost at shutdown are counted"
    stderr = child.stderr()
    failures = [line for line in stderr.splitlines() if APPEND_FAILED in line]
    assert len(failures) == 1 and "error=ENOENT" in failures[0], stderr
    assert "lost at shutdown" in stderr
    assert not log_dir.exists()


def test_removed_log_directory_never_breaks_emit(tmp_path):
    """Log dir removed under a running emitter (one big segment): emit() returns, exit 0."""
    child = start_rmdir_child(tmp_path / "log", "--flush-timeout", 5)
    try:
        stalled = run_until_stalled(child)
        full = {k for k in stalled["dropped"] if k.startswith("queue_full_")}
        assert full, stalled
        child.send("stay removed")
        finish(child)
    finally:
        child.close()


@pytest.mark.parametrize("segment_bytes", [64 << 20, 256], ids=["one-segment", "rotating"])
def test_removed_then_recreated_log_directory_receives_retried_events(tmp_path, segment_bytes):
    """Events emitted while the log dir is gone arrive once it is recreated, seq gap-free."""
    log_dir = tmp_path / "log"
    child = start_rmdir_child(log_dir, "--segment-bytes", segment_bytes, "--flush-timeout", 5)
    try:
        stalled = run_until_stalled(child)
        LocalLog(log_dir, segment_bytes=segment_bytes).close()
        child.send("go")
        final = finish(child)
    finally:
        child.close()
    assert stalled["errors"], "writing into a removed directory must be an error, not a success"
    check_delivered(log_dir, final, removed_with_dir=1)


def test_emitter_survives_failing_stderr_and_delivers_once_the_limit_is_raised(tmp_path):
    """With stderr a file under the same size limit, the writer thread still retries."""
    with open(tmp_path / "stderr.txt", "wb") as stderr:
        child = wp.Child("emit-fsize", tmp_path / "log", "--emits", EMITS, "--capacity",
                         CAPACITY, "--flush-timeout", 5, stderr=stderr)
        try:
            check_stalled(run_until_stalled(child), "EFBIG")
            final = finish(child)
        finally:
            child.close()
    check_delivered(tmp_path / "log", final)
