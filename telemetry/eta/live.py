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
from telemetry.events import JobStarted

PRIOR_STEPS: Final = 2.0  # the prior's weight, in steps, against observed step durations
PRIOR_PHASES: Final = 1.0  # the prior's weight, in phases, against observed phase ratios
WARMUP_WEIGHT: Final = 0.3  # how much the first step counts towards the step mean
Z90: Final = 1.2816  # standard normal quantile of 0.9
SPEED_EXCLUDED: Final = frozenset({"load", "save"})  # imports and disks say nothing of speed
MIN_SPEED_PHASE_S: Final = 0.005
#: ``pow``'s exponents for ``map``: squares each part as ``x ** 2`` did (same rounding, same
#: OverflowError), without a comprehension per estimate. Longer than any job's phase list.
SQUARES: Final = (2,) * 16


def damp_rise(remaining: float, last_remaining: float | None, last_ts: int | None,
              last_band: float, now: int) -> float:
    """``remaining`` as issued after the previous ETA (``last_*``, issued at ``last_ts``).

    A rise within the previous interval is noise and passes; beyond it, only half of the
    excess is taken per update, so one slow step cannot throw the ETA back, while a real
    slowdown still shows within a few updates. The one place of this rule: the ETA
    projection's inlined estimate calls it too.
    """
    if last_remaining is None or last_ts is None:
        return remaining
    ceiling = last_remaining - (now - last_ts) / 1e9
    if 0.0 > ceiling:  # noqa: PLR1730 - max() without the call
        ceiling = 0.0
    ceiling += last_band
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


class DenoiseRest(NamedTuple):
    """The parts of an estimate in the running denoise loop that its steps leave unchanged.

    ``seconds`` and ``squares`` start with a slot for the loop's own part, which changes with
    every step: whoever estimates fills it in, and each sum is then over one list built once.
    """

    speed: float  # _speed()
    seconds: list[float]  # [the loop's part, then each phase after it not done yet]: seconds
    weighted: tuple[float, ...]  # the phases after the loop: seconds × relative sigma
    squares: list[float] | None  # [the loop's part, *weighted]: squared as the interval does
    sigma: float  # the loop's relative sigma, before the steps seen narrow it


class PriorCache:
    """``LiveJob.start`` with its priors memoised per (shape, runner) for one calibration.

    A fleet runs few distinct shapes, and working a prior out (component keys, coefficient
    look-ups, features) costs ~20 µs: most of a replay's per-job cost. The cache holds the
    calibration it was filled under and is emptied when another one is passed, so what it
    returns is exactly what ``LiveJob.start`` would; it is a speed-up, never part of a state.
    With each prior it keeps the job's first estimate (``start_estimated``).
    """

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._calibration: Calibration | None = None
        self._priors: dict[tuple[JobShape, bool], tuple[Prior, _Memo]] = {}

    def start(self, event: JobStarted, calibration: Calibration) -> LiveJob:
        """``LiveJob.start(event, calibration)``."""
        return self._start(event, calibration)[0]

    def start_estimated(self, event: JobStarted, calibration: Calibration
                        ) -> tuple[LiveJob, tuple[float, float, float, float, bool] | None]:
        """``LiveJob.start(event, calibration)`` and its ``estimate_fields(event.ts)``.

        At its start a job has seen nothing and no time has passed (with an integer ``ts``,
        every elapsed time is exactly 0.0), so its first estimate depends on its prior, its
        shape's steps and the calibration's quantiles alone: the same for every job of a cache
        entry, worked out once. The estimator is left as that call leaves it. ``None`` instead
        of the fields where working them out raises (a calibration with an absurd sigma) or
        ``ts`` is no integer: the caller calls ``estimate_fields`` itself, which then raises
        or gives what it gives.
        """
        live, memo = self._start(event, calibration)
        if type(event.ts) is not int:
            return live, None
        first = memo.first
        if first is None:
            if memo.raises:
                return live, None
            try:
                first = live.estimate_fields(event.ts)
            except Exception:
                memo.raises = True
                return live, None
            memo.first, memo.band = first, live.last_band
        else:
            live.last_remaining, live.last_ts, live.last_band = first[0], event.ts, memo.band
        return live, first

    def _start(self, event: JobStarted, calibration: Calibration) -> tuple[LiveJob, _Memo]:
        """The estimator, and the memo of its cache entry."""
        shape = JobShape.of(event)
        runner = "load" in str(event.options.get("stages", ""))
        priors = self._priors
        if calibration is not self._calibration:  # identity: the cache holds a reference
            priors.clear()
            self._calibration = calibration
        key = (shape, runner)
        entry = priors.get(key)
        if entry is None:
            if len(priors) >= self.limit:
                priors.clear()
            entry = priors[key] = (Prior.of(shape, runner, calibration), _Memo())
        return LiveJob.from_prior(event, shape, runner, entry[0], calibration), entry[1]


class _Memo:
    """A ``PriorCache`` entry's first estimate, once worked out."""

    __slots__ = ("band", "first", "raises")

    def __init__(self) -> None:
        self.first: tuple[float, float, float, float, bool] | None = None
        self.band = 0.0  # the estimator's last_band after it
        self.raises = False  # working it out raised: never memoised


class LiveJob(msgspec.Struct, kw_only=True):
    """What the estimator keeps about one running job (part of the ETA projection's state)."""

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
        shape = JobShape.of(event)
        runner = "load" in str(event.options.get("stages", ""))
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

    def step_ended(self, *, total_steps: int, duration_s: float | None, expert: str | None,
                   ts: int) -> None:
        """One more denoising step."""
        self.total_steps = max(total_steps, self.steps_done + 1)
        self.steps_done += 1
        self.last_step_ts = ts
        if expert != self.expert:
            if self.expert is not None and self.segment_n > 0:
                # A new expert: same size, so start from the prior scaled by what we saw.
                self.segment_prior = self._step_mean()
            self.expert = expert
            self.segment_sum, self.segment_n = 0.0, 0.0
        if duration_s is None:
            return
        self.steps_seen += 1
        if self.steps_seen == 1:
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
        """Seconds per step from here on; ``speed`` is ``_speed()`` where the caller has it."""
        prior = self.segment_prior
        if self.steps_seen == 0:
            prior *= self._speed() if speed is None else speed
        return (PRIOR_STEPS * prior + self.segment_sum) / (PRIOR_STEPS + self.segment_n)

    def estimate(self, now: int) -> Estimate:
        """Remaining seconds at time ``now`` (ns), with its interval."""
        remaining, low, high, progress, estimating = self.estimate_fields(now)
        return Estimate(remaining_s=remaining, p10_s=low, p90_s=high, progress=progress,
                        estimating=estimating)

    def estimate_fields(self, now: int) -> tuple[float, float, float, float, bool]:
        """``estimate(now)``'s fields in order: remaining, p10, p90, progress, estimating.

        The reference implementation of the estimate. The ETA projection issues a dozen per
        job, replayed by the hundred thousand: it calls this one at a job's stage boundaries,
        takes a job's first from ``PriorCache.start_estimated`` and, at steps in the denoise
        loop, inlines the case ``current == "denoise"`` with ``denoise_rest()`` (keep the two
        the same). So it builds no ``Estimate``, works the speed out once, reads each attribute
        once, and spells ``max(a, b)`` as ``b if b > a else a`` (what ``max`` does, without
        the call). Every float is computed from the same operands in the same order as ever,
        and sums stay ``sum()`` (its NaN propagation differs from a loop's): replayed ETAs are
        bit-identical.
        """
        done = self.done
        speed = self._speed() if done else 1.0  # _speed()'s own shortcut, without the call
        start_ts = self.start_ts
        elapsed = (now - start_ts) / 1e9
        if 0.0 > elapsed:  # noqa: PLR1730 - max() without the call
            elapsed = 0.0
        phases = self.phases
        current = self.phase
        if current is None and not done:
            current = phases[0] if phases else None
            phase_start = start_ts
        else:
            phase_start = self.phase_start_ts or now
        seconds: list[float] = []  # each remaining part's seconds…
        weighted: list[float] = []  # …times its relative sigma (for the interval)
        if current is None:  # between phases: every phase not done yet is to come
            self._rest(phases, speed, seconds, weighted)
        else:  # the current phase, then those after it not done yet (before it: none)
            try:
                index = phases.index(current)
            except ValueError:  # a stage outside the plan: nothing is counted
                pass
            else:
                if current == "denoise":
                    part, sigma = self._denoise_left(now, speed)
                else:
                    sigma = self.sigma[current]
                    part = conditional_remaining(self.expected[current] * speed, sigma,
                                                 (now - phase_start) / 1e9)
                seconds.append(part)
                weighted.append(part * sigma)
                self._rest(phases[index + 1:], speed, seconds, weighted)
        remaining = damp_rise(sum(seconds, 0.0),  # a float even with nothing left
                              self.last_remaining, self.last_ts, self.last_band, now)
        total = elapsed + remaining
        progress = elapsed / total if total > 0 else 0.0
        if remaining <= 0:
            low = high = 0.0
        else:
            quantiles = self.quantiles
            # bucket_of only when there is a quantile to find: it cannot raise.
            if quantiles and (bucket := bucket_of(progress)) in quantiles:
                q10, q90 = quantiles[bucket]
                low, high = remaining * q10, remaining * q90
            else:
                spread = sqrt(sum(map(pow, weighted, SQUARES))) / remaining
                low, high = remaining * exp(-Z90 * spread), remaining * exp(Z90 * spread)
        self.last_remaining, self.last_ts, self.last_band = remaining, now, high - remaining
        return remaining, low, high, progress, self.steps_seen < 2

    def _denoise_left(self, now: int, speed: float) -> tuple[float, float]:
        """Seconds left in the running denoise loop, and their relative sigma."""
        steps_left = self.total_steps - self.steps_done
        if 0 > steps_left:  # noqa: PLR1730 - max() without the call
            steps_left = 0
        prior = self.segment_prior  # _step_mean(speed), without the call
        if self.steps_seen == 0:
            prior *= speed
        mean = (PRIOR_STEPS * prior + self.segment_sum) / (PRIOR_STEPS + self.segment_n)
        since_step = (now - (self.last_step_ts or now)) / 1e9
        seconds = mean * steps_left - (mean if mean < since_step else since_step)
        if 0.0 > seconds:  # noqa: PLR1730 - max() without the call
            seconds = 0.0
        return seconds, self.sigma["denoise"] / sqrt(1.0 + self.segment_n)

    def _rest(self, phases: tuple[str, ...], speed: float, seconds: list[float],
              weighted: list[float]) -> None:
        """Append each of ``phases`` not done yet: its seconds, and those times its relative
        sigma. The estimate's parts after the current phase (all of them between phases)."""
        done, expected, sigma_of = self.done, self.expected, self.sigma
        for phase in phases:
            if phase in done:
                continue
            if phase == "denoise":
                steps_left = self.total_steps - self.steps_done
                if 0 > steps_left:  # noqa: PLR1730 - max() without the call
                    steps_left = 0
                part = self._step_mean(speed) * steps_left
            else:
                part = expected[phase] * speed
            seconds.append(part)
            weighted.append(part * sigma_of[phase])

    def denoise_rest(self) -> DenoiseRest | None:
        """What an estimate in the running denoise loop takes besides the step fields.

        ``None`` unless the loop is running. Steps change none of it (only a phase's start or
        end does), so the ETA projection works it out once for a run of a job's steps.
        """
        phases = self.phases
        if self.phase != "denoise" or "denoise" not in phases:
            return None
        speed = self._speed() if self.done else 1.0
        seconds: list[float] = [0.0]  # the loop's part: filled in at each estimate
        weighted: list[float] = []
        self._rest(phases[phases.index("denoise") + 1:], speed, seconds, weighted)
        try:  # pow(x, 2) as the interval does, the loop's part first: one fewer exponent
            squares: list[float] | None = [0.0, *map(pow, weighted, SQUARES[1:])]
        except OverflowError:  # the estimate raises it only where it needs the interval
            squares = None
        return DenoiseRest(speed, seconds, tuple(weighted), squares, self.sigma["denoise"])
