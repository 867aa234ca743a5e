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
from typing import Final

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


class Estimate(msgspec.Struct, frozen=True, kw_only=True):
    """Seconds remaining with a p10–p90 interval, and progress as a fraction of time."""

    remaining_s: float
    p10_s: float
    p90_s: float
    progress: float
    estimating: bool  # fewer than two steps seen: show "estimating"

    def total_s(self, elapsed_s: float) -> float:
        """Predicted duration of the whole job."""
        return elapsed_s + self.remaining_s


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
        return cls(shape=shape, runner=runner, start_ts=event.ts, phases=phases,
                   expected=expected, sigma=sigma, step_prior=step, warmup=warmup,
                   quantiles=dict(calibration.quantiles), total_steps=shape.steps,
                   segment_prior=step)

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
        total, count = 0.0, 0
        for phase, seconds in self.done.items():
            if phase in SPEED_EXCLUDED or phase == "denoise":
                continue
            expected = self.expected.get(phase, 0.0)
            if expected < MIN_SPEED_PHASE_S:
                continue
            total += min(max(seconds / expected, 1 / 3), 3.0)
            count += 1
        return (PRIOR_PHASES + total) / (PRIOR_PHASES + count)

    def _step_mean(self) -> float:
        prior = self.segment_prior
        if self.steps_seen == 0:
            prior *= self._speed()
        return (PRIOR_STEPS * prior + self.segment_sum) / (PRIOR_STEPS + self.segment_n)

    def estimate(self, now: int) -> Estimate:
        """Remaining seconds at time ``now`` (ns), with its interval."""
        speed = self._speed()
        elapsed = max((now - self.start_ts) / 1e9, 0.0)
        parts: list[tuple[float, float]] = []  # (seconds, relative sigma)
        current = self.phase
        if current is None and not self.done:
            current = self.phases[0] if self.phases else None
            phase_start = self.start_ts
        else:
            phase_start = self.phase_start_ts or now
        reached = False
        for phase in self.phases:
            if phase in self.done and phase != current:
                continue
            if phase == current:
                reached = True
                parts.append(self._current(phase, (now - phase_start) / 1e9, now, speed))
            elif reached or current is None:
                if phase == "denoise":
                    steps_left = max(self.total_steps - self.steps_done, 0)
                    parts.append((self._step_mean() * steps_left, self.sigma[phase]))
                else:
                    parts.append((self.expected[phase] * speed, self.sigma[phase]))
        remaining = sum(seconds for seconds, _ in parts)
        if self.last_remaining is not None and self.last_ts is not None:
            # A rise within the previous interval is noise and passes; beyond it, only half of
            # the excess is taken per update, so one slow step cannot throw the ETA back,
            # while a real slowdown still shows within a few updates.
            ceiling = max(self.last_remaining - (now - self.last_ts) / 1e9, 0.0) + self.last_band
            if remaining > ceiling:
                remaining = ceiling + 0.5 * (remaining - ceiling)
        low, high = self._interval(remaining, parts, elapsed)
        self.last_remaining, self.last_ts, self.last_band = remaining, now, high - remaining
        total = elapsed + remaining
        return Estimate(remaining_s=remaining, p10_s=low, p90_s=high,
                        progress=elapsed / total if total > 0 else 0.0,
                        estimating=self.steps_seen < 2)

    def _current(self, phase: str, in_phase_s: float, now: int,
                 speed: float) -> tuple[float, float]:
        if phase == "denoise":
            mean = self._step_mean()
            steps_left = max(self.total_steps - self.steps_done, 0)
            since_step = (now - (self.last_step_ts or now)) / 1e9
            seconds = max(mean * steps_left - min(since_step, mean), 0.0)
            sigma = self.sigma[phase] / math.sqrt(1.0 + self.segment_n)
            return seconds, sigma
        expected = self.expected[phase] * speed
        return conditional_remaining(expected, self.sigma[phase], in_phase_s), self.sigma[phase]

    def _interval(self, remaining: float, parts: list[tuple[float, float]],
                  elapsed: float) -> tuple[float, float]:
        if remaining <= 0:
            return 0.0, 0.0
        total = elapsed + remaining
        bucket = bucket_of(elapsed / total if total > 0 else 0.0)
        if bucket in self.quantiles:
            q10, q90 = self.quantiles[bucket]
            return remaining * q10, remaining * q90
        sigma = math.sqrt(sum((s * w) ** 2 for s, w in parts)) / remaining
        return remaining * math.exp(-Z90 * sigma), remaining * math.exp(Z90 * sigma)
