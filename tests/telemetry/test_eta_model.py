"""The ETA model's parts: job shapes, robust fitting, the live estimator."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telemetry.engine import ProjectionEngine
from telemetry.eta import online
from telemetry.eta.fit import component_priors, robust_fit, solve, spread_of
from telemetry.eta.jobs import JobRecord
from telemetry.eta.live import LiveJob, PriorCache
from telemetry.eta.model import (
    BUCKETS,
    DEFAULT_REL_SIGMA,
    FIRST_EXPORT_S,
    PHASES,
    PUBLISHED_STEP_PRIORS,
    STEP,
    Calibration,
    bucket_of,
    component_key,
    expected_phases,
    predict,
    published_step_prior,
)
from telemetry.eta.shape import JobShape
from telemetry.events import (
    DeviceInfo,
    EtaCalibrated,
    Event,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobStarted,
    StageEnded,
    StageStarted,
    StepEnded,
)
from telemetry.projections.base import as_batch_projection
from telemetry.projections.eta import ERROR_EDGES, EtaProjection, Histogram

from .test_engine import assert_pieces_equal_whole


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

    def test_a_workers_later_jobs_do_not_pay_for_the_first_export(self) -> None:
        """A tiny job's save prior: a process's first video pays for ffmpeg's discovery and
        first start (``wantel run``: every job), a worker's later jobs do not."""
        event = started(width=64, height=64, frames=17)
        per_video = predict("save", JobShape.of(event), Calibration())
        cold = LiveJob.start(event, Calibration()).expected["save"]
        warm = LiveJob.start(event, Calibration(), warm=True).expected["save"]
        assert (cold, warm) == (pytest.approx(per_video + FIRST_EXPORT_S),
                                pytest.approx(per_video))

    def test_an_image_is_not_exported_through_ffmpeg(self) -> None:
        """An image model's output is written by PIL: no first export on its save."""
        event = started(width=64, height=64, frames=1)
        image = msgspec.structs.replace(event, variant="tiny-sd", model="tiny-sd",
                                        family="sd", task="t2i")
        shape = JobShape.of(image)
        assert LiveJob.start(image, Calibration()).expected["save"] == pytest.approx(
            predict("save", shape, Calibration()))

    def test_the_first_export_is_paid_once_whatever_the_videos(self) -> None:
        """Three videos per prompt: three videos' save, one first export."""
        event = started(width=64, height=64, frames=17)
        three = msgspec.structs.replace(event, options={**event.options, "num_videos": 3})
        per_video = predict("save", JobShape.of(event), Calibration())
        assert LiveJob.start(three, Calibration()).expected["save"] == pytest.approx(
            3 * per_video + FIRST_EXPORT_S)

    def test_published_prior_for_h100(self) -> None:
        """The H100 A14B prior reproduces the published 480P total within its assumptions."""
        event = started(variant="t2v-A14B", family="wan2.2", boundary=0.875)
        event = JobStarted(**{**{f: getattr(event, f) for f in event.__struct_fields__},
                              "device": DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3")})
        shape = JobShape.of(event)
        per_step = predict(STEP, shape, Calibration()) * shape.passes
        assert per_step * 40 == pytest.approx(326.9 * 0.9, rel=0.01)

    def test_a_size_without_a_figure_on_this_gpu_is_scaled_by_its_flops(self) -> None:
        """No figure is published for the 1.3B on an H100: the 14B's H100 figure, scaled by
        the two transformers' FLOPs, says 0.158 s a pass at 832 × 480 × 33 frames, within
        25 % of the 0.195 s ``benchmarks/gpu_check.py`` measured there (its results file, a
        1.3B-shaped transformer, CFG: two passes a step). The generic guess said 2.1 s."""
        results = json.loads((Path(__file__).parents[2] / "benchmarks" / "results" /
                              "gpu_check-h100-2026-11-27-16rounds.json").read_text())
        config = results["config"]
        event = JobStarted(job="j", seq=0, ts=0, model="m", family="wan2.1",
                           variant="t2v-1.3B", task="t2v", width=config["width"],
                           height=config["height"], num_frames=config["num_frames"],
                           steps=config["steps"], guidance_scale=5.0, cfg=True,
                           device=DeviceInfo(kind="cuda", name=config["device_name"]))
        shape = JobShape.of(event)
        measured = results["steps"]["free_running_step_ended_median_s"] / shape.passes
        assert predict(STEP, shape, Calibration()) == pytest.approx(measured, rel=0.25)

    def test_a_published_figure_is_used_as_published(self) -> None:
        """The 1.3B's own 4090 figure wins over any scaled one; an H200 takes the H200's
        figure, not the H20's (whose name is in it); a GPU with no figure for any size has
        none (the generic guess then)."""
        assert published_step_prior("dit-1.3B", "cuda:NVIDIA GeForce RTX 4090") == \
            PUBLISHED_STEP_PRIORS[("dit-1.3B", "4090")]
        assert published_step_prior("dit-14B", "cuda:NVIDIA H200") == \
            PUBLISHED_STEP_PRIORS[("dit-14B", "H200")]
        assert published_step_prior("dit-14B", "cuda:NVIDIA H20") == \
            PUBLISHED_STEP_PRIORS[("dit-14B", "H20")]
        assert published_step_prior("dit-1.3B", "cuda:NVIDIA L40S") is None
        scaled = published_step_prior("dit-14B", "cuda:NVIDIA GeForce RTX 4090")
        assert scaled is not None and scaled[1] > PUBLISHED_STEP_PRIORS[("dit-5B", "4090")][1]


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

    def test_no_coefficient_comes_out_negative(self) -> None:
        """Two noisy saves, 0.25 s at 0.1 Mpx and 0.28 s at 0.2: the line through them
        (a = 0.22, b = 0.3) is fine, but 0.30 s and 0.26 s give b < 0 — a save that shrinks
        as the video grows, 0 s at 1 Mpx. The negative slope is dropped: the mean remains."""
        rows = [(1.0, 0.1), (1.0, 0.2)]
        assert [0.22, 0.3] == pytest.approx(robust_fit(rows, [0.25, 0.28]), rel=1e-3)
        a, b = robust_fit(rows, [0.30, 0.26])
        assert b == 0.0
        assert a == pytest.approx(0.28, rel=0.05)

    def test_a_negative_intercept_leaves_a_proportional_cost(self) -> None:
        """Points on y = 2x − 0.1: the intercept is dropped, the slope refitted through the
        origin, so no size is predicted at 0 s or less."""
        rows = [(1.0, x) for x in (0.5, 1.0, 2.0)]
        a, b = robust_fit(rows, [2 * x - 0.1 for _, x in rows])
        assert a == 0.0
        assert b > 0

    def test_a_component_fitted_exactly_keeps_the_priors_spread(self) -> None:
        """A component seen at no more shapes than it has coefficients fits them exactly:
        zero residuals say nothing of its spread, so it keeps the prior's (before: 2 %, and
        the live estimate trusted it as a measurement)."""
        assert spread_of([0.0, 0.0], coefficients=2) == DEFAULT_REL_SIGMA
        assert spread_of([0.0], coefficients=1) == DEFAULT_REL_SIGMA
        assert spread_of([0.1, -0.1, 0.05], coefficients=1) < DEFAULT_REL_SIGMA

    def test_few_distinct_rows_use_fewer_coefficients(self) -> None:
        """Without a prior, one distinct shape can only support a constant."""
        assert [2.0, 0.0, 0.0] == pytest.approx(
            robust_fit([(1.0, 3.0, 9.0)] * 4, [2.0, 2.0, 2.0, 2.0]))

    def test_samples_at_one_size_scale_the_priors_shape(self) -> None:
        """Three 81-frame I2V clips (1.59–1.62 Mpx) encoded their image in 2.4–3.1 s (the
        held-out blocks corpus). Alone, they cannot tell the intercept from the per-pixel
        term: the fit made it a constant 2.7 s, and a 0.15 Mpx still that took 0.39 s was
        predicted at 2.7. Held to the prior's shape (0.0036 s + 0.96 s/Mpx), they scale it:
        the still is predicted at the prior's proportion of the clips' cost."""
        rows = [(1.0, 1.6173), (1.0, 1.6139), (1.0, 1.5936)]
        ys = [2.67, 2.42, 3.06]
        prior = (0.0036, 0.96)
        a, b = robust_fit(rows, ys, prior)
        scale = (a + b * 1.6) / (prior[0] + prior[1] * 1.6)
        assert a + b * 0.1536 == pytest.approx(scale * (prior[0] + prior[1] * 0.1536),
                                               rel=0.1)
        assert 0.2 < a + b * 0.1536 < 0.6
        assert robust_fit(rows, ys) == pytest.approx([2.72, 0.0], rel=0.01)  # without it

    def test_samples_that_span_the_features_overrule_the_priors_shape(self) -> None:
        """Forty jobs from 0.1 to 4 Mpx on 0.2 s + 0.5 s/Mpx: a prior of the wrong shape
        (1 s + 0.1 s/Mpx) holds the fit by about one sample's worth, no more."""
        rng = random.Random(4)
        rows, ys = [], []
        for _ in range(40):
            x = rng.uniform(0.1, 4.0)
            rows.append((1.0, x))
            ys.append((0.2 + 0.5 * x) * rng.uniform(0.97, 1.03))
        a, b = robust_fit(rows, ys, prior=(1.0, 0.1))
        assert (a, b) == (pytest.approx(0.2, rel=0.25), pytest.approx(0.5, rel=0.1))

    def test_the_prior_shape_is_only_wans(self) -> None:
        """The fit leans on Wan's priors, measured or published; another family's neutral
        prior assumes no layout, so its components are fitted from their samples alone."""
        def record(event: JobStarted) -> JobRecord:
            return JobRecord(job="j", started=event, stage_durations={"decode": 0.5},
                             step_durations=[0.1, 0.1], completed=True)

        wan = record(started(variant="tiny-t2v", family="wan2.1"))
        assert set(component_priors([wan])) == {"decode|vae-2.1-tiny|cpu", "step|dit-tiny|cpu"}
        other = record(started(variant="tiny-cogvideox", family="cogvideox"))
        assert component_priors([other]) == {}


class TestLiveEstimator:
    @pytest.mark.parametrize(("variant", "family", "share"), [
        ("tiny-t2v", "wan2.1", 0.4), ("tiny-cogvideox", "cogvideox", 1.0)])
    def test_a_decodes_first_piece_is_read_by_its_vaes_share(self, variant: str, family: str,
                                                             share: float) -> None:
        """A first piece of 1 s says a later piece takes 2.5 s in Wan's decode (its first
        piece yields one frame, the others four) and 1 s in CogVideoX's (equal batches)."""
        live = LiveJob.start(started(variant=variant, family=family, width=64, height=64,
                                     frames=17), Calibration())
        assert live.first_piece == share
        live.stage_started("decode", 0)
        live.stage_progress("decode", 1, 4, 10**9)
        assert live.piece_seconds / live.piece_units == pytest.approx(1.0 / share)

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
        raw = live._step_mean() * 39 + live._speed() * sum(
            live.expected[p] for p in live.phases[live.phases.index("denoise") + 1:])
        assert raw > ceiling  # the slowdown alone would lift the ETA past the band
        assert after.remaining_s == pytest.approx(ceiling + 0.5 * (raw - ceiling), rel=1e-6)

    def test_a_peek_between_issues_changes_nothing_the_fold_issues(self) -> None:
        """A reader's ``peek`` is what ``estimate`` would give then, and the ETAs issued
        afterwards are those of an estimator nobody peeked at (a slow step between them would
        otherwise be damped against the peek, not against the last issue)."""
        def run(peek_every_step: bool) -> tuple[list[tuple[float, float, float, float, bool]],
                                                 list[float]]:
            live = LiveJob.start(started(steps=20, stages="", width=64, height=64, frames=17),
                                 Calibration())
            live.stage_started("denoise", 0)
            issued, peeked, ts = [], [], 0
            for step in range(20):
                step_s = live.step_prior * (8.0 if step == 9 else 1.0)  # one slow step
                ts += int(step_s * 1e9)
                live.step_ended(total_steps=20, duration_s=step_s, expert=None, ts=ts)
                if peek_every_step:
                    peeked.append(live.peek(ts).progress)
                if step % 5 == 4:
                    issued.append(live.estimate_fields(ts))
            return issued, peeked

        quiet, _ = run(False)
        watched, progress = run(True)
        assert watched == quiet
        assert len(progress) == 20

    def test_a_peek_is_what_estimate_would_issue(self) -> None:
        """``peek(now)`` and ``estimate(now)`` agree; only ``estimate`` is remembered."""
        live = LiveJob.start(started(steps=10, stages="", width=64, height=64, frames=17),
                             Calibration())
        self._run(live, step_s=live.step_prior, steps=4)
        now = (live.last_step_ts or 0) + 1_000_000
        before = (live.last_remaining, live.last_ts, live.last_progress)
        peeked = live.peek(now)
        assert (live.last_remaining, live.last_ts, live.last_progress) == before
        assert live.estimate(now) == peeked
        assert live.last_ts == now

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


class TestProjectionFoldsTheModel:
    """The ETA projection issues exactly what the model's public API gives, event by event."""

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
        """Every ETA the projection issued equals LiveJob's own estimate after the same events,
        and the projection's estimator is LiveJob's, byte for byte."""
        events = self._job(seed)
        projection = EtaProjection()
        state = projection.initial()
        for event in events:
            state = projection.apply(state, event)
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

    @pytest.mark.parametrize("seed", range(30))
    def test_runs_interleaved_calibrated_and_split(self, seed: int) -> None:
        """Two jobs interleaved in runs of steps, a calibration (quantiles for some buckets; in
        some seeds a sigma so absurd that the interval overflows), folded by the engine's
        adapter in random pieces, issue exactly LiveJob's estimates, fail where it fails and
        leave the same estimators."""
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
        batched = as_batch_projection(projection)
        state = projection.initial()
        failures: list[tuple[str, type[Exception]]] = []
        for lo, hi in itertools.pairwise(cuts):
            state = batched.apply_many(
                state, events[lo:hi],
                lambda event, exc: failures.append((event.job, type(exc))))
        jobs, expected_failures = running_reference(events)
        assert expected_failures == failures
        for job, (live, issued) in jobs.items():
            running = state.running[job]
            assert msgspec.msgpack.encode(live) == msgspec.msgpack.encode(running.live)
            assert repr(issued) == repr([(p.remaining_s, p.p10_s, p.p90_s, p.progress,
                                          p.estimating) for p in running.issued])

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


@st.composite
def eta_logs(draw: st.DrawFn) -> list[Event]:
    """Jobs as a log delivers them to the ETA fold: interleaved, some events lost, A14B jobs
    whose experts switch, unmeasured steps, steps past the plan, failures and cancellations,
    and calibrations (some with a sigma so absurd that the interval overflows: the fold then
    raises mid-batch)."""
    streams: list[list[Event]] = []
    for k in range(draw(st.integers(1, 3))):
        job = f"job-{k}"
        a14b = draw(st.booleans())
        steps = draw(st.integers(0, 12))
        start = started(variant="tiny-t2v-a14b" if a14b else "tiny-t2v",
                        family="wan2.2" if a14b else "wan2.1",
                        boundary=0.875 if a14b else None, width=64, height=64, frames=17,
                        steps=steps, stages=draw(st.sampled_from(["", "load,save"])))
        ts = draw(st.integers(0, 10**10))
        events: list[Event] = [msgspec.structs.replace(start, job=job, ts=ts)]
        switch = draw(st.integers(0, steps))
        for stage in draw(st.lists(st.sampled_from(PHASES), max_size=6)):
            ts += draw(st.integers(0, 10**8))
            events.append(StageStarted(job=job, ts=ts, stage=stage))
            if stage == "denoise":
                for step in range(steps + draw(st.sampled_from([0, 0, 2]))):
                    ts += draw(st.integers(0, 10**8))
                    events.append(StepEnded(
                        job=job, ts=ts, step=step, total_steps=steps,
                        expert=("high_noise" if step < switch else "low_noise") if a14b
                        else None,
                        duration_s=draw(st.none() | st.floats(0.0, 1.0))))
            ts += draw(st.integers(0, 10**8))
            events.append(StageEnded(job=job, ts=ts, stage=stage,
                                     duration_s=draw(st.floats(0.0, 2.0))))
        ts += draw(st.integers(0, 10**8))
        end = draw(st.sampled_from(["completed", "failed", "cancelled", "running"]))
        if end == "completed":
            events.append(JobCompleted(job=job, ts=ts, duration_s=1.0))
        elif end == "failed":
            events.append(JobFailed(job=job, ts=ts, duration_s=1.0, stage="denoise",
                                    error_type="RuntimeError", message="boom"))
        elif end == "cancelled":
            events.append(JobCancelled(job=job, ts=ts, duration_s=1.0, stage="denoise",
                                       reason="requested"))
        numbered = [msgspec.structs.replace(e, seq=seq) for seq, e in enumerate(events)]
        lost = draw(st.sets(st.integers(0, len(numbered) - 1), max_size=2))
        streams.append([e for seq, e in enumerate(numbered) if seq not in lost])
    out: list[Event] = []
    calibrations = 0
    while any(streams):
        if draw(st.integers(0, 15)) == 0:
            decode = component_key("decode", JobShape.of(started()))
            out.append(EtaCalibrated(
                job="wantel/eta", seq=calibrations, ts=0, coefficients={},
                rel_sigma={decode: 1e200} if draw(st.booleans()) else {},
                quantiles={b: (0.8, 1.3) for b in draw(st.sets(st.sampled_from(BUCKETS)))}))
            calibrations += 1
        stream = draw(st.sampled_from([s for s in streams if s]))
        take = draw(st.integers(1, 6))
        out += stream[:take]
        del stream[:take]
    return out


def running_reference(events: list[Event]) -> tuple[dict[str, tuple[LiveJob, list[object]]],
                                                     list[tuple[str, type[Exception]]]]:
    """The running jobs' estimators fed through LiveJob's public methods, with the ETAs the
    projection issues (as fields), and the (job, exception type) of each estimate that
    raised: the ETA projection's rule, written out apart from it — online learning included
    (each completion is learned, and its scored intervals move their buckets' offsets; a
    calibration starts the learning over, but for the offsets)."""
    calibration = Calibration()
    learned = online.Learned()
    jobs: dict[str, tuple[LiveJob, list[object]]] = {}
    failures: list[tuple[str, type[Exception]]] = []

    def complete(job: str, end_ts: int) -> None:
        live, issued = jobs.pop(job)
        online.learn(learned, live.observations(), live.keys[STEP].component,
                     live.warmup_ratio())
        missed: dict[str, list[float]] = {}
        for fields, ts in issued[1:]:  # type: ignore[misc]
            remaining, low, high, progress, _estimating = fields
            actual = (end_ts - ts) / 1e9
            if actual <= 1e-3 or not math.isfinite(remaining):
                continue
            counts = missed.setdefault(bucket_of(progress), [0, 0, 0])
            counts[0] += actual < low
            counts[1] += actual > high
            counts[2] += 1
        online.score_intervals(learned, [(bucket, below / count, above / count)
                                         for bucket, (below, above, count) in missed.items()])

    def issue(job: str, ts: int) -> None:
        live, issued = jobs[job]
        try:
            issued.append((live.estimate_fields(ts), ts))
        except Exception as exc:
            failures.append((job, type(exc)))

    for event in events:
        if isinstance(event, EtaCalibrated):
            calibration = Calibration.of(event)
            learned = online.Learned(offsets=learned.offsets)
        elif isinstance(event, JobStarted):
            jobs[event.job] = (LiveJob.start(event, calibration, learned), [])
            issue(event.job, event.ts)
        elif event.job not in jobs:
            continue
        elif isinstance(event, JobCompleted):
            complete(event.job, event.ts)
        elif isinstance(event, JobFailed | JobCancelled):
            del jobs[event.job]
        elif isinstance(event, StepEnded):
            jobs[event.job][0].step_ended(event.total_steps, event.duration_s, event.expert,
                                          event.ts)
            done, total = event.step + 1, event.total_steps
            if done <= 2 or done >= total or done % max(total // 10, 1) == 0:
                issue(event.job, event.ts)
        elif isinstance(event, StageStarted):
            jobs[event.job][0].stage_started(event.stage, event.ts)
            issue(event.job, event.ts)
        elif isinstance(event, StageEnded):
            jobs[event.job][0].stage_ended(event.stage, event.duration_s)
            issue(event.job, event.ts)
    return {job: (live, [fields for fields, _ts in issued])
            for job, (live, issued) in jobs.items()}, failures


class TestEtaFoldProperties:
    """Properties of the ETA fold on random logs (hypothesis)."""

    @settings(max_examples=60, deadline=None)
    @given(events=eta_logs(), cuts=st.lists(st.integers(0, 200), max_size=4))
    def test_the_fold_is_the_models_rule(self, events: list[Event], cuts: list[int]) -> None:
        """Folded by the engine's adapter in pieces, the running jobs' estimators and ETAs are
        LiveJob's fed the same events, and the fold fails exactly where an estimate raises."""
        projection = EtaProjection()
        batched = as_batch_projection(projection)
        state = projection.initial()
        failures: list[tuple[str, type[Exception]]] = []
        bounds = sorted({min(c, len(events)) for c in cuts} | {0, len(events)})
        for lo, hi in itertools.pairwise(bounds):
            state = batched.apply_many(state, events[lo:hi],
                                       lambda event, exc: failures.append((event.job,
                                                                           type(exc))))
        jobs, expected_failures = running_reference(events)
        assert expected_failures == failures
        assert set(jobs) == set(state.running)
        for job, (live, issued) in jobs.items():
            running = state.running[job]
            assert msgspec.msgpack.encode(live) == msgspec.msgpack.encode(running.live)
            assert repr(issued) == repr([(p.remaining_s, p.p10_s, p.p90_s, p.progress,
                                          p.estimating) for p in running.issued])

    @settings(max_examples=40, deadline=None)
    @given(events=eta_logs(), cuts=st.lists(st.integers(0, 200), max_size=4))
    def test_pieces_with_restore_equal_the_whole(self, events: list[Event],
                                                 cuts: list[int]) -> None:
        """Replayed in pieces, each from the previous piece's checkpoint, the ETA state is the
        one-go state byte for byte (completions scored, failures included)."""
        assert_pieces_equal_whole(lambda: ProjectionEngine([EtaProjection()]), events, cuts)


def test_an_eta_counted_down_never_goes_below_zero() -> None:
    """``EtaPoint.aged``: each of remaining, p10 and p90 less the seconds since the issue,
    floored at 0 (the p10 passes first)."""
    from telemetry.projections.eta import EtaPoint

    point = EtaPoint(ts=0, remaining_s=10.0, p10_s=4.0, p90_s=20.0, progress=0.5,
                     estimating=False)
    assert point.aged(0.0) == (10.0, 4.0, 20.0)
    assert point.aged(6.0) == (4.0, 0.0, 14.0)
    assert point.aged(30.0) == (0.0, 0.0, 0.0)
