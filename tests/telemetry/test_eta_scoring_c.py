"""The C twins of the ETA projection's scoring (``score_issued`` and ``add_all`` in
``telemetry/eta/_live.c``) against their rules, :func:`telemetry.projections.eta.score_issued`
and :meth:`~telemetry.projections.eta.Histogram.add_all` (random histograms, fresh or counted
into, errors at and around every edge, NaN, infinities: the same counts and sums, bit for bit).

Random issued lists — progress monotone or not, NaN and infinite values, exact bucket edges
and their neighbours, ETAs issued within ``MIN_SCORED_S`` of the end or after it, timestamps
beyond 2**53 and beyond 2**62 — are scored by both: the same buckets in the same order, the
same first ETA of each (the same object), every error equal bit for bit, the same counts.
Odd input (not a list, not an ``EtaPoint``, a field of another type) gives what the rule gives,
result or exception type. The projection's state on random streams and on the recorded corpora
is compared in ``test_eta_estimator_c.py`` (the C estimator runs the C scoring).
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import telemetry.projections.eta as eta_projection
from telemetry.eta.model import _BUCKET_EDGES
from telemetry.projections.eta import (
    ERROR_EDGES,
    MIN_SCORED_S,
    EtaPoint,
    EtaProjection,
    Histogram,
    score_issued,
)

from .test_eta_estimator_c import bits, needs_c

try:
    from telemetry.eta import _live
except ImportError:  # pragma: no cover - where the accelerator was not built
    _live = None  # type: ignore[assignment]

MIN_SCORED_NS = round(MIN_SCORED_S * 1e9)


def exactly(scores: Any) -> Any:
    """What must match: each bucket's name, its first ETA's identity, its errors' bits and
    its counts (with their types: ints, not bools)."""
    if not isinstance(scores, list):
        return scores
    return [(bucket, id(first), [bits(e) for e in errors], [(type(c), c) for c in counts])
            for bucket, first, errors, *counts in scores]


def outcome(call: Callable[[], Any]) -> Any:
    """A call's result as :func:`exactly` sees it, or its exception's type."""
    try:
        return ("ok", exactly(call()))
    except Exception as exc:  # the type is what is compared
        return ("raised", type(exc))


def near(value: float) -> st.SearchStrategy[float]:
    """A float at ``value`` or one step either side."""
    return st.sampled_from([math.nextafter(value, -math.inf), value,
                            math.nextafter(value, math.inf)])


FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-1e4, 1e4),
    st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf, 1e-300, 5e-324]),
)
PROGRESS = st.one_of(
    st.floats(0.0, 1.0),
    st.sampled_from(_BUCKET_EDGES).flatmap(near),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1.5, -0.5]),
)
#: How long before the end an ETA was issued, in ns: anything, right at the MIN_SCORED_S
#: edge, after the end, or far beyond what a double holds exactly.
BEFORE_END = st.one_of(
    st.integers(0, 10**12),
    st.sampled_from([MIN_SCORED_NS - 1, MIN_SCORED_NS, MIN_SCORED_NS + 1, 0, -1]),
    st.integers(-10**10, 10**10),
    st.integers(2**53 - 10**4, 2**53 + 10**4),
    st.integers(2**60, 2**62),
)
END = st.one_of(st.integers(0, 10**19), st.sampled_from([0, 2**53 + 1, 2**62, 2**62 + 1,
                                                         -(2**62), 2**63, 2**70]))


@st.composite
def issued_lists(draw: st.DrawFn) -> tuple[list[EtaPoint], int]:
    """A job's issued ETAs and its end: progress rising (as a job's does) or anything."""
    end = draw(END)
    n = draw(st.integers(0, 40))
    monotone = draw(st.booleans())
    progress = sorted(draw(st.lists(PROGRESS, min_size=n, max_size=n)),
                      key=lambda p: (math.isnan(p), p)) if monotone else draw(
        st.lists(PROGRESS, min_size=n, max_size=n))
    points = []
    for i in range(n):
        before = draw(BEFORE_END)
        remaining = draw(FLOATS)
        low, high = draw(FLOATS), draw(FLOATS)
        if draw(st.booleans()):  # an interval around the actual remaining time, or near it
            actual = before / 1e9
            low, high = draw(near(actual)), draw(near(actual * 1.5))
        points.append(EtaPoint(ts=end - before, remaining_s=remaining, p10_s=low,
                               p90_s=high, progress=progress[i],
                               estimating=draw(st.booleans())))
    return points, end


def counting_fallbacks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How often the C hands a call to the rule (it looks the rule up on each fallback)."""
    calls = [0]

    def counted(issued: Any, end_ts: int) -> Any:
        calls[0] += 1
        return score_issued(issued, end_ts)

    monkeypatch.setattr(eta_projection, "score_issued", counted)
    return calls


@needs_c
class TestScoring:
    """``_live.score_issued`` is ``score_issued``."""

    @settings(max_examples=400, deadline=None)
    @given(case=issued_lists())
    def test_random_issued_lists(self, case: tuple[list[EtaPoint], int]) -> None:
        """The same grouping, errors bit for bit, counts, first ETAs."""
        points, end = case
        assert outcome(lambda: score_issued(points, end)) == outcome(
            lambda: _live.score_issued(points, end))

    def test_a_job_without_fallback(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A job's ETAs as the projection issues them are scored in C, a bucket per progress
        range in the order reached; an ETA at the MIN_SCORED_S edge and a NaN one are not
        scored."""
        end = 2**53 + 12_345_677  # beyond what a double holds exactly: converted as CPython
        points = [EtaPoint(ts=end - (40 - i) * 10**9 - 7, remaining_s=41.0 - i, p10_s=30.0 - i,
                           p90_s=50.0 - i, progress=i / 40, estimating=i < 2)
                  for i in range(40)]
        points.append(EtaPoint(ts=end - MIN_SCORED_NS, remaining_s=0.0, p10_s=0.0, p90_s=0.0,
                               progress=1.0, estimating=False))
        points.insert(5, EtaPoint(ts=end - 9 * 10**9, remaining_s=math.nan, p10_s=0.0,
                                  p90_s=1.0, progress=0.0, estimating=False))
        calls = counting_fallbacks(monkeypatch)
        scores = _live.score_issued(points, end)
        assert [0] == calls
        assert exactly(score_issued(points, end)) == exactly(scores)
        assert ["0-10", "10-25", "25-50", "50-75", "75-100"] == [s[0] for s in scores]
        assert points[1] is scores[0][1]
        assert 39 == sum(len(s[2]) for s in scores)

    @pytest.mark.parametrize("odd", [
        "tuple", "not a point", "subclass", "float ts", "int remaining", "int progress",
        "none p10", "bool ts", "huge end", "huge ts", "float end", "str end",
    ])
    def test_odd_input_is_the_rules(self, odd: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """Anything unexpected is handed to the rule: its result, or its exception."""

        class Point(EtaPoint, frozen=True, array_like=True, gc=False):
            pass

        def point(**fields: Any) -> EtaPoint:
            base = {"ts": 10**9, "remaining_s": 2.0, "p10_s": 1.0, "p90_s": 3.0,
                    "progress": 0.5, "estimating": False}
            return EtaPoint(**{**base, **fields})

        issued: Any = [point(ts=0), point(), point(progress=0.05)]
        end: Any = 3 * 10**9
        if odd == "tuple":
            issued = tuple(issued)
        elif odd == "not a point":
            issued.append((10**9, 2.0, 1.0, 3.0, 0.5, False))
        elif odd == "subclass":
            issued.append(Point(ts=10**9, remaining_s=2.0, p10_s=1.0, p90_s=3.0, progress=0.9,
                                estimating=False))
        elif odd == "float ts":
            issued.append(point(ts=1.5e9))
        elif odd == "int remaining":
            issued.append(point(remaining_s=2))
        elif odd == "int progress":
            issued.append(point(progress=1))
        elif odd == "none p10":
            issued.append(point(p10_s=None))
        elif odd == "bool ts":
            issued.append(point(ts=True))
        elif odd == "huge end":
            end = 2**62 + 1
        elif odd == "huge ts":
            issued.append(point(ts=-(2**64)))
        elif odd == "float end":
            end = 3e9
        elif odd == "str end":
            end = "3"
        calls = counting_fallbacks(monkeypatch)
        expected = outcome(lambda: score_issued(issued, end))
        assert expected == outcome(lambda: _live.score_issued(issued, end))
        assert [1] == calls
        if odd in ("none p10", "str end"):
            assert "raised" == expected[0]

    def test_the_projection_scores_in_c(self) -> None:
        """The C estimator's projection scores with the C twin; the Python one with the rule."""
        assert _live.score_issued is EtaProjection(estimator="c")._score_issued
        assert score_issued is EtaProjection(estimator="python")._score_issued

    def test_nothing_to_score(self) -> None:
        """No ETA, or only the before-start one: no bucket."""
        point = EtaPoint(ts=0, remaining_s=1.0, p10_s=0.0, p90_s=2.0, progress=0.0,
                         estimating=True)
        assert [] == _live.score_issued([], 10**9) == score_issued([], 10**9)
        assert [] == _live.score_issued([point], 10**9) == score_issued([point], 10**9)

    def test_the_points_are_left_as_they_were(self) -> None:
        """Scoring reads the points: the list and the ETAs encode the same after."""
        points = [EtaPoint(ts=i * 10**9, remaining_s=10.0 - i, p10_s=5.0, p90_s=12.0,
                           progress=i / 10, estimating=False) for i in range(10)]
        before = msgspec.msgpack.encode(points)
        _live.score_issued(points, 11 * 10**9)
        assert before == msgspec.msgpack.encode(points)

    def test_long_lists_and_references(self) -> None:
        """More ETAs than the C keeps on its stack, and a fallback after some buckets were
        reached: the same result, and no reference to any ETA kept or lost."""
        points = [EtaPoint(ts=i * 10**8, remaining_s=30.0 - i / 10, p10_s=1.0, p90_s=25.0,
                           progress=i / 300, estimating=False) for i in range(300)]
        odd = [*points[:100], EtaPoint(ts=1.5, remaining_s=1.0, p10_s=1.0, p90_s=1.0,
                                       progress=0.5, estimating=False)]
        for issued in (points, odd):
            before = [sys.getrefcount(p) for p in issued]
            for _ in range(3):
                assert exactly(score_issued(issued, 31 * 10**9)) == exactly(
                    _live.score_issued(issued, 31 * 10**9))
            assert before == [sys.getrefcount(p) for p in issued]


def histogram_bits(histogram: Histogram) -> Any:
    """A histogram as what must match: its counts (and their types), totals' bits."""
    return ([(type(c), c) for c in histogram.counts], type(histogram.total), histogram.total,
            bits(histogram.sum), bits(histogram.sum_abs), type(histogram.covered),
            histogram.covered)


@st.composite
def histograms(draw: st.DrawFn) -> Histogram:
    """A histogram fresh or counted into (now and then a field of another type)."""
    if draw(st.booleans()):
        return Histogram()
    slots = len(ERROR_EDGES) + 1
    counts = draw(st.one_of(st.lists(st.integers(0, 10**6), min_size=slots, max_size=slots),
                            st.lists(st.integers(0, 9), max_size=slots + 1)))
    return Histogram(counts=counts, total=draw(st.one_of(st.integers(0, 10**9), st.just(2.0))),
                     sum=draw(st.one_of(st.floats(), st.just(3))),
                     sum_abs=draw(st.floats(0.0, 1e9)),
                     covered=draw(st.one_of(st.integers(0, 10**6), st.just(True))))


#: Errors at and around every edge, odd floats, and plausible ones.
ERRORS = st.one_of(st.sampled_from(ERROR_EDGES).flatmap(near),
                   st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf, 1e300]),
                   st.floats(-1.0, 3.0))


@needs_c
class TestCounting:
    """``_live.add_all`` is ``Histogram.add_all``."""

    @settings(max_examples=400, deadline=None)
    @given(histogram=histograms(), errors=st.one_of(
        st.lists(ERRORS, max_size=12), st.lists(st.one_of(ERRORS, st.just(1)), max_size=3)),
        covered=st.one_of(st.integers(0, 12), st.booleans(), st.just(1.0)))
    def test_random_histograms(self, histogram: Histogram, errors: list[Any],
                               covered: Any) -> None:
        """The same counts, totals and sums, bit for bit, or the same exception."""
        by_rule, by_c = copy.deepcopy(histogram), copy.deepcopy(histogram)
        rule = outcome(lambda: by_rule.add_all(errors, covered))
        assert outcome(lambda: _live.add_all(by_c, errors, covered)) == rule
        assert histogram_bits(by_c) == histogram_bits(by_rule)

    def test_a_job_is_counted_in_c(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Plausible errors into a fresh histogram, then into the same one: no fallback."""
        calls = [0]
        rule = Histogram.add_all

        def counted(self: Histogram, errors: list[float], covered: int) -> None:
            calls[0] += 1
            rule(self, errors, covered)

        monkeypatch.setattr(Histogram, "add_all", counted)
        by_rule, by_c = Histogram(), Histogram()
        for errors, covered in (([-0.6, 0.0, 0.07, 2.5], 3), ([math.nan, -0.05], True)):
            rule(by_rule, errors, covered)
            _live.add_all(by_c, errors, covered)
        assert [0] == calls
        assert histogram_bits(by_c) == histogram_bits(by_rule)
        assert [1, 0, 0, 1, 1, 0, 1, 0, 0, 0, 0, 2] == by_c.counts  # edges: ERROR_EDGES
        assert (6, 4) == (by_c.total, by_c.covered)

    def test_more_errors_than_the_c_holds_are_counted_by_the_rule(self) -> None:
        """Past the 64 errors the C reads up front, the call goes to the rule: the same
        histogram."""
        errors = [(-1) ** i * i / 50 for i in range(100)]
        by_rule, by_c = Histogram(), Histogram()
        by_rule.add_all(errors, 40)
        _live.add_all(by_c, errors, 40)
        assert histogram_bits(by_c) == histogram_bits(by_rule)
        assert (100, 40) == (by_c.total, by_c.covered)
