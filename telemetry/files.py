"""Files that a crash or a reader must never see half of: the one way wantel replaces a file.

Projection checkpoints (:class:`~telemetry.engine.CheckpointStore`, the span exporter's too),
the generated dashboards and rules, and the GPU check's results are all written with
:func:`write_atomic`: the bytes go to a temporary file beside the target, which is flushed to
disk, renamed over the target, and the directory is flushed so the rename itself survives a
power cut. A crash leaves the old file or the new one, never a mix.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (a created, renamed or removed name) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably (write, fsync, rename, fsync dir).

    The temporary file is ``.<name>.<pid>.<random>.tmp`` in the same directory (a dot file, so
    a log directory's reader ignores it) and is removed if anything fails. ``mode`` is the new
    file's permission bits, less the umask.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
