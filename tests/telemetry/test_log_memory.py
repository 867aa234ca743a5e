"""The in-memory backend meets the log contract."""

from __future__ import annotations

from pathlib import Path

from telemetry.log.memory import MemoryLog

from .log_contract import LogContract


class TestMemoryLog(LogContract):
    def make_log(self, tmp_path: Path) -> MemoryLog:
        """An empty in-memory log."""
        return MemoryLog()
