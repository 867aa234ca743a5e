"""Where replay's hot loops come from: a C accelerator where it was built, else Python.

Each of the two C files (``telemetry/_speedups.c``, ``telemetry/log/_framing.c``) implements a
function that has a pure-Python reference beside it, with the same results (a contract test
runs both). :func:`compiled_or` picks one at import, once: the C version unless it was not built
(an install without a C compiler) or ``$WANTEL_PURE_PYTHON`` is set. :data:`CHOSEN` records each
choice in words for ``wantel --version`` and the benchmarks.
"""

from __future__ import annotations

import importlib
import os
from typing import Final, TypeVar

F = TypeVar("F")

PURE_PYTHON_ENV: Final = "WANTEL_PURE_PYTHON"


def pure_python_requested() -> bool:
    """``$WANTEL_PURE_PYTHON`` set (to anything but empty or 0): skip the C accelerators."""
    return os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0")

#: What each hot loop runs as, by purpose: "C", or "Python (why)".
CHOSEN: Final[dict[str, str]] = {}


def compiled_or(reference: F, module: str, name: str, *, purpose: str) -> F:
    """``module.name`` if that accelerator is built and allowed, else ``reference``."""
    if pure_python_requested():
        CHOSEN[purpose] = f"Python (${PURE_PYTHON_ENV})"
        return reference
    try:
        compiled: F = getattr(importlib.import_module(module), name)
    except ImportError:  # not built where wantel was installed
        CHOSEN[purpose] = "Python (C not built)"
        return reference
    CHOSEN[purpose] = "C"
    return compiled


#: The modules whose import makes a choice.
CHOOSERS: Final = ("telemetry.dedup", "telemetry.log.framing")


def describe() -> str:
    """Every choice, in one line (importing the modules that make them, if need be)."""
    for module in CHOOSERS:
        importlib.import_module(module)
    return ", ".join(f"{purpose}: {how}" for purpose, how in CHOSEN.items())
