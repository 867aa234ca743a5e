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

        Steps are nearly every event this fold reads. A batch keeps the current job's and
        model's figures in locals — both step counts as offsets from one count of the batch's
        steps (integers: the sums are exact), a run of one expert's steps as a count — and
        stores them (:func:`_store_rate`, :func:`_store_model`) when a step moves to another
        job or model, on a lifecycle event (its rule may replace or drop jobs), a failure,
        and at the end. The arithmetic is the rules', in the same order.
        """
        alpha, keep = SMOOTHING, 1 - SMOOTHING
        step_type = StepEnded  # a local: read per event
        counted = 0  # the batch's steps so far
        job_id: object = NO_JOB
        job: JobRate | None = None
        job_base, job_ema = 0, None
        model_name: str | None = None
        model: ModelRate | None = None
        model_base, model_ema, model_seconds = 0, None, 0.0
        experts: dict[str, int] = {}
        expert: str | None = None  # the model's current expert (None: none yet), its count
        expert_count = 0
        for event in events:
            try:
                if type(event) is step_type:
                    if event.job != job_id:
                        _store_rate(job, job_base + counted, job_ema)
                        job = state.jobs.get(event.job)
                        if job is None:
                            job_id = NO_JOB
                            continue
                        job_id, job_base, job_ema = event.job, job.steps - counted, job.ema
                        if job.model != model_name:
                            _store_model(model, model_base + counted, model_ema, model_seconds,
                                         expert, expert_count)
                            model_name, expert = job.model, None
                            model = _model_rate(state, model_name)
                            model_base, model_ema = model.steps - counted, model.ema
                            model_seconds, experts = model.step_seconds, model.expert_steps
                    counted += 1
                    if event.expert is not None:  # Wan 2.2's two-expert models only
                        if event.expert != expert:
                            if expert is not None:
                                experts[expert] = expert_count
                            expert = event.expert
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
                elif type(event) in _LIFECYCLE:  # store the current job's figures first
                    _store_rate(job, job_base + counted, job_ema)
                    job, job_id = None, NO_JOB
                    self.apply(state, event)
            except Exception as exc:  # store what the batch holds, as folding left it
                _store_rate(job, job_base + counted, job_ema)
                _store_model(model, model_base + counted, model_ema, model_seconds, expert,
                             expert_count)
                job, job_id, model, model_name, expert = None, NO_JOB, None, None, None
                failed(event, exc)
        _store_rate(job, job_base + counted, job_ema)
        _store_model(model, model_base + counted, model_ema, model_seconds, expert,
                     expert_count)
        return state


def _store_rate(rate: JobRate | ModelRate | None, steps: int, ema: float | None) -> None:
    """A batch's figures of a job's or a model's rate (``None``: no rate is current)."""
    if rate is not None:
        rate.steps, rate.ema = steps, ema


def _store_model(model: ModelRate | None, steps: int, ema: float | None,  # noqa: PLR0917 - a batch's locals, stored
                 seconds: float, expert: str | None, expert_count: int) -> None:
    """A batch's figures of a model's rate: steps, ema, time in steps, and the count of its
    current expert (``None``: no model is current)."""
    if model is not None:
        _store_rate(model, steps, ema)
        model.step_seconds = seconds
        if expert is not None:
            model.expert_steps[expert] = expert_count


def _model_rate(state: ThroughputState, name: str) -> ModelRate:
    """A model's rate (``JobStarted`` registers it; only an odd log lacks it: made empty)."""
    model = state.models.get(name)
    if model is None:
        model = state.models[name] = ModelRate()
    return model


def _smoothed(average: float | None, rate: float) -> float:
    """An exponential moving average of rates moved by ``rate`` (its first value: ``rate``)."""
    return rate if average is None else SMOOTHING * rate + (1 - SMOOTHING) * average
