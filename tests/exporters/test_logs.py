"""Lifecycle log lines: one JSON line per lifecycle event, linked to the job's trace and span."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exporters.logs import LIFECYCLE, LifecycleLogger
from exporters.otel import spans_for_job
from telemetry.engine import ProjectionEngine
from telemetry.events import (
    Event,
    JobCancelled,
    JobFailed,
    JobQueued,
    JobStarted,
    StageEnded,
    StageStarted,
    StepEnded,
)
from telemetry.log.base import Batch
from telemetry.log.local import LocalLog
from telemetry.runner import ProjectionRunner
from tests.polling import wait_for
from tests.telemetry.log_contract import events_of
from wantel.logs import configure_logging

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "eta-corpus"
CALLER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture(name="events", scope="module")
def _events() -> list[Event]:
    """Real recorded jobs (Wan 2.1 and 2.2 A14B) plus a queued, a failed and a cancelled job."""
    log = LocalLog(CORPUS, create=False)
    recorded = events_of(log.read())
    log.close()
    first = next(e for e in recorded if isinstance(e, JobStarted))
    queued = JobQueued(job=first.job, seq=1_000, ts=first.ts - 2_000_000_000,
                       model=first.model, task=first.task, traceparent=CALLER)
    start = first.ts + 10**12
    failed = [
        JobStarted(**{**_fields(first), "job": "failed-1", "seq": 0, "ts": start}),
        StageStarted(job="failed-1", seq=1, ts=start + 1_000, stage="denoise"),
        StepEnded(job="failed-1", seq=2, ts=start + 2_000, step=0, total_steps=4,
                  duration_s=0.001),
        JobFailed(job="failed-1", seq=3, ts=start + 3_000, duration_s=3e-6, stage="denoise",
                  step=1, error_type="OutOfMemoryError", message="CUDA out of memory", oom=True),
    ]
    cancelled = [
        JobQueued(job="cancelled-1", seq=0, ts=start, model="tiny-t2v", task="t2v"),
        JobCancelled(job="cancelled-1", seq=1, ts=start + 5_000, duration_s=0.0,
                     reason="user"),
    ]
    return [queued] + recorded + failed + cancelled


def _fields(event: Event) -> dict[str, Any]:
    return {name: getattr(event, name) for name in event.__struct_fields__}


@pytest.fixture(name="stream")
def _stream() -> Iterator[io.StringIO]:
    """A non-TTY stream that JSON lines go to; the stdlib handler is removed afterwards."""
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    yield stream
    root.setLevel(level)
    for handler in list(root.handlers):
        if getattr(handler, "_wantel_handler", False):
            root.removeHandler(handler)


def lines_of(stream: io.StringIO) -> list[dict[str, Any]]:
    """Every line written, parsed as JSON."""
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def logged(events: list[Event], stream: io.StringIO) -> list[dict[str, Any]]:
    """Configure JSON logging to ``stream``, feed ``events`` as one log batch, parse the lines."""
    configure_logging(json=True, stream=stream, stdlib=False)
    LifecycleLogger().handle([Batch(0, events)])
    return lines_of(stream)


class TestLifecycleLogger:
    def test_one_json_line_per_lifecycle_event(
        self, events: list[Event], stream: io.StringIO
    ) -> None:
        """Queued, started, each stage end, each expert switch and each terminal: one line each."""
        names = {"JobQueued": "job.queued", "JobStarted": "job.started",
                 "StageEnded": "stage.ended", "ExpertSwitched": "expert.switched",
                 "JobCompleted": "job.completed", "JobFailed": "job.failed",
                 "JobCancelled": "job.cancelled"}
        expected = [(names[type(e).__name__], e.job, e.seq) for e in events
                    if isinstance(e, LIFECYCLE)]
        assert expected == [(line["event"], line["job"], line["seq"])
                            for line in logged(events, stream)]

    def test_trace_and_span_ids_name_the_exported_span(
        self, events: list[Event], stream: io.StringIO
    ) -> None:
        """Each line's span is the job's root, queue, stage or denoise span, ending at its ts."""
        spans = {}
        for job in {e.job for e in events if isinstance(e, LIFECYCLE)}:
            for span in spans_for_job([e for e in events if e.job == job]):
                spans[format(span.context.span_id, "016x")] = span
        expected_span = {"job.queued": "queue.wait", "expert.switched": "stage.denoise"}
        for line in logged(events, stream):
            span = spans[line["span_id"]]
            assert format(span.context.trace_id, "032x") == line["trace_id"]
            name = expected_span.get(line["event"]) or (
                f"stage.{line['stage']}" if line["event"] == "stage.ended" else "video.generate")
            assert name == span.name
            if line["event"] == "stage.ended":
                assert line["ts_ns"] == span.end_time

    def test_a_queued_traceparent_joins_the_callers_trace(
        self, events: list[Event], stream: io.StringIO
    ) -> None:
        """The queued job's lines all carry the caller's trace id."""
        job = events[0].job
        assert {"4bf92f3577b34da6a3ce929d0e0e4736"} == {
            line["trace_id"] for line in logged(events, stream) if line["job"] == job}

    def test_levels_durations_and_errors(self, events: list[Event], stream: io.StringIO) -> None:
        """Failures are errors with their type, cancellations warnings; stages carry durations."""
        lines = logged(events, stream)
        failed = next(line for line in lines if line["event"] == "job.failed")
        assert ("error", "OutOfMemoryError", True, "denoise") == (
            failed["level"], failed["error_type"], failed["oom"], failed["stage"])
        cancelled = next(line for line in lines if line["event"] == "job.cancelled")
        assert ("warning", "user") == (cancelled["level"], cancelled["reason"])
        stage_events = [e for e in events if isinstance(e, StageEnded)]
        assert [e.duration_s for e in stage_events] == [
            line["duration_s"] for line in lines if line["event"] == "stage.ended"]
        started = next(line for line in lines if line["event"] == "job.started")
        assert 2.0 == started["queue_wait_s"]
        assert started["timestamp"].endswith("Z")

    def test_nothing_after_a_jobs_terminal_line(
        self, events: list[Event], stream: io.StringIO
    ) -> None:
        """A job's lines end with its terminal line: its events read again add nothing."""
        configure_logging(json=True, stream=stream, stdlib=False)
        logger = LifecycleLogger()
        first = logger.handle([Batch(0, events)])
        assert 0 == logger.handle([Batch(0, events)])
        assert first == len(lines_of(stream))

    def test_it_never_raises(self, events: list[Event]) -> None:
        """A logger that raises, or an iterable that breaks, is counted, not propagated."""

        class Broken:
            def __getattr__(self, name: str) -> Any:
                raise OSError("disk full")

        def items() -> Iterator[Batch]:
            yield Batch(0, events[:5])
            raise RuntimeError("log vanished")

        logger = LifecycleLogger(Broken())
        assert 0 == logger.handle(items())
        lifecycle = len([e for e in events[:5] if isinstance(e, LIFECYCLE)])
        assert lifecycle + 1 == logger.errors


class TestConfigureLogging:
    def test_json_unless_a_terminal(self, stream: io.StringIO) -> None:
        """Not a TTY: JSON lines; a TTY: the console renderer (not JSON)."""
        import structlog

        configure_logging(stream=stream, stdlib=False)
        structlog.get_logger().info("hello", answer=42)
        (line,) = lines_of(stream)
        assert ("hello", 42, "info") == (line["event"], line["answer"], line["level"])

        class Tty(io.StringIO):
            def isatty(self) -> bool:
                return True

        tty = Tty()
        configure_logging(stream=tty, stdlib=False)
        structlog.get_logger().info("hello", answer=42)
        with pytest.raises(json.JSONDecodeError):
            json.loads(tty.getvalue())
        assert "hello" in tty.getvalue()

    def test_stdlib_records_become_json_lines(self, stream: io.StringIO) -> None:
        """The OpenTelemetry SDK logs through stdlib logging: those lines are JSON too."""
        configure_logging(json=True, stream=stream)
        configure_logging(json=True, stream=stream)  # twice: one handler, not two
        logging.getLogger("opentelemetry.exporter").warning("export failed: %s", "refused")
        (line,) = lines_of(stream)
        assert ("export failed: refused", "warning", "opentelemetry.exporter") == (
            line["event"], line["level"], line["logger"])

    def test_lines_are_json_whatever_the_values(self, stream: io.StringIO) -> None:
        """NaN and infinity become null (``NaN`` is not JSON: a log pipeline would drop the
        line), and a value JSON has no type for is written as its ``str``."""
        import structlog

        configure_logging(json=True, stream=stream, stdlib=False)
        structlog.get_logger().info("odd", ratio=float("nan"), big=float("inf"),
                                    where=Path("/tmp/x"))
        (line,) = lines_of(stream)
        assert (None, None, "/tmp/x") == (line["ratio"], line["big"], line["where"])

    def test_an_unknown_level_fails_early(self) -> None:
        """A typo in the level is a ValueError naming the choices."""
        with pytest.raises(ValueError, match="debug, info"):
            configure_logging(level="verbose")


class TestAsARunnersSink:
    """``wantel serve`` attaches the logger to its runner, which de-duplicates and follows."""

    def test_live_lines_once_each_and_the_catch_up_only_tracked(
        self, events: list[Event], stream: io.StringIO, tmp_path: Path
    ) -> None:
        """What was stored before the runner started writes no line, but what it said (a
        queued traceparent) is kept; what follows is written once per lifecycle event, a
        redelivery (same job and seq) adds nothing."""
        configure_logging(json=True, stream=stream, stdlib=False)
        job = events[1:]  # the recorded jobs, failed-1 and cancelled-1, seq from 0
        queued = JobQueued(job="late-1", seq=0, ts=job[0].ts, model="tiny-t2v", task="t2v",
                           traceparent=CALLER)
        late = [JobStarted(**{**_fields(job[0]), "job": "late-1", "seq": 1,
                              "traceparent": None}),
                JobCancelled(job="late-1", seq=2, ts=job[0].ts + 1, duration_s=0.0,
                             reason="user")]
        log = LocalLog(tmp_path / "log")
        log.append([queued])
        runner = ProjectionRunner(log, ProjectionEngine([]), sinks=[LifecycleLogger()],
                                  poll_interval=0.005)
        runner.start()
        try:
            assert runner.caught_up.wait(10)
            log.append(job)
            log.append(job[:20])  # redelivered
            log.append(late)
            expected = [(type(e).__name__, e.job, e.seq) for e in job + late
                        if isinstance(e, LIFECYCLE)]
            wait_for(lambda: len(lines_of(stream)) >= len(expected), "every line")
        finally:
            runner.stop()
            log.close()
        lines = lines_of(stream)
        names = {"job.queued": "JobQueued", "job.started": "JobStarted",
                 "stage.ended": "StageEnded", "expert.switched": "ExpertSwitched",
                 "job.completed": "JobCompleted", "job.failed": "JobFailed",
                 "job.cancelled": "JobCancelled"}
        assert expected == [(names[line["event"]], line["job"], line["seq"]) for line in lines]
        assert {"4bf92f3577b34da6a3ce929d0e0e4736"} == {
            line["trace_id"] for line in lines if line["job"] == "late-1"}
