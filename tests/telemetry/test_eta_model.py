"""The ETA model's parts: job shapes, robust fitting, the live estimator."""

from __future__ import annotations

import itertools
import math
import random

import msgspec
import pytest

from telemetry.eta.fit import robust_fit, solve
from telemetry.eta.live import LiveJob, PriorCache
from telemetry.eta.model import (
    BUCKETS,
    STEP,
    Calibration,
    bucket_of,
    component_key,
    expected_phases,
    predict,
)
from telemetry.eta.shape import JobShape
from telemetry.events import (
    DeviceInfo,
    EtaCalibrated,
    Event,
    JobStarted,
    StageEnded,
    StageStarted,
    StepEnded,
)
from telemetry.projections.base import reraise
from telemetry.projections.eta import ERROR_EDGES, EtaProjection, Histogram


def started(*, variant: str = "tiny-t2v", task: str = "t2v", family: str = "wan2.1",
            width: int = 832, height: int = 480, frames: int = 81, steps: int = 40,
            cfg: bool = True, boundary: float | None = None,
            stages: str = "load,save") -> JobStarted:
    """A JobStarted for the estimator."""
    return JobStarted(job="j", seq=0, ts=0, model=variant, family=family, variant=variant,
                      task=task, width=width, height=height, num_frames=frames, steps=steps,
                      guidance_scale=5.0 if cfg else 1.0, cfg=cfg, boundary_ratio=boundary,
                      device=DeviceInfo(kind="cpu", name="x86"), options={"stages": stages})


class TestShape:
    def test_wan_tokens(self) -> None:
        """81 frames at 832×480: 21 latent frames × 30 × 52 tokens."""
        assert 21 * 30 * 52 == JobShape.of(started()).tokens

    def test_ti2v_patches_by_32(self) -> None:
        """TI2V-5B's VAE compresses by 16 and its transformer patches by 2."""
        shape = JobShape.of(started(variant="ti2v-5B", task="ti2v", family="wan2.2",
                                    width=1280, height=704, frames=121))
        assert 31 * 22 * 40 == shape.tokens

    def test_passes_follow_cfg(self) -> None:
        """Two transformer passes per step with guidance, one without."""
        assert (2, 1) == (JobShape.of(started()).passes, JobShape.of(started(cfg=False)).passes)

    def test_components_are_shared_across_variants(self) -> None:
        """T2V and I2V and the A14B layouts share the Wan 2.1 VAE's decode component."""
        keys = {component_key("decode", JobShape.of(started(variant=v, task=t)))
                for v, t in (("t2v-A14B", "t2v"), ("i2v-A14B", "i2v"), ("t2v", "t2v"))}
        assert {"decode|vae-2.1|cpu"} == keys

    def test_published_prior_for_h100(self) -> None:
        """The H100 A14B prior reproduces the published 480P total within its assumptions."""
        event = started(variant="t2v-A14B", family="wan2.2", boundary=0.875)
        event = JobStarted(**{**{f: getattr(event, f) for f in event.__struct_fields__},
                              "device": DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3")})
        shape = JobShape.of(event)
        per_step = predict(STEP, shape, Calibration()) * shape.passes
        assert per_step * 40 == pytest.approx(326.9 * 0.9, rel=0.01)


class TestFitting:
    def test_solve_recovers_exact_coefficients(self) -> None:
        """Noise-free data give back the generating coefficients."""
        rows = [(1.0, x, x * x) for x in (1.0, 2.0, 3.0, 5.0)]
        ys = [0.5 + 0.2 * x + 0.03 * x * x for _, x, _ in rows]
        assert [0.5, 0.2, 0.03] == pytest.approx(solve(rows, ys, [1.0] * 4), rel=1e-4)

    def test_robust_fit_ignores_outliers(self) -> None:
        """A few runs slowed 3× by a busy machine barely move the fit."""
        rng = random.Random(4)
        rows, ys = [], []
        for _ in range(60):
            x = rng.uniform(0.1, 4.0)
            y = (0.2 + 0.5 * x) * rng.uniform(0.97, 1.03)
            if rng.random() < 0.1:
                y *= 3
            rows.append((1.0, x))
            ys.append(y)
        a, b = robust_fit(rows, ys)
        assert (0.2, 0.5) == (pytest.approx(a, rel=0.1), pytest.approx(b, rel=0.05))

    def test_few_distinct_rows_use_fewer_coefficients(self) -> None:
        """One distinct shape can only support a constant."""
        assert [2.0, 0.0, 0.0] == pytest.approx(
            robust_fit([(1.0, 3.0, 9.0)] * 4, [2.0, 2.0, 2.0, 2.0]))


class TestLiveEstimator:
    def _run(self, live: LiveJob, *, step_s: float, steps: int) -> list[float]:
        """Feed ``steps`` steps of ``step_s`` each; the remaining-time estimate after each."""
        live.stage_started("denoise", 0)
        out, ts = [], 0
        for _ in range(steps):
            ts += int(step_s * 1e9)
            live.step_ended(total_steps=live.total_steps, duration_s=step_s, expert=None, ts=ts)
            out.append(live.estimate(ts).remaining_s)
        return out

    def test_estimating_until_two_steps(self) -> None:
        """The estimate says 'estimating' until two steps were measured."""
        live = LiveJob.start(started(steps=4, stages=""), Calibration())
        assert live.estimate(0).estimating
        live.stage_started("denoise", 0)
        live.step_ended(total_steps=4, duration_s=0.1, expert=None, ts=100_000_000)
        assert live.estimate(100_000_000).estimating
        live.step_ended(total_steps=4, duration_s=0.1, expert=None, ts=200_000_000)
        assert not live.estimate(200_000_000).estimating

    def test_observed_steps_pull_the_estimate(self) -> None:
        """Steps twice as slow as the prior soon make the remaining denoise time twice as long."""
        live = LiveJob.start(started(steps=30, stages="", width=64, height=64, frames=17),
                             Calibration())
        step_prior = live.step_prior
        remaining = self._run(live, step_s=2 * step_prior, steps=20)
        after_denoise = live.phases[live.phases.index("denoise") + 1:]
        decode_and_after = sum(live.expected[p] for p in after_denoise) * live._speed()
        assert remaining[-1] - decode_and_after == pytest.approx(
            10 * 2 * step_prior, rel=0.1)

    def test_estimate_never_rises_beyond_its_band(self) -> None:
        """A sudden slowdown beyond the previous interval lifts the ETA by half the excess."""
        live = LiveJob.start(started(steps=50, stages="", width=64, height=64, frames=17),
                             Calibration())
        self._run(live, step_s=live.step_prior, steps=10)
        before = live.estimate(live.last_step_ts or 0)
        band = before.p90_s - before.remaining_s
        ts = (live.last_step_ts or 0) + int(50 * live.step_prior * 1e9)
        live.step_ended(total_steps=50, duration_s=50 * live.step_prior, expert=None, ts=ts)
        since = (ts - (live.last_ts or 0)) / 1e9
        after = live.estimate(ts)
        ceiling = before.remaining_s - since + band
        raw = live._step_mean() * 39 + sum(
            live.expected[p] for p in live.phases[live.phases.index("denoise") + 1:])
        assert raw > ceiling  # the slowdown alone would lift the ETA past the band
        assert after.remaining_s == pytest.approx(ceiling + 0.5 * (raw - ceiling), rel=1e-6)

    def test_embedded_jobs_expect_no_load_or_save(self) -> None:
        """Without wantel run there is no load or save phase to wait for."""
        assert "load" not in expected_phases(JobShape.of(started()), runner=False)
        assert ("load", "save") == tuple(
            p for p in expected_phases(JobShape.of(started()), runner=True)
            if p in ("load", "save"))

    @pytest.mark.parametrize(("progress", "bucket"),
                             [(0.0, "0-10"), (0.1, "10-25"), (0.49, "25-50"), (0.75, "75-100"),
                              (-1.0, "0-10"), (0.0999, "0-10"), (0.25, "25-50"),
                              (0.5, "50-75"), (7.0, "75-100"), (math.nan, "75-100")])
    def test_buckets(self, progress: float, bucket: str) -> None:
        """Progress buckets are half-open, in percent; NaN falls in the last."""
        assert bucket == bucket_of(progress)


class TestFastPathsMatchTheModel:
    """The ETA projection's replay fast paths give exactly what the model's public API gives."""

    @staticmethod
    def _job(seed: int) -> list[Event]:
        """A random two-expert job: stages, steps (some unmeasured), an expert switch."""
        rng = random.Random(seed)
        steps = rng.choice([1, 3, 8, 20, 50])
        event = started(variant="tiny-t2v-a14b", family="wan2.2", boundary=0.875,
                        width=64, height=64, frames=17, steps=steps,
                        stages=rng.choice(["", "load,save"]))
        events: list[Event] = [event]
        ts = 0
        for stage in ("text_encode", "latent_init", "denoise", "decode"):
            ts += rng.randint(1, 10**8)
            events.append(StageStarted(job="j", ts=ts, stage=stage))
            if stage == "denoise":
                switch = rng.randint(0, steps)
                for step in range(steps + rng.choice([0, 0, 2])):
                    ts += rng.randint(1, 10**8)
                    events.append(StepEnded(
                        job="j", ts=ts, step=step, total_steps=steps,
                        expert="high_noise" if step < switch else "low_noise",
                        duration_s=None if rng.random() < 0.1 else rng.uniform(0.001, 0.1)))
            ts += rng.randint(1, 10**8)
            events.append(StageEnded(job="j", ts=ts, stage=stage,
                                     duration_s=rng.uniform(0.001, 0.5)))
        return events

    @pytest.mark.parametrize("seed", range(20))
    def test_projection_issues_what_the_live_job_estimates(self, seed: int) -> None:
        """Every ETA the projection issued equals LiveJob's own estimate after the same events
        (the projection inlines ``step_ended``: the two must not drift apart)."""
        events = self._job(seed)
        projection = EtaProjection()
        state = projection.apply_many(projection.initial(), events, reraise)
        first = events[0]
        assert isinstance(first, JobStarted)
        live = LiveJob.start(first, Calibration())
        expected = [live.estimate(first.ts)]
        for event in events[1:]:
            if isinstance(event, StepEnded):
                live.step_ended(total_steps=event.total_steps, duration_s=event.duration_s,
                                expert=event.expert, ts=event.ts)
                done = event.step + 1
                total = event.total_steps
                if done <= 2 or done >= total or done % max(total // 10, 1) == 0:
                    expected.append(live.estimate(event.ts))
            elif isinstance(event, StageStarted):
                live.stage_started(event.stage, event.ts)
                expected.append(live.estimate(event.ts))
            elif isinstance(event, StageEnded):
                live.stage_ended(event.stage, event.duration_s)
                expected.append(live.estimate(event.ts))
        running = state.running["j"]
        assert msgspec.msgpack.encode(live) == msgspec.msgpack.encode(running.live)
        assert [(e.remaining_s, e.p10_s, e.p90_s, e.progress, e.estimating)
                for e in expected] == [(p.remaining_s, p.p10_s, p.p90_s, p.progress,
                                        p.estimating) for p in running.issued]

    @staticmethod
    def _reference(events: list[Event], calibration: Calibration
                   ) -> tuple[dict[str, tuple[LiveJob, list[tuple[object, ...]]]],
                              list[tuple[str, type[Exception]]]]:
        """Each job's estimator fed through LiveJob's public methods with the ETAs the
        projection issues (the estimate's fields), and the (job, exception type) of each
        estimate that raised, in order."""
        jobs: dict[str, tuple[LiveJob, list[tuple[object, ...]]]] = {}
        failures: list[tuple[str, type[Exception]]] = []

        def issue(job: str, ts: int) -> None:
            live, issued = jobs[job]
            try:
                e = live.estimate(ts)
            except Exception as exc:
                failures.append((job, type(exc)))
            else:
                issued.append((e.remaining_s, e.p10_s, e.p90_s, e.progress, e.estimating))

        for event in events:
            if isinstance(event, JobStarted):
                jobs[event.job] = (LiveJob.start(event, calibration), [])
                issue(event.job, event.ts)
            elif event.job in jobs:
                live = jobs[event.job][0]
                if isinstance(event, StepEnded):
                    live.step_ended(total_steps=event.total_steps, duration_s=event.duration_s,
                                    expert=event.expert, ts=event.ts)
                    done, total = event.step + 1, event.total_steps
                    if done <= 2 or done >= total or done % max(total // 10, 1) == 0:
                        issue(event.job, event.ts)
                elif isinstance(event, StageStarted):
                    live.stage_started(event.stage, event.ts)
                    issue(event.job, event.ts)
                elif isinstance(event, StageEnded):
                    live.stage_ended(event.stage, event.duration_s)
                    issue(event.job, event.ts)
        return jobs, failures

    @pytest.mark.parametrize("seed", range(30))
    def test_runs_interleaved_calibrated_and_split(self, seed: int) -> None:
        """The step path keeps a run's fields in locals and the parts of its ETAs that steps
        leave alone aside: two jobs interleaved in runs of steps, a calibration (quantiles for
        some buckets; in some seeds a sigma so absurd that the interval overflows), folded in
        random pieces, still issue exactly LiveJob's estimates, fail where it fails and leave
        the same estimators."""
        rng = random.Random(seed)
        first = self._job(seed)
        second = [msgspec.structs.replace(e, job="k") for e in self._job(seed + 99)]
        # A phase that ends within the loop (the speed changes), and a step after it.
        steps = [i for i, e in enumerate(first) if isinstance(e, StepEnded)]
        if steps:
            middle, last = steps[len(steps) // 2], first[steps[-1]]
            first.insert(middle, StageEnded(job="j", ts=first[middle].ts, stage="text_encode",
                                            duration_s=rng.uniform(0.01, 1.0)))
            end = next(i for i, e in enumerate(first)
                       if isinstance(e, StageEnded) and e.stage == "denoise")
            first.insert(end + 1, msgspec.structs.replace(last, ts=first[end].ts + 1))
        start = first[0]
        assert isinstance(start, JobStarted)
        calibration = Calibration(
            rel_sigma={component_key("decode", JobShape.of(start)): 1e200} if seed % 5 == 0
            else {},
            quantiles={b: (0.8, 1.3) for b in rng.sample(BUCKETS, rng.randint(0, 3))})
        events: list[Event] = [EtaCalibrated(job="", ts=0, coefficients={},
                                             rel_sigma=calibration.rel_sigma,
                                             quantiles=calibration.quantiles)]
        streams = [first, second]
        while any(streams):
            stream = rng.choice([s for s in streams if s])
            take = rng.randint(1, 8)
            events += stream[:take]
            del stream[:take]
        cuts = sorted({0, len(events), *(rng.randint(0, len(events)) for _ in range(4))})
        projection = EtaProjection()
        state = projection.initial()
        failures: list[tuple[str, type[Exception]]] = []
        for lo, hi in itertools.pairwise(cuts):
            state = projection.apply_many(
                state, events[lo:hi],
                lambda event, exc: failures.append((event.job, type(exc))))
        jobs, expected_failures = self._reference(events, calibration)
        assert expected_failures == failures
        for job, (live, issued) in jobs.items():
            running = state.running[job]
            assert msgspec.msgpack.encode(live) == msgspec.msgpack.encode(running.live)
            assert repr(issued) == repr([(p.remaining_s, p.p10_s, p.p90_s, p.progress,
                                          p.estimating) for p in running.issued])

    def test_first_estimate_is_memoised_exactly(self) -> None:
        """``PriorCache.start_estimated`` is ``LiveJob.start`` then ``estimate_fields`` at the
        start: the same fields and estimator whatever the start time, and ``None`` where that
        estimate raises (which it then still does)."""
        cache = PriorCache()
        decode = component_key("decode", JobShape.of(started()))
        calibrations = [Calibration(), Calibration(quantiles={"0-10": (0.5, 2.0)}),
                        Calibration(rel_sigma={decode: 1e200})]
        for calibration in calibrations * 2:
            for steps, ts in ((40, 0), (40, 7), (4, 10**18), (40, 2**80), (4, -3)):
                event = msgspec.structs.replace(started(steps=steps), ts=ts)
                live, first = cache.start_estimated(event, calibration)
                reference = LiveJob.start(event, calibration)
                try:
                    expected = reference.estimate_fields(ts)
                except OverflowError:
                    assert first is None
                    with pytest.raises(OverflowError):
                        live.estimate_fields(ts)
                else:
                    assert repr(expected) == repr(first)
                assert repr(msgspec.to_builtins(reference)) == \
                    repr(msgspec.to_builtins(live))

    def test_prior_cache_starts_what_start_starts(self) -> None:
        """Memoised priors give the same estimator as ``LiveJob.start``, calibration changes
        included, and each job gets dictionaries of its own."""
        cache = PriorCache(limit=2)
        plain, tuned = Calibration(), Calibration(
            coefficients={component_key(STEP, JobShape.of(started())): (0.1, 0.2, 0.0)},
            quantiles={"0-10": (0.5, 2.0)})
        for calibration in (plain, tuned, plain, tuned):
            for steps in (4, 40, 4, 8, 40):
                event = started(steps=steps)
                cached = cache.start(event, calibration)
                assert msgspec.msgpack.encode(LiveJob.start(event, calibration)) == \
                    msgspec.msgpack.encode(cached)
                assert cached.expected is not cache.start(event, calibration).expected

    def test_add_all_is_add_on_each(self) -> None:
        """Counting a bucket's errors at once is counting them one by one (edges, NaN, ±inf)."""
        rng = random.Random(3)
        values = [*ERROR_EDGES, math.nan, math.inf, -math.inf, -0.0, 0.0]
        for _ in range(200):
            errors = [rng.choice(values) if rng.random() < 0.3 else rng.uniform(-3, 3)
                      for _ in range(rng.randint(1, 6))]
            covered = [rng.random() < 0.5 for _ in errors]
            one, many = Histogram(), Histogram()
            for error, inside in zip(errors, covered, strict=True):
                one.add(error, inside)
            many.add_all(errors, sum(covered))
            assert msgspec.msgpack.encode(one) == msgspec.msgpack.encode(many)
