"""Type stub for the optional C twin of the live ETA estimator's hot paths and of the ETA
projection's scoring (``_live.c``)."""

from collections.abc import Sequence
from typing import Any

from telemetry.eta.live import LiveJob

def step_ended(live: LiveJob, total_steps: int, duration_s: float | None, expert: str | None,
               ts: int, /) -> None:
    """``LiveJob.step_ended(live, total_steps, duration_s, expert, ts)``."""

def estimate_fields(live: LiveJob, now: int, /) -> tuple[float, float, float, float, bool]:
    """``LiveJob.estimate_fields(live, now)``."""

def score_issued(issued: Sequence[Any], end_ts: int, /) -> list[Any]:
    """``telemetry.projections.eta.score_issued(issued, end_ts)``."""
