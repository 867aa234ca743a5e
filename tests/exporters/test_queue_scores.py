"""The queue's predicted starts and finishes, scored through a real runner as jobs wait,
start and end (``exporters.queue_scores.QueueScorer``)."""

from __future__ import annotations

import pytest

from exporters import queue_scores
from exporters.queue_scores import QueueScorer
from telemetry.engine import ProjectionEngine, ProjectionRunner
from telemetry.events import Event, JobFailed
from telemetry.log.memory import MemoryLog
from telemetry.projections import default_projections
from tests.telemetry.test_queues import T0, S, done, q, start


def failed(job: str, ts_s: float, *, seq: int = 2) -> JobFailed:
    return JobFailed(job=job, seq=seq, ts=T0 + int(ts_s * S), duration_s=1.0,
                     error_type="RuntimeError", message="boom", category="internal")


def default(scores: queue_scores.Scores) -> queue_scores.Scores:
    """The scores of queue ``default`` (``warm``'s history is scored too)."""
    return {key: hist for key, hist in scores.items() if key[0] == "default"}


class Scenario:
    """A runner with the scorer attached before anything happened; :meth:`at` appends
    what happened at one moment and lets the runner apply it (so each forecast is read at
    the moment its events say)."""

    def __init__(self) -> None:
        self.log = MemoryLog()
        self.runner = ProjectionRunner(self.log, ProjectionEngine(default_projections()))
        self.scorer = QueueScorer()
        self.runner.add_sink(self.scorer)

    def at(self, *events: Event) -> None:
        self.log.append(list(events))
        self.runner.catch_up()


def warm(scenario: Scenario) -> None:
    """Worker ``w`` has run two 2-second jobs of model ``m`` from queue ``warm`` (the
    history a waiting job's duration is predicted from: median 2 s)."""
    scenario.at(q("h1", 0, queue="warm"))
    scenario.at(start("h1", 0, "w"))
    scenario.at(done("h1", 2, 2.0))
    scenario.at(q("h2", 3, queue="warm"))
    scenario.at(start("h2", 3, "w"))
    scenario.at(done("h2", 5, 2.0))


def test_predicted_finish_is_scored_once_per_checkpoint_when_the_job_completes() -> None:
    """One slot, 2-second jobs: r runs from 10, x, y and z queue at 11 (x is predicted to
    start at 12 and finish at 14, y to finish at 16). x ends on time (covered, no error), y
    ends at 30, far past its interval (not covered, predicted 5 s to go against 19); z fails
    and is never scored. Each finish is scored once per checkpoint, and only when the job
    completes."""
    scenario = Scenario()
    warm(scenario)
    scenario.at(q("r", 10))
    scenario.at(start("r", 10, "w"))  # w now serves "default"; r was never predicted
    scenario.at(q("x", 11), q("y", 11), q("z", 11))
    scenario.at(done("r", 12, 2.0))
    scenario.at(start("x", 12, "w"))
    assert ("default", "first") in scenario.scorer.read()[0]
    assert default(scenario.scorer.read()[1]) == {}  # x started: its finish waits its end
    scenario.at(done("x", 14, 2.0))
    scenario.at(start("y", 14, "w"))
    scenario.at(done("y", 30, 16.0))
    scenario.at(start("z", 30, "w"))
    scenario.at(failed("z", 31))
    starts, finishes = map(default, scenario.scorer.read())
    assert {key: h.total for key, h in starts.items()} == {
        ("default", "first"): 3, ("default", "half"): 3}  # x, y and z started
    assert {key: (h.total, h.covered) for key, h in finishes.items()} == {
        ("default", "first"): (2, 1), ("default", "half"): (2, 1)}  # x, y: z failed
    # x: 3 s to go from 11 as predicted (error 0); y, first prediction (issued at 11): its
    # finish at 16, 5 s to go against 19; halfway through its wait (12.5), the one issued
    # at 12 when r ended: still 16, 4 s to go against 18.
    assert finishes[("default", "first")].sum == pytest.approx((5 - 19) / 19, abs=1e-6)
    assert finishes[("default", "half")].sum == pytest.approx((4 - 18) / 18, abs=1e-6)
    assert finishes[("default", "first")].sum_abs == pytest.approx(14 / 19, abs=1e-6)


def test_a_job_that_fails_or_is_cancelled_after_starting_is_not_scored() -> None:
    """The finish predicted for a queued job that started and then failed is dropped; a
    later job with the same id that completes is not scored against it either."""
    scenario = Scenario()
    warm(scenario)
    scenario.at(q("r", 10))
    scenario.at(start("r", 10, "w"))
    scenario.at(q("x", 11))
    scenario.at(done("r", 12, 2.0))
    scenario.at(start("x", 12, "w"))
    scenario.at(failed("x", 13))
    scenario.at(done("x", 14, 2.0, seq=3))
    starts, finishes = map(default, scenario.scorer.read())
    assert starts[("default", "first")].total == 1
    assert finishes == {}


def test_started_jobs_that_never_end_are_forgotten_with_the_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With room for one running job's finishes, the older of two started jobs' is forgotten
    when the newer starts: only the newer is scored when both complete."""
    monkeypatch.setattr(queue_scores, "MAX_PENDING", 1)
    scenario = Scenario()
    warm(scenario)
    scenario.at(q("r", 10))
    scenario.at(start("r", 10, "w"))
    scenario.at(q("old", 10.1))  # predicted: after r, 12 to 14
    scenario.at(start("old", 10.1, "w2"))  # on another worker at once
    scenario.at(q("new", 11))  # predicted: after r, 12 to 14
    scenario.at(done("r", 12, 2.0))
    scenario.at(start("new", 12, "w"))  # two jobs' finishes kept: old's is forgotten
    scenario.at(done("old", 12.5, 2.4))
    scenario.at(done("new", 14, 2.0))
    starts, finishes = map(default, scenario.scorer.read())
    assert starts[("default", "first")].total == 2
    assert finishes[("default", "first")].total == 1
    assert finishes[("default", "first")].sum == pytest.approx(0.0, abs=1e-6)  # new's


def test_the_runner_cuts_only_before_the_start_of_a_job_that_waited_in_a_queue() -> None:
    """The scorer needs the forecast made just before a queued job starts, so the runner cuts
    a batch there; a job that never queued needs no cut (each cut is one more step of every
    projection and sink). One batch: two unqueued jobs, then one queued and started."""
    from telemetry.runner import Applied, Sink

    class Steps(Sink):
        name = "steps"

        def __init__(self) -> None:
            self.sizes: list[int] = []

        def on_applied(self, applied: Applied) -> None:
            self.sizes.append(len(applied.events))

    scenario = Scenario()
    steps = Steps()
    scenario.runner.add_sink(steps)
    scenario.at(start("a", 0, "w", seq=0), done("a", 1, 1.0, seq=1),
                start("b", 1, "w", seq=0), done("b", 2, 1.0, seq=1),
                q("c", 2), start("c", 3, "w"))
    assert steps.sizes == [5, 1]  # one cut: before c's start, none before a's or b's
