"""The local backend: a directory of append-only, checksummed segment files.

Layout of a log directory::

    wantel-log.json                  format marker and the segment size every writer must use
    LOCK                             flock(2) target that serialises appends across processes
    positions                        the high-water mark: no position below it is given twice
    writers/                         one mark per open writer (emitter): a crashed one's stays
    prompt-key                       the secret key of prompt digests (mode 0600, made on first use)
    00000000000000000000.wlog        segments, named by the position of their first record
    00000000000000131072.wlog
    checkpoints/                     projection checkpoints (see telemetry.engine)

Writers. Each append encodes its records outside any lock, then takes an exclusive ``flock`` on
``LOCK``, looks at the active segment's size, validates whatever other processes appended since
it last looked (truncating a frame torn by a writer that died mid-write), writes one frame with a
single ``write()`` and, under the default ``always`` policy, ``fdatasync``\\ s before releasing
the lock. So several processes can share one log with no interleaved bytes, an acknowledged
batch survives a crash, and positions stay totally ordered. A segment whose size has reached
``segment_bytes`` is closed: the next writer to see that starts a new one, so no process can
append to a segment another has rotated away from.

Positions are never given twice. ``positions`` holds the log's high-water mark — the end of
the last frame written (updated after each append, in the page cache: exact after a process
crash) — and a *reservation*, made durable (``fdatasync``) before any frame goes past it, each
time :data:`RESERVE_AHEAD` positions further, with the machine's boot id. A writer whose log
ends before the mark (a truncated, emptied or deleted segment; or, after a reboot, before the
reservation: a power cut may have taken unsynced frames readers had seen) starts a new segment
at the mark, so a reader that saw the lost positions never sees them reused, and every reader
sees the hole as a :class:`~telemetry.log.base.Gap`. A clean :meth:`LocalLog.close` lowers the
reservation to the mark, so a reboot after it costs no gap.

Readers take no lock. They only ever advance past a frame whose header and body check out, wait
at a frame cut short at the end of the newest segment (a writer may still be writing it), and
quarantine — counting and reporting, never raising — damage anywhere else.

Only a directory whose ``wantel-log.json`` says so is a log: files named like segments in a
directory without it are someone else's, and the log refuses to start there rather than
"repair" (truncate) them. Segments are opened with ``O_NOFOLLOW`` and must be regular files,
so a symbolic link named like a segment is never written through. The metadata is validated
when the log is opened (a ``segment_bytes`` of 0 would rotate forever).
Consecutive healthy frames are decoded together (up to :data:`RUN_RECORDS` records in one
msgspec call): live emitters write a frame per flush, one or two events, and frame by frame the
per-frame work would cost more than the decoding.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import mmap
import os
import secrets
import struct
import threading
import time
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Generator, Iterator, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Final, NamedTuple

import structlog

from telemetry import accelerate
from telemetry.codec import (
    CURRENT_FINGERPRINTS,
    SCHEMA_FINGERPRINT,
    MalformedRecord,
    decode_current_batch,
    decode_one,
    encode_many,
    encode_many_json,
)
from telemetry.events import Event, JobQueued
from telemetry.files import REAL_OPS, FileOps
from telemetry.log import framing
from telemetry.log.base import (
    MAX_POSITION,
    Batch,
    BrokenLog,
    EventLog,
    Gap,
    LogError,
    LogNotFound,
    Position,
    Quarantined,
    ReadItem,
)

SEGMENT_SUFFIX: Final = ".wlog"
META_FILE: Final = "wantel-log.json"
LOCK_FILE: Final = "LOCK"
CHECKPOINT_DIR: Final = "checkpoints"
PROMPT_KEY_FILE: Final = "prompt-key"
POSITIONS_FILE: Final = "positions"
WRITERS_DIR: Final = "writers"
KNOWN_NAMES: Final = frozenset({META_FILE, LOCK_FILE, CHECKPOINT_DIR, PROMPT_KEY_FILE,
                                POSITIONS_FILE, WRITERS_DIR})
#: How far past the high-water mark a writer reserves positions (one ``fdatasync`` of the
#: small ``positions`` file per this many positions): the most a reader may see reported as a
#: gap after a power cut that left no events lost.
RESERVE_AHEAD: Final = 4096
DEFAULT_SEGMENT_BYTES: Final = 64 << 20
#: The range a log's ``segment_bytes`` must lie in (0 would rotate forever; more than 1 TiB
#: is a typo, not a plan).
MIN_SEGMENT_BYTES: Final = 256
MAX_SEGMENT_BYTES: Final = 1 << 40
PROMPT_KEY_BYTES: Final = 32
READ_CHUNK: Final = 1 << 20
RUN_RECORDS: Final = 1024  # the most records of small frames the reader decodes in one call
FORMAT_VERSION: Final = 1
#: Readers note where a frame starts about every this many bytes of a segment (a seek hint),
#: so a read from a position starts near it rather than at its segment's first byte.
SEEK_HINT_BYTES: Final = 16 << 10

_log = structlog.get_logger("wantel.log")


class FsyncPolicy(StrEnum):
    """When appends reach the disk.

    ``always`` (default): every append is on disk before it returns — an acknowledged batch is
    durable; the emitter batches events, so one fsync covers many (group commit).
    ``batch``: at most one fsync per ``batch_interval`` seconds and at close; a crash can lose
    that window. ``never``: left to the operating system.
    """

    ALWAYS = "always"
    BATCH = "batch"
    NEVER = "never"


def segment_name(base: Position) -> str:
    """The file name of the segment whose first record is at ``base``."""
    return f"{base:020d}{SEGMENT_SUFFIX}"


class LocalLog(EventLog):
    """An :class:`EventLog` in a local directory; safe for many processes and threads."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        fsync: FsyncPolicy | str = FsyncPolicy.ALWAYS,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        batch_interval: float = 0.1,
        compiled: bool | None = None,
        ops: FileOps = REAL_OPS,
    ) -> None:
        """``compiled``: whether readers check runs of frames in C (``telemetry.log._framing``)
        or with the Python reference; ``None`` is the process-wide default
        (:mod:`telemetry.accelerate`). ``ops``: the file operations every write, truncate,
        rename and sync goes through (the operating system's; a recorder in crash tests)."""
        self.path = Path(path)
        self.ops = ops
        #: The run check readers use, and what it is in words ("C", "Python (…)").
        self.scan_run: framing.ScanRun
        self.frame_checks: str
        self.scan_run, self.frame_checks = accelerate.choose(
            accelerate.FRAME_CHECKS, framing.scan_run_py, compiled)
        self.fsync = FsyncPolicy(fsync)
        self._batch_interval = batch_interval
        self._warned: set[str] = set()
        self._prompt_key: bytes | None = None
        if create:
            if not _segment_bytes_ok(segment_bytes):
                raise ValueError(f"segment_bytes must be an integer from {MIN_SEGMENT_BYTES} "
                                 f"to {MAX_SEGMENT_BYTES}, got {segment_bytes!r}")
            self._create(segment_bytes)
        self.segment_bytes = self._read_meta()
        self._thread_lock = threading.Lock()
        self._lock_path = str(self.path / LOCK_FILE)
        self._wpath = ""  # the active segment's path, as a string (stat-ed on every append)
        self._lock_fd: int | None = None
        self._wfd: int | None = None
        self._wbase: Position = 0
        self._wend = 0  # validated end of the active segment
        self._wnext: Position = 0  # position the next record will get
        self._last_fsync = time.monotonic()
        self._closed = False
        #: Seek hints, per segment base: positions and byte offsets of frame starts, both
        #: ascending (offsets appended first: a reader bounds itself by ``len(positions)``).
        #: 16 bytes per :data:`SEEK_HINT_BYTES` read: 1 MiB per GiB of log.
        self._hints: dict[Position, tuple[array[int], array[int]]] = {}
        self._boot: str | None = None  # the machine's boot id, read once
        self._pos_fd: int | None = None  # positions, open for writing (writers)
        self._pos_verified = False  # _pos_fd checked to be the file at its path
        self._pos_rfd: int | None = None  # positions, open for reading (readers)
        self._marks = _Marks(0, 0, "")  # positions as read under the lock by this writer
        self._marker: tuple[int, Path] | None = None  # this process's writer mark
        self._claimed: list[tuple[int, Path]] = []  # dead writers' marks, held until reported

    # -- opening ----------------------------------------------------------------------------

    def _create(self, segment_bytes: int) -> None:
        try:
            ops = self.ops
            ops.makedirs_durable(self.path)
            if (self.path / META_FILE).exists():
                return
            strays = sorted(name for name in os.listdir(self.path) if _segment_named(name))
            if strays:
                # Not ours: a writer would "repair" (truncate) them as torn segments.
                raise BrokenLog(
                    f"{self.path} is not a wantel log (no {META_FILE}) but holds files named "
                    f"like its segments ({strays[0]}{', …' if len(strays) > 1 else ''}); "
                    "refusing to write there: use an empty or new directory")
            tmp = self.path / f".{META_FILE}.{os.getpid()}.tmp"
            meta = {"format": "wantel-log", "version": FORMAT_VERSION,
                    "segment_bytes": segment_bytes}
            fd = ops.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            try:
                ops.write_all(fd, (json.dumps(meta) + "\n").encode())
                ops.fsync(fd)
            finally:
                ops.close(fd)
            # link() fails if another process created the file first; theirs wins.
            with contextlib.suppress(FileExistsError):
                ops.link(tmp, self.path / META_FILE)
            ops.unlink(tmp)
            ops.fsync_dir(self.path)
        except OSError as exc:
            raise LogError(f"cannot create a log at {self.path}: {exc.strerror or exc}") from exc

    def _read_meta(self) -> int:
        meta_path = self.path / META_FILE
        if not self.path.is_dir():
            raise LogNotFound(f"no event log at {self.path} (directory does not exist)")
        try:
            text = meta_path.read_bytes()
        except FileNotFoundError:
            raise LogNotFound(
                f"no event log at {self.path} (no {META_FILE}: not a wantel log directory)"
            ) from None
        except OSError as exc:
            raise BrokenLog(f"cannot read {meta_path}: {exc.strerror or exc}") from exc
        return validate_meta(text, meta_path)

    def segments(self) -> list[tuple[Position, Path]]:
        """Segment files in position order; unknown files are ignored with one warning each.

        A name that looks like a segment but is not a regular file (a directory, a symbolic
        link) is a broken log (:class:`BrokenLog`): it is never read or written through.
        """
        try:
            entries = list(os.scandir(self.path))
        except OSError as exc:
            raise LogError(f"cannot list {self.path}: {exc.strerror or exc}") from exc
        found = []
        for entry in entries:
            name = entry.name
            if _segment_named(name):
                if not entry.is_file(follow_symlinks=False):
                    kind = "a symbolic link" if entry.is_symlink() else "not a regular file"
                    raise BrokenLog(f"{self.path / name} is {kind}: a segment must be a "
                                    "regular file (move it out of the log directory)")
                found.append((int(name[: -len(SEGMENT_SUFFIX)]), self.path / name))
            elif name not in KNOWN_NAMES and not name.startswith("."):
                self._warn_once(name)
        found.sort()
        return found

    def prompt_key(self) -> bytes:
        """The log's secret key for prompt digests: ``prompt-key`` in the log directory, 32
        random bytes, created with mode 0600 on first use (by whichever process gets there
        first; every process then reads the same key). Raises :class:`LogError` if it can be
        neither read nor created."""
        if self._prompt_key is None:
            self._prompt_key = _load_or_create_key(self.path / PROMPT_KEY_FILE, self.ops)
        return self._prompt_key

    def has_job(self, job: str) -> bool:
        """Whether ``job`` has begun here (see :meth:`EventLog.has_job`).

        A byte search of each segment for the stream's encoded ``job`` field (gigabytes per
        second), then a decode of only the segments where it was found, to confirm.
        """
        import msgspec

        needles = (b"\xa3job" + msgspec.msgpack.encode(job),
                   b'"job":' + msgspec.json.encode(job))
        segments = self.segments()
        for index, (base, path) in enumerate(segments):
            if not _file_contains(path, needles):
                continue
            end = segments[index + 1][0] if index + 1 < len(segments) else None
            for item in self.read(base):
                if isinstance(item, Quarantined):
                    continue
                if any(event.job == job and not isinstance(event, JobQueued)
                       for event in item.events):
                    return True
                if end is not None and item.next >= end:
                    break
        return False

    def _warn_once(self, name: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            _log.warning("ignoring unknown file in log directory", log=str(self.path), file=name)

    # -- writing ----------------------------------------------------------------------------

    def append(self, events: Sequence[Event]) -> range:
        """Write ``events`` as one frame; see the module docstring for the protocol."""
        if self._closed:
            raise LogError("append to a closed log")
        records, layout = _encode_records(events)  # outside the lock: other writers wait less
        with self._thread_lock, self._exclusive():
            return self._write_frame(records, layout)

    def append_new(self, events: Sequence[Event], since: Position) -> list[Event]:
        """:meth:`EventLog.append_new` with the check and the append under the log's lock
        (``flock`` on ``LOCK``): of several processes writing the same records, one does."""
        if self._closed:
            raise LogError("append to a closed log")
        with self._thread_lock, self._exclusive():
            return self._append_missing(events, since)

    def _append_unlocked(self, events: Sequence[Event]) -> range:
        """:meth:`append` for a caller holding its locks."""
        return self._write_frame(*_encode_records(events))

    def _write_frame(self, records: list[bytes], layout: int) -> range:
        """Write ``records`` as one frame (the caller holds the locks)."""
        body = framing.encode_body(records, layout) if records else b""
        self._sync_writer()
        first = self._wnext
        if not records:
            return range(first, first)
        assert self._wfd is not None
        frame = framing.encode_header(
            body, len(records), first, SCHEMA_FINGERPRINT, layout) + body
        end = first + len(records)
        try:
            self._reserve(end)
            self.ops.write_all(self._wfd, frame)
            self._fsync_after_write()
        except OSError as exc:
            self._undo_partial_write()
            raise LogError(f"cannot append to {self.path}: {exc.strerror or exc}") from exc
        self._wend += len(frame)
        self._wnext = end
        with contextlib.suppress(OSError):  # the reservation already covers ``end``
            self._note_end(end)
        return range(first, end)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the log's lock; a lock file that was removed or replaced is reopened first."""
        while True:
            if self._lock_fd is None:
                try:
                    self._lock_fd = self.ops.open(self.path / LOCK_FILE,
                                                  os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
                except OSError as exc:
                    raise LogError(
                        f"cannot open {self.path / LOCK_FILE}: {exc.strerror}") from exc
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            if _same_file(self._lock_path, self._lock_fd):
                break
            # Locking a file nobody else can open any more excludes no one: start over.
            self.ops.close(self._lock_fd)
            self._lock_fd = None
            self._close_writer_fd()
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _sync_writer(self) -> None:
        """Bring this writer's view of the active segment up to date (under the lock)."""
        if self._wfd is not None and not _same_file(self._wpath, self._wfd):
            # The segment (or the whole directory) was removed under us: appending to the
            # orphaned file would "succeed" and lose everything. Start again from what exists.
            self._close_writer_fd()
        if self._wfd is None:
            if not self.path.is_dir():
                missing = FileNotFoundError(errno.ENOENT, "log directory is gone", str(self.path))
                raise LogError(f"the log directory {self.path} no longer exists") from missing
            if not (self.path / META_FILE).exists():
                self._create(self.segment_bytes)  # emptied, or recreated empty: a fresh log
            segments = self.segments()
            if segments:
                self._open_segment(*segments[-1])
            else:
                self._new_segment(self._floor())
        assert self._wfd is not None
        size = os.fstat(self._wfd).st_size
        if size < self._wend:
            # Cut below what this writer wrote (by hand, or by a disk): its next position is
            # still right, but not at this offset of this segment.
            _log.warning("segment shrank under the writer", segment=self._wpath,
                         bytes=size, expected=self._wend)
            self._new_segment(self._wnext)
        elif size != self._wend:
            self._validate_tail(size)
        while self._wend >= self.segment_bytes:
            segments = self.segments()
            latest_base, latest_path = segments[-1] if segments else (self._wbase, None)
            if latest_base == self._wbase or latest_path is None:
                self._new_segment(self._wnext)
            else:
                self._open_segment(latest_base, latest_path)
                self._validate_tail(os.fstat(self._wfd).st_size)
        floor = self._floor()
        if self._wnext < floor:
            _log.warning("the log ends before its high-water mark: positions missing (a "
                         "truncated, emptied or deleted segment, or a power cut); the next "
                         "segment starts at the mark, so no position is given twice",
                         log=str(self.path), end=self._wnext, mark=floor,
                         missing=floor - self._wnext)
            self._new_segment(floor)

    # -- the high-water mark ------------------------------------------------------------------

    def _boot_id(self) -> str:
        if self._boot is None:
            self._boot = self.ops.boot_id()
        return self._boot

    def _floor(self) -> Position:
        """The first position this writer may give (under the lock): the high-water mark, or
        after a reboot the reservation (unsynced frames up to it may have been seen, then
        lost). Reads ``positions`` into ``self._marks``."""
        path = self.path / POSITIONS_FILE
        if (self._pos_fd is not None and not self._pos_verified
                and not _same_file(str(path), self._pos_fd)):
            self.ops.close(self._pos_fd)  # removed or replaced (a log recreated): start over
            self._pos_fd = None
        self._pos_verified = True  # until the writer reopens its segment
        if self._pos_fd is None:
            try:
                existed = path.exists()
                self._pos_fd = self.ops.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
                if not existed:
                    self.ops.fsync_dir(self.path)  # the reservation must be findable
            except OSError as exc:
                raise _open_error(path, exc) from exc
        marks = _read_marks(self._pos_fd)
        if marks is None:
            self._marks = _Marks(0, 0, "")
            return 0
        self._marks = marks
        if marks.boot != self._boot_id():
            return max(marks.end, marks.reserved)
        return marks.end

    def _reserve(self, end: Position) -> None:
        """Make positions up to ``end`` durable in the reservation before a frame uses them."""
        marks = self._marks
        if end <= marks.reserved and marks.boot == self._boot_id():
            return
        assert self._pos_fd is not None
        self._marks = _Marks(max(marks.end, self._wnext), end + RESERVE_AHEAD, self._boot_id())
        self.ops.pwrite(self._pos_fd, _pack_marks(self._marks), 0)
        self.ops.fdatasync(self._pos_fd)

    def _note_end(self, end: Position) -> None:
        """Raise the high-water mark to ``end`` (page cache only: the reservation covers it)."""
        assert self._pos_fd is not None
        self._marks = _Marks(end, self._marks.reserved, self._marks.boot)
        self.ops.pwrite(self._pos_fd, _pack_marks(self._marks), 0)

    def high_water(self) -> Position | None:
        """The position after the last frame any writer wrote (``None``: unknown, no
        ``positions`` file); after a reboot that followed an unclean stop, the reservation
        (the next writer starts there). A log whose frames end before it lost positions."""
        path = self.path / POSITIONS_FILE
        if self._pos_rfd is not None and not _same_file(str(path), self._pos_rfd):
            os.close(self._pos_rfd)
            self._pos_rfd = None
        if self._pos_rfd is None:
            try:
                self._pos_rfd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                return None
        marks = _read_marks(self._pos_rfd)
        if marks is None:
            return None
        if marks.boot != self._boot_id():
            # The machine restarted since a writer that did not close: it may have written
            # (and readers seen) up to its reservation, which its next writer will skip.
            return max(marks.end, marks.reserved)
        return marks.end

    # -- writer marks ---------------------------------------------------------------------------

    def open_writer(self, worker: str) -> list[str]:
        """Leave a mark in ``writers/`` for as long as this writer is open (a file it holds
        locked with ``flock``), and claim the marks of writers that died with theirs: returns their
        worker names. See :meth:`EventLog.open_writer`."""
        directory = self.path / WRITERS_DIR
        self.ops.makedirs_durable(directory)
        crashed = []
        held = {path for _, path in self._claimed}
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            path = Path(entry.path)
            if not entry.name.endswith(".mark") or path in held or (
                    self._marker is not None and path == self._marker[1]):
                continue
            claimed = _claim_mark(path)
            if claimed is not None:
                self._claimed.append((claimed[0], path))
                crashed.append(claimed[1])
        if self._marker is None:
            path = directory / f"{os.getpid()}-{secrets.token_hex(4)}.mark"
            fd = self.ops.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)  # held until close: a live writer's mark is locked
            self.ops.write_all(fd, worker.encode("utf-8", "replace")[:1024])
            self.ops.fsync(fd)
            self.ops.fsync_dir(directory)
            self._marker = (fd, path)
        return crashed

    def forget_crashed(self) -> None:
        """Remove the dead writers' marks :meth:`open_writer` claimed (they are reported)."""
        claimed, self._claimed = self._claimed, []
        for fd, path in claimed:
            with contextlib.suppress(OSError):
                self.ops.unlink(path)
            with contextlib.suppress(OSError):
                os.close(fd)
        if claimed:
            with contextlib.suppress(OSError):
                self.ops.fsync_dir(self.path / WRITERS_DIR)

    def close_writer(self) -> None:
        """Remove this writer's mark: it closed with nothing unwritten."""
        if self._marker is None:
            return
        fd, path = self._marker
        self._marker = None
        with contextlib.suppress(OSError):
            self.ops.unlink(path)
            self.ops.fsync_dir(path.parent)
        with contextlib.suppress(OSError):
            self.ops.close(fd)

    def _open_segment(self, base: Position, path: Path) -> None:
        self._close_writer_fd()
        try:
            self._wfd = self.ops.open(path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW)
        except OSError as exc:
            raise _open_error(path, exc) from exc
        self._wbase, self._wend, self._wnext, self._wpath = base, 0, base, str(path)

    def _new_segment(self, base: Position) -> None:
        self._close_writer_fd()
        path = self.path / segment_name(base)
        try:
            self._wfd = self.ops.open(
                path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            self.ops.fsync_dir(self.path)
        except OSError as exc:
            raise _open_error(path, exc, "create") from exc
        self._wbase, self._wend, self._wnext, self._wpath = base, 0, base, str(path)

    def _validate_tail(self, size: int) -> None:
        """Walk frames from the validated end to ``size``; truncate a torn last frame."""
        assert self._wfd is not None
        offset = self._wend
        while offset < size:
            header = framing.parse_header(os.pread(self._wfd, framing.HEADER_SIZE, offset))
            if header is not None and offset + header.frame_len <= size:
                self._wnext = max(self._wnext, header.end_position)
                offset += header.frame_len
                continue
            rest = os.pread(self._wfd, size - offset, offset)
            resume = framing.find_next_header(rest, 1)
            if resume == -1:
                _log.warning("truncating torn tail", segment=str(self._wbase),
                             offset=offset, bytes=size - offset)
                self.ops.ftruncate(self._wfd, offset)
                self.ops.fsync(self._wfd)
                size = offset
                break
            offset += resume  # damage in the middle: readers quarantine it
        self._wend = size

    def _fsync_after_write(self) -> None:
        assert self._wfd is not None
        if self.fsync is FsyncPolicy.ALWAYS:
            self.ops.fdatasync(self._wfd)
        elif self.fsync is FsyncPolicy.BATCH:
            now = time.monotonic()
            if now - self._last_fsync >= self._batch_interval:
                self.ops.fdatasync(self._wfd)
                self._last_fsync = now

    def _undo_partial_write(self) -> None:
        """After a failed write, cut the segment back so no torn frame stays behind."""
        if self._wfd is None:
            return
        with contextlib.suppress(OSError):
            self.ops.ftruncate(self._wfd, self._wend)

    def _close_writer_fd(self) -> None:
        self._pos_verified = False  # the segment changes: look at positions' path again
        if self._wfd is not None:
            with contextlib.suppress(OSError):
                if self.fsync is not FsyncPolicy.NEVER:
                    self.ops.fdatasync(self._wfd)
                self.ops.close(self._wfd)
            self._wfd = None

    # -- reading ----------------------------------------------------------------------------

    def read(self, start: Position = 0) -> Iterator[ReadItem]:
        """Everything stored at or after ``start`` now, in order, with damage quarantined."""
        cursor = _Cursor(self, min(start, MAX_POSITION))
        yield from cursor.poll()

    def read_near(self, start: Position, records: int = 32) -> Iterator[ReadItem]:
        """:meth:`read`, decoding at most ``records`` records at a time (not
        :data:`RUN_RECORDS`): for a reader that wants a few events at ``start`` and will stop
        soon after (a job's events, position by position)."""
        cursor = _Cursor(self, start, run_records=records)
        yield from cursor.poll()

    def cursor(self, start: Position = 0) -> _Cursor:
        """A reader that keeps its segment open and its byte offset between polls, so
        :meth:`~telemetry.log.base.EventLog.follow` sees new appends from any process.
        A ``start`` past :data:`~telemetry.log.base.MAX_POSITION` waits there: nothing
        will ever be stored beyond it."""
        return _Cursor(self, min(start, MAX_POSITION))

    def last_position(self) -> Position | None:
        """The last stored position: the end of the newest segment's last complete frame."""
        cursor = _Cursor(self, 0, from_newest_segment=True)
        for _ in cursor.poll(decode=False):
            pass
        cursor.close()
        return cursor.next - 1 if cursor.next > 0 else None

    def close(self) -> None:
        """Flush (per the fsync policy), lower the reservation to the high-water mark (a
        clean close: a reboot after it reports no gap), release file descriptors."""
        with self._thread_lock:
            if self._closed:
                return
            self._closed = True
            if (self._wfd is not None and self._pos_fd is not None
                    and self.fsync is not FsyncPolicy.NEVER):  # else unsynced frames may go
                with contextlib.suppress(OSError, LogError), self._exclusive():
                    self._close_writer_fd()
                    marks = _read_marks(self._pos_fd)
                    if marks is not None and marks.reserved > marks.end:
                        clean = _Marks(marks.end, marks.end, self._boot_id())
                        self.ops.pwrite(self._pos_fd, _pack_marks(clean), 0)
                        self.ops.fdatasync(self._pos_fd)
            self._close_writer_fd()
            if self._marker is not None:  # no clean close_writer(): the next writer reports it
                with contextlib.suppress(OSError):
                    self.ops.close(self._marker[0])
                self._marker = None
            for claimed_fd, _ in self._claimed:  # claimed, never reported: the next writer will
                with contextlib.suppress(OSError):
                    os.close(claimed_fd)
            self._claimed = []
            for fd in (self._pos_fd, self._pos_rfd):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._pos_fd = self._pos_rfd = None
            if self._lock_fd is not None:
                self.ops.close(self._lock_fd)
                self._lock_fd = None


class _Cursor:
    """A reader's place in the log: segment, byte offset and next position."""

    def __init__(self, log: LocalLog, start: Position, *, from_newest_segment: bool = False,
                 run_records: int | None = None, only: Path | None = None):
        """``only``: read just that segment (whose base is ``start``), reporting no gaps."""
        self.log = log
        self._run_records = run_records  # None: RUN_RECORDS
        self.skip_before = start
        self.base: Position | None = None
        self.fd: int | None = None
        self.offset = 0
        self.next: Position = start
        self.buf = b""
        self.buf_offset = 0
        self._from_newest = from_newest_segment
        self._only = only
        self._plain = from_newest_segment or only is not None  # no gap reports
        self._scan_run = log.scan_run
        # Frames before this offset in the segment are read one at a time (see _run_of_frames).
        self._one_by_one_until = 0
        self._size = 0  # the segment's size when the buffer was last filled: what is behind
        self._hinted = -SEEK_HINT_BYTES
        #: The position after the last record stored here that this cursor has passed (read,
        #: skipped or quarantined); below ``next`` when it started past the log's end.
        self.data_end: Position = 0
        self._gap_from: tuple[Position, str] | None = None  # a hole found opening a segment
        self._tail_reported: Position = 0  # the high-water mark a lost tail was reported to

    def _open_first_segment(self) -> bool:
        segments = self.log.segments()
        if not segments:
            return False
        if self._only is not None:
            base, path = self.skip_before, self._only
        elif self._from_newest:
            base, path = segments[-1]
        else:
            candidates = [s for s in segments if s[0] <= self.skip_before] or segments[:1]
            base, path = candidates[-1]
            if base == self.skip_before and len(candidates) > 1 and self._only is None:
                # Starting exactly at a segment (a checkpoint taken at the end): if the one
                # before ends short of it, positions this reader read are lost. Say so.
                end = _segment_end(self.log, *candidates[-2])
                if end < base:
                    self._gap_from = (end, "lost before this reader's start (it read them "
                                      "before the loss: a checkpoint past the end)")
        self._open(base, path)
        self._seek(base, None if self._from_newest else self.skip_before)
        return True

    def _seek(self, base: Position, before: Position | None) -> None:
        """Start at the last frame a reader noted in this segment at or before ``before``
        (``None``: the last one noted), if its header there still says so; else at 0."""
        hints = self.log._hints.get(base)
        if hints is None:
            return
        offsets, positions = hints
        count = len(positions)
        index = count if before is None else bisect_right(positions, before, 0, count)
        if index == 0:
            return
        offset, position = offsets[index - 1], positions[index - 1]
        assert self.fd is not None
        header = framing.parse_header(os.pread(self.fd, framing.HEADER_SIZE, offset))
        if header is not None and header.first == position:
            self.offset = offset
            self._hinted = offset

    def _hint(self, offset: int, first: Position) -> None:
        """Note that a healthy frame holding ``first`` first starts at ``offset``."""
        if offset < self._hinted + SEEK_HINT_BYTES or self.base is None:
            return
        self._hinted = offset
        hints = self.log._hints.get(self.base)
        if hints is None:
            hints = self.log._hints.setdefault(self.base, (array("q"), array("q")))
        offsets, positions = hints
        if positions and (positions[-1] >= first or offsets[-1] >= offset):
            return  # another reader noted past here already
        offsets.append(offset)
        positions.append(first)

    def _open(self, base: Position, path: Path) -> None:
        if self.fd is not None:
            os.close(self.fd)
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise _open_error(path, exc, "read") from exc
        self.base, self.offset, self.buf, self.buf_offset = base, 0, b"", 0
        self._one_by_one_until = 0  # was an offset in the previous segment
        self._hinted = -SEEK_HINT_BYTES  # the offset of the last hint noted or used here
        if base > self.next and not self._plain:
            # Positions no segment holds: a deleted or emptied one.
            self._gap_from = (self.next, "no segment holds these positions (a deleted or "
                              "emptied segment)")
        self.next = max(self.next, base)
        self.data_end = max(self.data_end, base)

    def _next_segment(self) -> tuple[Position, Path] | None:
        if self._only is not None:
            return None
        for base, path in self.log.segments():
            if self.base is not None and base > self.base:
                return base, path
        return None

    def _bytes(self, offset: int, length: int) -> memoryview:
        """``length`` bytes from ``offset`` (fewer at end of file), served from a 1 MiB buffer."""
        end = offset + length
        if not (self.buf_offset <= offset and end <= self.buf_offset + len(self.buf)):
            assert self.fd is not None
            self.buf = os.pread(self.fd, max(READ_CHUNK, length), offset)
            self.buf_offset = offset
            size = os.fstat(self.fd).st_size
            if self.buf and size - offset <= 4 * READ_CHUNK:  # near the end: count the next one
                size += self._later_bytes()
            self._size = size
        start = offset - self.buf_offset
        return memoryview(self.buf)[start : start + length]

    def _later_bytes(self) -> int:
        """The size of the next segment, if one exists (a reader far behind is behind by it)."""
        following = self._next_segment()
        if following is None:
            return 0
        try:
            return following[1].stat().st_size
        except OSError:
            return 0

    def poll(self, *, decode: bool = True) -> Iterator[ReadItem]:
        """Yield everything readable now; stop at the end, or at an unfinished frame."""
        try:
            yield from self._poll(decode)
        finally:
            self.buf = b""  # free the chunk between polls (followers idle most of the time)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def _poll(self, decode: bool) -> Iterator[ReadItem]:
        if self.fd is None and not self._open_first_segment():
            yield from self._lost_tail()
            return
        while True:
            if self._gap_from is not None:
                (first, reason), self._gap_from = self._gap_from, None
                yield self._gap(first, self.next, reason)
            head = self._bytes(self.offset, framing.HEADER_SIZE)  # a chunk from here, if need be
            if (decode and len(head) == framing.HEADER_SIZE
                    and self.offset >= self._one_by_one_until):
                batch = self._run_of_frames()
                if batch is not None:
                    yield batch
                    continue
            if len(head) == 0:
                following = self._next_segment()
                if following is None:
                    if (yield from self._lost_tail()):
                        continue
                    return
                # A newer segment exists, so this one is final — but it may have grown between
                # our last read and the rotation: look once more before moving on.
                self.buf = b""
                if len(self._bytes(self.offset, framing.HEADER_SIZE)) == 0:
                    self._open(*following)
                continue
            header = framing.parse_header(head)
            if header is None:
                if not (yield from self._resync("damaged frame header")):
                    return
                continue
            body = self._bytes(self.offset + framing.HEADER_SIZE, header.body_len)
            if len(body) < header.body_len:
                if not (yield from self._resync("frame cut short")):
                    return
                continue
            self._hint(self.offset, header.first)
            self.offset += header.frame_len
            if header.first > self.next and not self._plain:
                yield self._gap(self.next, header.first, "positions missing inside a segment")
            self.data_end = max(self.data_end, header.end_position)
            if header.end_position <= self.skip_before:
                self.next = max(self.next, header.end_position)
                continue
            yield from self._frame_items(header, body, decode)

    def _run_of_frames(self) -> Batch | None:
        """The healthy frames ahead in the buffer, decoded in one call (replay's fast path).

        ``None`` when the next frame needs the frame-by-frame path: it is not wholly in the
        buffer, damaged, old, partly before the start, or (rarely) its records do not decode
        — then every frame of the run is read one at a time, so only bad records are lost.
        The buffer holds at least the header at ``self.offset`` (the caller read it).
        """
        start = self.offset - self.buf_offset
        limit = self._run_records or RUN_RECORDS
        run = self._scan_run(self.buf, start, self.next, SCHEMA_FINGERPRINT, limit)
        if run is None:
            # A run written by an earlier catalogue whose records are all current here.
            header = framing.parse_header(self.buf, start)
            if (header is None or header.schema == SCHEMA_FINGERPRINT
                    or header.schema not in CURRENT_FINGERPRINTS):
                return None
            run = self._scan_run(self.buf, start, self.next, header.schema, limit)
            if run is None:
                return None
        payload, count, end = run
        try:
            events = decode_current_batch(payload)
        except MalformedRecord:
            events = []
        if len(events) != count:
            self._one_by_one_until = self.buf_offset + end
            return None
        self._hint(self.offset, self.next)
        self.offset = self.buf_offset + end
        first, self.next = self.next, self.next + count
        self.data_end = self.next
        behind = max(0, self._size - self.offset) * count // max(1, end - start)
        return Batch(first, events, behind)

    def _gap(self, first: Position, after: Position, reason: str) -> Gap:
        """Report positions ``first`` to ``after`` as lost, and move past them."""
        where = segment_name(self.base or 0) if self.base is not None else "(no segment)"
        gap = Gap(first, after - first, after, where, reason)
        self.next = max(self.next, after)
        self.data_end = max(self.data_end, after)
        _log.warning("positions missing from the log", where=where, first=first,
                     count=after - first, reason=reason)
        return gap

    def _lost_tail(self) -> Generator[ReadItem, None, bool]:
        """At the end of what is stored: report what the log's high-water mark says was written
        but is not here (a truncated, emptied or deleted tail; a checkpoint past the end).
        Returns True if there is more to read after all (a writer appended meanwhile)."""
        if self._plain:
            return False
        mark = self.log.high_water()  # read before looking again: marks follow their frames
        if mark is None or mark <= self.data_end or mark <= self._tail_reported:
            return False
        if self.fd is not None:
            self.buf = b""
            if len(self._bytes(self.offset, framing.HEADER_SIZE)) or self._next_segment():
                return True
        elif self.log.segments():
            return True
        self._tail_reported = mark
        if self.data_end < self.skip_before:
            reason = (f"the log ends at position {self.data_end}, before this reader's start "
                      f"{self.skip_before} (a checkpoint past the end): the log lost its tail")
        else:
            reason = "the log ends before its high-water mark: a lost tail"
        yield self._gap(self.data_end, mark, reason)
        return False

    def _resync(self, reason: str) -> Generator[ReadItem, None, bool]:
        """Skip damage to the next valid frame. Returns False to wait (damage at the live tail)."""
        assert self.fd is not None
        # Look for a newer segment *before* re-reading this one: once one exists, this segment
        # is final, so what we read next is all it will ever hold.
        following = self._next_segment()
        self.buf = b""
        if self._complete_frame_at_offset():
            return True  # it was being written; it is whole now
        size = os.fstat(self.fd).st_size
        rest = os.pread(self.fd, size - self.offset, self.offset)
        resume = framing.find_next_header(rest, 1)
        if resume == -1 and following is None:
            mark = None if self._plain else self.log.high_water()
            if mark is None or mark <= self.next or mark <= self._tail_reported:
                return False  # the newest segment's tail: a writer may be mid-write, or will cut
            # A frame past here was written whole (the mark follows frames): this is damage.
            self._tail_reported = mark
            self.offset = size
            yield self._gap(self.next, mark, f"{reason} at the log's end, before its "
                            "high-water mark: a lost tail")
            return True
        where = f"{segment_name(self.base or 0)} offset {self.offset}"
        expected = self.next
        if resume == -1:
            assert following is not None
            lost_until = following[0]
            self._open(*following)
            self._gap_from = None  # reported below, as damage
        else:
            self.offset += resume
            header = framing.parse_header(self._bytes(self.offset, framing.HEADER_SIZE))
            assert header is not None
            lost_until = header.first
        lost = lost_until - expected if lost_until > expected else None
        notice = Quarantined(expected if lost else None, lost, max(lost_until, expected),
                             where, reason)
        self.next = notice.next
        self.data_end = max(self.data_end, notice.next)
        self._quarantine(notice)
        if notice.next > self.skip_before:
            yield notice
        return True

    def _complete_frame_at_offset(self) -> bool:
        header = framing.parse_header(self._bytes(self.offset, framing.HEADER_SIZE))
        if header is None:
            return False
        body = self._bytes(self.offset + framing.HEADER_SIZE, header.body_len)
        return len(body) == header.body_len

    def _quarantine(self, notice: Quarantined) -> None:
        _log.warning("quarantined damaged records", where=notice.where, reason=notice.reason,
                     first=notice.first, count=notice.count)

    def _frame_items(
        self, header: framing.FrameHeader, body: memoryview, decode: bool
    ) -> Iterator[ReadItem]:
        skip = max(0, self.skip_before - header.first)
        self.next = header.end_position
        if not decode:  # positions only (last_position)
            return
        intact = framing.body_is_intact(header, body)
        if intact and header.schema in CURRENT_FINGERPRINTS:
            try:
                events = decode_current_batch(framing.payload_of(header, body))
            except MalformedRecord:
                pass
            else:
                behind = max(0, self._size - self.offset) * len(events) // header.frame_len
                yield Batch(header.first + skip, events[skip:] if skip else events, behind)
                return
        yield from self._salvage(header, body, skip)

    def _salvage(
        self, header: framing.FrameHeader, body: memoryview, skip: int
    ) -> Iterator[ReadItem]:
        """Decode record by record: upcast old ones, quarantine damaged or invalid ones."""
        where = f"{segment_name(self.base or 0)} offset {self.offset - header.frame_len}"
        run_first, run = header.first + skip, []
        for index, record in enumerate(framing.salvage_records(header, body)):
            if index < skip:
                continue
            position = header.first + index
            reason = "record checksum mismatch"
            if record is not None:
                try:
                    run.append(decode_one(record))
                    continue
                except MalformedRecord as exc:
                    reason = f"undecodable record: {exc}"
            if run:
                yield Batch(run_first, run)
            notice = Quarantined(position, 1, position + 1, where, reason)
            self._quarantine(notice)
            yield notice
            run_first, run = position + 1, []
        if run:
            yield Batch(run_first, run)


def _segment_end(log: LocalLog, base: Position, path: Path) -> Position:
    """The position after the last whole frame of one segment (frames checked, not decoded)."""
    cursor = _Cursor(log, base, only=path)
    try:
        for _ in cursor.poll(decode=False):
            pass
    finally:
        cursor.close()
    return cursor.data_end


def _encode_records(events: Sequence[Event]) -> tuple[list[bytes], int]:
    """The stored records of a batch, and the frame layout that holds them.

    MessagePack, unless an event holds an integer it cannot (beyond 64 bits): then the whole
    frame is JSON, which readers decode just as well, so the batch is stored, not lost.
    """
    try:
        return encode_many(events), framing.MSGPACK_ARRAY
    except OverflowError:
        return encode_many_json(events), framing.JSON_ARRAY


def _segment_named(name: str) -> bool:
    return name.endswith(SEGMENT_SUFFIX) and name[: -len(SEGMENT_SUFFIX)].isdigit()


def _segment_bytes_ok(value: object) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)
            and MIN_SEGMENT_BYTES <= value <= MAX_SEGMENT_BYTES)


def validate_meta(text: bytes, path: str | os.PathLike[str] = META_FILE) -> int:
    """The ``segment_bytes`` of a log's metadata (``wantel-log.json``), checked: a JSON object
    with ``format`` ``"wantel-log"``, ``version`` 1 and ``segment_bytes`` an integer in
    range. Raises :class:`BrokenLog`, one line naming ``path``, for anything else."""
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise BrokenLog(f"{path}: not valid JSON ({_one_line(exc)}); it should read "
                        '{"format": "wantel-log", "version": 1, "segment_bytes": N}') from None
    if not isinstance(meta, dict):
        raise BrokenLog(f"{path}: expected a JSON object, found {type(meta).__name__}")
    if meta.get("format") != "wantel-log":
        raise BrokenLog(f"{path}: not a wantel log (format {_shown(meta.get('format'))}, "
                        "expected \"wantel-log\")")
    version = meta.get("version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise BrokenLog(f"{path}: unsupported log format version {_shown(version)} (this "
                        f"wantel reads version {FORMAT_VERSION}; a newer log needs a newer "
                        "wantel)")
    segment_bytes = meta.get("segment_bytes")
    if not _segment_bytes_ok(segment_bytes):
        raise BrokenLog(f"{path}: segment_bytes must be an integer from {MIN_SEGMENT_BYTES} to "
                        f"{MAX_SEGMENT_BYTES}, got {_shown(segment_bytes)}")
    assert isinstance(segment_bytes, int)
    return segment_bytes


def _shown(value: object) -> str:
    """A metadata value as it would be in JSON, bounded (it is printed in one line)."""
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def _open_error(path: Path, exc: OSError, doing: str = "open") -> LogError:
    """The error for a segment that could not be opened; a symbolic link is a broken log."""
    if exc.errno == errno.ELOOP:
        return BrokenLog(f"{path} is a symbolic link: a segment must be a regular file "
                         "(move it out of the log directory)")
    if exc.errno == errno.EISDIR:
        return BrokenLog(f"{path} is a directory: a segment must be a regular file "
                         "(move it out of the log directory)")
    return LogError(f"cannot {doing} {path}: {exc.strerror or exc}")


def _load_or_create_key(path: Path, ops: FileOps) -> bytes:
    """Read the key at ``path``, or create it (0600) if there is none; first creator wins."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _open_error(path, exc, "read") from exc
        else:
            with os.fdopen(fd, "rb") as file:
                key = file.read(PROMPT_KEY_BYTES + 1)
            if len(key) != PROMPT_KEY_BYTES:
                raise BrokenLog(f"{path}: a prompt key is {PROMPT_KEY_BYTES} bytes, this one "
                                f"has {len(key)}{'+' if len(key) > PROMPT_KEY_BYTES else ''} "
                                "(remove it to start a new key; digests made with the old "
                                "one will no longer match)")
            return key
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            fd = ops.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                ops.write_all(fd, secrets.token_bytes(PROMPT_KEY_BYTES))
                ops.fsync(fd)
            finally:
                ops.close(fd)
            with contextlib.suppress(FileExistsError):  # another process was first: theirs
                ops.link(tmp, path)
            ops.fsync_dir(path.parent)
        except OSError as exc:
            raise LogError(f"cannot create {path}: {exc.strerror or exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                ops.unlink(tmp)
    raise LogError(f"cannot read or create {path}")


def _file_contains(path: Path, needles: Sequence[bytes]) -> bool:
    """Whether any of ``needles`` occurs in the file (memory-mapped, never read whole)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise _open_error(path, exc, "read") from exc
    try:
        if os.fstat(fd).st_size == 0:
            return False
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapped:
            return any(mapped.find(needle) != -1 for needle in needles)
    finally:
        os.close(fd)


def _same_file(path: str, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_ino, named.st_dev) == (opened.st_ino, opened.st_dev)



class _Marks(NamedTuple):
    """The ``positions`` file: high-water mark, durable reservation, boot id of the writer."""

    end: Position
    reserved: Position
    boot: str


_MARKS = struct.Struct("<8sQQ36s")  # + CRC-32 of these 60 bytes: 64 bytes, within one sector
_MARKS_MAGIC: Final = b"WPOS\x00\x00\x00\x01"


def _pack_marks(marks: _Marks) -> bytes:
    body = _MARKS.pack(_MARKS_MAGIC, min(marks.end, MAX_POSITION),
                       min(marks.reserved, MAX_POSITION), marks.boot.encode()[:36])
    return body + struct.pack("<I", zlib.crc32(body))


def _read_marks(fd: int) -> _Marks | None:
    """The marks at the start of ``fd``; ``None`` if it is empty or not a valid record."""
    data = os.pread(fd, _MARKS.size + 4, 0)
    return _parse_marks(data)


def _parse_marks(data: bytes) -> _Marks | None:
    if len(data) != _MARKS.size + 4:
        return None
    body = data[: _MARKS.size]
    if struct.unpack("<I", data[_MARKS.size:])[0] != zlib.crc32(body):
        return None
    magic, end, reserved, boot = _MARKS.unpack(body)
    if magic != _MARKS_MAGIC or end > MAX_POSITION or reserved > MAX_POSITION:
        return None
    return _Marks(end, reserved, boot.rstrip(b"\x00").decode("ascii", "replace"))


def _claim_mark(path: Path) -> tuple[int, str] | None:
    """If the writer that left ``path`` is gone (its ``flock`` released), lock the mark and
    return the descriptor holding the lock and the worker it names; ``None`` if it is alive,
    or another live writer holds it (claimed, not yet reported), or it was removed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not _same_file(str(path), fd):
            raise OSError(errno.ENOENT, "claimed and removed by another writer")
        name = os.pread(fd, 1024, 0).decode("utf-8", "replace") or path.stem
    except OSError:
        os.close(fd)
        return None
    return fd, name
