"""Calibrate the cost model from completed jobs: robust least squares per component.

Each component's coefficients minimise a Huber loss of *relative* residuals (iteratively
reweighted least squares with weights 1/ŷ², as a Gamma GLM would: it estimates means, where
1/y² weights would bias every component low), because users judge an ETA by how far off it is
in proportion, and a few runs disturbed by a busy machine must not drag the fit. The systems are
tiny (at most three coefficients), so they are solved here in pure Python.

Each fit leans towards its component's prior *shape*, scaled to the data (:func:`robust_fit`):
a calibration is often fitted on a few shapes (a service's usual request, or the first jobs of
a fleet), and their samples may not tell an intercept from a per-pixel term. Unheld, such a fit
puts the whole cost in whichever term the noise favours: three 81-frame clips taught an image
encode of 2.6 s for any size, and a 1-frame still then took 0.39 s. Held to the prior's shape,
what the samples cannot say is taken from the prior, and what they can say wins.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from telemetry.eta.jobs import JobRecord
from telemetry.eta.model import (
    BUCKETS,
    CHECKPOINTS,
    DEFAULT_REL_SIGMA,
    PHASES,
    STEP,
    Calibration,
    bucket_of,
    component_key,
    features,
    prior_coefficients,
    speed_key,
    videos_of,
)
from telemetry.eta.online import MIN_SPEED_VARIANCE, SPEED_PHASES
from telemetry.pipelines import is_wan

#: How much the prior's shape weighs against a component's samples, in samples: a departure
#: from the prior's shape (scaled to the data) that moves the component's typical duration
#: by 100 % costs as much as one sample predicted 100 % off. Many samples that span the
#: features overrule it; samples that cannot tell two terms apart leave them in the prior's
#: proportion.
PRIOR_SHAPE_WEIGHT: Final = 1.0
HUBER_K: Final = 2.5  # in robust standard deviations: only gross outliers are down-weighted
IRLS_ROUNDS: Final = 20
MIN_QUANTILE_SAMPLES: Final = 8
#: The phases with a prior (a stage outside :data:`~telemetry.eta.model.PHASES` has none).
PRIOR_PHASES: Final = frozenset({*PHASES, STEP}) - {"denoise"}


@dataclass
class ComponentFit:
    """How one component was fitted: for ``wantel eta fit``'s report."""

    key: str
    samples: int
    coefficients: tuple[float, ...]
    rel_mae: float
    rel_sigma: float


@dataclass
class FitResult:
    """The calibration and its report."""

    calibration: Calibration
    components: list[ComponentFit] = field(default_factory=list)


class Ridge(NamedTuple):
    """A penalty ``strength[j] × (coefficient[j] − target[j])²`` added to a least-squares fit."""

    target: Sequence[float]
    strength: Sequence[float]


def solve(rows: Sequence[Sequence[float]], ys: Sequence[float],
          weights: Sequence[float], ridge: Ridge | None = None) -> list[float]:
    """Weighted least squares by normal equations, with a whisper of ridge for stability, and
    ``ridge`` if given (towards its targets)."""
    k = len(rows[0])
    a = [[0.0] * k for _ in range(k)]
    b = [0.0] * k
    for x, y, w in zip(rows, ys, weights, strict=True):
        for i in range(k):
            b[i] += w * x[i] * y
            for j in range(k):
                a[i][j] += w * x[i] * x[j]
    scale = max(a[i][i] for i in range(k)) or 1.0
    for i in range(k):
        a[i][i] += 1e-9 * scale
    if ridge is not None:
        for i in range(k):
            a[i][i] += ridge.strength[i]
            b[i] += ridge.strength[i] * ridge.target[i]
    # Gaussian elimination with partial pivoting.
    for col in range(k):
        pivot = max(range(col, k), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        b[col], b[pivot] = b[pivot], b[col]
        if abs(a[col][col]) < 1e-300:
            continue
        for r in range(col + 1, k):
            f = a[r][col] / a[col][col]
            for c in range(col, k):
                a[r][c] -= f * a[col][c]
            b[r] -= f * b[col]
    out = [0.0] * k
    for i in reversed(range(k)):
        if abs(a[i][i]) < 1e-300:
            continue
        out[i] = (b[i] - sum(a[i][j] * out[j] for j in range(i + 1, k))) / a[i][i]
    return out


def robust_fit(rows: Sequence[Sequence[float]], ys: Sequence[float],
               prior: Sequence[float] | None = None) -> list[float]:
    """Huber IRLS on relative residuals, and no coefficient that comes out negative: a
    duration is a sum of costs, none of which shrinks as the job grows (a line through a few
    noisy points that crosses zero predicts a 0 s phase at the sizes it did not see). A
    negative coefficient is dropped and the rest refitted.

    ``prior``: the component's prior coefficients. The fit then leans towards the prior's
    shape scaled to the samples (:func:`prior_ridge`, :data:`PRIOR_SHAPE_WEIGHT`), so samples
    at one size scale the prior rather than make its cost a constant. Without it, the fit
    uses no more coefficients than there are distinct rows."""
    k = len(rows[0])
    usable = k if prior is not None else min(k, max(1, len({tuple(r) for r in rows})))
    kept = list(range(usable))
    ridge = None if prior is None else prior_ridge(rows, ys, prior)
    while True:
        coefficients = _robust_fit(
            [[r[i] for i in kept] for r in rows], ys,
            None if ridge is None else Ridge([ridge.target[i] for i in kept],
                                             [ridge.strength[i] for i in kept]))
        negative = [i for i, c in zip(kept, coefficients, strict=True) if c < 0]
        if not negative or len(kept) == 1:
            break
        kept.remove(negative[0])
    out = [0.0] * k
    for i, c in zip(kept, coefficients, strict=True):
        out[i] = c
    return out


def prior_ridge(rows: Sequence[Sequence[float]], ys: Sequence[float],
                prior: Sequence[float]) -> Ridge | None:
    """The pull towards ``prior``'s shape: its coefficients times the samples' mean ratio to
    it, each held by :data:`PRIOR_SHAPE_WEIGHT` over the square of the change in that
    coefficient that would double the samples' typical duration (in the fit's relative
    units, so one sample 100 % off weighs as much). ``None`` where the prior predicts
    nothing for these samples."""
    predicted = [_dot(prior, x) for x in rows]
    ratios = [y / p for y, p in zip(ys, predicted, strict=True) if p > 0 and y > 0]
    if not ratios:
        return None
    scale = statistics.fmean(ratios)
    strength = []
    for j in range(len(rows[0])):
        per_unit = [p * scale / x[j] for x, p in zip(rows, predicted, strict=True)
                    if x[j] > 0 and p > 0]
        typical = statistics.median(per_unit) if per_unit else 0.0
        strength.append(PRIOR_SHAPE_WEIGHT / typical ** 2 if typical > 0 else 0.0)
    return Ridge([c * scale for c in prior], strength)


def _robust_fit(rows: Sequence[Sequence[float]], ys: Sequence[float],
                ridge: Ridge | None = None) -> list[float]:
    """Huber IRLS on relative residuals, every column of ``rows`` a coefficient."""
    weights = [1.0 / max(y, 1e-9) ** 2 for y in ys]
    coefficients = solve(rows, ys, weights, ridge)
    for _ in range(IRLS_ROUNDS):
        # Weights from the *prediction* (a Gamma-GLM-like fit: relative errors, yet means,
        # not the low-biased 1/y² estimate), times Huber's down-weighting of gross outliers.
        predicted = [max(_dot(coefficients, x), 1e-9) for x in rows]
        residuals = [(y - p) / p for y, p in zip(ys, predicted, strict=True)]
        sigma = _robust_sigma(residuals) or 1e-6
        weights = [min(1.0, HUBER_K * sigma / max(abs(r), 1e-12)) / (p * p)
                   for r, p in zip(residuals, predicted, strict=True)]
        updated = solve(rows, ys, weights, ridge)
        if max(abs(u - c) for u, c in zip(updated, coefficients, strict=True)) < 1e-12:
            break
        coefficients = updated
    return coefficients


def _dot(coefficients: Sequence[float], x: Sequence[float]) -> float:
    return sum(c * v for c, v in zip(coefficients, x, strict=False))


def _robust_sigma(residuals: Sequence[float]) -> float:
    """1.4826 × median absolute deviation: a standard deviation that ignores outliers."""
    if not residuals:
        return 0.0
    centre = statistics.median(residuals)
    return 1.4826 * statistics.median(abs(r - centre) for r in residuals)


def observations(records: Iterable[JobRecord]) -> dict[str, list[tuple[tuple[float, ...], float]]]:
    """(features, seconds) per component, from completed jobs: one video's seconds (a job of
    three videos per prompt decodes three; :func:`~telemetry.eta.model.videos_of`), and of a
    step, one pass's."""
    samples: dict[str, list[tuple[tuple[float, ...], float]]] = defaultdict(list)
    for record in records:
        shape = record.shape
        for phase, seconds in record.stage_durations.items():
            if phase != "denoise" and seconds > 0:
                samples[component_key(phase, shape)].append(
                    (features(phase, shape), seconds / videos_of(phase, shape)))
        later = record.step_durations[1:]
        if later:
            per_pass = statistics.fmean(later) / shape.passes / videos_of(STEP, shape)
            samples[component_key(STEP, shape)].append((features(STEP, shape), per_pass))
    return samples


def component_priors(records: Iterable[JobRecord]) -> dict[str, tuple[float, ...]]:
    """The prior coefficients of every component the jobs ran (the priors, not a
    calibration: a fit leans towards their shape), where the phase has one and the family's
    priors have a shape: Wan's. Another family's neutral prior assumes nothing of its layout
    (no token or pixel term), and a pull towards it would assume a flat cost."""
    out: dict[str, tuple[float, ...]] = {}
    for record in records:
        shape = record.shape
        if not is_wan(shape.family):
            continue
        for phase in (*record.stage_durations, STEP):
            key = component_key(phase, shape)
            if key not in out and phase in PRIOR_PHASES:
                out[key] = prior_coefficients(phase, shape)
    return out


def warmups(records: Iterable[JobRecord]) -> dict[str, float]:
    """Median first-step / later-step ratio per step component."""
    ratios: dict[str, list[float]] = defaultdict(list)
    for record in records:
        steps = record.step_durations
        if len(steps) >= 3:
            ratios[component_key(STEP, record.shape)].append(
                steps[0] / statistics.fmean(steps[1:]))
    return {key: statistics.median(values) for key, values in ratios.items()}


def speed_spreads(records: Iterable[JobRecord],
                  coefficients: dict[str, tuple[float, ...]]) -> dict[str, float]:
    """Per device class, how much a job's phases run faster or slower *together* (log units):
    the square root of the mean product of two compute phases' log errors within a job, over
    the jobs (a covariance: independent errors cancel out of it). Stored in ``rel_sigma``
    under :func:`~telemetry.eta.model.speed_key`; the live model weighs a job's own evidence
    of its speed against it."""
    products: dict[str, list[float]] = defaultdict(list)
    for record in records:
        shape = record.shape
        errors = []
        for phase, seconds in record.stage_durations.items():
            if phase in SPEED_PHASES and seconds > 0:
                predicted = _dot(coefficients.get(component_key(phase, shape), ()),
                                 features(phase, shape)) * videos_of(phase, shape)
                if predicted > 0:
                    errors.append(math.log(seconds / predicted))
        later = record.step_durations[1:]
        if later:
            predicted = _dot(coefficients.get(component_key(STEP, shape), ()),
                             features(STEP, shape)) * shape.passes * videos_of(STEP, shape)
            if predicted > 0 and statistics.fmean(later) > 0:
                errors.append(math.log(statistics.fmean(later) / predicted))
        if len(errors) > 1:
            total, square = sum(errors), sum(e * e for e in errors)
            pairs = len(errors) * (len(errors) - 1) / 2
            products[shape.device].append((total * total - square) / 2 / pairs)
    return {speed_key(device): math.sqrt(max(statistics.fmean(values), MIN_SPEED_VARIANCE))
            for device, values in products.items()}


def spread_of(relative: Sequence[float], coefficients: int) -> float:
    """A component's relative error, from its ``relative`` residuals after fitting
    ``coefficients``: their robust spread (at least 1.25 × their mean absolute value, and
    2 %) — or the prior's (:data:`~telemetry.eta.model.DEFAULT_REL_SIGMA`) where the samples
    are no more than the coefficients: fitted exactly, their zero residuals say nothing of
    the spread (a component seen once claimed 2 %, and the live estimate trusted it as a
    measurement)."""
    if len(relative) <= coefficients:
        return DEFAULT_REL_SIGMA
    return max(_robust_sigma(relative), statistics.fmean(abs(r) for r in relative) * 1.25,
               0.02)


def fit(records: Sequence[JobRecord]) -> FitResult:
    """Fit every component seen in ``records``, then the interval quantiles."""
    completed = [r for r in records if r.completed]
    result = FitResult(calibration=Calibration())
    coefficients: dict[str, tuple[float, ...]] = {}
    sigmas: dict[str, float] = {}
    priors = component_priors(completed)
    for key, samples in sorted(observations(completed).items()):
        rows = [x for x, _ in samples]
        ys = [y for _, y in samples]
        fitted = tuple(robust_fit(rows, ys, priors.get(key)))
        relative = [(y - _dot(fitted, x)) / y for x, y in samples]
        sigma = spread_of(relative, sum(1 for c in fitted if c != 0.0))
        coefficients[key], sigmas[key] = fitted, sigma
        result.components.append(ComponentFit(
            key=key, samples=len(samples), coefficients=fitted,
            rel_mae=statistics.fmean(abs(r) for r in relative), rel_sigma=sigma))
    sigmas.update(speed_spreads(completed, coefficients))
    base = Calibration(coefficients=coefficients, rel_sigma=sigmas,
                       warmup=warmups(completed), jobs=len(completed))
    result.calibration = Calibration(
        coefficients=base.coefficients, rel_sigma=base.rel_sigma, warmup=base.warmup,
        quantiles=interval_quantiles(completed, base), jobs=base.jobs)
    return result


def interval_quantiles(records: Sequence[JobRecord],
                       calibration: Calibration) -> dict[str, tuple[float, float]]:
    """p10/p90 of actual ÷ predicted remaining time, by progress bucket, on ``records``: how
    the estimator errs on the jobs it was fitted on, printed by ``wantel eta fit`` and kept in
    the calibration as a record. The live interval does not use them (in-sample quantiles
    covered 64–69 % out of sample late in jobs); it is calibrated online
    (:func:`telemetry.eta.online.score_intervals`).

    Measured at the same duration fractions the evaluation uses, so the interval is calibrated
    on how this estimator actually errs. In-sample errors understate out-of-sample ones, so the
    band is widened by the spread that the fit itself removed (each bucket's quantiles are
    pushed out by the component sigma of the median job).
    """
    from telemetry.eta.evaluate import ours_at

    ratios: dict[str, list[float]] = defaultdict(list)
    for record in records:
        for fraction in CHECKPOINTS:
            estimate = ours_at(record, calibration, fraction)
            if estimate is None or estimate.remaining_s <= 0:
                continue
            actual = record.duration_s * (1 - fraction)
            ratios[bucket_of(estimate.progress)].append(actual / estimate.remaining_s)
    spread = statistics.median(calibration.rel_sigma.values()) if calibration.rel_sigma else 0.1
    out: dict[str, tuple[float, float]] = {}
    for bucket in BUCKETS:
        values = sorted(ratios.get(bucket, []))
        if len(values) < MIN_QUANTILE_SAMPLES:
            continue
        q10, q90 = _quantile(values, 0.10), _quantile(values, 0.90)
        widen = math.exp(spread / 2)
        out[bucket] = (q10 / widen, q90 * widen)
    return out


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


__all__ = ["ComponentFit", "FitResult", "Ridge", "component_priors", "fit", "prior_ridge",
           "robust_fit", "solve", "spread_of"]
