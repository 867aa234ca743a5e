"""Shared test configuration."""

from __future__ import annotations

import os

import pytest
import structlog

from telemetry import accelerate

# Tests measure behaviour, never speed; one thread keeps torch steady on a shared 2-core box.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--save-live-page PATH``: where the live-page test also saves its screenshot
    (``make docs-image`` regenerates ``docs/live-page.png`` with it; tests write only to
    temporary directories otherwise)."""
    parser.addoption("--save-live-page", metavar="PATH", default=None,
                     help="also save the live page's screenshot here")


@pytest.fixture(autouse=True)
def _reset_structlog() -> None:
    """Each test starts from structlog's defaults (some tests capture or reconfigure logs)."""
    structlog.reset_defaults()


@pytest.fixture(autouse=True)
def _reset_accelerators() -> None:
    """Each test starts with the C accelerators as the default (some tests choose otherwise)."""
    accelerate.reset_defaults()


pytest_plugins = ["tests.nats_server"]  # the `nats_server` fixture: a real JetStream node
