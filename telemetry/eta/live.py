"""The live estimate of a running job's remaining time: the prior, corrected by what is seen.

At ``JobStarted`` every phase gets its expected duration: the base (published priors, or the
latest explicit calibration) times what completed jobs taught online
(:mod:`telemetry.eta.online`). As the job runs, what it shows becomes a job-level speed: each
finished phase and the measured steps give a log ratio of observed to expected, weighted by
how precise each is (the component's spread), against a prior weight that is the spread of
job speeds this device has shown — one anomalous phase is down-weighted against the others
(Huber), and nothing is clipped: a job ten times slower than its prior is corrected as far
as its evidence says. Phases still to come run at that speed. In the denoise loop the
per-step mean is a conjugate-style update of the (speed-scaled) prior with the observed step
durations; the first step is a warm-up phase of its own (its expected length is the learned
warm-up factor times a step), and each A14B expert is its own segment. The interval is a
log-normal over the remaining parts plus the job speed's own uncertainty, shifted by the
online conformal offsets (:mod:`telemetry.eta.online`). A rise beyond the
previous interval is damped: half the excess per update. Progress never goes backwards.

Everything here is a pure function of the job's events, its start state and ``now``
(nanoseconds, taken from an event or an evaluation checkpoint, never from a clock).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from math import exp, log, sqrt
from typing import Any, Final, Literal, NamedTuple

import msgspec

from telemetry import accelerate
from telemetry.eta import online
from telemetry.eta.model import (
    STEP,
    Calibration,
    bucket_of,
    component_key,
    expected_phases,
    features,
    first_export,
    predict,
    rel_sigma,
    speed_key,
    videos_of,
    warmup_factor,
)
from telemetry.eta.online import (
    SPEED_PHASES,
    Learned,
    Observation,
    PhaseKeys,
    clamp_ratio,
)
from telemetry.eta.shape import JobShape
from telemetry.events import (
    Event,
    JobStarted,
    StageEnded,
    StageProgress,
    StageStarted,
    StepEnded,
)
from telemetry.pipelines import cost_family, is_wan

PRIOR_STEPS: Final = 2.0  # the prior's weight, in steps, against observed step durations
WARMUP_WEIGHT: Final = 0.3  # how much the first step counts towards the step mean
Z90: Final = 1.2816  # standard normal quantile of 0.9
#: A phase expected to take under this says nothing of how fast the job computes.
MIN_SPEED_PHASE_S: Final = 0.005
#: What a phase's measured time is uncertain by, whatever its length (scheduling, fixed
#: overheads): its log ratio's variance gains (this ÷ its seconds)². A phase of a fraction of
#: a millisecond then says almost nothing of the job's speed (noise latents drawn in 0.2 ms
#: against 10 ms expected, with priors 5× slow, had counted as a job 40× faster than its text
#: encode and steps said), while a 4 ms text encode of a job that is all fast still says much.
PHASE_TIME_NOISE: Final = 0.001
#: How far a job's speed may be from its expectation before anything is seen (log units),
#: while neither the device's history nor a calibration says: a factor of ~2.7 either way —
#: published figures for another GPU, or a busy node, can be that far off, and the job's own
#: phases must be able to say so.
SPEED_TAU: Final = 1.0
#: The scatter of one step's duration around the job's step mean (log units): step evidence
#: counts as ``1 / (sigma_component² + STEP_NOISE² / steps)``.
STEP_NOISE: Final = 0.15
#: A phase ratio this many standard deviations from the job's consensus counts only that far
#: (Huber), in ``SPEED_ROUNDS`` reweighting rounds.
SPEED_HUBER: Final = 1.5
SPEED_ROUNDS: Final = 3
#: A phase that reports its pieces (:class:`~telemetry.events.StageProgress`: Wan's VAE decode)
#: is followed at its own pace: the prior's seconds per piece (the phase's expectation at the
#: job's speed, spread over its pieces) weigh PRIOR_PIECES pieces against those measured. A
#: piece scatters about as a step does (STEP_NOISE, 0.15) around a prior whose own variance
#: is the phase's σ² (~0.3²): (0.15 / 0.3)² = 0.25. Less for a job that runs far from its
#: prior (:func:`prior_pieces`).
PIECE_PRIOR_VARIANCE: Final = 0.09
PRIOR_PIECES: Final = STEP_NOISE * STEP_NOISE / PIECE_PRIOR_VARIANCE
#: What the first piece of Wan's decode costs against a later one: it yields one frame where
#: the others yield four (measured on the tiny VAEs, 2.1 and 2.2, 1–21 latent frames:
#: 0.29–0.55, ~0.4 in the middle).
FIRST_PIECE: Final = 0.4
#: How much the first piece counts towards the pace, as the first step does: that ratio
#: scatters ~0.3 (log) from shape to shape, as the prior does: (0.15 / 0.3)² = 0.25.
FIRST_PIECE_WEIGHT: Final = 0.25
#: The share of a job's surprising speed (its log speed² beyond τ²) added to the speed's
#: variance: the interval widens when the job disagrees with its prior.
SURPRISE: Final = 0.25


def first_piece_share(shape: JobShape) -> float:
    """What the first piece of a job's decode costs against a later one: :data:`FIRST_PIECE`
    for Wan's VAE, whose first piece yields one frame where the others yield four; 1 for
    another family's (CogVideoX's first batch of latent frames is the others' length, with
    the remainder, if any, on top: :mod:`inference.pieces`)."""
    return FIRST_PIECE if is_wan(shape.family) else 1.0


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


def _excess(mean: float, shared: float) -> float:
    """How far (log speed ``mean``, squared) a job departs from its expectation beyond what
    this device's jobs usually do (``shared``: τ²); 0 within it."""
    excess = mean * mean - shared
    return excess if excess > 0.0 else 0.0


def _surprise(mean: float, shared: float) -> float:
    """Extra variance of the job's speed when it departs from its expectation by more than
    this device's jobs usually do: a job that disagrees with its prior is doing something
    unusual, and its interval widens (``SURPRISE`` of the excess)."""
    return SURPRISE * _excess(mean, shared)


def prior_pieces(speed: float, tau: float) -> float:
    """How many pieces the prior's pace of a phase weighs in a job running at ``speed``
    (:data:`PRIOR_PIECES` within this device's usual spread ``tau``). A job far from its prior
    runs on a machine, or under a load, that the prior does not describe, and such a machine
    divides its time between phases otherwise too (a loaded CPU's steps ran at 3.4× the prior
    while its decode ran at 1.4×): the prior pace's variance, PIECE_PRIOR_VARIANCE, grows by
    the job's excess, and the phase's own first piece counts for more."""
    mean = log(speed) if speed > 0.0 else 0.0
    return PRIOR_PIECES / (1.0 + _excess(mean, tau * tau) / PIECE_PRIOR_VARIANCE)


def own_variance(sigma: float, shared: float) -> float:
    """A phase's own error variance, beyond the job speed it shares with the job's other
    phases (``shared``: τ²): σ² − τ², but never under half of σ² (nor 1e-4): one phase is
    never taken as more precise than that, whatever the spreads' estimates say."""
    total = sigma * sigma
    own = total - shared
    floor = 0.5 * total if total > 2e-4 else 1e-4
    return own if own > floor else floor


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


#: What corrects a prior by what was learned online (:func:`corrected`, or its C twin).
Corrector = Callable[["Prior", Learned, int, float],
                     tuple[float, dict[str, float], dict[str, float], float, float]]


class Prior(NamedTuple):
    """What a job's estimator starts from, before online learning: a function of its shape,
    runner and the base calibration (the priors, or the latest explicit one)."""

    phases: tuple[str, ...]
    expected: dict[str, float]  # seconds per phase ("denoise": all its steps, the warm-up too)
    sigma: dict[str, float]  # relative error per phase
    step: float  # seconds per step (all passes)
    warmup: float
    keys: dict[str, PhaseKeys]  # what each phase (and STEP) is learned under

    @classmethod
    def of(cls, shape: JobShape, runner: bool, calibration: Calibration, *,
           warm: bool = False) -> Prior:
        """Expected phase durations, how wrong each tends to be, and their learning keys
        (``warm``: the job is not its worker's first, :func:`device_level`)."""
        phases = expected_phases(shape, runner=runner)
        expected: dict[str, float] = {}
        sigma: dict[str, float] = {}
        step = predict(STEP, shape, calibration) * shape.passes * videos_of(STEP, shape)
        warmup = warmup_factor(shape, calibration)
        keys = {STEP: phase_keys(STEP, shape, warm=warm)}
        for phase in phases:
            if phase == "denoise":
                expected[phase] = step * (max(shape.steps - 1, 0) + warmup)
                sigma[phase] = rel_sigma(STEP, shape, calibration)
            else:
                expected[phase] = predict(phase, shape, calibration) * videos_of(phase, shape)
                if phase == "save":
                    expected[phase] += first_export(shape, calibration, warm=warm)
                sigma[phase] = rel_sigma(phase, shape, calibration)
                keys[phase] = phase_keys(phase, shape, warm=warm)
        return cls(phases, expected, sigma, step, warmup, keys)


def device_level(shape: JobShape, *, warm: bool = False) -> str:
    """The key of the device level a job's phases teach: ``device|<device>`` for Wan (whose
    priors are published figures), ``device|<family>|<device>`` for another family — its
    neutral prior's error is the family's, not the machine's, and must not move Wan's
    expectations (nor Wan's history a new family's).

    ``warm`` (``…|warm``): a job its worker runs after completing one. A process's first job
    pays for what the process does once — lazy initialisation, thread pools, kernels compiled
    or autotuned for the first shapes (the demo's first tiny job ran its steps at ~40× the
    later ones') — so a worker that serves many jobs learns its first job's speed and its
    later jobs' speed apart, and a first job does not make every later one look slow. A log
    whose every job is a process of its own (``wantel run``) has only first jobs: its levels
    are the plain keys, as before the distinction.
    """
    level = (f"device|{shape.device}" if is_wan(shape.family)
             else f"device|{cost_family(shape.family)}|{shape.device}")
    return f"{level}|warm" if warm else level


def phase_keys(phase: str, shape: JobShape, *, warm: bool = False) -> PhaseKeys:
    """The keys a phase's cost is learned under online: the device (per family but Wan's:
    :func:`device_level`), the component under the job's speed options, and the exact shape
    (its features and videos per prompt)."""
    component = f"{component_key(phase, shape)}|{shape.speed}"
    shape_features = features(phase, shape)
    size = shape_features[1] if len(shape_features) > 1 else 0.0
    return PhaseKeys(device=device_level(shape, warm=warm), component=f"component|{component}",
                     family=f"{component}|{','.join(f'{x:.6g}' for x in shape_features)}"
                            f"|x{shape.videos}",
                     size=log(size) if size > 0 else 0.0)


class PriorCache:
    """``LiveJob.start`` with its priors memoised per (shape, runner) for one calibration.

    A fleet runs few distinct shapes, and working a prior out (component keys, coefficient
    look-ups, features) costs ~20 µs: most of a replay's per-job cost. The cache holds the
    calibration it was filled under and is emptied when another one is passed, so what it
    returns is exactly what ``LiveJob.start`` would; it is a speed-up, never part of a state.
    """

    def __init__(self, limit: int = 256, *, corrector: Corrector | None = None) -> None:
        """``corrector``: what corrects a prior by what was learned online (:func:`corrected`,
        or its C twin)."""
        self.limit = limit
        self.corrector = corrector
        self._calibration: Calibration | None = None
        self._priors: dict[tuple[JobShape, bool, bool], Prior] = {}

    def start(self, event: JobStarted, calibration: Calibration,
              learned: Learned | None = None, *, warm: bool = False) -> LiveJob:
        """``LiveJob.start(event, calibration, learned, warm=warm)``."""
        shape, runner = JobShape.of(event), driven_by_runner(event)
        priors = self._priors
        if calibration is not self._calibration:  # identity: the cache holds a reference
            priors.clear()
            self._calibration = calibration
        prior = priors.get((shape, runner, warm))
        if prior is None:
            if len(priors) >= self.limit:
                priors.clear()
            prior = priors[shape, runner, warm] = Prior.of(shape, runner, calibration,
                                                           warm=warm)
        return LiveJob.from_prior(event, shape, runner, prior, calibration, learned,
                                  corrector=self.corrector)


def corrected(prior: Prior, learned: Learned, steps: int, tau: float,
              ) -> tuple[float, dict[str, float], dict[str, float], float, float]:
    """``prior`` corrected by what was ``learned`` online: the seconds of a step, each phase's
    expected seconds and relative error (new dictionaries: the prior may be shared), the
    first step's warm-up factor and the spread of job speeds τ (``tau`` until learned).

    Each phase's expectation is scaled by ``exp`` of its levels' correction
    (:func:`~telemetry.eta.online.correction`; the device level once, for every phase), the
    denoise phase being its ``steps`` at the corrected step, the first at the learned warm-up;
    each relative error is what was learned of its component
    (:func:`~telemetry.eta.online.predictive_sigma`). Pure: reads ``prior`` and ``learned``.
    (C twin: ``telemetry.eta._live.corrected(prior, learned, steps, tau)``.)
    """
    step, expected, sigma, warmup = prior.step, dict(prior.expected), dict(prior.sigma), \
        prior.warmup
    keys = prior.keys
    step_keys = keys[STEP]
    correction, predictive_sigma = online.correction, online.predictive_sigma
    device = online.shrunk(learned.levels.get(step_keys.device), online.SHRINK["device"])
    step *= exp(correction(learned, step_keys, device))
    warmup = online.warmup(learned, step_keys.component, warmup)
    for phase in prior.phases:
        if phase == "denoise":
            expected[phase] = step * (max(steps - 1, 0) + warmup)
            phase_keys_ = step_keys
        else:
            phase_keys_ = keys[phase]
            expected[phase] *= exp(correction(learned, phase_keys_, device))
        sigma[phase] = predictive_sigma(learned, phase_keys_.component, sigma[phase])
    return step, expected, sigma, warmup, online.speed_spread(learned, step_keys.device, tau)


def driven_by_runner(event: JobStarted) -> bool:
    """Whether ``wantel run`` drives the job (its plan has ``load`` and ``save`` stages)."""
    return "load" in str(event.options.get("stages", ""))


class LiveJob(msgspec.Struct, kw_only=True):
    """What the estimator keeps about one running job (part of the ETA projection's state).

    The one implementation of the live estimate: the ETA projection folds a job's events
    through ``observe`` and issues ``estimate_fields``; ``wantel eta eval`` and the spans' ETA
    attributes replay a job the same way, from the estimator the projection started it with.
    A replay calls these a few hundred thousand times, so the hot paths spell ``max(x, 0.0)``
    as ``0.0 if 0.0 > x else x`` (what ``max`` returns, NaN included, at a third of the cost
    on CPython 3.11).

    :meth:`step_ended` and :meth:`estimate_fields` have a C twin, ``telemetry/eta/_live.c``
    (the ETA projection's choice: :func:`estimator_of`), which makes the same writes and
    gives bit-identical floats; these methods are the rule it follows, and what it falls
    back to on anything unexpected. A contract test holds the two equal.
    """

    shape: JobShape
    runner: bool
    start_ts: int
    phases: tuple[str, ...]
    expected: dict[str, float]  # corrected by what was learned online
    sigma: dict[str, float]
    step_prior: float  # seconds per step (all passes), corrected
    warmup: float
    base: dict[str, float] = {}  # the base expectations (before online learning)
    base_step: float = 0.0
    keys: dict[str, PhaseKeys] = {}
    speed_tau: float = SPEED_TAU  # the prior spread of this device's job speeds (log units)
    speed_weight: float = 1.0  # the prior's weight against a job's evidence of its speed: 1/τ²
    step_variance: float = 0.06  # the loop's own variance, beyond what it shares (no noise)
    offsets: dict[str, tuple[float, float]] = {}  # bucket → conformal p10, p90 log offsets
    done: dict[str, float] = {}
    phase: str | None = None
    phase_start_ts: int | None = None
    total_steps: int = 0
    steps_done: int = 0
    first_step_s: float | None = None
    later_sum: float = 0.0  # measured steps after the first (steps_seen - 1 of them): sum
    expert: str | None = None
    segment_sum: float = 0.0  # observed seconds in the current expert's segment
    segment_n: float = 0.0  # weighted count of those steps
    segment_prior: float = 0.0  # the current segment's prior step mean
    segment_observed: bool = False  # that prior is a previous expert's observed mean
    steps_seen: int = 0
    last_step_ts: int | None = None
    last_remaining: float | None = None
    last_ts: int | None = None
    last_band: float = 0.0
    last_progress: float = 0.0
    speed_key: int = -1  # what _speed_and_variance memoised, and for which evidence
    speed_cache: tuple[float, float] = (0.0, 0.0)
    ahead_key: int = -1  # what _ahead memoised, and for which position
    evidence_key: int = -1  # what _phase_evidence memoised, and for how many phases done
    evidence: tuple[list[float], list[float]] = ([], [])
    ahead: tuple[float, float, bool] = (0.0, 0.0, False)
    # The current phase's pieces (StageProgress): how many of how many are done, the weight
    # of the paces measured and their weighted sum, and when the last piece ended.
    pieces_total: int = 0
    pieces_done: int = 0
    piece_units: float = 0.0
    piece_seconds: float = 0.0
    last_piece_ts: int = 0
    first_piece: float = FIRST_PIECE  # the first piece's cost against a later one's

    @classmethod
    def start(cls, event: JobStarted, calibration: Calibration,
              learned: Learned | None = None, *, warm: bool = False) -> LiveJob:
        """Expected phase durations at the start of a job (``warm``: not its worker's first,
        :func:`device_level`)."""
        shape, runner = JobShape.of(event), driven_by_runner(event)
        return cls.from_prior(event, shape, runner,
                              Prior.of(shape, runner, calibration, warm=warm), calibration,
                              learned)

    @classmethod
    def from_prior(cls, event: JobStarted, shape: JobShape, runner: bool, prior: Prior,  # noqa: PLR0917 - the cache's one caller
                   calibration: Calibration, learned: Learned | None = None, *,
                   corrector: Corrector | None = None) -> LiveJob:
        """The estimator of the job ``event`` starts, from its (possibly shared) ``prior``
        corrected by what was ``learned`` online (by :func:`corrected`, or ``corrector``: its
        C twin, the projection's choice).

        The dictionaries it changes are copied: a job's estimator is its own, whoever else got
        the prior; the base expectations and keys are shared (never changed).
        """
        tau = calibration.rel_sigma.get(speed_key(shape.device), SPEED_TAU)
        offsets: dict[str, tuple[float, float]] = {}
        if learned is not None and learned.jobs:
            step, expected, sigma, warmup, tau = (corrector or corrected)(
                prior, learned, shape.steps, tau)
            offsets = learned.offsets  # replaced, never changed, when it moves: shared
        else:
            step, expected, sigma, warmup = (prior.step, dict(prior.expected),
                                             dict(prior.sigma), prior.warmup)
        shared = tau * tau
        return cls(shape=shape, runner=runner, start_ts=event.ts, phases=prior.phases,
                   expected=expected, sigma=sigma, step_prior=step, warmup=warmup,
                   base=prior.expected, base_step=prior.step, keys=prior.keys,
                   speed_tau=tau, speed_weight=1.0 / (shared if shared > 1e-4 else 1e-4),
                   step_variance=own_variance(sigma.get("denoise", 0.35), shared),
                   offsets=offsets,
                   total_steps=shape.steps, segment_prior=step,
                   first_piece=first_piece_share(shape))

    def restart(self) -> LiveJob:
        """A copy of this estimator as it was when its job started (what it learned online at
        the start included, nothing the job showed since): to replay the job's events onto it,
        as ``wantel eta eval`` and the spans' ETA attributes do."""
        return msgspec.structs.replace(
            self, expected=dict(self.expected), sigma=dict(self.sigma), done={}, phase=None,
            phase_start_ts=None, total_steps=self.shape.steps, steps_done=0,
            first_step_s=None, later_sum=0.0, expert=None, segment_sum=0.0, segment_n=0.0,
            segment_prior=self.step_prior, segment_observed=False, steps_seen=0, last_step_ts=None,
            last_remaining=None, last_ts=None, last_band=0.0, last_progress=0.0,
            speed_key=-1, speed_cache=(0.0, 0.0), ahead_key=-1, ahead=(0.0, 0.0, False),
            evidence_key=-1, evidence=([], []), pieces_total=0, pieces_done=0,
            piece_units=0.0, piece_seconds=0.0, last_piece_ts=0)

    # -- observations ---------------------------------------------------------------------

    def observe(self, event: Event) -> None:
        """Update the estimator with one of its job's events (after its ``JobStarted``).

        Stages, steps and a stage's pieces are what it learns from; any other event changes
        nothing.
        """
        if type(event) is StepEnded:  # most of a job's events: tested first
            self.step_ended(event.total_steps, event.duration_s, event.expert, event.ts)
        elif type(event) is StageStarted:
            self.stage_started(event.stage, event.ts)
        elif type(event) is StageEnded:
            self.stage_ended(event.stage, event.duration_s)
        elif type(event) is StageProgress:
            self.stage_progress(event.stage, event.done, event.total, event.ts)

    def stage_started(self, stage: str, ts: int) -> None:
        """A phase began."""
        if stage not in self.expected and stage in ("load", "save"):
            return
        self.phase, self.phase_start_ts = stage, ts
        if self.pieces_total:
            self._forget_pieces()
        if stage == "denoise" and self.last_step_ts is None:
            self.last_step_ts = ts

    def stage_ended(self, stage: str, duration_s: float) -> None:
        """A phase ended after ``duration_s``."""
        self.done[stage] = self.done.get(stage, 0.0) + duration_s
        self.speed_key = self.evidence_key = -1
        if self.phase == stage:
            self.phase, self.phase_start_ts = None, None
            if self.pieces_total:
                self._forget_pieces()
        if stage == "text_encode" and "load" in self.phases and "load" not in self.done:
            self.done["load"] = 0.0  # an embedded job: nothing was loaded after all

    def stage_progress(self, stage: str, done: int, total: int, ts: int) -> None:
        """``done`` of the ``total`` pieces of the phase under way had finished at ``ts``.

        The pieces since the last report add their pace (seconds per later piece) to what
        the phase has shown, weighing one each; the first piece, which costs ``first_piece``
        of a later one (:func:`first_piece_share`), weighs ``FIRST_PIECE_WEIGHT`` (as the
        first step does the loop's).
        ``piece_units`` sums the weights, ``piece_seconds`` the weighted paces. A report for
        another phase than the one under way (or the loop, which has its steps), or one that
        does not move forward, changes nothing.
        """
        if (stage != self.phase or stage == "denoise" or not 0 < done <= total
                or done <= self.pieces_done or total < self.pieces_total):
            return
        since = self.last_piece_ts if self.pieces_done else self.phase_start_ts
        if since is None:
            return
        count = float(done - self.pieces_done)
        span = weight = count  # in later pieces' time, and in weight
        if not self.pieces_done:  # the first piece is among these
            span, weight = count - 1.0 + self.first_piece, count - 1.0 + FIRST_PIECE_WEIGHT
        self.pieces_total, self.pieces_done, self.last_piece_ts = total, done, ts
        self.piece_units += weight
        self.piece_seconds += weight * ((ts - since) / 1e9) / span

    def _forget_pieces(self) -> None:
        """A phase ended or another began: the pieces were the previous phase's."""
        self.pieces_total = self.pieces_done = self.last_piece_ts = 0
        self.piece_units = self.piece_seconds = 0.0

    def step_ended(self, total_steps: int, duration_s: float | None, expert: str | None,
                   ts: int) -> None:
        """One more denoising step, of ``total_steps``, measured as ``duration_s`` (or not).

        The loop has at least the steps seen; each expert is a segment of its own.
        (C twin: ``telemetry.eta._live.step_ended(live, ...)``.)
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
                self.segment_observed = True
            self.expert = expert
            self.segment_sum, self.segment_n = 0.0, 0.0
        if duration_s is None:
            return
        steps_seen = self.steps_seen = self.steps_seen + 1
        if steps_seen == 1:
            self.first_step_s = duration_s
            weight, value = WARMUP_WEIGHT, duration_s / max(self.warmup, 1e-6)
        else:
            self.later_sum += duration_s
            weight, value = 1.0, duration_s
        self.segment_sum += weight * value
        self.segment_n += weight

    # -- what a completed job teaches -----------------------------------------------------

    def observations(self) -> list[Observation]:
        """Each finished phase (and the measured steps, per step) against its base and
        corrected expectation: what online learning takes from this job once it completes."""
        made: list[Observation] = []
        keys, base, expected = self.keys, self.base, self.expected
        for phase, seconds in self.done.items():
            if phase == "denoise" or phase not in keys or phase not in base:
                continue
            made.append(Observation(phase, keys[phase], base[phase], expected[phase],
                                    seconds))
        later = self.steps_seen - 1
        if later > 0 and STEP in keys:
            made.append(Observation(STEP, keys[STEP], self.base_step, self.step_prior,
                                    self.later_sum / later))
        return made

    def warmup_ratio(self) -> float | None:
        """The first step's duration ÷ the later steps' mean, when both were measured."""
        later = self.steps_seen - 1
        if self.first_step_s is None or later <= 0 or self.later_sum <= 0:
            return None
        return self.first_step_s * later / self.later_sum

    # -- the estimate ---------------------------------------------------------------------

    def _speed_and_variance(self) -> tuple[float, float]:
        """How fast this job runs against its expectation (a factor on durations, 1 = as
        expected: the exponential of the log ratio estimated here), and the variance of the
        log ratio.

        Evidence: each finished phase of :data:`~telemetry.eta.online.SPEED_PHASES` expected
        to take ≥ 5 ms (``MIN_SPEED_PHASE_S``), weighing 1/(its own variance: its
        component's σ² less the shared τ², plus its time's noise, (``PHASE_TIME_NOISE`` ÷
        seconds)²); and the measured steps after the first, weighing 1/(own variance +
        STEP_NOISE²/n). Against a prior weight 1/τ², τ the spread of this device's job
        speeds. ``SPEED_ROUNDS`` reweighting rounds down-weight any piece of evidence more
        than ``SPEED_HUBER`` standard deviations from the consensus (Huber), so one
        anomalous phase does not move every later one. The variance adds :func:`_surprise`.
        Memoised until a phase ends or a step is measured.
        """
        key = self.steps_seen * 64 + len(self.done)
        if key == self.speed_key:
            return self.speed_cache
        tau = self.speed_tau
        shared = tau * tau
        prior_weight = self.speed_weight
        if self.evidence_key == len(self.done):  # _phase_evidence, memoised: checked here
            ratios, weights = self.evidence
        else:
            ratios, weights = self._phase_evidence(shared)
        later = self.steps_seen - 1
        if later > 0 and self.step_prior > 0 and self.later_sum > 0:
            step_ratio = clamp_ratio(log(self.later_sum / later / self.step_prior))
            step_weight = 1.0 / (self.step_variance + STEP_NOISE * STEP_NOISE / later)
            if not ratios:  # the loop's usual case before any phase ended: one piece
                total = prior_weight + step_weight
                mean = step_ratio * step_weight / total
                self.speed_key = key
                self.speed_cache = (exp(mean), 1.0 / total + _surprise(mean, shared))
                return self.speed_cache
            ratios = [*ratios, step_ratio]
            weights = [*weights, step_weight]
        total, weighted = prior_weight, 0.0
        for ratio, weight in zip(ratios, weights, strict=True):
            total += weight
            weighted += ratio * weight
        mean = weighted / total
        if len(ratios) > 1:
            for _ in range(SPEED_ROUNDS):
                total, weighted = prior_weight, 0.0
                for ratio, weight in zip(ratios, weights, strict=True):
                    distance = abs(ratio - mean) * sqrt(weight)
                    counted = weight * SPEED_HUBER / distance if distance > SPEED_HUBER \
                        else weight
                    total += counted
                    weighted += ratio * counted
                mean = weighted / total
        self.speed_key = key
        self.speed_cache = (exp(mean), 1.0 / total + _surprise(mean, shared))
        return self.speed_cache

    def _phase_evidence(self, shared: float) -> tuple[list[float], list[float]]:
        """The finished phases' log ratios and weights (memoised until another phase ends:
        :meth:`_speed_and_variance` checks ``evidence_key`` before calling)."""
        ratios: list[float] = []
        weights: list[float] = []
        expected_of, sigma_of = self.expected.get, self.sigma.get
        for phase, seconds in self.done.items():
            if phase not in SPEED_PHASES or seconds <= 0:
                continue
            expected = expected_of(phase, 0.0)
            if expected < MIN_SPEED_PHASE_S:
                continue
            ratios.append(clamp_ratio(log(seconds / expected)))
            noise = PHASE_TIME_NOISE / seconds
            weights.append(1.0 / (own_variance(sigma_of(phase, 0.35), shared) + noise * noise))
        self.evidence_key, self.evidence = len(self.done), (ratios, weights)
        return self.evidence

    def _speed(self) -> float:
        """The job's speed factor on durations still to come (1 = as expected)."""
        return self._speed_and_variance()[0]

    def _step_mean(self, speed: float | None = None) -> float:
        """Seconds per step from here on: the segment's prior — the job's prior scaled by the
        job's ``speed``, or, for a later A14B expert, the step mean the previous one showed —
        updated with the segment's observed steps.

        ``speed`` is ``_speed()`` where the caller has it.
        """
        prior = self.segment_prior
        if not self.segment_observed:  # the job's prior: at the job's speed
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

    def peek(self, now: int) -> Estimate:
        """What :meth:`estimate` would issue at ``now``, without issuing it: the estimator is
        left as it was, so the next ETA it issues is damped against the last one issued, not
        against this reading. For a reader between issues (an in-process progress view); the
        progress is never below the last issued one's."""
        remaining, low, high, progress, estimating = self._fields(now)
        return Estimate(remaining_s=remaining, p10_s=low, p90_s=high, progress=progress,
                        estimating=estimating)

    def estimate_fields(self, now: int) -> tuple[float, float, float, float, bool]:
        """``estimate(now)``'s fields in order (:meth:`_fields`), issued: the next ETA is
        damped against this one, and its progress is the floor of every later one's.
        (C twin, memoised intermediate results written alike:
        ``telemetry.eta._live.estimate_fields(live, now)``.)"""
        fields = self._fields(now)
        remaining, _low, high, progress, _estimating = fields
        self.last_remaining, self.last_ts, self.last_band = remaining, now, high - remaining
        self.last_progress = progress
        return fields

    def _fields(self, now: int) -> tuple[float, float, float, float, bool]:
        """The ETA at ``now``: remaining, p10, p90, progress, estimating.

        The remaining time is the sum of the remaining parts (:meth:`_remaining`), damped
        against the previous ETA (``damp_rise``); progress is the share of the predicted
        duration already elapsed, and never less than the progress issued before (when the
        estimate grows, progress holds until the job overtakes it). The p10–p90 interval is
        a log-normal whose relative spread adds the parts' errors and the job speed's
        uncertainty, shifted by the progress bucket's conformal offsets.
        Nothing here changes the estimator but its memoised intermediate results.
        """
        elapsed = (now - self.start_ts) / 1e9
        elapsed = 0.0 if 0.0 > elapsed else elapsed  # max(elapsed, 0.0)
        speed, speed_var = self._speed_and_variance()
        seconds, variance, scaled = self._remaining(now, speed)
        remaining = damp_rise(seconds, self.last_remaining, self.last_ts, self.last_band, now)
        total = elapsed + remaining
        progress = elapsed / total if total > 0 else 0.0
        last = self.last_progress  # never backwards: max(), spelled out (a hot path)
        progress = last if last > progress else progress
        if remaining <= 0:
            low = high = 0.0
        else:
            # The job speed's uncertainty weighs on the seconds that scale with it, not on
            # the steps left at the speed the loop has shown.
            spread = sqrt((variance + scaled * scaled * speed_var)
                          / (remaining * remaining)) * Z90
            below = above = spread
            offsets = self.offsets
            # bucket_of only when there are offsets to find: it cannot raise.
            if offsets and (shift := offsets.get(bucket_of(progress))) is not None:
                below, above = spread + shift[0], spread + shift[1]
            low, high = remaining * exp(-below), remaining * exp(above)
        return remaining, low, high, progress, self.steps_seen < 2

    def _remaining(self, now: int, speed: float) -> tuple[float, float, float]:
        """Seconds left, their variance (s²: each part's seconds times its relative sigma,
        squared, added up), and how many of them scale with the job's speed (what is left of
        phases at their expectation × speed, and the prior's share of the step mean).

        The current phase (before anything happened: the first, under way since the start),
        then every phase after it not done yet; between phases, every phase not done yet. A
        stage outside the plan counts nothing. Phases yet to start take their expected
        duration at the job's speed; the denoise loop, its steps left at the step mean, the
        first of them the warm-up.
        """
        phases, current, done = self.phases, self.phase, self.done
        seconds = variance = scaled = 0.0
        if current is None and not done:
            current = phases[0] if phases else None
            phase_start = self.start_ts
        else:
            phase_start = self.phase_start_ts or now
        upcoming = 0  # between phases: every phase not done yet is to come
        if current is not None:
            try:
                index = phases.index(current)
            except ValueError:  # a stage outside the plan: nothing is counted
                return 0.0, 0.0, 0.0
            if current == "denoise":
                # The steps left at the step mean, less the part of the next step already
                # under way (at most one step); the loop's sigma narrows with every step
                # measured.
                mean = self._step_mean(speed)
                since_step = (now - (self.last_step_ts or now)) / 1e9
                part = self._loop_left(mean) - (mean if mean < since_step else since_step)
                part = 0.0 if 0.0 > part else part  # max(part, 0.0)
                sigma = self.sigma["denoise"] / sqrt(1.0 + self.segment_n)
                scaled = part * self._prior_share(mean)
            elif self.pieces_done:
                part, sigma, scaled = self._pieces_left(current, now, speed)
            else:
                expected = self.expected[current] * speed
                in_phase = (now - phase_start) / 1e9
                sigma = self.sigma[current]
                part = conditional_remaining(expected, sigma, in_phase)
                # What is left of a phase under way is less certain, relative to itself, the
                # further it has got: a phase past its expectation may end now or much later.
                sigma *= 1.0 + in_phase / expected if expected > 0 else 1.0
                scaled = part
            seconds, variance = part, (part * sigma) ** 2
            upcoming = index + 1
        fixed, fixed_variance, denoise_ahead = self._ahead(upcoming)
        seconds += fixed * speed
        scaled += fixed * speed
        variance += fixed_variance * speed * speed
        if denoise_ahead:
            mean = self._step_mean(speed)
            part = self._loop_left(mean)
            sigma = self.sigma["denoise"]
            seconds += part
            scaled += part * self._prior_share(mean)
            variance += (part * sigma) ** 2
        return seconds, variance, scaled

    def _pieces_left(self, phase: str, now: int, speed: float) -> tuple[float, float, float]:
        """What is left of a phase that reports its pieces: seconds, their relative sigma, and
        how many of them scale with the job's speed.

        Its pace is the prior's seconds per piece (the phase's expectation at ``speed`` over
        its pieces, the first counting ``first_piece``), weighing :func:`prior_pieces`, averaged
        with the paces measured (:meth:`stage_progress`); the pieces left run at that pace,
        less the part of the next one already under way. The phase's sigma narrows with every
        piece measured.
        """
        units, seconds = self.piece_units, self.piece_seconds
        prior = self.expected[phase] * speed / (self.pieces_total - 1.0 + self.first_piece)
        weight = prior_pieces(speed, self.speed_tau)
        pace = (weight * prior + seconds) / (weight + units)
        since = (now - self.last_piece_ts) / 1e9
        part = (self.pieces_total - self.pieces_done) * pace - (pace if pace < since else since)
        part = 0.0 if 0.0 > part else part  # max(part, 0.0)
        share = weight * prior / (weight + units) / pace if pace > 0 else 1.0
        return part, self.sigma[phase] / sqrt(1.0 + units), part * share

    def _prior_share(self, mean: float) -> float:
        """The share of the step mean ``mean`` that is the job's prior at its speed (1 before
        any step; it falls as steps are measured; 0 for a later expert, whose prior is what
        the previous one showed)."""
        if self.segment_observed or mean <= 0:
            return 0.0 if self.segment_observed else 1.0
        share = 1.0 - self.segment_sum / (PRIOR_STEPS + self.segment_n) / mean
        return 0.0 if share < 0.0 else share

    def _loop_left(self, mean: float) -> float:
        """The denoising steps left at ``mean`` seconds each, the first a warm-up if none
        has ended yet."""
        left = self._steps_left()
        if self.steps_done == 0 and left:
            return mean * (left - 1 + self.warmup)
        return mean * left

    def _ahead(self, upcoming: int) -> tuple[float, float, bool]:
        """The phases from index ``upcoming`` on not done yet, but the denoise loop: their
        expected seconds (at speed 1) and variance, and whether the loop is among those to
        come. Memoised until a phase ends or the position changes (most ETAs are issued
        between steps, where neither does)."""
        key = upcoming * 64 + len(self.done)
        if key == self.ahead_key:
            return self.ahead
        seconds = variance = 0.0
        denoise_ahead = False
        done, expected, sigma = self.done, self.expected, self.sigma
        for phase in self.phases[upcoming:]:
            if phase in done:
                continue
            if phase == "denoise":
                denoise_ahead = True
                continue
            part = expected[phase]
            seconds += part
            variance += (part * sigma[phase]) ** 2
        self.ahead_key, self.ahead = key, (seconds, variance, denoise_ahead)
        return self.ahead


#: The C twins of :meth:`LiveJob.step_ended` and :meth:`LiveJob.estimate_fields`, and of the
#: scoring, counting and online learning that go with them (``telemetry/eta/_live.c``;
#: :data:`telemetry.accelerate.ETA_ESTIMATOR`).
ETA_ESTIMATOR: Final = accelerate.ETA_ESTIMATOR


class Estimator(NamedTuple):
    """The hot paths of the live estimate, as functions of a :class:`LiveJob`, what they are
    in words (``"C"``, ``"Python (…)"``), and how a completed job's ETAs are scored:
    ``score_issued`` the C twin of :func:`telemetry.projections.eta.score_issued` (same
    module as the estimator's), or ``None`` for that function, the rule (it lives with the
    ETA points it scores, which this module does not import); how a job starts and ends
    with what was learned online: ``corrected`` (:func:`corrected`) and ``learn``
    (:func:`telemetry.eta.online.learn`), the rules or their C twins; and how scored ETAs
    are counted, ``add_all``, like ``score_issued``."""

    step_ended: Callable[[LiveJob, int, float | None, str | None, int], None]
    estimate_fields: Callable[[LiveJob, int], tuple[float, float, float, float, bool]]
    what: str
    score_issued: Callable[[Any, int], Any] | None = None
    corrected: Corrector = corrected
    learn: Callable[[Learned, list[online.Observation], str | None, float | None], None] = (
        online.learn)
    #: The C twin of ``telemetry.projections.eta.Histogram.add_all`` (``None``: the method).
    add_all: Callable[[Any, list[float], int], None] | None = None
    #: The C twin of ``telemetry.projections.eta._issue`` with this estimator's
    #: ``estimate_fields`` (``None``: that function).
    issue: Callable[[Any, int], None] | None = None


def estimator_of(estimator: Literal["c", "python"] | None = None) -> Estimator:
    """The estimator an object built now uses: ``"python"`` the :class:`LiveJob` methods (the
    rule), ``"c"`` their C twin where it was built (else the methods), ``None`` the
    process-wide default (:mod:`telemetry.accelerate`: C where built, unless the application
    said otherwise). Both give identical ETAs and leave identical estimators."""
    if estimator not in ("c", "python", None):
        raise ValueError(f"estimator must be 'c', 'python' or None, not {estimator!r}")
    if estimator == "python":
        return Estimator(LiveJob.step_ended, LiveJob.estimate_fields,
                         "Python (estimator='python')")
    function, what = accelerate.choose(ETA_ESTIMATOR, LiveJob.estimate_fields,
                                       None if estimator is None else True)
    if function is LiveJob.estimate_fields:
        return Estimator(LiveJob.step_ended, LiveJob.estimate_fields, what)
    module = sys.modules[ETA_ESTIMATOR.module]  # imported by choose
    return Estimator(module.step_ended, function, what, module.score_issued, module.corrected,
                     module.learn, module.add_all, module.issue)
