"""Throughput: denoising steps per second, per running job (smoothed) and per model.

Rates come from the steps' own measured durations, so they describe the device, not the
host's queueing. The per-job rate is an exponential moving average (like tqdm's, α = 0.3);
the per-model figures are totals, from which Prometheus derives rates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import msgspec

from telemetry.events import (
    EVENT_TYPES,
    Event,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobStarted,
    StepEnded,
)
from telemetry.projections.base import BatchFold, OnFailure, bounded_insert

SMOOTHING: Final = 0.3
_LIFECYCLE: Final = frozenset({JobStarted, JobCompleted, JobFailed, JobCancelled})


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


class ThroughputProjection(BatchFold):
    """Fold step events into rates."""

    name = "throughput"
    version = 1
    state_type = ThroughputState
    handles = frozenset({JobStarted, StepEnded, JobCompleted, JobFailed, JobCancelled})
    #: Every other type (a third of a log: memory samples and stage events): skipped in the
    #: fold's own loop with one test, which costs less than a filter pass over the batch.
    passes = frozenset(EVENT_TYPES) - handles

    def initial(self) -> ThroughputState:
        """Nothing measured yet."""
        return ThroughputState()

    def apply_many(self, state: ThroughputState, events: Sequence[Event],
                   failed: OnFailure) -> ThroughputState:
        """Count and time each step; forget jobs that ended.

        Steps are nearly every event this fold reads, so their branch comes first. A batch
        keeps the current job's and the current model's figures in locals (the same
        arithmetic, in the same order) and stores them when a step moves to another job or
        model, on a lifecycle event (it replaces or drops jobs), when an event fails, and at
        the end. The locals are kept so that a step costs as little as it can without
        changing a bit:

        * both step counts move with one counter of the batch's steps: the job's and the
          model's are kept as offsets from it (integers, so the sums are exact);
        * a run of steps of one expert counts in a local, stored when the expert or the model
          changes (the expert's key is inserted when it first appears, so the keys of
          ``expert_steps`` keep their order).
        """
        jobs, models = state.jobs, state.models
        job_of, model_of = jobs.get, models.get
        alpha, keep = SMOOTHING, 1 - SMOOTHING
        # Steps counted so far in this batch: the current job's and model's step counts are
        # kept as offsets from it (``steps = base + counted``), one addition per step for both.
        counted = 0
        # The current job: its id, its rate, and the rate's step-count offset and ema.
        job_id: str | None = None
        job: JobRate | None = None
        job_base, job_ema = 0, None
        # The current model: its name, its rate, and the rate's step-count offset, ema, time
        # in steps and steps by expert.
        model_name: str | None = None
        model: ModelRate | None = None
        model_base, model_ema, model_seconds = 0, None, 0.0
        experts: dict[str, int] = {}
        # The current expert of the model (None: none yet) and its count in ``experts``.
        expert: str | None = None
        expert_count = 0
        step_type, lifecycle = StepEnded, _LIFECYCLE  # locals: read per event
        for event in events:
            try:
                if type(event) is step_type:
                    if event.job != job_id:
                        if job is not None:
                            job.steps, job.ema = job_base + counted, job_ema
                        job = job_of(event.job)
                        if job is None:
                            job_id = None
                            continue
                        job_id, job_base, job_ema = event.job, job.steps - counted, job.ema
                        if job.model != model_name:
                            if model is not None:
                                model.steps, model.ema = model_base + counted, model_ema
                                model.step_seconds = model_seconds
                                if expert is not None:
                                    experts[expert] = expert_count
                                    expert = None
                            model_name = job.model
                            model = model_of(model_name)
                            if model is None:  # JobStarted registers it; only an odd log lacks it
                                model = models[model_name] = ModelRate()
                            model_base, model_ema = model.steps - counted, model.ema
                            model_seconds, experts = model.step_seconds, model.expert_steps
                    counted += 1
                    if event.expert is not None:  # Wan 2.2's two-expert models only
                        step_expert = event.expert
                        if step_expert != expert:
                            if expert is not None:
                                experts[expert] = expert_count
                            expert = step_expert
                            expert_count = experts.setdefault(expert, 0)
                        expert_count += 1
                    duration = event.duration_s
                    if not duration:  # no duration (or zero): no rate
                        continue
                    rate = 1.0 / duration
                    weighted = alpha * rate  # the same product in both averages
                    job_ema = rate if job_ema is None else weighted + keep * job_ema
                    model_ema = rate if model_ema is None else weighted + keep * model_ema
                    model_seconds += duration
                    continue
                if type(event) not in lifecycle:  # another type: nothing to do
                    continue
                if job is not None:  # a lifecycle event: store the current job's figures
                    job.steps, job.ema = job_base + counted, job_ema
                    job = job_id = None
                if type(event) is JobStarted:
                    jobs = state.jobs = bounded_insert(jobs, event.job, JobRate(model=event.model))
                    job_of = jobs.get
                    if event.model not in models:
                        models[event.model] = ModelRate()
                elif (type(event) is JobCompleted or type(event) is JobFailed
                      or type(event) is JobCancelled):
                    jobs.pop(event.job, None)
            except Exception as exc:  # store what the batch holds, as folding left it
                if job is not None:
                    job.steps, job.ema = job_base + counted, job_ema
                    job = job_id = None
                if model is not None:
                    model.steps, model.ema = model_base + counted, model_ema
                    model.step_seconds = model_seconds
                    model = model_name = None
                if expert is not None:
                    experts[expert] = expert_count
                    expert = None
                failed(event, exc)
        if job is not None:
            job.steps, job.ema = job_base + counted, job_ema
        if model is not None:
            model.steps, model.ema = model_base + counted, model_ema
            model.step_seconds = model_seconds
        if expert is not None:
            experts[expert] = expert_count
        return state
