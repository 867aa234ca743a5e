"""Shared test configuration."""

from __future__ import annotations

import os

import pytest
import structlog

from telemetry import accelerate

# Tests measure behaviour, never speed; one thread keeps torch steady on a shared 2-core box.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _reset_structlog() -> None:
    """Each test starts from structlog's defaults (some tests capture or reconfigure logs)."""
    structlog.reset_defaults()


@pytest.fixture(autouse=True)
def _reset_accelerators() -> None:
    """Each test starts with the C accelerators as the default (some tests choose otherwise)."""
    accelerate.reset_defaults()
