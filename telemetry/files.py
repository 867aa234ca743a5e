"""Files that a crash or a reader must never see half of, and the one seam every write goes through.

Projection checkpoints (:class:`~telemetry.engine.CheckpointStore`, the span exporter's too),
the generated dashboards and rules, and the GPU check's results are all written with
:func:`write_atomic`: the bytes go to a temporary file beside the target, which is flushed to
disk, renamed over the target, and the directory is flushed so the rename itself survives a
power cut. A crash leaves the old file or the new one, never a mix.

:class:`FileOps` is the set of operations that change what is on disk (open/create, write,
truncate, rename, link, unlink, mkdir) and the ones that make changes durable (``fsync``,
``fdatasync``, a directory's ``fsync``). The local log, :func:`write_atomic` and the checkpoint
store take one at construction (default :data:`REAL_OPS`, the operating system's), so a test
can record every operation they perform and rebuild the states a power loss could leave
(``tests/telemetry/crashsim.py``). Reads go straight to the operating system: they change
nothing a crash could tear.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import Final

StrPath = str | os.PathLike[str]
BOOT_ID_PATH: Final = "/proc/sys/kernel/random/boot_id"


class FileOps:
    """The file operations wantel's durable writers perform: the real ones.

    Subclasses (a recorder in tests) must call through to these so the files really change.
    """

    def open(self, path: StrPath, flags: int, mode: int = 0o777) -> int:
        """``os.open``."""
        return os.open(path, flags, mode)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        """``os.write``: one call, which may write fewer bytes than given."""
        return os.write(fd, data)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        """``os.pwrite``."""
        return os.pwrite(fd, data, offset)

    def fsync(self, fd: int) -> None:
        """``os.fsync``: data and metadata of ``fd`` on disk."""
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        """``os.fdatasync``: data of ``fd`` (and the size, when it changed) on disk."""
        os.fdatasync(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        """``os.ftruncate``."""
        os.ftruncate(fd, length)

    def close(self, fd: int) -> None:
        """``os.close``."""
        os.close(fd)

    def replace(self, src: StrPath, dst: StrPath) -> None:
        """``os.replace`` (rename over ``dst``)."""
        os.replace(src, dst)

    def link(self, src: StrPath, dst: StrPath) -> None:
        """``os.link`` (fails if ``dst`` exists)."""
        os.link(src, dst)

    def unlink(self, path: StrPath) -> None:
        """``os.unlink``."""
        os.unlink(path)

    def mkdir(self, path: StrPath) -> list[Path]:
        """Create ``path`` and its missing parents (nothing if it is already a directory);
        the directories created, outermost first."""
        missing = []
        target = Path(os.path.abspath(path))
        while not target.exists():
            missing.append(target)
            target = target.parent
        for directory in reversed(missing):
            with contextlib.suppress(FileExistsError):  # another process was first
                directory.mkdir()
        return missing[::-1]

    def makedirs_durable(self, path: StrPath) -> None:
        """:meth:`mkdir`, then flush each new directory's parent, so the new names survive a
        power cut (a directory's own ``fsync`` does not make its name durable)."""
        for directory in self.mkdir(path):
            self.fsync_dir(directory.parent)

    def fsync_dir(self, path: StrPath) -> None:
        """Flush a directory's entries (a created, renamed or removed name) to disk."""
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def boot_id(self) -> str:
        """Which boot of the machine this is (Linux: the kernel's random boot id; elsewhere
        ``""``, unknown). Unsynced writes survive a process crash but not a power loss or
        reboot, so a writer that finds another boot's state knows unsynced data may be gone."""
        try:
            with open(BOOT_ID_PATH, encoding="ascii") as file:
                return file.read().strip()
        except OSError:
            return ""

    def write_all(self, fd: int, data: bytes | memoryview) -> None:
        """Write all of ``data`` (repeating :meth:`write` after a short write)."""
        view = memoryview(data)
        while view:
            written = self.write(fd, view)
            if written == 0:
                raise OSError(errno.EIO, "write returned 0")
            view = view[written:]


#: The operating system's file operations (the default everywhere).
REAL_OPS: Final = FileOps()


def fsync_dir(path: StrPath, *, ops: FileOps = REAL_OPS) -> None:
    """Flush a directory's entries (a created, renamed or removed name) to disk."""
    ops.fsync_dir(path)


def write_atomic(path: StrPath, data: bytes, *, mode: int = 0o644,
                 ops: FileOps = REAL_OPS) -> None:
    """Replace ``path`` with ``data`` atomically and durably (write, fsync, rename, fsync dir).

    The temporary file is ``.<name>.<pid>.<random>.tmp`` in the same directory (a dot file, so
    a log directory's reader ignores it) and is removed if anything fails. ``mode`` is the new
    file's permission bits, less the umask. ``ops``: the file operations to use.
    """
    target = Path(path)
    ops.makedirs_durable(target.parent)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = ops.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            ops.write_all(fd, data)
            ops.fsync(fd)
        finally:
            ops.close(fd)
        ops.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            ops.unlink(tmp)
        raise
    ops.fsync_dir(target.parent)
