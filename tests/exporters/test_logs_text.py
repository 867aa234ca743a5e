"""The lifecycle lines' exact text, JSON and console, pinned: the sink's fast paths (the
logger bound once, timestamps formatted without ``datetime``, span ids kept per job) write
what the straightforward code wrote, key for key and character for character."""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import pytest

from exporters.logs import _FAST_UNTIL, LifecycleLogger, _iso
from telemetry.engine import ProjectionEngine
from telemetry.events import (
    DeviceInfo,
    Event,
    ExpertSwitched,
    JobCancelled,
    JobCompleted,
    JobFailed,
    JobQueued,
    JobStarted,
    StageEnded,
    StageStarted,
)
from telemetry.log.base import Batch
from telemetry.runner import Applied
from tests.exporters.test_logs_writer import Recording
from wantel.logs import configure_logging

T: Final = 1_800_000_000_000_000_000
CALLER: Final = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
H100: Final = DeviceInfo(kind="cuda", name="NVIDIA H100", index=0)

#: Times at the timestamp's edges: a microsecond rounded up into the next second
#: (``…9_999_999_500``) and into the next day (``…86_399_999_999_999``), a half
#: microsecond, the epoch's first second; a job with no opening event (gold-4), jobs without
#: a worker, a failure's list value; a queued job whose start carries no traceparent (gold-5),
#: one whose stage ended before its start arrived with a caller's traceparent (gold-6).
EVENTS: Final[list[Event]] = [
    JobQueued(job="gold-1", seq=0, ts=T, worker="api", model="wan2.2-t2v-a14b", task="t2v",
              traceparent=CALLER),
    JobStarted(job="gold-1", seq=1, ts=T + 2_500_000_000, worker="w0",
               model="wan2.2-t2v-a14b", family="wan2.2", variant="t2v-a14b", task="t2v",
               width=1280, height=720, num_frames=81, steps=40, guidance_scale=5.0, cfg=True,
               device=H100),
    StageStarted(job="gold-1", seq=2, ts=T + 2_600_000_000, worker="w0", stage="denoise"),
    ExpertSwitched(job="gold-1", seq=3, ts=T + 9_999_999_500, worker="w0", step=20,
                   from_expert="high_noise", to_expert="low_noise"),
    StageEnded(job="gold-1", seq=4, ts=T + 86_399_999_999_999, worker="w0", stage="denoise",
               duration_s=1.25),
    StageEnded(job="gold-1", seq=5, ts=T + 86_400_000_000_501, worker="w0", stage="decode",
               duration_s=0.5, ok=False),
    JobCompleted(job="gold-1", seq=6, ts=T + 86_400_100_000_000, worker="w0",
                 duration_s=86397.6, frames=81, bytes=123456),
    JobStarted(job="gold-2", seq=0, ts=1_234_567_890_123_456_789, model="tiny-t2v",
               family="wan2.1", variant="tiny-t2v", task="t2v", width=64, height=64,
               num_frames=17, steps=4, guidance_scale=5.0, cfg=True,
               device=DeviceInfo(kind="cpu", name="cpu")),
    JobFailed(job="gold-2", seq=1, ts=1_234_567_890_999_999_999, duration_s=0.9,
              stage="denoise", step=1, error_type="OutOfMemoryError",
              message="CUDA out of memory", oom=True, category="oom",
              suggestions=("fewer frames",)),
    JobQueued(job="gold-3", seq=0, ts=5, model="tiny-t2v", task="t2v"),
    JobCancelled(job="gold-3", seq=1, ts=999_999_999_999, duration_s=0.0, reason="user"),
    StageEnded(job="gold-4", seq=7, ts=T, stage="save", duration_s=0.1),
    JobQueued(job="gold-5", seq=0, ts=T + 7, model="tiny-t2v", task="t2v"),
    JobStarted(job="gold-5", seq=1, ts=T + 9, model="tiny-t2v", family="wan2.1",
               variant="tiny-t2v", task="t2v", width=64, height=64, num_frames=17, steps=4,
               guidance_scale=5.0, cfg=True, device=DeviceInfo(kind="cpu", name="cpu")),
    JobCompleted(job="gold-5", seq=2, ts=T + 11, duration_s=0.0, frames=17, bytes=1),
    StageEnded(job="gold-6", seq=3, ts=T + 20, stage="decode", duration_s=0.1),
    JobStarted(job="gold-6", seq=0, ts=T + 13, model="tiny-t2v", family="wan2.1",
               variant="tiny-t2v", task="t2v", width=64, height=64, num_frames=17, steps=4,
               guidance_scale=5.0, cfg=True, device=DeviceInfo(kind="cpu", name="cpu"),
               traceparent=CALLER),
    StageEnded(job="gold-6", seq=4, ts=T + 21, stage="decode", duration_s=0.1),
    JobCompleted(job="gold-6", seq=5, ts=T + 22, duration_s=0.0, frames=17, bytes=1),
]

GOLDEN: Final = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(name="stream")
def _stream() -> Iterator[io.StringIO]:
    """A non-TTY stream; the root logger's level is put back afterwards."""
    level = logging.getLogger().level
    yield io.StringIO()
    logging.getLogger().setLevel(level)


class TestLineText:
    def test_json_lines(self, stream: io.StringIO) -> None:
        """Every JSON line is the text the sink wrote before its fast paths."""
        configure_logging(json=True, stream=stream, stdlib=False)
        LifecycleLogger().handle([Batch(0, EVENTS)])
        assert (GOLDEN / "lifecycle-lines.jsonl").read_text() == stream.getvalue()

    def test_console_lines(self, stream: io.StringIO) -> None:
        """So is every console line (a terminal's rendering, without colours)."""
        configure_logging(json=False, stream=stream, stdlib=False)
        LifecycleLogger().handle([Batch(0, EVENTS)])
        assert (GOLDEN / "lifecycle-lines.console.txt").read_text() == stream.getvalue()

    def test_a_runner_step_writes_them_at_once(self) -> None:
        """As a runner's sink (``wantel serve``), a step's lines are the same text, written
        in one write and one flush."""
        stream = Recording()
        configure_logging(json=True, stream=stream, stdlib=False)
        engine = ProjectionEngine([])
        LifecycleLogger().on_applied(Applied(EVENTS, len(EVENTS), live=True, engine=engine))
        assert [(GOLDEN / "lifecycle-lines.jsonl").read_text()] == stream.writes
        assert 1 == stream.flushes

    def test_levels_the_logger_drops_are_not_built(self, stream: io.StringIO) -> None:
        """At ``warning`` only the warning and error lines are written, the same text; the
        jobs are still tracked, so those lines' ids are what they were."""
        configure_logging(json=True, level="warning", stream=stream, stdlib=False)
        sink = LifecycleLogger()
        sink.handle([Batch(0, EVENTS)])
        expected = [line for line in (GOLDEN / "lifecycle-lines.jsonl").read_text().splitlines()
                    if '"level":"info"' not in line]
        assert 3 == len(expected)
        assert expected == stream.getvalue().splitlines()
        assert (3, 0) == (sink.lines, sink.errors)


def _reference(ts_ns: int) -> str:
    """What the lines' ``timestamp`` was: ``datetime`` formatting the float seconds."""
    moment = datetime.fromtimestamp(ts_ns / 1e9, UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


class TestIso:
    def test_the_same_as_datetime(self) -> None:
        """Random times up to the end of year 9998, and the edges of rounding to a
        microsecond (half a microsecond either way, into the next second, minute, day and
        year), format as ``datetime`` formats them."""
        rng = random.Random(14)
        limit = int(_FAST_UNTIL) * 10**9
        times = [rng.randrange(limit) for _ in range(50_000)]
        times += [rng.randrange(10**18, 2 * 10**18) for _ in range(50_000)]  # our decades
        for second in (0, 59, 3599, 86_399, 1_800_000_000 - 1, 1_830_297_599,  # a year's end
                       int(_FAST_UNTIL) - 1, *(rng.randrange(int(_FAST_UNTIL))
                                                 for _ in range(2_000))):
            for nanos in (0, 1, 499, 500, 501, 999_499, 999_500, 999_501, 123_456_500,
                          999_999_000, 999_999_499, 999_999_500, 999_999_501, 999_999_999):
                times.append(second * 10**9 + nanos)
        mismatched = [t for t in times if _iso(t) != _reference(t)]
        assert [] == mismatched

    def test_beyond_its_range_datetime_decides(self) -> None:
        """Before the epoch and from year 9999 on, the text (or the error) is ``datetime``'s."""
        for ts in (-1, -1_500, -10**18, int(_FAST_UNTIL) * 10**9,
                   int(_FAST_UNTIL) * 10**9 + 999_999_999, 253_402_300_799 * 10**9 + 999_999_600,
                   2**63 - 1):
            try:
                expected = _reference(ts)
            except Exception as exc:  # datetime refuses it: so must _iso, the same way
                with pytest.raises(type(exc)):
                    _iso(ts)
            else:
                assert expected == _iso(ts)
