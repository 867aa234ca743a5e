"""Shared by the contract tests of the C accelerators: each runs against its Python reference."""

from __future__ import annotations

import os
from typing import Any

import pytest

REQUIRE_ENV = "WANTEL_REQUIRE_SPEEDUPS"


def both(reference: Any, compiled: Any, module: str) -> list[Any]:
    """The reference and the C version as pytest parameters (``python``, ``c``); the C one is
    skipped where ``module`` was not built."""
    return [
        pytest.param(reference, id="python"),
        pytest.param(compiled, id="c", marks=pytest.mark.skipif(
            compiled is None, reason=f"{module} was not built")),
    ]


def assert_built_where_required(compiled: Any, module: str) -> None:
    """``make test`` sets $WANTEL_REQUIRE_SPEEDUPS: there a missing build fails, not skips."""
    if not os.environ.get(REQUIRE_ENV):
        pytest.skip(f"{REQUIRE_ENV} is not set")
    assert compiled is not None, f"{module} failed to build"
