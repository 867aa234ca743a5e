"""Fixtures for tests that run real (tiny) diffusers pipelines."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """One thread: steady timings and bit-identical outputs on a shared 2-core machine."""
    torch.set_num_threads(1)
