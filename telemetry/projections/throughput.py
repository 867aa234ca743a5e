"""Throughput: denoising steps per second, per running job (smoothed) and per model.

Rates come from the steps' own measured durations, so they describe the device, not the
host's queueing. The per-job rate is an exponential moving average (like tqdm's, α = 0.3);
the per-model figures are totals, from which Prometheus derives rates.
"""

from __future__ import annotations

from typing import Final

import msgspec

from telemetry.events import Event, JobCancelled, JobCompleted, JobFailed, JobStarted, StepEnded
from telemetry.projections.base import bounded_insert

SMOOTHING: Final = 0.3


class JobRate(msgspec.Struct, kw_only=True):
    """A running job's smoothed steps/s."""

    model: str
    steps: int = 0
    ema: float | None = None


class ModelRate(msgspec.Struct, kw_only=True):
    """A model's step count, time spent in steps, and smoothed steps/s."""

    steps: int = 0
    step_seconds: float = 0.0
    ema: float | None = None
    expert_steps: dict[str, int] = {}


class ThroughputState(msgspec.Struct, kw_only=True):
    """Rates by running job and by model."""

    jobs: dict[str, JobRate] = {}
    models: dict[str, ModelRate] = {}


class ThroughputProjection:
    """Fold step events into rates."""

    name = "throughput"
    version = 1
    state_type = ThroughputState
    handles = frozenset({JobStarted, StepEnded, JobCompleted, JobFailed, JobCancelled})

    def initial(self) -> ThroughputState:
        """Nothing measured yet."""
        return ThroughputState()

    def apply(self, state: ThroughputState, event: Event) -> ThroughputState:
        """Count and time each step; forget jobs that ended."""
        kind = type(event)
        if kind is StepEnded:
            assert isinstance(event, StepEnded)
            job = state.jobs.get(event.job)
            if job is None:
                return state
            model = state.models.setdefault(job.model, ModelRate())
            job.steps += 1
            model.steps += 1
            if event.expert is not None:
                model.expert_steps[event.expert] = model.expert_steps.get(event.expert, 0) + 1
            if event.duration_s:
                rate = 1.0 / event.duration_s
                job.ema = rate if job.ema is None else SMOOTHING * rate + (1 - SMOOTHING) * job.ema
                model.ema = (rate if model.ema is None
                             else SMOOTHING * rate + (1 - SMOOTHING) * model.ema)
                model.step_seconds += event.duration_s
        elif kind is JobStarted:
            assert isinstance(event, JobStarted)
            bounded_insert(state.jobs, event.job, JobRate(model=event.model))
            state.models.setdefault(event.model, ModelRate())
        elif kind is JobCompleted or kind is JobFailed or kind is JobCancelled:
            state.jobs.pop(event.job, None)
        return state
