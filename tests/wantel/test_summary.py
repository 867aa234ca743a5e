"""The job read model: one definition of each figure, and the three views that format it."""

from __future__ import annotations

from typing import Any

import pytest

from exporters.service import summarize
from telemetry.engine import ProjectionEngine
from telemetry.events import Event, StepEnded
from telemetry.log.base import Batch
from telemetry.projections import default_projections
from telemetry.projections.summary import job_summary
from tests.telemetry.test_engine import a_job, step_ts
from wantel.commands import replay
from wantel.commands.run import _figures, _summary


def folded(events: list[Event]) -> ProjectionEngine:
    engine = ProjectionEngine(default_projections())
    engine.apply_batch(Batch(0, events))
    return engine


def running_job(job: str, steps: int) -> list[Event]:
    """A job stopped after ``steps`` steps of eight, the last ones slower."""
    events = a_job(job, steps=8)[:2 + steps]
    for index, event in enumerate(events):
        if isinstance(event, StepEnded) and index >= 4:
            events[index] = StepEnded(job=job, seq=event.seq, ts=step_ts(event.step),
                                      step=event.step, total_steps=8, timestep=1.0,
                                      duration_s=1.0)
    return events


class TestJobSummary:
    def test_an_unknown_job_has_none(self) -> None:
        """No view, no summary."""
        assert job_summary(folded(a_job("a")).states, "b") is None

    def test_an_ended_job_shows_one_rate_everywhere(self) -> None:
        """Once a job ended the API, replay and run all print the mean over its steps."""
        engine = folded(a_job("a"))
        summary = job_summary(engine.states, "a")
        assert summary is not None
        assert (4.0, None, 4.0) == (summary.mean_steps_per_second,
                                    summary.smoothed_steps_per_second, summary.steps_per_second)
        api: dict[str, Any] | None = summarize(engine.states, "a")
        assert api is not None
        replayed = replay.job_summary(summary.view, engine)
        run = _summary(summary, "a", "log")
        assert 4.0 == api["steps_per_second"] == replayed["steps_per_second"]
        assert 4.0 == run["steps_per_second"]
        assert "4 steps, 4.00 it/s" in _figures(summary)
        assert 1.0 == summary.progress == api["progress"] == replayed["progress"]

    def test_a_running_job_shows_its_smoothed_rate_live(self) -> None:
        """While running, the live rate is the EMA; the mean stays replay's steps_per_second."""
        engine = folded(running_job("a", steps=5))
        summary = job_summary(engine.states, "a")
        assert summary is not None
        smoothed, mean = summary.smoothed_steps_per_second, summary.mean_steps_per_second
        assert smoothed is not None and mean is not None
        assert smoothed != pytest.approx(mean)
        assert smoothed == summary.steps_per_second
        api = summarize(engine.states, "a")
        assert api is not None
        replayed = replay.job_summary(summary.view, engine)
        assert smoothed == api["steps_per_second"] == replayed["steps_per_second_smoothed"]
        assert mean == replayed["steps_per_second"]
        assert summary.latest_eta is not None
        assert summary.latest_eta.progress == summary.progress == api["progress"]
        assert summary.eta_history[-1] is summary.latest_eta
