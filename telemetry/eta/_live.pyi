"""Type stub for the optional C twin of the live ETA estimator's hot paths, of the ETA
projection's scoring, counting and issuing, and of online learning (``_live.c``)."""

from collections.abc import Sequence
from typing import Any

from telemetry.eta.live import LiveJob, Prior
from telemetry.eta.online import Learned, Observation

def step_ended(live: LiveJob, total_steps: int, duration_s: float | None, expert: str | None,
               ts: int, /) -> None:
    """``LiveJob.step_ended(live, total_steps, duration_s, expert, ts)``."""

def estimate_fields(live: LiveJob, now: int, /) -> tuple[float, float, float, float, bool]:
    """``LiveJob.estimate_fields(live, now)``."""

def score_issued(issued: Sequence[Any], end_ts: int, /) -> list[Any]:
    """``telemetry.projections.eta.score_issued(issued, end_ts)``."""

def add_all(histogram: Any, errors: list[float], covered: int, /) -> None:
    """``telemetry.projections.eta.Histogram.add_all(histogram, errors, covered)``."""

def issue(running: Any, ts: int, /) -> None:
    """``telemetry.projections.eta._issue(running, ts, estimate_fields)``."""

def corrected(prior: Prior, learned: Learned, steps: int, tau: float, /,
              ) -> tuple[float, dict[str, float], dict[str, float], float, float]:
    """``telemetry.eta.live.corrected(prior, learned, steps, tau)``."""

def learn(learned: Learned, observations: list[Observation], warmup_key: str | None,
          warmup_ratio: float | None, /) -> None:
    """``telemetry.eta.online.learn(learned, observations, warmup_key, warmup_ratio)``."""
