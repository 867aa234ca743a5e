"""Configuration read in one place: where the log is, from flags and the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

LOG_ENV: Final = "WANTEL_LOG"
DEFAULT_LOG_DIR: Final = "wantel-log"


def resolve_log_dir(flag: str | None, env: Mapping[str, str] | None = None) -> Path:
    """``--log DIR``, else ``$WANTEL_LOG``, else ``./wantel-log``."""
    environ = os.environ if env is None else env
    return Path(flag or environ.get(LOG_ENV) or DEFAULT_LOG_DIR)


PURE_PYTHON_ENV: Final = "WANTEL_PURE_PYTHON"


def pure_python_requested(env: Mapping[str, str] | None = None) -> bool:
    """``$WANTEL_PURE_PYTHON`` set (to anything but empty or 0): skip the C accelerator."""
    environ = os.environ if env is None else env
    return environ.get(PURE_PYTHON_ENV, "") not in ("", "0")
