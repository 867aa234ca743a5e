"""Crash states, in the spirit of ALICE and CrashMonkey: record every file operation a workload
performs, then build the states a power loss could leave on disk.

:class:`Recorder` is a :class:`~telemetry.files.FileOps` that performs each operation for real
and appends it to a trace (paths relative to a root). :class:`Model` replays a trace prefix and
tracks, per file, the content as of its last ``fsync``/``fdatasync`` and the writes and
truncations since; per directory, the entries as of its last ``fsync`` and the creates,
renames, links and unlinks since. A crash state after trace operation ``k`` is:

* every file: its synced content plus any prefix of its later operations, the last write of
  the prefix possibly torn at a 512-byte boundary of the file (a sector that reached the disk,
  the next that did not);
* every directory: its synced entries plus any prefix of its later operations (a rename stays
  atomic: a journal commits it whole);
* each file and directory chosen independently: the kernel writes back different files in any
  order, so a later file's data can survive an earlier file's loss.

That is the model of the ALICE paper's "ext4 (data=ordered) without its extra guarantees":
nothing is assumed durable that was not synced, not even a new file's name before its
directory was synced.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from telemetry.files import FileOps, StrPath

SECTOR = 512
Op = tuple[Any, ...]


class Recorder(FileOps):
    """Real file operations, each recorded as ``(kind, path, …)`` with ``path`` relative to
    ``root``; :meth:`mark` adds the workload's own notes (``("mark", note)``)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.trace: list[Op] = []
        self._fds: dict[int, tuple[str, bool]] = {}
        self._lock = threading.RLock()

    def _rel(self, path: StrPath) -> str:
        return os.path.relpath(os.path.abspath(path), self.root)

    def mark(self, note: Any) -> int:
        """Record a note; its index in the trace."""
        with self._lock:
            self.trace.append(("mark", note))
            return len(self.trace) - 1

    def open(self, path: StrPath, flags: int, mode: int = 0o777) -> int:
        with self._lock:
            existed = os.path.lexists(path)
            fd = os.open(path, flags, mode)
            rel = self._rel(path)
            self._fds[fd] = (rel, bool(flags & os.O_APPEND))
            if flags & os.O_CREAT and not existed:
                self.trace.append(("create", rel))
            if flags & os.O_TRUNC:
                self.trace.append(("trunc", rel, 0))
            return fd

    def write(self, fd: int, data: bytes | memoryview) -> int:
        with self._lock:
            rel, append = self._fds[fd]
            offset = os.fstat(fd).st_size if append else os.lseek(fd, 0, os.SEEK_CUR)
            written = os.write(fd, data)
            self.trace.append(("write", rel, offset, bytes(data[:written])))
            return written

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        with self._lock:
            written = os.pwrite(fd, data, offset)
            self.trace.append(("write", self._fds[fd][0], offset, bytes(data[:written])))
            return written

    def fsync(self, fd: int) -> None:
        with self._lock:
            os.fsync(fd)
            self.trace.append(("sync", self._fds[fd][0]))

    def fdatasync(self, fd: int) -> None:
        with self._lock:
            os.fdatasync(fd)
            self.trace.append(("sync", self._fds[fd][0]))

    def ftruncate(self, fd: int, length: int) -> None:
        with self._lock:
            os.ftruncate(fd, length)
            self.trace.append(("trunc", self._fds[fd][0], length))

    def close(self, fd: int) -> None:
        with self._lock:
            os.close(fd)
            self._fds.pop(fd, None)

    def replace(self, src: StrPath, dst: StrPath) -> None:
        with self._lock:
            os.replace(src, dst)
            self.trace.append(("rename", self._rel(src), self._rel(dst)))

    def link(self, src: StrPath, dst: StrPath) -> None:
        with self._lock:
            os.link(src, dst)
            self.trace.append(("link", self._rel(src), self._rel(dst)))

    def unlink(self, path: StrPath) -> None:
        with self._lock:
            os.unlink(path)
            self.trace.append(("unlink", self._rel(path)))

    def mkdir(self, path: StrPath) -> list[Path]:
        with self._lock:
            created = super().mkdir(path)
            for directory in created:
                self.trace.append(("mkdir", self._rel(directory)))
            return created

    def fsync_dir(self, path: StrPath) -> None:
        with self._lock:
            super().fsync_dir(path)
            self.trace.append(("dsync", self._rel(path)))


class Rebooted(FileOps):
    """The real file operations on a machine that has rebooted since the trace was taken."""

    def boot_id(self) -> str:
        return "rebooted-" + super().boot_id()


Entry = tuple[str, Any]  # ("f", inode) or ("d", directory path)


@dataclass
class Model:
    """A file system replaying a trace: what is written, and what is durable."""

    content: dict[int, bytearray] = field(default_factory=dict)
    synced: dict[int, bytes] = field(default_factory=dict)
    pending: dict[int, list[Op]] = field(default_factory=dict)  # ("w", off, data, index) ...
    entries: dict[str, dict[str, Entry]] = field(default_factory=lambda: {".": {}})
    dsynced: dict[str, dict[str, Entry]] = field(default_factory=lambda: {".": {}})
    dpending: dict[str, list[Op]] = field(default_factory=lambda: {".": []})
    _inodes: itertools.count[int] = field(default_factory=itertools.count)

    def _lookup(self, rel: str) -> int:
        entry = self.entries[os.path.dirname(rel) or "."][os.path.basename(rel)]
        assert entry[0] == "f", rel
        return int(entry[1])

    def _set(self, rel: str, entry: Entry | None, op: Op) -> None:
        directory = os.path.dirname(rel) or "."
        if entry is None:
            self.entries[directory].pop(os.path.basename(rel), None)
        else:
            self.entries[directory][os.path.basename(rel)] = entry
        self.dpending[directory].append(op)

    def apply(self, op: Op, index: int) -> None:
        """Replay one traced operation."""
        kind = op[0]
        if kind == "mark":
            return
        if kind == "create":
            inode = next(self._inodes)
            self.content[inode], self.synced[inode], self.pending[inode] = bytearray(), b"", []
            self._set(op[1], ("f", inode), ("set", os.path.basename(op[1]), ("f", inode)))
        elif kind == "mkdir":
            self.entries[op[1]], self.dsynced[op[1]], self.dpending[op[1]] = {}, {}, []
            self._set(op[1], ("d", op[1]), ("set", os.path.basename(op[1]), ("d", op[1])))
        elif kind == "write":
            inode = self._lookup(op[1])
            _write(self.content[inode], op[2], op[3])
            self.pending[inode].append(("w", op[2], op[3], index))
        elif kind == "trunc":
            inode = self._lookup(op[1])
            del self.content[inode][op[2]:]
            self.pending[inode].append(("t", op[2], b"", index))
        elif kind == "sync":
            inode = self._lookup(op[1])
            self.synced[inode], self.pending[inode] = bytes(self.content[inode]), []
        elif kind == "rename":
            src_dir, dst_dir = os.path.dirname(op[1]) or ".", os.path.dirname(op[2]) or "."
            assert src_dir == dst_dir, "renames across directories are not modelled"
            entry = self.entries[src_dir].pop(os.path.basename(op[1]))
            self.entries[dst_dir][os.path.basename(op[2])] = entry
            self.dpending[src_dir].append(
                ("rename", os.path.basename(op[1]), os.path.basename(op[2]), entry))
        elif kind == "link":
            entry = self.entries[os.path.dirname(op[1]) or "."][os.path.basename(op[1])]
            self._set(op[2], entry, ("set", os.path.basename(op[2]), entry))
        elif kind == "unlink":
            self._set(op[1], None, ("del", os.path.basename(op[1])))
        elif kind == "dsync":
            self.dsynced[op[1]], self.dpending[op[1]] = dict(self.entries[op[1]]), []
        else:  # pragma: no cover - a new kind of operation
            raise AssertionError(f"unmodelled operation {op!r}")

    def pending_writes(self) -> set[int]:
        """Trace indices of writes and truncations not yet synced."""
        return {op[3] for ops in self.pending.values() for op in ops}

    def choices(self, rng: random.Random, limit: int
                ) -> Iterator[tuple[dict[int, Any], dict[str, int]]]:
        """Up to ``limit`` crash states of the model as it is: per file, ``(prefix, cut)``;
        per directory, a prefix length. All of them when there are few, else the extremes
        and a random sample."""
        files = {inode: _file_options(ops) for inode, ops in self.pending.items() if ops}
        dirs = {d: len(ops) for d, ops in self.dpending.items() if ops}
        axes: list[tuple[str, Any, list[Any]]] = (
            [("f", inode, options) for inode, options in files.items()]
            + [("d", d, list(range(count + 1))) for d, count in dirs.items()])
        total = 1
        for _, _, options in axes:
            total *= len(options)
        if total <= limit:
            combos: Iterator[tuple[Any, ...]] = itertools.product(*(o for _, _, o in axes))
        else:
            extremes = [tuple(o[0] for _, _, o in axes), tuple(o[-1] for _, _, o in axes)]
            sampled = (tuple(rng.choice(o) for _, _, o in axes) for _ in range(limit - 2))
            combos = itertools.chain(extremes, sampled)
        for combo in combos:
            file_choice = {axis[1]: pick for axis, pick in zip(axes, combo, strict=True)
                           if axis[0] == "f"}
            dir_choice = {axis[1]: pick for axis, pick in zip(axes, combo, strict=True)
                          if axis[0] == "d"}
            yield file_choice, dir_choice

    def materialise(self, target: Path, file_choice: dict[int, Any],
                    dir_choice: dict[str, int]) -> str:
        """Write the crash state to ``target``; a digest of it (equal states, equal digests)."""
        digest = hashlib.blake2b(digest_size=16)

        def dir_entries(directory: str) -> dict[str, Entry]:
            entries = dict(self.dsynced[directory])
            for op in self.dpending[directory][: dir_choice.get(directory, 0)]:
                if op[0] == "set":
                    entries[op[1]] = op[2]
                elif op[0] == "del":
                    entries.pop(op[1], None)
                else:  # rename
                    entries.pop(op[1], None)
                    entries[op[2]] = op[3]
            return entries

        def file_bytes(inode: int) -> bytes:
            data = bytearray(self.synced[inode])
            prefix, cut = file_choice.get(inode, (0, None))
            ops = self.pending[inode][:prefix]
            for number, op in enumerate(ops):
                if op[0] == "t":
                    del data[op[1]:]
                    continue
                payload = op[2]
                if cut is not None and number == len(ops) - 1:
                    payload = payload[: cut - op[1]]
                _write(data, op[1], payload)
            return bytes(data)

        def walk(directory: str, path: Path) -> None:
            path.mkdir(parents=True, exist_ok=True)
            for name, entry in sorted(dir_entries(directory).items()):
                digest.update(f"{directory}/{name}:".encode())
                if entry[0] == "d":
                    if entry[1] in self.entries:
                        walk(entry[1], path / name)
                    continue
                data = file_bytes(entry[1])
                digest.update(hashlib.blake2b(data, digest_size=16).digest())
                (path / name).write_bytes(data)

        walk(".", target)
        return digest.hexdigest()


def _write(data: bytearray, offset: int, payload: bytes) -> None:
    if len(data) < offset:
        data.extend(bytes(offset - len(data)))
    data[offset : offset + len(payload)] = payload


def _file_options(ops: list[Op]) -> list[tuple[int, int | None]]:
    """A file's crash options: each prefix of its pending operations, and the last write of
    a prefix torn at some 512-byte boundaries of the file (first, middle and last)."""
    options: list[tuple[int, int | None]] = [(0, None)]
    for number, op in enumerate(ops, start=1):
        options.append((number, None))
        if op[0] != "w":
            continue
        start, end = op[1], op[1] + len(op[2])
        cuts = list(range((start // SECTOR + 1) * SECTOR, end, SECTOR))
        if len(cuts) > 3:
            cuts = [cuts[0], cuts[len(cuts) // 2], cuts[-1]]
        options.extend((number, cut) for cut in cuts)
    return options


def crash_states(trace: list[Op], rng: random.Random, per_point: int
                 ) -> Iterator[tuple[int, Model, dict[int, Any], dict[str, int]]]:
    """For each point ``k`` of the trace (after its ``k``-th operation), the model there and
    up to ``per_point`` crash states of it."""
    model = Model()
    for index, op in enumerate(trace):
        model.apply(op, index)
        if op[0] == "mark":
            continue
        for file_choice, dir_choice in model.choices(rng, per_point):
            yield index + 1, model, file_choice, dir_choice
