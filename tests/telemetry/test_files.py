"""``telemetry.files.write_atomic``: the one way a checkpoint, a dashboard or a result file is
replaced."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from telemetry.files import write_atomic


class TestWriteAtomic:
    def test_creates_then_replaces_and_leaves_no_temporary_file(self, tmp_path: Path) -> None:
        """The file holds the new bytes; nothing else is left in the directory."""
        target = tmp_path / "deep" / "state.ckpt"
        write_atomic(target, b"first")
        write_atomic(target, b"second")
        assert b"second" == target.read_bytes()
        assert ["state.ckpt"] == os.listdir(target.parent)

    def test_a_failed_replace_keeps_the_old_file_and_cleans_up(self, tmp_path: Path) -> None:
        """When the rename fails (here: the target is a directory), the temporary file goes."""
        target = tmp_path / "taken"
        (target / "inside").mkdir(parents=True)
        with pytest.raises(OSError):
            write_atomic(target, b"data")
        assert ["taken"] == os.listdir(tmp_path)

    def test_mode(self, tmp_path: Path) -> None:
        """The new file gets ``mode`` (less the umask): 0o644 unless asked otherwise."""
        umask = os.umask(0)
        os.umask(umask)
        write_atomic(tmp_path / "a", b"x")
        write_atomic(tmp_path / "b", b"x", mode=0o600)
        assert 0o644 & ~umask == stat.S_IMODE((tmp_path / "a").stat().st_mode)
        assert 0o600 & ~umask == stat.S_IMODE((tmp_path / "b").stat().st_mode)
