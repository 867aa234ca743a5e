"""The live ETA estimator's C twin (``telemetry/eta/_live.c``) against its rule, the
:class:`~telemetry.eta.live.LiveJob` methods.

Random jobs (phases present or absent, stages out of order or outside the plan, steps without
a duration, experts switching, NaN, infinite, zero, negative, huge and tiny durations and
timestamps, ETAs issued at random times, ``peek`` and ``restart`` in between) are fed to two
copies of one estimator, one through the Python methods and one through the C functions: every
ETA must be the same tuple — floats equal bit for bit, NaN where NaN, the sign of zero — every
exception the same type, and the estimator the same (its msgpack encoding) after every call.
The ETA projection is held to the same on random streams of several jobs and on the recorded
corpora (``tests/fixtures/eta*``): the whole ``EtaState``, encoded, byte-identical (the C
estimator's projection also scores completed jobs' ETAs in C: ``test_eta_scoring_c.py``).
"""

from __future__ import annotations

import copy as copy_module
import math
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import telemetry.eta.live as live_module
import telemetry.projections.eta as eta_projection
from telemetry import accelerate
from telemetry.eta import online
from telemetry.eta.live import LiveJob, estimator_of
from telemetry.eta.model import BUCKETS, Calibration
from telemetry.events import (
    DeviceInfo,
    Event,
    JobCompleted,
    JobFailed,
    JobStarted,
    StageEnded,
    StageProgress,
    StageStarted,
    StepEnded,
)
from telemetry.log.base import Batch
from telemetry.log.local import LocalLog
from telemetry.projections.eta import EtaProjection, EtaState, Histogram
from wantel.cli import main

from .accelerators import assert_built_where_required, both

try:
    from telemetry.eta import _live
except ImportError:  # pragma: no cover - where the accelerator was not built
    _live = None  # type: ignore[assignment]

needs_c = pytest.mark.skipif(_live is None, reason="telemetry.eta._live was not built")
FIXTURES = Path(__file__).parents[1] / "fixtures"
CORPORA = sorted(p.name for p in FIXTURES.iterdir() if p.name.startswith("eta"))
STAGES = ("load", "text_encode", "image_encode", "latent_init", "denoise", "decode",
          "postprocess", "save", "vae_load")
EXPERTS = (None, "high_noise", "low_noise")
ESTIMATORS = both("python", "c" if _live is not None else None, "telemetry.eta._live")


def test_built_where_required() -> None:
    """``make test`` fails if the C twin did not build."""
    assert_built_where_required(_live, "telemetry.eta._live")


# -- comparing ------------------------------------------------------------------------------


def bits(value: Any) -> Any:
    """A value as what must match exactly: a float's 64 bits (the sign of zero), any NaN as
    NaN (which NaN an operation on two NaNs gives — its sign — is the hardware's choice of
    operand, which the compiler may order either way for ``*`` and ``+``)."""
    if type(value) is float:
        return "nan" if math.isnan(value) else struct.pack("<d", value)
    if isinstance(value, tuple):
        return tuple(bits(v) for v in value)
    return value


def encoded(live: LiveJob) -> Any:
    """An estimator's whole state: every field, every float as its :func:`bits` (the
    corpora's states are compared as msgpack bytes)."""
    return deep_bits(msgspec.to_builtins(live))


def deep_bits(value: Any) -> Any:
    """:func:`bits` all the way down a structure of dicts and lists."""
    if isinstance(value, dict):
        return {k: deep_bits(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [deep_bits(v) for v in value]
    return bits(value)


def outcome(call: Callable[[], Any]) -> Any:
    """What a call gives: its result, every float in it as its :func:`bits`, or its
    exception's type."""
    try:
        return ("ok", deep_bits(call()))
    except Exception as exc:  # the type is what is compared
        return ("raised", type(exc))


# -- random jobs ----------------------------------------------------------------------------

def started(ts: int, variant: str, steps: int, runner: bool, image: bool) -> JobStarted:
    """A job's start: a tiny Wan job, driven by ``wantel run`` or not, A14B or not; or a tiny
    CogVideoX job (its decode's pieces are equal: another first-piece share)."""
    family = ("cogvideox" if "cogvideox" in variant else "wan2.2" if "a14b" in variant
              else "wan2.1")
    return JobStarted(
        job="j", ts=ts, worker="w", model=variant, family=family, variant=variant,
        task="i2v" if image else "t2v", width=64, height=64, num_frames=17, steps=steps,
        guidance_scale=5.0, cfg=True,
        device=DeviceInfo(kind="cpu", name="cpu"),
        options={"stages": "load,denoise,save"} if runner else {})


ODD_FLOATS = st.sampled_from([0.0, -0.0, -1.0, math.nan, math.inf, -math.inf, 1e-300, 5e-324,
                              1e300, 1e-9, 2.5])
DURATIONS = st.one_of(st.floats(min_value=1e-4, max_value=5.0), ODD_FLOATS,
                      st.floats(allow_nan=True, allow_infinity=True))
#: Nanosecond times: mostly a plausible clock, sometimes tiny, negative, or beyond 2**62
#: (which the C hands to the Python).
TIMES = st.one_of(st.integers(0, 10**12), st.integers(-(2**40), 2**40),
                  st.integers(2**61, 2**64), st.integers(-(2**64), -(2**61)))


@st.composite
def operations(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    """What happens to an estimator: stages, steps, issues, peeks, restarts."""
    ops: list[tuple[Any, ...]] = []
    clock = draw(st.integers(0, 10**12))
    for _ in range(draw(st.integers(1, 60))):
        kind = draw(st.sampled_from(["step", "step", "step", "issue", "issue", "peek",
                                     "stage_started", "stage_ended", "progress", "progress",
                                     "restart", "jump"]))
        clock += draw(st.integers(0, 5 * 10**9))
        if kind == "jump":  # a clock glitch: a huge, tiny or negative time from now on
            clock = draw(TIMES)
            continue
        if kind == "step":
            ops.append(("step", draw(st.integers(0, 60)),
                        draw(st.one_of(st.none(), DURATIONS)), draw(st.sampled_from(EXPERTS)),
                        clock))
        elif kind in ("issue", "peek"):
            ops.append((kind, clock))
        elif kind == "stage_started":
            ops.append((kind, draw(st.sampled_from(STAGES)), clock))
        elif kind == "stage_ended":
            ops.append((kind, draw(st.sampled_from(STAGES)), draw(DURATIONS)))
        elif kind == "progress":  # a stage's pieces, mostly the decode's, any count
            total = draw(st.integers(-1, 25))
            ops.append((kind, draw(st.sampled_from(["decode", "decode", *STAGES])),
                        draw(st.integers(-1, total + 1)), total, clock))
        else:
            ops.append(("restart",))
    return ops


@st.composite
def estimators(draw: st.DrawFn) -> LiveJob:
    """An estimator at the start of a random job: its prior perturbed (phases expected to take
    nothing, or forever; spreads of zero or NaN), its interval offsets random or none."""
    variant = draw(st.sampled_from(["tiny-t2v", "tiny-i2v", "tiny-t2v-a14b", "tiny-cogvideox"]))
    event = started(draw(TIMES), variant, draw(st.integers(1, 50)), draw(st.booleans()),
                    variant == "tiny-i2v")
    live = LiveJob.start(event, Calibration())
    factor = st.one_of(st.floats(0.1, 10.0), ODD_FLOATS)
    expected = {k: v * draw(factor) if draw(st.booleans()) else v
                for k, v in live.expected.items()}
    sigma = {k: v * draw(factor) if draw(st.booleans()) else v for k, v in live.sigma.items()}
    for phase in draw(st.lists(st.sampled_from(list(live.phases)), max_size=2)):
        (expected if draw(st.booleans()) else sigma).pop(phase, None)
    offsets = draw(st.dictionaries(st.sampled_from(BUCKETS), st.tuples(
        st.floats(-2.0, 2.0), st.floats(-2.0, 2.0)), max_size=len(BUCKETS)))
    return msgspec.structs.replace(
        live, expected=expected, sigma=sigma, offsets=offsets,
        speed_tau=draw(st.one_of(st.just(live.speed_tau), st.floats(0.0, 3.0))),
        warmup=draw(st.one_of(st.just(live.warmup), ODD_FLOATS)),
        step_prior=draw(st.one_of(st.just(live.step_prior), ODD_FLOATS)))


#: Values of the wrong type (or of the right type, odd) for any field of an estimator.
ODD_VALUES = st.sampled_from([
    None, "x", "denoise", 0, 1, -1, 2**70, 1.5, math.nan, -0.0, True, False, [], (), {},
    (1.0,), (1.0, 2.0), [1.0, 2.0], ([], []), ([1.0], []), ([1.0], [2.0]), (1.0, 2.0, True),
    {"denoise": 1.0}, {"x": "y"}])


def safe_encoded(live: LiveJob) -> Any:
    """:func:`encoded`, or its exception's type where a field cannot be converted."""
    try:
        return encoded(live)
    except Exception as exc:  # a field of a type msgspec does not convert
        return type(exc)


def copy(live: LiveJob) -> LiveJob:
    """A second, independent estimator equal to ``live``."""
    return copy_module.deepcopy(live)


def run(live: LiveJob, op: tuple[Any, ...], compiled: bool) -> tuple[LiveJob, Any]:
    """Apply one operation, through the C functions or the Python methods."""
    kind = op[0]
    if kind == "step":
        step = _live.step_ended if compiled else LiveJob.step_ended
        return live, outcome(lambda: step(live, *op[1:]))
    if kind == "issue":
        issue = _live.estimate_fields if compiled else LiveJob.estimate_fields
        return live, outcome(lambda: issue(live, op[1]))
    if kind == "peek":  # Python in both: it reads what the C memoised
        return live, outcome(lambda: msgspec.structs.astuple(live.peek(op[1])))
    if kind == "stage_started":
        return live, outcome(lambda: live.stage_started(op[1], op[2]))
    if kind == "stage_ended":
        return live, outcome(lambda: live.stage_ended(op[1], op[2]))
    if kind == "progress":
        return live, outcome(lambda: live.stage_progress(*op[1:]))
    try:
        return live.restart(), None
    except Exception as exc:  # a field of an odd type: the same in both
        return live, type(exc)

def assert_same_through(start: LiveJob, ops: list[tuple[Any, ...]],
                        state: Callable[[LiveJob], Any] = encoded) -> None:
    """Run ``ops`` on two copies of ``start``, one through the C functions and one through the
    Python methods: every outcome, and the ``state`` after each, is the same."""
    python, c = copy(start), copy(start)
    for op in ops:
        python, expected = run(python, op, compiled=False)
        c, actual = run(c, op, compiled=True)
        assert expected == actual, op
        assert state(python) == state(c), op


@needs_c
class TestOneEstimator:
    """One job's estimator, driven through C and through Python side by side."""

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(start=estimators(), ops=operations())
    def test_same_etas_and_same_state(self, start: LiveJob, ops: list[tuple[Any, ...]]) -> None:
        """Every ETA, exception and state after every call is the Python's."""
        assert_same_through(start, ops)

    def test_a_job_as_it_runs(self) -> None:
        """A whole A14B job issued at every event: the same ETAs, computed in C throughout
        (the C never hands the call to the Python)."""
        event = started(10**12, "tiny-t2v-a14b", 20, runner=True, image=False)
        python = LiveJob.start(event, Calibration())
        c = copy(python)
        ts, etas = event.ts, 0
        py_step, py_estimate = LiveJob.step_ended, LiveJob.estimate_fields
        calls = counting_fallbacks()
        for stage in ("load", "text_encode", "latent_init", "denoise", "decode"):
            ts += 10**8
            for live in (python, c):
                live.stage_started(stage, ts)
            assert bits(py_estimate(python, ts)) == bits(_live.estimate_fields(c, ts))
            for piece in range(1, 11 if stage == "decode" else 0):  # its pieces' pace
                ts += (4 if piece > 1 else 1) * 10**8 + piece * 10**6
                for live in (python, c):
                    live.stage_progress(stage, piece, 10, ts)
                for now in (ts, ts + 2 * 10**8, ts + 10**10):
                    assert bits(py_estimate(python, now)) == bits(_live.estimate_fields(c, now))
                etas += 1
            if stage not in ("denoise", "decode"):
                ts += 3 * 10**8
                for live in (python, c):
                    live.stage_ended(stage, 0.3)
            for step in range(20 if stage == "denoise" else 0):
                ts += 5 * 10**7
                expert = "high_noise" if step < 10 else "low_noise"
                py_step(python, 20, 0.05 + step / 1000, expert, ts)
                _live.step_ended(c, 20, 0.05 + step / 1000, expert, ts)
                assert encoded(python) == encoded(c)
                assert bits(py_estimate(python, ts + 7)) == bits(
                    _live.estimate_fields(c, ts + 7))
                etas += 1
            assert encoded(python) == encoded(c)
        assert etas == 30
        assert not any(calls.values()), calls

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(start=estimators(), ops=operations(), odd=st.lists(st.tuples(
        st.sampled_from([f for f in LiveJob.__struct_fields__
                         if f not in ("shape", "keys", "base")]), ODD_VALUES), max_size=3),
        entries=st.lists(st.tuples(st.sampled_from(["expected", "sigma", "done", "offsets"]),
                                   st.sampled_from(["denoise", "text_encode", "decode",
                                                    "0-10", "75-100", 3]), ODD_VALUES),
                         max_size=2))
    def test_any_field_of_any_type(self, start: LiveJob, ops: list[tuple[Any, ...]],
                                   odd: list[tuple[str, Any]],
                                   entries: list[tuple[str, Any, Any]]) -> None:
        """Fields (and dictionary entries) of types the estimator never writes — an int key
        where a float is, a float memo key, a string, a list — never crash the C: it gives
        what the Python gives, or raises what it raises, and leaves the same state."""
        for name, value in odd:
            msgspec.structs.force_setattr(start, name, value)
        for name, key, value in entries:
            field = getattr(start, name)
            if isinstance(field, dict):
                field[key] = value
        assert_same_through(start, ops, safe_encoded)

    def test_odd_input_falls_back(self) -> None:
        """A field of another type (an int expectation), a float time, a phase missing from
        ``expected``: the Python's answer, or its exception."""
        live = LiveJob.start(started(0, "tiny-t2v", 10, runner=False, image=False),
                             Calibration())
        ints = msgspec.structs.replace(live, expected={k: 1 for k in live.expected})
        python = msgspec.structs.replace(ints, expected=dict(ints.expected))
        c = msgspec.structs.replace(ints, expected=dict(ints.expected))
        assert bits(LiveJob.estimate_fields(python, 5 * 10**8)) == bits(
            _live.estimate_fields(c, 5 * 10**8))
        assert bits(LiveJob.estimate_fields(python, 6.5e8)) == bits(  # type: ignore[arg-type]
            _live.estimate_fields(c, 6.5e8))  # type: ignore[arg-type]
        missing = msgspec.structs.replace(live, expected={})
        with pytest.raises(KeyError):
            LiveJob.estimate_fields(copy(missing), 10)
        with pytest.raises(KeyError):
            _live.estimate_fields(copy(missing), 10)
        with pytest.raises(AttributeError):  # what LiveJob.estimate_fields(object(), 10) raises
            _live.estimate_fields(object(), 10)

    def test_a_subclass_runs_its_own_methods(self) -> None:
        """Not a ``LiveJob`` exactly: the object's own method is called."""
        seen: list[int] = []

        class Watched(LiveJob):
            def estimate_fields(self, now: int) -> tuple[float, float, float, float, bool]:
                seen.append(now)
                return super().estimate_fields(now)

        live = LiveJob.start(started(0, "tiny-t2v", 10, runner=False, image=False),
                             Calibration())
        watched = Watched(**msgspec.structs.asdict(live))
        assert bits(_live.estimate_fields(watched, 10**9)) == bits(
            LiveJob.estimate_fields(live, 10**9))
        assert [10**9] == seen


def counting_fallbacks() -> dict[str, int]:
    """How often the C handed a call to the Python: counted while the test runs (the C calls
    the object's method — a ``LiveJob``'s, a ``Histogram``'s — which these wrappers replace on
    the class, and the rules ``score_issued``, ``_issue``, ``corrected`` and ``learn``, looked
    up on their modules at each fallback)."""
    methods = {(LiveJob, "step_ended"), (LiveJob, "estimate_fields"), (Histogram, "add_all")}
    rules = {(eta_projection, "score_issued"), (eta_projection, "_issue"),
             (live_module, "corrected"), (online, "learn")}
    calls = {name: 0 for _, name in methods | rules}

    def counted(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            calls[name] += 1
            return original(*args)
        return call

    patch = pytest.MonkeyPatch()
    for owner, name in methods | rules:
        patch.setattr(owner, name, counted(name, getattr(owner, name)))
    _UNDO.append(patch)
    return calls


_UNDO: list[pytest.MonkeyPatch] = []


@pytest.fixture(autouse=True)
def _undo_patches() -> Any:
    """Undo :func:`counting_fallbacks` after each test."""
    yield
    while _UNDO:
        _UNDO.pop().undo()


# -- the projection -------------------------------------------------------------------------

def replay(events: list[Event], estimator: str | None, *, many: bool) -> Any:
    """The ETA projection's state after ``events``: msgpack bytes, or with NaN in it every
    float as its :func:`bits`; and what each event raised."""
    projection = EtaProjection(estimator=estimator)  # type: ignore[arg-type]
    state = projection.initial()
    failures: list[Any] = []
    if many:
        state = projection.apply_many(state, events,
                                      lambda e, exc: failures.append((e, type(exc))))
    else:
        for event in events:
            state = projection.apply(state, event)
    return compared(state), failures


def compared(state: EtaState) -> Any:
    """What must match of a state: its msgpack bytes, or with NaN perhaps in it every float as
    its :func:`bits` (which NaN an operation gives is the hardware's choice)."""
    encoded_state = msgspec.msgpack.encode(state)
    if b"\x7f\xf8" in encoded_state or b"\xff\xf8" in encoded_state:  # a NaN, perhaps
        return deep_bits(msgspec.to_builtins(state))
    return encoded_state


@st.composite
def job_streams(draw: st.DrawFn) -> list[Event]:
    """Several jobs' events interleaved: stages in any order, steps with odd durations."""
    jobs = draw(st.integers(1, 3))
    streams: list[list[Event]] = []
    for j in range(jobs):
        job = f"job-{j}"
        variant = draw(st.sampled_from(["tiny-t2v", "tiny-i2v", "tiny-t2v-a14b",
                                        "tiny-cogvideox"]))
        ts = draw(st.integers(0, 10**13))
        steps = draw(st.integers(1, 30))
        events: list[Event] = [msgspec.structs.replace(
            started(ts, variant, steps, draw(st.booleans()), variant == "tiny-i2v"), job=job)]
        for _ in range(draw(st.integers(0, 50))):
            ts += draw(st.integers(0, 10**9))
            kind = draw(st.sampled_from(["step", "step", "started", "ended", "progress"]))
            if kind == "step":
                events.append(StepEnded(job=job, ts=ts, worker="w", step=draw(
                    st.integers(0, 40)), total_steps=steps, timestep=1.0,
                    duration_s=draw(st.one_of(st.none(), DURATIONS)),
                    expert=draw(st.sampled_from(EXPERTS))))
            elif kind == "started":
                events.append(StageStarted(job=job, ts=ts, worker="w",
                                           stage=draw(st.sampled_from(STAGES))))
            elif kind == "progress":
                total = draw(st.integers(0, 12))
                events.append(StageProgress(job=job, ts=ts, worker="w",
                                            stage=draw(st.sampled_from(STAGES)),
                                            done=draw(st.integers(0, total)), total=total))
            else:
                events.append(StageEnded(job=job, ts=ts, worker="w",
                                         stage=draw(st.sampled_from(STAGES)),
                                         duration_s=draw(DURATIONS)))
        ts += draw(st.integers(1, 10**9))
        end = draw(st.sampled_from(["completed", "completed", "failed", "none"]))
        if end == "completed":
            events.append(JobCompleted(job=job, ts=ts, worker="w", duration_s=1.0))
        elif end == "failed":
            events.append(JobFailed(job=job, ts=ts, worker="w", duration_s=1.0, error_type="E",
                                    message="m"))
        streams.append(events)
    merged: list[Event] = []
    while any(streams):
        stream = draw(st.sampled_from([s for s in streams if s]))
        merged.append(stream.pop(0))
    return merged


@needs_c
class TestProjection:
    """The ETA projection with either estimator."""

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(events=job_streams())
    def test_random_streams(self, events: list[Event]) -> None:
        """The state after every event (any NaN as NaN) and what the event raised are the same
        with either estimator, by ``apply`` and by ``apply_many``."""
        python, c = EtaProjection(estimator="python"), EtaProjection(estimator="c")
        states = [python.initial(), c.initial()]
        for event in events:
            outcomes = []
            for i, projection in enumerate((python, c)):
                try:
                    states[i] = projection.apply(states[i], event)
                    outcomes.append(None)
                except Exception as exc:  # the engine reports it; compared
                    outcomes.append(type(exc))
            assert outcomes[0] == outcomes[1], event
            assert deep_bits(msgspec.to_builtins(states[0])) == deep_bits(
                msgspec.to_builtins(states[1])), event
        assert replay(events, "python", many=True) == replay(events, "c", many=True)

    @pytest.mark.parametrize("corpus", CORPORA)
    def test_corpora(self, corpus: str) -> None:
        """Each recorded corpus replays to a byte-identical ``EtaState``, by ``apply`` and by
        ``apply_many``, the C never handing a call to the Python."""
        log = LocalLog(FIXTURES / corpus, create=False)
        events = [e for item in log.read() if isinstance(item, Batch) for e in item.events]
        expected = replay(events, "python", many=False)
        calls = counting_fallbacks()
        assert expected == replay(events, "c", many=False)
        assert expected == replay(events, "c", many=True)
        assert not any(calls.values()), calls

    @pytest.mark.parametrize("corpus", CORPORA)
    def test_corpora_across_a_checkpoint(self, corpus: str) -> None:
        """Half a corpus folded in C, the state through its checkpoint's bytes (what msgpack
        decodes is what the C then reads), the rest folded in C: the same bytes as the
        Python straight through, the C never handing a call to the Python."""
        log = LocalLog(FIXTURES / corpus, create=False)
        events = [e for item in log.read() if isinstance(item, Batch) for e in item.events]
        expected, _ = replay(events, "python", many=True)
        projection, failures = EtaProjection(estimator="c"), []
        half = len(events) // 2
        state = projection.apply_many(projection.initial(), events[:half],
                                      lambda e, exc: failures.append(exc))
        state = msgspec.msgpack.decode(msgspec.msgpack.encode(state), type=EtaState)
        calls = counting_fallbacks()
        state = projection.apply_many(state, events[half:], lambda e, exc: failures.append(exc))
        assert ([], expected) == (failures, compared(state))
        assert not any(calls.values()), calls


@needs_c
@pytest.mark.parametrize("corpus", ["eta-corpus", "demo-log"])
def test_wantel_replay_prints_the_same(corpus: str, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """``wantel replay --json`` prints the same bytes with the C estimator and, under
    ``$WANTEL_PURE_PYTHON``, the Python one."""
    outputs = []
    for pure in ("", "1"):
        monkeypatch.setenv("WANTEL_PURE_PYTHON", pure)
        assert 0 == main(["replay", "--json", "--log", str(FIXTURES / corpus)])
        outputs.append(capsys.readouterr().out)
        assert ("Python" if pure else "C") == EtaProjection().estimator.split(" ")[0]
    assert outputs[0] == outputs[1]
    assert outputs[0].count('"eta_residuals"') >= 5  # ETAs were issued and scored


class TestChoice:
    """Which estimator a projection runs is chosen when it is built."""

    @pytest.mark.parametrize("estimator", ESTIMATORS)
    def test_says_what_it_runs(self, estimator: str) -> None:
        """``"python"`` runs the methods, ``"c"`` the C twin."""
        projection = EtaProjection(estimator=estimator)  # type: ignore[arg-type]
        assert ("C" if estimator == "c" else "Python (estimator='python')") == \
            projection.estimator

    def test_default_follows_the_process_default(self) -> None:
        """``None``: C where built, unless the application configured Python."""
        assert ("C" if _live is not None else "Python (C not built)") == \
            EtaProjection().estimator
        accelerate.configure(compiled=False, reason="$WANTEL_PURE_PYTHON")
        assert "Python ($WANTEL_PURE_PYTHON)" == EtaProjection().estimator
        assert LiveJob.estimate_fields is estimator_of().estimate_fields

    def test_rejects_another_name(self) -> None:
        """Anything but ``"c"``, ``"python"`` and ``None`` is a ``ValueError``."""
        with pytest.raises(ValueError, match="estimator must be"):
            EtaProjection(estimator="fortran")  # type: ignore[arg-type]

    def test_where_c_was_not_built_the_python_runs(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An install without a C compiler has no ``telemetry.eta._live``: asked for the
        default or for ``"c"``, a projection runs the methods and says why, with the same
        state after a real corpus."""
        log = LocalLog(FIXTURES / "eta-corpus", create=False)
        events = [e for item in log.read() if isinstance(item, Batch) for e in item.events]
        expected = replay(events, "python", many=True)
        monkeypatch.setitem(sys.modules, "telemetry.eta._live", None)  # import raises
        for asked in (None, "c"):
            projection = EtaProjection(estimator=asked)  # type: ignore[arg-type]
            assert "Python (C not built)" == projection.estimator
            chosen = projection._estimator
            assert (LiveJob.step_ended, LiveJob.estimate_fields, None, None, None) == (
                chosen.step_ended, chosen.estimate_fields, chosen.score_issued, chosen.add_all,
                chosen.issue)
            assert (live_module.corrected, online.learn) == (chosen.corrected, chosen.learn)
        assert expected == replay(events, None, many=True)


@needs_c
class TestIssue:
    """``_live.issue(running, ts)`` is ``_issue(running, ts, estimate_fields)``."""

    def running(self) -> Any:
        """A job's running ETA, two steps in."""
        live = LiveJob.start(started(10**9, "tiny-t2v", 20, True, False), Calibration())
        for step in range(2):
            LiveJob.step_ended(live, 20, 0.05, None, 10**9 + (step + 1) * 5 * 10**7)
        return eta_projection.RunningEta(model="tiny-t2v", live=live)

    def test_the_same_point_in_c(self) -> None:
        by_rule, by_c = self.running(), self.running()
        eta_projection._issue(by_rule, 2 * 10**9, LiveJob.estimate_fields)
        calls = counting_fallbacks()
        _live.issue(by_c, 2 * 10**9)
        assert 0 == calls["_issue"]
        assert deep_bits(msgspec.to_builtins(by_c)) == deep_bits(msgspec.to_builtins(by_rule))

    @pytest.mark.parametrize("odd", ["issued a tuple", "not a running ETA", "ts a float"])
    def test_odd_input_is_the_rules(self, odd: str) -> None:
        """Anything unexpected goes to the rule: its result, or its exception."""
        by_rule, by_c = self.running(), self.running()
        ts: Any = 2 * 10**9
        if odd == "issued a tuple":
            by_rule.issued, by_c.issued = (), ()
        elif odd == "not a running ETA":
            by_rule, by_c = SimpleNamespace(**msgspec.structs.asdict(by_rule)), \
                SimpleNamespace(**msgspec.structs.asdict(by_c))
        else:
            ts = 2e9
        rule = outcome(lambda: eta_projection._issue(by_rule, ts, LiveJob.estimate_fields))
        calls = counting_fallbacks()
        assert rule == outcome(lambda: _live.issue(by_c, ts))
        assert 1 == calls["_issue"]
        assert encoded(by_c.live) == encoded(by_rule.live)
        assert deep_bits(msgspec.to_builtins(by_c.issued)) == deep_bits(
            msgspec.to_builtins(by_rule.issued))
