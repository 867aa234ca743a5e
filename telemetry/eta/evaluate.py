"""Score ETA estimators on completed jobs, at fixed fractions of each job's actual duration.

Checkpoints are fractions of the *actual* duration (5, 10, 25, 50, 75 %), so no estimator is
scored at a moment of its own choosing; an estimator with nothing to say at a checkpoint is
reported as missing, not skipped. Each estimator predicts the job's total duration from the
events that happened before the checkpoint:

``ours``
    the live model (:mod:`telemetry.eta.live`) with the calibration fitted on the train split.
``static``
    the seed's static profile: a fixed per-step time × steps plus fixed text-encode and
    other overheads, per variant and device (here fitted as means on the train split).
``tqdm``
    tqdm's rule: an exponential moving average (0.3) of the step rate × remaining steps; it
    knows nothing of the decode.
``linear``
    ``elapsed / progress`` with progress = steps done / steps.

The before-start estimate (at 0 %: only the ``JobStarted``) is scored too; tqdm and the
linear rule have nothing to say then.

Two ways to get "ours": :func:`evaluate` with a calibration fitted on a train split (each job
starts from it), or :func:`online_starts` — the ETA projection folding the log in order with
online learning only, each job scored from the estimator the projection started it with: what
a user who never runs ``wantel eta fit`` sees.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from telemetry.eta.jobs import JobRecord
from telemetry.eta.live import Estimate, LiveJob
from telemetry.eta.model import CHECKPOINTS, Calibration
from telemetry.events import EtaCalibrated, Event, JobStarted, StepEnded

ESTIMATORS: Final = ("ours", "static", "tqdm", "linear")
TQDM_SMOOTHING: Final = 0.3
#: Where estimates are scored: before the start (0) and at each checkpoint.
POINTS: Final = (0.0, *CHECKPOINTS)


def ours_at(record: JobRecord, calibration: Calibration, fraction: float,
            start: LiveJob | None = None) -> Estimate | None:
    """The live model's estimate at ``fraction`` of the job's actual duration.

    ``start``: the estimator the job started with (online learning included), copied; else
    one started from ``calibration`` alone.
    """
    now = record.started.ts + int(record.duration_s * fraction * 1e9)
    live: LiveJob | None = None
    for event in record.events:
        if event.ts > now:
            break
        if isinstance(event, JobStarted):
            live = LiveJob.start(event, calibration) if start is None else start.restart()
        elif live is not None:
            live.observe(event)
    return None if live is None else live.estimate(now)


def online_starts(events: Iterable[Event], calibration: Calibration | None = None,
                  *, explicit: bool = False) -> dict[str, LiveJob]:
    """Each job's estimator as the ETA projection started it, folding ``events`` in order.

    ``calibration`` replaces the priors as the base (an experiment: a prior off by 5×);
    ``explicit``: also apply the log's ``EtaCalibrated`` events (by default they are skipped:
    online learning only, what a user who never runs ``fit`` sees).
    """
    from telemetry.projections.eta import EtaProjection, EtaState

    projection = EtaProjection()
    state = EtaState(calibration=calibration or Calibration())
    starts: dict[str, LiveJob] = {}
    seen: set[tuple[str, int]] = set()
    for event in events:
        if type(event) not in projection.handles:
            continue
        if type(event) is EtaCalibrated and not explicit:
            continue
        key = (event.job, event.seq)
        if key in seen:
            continue
        seen.add(key)
        state = projection.apply(state, event)
        if type(event) is JobStarted:
            running = state.running.get(event.job)
            if running is not None:
                starts[event.job] = running.live.restart()
    return starts


@dataclass
class StaticProfile:
    """Per (variant, device): mean seconds per step, mean text encode, mean everything else."""

    per_step: dict[str, float] = field(default_factory=dict)
    text: dict[str, float] = field(default_factory=dict)
    other: dict[str, float] = field(default_factory=dict)

    @classmethod
    def fit(cls, records: Sequence[JobRecord]) -> StaticProfile:
        """Means over the train split: no dependence on size, frames or CFG (that is the point)."""
        steps: dict[str, list[float]] = defaultdict(list)
        text: dict[str, list[float]] = defaultdict(list)
        other: dict[str, list[float]] = defaultdict(list)
        for record in records:
            if not record.completed or not record.step_durations:
                continue
            key = _profile_key(record)
            steps[key].append(statistics.fmean(record.step_durations))
            text[key].append(record.stage_durations.get("text_encode", 0.0))
            other[key].append(sum(v for k, v in record.stage_durations.items()
                                  if k not in ("denoise", "text_encode")))
        return cls({k: statistics.fmean(v) for k, v in steps.items()},
                   {k: statistics.fmean(v) for k, v in text.items()},
                   {k: statistics.fmean(v) for k, v in other.items()})

    def total(self, record: JobRecord) -> float | None:
        key = _profile_key(record)
        if key not in self.per_step:
            return None
        return (self.per_step[key] * record.started.steps + self.text[key] + self.other[key])


def _profile_key(record: JobRecord) -> str:
    return f"{record.started.variant}|{record.shape.device}"


def tqdm_total(record: JobRecord, fraction: float) -> float | None:
    """tqdm's EMA rule at ``fraction`` of the duration (None before the first step)."""
    now = record.started.ts + int(record.duration_s * fraction * 1e9)
    rate: float | None = None
    done, total, last_ts = 0, record.started.steps, None
    for event in record.events:
        if event.ts > now:
            break
        if isinstance(event, StepEnded) and event.duration_s:
            instant = 1.0 / event.duration_s
            rate = instant if rate is None else (
                TQDM_SMOOTHING * instant + (1 - TQDM_SMOOTHING) * rate)
            done, total, last_ts = event.step + 1, event.total_steps, event.ts
    if rate is None or last_ts is None:
        return None
    elapsed = (now - record.started.ts) / 1e9
    return elapsed + max(total - done, 0) / rate


def linear_total(record: JobRecord, fraction: float) -> float | None:
    """``elapsed / progress`` with step progress (None before the first step)."""
    now = record.started.ts + int(record.duration_s * fraction * 1e9)
    done = 0
    for event in record.events:
        if event.ts > now:
            break
        if isinstance(event, StepEnded):
            done = event.step + 1
    if done == 0 or record.started.steps == 0:
        return None
    elapsed = (now - record.started.ts) / 1e9
    return elapsed / (done / record.started.steps)


@dataclass
class Score:
    """One estimator at one checkpoint: errors, and how many jobs it could not answer."""

    errors: list[float] = field(default_factory=list)
    missing: int = 0
    covered: int = 0  # ours only: actual remaining inside p10–p90

    @property
    def mape(self) -> float | None:
        """Mean absolute percentage error of the predicted total duration."""
        return 100 * statistics.fmean(abs(e) for e in self.errors) if self.errors else None


@dataclass
class Report:
    """Scores by point (0 = before the start, then each checkpoint) and estimator, and each
    job's own errors (ours, by point) so a bad case can be found."""

    jobs: int
    scores: dict[tuple[float, str], Score]
    per_job: dict[str, dict[float, float]] = field(default_factory=dict)

    def coverage(self) -> float | None:
        """Share of our intervals that contained the actual remaining time (at the
        checkpoints; the before-start interval is reported on its own)."""
        covered = sum(self.scores[(c, "ours")].covered for c in CHECKPOINTS)
        total = sum(len(self.scores[(c, "ours")].errors) for c in CHECKPOINTS)
        return covered / total if total else None


def evaluate(test: Sequence[JobRecord], calibration: Calibration,
             static: StaticProfile, starts: dict[str, LiveJob] | None = None) -> Report:
    """Score the four estimators on the completed jobs of ``test``, before the start and at
    each checkpoint. ``starts``: each job's estimator as the projection started it (online);
    else each starts from ``calibration``."""
    jobs = [r for r in test if r.completed and r.duration_s > 0]
    scores = {(c, e): Score() for c in POINTS for e in ESTIMATORS}
    per_job: dict[str, dict[float, float]] = {}
    for record in jobs:
        actual = record.duration_s
        start = None if starts is None else starts.get(record.job)
        mine = per_job[record.job] = {}
        for fraction in POINTS:
            elapsed = actual * fraction
            estimate = ours_at(record, calibration, fraction, start)
            predictions = {
                "ours": None if estimate is None else elapsed + estimate.remaining_s,
                "static": static.total(record),
                "tqdm": tqdm_total(record, fraction) if fraction else None,
                "linear": linear_total(record, fraction) if fraction else None,
            }
            for name, predicted in predictions.items():
                score = scores[(fraction, name)]
                if predicted is None:
                    score.missing += 1
                    continue
                score.errors.append((predicted - actual) / actual)
                if name == "ours":
                    mine[fraction] = (predicted - actual) / actual
            if estimate is not None:
                remaining = actual - elapsed
                if estimate.p10_s <= remaining <= estimate.p90_s:
                    scores[(fraction, "ours")].covered += 1
    return Report(jobs=len(jobs), scores=scores, per_job=per_job)


def shape_occurrence(records: Sequence[JobRecord]) -> dict[str, int]:
    """For each job, the how-manieth of its shape it is in log order (1: the first job of a
    shape): "from the 4th job of a shape family on" is ``occurrence >= 4``."""
    seen: dict[tuple[object, bool], int] = {}
    out: dict[str, int] = {}
    for record in records:
        key = (record.shape, "load" in str(record.started.options.get("stages", "")))
        seen[key] = seen.get(key, 0) + 1
        out[record.job] = seen[key]
    return out


@dataclass
class Learning:
    """How fast online learning pays, from a report scored online: MAPE (%) before the
    start for jobs from the 4th of their shape on, at 50 % for jobs from the 2nd of their
    shape on, and at 50 % for the log's very first job."""

    before_from_4th: float | None
    half_from_2nd: float | None
    first_at_half: float | None

    @classmethod
    def of(cls, records: Sequence[JobRecord], report: Report) -> Learning:
        """The figures of ``report`` (scored online, in ``records``' order)."""
        occurrence = shape_occurrence(records)

        def mape(point: float, least: int) -> float | None:
            errors = [abs(report.per_job[r.job][point]) for r in records
                      if occurrence[r.job] >= least and point in report.per_job.get(r.job, {})]
            return 100 * statistics.fmean(errors) if errors else None

        first = report.per_job.get(records[0].job, {}) if records else {}
        return cls(mape(0.0, 4), mape(0.5, 2),
                   100 * abs(first[0.5]) if 0.5 in first else None)
