"""Projections: pure folds from events to read models."""

from __future__ import annotations

from typing import Any

from telemetry.liveness import WORKER_TIMEOUT_S
from telemetry.projections.base import Projection
from telemetry.projections.compare import CompareProjection
from telemetry.projections.eta import KEEP_FINISHED as ETA_KEEP_FINISHED
from telemetry.projections.eta import EtaProjection
from telemetry.projections.health import HealthProjection
from telemetry.projections.jobs import JobsProjection
from telemetry.projections.memory import KEEP_FINISHED as MEMORY_KEEP_FINISHED
from telemetry.projections.memory import MemoryProjection
from telemetry.projections.metrics import MetricsProjection
from telemetry.projections.queues import QueuesProjection
from telemetry.projections.throughput import ThroughputProjection


def default_projections(*, keep_finished: int | None = None,
                        worker_timeout_s: float = WORKER_TIMEOUT_S) -> list[Projection[Any]]:
    """Every projection wantel ships, as ``wantel replay`` and ``wantel serve`` run them.

    ``keep_finished`` bounds how many ended jobs each keeps. ``None`` leaves the jobs projection
    unbounded — its caller retires ended jobs itself, as ``wantel replay`` does once it has
    printed them — and the ETA and memory projections at their own bound (10,000 ended jobs).
    ``worker_timeout_s``: how long a silent worker's running jobs wait before the jobs
    projection marks them abandoned (:data:`telemetry.liveness.WORKER_TIMEOUT_S`).
    """
    eta_keep = keep_finished if keep_finished is not None else ETA_KEEP_FINISHED
    memory_keep = keep_finished if keep_finished is not None else MEMORY_KEEP_FINISHED
    return [
        JobsProjection(keep_finished=keep_finished, abandon_after_s=worker_timeout_s),
        EtaProjection(keep_finished=eta_keep),
        ThroughputProjection(),
        MemoryProjection(keep_finished=memory_keep),
        HealthProjection(),
        MetricsProjection(),
        QueuesProjection(),
        CompareProjection(),
    ]


__all__ = ["Projection", "default_projections"]
