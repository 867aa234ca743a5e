"""The live estimate of a running job's remaining time: the prior, corrected by what is seen.

At ``JobStarted`` every phase gets its calibrated expected duration. As phases end, their
observed/expected ratio becomes a job-level speed factor for the phases still to come (shrunk
towards 1: one fast text encode says little). In the denoise loop the per-step mean is a
conjugate-style update of the prior with the observed step durations, the first step
down-weighted (warm-up), and each A14B expert is its own segment: a new expert starts from the
prior scaled by what the previous one showed. The interval comes from the calibration's
empirical quantiles of actual/predicted by progress bucket, or, before any calibration, from a
log-normal whose width is each remaining part's relative error, narrowed for parts already
observed. A rise beyond the previous interval is damped: half the excess per update.

Everything here is a pure function of the job's events and ``now`` (nanoseconds, taken from an
event or an evaluation checkpoint, never from a clock).
"""

from __future__ import annotations

import math
from math import exp, sqrt
from typing import Final, NamedTuple

import msgspec

from telemetry.eta.model import (
    STEP,
    Calibration,
    bucket_of,
    expected_phases,
    predict,
    rel_sigma,
    warmup_factor,
)
from telemetry.eta.shape import JobShape
from telemetry.events import Event, JobStarted, StageEnded, StageStarted, StepEnded

PRIOR_STEPS: Final = 2.0  # the prior's weight, in steps, against observed step durations
PRIOR_PHASES: Final = 1.0  # the prior's weight, in phases, against observed phase ratios
WARMUP_WEIGHT: Final = 0.3  # how much the first step counts towards the step mean
Z90: Final = 1.2816  # standard normal quantile of 0.9
SPEED_EXCLUDED: Final = frozenset({"load", "save"})  # imports and disks say nothing of speed
MIN_SPEED_PHASE_S: Final = 0.005


def damp_rise(remaining: float, last_remaining: float | None, last_ts: int | None,
              last_band: float, now: int) -> float:
    """``remaining`` as issued after the previous ETA (``last_*``, issued at ``last_ts``).

    A rise within the previous interval is noise and passes; beyond it, only half of the
    excess is taken per update, so one slow step cannot throw the ETA back, while a real
    slowdown still shows within a few updates.
    """
    if last_remaining is None or last_ts is None:
        return remaining
    ceiling = last_remaining - (now - last_ts) / 1e9
    ceiling = (0.0 if 0.0 > ceiling else ceiling) + last_band  # max(ceiling, 0.0) + last_band
    if remaining > ceiling:
        return ceiling + 0.5 * (remaining - ceiling)
    return remaining


def conditional_remaining(expected: float, sigma: float, elapsed: float) -> float:
    """Expected time left in a phase that has already lasted ``elapsed``.

    The phase's duration is taken as log-normal with mean ``expected`` and relative spread
    ``sigma``; what is left is E[D − t | D > t]. Unlike ``max(expected − t, 0)`` this never
    says "done" for a phase that is still running: an overrunning phase (a slow import, a
    contended CPU) keeps a remaining time that shrinks slowly instead of dropping to zero.
    """
    if expected <= 0:
        return 0.0
    if elapsed <= 0:
        return expected
    s = math.sqrt(math.log1p(sigma * sigma)) or 1e-6
    mu = math.log(expected) - s * s / 2
    z = (math.log(elapsed) - mu) / s
    tail = 0.5 * math.erfc(z / math.sqrt(2))  # P(D > t)
    if tail < 1e-12:
        return expected * s * 0.1  # far past any plausible end: a small, steady remainder
    upper = 0.5 * math.erfc((z - s) / math.sqrt(2))  # Φ(s − z)
    return max(expected * upper / tail - elapsed, 0.0)


class Estimate(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Seconds remaining with a p10–p90 interval, and progress as a fraction of time."""

    remaining_s: float
    p10_s: float
    p90_s: float
    progress: float
    estimating: bool  # fewer than two steps seen: show "estimating"

    def total_s(self, elapsed_s: float) -> float:
        """Predicted duration of the whole job."""
        return elapsed_s + self.remaining_s


class Prior(NamedTuple):
    """What a job's estimator starts from: a function of its shape, runner and calibration."""

    phases: tuple[str, ...]
    expected: dict[str, float]  # seconds per phase
    sigma: dict[str, float]  # relative error per phase
    step: float  # seconds per step (all passes)
    warmup: float

    @classmethod
    def of(cls, shape: JobShape, runner: bool, calibration: Calibration) -> Prior:
        """Expected phase durations, and how wrong each tends to be."""
        phases = expected_phases(shape, runner=runner)
        expected: dict[str, float] = {}
        sigma: dict[str, float] = {}
        step = predict(STEP, shape, calibration) * shape.passes
        warmup = warmup_factor(shape, calibration)
        for phase in phases:
            if phase == "denoise":
                expected[phase] = step * (max(shape.steps - 1, 0) + warmup)
                sigma[phase] = rel_sigma(STEP, shape, calibration)
            else:
                expected[phase] = predict(phase, shape, calibration)
                sigma[phase] = rel_sigma(phase, shape, calibration)
        return cls(phases, expected, sigma, step, warmup)


class PriorCache:
    """``LiveJob.start`` with its priors memoised per (shape, runner) for one calibration.

    A fleet runs few distinct shapes, and working a prior out (component keys, coefficient
    look-ups, features) costs ~20 µs: most of a replay's per-job cost. The cache holds the
    calibration it was filled under and is emptied when another one is passed, so what it
    returns is exactly what ``LiveJob.start`` would; it is a speed-up, never part of a state.
    """

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._calibration: Calibration | None = None
        self._priors: dict[tuple[JobShape, bool], Prior] = {}

    def start(self, event: JobStarted, calibration: Calibration) -> LiveJob:
        """``LiveJob.start(event, calibration)``."""
        shape, runner = JobShape.of(event), driven_by_runner(event)
        priors = self._priors
        if calibration is not self._calibration:  # identity: the cache holds a reference
            priors.clear()
            self._calibration = calibration
        prior = priors.get((shape, runner))
        if prior is None:
            if len(priors) >= self.limit:
                priors.clear()
            prior = priors[shape, runner] = Prior.of(shape, runner, calibration)
        return LiveJob.from_prior(event, shape, runner, prior, calibration)


def driven_by_runner(event: JobStarted) -> bool:
    """Whether ``wantel run`` drives the job (its plan has ``load`` and ``save`` stages)."""
    return "load" in str(event.options.get("stages", ""))


class LiveJob(msgspec.Struct, kw_only=True):
    """What the estimator keeps about one running job (part of the ETA projection's state).

    The one implementation of the live estimate: the ETA projection folds a job's events
    through ``observe`` and issues ``estimate_fields``; ``wantel eta eval`` and the spans' ETA
    attributes (``evaluate.ours_at``) replay a job the same way. A replay calls these a few
    hundred thousand times, so the hot paths spell ``max(x, 0.0)`` as ``0.0 if 0.0 > x else
    x`` (what ``max`` returns, NaN included, at a third of the cost on CPython 3.11).
    """

    shape: JobShape
    runner: bool
    start_ts: int
    phases: tuple[str, ...]
    expected: dict[str, float]
    sigma: dict[str, float]
    step_prior: float  # seconds per step (all passes)
    warmup: float
    quantiles: dict[str, tuple[float, float]] = {}
    done: dict[str, float] = {}
    phase: str | None = None
    phase_start_ts: int | None = None
    total_steps: int = 0
    steps_done: int = 0
    first_step_s: float | None = None
    expert: str | None = None
    segment_sum: float = 0.0  # observed seconds in the current expert's segment
    segment_n: float = 0.0  # weighted count of those steps
    segment_prior: float = 0.0  # the current segment's prior step mean
    steps_seen: int = 0
    last_step_ts: int | None = None
    last_remaining: float | None = None
    last_ts: int | None = None
    last_band: float = 0.0

    @classmethod
    def start(cls, event: JobStarted, calibration: Calibration) -> LiveJob:
        """Expected phase durations at the start of a job."""
        shape, runner = JobShape.of(event), driven_by_runner(event)
        return cls.from_prior(event, shape, runner, Prior.of(shape, runner, calibration),
                              calibration)

    @classmethod
    def from_prior(cls, event: JobStarted, shape: JobShape, runner: bool, prior: Prior,
                   calibration: Calibration) -> LiveJob:
        """The estimator of the job ``event`` starts, from its (possibly shared) ``prior``.

        The dictionaries are copied: a job's estimator is its own, whoever else got the prior.
        """
        step = prior.step
        return cls(shape=shape, runner=runner, start_ts=event.ts, phases=prior.phases,
                   expected=dict(prior.expected), sigma=dict(prior.sigma), step_prior=step,
                   warmup=prior.warmup, quantiles=dict(calibration.quantiles),
                   total_steps=shape.steps, segment_prior=step)

    # -- observations ---------------------------------------------------------------------

    def observe(self, event: Event) -> None:
        """Update the estimator with one of its job's events (after its ``JobStarted``).

        Stages and steps are what it learns from; any other event changes nothing.
        """
        if type(event) is StepEnded:  # most of a job's events: tested first
            self.step_ended(event.total_steps, event.duration_s, event.expert, event.ts)
        elif type(event) is StageStarted:
            self.stage_started(event.stage, event.ts)
        elif type(event) is StageEnded:
            self.stage_ended(event.stage, event.duration_s)

    def stage_started(self, stage: str, ts: int) -> None:
        """A phase began."""
        if stage not in self.expected and stage in ("load", "save"):
            return
        self.phase, self.phase_start_ts = stage, ts
        if stage == "denoise" and self.last_step_ts is None:
            self.last_step_ts = ts

    def stage_ended(self, stage: str, duration_s: float) -> None:
        """A phase ended after ``duration_s``."""
        self.done[stage] = self.done.get(stage, 0.0) + duration_s
        if self.phase == stage:
            self.phase, self.phase_start_ts = None, None
        if stage == "text_encode" and "load" in self.phases and "load" not in self.done:
            self.done["load"] = 0.0  # an embedded job: nothing was loaded after all

    def step_ended(self, total_steps: int, duration_s: float | None, expert: str | None,
                   ts: int) -> None:
        """One more denoising step, of ``total_steps``, measured as ``duration_s`` (or not).

        The loop has at least the steps seen; each expert is a segment of its own.
        """
        steps_done = self.steps_done = self.steps_done + 1
        total_steps = steps_done if steps_done > total_steps else total_steps  # max()
        if total_steps != self.total_steps:  # written only when it changes: a write to a
            self.total_steps = total_steps  # Struct's field costs four times a read
        self.last_step_ts = ts
        if expert != self.expert:
            if self.expert is not None and self.segment_n > 0:
                # A new expert: same size, so start from the prior scaled by what we saw.
                self.segment_prior = self._step_mean()
            self.expert = expert
            self.segment_sum, self.segment_n = 0.0, 0.0
        if duration_s is None:
            return
        steps_seen = self.steps_seen = self.steps_seen + 1
        if steps_seen == 1:
            self.first_step_s = duration_s
            weight, value = WARMUP_WEIGHT, duration_s / max(self.warmup, 1e-6)
        else:
            weight, value = 1.0, duration_s
        self.segment_sum += weight * value
        self.segment_n += weight

    # -- the estimate ---------------------------------------------------------------------

    def _speed(self) -> float:
        """How fast this job runs against its prior, from finished phases, shrunk towards 1.

        Each phase's observed/expected ratio is clipped to [1/3, 3] and phases expected to
        take under 5 ms are ignored: a 100 µs phase that took 1 ms says nothing about how
        long the decode will take. Load and save (imports, disks) are left out.
        """
        done = self.done
        if not done:  # what the loop gives for no phase: (1.0 + 0.0) / (1.0 + 0), exactly
            return 1.0
        expected_of = self.expected.get
        total, count = 0.0, 0
        for phase, seconds in done.items():
            if phase in SPEED_EXCLUDED or phase == "denoise":
                continue
            expected = expected_of(phase, 0.0)
            if expected < MIN_SPEED_PHASE_S:
                continue
            total += min(max(seconds / expected, 1 / 3), 3.0)
            count += 1
        return (PRIOR_PHASES + total) / (PRIOR_PHASES + count)

    def _step_mean(self, speed: float | None = None) -> float:
        """Seconds per step from here on: the segment's prior (scaled by the job's ``speed``
        until a step is measured), updated with the segment's observed steps.

        ``speed`` is ``_speed()`` where the caller has it.
        """
        prior = self.segment_prior
        if self.steps_seen == 0:
            prior *= self._speed() if speed is None else speed
        return (PRIOR_STEPS * prior + self.segment_sum) / (PRIOR_STEPS + self.segment_n)

    def _steps_left(self) -> int:
        """Denoising steps still to run."""
        left = self.total_steps - self.steps_done
        return 0 if 0 > left else left  # max(left, 0)

    def estimate(self, now: int) -> Estimate:
        """Remaining seconds at time ``now`` (ns), with its interval."""
        remaining, low, high, progress, estimating = self.estimate_fields(now)
        return Estimate(remaining_s=remaining, p10_s=low, p90_s=high, progress=progress,
                        estimating=estimating)

    def estimate_fields(self, now: int) -> tuple[float, float, float, float, bool]:
        """``estimate(now)``'s fields in order: remaining, p10, p90, progress, estimating.

        The remaining time is the sum of the remaining parts (``_parts``), damped against the
        previous ETA (``damp_rise``); progress is the share of the predicted duration already
        elapsed. The p10–p90 interval is the calibration's quantiles of actual/predicted for
        the progress bucket where it has them; else a log-normal whose relative spread is the
        parts' errors added in quadrature (written here, not in a helper of its own: one call
        fewer per ETA). Issuing it is an observation too: the next ETA is damped against this
        one. Sums stay ``sum()`` (its NaN propagation differs from a loop's), so replayed ETAs
        are bit-identical.
        """
        elapsed = (now - self.start_ts) / 1e9
        elapsed = 0.0 if 0.0 > elapsed else elapsed  # max(elapsed, 0.0)
        seconds, variances = self._parts(now, self._speed())
        remaining = damp_rise(sum(seconds, 0.0),  # a float even with nothing left
                              self.last_remaining, self.last_ts, self.last_band, now)
        total = elapsed + remaining
        progress = elapsed / total if total > 0 else 0.0
        if remaining <= 0:
            low = high = 0.0
        # bucket_of only when there is a quantile to find: it cannot raise.
        elif (quantiles := self.quantiles) and (bucket := bucket_of(progress)) in quantiles:
            q10, q90 = quantiles[bucket]
            low, high = remaining * q10, remaining * q90
        else:
            spread = sqrt(sum(variances)) / remaining
            low, high = remaining * exp(-Z90 * spread), remaining * exp(Z90 * spread)
        self.last_remaining, self.last_ts, self.last_band = remaining, now, high - remaining
        return remaining, low, high, progress, self.steps_seen < 2

    def _parts(self, now: int, speed: float) -> tuple[list[float], list[float]]:
        """Each remaining part's seconds, and the square of those times its relative sigma
        (the part's variance, in s², which the interval adds up: squared here, where each is
        made, rather than in a comprehension of its own, which costs a frame per ETA).

        The current phase (before anything happened: the first, under way since the start),
        then every phase after it not done yet; between phases, every phase not done yet. A
        stage outside the plan counts nothing. Phases yet to start take their expected
        duration at the job's speed; the denoise loop, its steps left at the step mean.
        """
        phases, current, done = self.phases, self.phase, self.done
        seconds: list[float] = []
        variances: list[float] = []
        if current is None and not done:
            current = phases[0] if phases else None
            phase_start = self.start_ts
        else:
            phase_start = self.phase_start_ts or now
        upcoming = phases  # between phases: every phase not done yet is to come
        if current is not None:
            try:
                index = phases.index(current)
            except ValueError:  # a stage outside the plan: nothing is counted
                return seconds, variances
            if current == "denoise":
                # The steps left at the step mean, less the part of the next step already
                # under way (at most one step); the loop's sigma narrows with every step
                # measured.
                mean = self._step_mean(speed)
                since_step = (now - (self.last_step_ts or now)) / 1e9
                part = mean * self._steps_left() - (mean if mean < since_step else since_step)
                part = 0.0 if 0.0 > part else part  # max(part, 0.0)
                sigma = self.sigma["denoise"] / sqrt(1.0 + self.segment_n)
            else:
                sigma = self.sigma[current]
                part = conditional_remaining(self.expected[current] * speed, sigma,
                                             (now - phase_start) / 1e9)
            seconds.append(part)
            variances.append((part * sigma) ** 2)
            upcoming = phases[index + 1:]
        for phase in upcoming:
            if phase in done:
                continue
            if phase == "denoise":
                part = self._step_mean(speed) * self._steps_left()
            else:
                part = self.expected[phase] * speed
            seconds.append(part)
            variances.append((part * self.sigma[phase]) ** 2)
        return seconds, variances
