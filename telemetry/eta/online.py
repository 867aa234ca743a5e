"""Online calibration: what every completed job teaches the next, as part of a pure fold.

Nobody has to run ``wantel eta fit`` for the ETA to learn. When a job completes, each phase it
ran says how far the *base* expectation (the published priors, or the latest explicit
calibration) was from what happened, as a log ratio ``r = log(observed ÷ expected)``. Those
ratios are learned at three levels, each explaining what the levels above it left over:

``device``
    how fast this machine runs against the base right now (a busy node, another GPU): the
    median of the job's ratios, so one anomalous phase does not move it;
``component``
    how wrong the base is for a component (the VAE's decode, one transformer's pass) here,
    as a line in the log of the job's size (tokens, pixels): a prior whose exponent is off
    (attention's quadratic term, a cache that stops fitting) is corrected across sizes, not
    only at the sizes seen (a ridge keeps the slope at 0 until sizes differ enough);
``family``
    the same component for this exact shape (a service that gets the same requests).

A component is keyed with the job's speed options (offload, quantization, compile…): a new
set of options starts from the device's speed and the base, and learns its own line.

Each level keeps an exponentially weighted mean of its residuals with a cap on its memory, so
it adapts when the machine's speed changes and its cost per job stays flat however long the
history (a few dictionary updates per phase). A job's expected phase durations are the base
times ``exp`` of the sum of the levels' means, each shrunk towards zero by how little it has
seen. Residuals are Huber-clipped against each level's own spread, so a job disturbed by a
neighbour teaches little. The same statistics give each component's predictive spread (how
wrong the corrected expectation was: the interval's width) and the first step's warm-up; the
spreads learn only from phases whose expectation *was* corrected (a job started at its base
measures the base's error, which the device level removes at once).

The interval is then calibrated online too (adaptive conformal inference, Gibbs & Candès
2021): per progress bucket, a log-offset of the p10 and of the p90 moves by ``GAMMA`` times
(missed − 10 %) each time an ETA is scored, so each side misses about 10 % of the time
whatever the machine does — a p10–p90 interval that covers ~80 % because it is made to.

Everything here is deterministic: a replay of the log learns exactly what the live fold did.
An explicit calibration (``EtaCalibrated``) replaces what was learned before it (the fit saw
those jobs too); online learning goes on on top of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Final

import msgspec

#: Memory of each level, in jobs (an exponentially weighted mean's 1/alpha once it is full):
#: the machine's speed changes fastest, a component's error hardly at all.
MEMORY: Final = {"device": 6.0, "component": 24.0, "family": 8.0}
#: Shrinkage of each level's mean towards 0: ``mean × n / (n + SHRINK)``. Small: one job of
#: evidence about this machine outweighs a published figure for another.
SHRINK: Final = {"device": 0.1, "component": 0.5, "family": 1.0}
#: A component's line needs its sizes to differ by this much (Σ (log size − mean)², in jobs)
#: before its slope counts fully: the ridge that keeps one size from tilting it.
SLOPE_RIDGE: Final = 2.0
#: A residual beyond this many of its level's spreads counts only that far (Huber).
HUBER_K: Final = 2.5
#: The spread a level starts with before it has seen two residuals (log units: a factor ~2).
START_SPREAD: Final = 0.7
#: How many family statistics to keep (oldest forgotten): a fleet runs few distinct shapes.
MAX_FAMILIES: Final = 4096
#: The adaptive-conformal step, and the miss rate each side of the interval aims at.
GAMMA: Final = 0.1
MISS: Final = 0.09
#: Offsets stay within these (log units): never a zero-width or an absurd interval.
OFFSET_RANGE: Final = (-1.0, 2.0)
#: The phases whose speed says how fast the job computes (``step``: a transformer pass).
#: Not load or save (imports, disks), nor postprocess (milliseconds, mostly noise).
SPEED_PHASES: Final = frozenset({"text_encode", "image_encode", "latent_init", "step",
                                 "decode"})
#: The least spread of job speeds assumed (log units): even a steady machine has bad days.
MIN_SPEED_SPREAD: Final = 0.03
MIN_SPEED_VARIANCE: Final = MIN_SPEED_SPREAD * MIN_SPEED_SPREAD
#: A log ratio of observed to expected is taken as at most this (a factor of ~1100).
RATIO_LIMIT: Final = 7.0
#: The statistics of one key: [mean, mean absolute deviation, weight].
Stats = list[float]


class Learned(msgspec.Struct, kw_only=True):
    """What completed jobs taught since the last explicit calibration (part of the ETA state).

    ``levels``: device key → [mean, spread, weight] of log residuals; ``components``: key →
    the weighted sums of a line fitted to the residuals against log size, [Σw, Σwx, Σwx²,
    Σwy, Σwxy, spread]; ``shared``: device key → [mean product of two phases' prediction
    errors in one job, weight] — the variance of job speed the phases share (τ², see
    :func:`speed_spread`); ``families`` the same as levels for exact shapes
    (bounded); ``error``: component key → [mean |predictive log error|, weight];
    ``warmup``: step component → [mean log(first step ÷ later steps), spread, weight];
    ``offsets``: bucket → (p10 offset, p90 offset) (log units, adaptive conformal), a dict
    replaced, never changed, when it moves: a running job's estimator holds the one it
    started with;
    ``jobs``: completed jobs learned from.
    """

    levels: dict[str, Stats] = {}
    components: dict[str, list[float]] = {}
    shared: dict[str, list[float]] = {}
    families: dict[str, Stats] = {}
    error: dict[str, list[float]] = {}
    warmup: dict[str, Stats] = {}
    offsets: dict[str, tuple[float, float]] = {}
    jobs: int = 0


class PhaseKeys(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """The keys a phase's (or a transformer pass's) cost is learned under, most general first,
    and the log of the job's size for it (tokens for a pass, pixels for the VAE; 0 for a phase
    whose cost does not grow with the job)."""

    device: str
    component: str
    family: str
    size: float = 0.0


def shrunk(stats: Stats | None, shrink: float) -> float:
    """A level's mean, shrunk towards 0 by how little it has seen (0 for nothing)."""
    if stats is None:
        return 0.0
    mean, _spread, weight = stats
    return mean * weight / (weight + shrink)


def on_line(sums: list[float] | None, size: float) -> float:
    """A component's fitted log residual at ``size``: the ridge-regularised line through its
    weighted residuals (0 for nothing seen). With one size seen, it is their mean."""
    if sums is None:
        return 0.0
    weight, sx, sxx, sy, sxy, _spread = sums
    mean_x, mean_y = sx / weight, sy / weight
    slope = (sxy - sx * mean_y) / (sxx - sx * mean_x + SLOPE_RIDGE)
    return mean_y + slope * (size - mean_x)


def correction(learned: Learned, keys: PhaseKeys, device: float | None = None) -> float:
    """The log factor the levels apply to a base expectation with these keys (``device``:
    the device level's share, where the caller has it already)."""
    if device is None:
        device = shrunk(learned.levels.get(keys.device), SHRINK["device"])
    sums = learned.components.get(keys.component)
    component = 0.0 if sums is None else (
        on_line(sums, keys.size) * sums[0] / (sums[0] + SHRINK["component"]))
    family = learned.families.get(keys.family)
    return device + component + (0.0 if family is None else shrunk(family, SHRINK["family"]))


def update_line(sums: list[float] | None, size: float, value: float,
                memory: float) -> list[float]:
    """One more residual into a component's line: Huber-clipped against its spread, older
    ones decayed so the sums weigh at most ``memory`` jobs."""
    if sums is None:
        return [1.0, size, size * size, value, size * value, START_SPREAD]
    weight, spread = sums[0], sums[5]
    fitted = on_line(sums, size)
    limit = HUBER_K * max(spread, 0.02)
    deviation = value - fitted
    clipped = -limit if deviation < -limit else (limit if deviation > limit else deviation)
    value = fitted + clipped
    decay = 1.0 if weight + 1.0 <= memory else (memory - 1.0) / weight
    sums[0] = decay * weight + 1.0
    sums[1] = decay * sums[1] + size
    sums[2] = decay * sums[2] + size * size
    sums[3] = decay * sums[3] + value
    sums[4] = decay * sums[4] + size * value
    sums[5] = spread + (abs(clipped) - spread) / sums[0]
    return sums


def predictive_sigma(learned: Learned, component: str, fallback: float) -> float:
    """How wrong corrected expectations of this component have been (relative, ~ a standard
    deviation: 1.25 × the mean absolute log error), once three jobs have shown it; else
    ``fallback``."""
    error = learned.error.get(component)
    if error is None or error[1] < 3:
        return fallback
    return max(1.25 * error[0], 0.03)


def speed_spread(learned: Learned, device: str, fallback: float) -> float:
    """How much a job's speed varies on this device, in log units (τ): the square root of
    the mean product of two phases' prediction errors within a job (their covariance: what
    they share, which independent errors do not), once five jobs have shown it; else
    ``fallback``."""
    shared = learned.shared.get(device)
    if shared is None or shared[1] < 5:
        return fallback
    return math.sqrt(shared[0]) if shared[0] > MIN_SPEED_VARIANCE else MIN_SPEED_SPREAD


def warmup(learned: Learned, component: str, fallback: float) -> float:
    """The first step's duration ÷ a later step's, as learned; else ``fallback``."""
    stats = learned.warmup.get(component)
    if stats is None:
        return fallback
    return math.exp(stats[0])


def update(stats: Stats | None, value: float, memory: float) -> Stats:
    """One more residual into a level's statistics: an exponentially weighted mean and mean
    absolute deviation, the residual Huber-clipped against the spread seen so far."""
    if stats is None:
        return [value, START_SPREAD, 1.0]
    mean, spread, weight = stats
    limit = HUBER_K * max(spread, 0.02)
    deviation = value - mean
    clipped = -limit if deviation < -limit else (limit if deviation > limit else deviation)
    weight = weight + 1.0 if weight + 1.0 < memory else memory
    alpha = 1.0 / weight
    stats[0] = mean + alpha * clipped
    stats[1] = spread + alpha * (abs(clipped) - spread) if weight > 1.0 else spread
    stats[2] = weight
    return stats


class Observation(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One phase of a completed job: its keys, base and corrected expectation, and what it
    took (all in seconds; for the transformer, per step)."""

    phase: str
    keys: PhaseKeys
    base: float
    expected: float
    observed: float


def learn(learned: Learned, observations: list[Observation], warmup_key: str | None,
          warmup_ratio: float | None) -> None:
    """Learn from one completed job's phases (and its first step's warm-up), in place.

    (C twin: ``telemetry.eta._live.learn``, the ETA projection's choice with its estimator.)
    """
    ratios = [(o, clamp_ratio(math.log(o.observed / o.base))) for o in observations
              if o.observed > 0 and o.base > 0 and o.expected > 0]
    if not ratios:
        return
    levels = learned.levels
    device = ratios[0][0].keys.device
    stats = levels[device] = update(levels.get(device), _median([r for _, r in ratios]),
                                    MEMORY["device"])
    speed = stats[0]
    # The spreads learn how wrong *corrected* expectations are: a phase the job started with
    # at its base (nothing learned yet on this device, or since an explicit calibration)
    # measures the base's error, which the device level removes at once — counted, a prior
    # 5× off would keep the interval wide for the spreads' whole memory.
    misses = [ratio - math.log(o.expected / o.base) for o, ratio in ratios
              if o.phase in SPEED_PHASES and o.expected != o.base]
    if len(misses) > 1:
        total = square = 0.0  # added in order (not sum(): Python 3.12's rounds differently)
        for value in misses:
            total += value
            square += value * value
        pairs = len(misses) * (len(misses) - 1) / 2
        product = (total * total - square) / 2 / pairs  # the mean over distinct pairs
        shared = learned.shared.get(device)
        learned.shared[device] = ([product, 1.0] if shared is None
                                  else _mean_into(shared, product, MEMORY["device"] * 2))
    for observation, ratio in ratios:
        keys = observation.keys
        if observation.expected != observation.base:
            error = learned.error.get(keys.component)
            miss = abs(ratio - math.log(observation.expected / observation.base))
            learned.error[keys.component] = (
                [miss, 1.0] if error is None else _mean_into(error, miss, MEMORY["component"]))
        learn_beyond_device(learned, keys, ratio - speed)
    if warmup_key is not None and warmup_ratio is not None and warmup_ratio > 0:
        learned.warmup[warmup_key] = update(learned.warmup.get(warmup_key),
                                            clamp_ratio(math.log(warmup_ratio)),
                                            MEMORY["component"])
    learned.jobs += 1


def learn_beyond_device(learned: Learned, keys: PhaseKeys, left: float) -> None:
    """What a phase's log ratio ``left`` over by the device level teaches the levels below it,
    in place: its component's line, then its exact family (re-inserted: the newest is kept
    longest; beyond ``MAX_FAMILIES`` the oldest is forgotten)."""
    sums = learned.components[keys.component] = update_line(
        learned.components.get(keys.component), keys.size, left, MEMORY["component"])
    left -= on_line(sums, keys.size)
    families = learned.families
    family = families.pop(keys.family, None)
    families[keys.family] = update(family, left, MEMORY["family"])
    if len(families) > MAX_FAMILIES:
        del families[next(iter(families))]


def score_intervals(learned: Learned, misses: Iterable[tuple[str, float, float]]) -> None:
    """A completed job's intervals in each bucket missed below (the actual remaining time
    was under the p10) and above (over the p90) these shares of the time: move each bucket's
    offsets so each side misses ``MISS`` of the time (adaptive conformal inference, one step
    per job and bucket: a job's ETAs in one bucket share their errors). The offsets dict is
    replaced, never changed (running jobs hold the one they started with)."""
    offsets = dict(learned.offsets)
    lowest, highest = OFFSET_RANGE
    for bucket, below, above in misses:
        low, high = offsets.get(bucket, (0.0, 0.0))
        low += GAMMA * (below - MISS)
        high += GAMMA * (above - MISS)
        offsets[bucket] = (lowest if low < lowest else (highest if low > highest else low),
                           lowest if high < lowest else (highest if high > highest else high))
    learned.offsets = offsets


def clamp_ratio(ratio: float) -> float:
    """A log ratio within ±``RATIO_LIMIT``: a zero-length phase or a clock glitch must not
    teach (or show) a factor of e^-650. NaN stays NaN."""
    return -RATIO_LIMIT if ratio < -RATIO_LIMIT else (RATIO_LIMIT if ratio > RATIO_LIMIT
                                                      else ratio)


def _mean_into(stats: list[float], value: float, memory: float) -> list[float]:
    weight = stats[1] + 1.0 if stats[1] + 1.0 < memory else memory
    stats[0] += (value - stats[0]) / weight
    stats[1] = weight
    return stats


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


__all__ = ["Learned", "Observation", "PhaseKeys", "clamp_ratio", "correction", "learn",
           "predictive_sigma", "score_intervals", "speed_spread", "warmup"]
