"""Shared test configuration."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import structlog

from telemetry import accelerate
from telemetry.emitter import process_emitters

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


@pytest.fixture(autouse=True)
def _close_the_emitters_a_test_opened() -> Iterator[None]:
    """Each test closes the process emitters it opened (``instrument(log=...)`` makes one per
    log and keeps it until exit): 51 of them piled up, each with its writer thread, and exit
    then spent 2 s on each whose log a test had made unwritable."""
    before = {id(emitter) for emitter in process_emitters()}
    yield
    for emitter in process_emitters():
        if id(emitter) not in before:
            emitter.close(timeout=2.0)


pytest_plugins = ["tests.nats_server"]  # the `nats_server` fixture: a real JetStream node
