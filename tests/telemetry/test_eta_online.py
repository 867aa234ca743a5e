"""The ETA learns by itself: online calibration, robust live updates, monotone progress.

Jobs here are synthetic but honest: each phase takes what the prior expects times the
machine's speed factor (and, where a test says so, seeded noise), written as the events a real
``wantel run`` emits, then folded by the real ETA projection and scored by the real evaluation.
"""

from __future__ import annotations

import datetime
import math
import random
import threading
import time
from collections.abc import Callable

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telemetry.engine import ProjectionEngine
from telemetry.eta import online
from telemetry.eta.evaluate import StaticProfile, evaluate, online_starts
from telemetry.eta.fit import fit
from telemetry.eta.jobs import job_records
from telemetry.eta.live import FIRST_PIECE, PRIOR_PIECES, LiveJob, Prior, prior_pieces
from telemetry.eta.model import Calibration, speed_key
from telemetry.eta.shape import JobShape
from telemetry.events import (
    DeviceInfo,
    EtaCalibrated,
    Event,
    JobCompleted,
    JobStarted,
    StageEnded,
    StageProgress,
    StageStarted,
    StepEnded,
    WorkerStopped,
)
from telemetry.log.base import Batch
from telemetry.projections import default_projections
from telemetry.projections.eta import EtaProjection

from .test_eta_model import eta_logs

SECOND = 10**9


def job_events(job: str, start_ts: int, *, factor: float = 1.0, noise: float = 0.0,
               rng: random.Random | None = None, size: int = 64, steps: int = 8,
               slow_phase: tuple[str, float] | None = None, first_step: float = 1.0,
               options: dict[str, str | int | bool] | None = None,
               pieces: int = 0) -> list[Event]:
    """One tiny T2V job's events, each phase taking its prior expectation × ``factor`` (×
    log-normal ``noise``; ``slow_phase``: that phase × its own factor more; the first step ×
    ``first_step``; ``pieces``: the decode reports that many, the first ``FIRST_PIECE`` of a
    later one, as Wan's VAE does)."""
    rng = rng or random.Random(0)
    started = JobStarted(job=job, seq=0, ts=start_ts, model="tiny-t2v", family="wan2.1",
                         variant="tiny-t2v", task="t2v", width=size, height=size,
                         num_frames=17, steps=steps, guidance_scale=5.0, cfg=True,
                         device=DeviceInfo(kind="cpu", name="cpu"),
                         options={"stages": "", **(options or {})})
    shape = JobShape.of(started)
    prior = Prior.of(shape, False, Calibration())
    events: list[Event] = [started]
    ts = start_ts

    def took(seconds: float, phase: str) -> float:
        jitter = rng.lognormvariate(0.0, noise) if noise else 1.0
        extra = slow_phase[1] if slow_phase and slow_phase[0] == phase else 1.0
        return seconds * factor * jitter * extra

    for phase in prior.phases:
        events.append(StageStarted(job=job, ts=ts, stage=phase))
        if phase == "denoise":
            begin = ts
            for step in range(steps):
                duration = took(prior.step, "step") * (first_step if step == 0 else 1.0)
                ts += int(duration * SECOND)
                events.append(StepEnded(job=job, ts=ts, step=step, total_steps=steps,
                                        duration_s=duration))
            duration = (ts - begin) / SECOND
        else:
            duration = took(prior.expected[phase], phase)
            if phase == "decode" and pieces:
                later = duration / (pieces - 1 + FIRST_PIECE)
                begin = ts
                for piece in range(1, pieces + 1):
                    ts += int((FIRST_PIECE if piece == 1 else 1.0) * later * SECOND)
                    events.append(StageProgress(job=job, ts=ts, stage=phase, done=piece,
                                                total=pieces))
                ts = begin
            ts += int(duration * SECOND)
        events.append(StageEnded(job=job, ts=ts, stage=phase, duration_s=duration))
    events.append(JobCompleted(job=job, ts=ts + 1, duration_s=(ts + 1 - start_ts) / SECOND))
    return [msgspec.structs.replace(e, seq=seq) for seq, e in enumerate(events)]


def series(count: int, **kwargs: object) -> list[Event]:
    """``count`` jobs one after the other."""
    events: list[Event] = []
    ts = 0
    for index in range(count):
        job = job_events(f"job-{index:03d}", ts, rng=random.Random(index), **kwargs)  # type: ignore[arg-type]
        events += job
        ts = job[-1].ts + SECOND
    return events


def online_errors(events: list[Event], calibration: Calibration | None = None
                  ) -> dict[str, dict[float, float]]:
    """Each job's signed error of the predicted total, by point, scored online."""
    records = [r for r in job_records(events) if r.completed]
    starts = online_starts(events, calibration)
    report = evaluate(records, Calibration(), StaticProfile.fit(records), starts)
    return report.per_job


class TestOnlineCalibration:
    def test_a_machine_ten_times_slower_is_learned_from_its_first_jobs(self) -> None:
        """Six identical jobs ten times slower than the prior: the first job's before-start
        estimate is far off, and from the 4th job on it is within 25 %; the first job's ETA at
        half its duration is already within 20 %, from its own phases and steps."""
        errors = online_errors(series(6, factor=10.0))
        jobs = sorted(errors)
        assert errors[jobs[0]][0.0] < -0.8
        assert all(abs(errors[job][0.0]) <= 0.25 for job in jobs[3:])
        assert abs(errors[jobs[0]][0.5]) <= 0.20
        assert all(abs(errors[job][0.5]) <= 0.10 for job in jobs[1:])

    @pytest.mark.parametrize("scale", [5.0, 0.2])
    def test_a_prior_five_times_off_recovers(self, scale: float) -> None:
        """Priors 5× too slow or too fast: within 4 jobs the before-start estimate is within
        25 %, and at half the duration within 15 % from the first job on."""
        errors = online_errors(series(6, noise=0.05), Calibration(prior_scale=scale))
        jobs = sorted(errors)
        assert all(abs(errors[job][0.0]) <= 0.25 for job in jobs[3:])
        assert all(abs(errors[job][0.5]) <= 0.15 for job in jobs)

    def test_what_was_learned_is_part_of_the_state_and_a_calibration_resets_it(self) -> None:
        """Completed jobs leave statistics in the state; an explicit calibration (which saw
        those jobs) starts the learning over."""
        projection = EtaProjection()
        state = projection.initial()
        for event in series(3, factor=3.0):
            state = projection.apply(state, event)
        assert state.learned.jobs == 3
        assert state.learned.levels["device|cpu"][0] == pytest.approx(
            __import__("math").log(3.0), abs=0.05)
        state = projection.apply(state, EtaCalibrated(job="wantel/eta", ts=0,
                                                      coefficients={}))
        assert state.learned.jobs == 0

    @pytest.mark.parametrize("estimator", ["python", "c"])
    def test_a_job_started_at_its_base_teaches_no_spread(self, estimator: str) -> None:
        """A machine 5× slower than the priors: the first job's phases miss by a factor of
        5, which the device level takes at once, so they teach the spreads nothing (counted,
        that log error of 1.6 widened every interval for the spreads' memory); the second
        job, started corrected, does — and its misses are small."""
        projection = EtaProjection(estimator=estimator)
        state = projection.initial()
        events = series(2, factor=5.0, noise=0.05)
        first_end = next(i for i, e in enumerate(events) if isinstance(e, JobCompleted))
        for event in events[:first_end + 1]:
            state = projection.apply(state, event)
        assert state.learned.jobs == 1
        assert state.learned.levels["device|cpu"][0] == pytest.approx(math.log(5.0), abs=0.1)
        assert state.learned.error == {}
        assert state.learned.shared == {}
        for event in events[first_end + 1:]:
            state = projection.apply(state, event)
        assert state.learned.error
        assert all(stats[0] < 0.3 for stats in state.learned.error.values())

    def test_the_first_step_is_a_warm_up_learned_from_history(self) -> None:
        """Jobs whose first step takes 8× the others teach a warm-up of ~8, which the next
        job's expected denoise time includes."""
        projection = EtaProjection()
        state = projection.initial()
        for event in series(5, first_step=8.0, steps=10):
            state = projection.apply(state, event)
        nxt = job_events("next", 10**12, steps=10)[0]
        assert isinstance(nxt, JobStarted)
        live = LiveJob.start(nxt, state.calibration, state.learned)
        assert live.warmup == pytest.approx(8.0, rel=0.1)
        assert live.expected["denoise"] == pytest.approx(live.step_prior * (9 + 8.0), rel=0.1)

    def test_state_stays_bounded_however_many_shapes(self) -> None:
        """Per-shape statistics are capped (oldest forgotten); per-component ones are one per
        component: the cost of learning stays flat as history grows."""
        learned = online.Learned()
        observation = job_observations(job_events("x", 0))
        for index in range(online.MAX_FAMILIES + 50):
            shifted = [msgspec.structs.replace(o, keys=msgspec.structs.replace(
                o.keys, family=f"{o.keys.family}#{index}")) for o in observation]
            online.learn(learned, shifted, None, None)
        assert len(learned.families) == online.MAX_FAMILIES
        assert len(learned.components) == len(observation)


def by_workers(jobs: list[tuple[str, float]]) -> list[Event]:
    """Jobs one after the other, each ``(worker, factor)``: run by that worker, its phases at
    ``factor`` × the prior; ``("stop", 0)`` is that the last worker stopped."""
    events: list[Event] = []
    ts, last = 0, ""
    for index, (worker, factor) in enumerate(jobs):
        if worker == "stop":
            events.append(WorkerStopped(job=f"worker/{last}", seq=0, ts=ts, worker=last,
                                        host="h", pid=1))
            continue
        job = job_events(f"job-{index:03d}", ts, factor=factor, rng=random.Random(index))
        events += [msgspec.structs.replace(e, worker=worker) for e in job]
        ts, last = job[-1].ts + SECOND, worker
    return events


class TestWarmWorkers:
    """A process's first job pays what it does once (lazy initialisation, thread pools,
    kernels compiled for the first shapes); a worker's later jobs are learned apart from it."""

    def test_a_slow_first_job_does_not_make_the_workers_later_jobs_look_slow(self) -> None:
        """One worker: its first job 8× the prior, then jobs at the prior. The second is
        estimated from what warm jobs showed (nothing yet: the prior), within 25 % before it
        starts; were the first job's speed taken as the machine's, it would be ~3× over."""
        errors = online_errors(by_workers([("w", 8.0), ("w", 1.0), ("w", 1.0), ("w", 1.0)]))
        jobs = sorted(errors)
        assert all(abs(errors[job][0.0]) <= 0.25 for job in jobs[1:]), errors

    def test_one_job_processes_learn_from_each_other_as_first_jobs(self) -> None:
        """Every job its own process (``wantel run``): all first jobs, learned under the plain
        device level, so an 8× slower machine is learned from them as before."""
        events = by_workers([(f"w{i}", 8.0) for i in range(6)])
        errors = online_errors(events)
        jobs = sorted(errors)
        assert all(abs(errors[job][0.0]) <= 0.25 for job in jobs[3:]), errors
        projection = EtaProjection()
        state = projection.initial()
        for event in events:
            state = projection.apply(state, event)
        assert state.learned.levels and not any(
            key.endswith("|warm") for key in state.learned.levels)

    def test_a_worker_that_stopped_starts_cold_again(self) -> None:
        """First job cold, the next warm; after ``WorkerStopped`` the worker's next job is a
        first job again (a new process), under the plain level."""
        events = by_workers([("w", 1.0), ("w", 1.0), ("stop", 0.0), ("w", 1.0)])
        projection = EtaProjection()
        state = projection.initial()
        levels: dict[str, str] = {}
        for event in events:
            state = projection.apply(state, event)
            if type(event) is JobStarted:
                levels[event.job] = state.running[event.job].live.keys["step"].device
        assert ["device|cpu", "device|cpu|warm", "device|cpu"] == [
            levels[job] for job in sorted(levels)]


def job_observations(events: list[Event]) -> list[online.Observation]:
    """What a completed job's estimator hands to online learning."""
    started = events[0]
    assert isinstance(started, JobStarted)
    live = LiveJob.start(started, Calibration())
    for event in events[1:]:
        live.observe(event)
    return live.observations()


class TestRobustLiveUpdates:
    def _live_at(self, events: list[Event], until: int) -> LiveJob:
        started = events[0]
        assert isinstance(started, JobStarted)
        live = LiveJob.start(started, Calibration())
        for event in events[1:until]:
            live.observe(event)
        return live

    def test_a_ten_times_slower_job_is_not_clipped(self) -> None:
        """What the job shows moves its speed as far as the evidence says: ~10, not 3."""
        events = job_events("slow", 0, factor=10.0, steps=20)
        live = self._live_at(events, len(events) - 6)  # in the loop, phases and steps seen
        assert live._speed() == pytest.approx(10.0, rel=0.25)

    def test_one_anomalous_phase_does_not_scale_every_later_one(self) -> None:
        """On a machine whose jobs ran as expected, a text encode 8× its expectation: once
        the steps show the job's real speed, the phases to come are expected at ~their prior
        (before: every later phase was scaled, +144 % at half the job)."""
        projection = EtaProjection()
        state = projection.initial()
        for event in series(6, noise=0.05):
            state = projection.apply(state, event)
        events = job_events("odd", 10**13, slow_phase=("text_encode", 8.0), steps=20)
        for event in events[:-6]:  # in the loop: text encode and steps seen
            state = projection.apply(state, event)
        assert 0.8 <= state.running["odd"].live._speed() <= 1.3

    def test_a_phase_of_a_fraction_of_a_millisecond_says_nothing_of_the_speed(self) -> None:
        """Priors 5× slow, so the noise latents are expected to take 10 ms; drawn in 0.1 ms,
        they are timer noise, not a job 100× faster: when the loop starts, the speed is what
        the text encode said (0.2), where the latents' ratio dragged it to 0.11."""
        events = job_events("quick", 0, steps=20, slow_phase=("latent_init", 0.05))
        started = events[0]
        assert isinstance(started, JobStarted)
        live = LiveJob.start(started, Calibration(prior_scale=5.0))
        assert live.expected["latent_init"] >= 0.005
        loop_start = 6  # text encode and latent init seen, the loop started
        for event in events[1:loop_start]:
            live.observe(event)
        assert live.done["latent_init"] < 0.001
        assert live._speed() == pytest.approx(0.2, rel=0.15)

    def test_a_job_all_of_whose_phases_are_fast_is_still_corrected_by_them(self) -> None:
        """A tiny image model's job is fast throughout: its text encode takes 4 ms where 500 ms
        was expected (priors 5× slow). Its time's millisecond of noise leaves that strong
        evidence: when the loop starts, the job's speed is far below 1 (a rule that ignored
        every phase under 5 ms left it at 1, and the job's ETA at 13× its length)."""
        events = job_events("fast", 0, factor=0.04, steps=20)
        started = events[0]
        assert isinstance(started, JobStarted)
        live = LiveJob.start(started, Calibration(prior_scale=5.0))
        for event in events[1:6]:
            live.observe(event)
        assert live.done["text_encode"] < 0.005
        assert live._speed() < 0.05

    def test_the_interval_widens_when_the_job_disagrees_and_narrows_with_steps(self) -> None:
        """Relative width of the interval: wider for a job far from its prior than for one
        on it, at the same point; narrower after many steps than after two."""
        def width(factor: float, until: int, *, slow: str = "step") -> float:
            events = job_events("w", 0, steps=200, slow_phase=(slow, factor))
            live = self._live_at(events, until)
            estimate = live.estimate(events[until - 1].ts)
            return (estimate.p90_s - estimate.p10_s) / estimate.remaining_s

        loop_start = 6  # JobStarted, text_encode and latent_init started and ended, denoise
        assert width(1.0, loop_start + 3) < width(1.0, 2)  # steps seen vs nothing yet
        assert width(1.0, loop_start + 150) < width(1.0, loop_start + 3)
        # A phase far from its prior: the job's speed is less certain, the interval wider.
        assert width(4.0, loop_start, slow="text_encode") > width(1.0, loop_start)

    def test_the_steps_a_slow_job_has_shown_are_not_as_uncertain_as_its_speed(self) -> None:
        """A job 30× slower than its prior, steady over 14 of 40 steps: its speed's surprise
        widens what scales with that speed (the decode to come), not the 26 steps left at the
        pace it has shown, so the p10 is not below half of them (before: the whole remaining
        time was spread by the speed's variance, p10 ≈ 0 s on the live page)."""
        events = job_events("slow", 0, factor=30.0, steps=40)
        loop_start = 6
        live = self._live_at(events, loop_start + 14)
        estimate = live.estimate(events[loop_start + 13].ts)
        step = next(e for e in events if isinstance(e, StepEnded) and e.step == 5).duration_s
        assert step is not None
        steps_left = 26 * step
        assert estimate.p10_s >= 0.5 * steps_left
        assert estimate.p10_s <= estimate.remaining_s <= estimate.p90_s


    @pytest.mark.parametrize("slow", [4.0, 0.25])
    def test_a_decode_that_reports_its_pieces_is_followed_at_its_own_pace(
            self, slow: float) -> None:
        """A decode 4× slower (or faster) than the rest of the job says: its pieces' pace, not
        the job's speed, predicts its end — within 20 % a third of the way through (the
        prior's quarter of a piece still pulls), where the same job without pieces is off by
        far more."""
        events = job_events("d", 0, slow_phase=("decode", slow), pieces=12)
        started = next(i for i, e in enumerate(events)
                       if isinstance(e, StageStarted) and e.stage == "decode")
        ended = next(e for e in events if isinstance(e, StageEnded) and e.stage == "decode")
        fifth = events[started + 5]  # the decode's fifth piece: a third of its time
        assert isinstance(fifth, StageProgress) and fifth.done == 5
        without = [e for e in events if not isinstance(e, StageProgress)]
        left = (ended.ts - fifth.ts) / SECOND
        with_pieces = self._live_at(events, started + 6).estimate(fifth.ts)
        cut = without.index(events[started])
        blind = self._live_at(without, cut + 1).estimate(fifth.ts)
        post = with_pieces.remaining_s - self._remaining_in(events, started + 6, fifth.ts)
        assert abs(with_pieces.remaining_s - post - left) <= 0.20 * left
        assert abs(blind.remaining_s - post - left) >= 0.4 * left
        assert with_pieces.p10_s <= with_pieces.remaining_s <= with_pieces.p90_s

    def test_a_job_far_from_its_prior_follows_its_decodes_first_piece(self) -> None:
        """Every phase 4× its prior but the decode at 1.5× (a loaded CPU's steps ran at 3.4×
        its prior while its decode ran at 1.4×): after the decode's first piece of four, the
        decode's remaining time is within 15 % of the truth, as its first piece says, not
        the prior's pace at the job's speed (which said 2.7× as long: +78 % with the prior
        weighing as much as the piece). Within the device's usual spread the prior's pace
        weighs PRIOR_PIECES."""
        events = job_events("far", 0, factor=4.0, slow_phase=("decode", 0.375), pieces=4)
        started = next(i for i, e in enumerate(events)
                       if isinstance(e, StageStarted) and e.stage == "decode")
        ended = next(e for e in events if isinstance(e, StageEnded) and e.stage == "decode")
        first = events[started + 1]
        assert isinstance(first, StageProgress) and first.done == 1
        left = (ended.ts - first.ts) / SECOND
        assert abs(self._remaining_in(events, started + 2, first.ts) - left) <= 0.15 * left
        assert prior_pieces(1.5, 1.0) == PRIOR_PIECES
        assert prior_pieces(4.0, 1.0) < PRIOR_PIECES / 5

    def _remaining_in(self, events: list[Event], until: int, now: int) -> float:
        """What the estimator at ``until`` gives the decode alone (the phase under way)."""
        live = self._live_at(events, until)
        assert live.phase == "decode"
        return live._pieces_left("decode", now, live._speed())[0]

    def test_pieces_of_another_phase_or_out_of_order_change_nothing(self) -> None:
        """A report for a phase not under way, one that goes backwards, or one past its own
        total leaves the estimator as it was."""
        events = job_events("d", 0, pieces=6)
        started = next(i for i, e in enumerate(events)
                       if isinstance(e, StageStarted) and e.stage == "decode")
        live = self._live_at(events, started + 3)  # two pieces seen
        before = msgspec.to_builtins(live)
        ts = events[started + 2].ts + 1
        for stage, done, total in (("postprocess", 3, 6), ("decode", 1, 6), ("decode", 2, 6),
                                   ("decode", 7, 6), ("decode", 0, 0), ("denoise", 3, 6),
                                   ("decode", 3, 5)):
            live.stage_progress(stage, done, total, ts)
        assert msgspec.to_builtins(live) == before


class TestIntervalCalibration:
    def test_coverage_is_made_to_be_about_80_percent(self) -> None:
        """Noisy jobs (±35 % a phase, log-normal) on a machine 2× slower than the prior: the
        online conformal offsets bring p10–p90 coverage of the later jobs near 80 %."""
        events = series(80, factor=2.0, noise=0.35)
        records = [r for r in job_records(events) if r.completed]
        starts = online_starts(events)
        late = records[40:]
        report = evaluate(late, Calibration(), StaticProfile.fit(records), starts)
        coverage = report.coverage()
        assert coverage is not None and 0.70 <= coverage <= 0.90


class TestFit:
    def test_fit_records_how_much_job_speeds_vary(self) -> None:
        """A calibration keeps the spread of job speeds its jobs showed (under
        ``speed|<device>`` in rel_sigma): large for a machine whose jobs all slow together."""
        rng = random.Random(5)
        events: list[Event] = []
        ts = 0
        for index in range(30):
            job = job_events(f"j{index}", ts, factor=rng.choice([1.0, 3.0]), noise=0.02,
                             rng=rng, size=rng.choice([32, 64, 96]))
            events += job
            ts = job[-1].ts + SECOND
        calibration = fit(job_records(events)).calibration
        assert calibration.rel_sigma[speed_key("cpu")] > 0.3

    def test_a_job_of_several_videos_teaches_one_videos_cost(self) -> None:
        """Jobs of 1, 2 and 3 videos per prompt, each phase at its prior: the fit learns one
        video's decode and save and one pass's step — the priors — so a job's estimate is
        its videos times them (before: a 3-video job's whole decode was taken as one
        video's, and the mixed fit crossed zero)."""
        events: list[Event] = []
        ts = 0
        for index in range(12):
            job = job_events(f"v{index}", ts, size=(32, 64, 96)[index % 3],
                             options={"num_videos": 1 + index % 4 // 2 + index % 2})
            events += job
            ts = job[-1].ts + SECOND
        records = job_records(events)
        assert {1, 2, 3} <= {r.shape.videos for r in records}
        calibration = fit(records).calibration
        for record in records:
            fitted = Prior.of(record.shape, False, calibration)
            prior = Prior.of(record.shape, False, Calibration())
            for phase in ("decode", "postprocess"):
                assert fitted.expected[phase] == pytest.approx(prior.expected[phase], rel=0.02)
            assert fitted.step == pytest.approx(prior.step, rel=0.02)


class TestProgress:
    @settings(max_examples=60, deadline=None)
    @given(events=eta_logs())
    def test_progress_never_decreases(self, events: list[Event]) -> None:
        """Within a job, every ETA's progress is at least the one before it."""
        projection = EtaProjection()
        state = projection.initial()
        for event in events:
            try:
                state = projection.apply(state, event)
            except (OverflowError, ValueError):  # an absurd calibration's overflow
                continue
        for running in state.running.values():
            progress = [point.progress for point in running.issued]
            assert progress == sorted(progress)

    def test_progress_holds_when_a_job_turns_out_longer(self) -> None:
        """Steps suddenly 5× slower: the remaining time grows, progress does not go back."""
        events = job_events("p", 0, steps=20)
        slow = []
        for event in events:
            if isinstance(event, StepEnded) and event.step >= 10:
                slow.append(msgspec.structs.replace(event, duration_s=event.duration_s * 5))
            else:
                slow.append(event)
        projection = EtaProjection()
        state = projection.initial()
        issued = []
        for event in slow[:-1]:
            state = projection.apply(state, event)
            issued = list(state.running["p"].issued)
        progress = [point.progress for point in issued]
        assert progress == sorted(progress)


class TestPurity:
    @settings(max_examples=30, deadline=None)
    @given(events=eta_logs())
    def test_projections_never_read_the_clock(self, events: list[Event]) -> None:
        """Every default projection folds a log with every clock of the standard library
        unplugged: what they compute comes from the events alone."""
        reads: list[str] = []  # the engine records a fold's exception: count them here
        folding = threading.get_ident()
        names = ("time", "time_ns", "monotonic", "monotonic_ns", "perf_counter",
                 "perf_counter_ns")
        saved = {name: getattr(time, name) for name in names}

        def no_clock(name: str) -> Callable[..., float]:
            # Only this thread's reads count: the time module is process-wide, and a daemon
            # thread an earlier test left (an emitter, a shipper) may read its own clock.
            def read(*args: object) -> float:
                if threading.get_ident() != folding:
                    return float(saved[name](*args))
                reads.append("clock")
                raise AssertionError("a projection read the clock")
            return read

        engine = ProjectionEngine(default_projections())
        original_datetime = datetime.datetime
        try:
            for name in names:
                setattr(time, name, no_clock(name))

            class NoNow(original_datetime):
                @classmethod
                def now(cls, tz: datetime.tzinfo | None = None) -> NoNow:
                    if threading.get_ident() != folding:
                        return original_datetime.now(tz)  # type: ignore[return-value]
                    reads.append("datetime.now")
                    raise AssertionError("a projection read the clock")

            datetime.datetime = NoNow  # type: ignore[misc]
            for position, event in enumerate(events):  # event by event: every rule runs
                engine.apply_batch(Batch(position, [event]))
        finally:
            for name, function in saved.items():
                setattr(time, name, function)
            datetime.datetime = original_datetime  # type: ignore[misc]
        assert reads == []


@pytest.mark.parametrize("cuts", [[5], [40, 80], [1, 2, 3]])
def test_replay_equals_incremental_with_online_learning(cuts: list[int]) -> None:
    """Folded in pieces, each restored from the previous checkpoint, a log of completed jobs
    leaves exactly the state of one fold: what was learned, and every ETA issued."""
    from .test_engine import assert_pieces_equal_whole

    events = series(12, factor=2.5, noise=0.2)
    assert_pieces_equal_whole(lambda: ProjectionEngine([EtaProjection()]), events, cuts)


@given(st.integers(0, 2**31))
@settings(max_examples=10, deadline=None)
def test_online_learning_is_deterministic(seed: int) -> None:
    """Two folds of the same log learn byte-identical states."""
    events = series(4, factor=random.Random(seed).uniform(0.2, 5.0), noise=0.3)
    states = []
    for _ in range(2):
        projection = EtaProjection()
        state = projection.initial()
        for event in events:
            state = projection.apply(state, event)
        states.append(msgspec.msgpack.encode(state))
    assert states[0] == states[1]
