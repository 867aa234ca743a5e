"""Where replay's hot loop comes from: a C accelerator where it was built, else Python.

Each C file implements one function that has a pure-Python reference beside it, with the same
results (a contract test runs both): ``telemetry/log/_framing.c``, the local log's frame checks,
``telemetry/log/_natswire.c``, the lean NATS reader's frame scan, and ``telemetry/eta/_live.c``,
the live ETA estimator's hot paths and the scoring of a completed job's ETAs. The choice is
made when the object that runs the loop is built, never when a module is imported:
:class:`~telemetry.log.local.LocalLog` (the frame checks) and
:class:`~telemetry.log.nats.NatsLog` (the frame scan) take ``compiled``, and
:class:`~telemetry.projections.eta.EtaProjection` (the estimator and its scoring)
``estimator``:

* ``True``: the C version, or the reference where it was not built (an install without a C
  compiler), which :func:`choose` reports;
* ``False``: the reference;
* ``None`` (the default): the process-wide default, which is ``True`` until the application
  says otherwise with :func:`configure` (``wantel`` does for ``$WANTEL_PURE_PYTHON``; the
  library reads no environment variable).

This module is the library's one piece of global state; :func:`reset_defaults` puts it back
(the tests do before each test). :func:`describe` says in words what objects built now would
run, for ``wantel --version`` and the benchmarks. (The engine's pass over every event had a C
version too, ``telemetry/_speedups.c``; it won ~5 % of ``wantel replay`` and was removed: see
``docs/design-notes.md``.)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Final, TypeVar

F = TypeVar("F")


@dataclass(frozen=True)
class Accelerator:
    """A C function that can stand in for a Python reference: what it is for, where it is."""

    purpose: str
    module: str
    name: str


#: The reader's check of a run of frames (reference: ``framing.scan_run_py``).
FRAME_CHECKS: Final = Accelerator("frame checks", "telemetry.log._framing", "scan_run")
#: The lean NATS reader's cut of a buffer into message frames (reference:
#: ``nats_wire.scan_frames_py``).
NATS_FRAMES: Final = Accelerator("NATS frame scan", "telemetry.log._natswire", "scan_frames")
#: The live ETA estimator's two hot paths, ``step_ended`` and ``estimate_fields`` (reference:
#: the :class:`~telemetry.eta.live.LiveJob` methods); its module holds both, and the ETA
#: projection's ``score_issued`` (reference: :func:`telemetry.projections.eta.score_issued`),
#: chosen with them.
ETA_ESTIMATOR: Final = Accelerator("ETA estimator", "telemetry.eta._live", "estimate_fields")
ACCELERATORS: Final = (FRAME_CHECKS, NATS_FRAMES, ETA_ESTIMATOR)


@dataclass
class _Defaults:
    compiled: bool = True
    reason: str = "compiled=False"


_DEFAULTS: Final = _Defaults()


def configure(*, compiled: bool, reason: str = "compiled=False") -> None:
    """Set the default for objects built from now on; ``reason`` says why C is not used.

    The application calls this once, from its configuration (``wantel`` passes
    ``reason="$WANTEL_PURE_PYTHON"``); objects already built keep what they chose.
    """
    _DEFAULTS.compiled, _DEFAULTS.reason = compiled, reason


def reset_defaults() -> None:
    """Back to the built-in default: the C versions where they were built."""
    configure(compiled=True)


def compiled_function(accelerator: Accelerator) -> Any | None:
    """The C function, or ``None`` where its module was not built."""
    try:
        return getattr(importlib.import_module(accelerator.module), accelerator.name)
    except ImportError:  # not built where wantel was installed
        return None


def choose(accelerator: Accelerator, reference: F, compiled: bool | None = None) -> tuple[F, str]:
    """The implementation an object built now uses, and what it is in words ("C", "Python (…)").

    ``compiled`` as the objects take it: ``None`` is the process-wide default.
    """
    reason = "compiled=False"
    if compiled is None:
        compiled, reason = _DEFAULTS.compiled, _DEFAULTS.reason
    if not compiled:
        return reference, f"Python ({reason})"
    function: F | None = compiled_function(accelerator)
    if function is None:
        return reference, "Python (C not built)"
    return function, "C"


def describe(compiled: bool | None = None) -> str:
    """What each hot loop of an object built now runs as, in one line."""
    return ", ".join(f"{accelerator.purpose}: {choose(accelerator, None, compiled)[1]}"
                     for accelerator in ACCELERATORS)
