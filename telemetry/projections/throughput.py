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
from telemetry.projections.base import NO_JOB, OnFailure, RuleTable, bounded_insert

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


class ThroughputProjection(RuleTable):
    """Fold step events into rates.

    :meth:`apply` states the rules, one handler per event type. :meth:`apply_many` is the
    engine's fast path over a batch, held to the same state byte for byte by
    ``tests/telemetry/test_fold_equivalence.py``.
    """

    name = "throughput"
    version = 1
    state_type = ThroughputState
    handles = frozenset({JobStarted, StepEnded, JobCompleted, JobFailed, JobCancelled})
    #: Every other type (a third of a log: memory samples and stage events): skipped in the
    #: fast path's own loop with one test, which costs less than a filter pass over the batch.
    passes = frozenset(EVENT_TYPES) - handles

    def __init__(self) -> None:
        self._rules = {
            StepEnded: self._step,
            JobStarted: self._started,
            JobCompleted: self._ended,
            JobFailed: self._ended,
            JobCancelled: self._ended,
        }

    def initial(self) -> ThroughputState:
        """Nothing measured yet."""
        return ThroughputState()

    # -- the rules, one per event type -----------------------------------------------------

    @staticmethod
    def _step(state: ThroughputState, event: StepEnded) -> None:
        """A step of a running job counts for the job and its model (and, on two-expert
        models, for the model's expert). A timed step's rate, 1 / its duration, moves both
        moving averages and its time adds to the model's; a step without a duration, or of
        none, has no rate. Steps of a job not running (ended, or its start lost) count for
        nothing: no model to count them for."""
        job = state.jobs.get(event.job)
        if job is None:
            return
        model = state.models.get(job.model)
        if model is None:  # JobStarted registers it; only an odd log lacks it
            model = state.models[job.model] = ModelRate()
        job.steps += 1
        model.steps += 1
        if event.expert is not None:
            model.expert_steps[event.expert] = model.expert_steps.get(event.expert, 0) + 1
        if not event.duration_s:
            return
        rate = 1.0 / event.duration_s
        job.ema = _smoothed(job.ema, rate)
        model.ema = _smoothed(model.ema, rate)
        model.step_seconds += event.duration_s

    @staticmethod
    def _started(state: ThroughputState, event: JobStarted) -> None:
        """A started job is running, at no rate yet; its model is known from then on (the
        oldest running jobs beyond :data:`~telemetry.projections.base.MAX_RUNNING` are
        forgotten: their end was lost)."""
        state.jobs = bounded_insert(state.jobs, event.job, JobRate(model=event.model))
        if event.model not in state.models:
            state.models[event.model] = ModelRate()

    @staticmethod
    def _ended(state: ThroughputState, event: Event) -> None:
        """An ended job has no rate; its model's totals stay."""
        state.jobs.pop(event.job, None)

    # -- the fast path ---------------------------------------------------------------------

    def apply_many(self, state: ThroughputState, events: Sequence[Event],
                   failed: OnFailure) -> ThroughputState:
        """:meth:`apply` over ``events``, each failure reported to ``failed``.

        Steps are nearly every event this fold reads, so their branch comes first. A batch
        keeps the current job's and the current model's figures in locals (the same
        arithmetic, in the same order) and stores them when a step moves to another job or
        model, on a lifecycle event (it goes to :meth:`apply`, and replaces or drops jobs),
        when an event fails, and at the end. The locals are kept so that a step costs as
        little as it can without changing a bit:

        * both step counts move with one counter of the batch's steps: the job's and the
          model's are kept as offsets from it (integers, so the sums are exact);
        * a run of steps of one expert counts in a local, stored when the expert or the model
          changes (the expert's key is inserted when it first appears, so the keys of
          ``expert_steps`` keep their order).
        """
        models, apply = state.models, self.apply
        job_of, model_of = state.jobs.get, models.get
        alpha, keep = SMOOTHING, 1 - SMOOTHING
        # Steps counted so far in this batch: the current job's and model's step counts are
        # kept as offsets from it (``steps = base + counted``), one addition per step for both.
        counted = 0
        # The current job: its id, its rate, and the rate's step-count offset and ema.
        job_id: object = NO_JOB
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
                            job_id = NO_JOB
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
                    job, job_id = None, NO_JOB
                apply(state, event)  # it may replace the table of jobs
                job_of = state.jobs.get
            except Exception as exc:  # store what the batch holds, as folding left it
                if job is not None:
                    job.steps, job.ema = job_base + counted, job_ema
                    job, job_id = None, NO_JOB
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


def _smoothed(average: float | None, rate: float) -> float:
    """An exponential moving average of rates moved by ``rate`` (its first value: ``rate``)."""
    return rate if average is None else SMOOTHING * rate + (1 - SMOOTHING) * average
