"""Projections: pure folds from events to read models."""

from __future__ import annotations

from typing import Any

from telemetry.projections.base import Projection
from telemetry.projections.eta import EtaProjection
from telemetry.projections.health import HealthProjection
from telemetry.projections.jobs import JobsProjection
from telemetry.projections.memory import MemoryProjection
from telemetry.projections.metrics import MetricsProjection
from telemetry.projections.throughput import ThroughputProjection


def default_projections(*, keep_finished: int | None = None) -> list[Projection[Any]]:
    """Every projection wantel ships, as ``wantel replay`` and ``wantel serve`` run them.

    ``keep_finished`` bounds how many ended jobs each keeps (``None``: all, for replay).
    """
    bound = keep_finished if keep_finished is not None else 10**12
    return [
        JobsProjection(keep_finished=keep_finished),
        EtaProjection(keep_finished=bound),
        ThroughputProjection(),
        MemoryProjection(keep_finished=bound),
        HealthProjection(),
        MetricsProjection(),
    ]


__all__ = ["Projection", "default_projections"]
