"""Online learning's C twins (``telemetry/eta/_live.c``) against their rules: how a job's prior
is corrected by what was learned when it starts (:func:`telemetry.eta.live.corrected`) and what
a completed job teaches (:func:`telemetry.eta.online.learn`).

Random learned statistics (levels, lines, families, errors, warm-ups, shared spreads; odd
floats, zero weights, lists of the wrong length, ints where floats belong), random priors and
random completed phases (keys shared between phases, phases that teach nothing) go to both:
the result must be the same — floats bit for bit, NaN where NaN — or the same exception, and
the learned state after ``learn`` the same, its dictionaries in the same order (the family
table forgets its oldest entry). Neither changes anything before it falls back to the rule:
a C twin that wrote and then fell back would learn twice, which these comparisons catch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from telemetry.eta import live, online
from telemetry.eta.live import Prior
from telemetry.eta.online import Learned, Observation, PhaseKeys

from .test_eta_estimator_c import deep_bits, outcome

try:
    from telemetry.eta import _live
except ImportError:  # pragma: no cover - where the accelerator was not built
    _live = None  # type: ignore[assignment]

needs_c = pytest.mark.skipif(_live is None, reason="telemetry.eta._live was not built")
#: The rules, as imported (the tests below count the C twins' calls to them by patching).
rules: dict[str, Callable[..., Any]] = {"corrected": live.corrected, "learn": online.learn}
PHASES = ("text_encode", "image_encode", "latent_init", "denoise", "decode", "postprocess",
          "load", "save")
DEVICES = ("device|cpu", "device|cpu|warm", "device|cuda")
COMPONENTS = ("step|t2v", "text_encode", "decode|vae", "latent_init", "load")
FAMILIES = ("f1", "f2", "f3", "f4", "f5")

ODD = st.sampled_from([0.0, -0.0, -1.0, math.nan, math.inf, -math.inf, 1e-300, 5e-324, 1e300,
                       1e-9, 2.5])
FLOATS = st.one_of(st.floats(-3.0, 3.0), st.floats(0.01, 50.0), ODD)
POSITIVE = st.one_of(st.floats(1e-4, 100.0), ODD)


def stats(size: int, *, damaged: bool, plausible: bool = False) -> st.SearchStrategy[Any]:
    """A statistic of ``size`` floats (mostly plausible, now and then odd; only plausible if
    ``plausible``); if ``damaged``, now and then another length, or ints in it."""
    plain = st.lists(st.floats(0.5, 30.0) if plausible else
                     st.one_of(st.floats(0.5, 30.0), st.floats(0.5, 30.0), FLOATS),
                     min_size=size, max_size=size)
    if not damaged:
        return plain
    return st.one_of(plain, plain, st.lists(FLOATS, min_size=0, max_size=size + 1),
                     st.lists(st.integers(0, 5), min_size=size, max_size=size))


def tables(keys: tuple[str, ...], size: int, *, damaged: bool,
           plausible: bool = False) -> st.SearchStrategy[dict[str, Any]]:
    """A dictionary of statistics under some of ``keys``."""
    return st.dictionaries(st.sampled_from(keys),
                           stats(size, damaged=damaged, plausible=plausible), max_size=len(keys))


@st.composite
def learned_states(draw: st.DrawFn, *, plausible: bool = False) -> Learned:
    """What some completed jobs might have taught (a third of the time damaged, unless
    ``plausible``: then only what learning writes)."""
    damaged = not plausible and draw(st.integers(0, 2)) == 0
    return Learned(
        levels=draw(tables(DEVICES, 3, damaged=damaged, plausible=plausible)),
        components=draw(tables(COMPONENTS, 6, damaged=damaged, plausible=plausible)),
        shared=draw(tables(DEVICES, 2, damaged=damaged, plausible=plausible)),
        families=draw(tables(FAMILIES, 3, damaged=damaged, plausible=plausible)),
        error=draw(tables(COMPONENTS, 2, damaged=damaged, plausible=plausible)),
        warmup=draw(tables(COMPONENTS, 3, damaged=damaged, plausible=plausible)),
        jobs=draw(st.integers(0, 50)))


@st.composite
def phase_keys(draw: st.DrawFn, *, plausible: bool = False) -> PhaseKeys:
    """Keys from small pools, so phases share statistics now and then."""
    return PhaseKeys(draw(st.sampled_from(DEVICES)), draw(st.sampled_from(COMPONENTS)),
                     draw(st.sampled_from(FAMILIES)),
                     draw(st.floats(0.0, 20.0) if plausible else
                          st.one_of(st.floats(0.0, 20.0), ODD)))


@st.composite
def priors(draw: st.DrawFn, *, plausible: bool = False) -> Prior:
    """A job's prior: its phases' expectations and spreads, and their keys (a third of the
    time damaged, unless ``plausible``: a key missing now and then, or a phase twice)."""
    damaged = not plausible and draw(st.integers(0, 2)) == 0
    positive = st.floats(1e-3, 100.0) if plausible else POSITIVE
    phases = tuple(draw(st.lists(st.sampled_from(PHASES), max_size=7, unique=not damaged)))

    def some(names: tuple[str, ...]) -> list[str]:
        return [p for p in names if not damaged or draw(st.integers(0, 8))]

    expected = {p: draw(positive) for p in some(phases)}
    sigma = {p: draw(positive) for p in some(phases)}
    keys = {p: draw(phase_keys(plausible=plausible)) for p in some((*phases, "step"))
            if p != "denoise"}
    return Prior(phases, expected, sigma, draw(positive), draw(positive), keys)


@st.composite
def observations(draw: st.DrawFn, *, plausible: bool = False) -> list[Observation]:
    """A completed job's phases: what each was expected to take and took (if ``plausible``,
    each phase under statistics of its own, as a job's phases are)."""
    positive = st.floats(1e-3, 100.0) if plausible else POSITIVE
    seen = draw(st.lists(st.builds(Observation, st.sampled_from((*PHASES, "step")),
                                   phase_keys(plausible=plausible), positive, positive,
                                   positive), max_size=5 if plausible else 7))
    if plausible:  # one phase per component and family, each from the pools in turn
        component, family = draw(st.integers(0, 4)), draw(st.integers(0, 4))
        seen = [msgspec.structs.replace(o, keys=msgspec.structs.replace(
            o.keys, component=COMPONENTS[(component + i) % 5],
            family=FAMILIES[(family + i) % 5])) for i, o in enumerate(seen)]
    return seen


def learned_bits(learned: Learned) -> Any:
    """A learned state as what must match: every float's bits, and each table's order."""
    plain = msgspec.to_builtins(learned)
    return deep_bits(plain), {name: list(table) for name, table in plain.items()
                              if isinstance(table, dict)}


#: (``rule_calls`` counts over every example: none may reach the rule.)
SETTINGS = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture
def rule_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often the C twins handed a call to their rule (they look it up when they do)."""
    calls = {"corrected": 0, "learn": 0}

    def counted(name: str) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            calls[name] += 1
            return rules[name](*args)
        return call

    monkeypatch.setattr(live, "corrected", counted("corrected"))
    monkeypatch.setattr(online, "learn", counted("learn"))
    return calls


@needs_c
class TestCorrected:
    """``corrected(prior, learned, steps, tau)``: the same prior, corrected the same way."""

    @SETTINGS
    @given(prior=priors(), learned=learned_states(), steps=st.integers(-2, 60),
           tau=POSITIVE)
    def test_matches_the_rule(self, prior: Prior, learned: Learned, steps: int,
                              tau: float) -> None:
        before = learned_bits(learned)
        rule = outcome(lambda: live.corrected(prior, learned, steps, tau))
        assert learned_bits(learned) == before  # pure
        assert outcome(lambda: _live.corrected(prior, learned, steps, tau)) == rule
        assert learned_bits(learned) == before

    @SETTINGS
    @given(prior=priors(plausible=True), learned=learned_states(plausible=True),
           steps=st.integers(1, 60), tau=st.floats(0.01, 2.0))
    def test_plausible_statistics_are_corrected_in_c(
            self, prior: Prior, learned: Learned, steps: int, tau: float,
            rule_calls: dict[str, int]) -> None:
        """What learning writes needs the rule only where the rule raises (an overflow):
        else the twin would be no faster."""
        rule = outcome(lambda: rules["corrected"](prior, learned, steps, tau))
        before = rule_calls["corrected"]
        assert outcome(lambda: _live.corrected(prior, learned, steps, tau)) == rule
        assert rule_calls["corrected"] == before or rule[0] == "raised"

    def test_a_corrected_prior_is_a_copy(self) -> None:
        """The prior may be shared between jobs: its dictionaries are never changed."""
        keys = PhaseKeys("device|cpu", "decode|vae", "f1", 3.0)
        prior = Prior(("denoise", "decode"), {"denoise": 1.0, "decode": 2.0},
                      {"denoise": 0.3, "decode": 0.4}, 0.1, 2.0,
                      {"step": PhaseKeys("device|cpu", "step|t2v", "f2", 1.0),
                       "decode": keys})
        learned = Learned(levels={"device|cpu": [0.5, 0.2, 3.0]}, jobs=3)
        step, expected, sigma, _warmup, _tau = _live.corrected(prior, learned, 10, 0.5)
        assert prior.expected == {"denoise": 1.0, "decode": 2.0}
        assert expected is not prior.expected and sigma is not prior.sigma
        assert expected["decode"] == pytest.approx(2.0 * math.exp(0.5 * 3.0 / 3.1))
        assert step == pytest.approx(0.1 * math.exp(0.5 * 3.0 / 3.1))


@needs_c
class TestLearn:
    """``learn(learned, observations, warmup_key, warmup_ratio)``: the same state after."""

    @SETTINGS
    @given(learned=learned_states(), seen=observations(),
           warmup_key=st.one_of(st.none(), st.sampled_from(COMPONENTS)),
           warmup_ratio=st.one_of(st.none(), POSITIVE, st.just(3)))
    def test_matches_the_rule(self, learned: Learned, seen: list[Observation],
                              warmup_key: str | None, warmup_ratio: Any) -> None:
        by_rule, by_c = copy.deepcopy(learned), copy.deepcopy(learned)
        rule = outcome(lambda: online.learn(by_rule, seen, warmup_key, warmup_ratio))
        assert outcome(lambda: _live.learn(by_c, seen, warmup_key, warmup_ratio)) == rule
        assert learned_bits(by_c) == learned_bits(by_rule)

    @SETTINGS
    @given(learned=learned_states(plausible=True), seen=observations(plausible=True),
           warmup_ratio=st.one_of(st.none(), st.floats(0.1, 20.0)))
    def test_plausible_jobs_are_learned_in_c(self, learned: Learned, seen: list[Observation],
                                             warmup_ratio: float | None,
                                             rule_calls: dict[str, int]) -> None:
        """Statistics learning writes, phases under statistics of their own: learned in C,
        unless the rule raises."""
        by_rule, by_c = copy.deepcopy(learned), copy.deepcopy(learned)
        rule = outcome(lambda: rules["learn"](by_rule, seen, "step|t2v", warmup_ratio))
        before = rule_calls["learn"]
        assert outcome(lambda: _live.learn(by_c, seen, "step|t2v", warmup_ratio)) == rule
        assert learned_bits(by_c) == learned_bits(by_rule)
        assert rule_calls["learn"] == before or rule[0] == "raised"

    def test_a_full_family_table_forgets_its_oldest(self) -> None:
        """At ``MAX_FAMILIES`` shapes, each new one pushes the oldest out — also the family
        of a later phase of the same job, which then starts anew, as in the rule."""
        families = {f"old{i}": [0.1, 0.2, 2.0] for i in range(online.MAX_FAMILIES)}
        learned = Learned(families=families, jobs=1)
        seen = [Observation("text_encode", PhaseKeys("device|cpu", "text_encode", "new", 1.0),
                            1.0, 1.0, 2.0),
                Observation("decode", PhaseKeys("device|cpu", "decode|vae", "old0", 2.0),
                            1.0, 1.0, 0.5),
                Observation("step", PhaseKeys("device|cpu", "step|t2v", "old1", 3.0),
                            0.1, 0.1, 0.2)]
        by_rule, by_c = copy.deepcopy(learned), copy.deepcopy(learned)
        online.learn(by_rule, seen, "step|t2v", 4.0)
        _live.learn(by_c, seen, "step|t2v", 4.0)
        assert learned_bits(by_c) == learned_bits(by_rule)
        assert len(by_c.families) == online.MAX_FAMILIES
        assert list(by_c.families)[-3:] == ["new", "old0", "old1"]
        assert by_c.families["old0"][2] == 1.0  # pushed out by "new", then learned anew

    def test_phases_sharing_a_statistic_are_learned_as_the_rule_learns_them(self) -> None:
        """Two phases under one component: the rule updates it twice (the C hands it over)."""
        keys = PhaseKeys("device|cpu", "decode|vae", "f1", 2.0)
        seen = [Observation("decode", keys, 1.0, 1.2, 2.0),
                Observation("postprocess", keys, 0.5, 0.5, 0.4)]
        by_rule, by_c = Learned(), Learned()
        online.learn(by_rule, seen, None, None)
        _live.learn(by_c, seen, None, None)
        assert learned_bits(by_c) == learned_bits(by_rule)
        assert by_c.components["decode|vae"][0] == 2.0  # both phases counted
