"""The event-reading rules (``telemetry.projections.readings``), and their callers agreeing."""

from __future__ import annotations

import math

import pytest

from telemetry.events import (
    DeviceInfo,
    Event,
    JobQueued,
    JobStarted,
    MemorySampled,
    StageEnded,
)
from telemetry.projections.jobs import JobsProjection
from telemetry.projections.memory import MemoryProjection
from telemetry.projections.metrics import MetricsProjection
from telemetry.projections.readings import (
    MEMORY_KINDS,
    device_label,
    highest,
    memory_readings,
    queue_wait_s,
    stage_role,
    stage_start,
)

SECOND = 1_000_000_000
GIB = 2**30


def sample(**readings: int | None) -> MemorySampled:
    """A memory sample of job ``a`` with ``readings``."""
    return MemorySampled(job="a", seq=1, ts=2, device="cuda:0", **readings)


class TestMemoryReadings:
    def test_the_kinds_are_listed_in_their_order(self) -> None:
        """Readings come in :data:`MEMORY_KINDS` order."""
        assert ("torch_allocated", "torch_reserved", "device", "host_rss") == MEMORY_KINDS
        assert (1, 2, 3, 4) == memory_readings(sample(
            allocated_bytes=1, reserved_bytes=2, device_used_bytes=3, host_rss_bytes=4))

    def test_the_allocators_peaks_come_before_its_current_values(self) -> None:
        """A reported high-water mark is the reading; without one (or at 0), the current
        value is."""
        assert (5, 6) == memory_readings(sample(allocated_bytes=1, peak_allocated_bytes=5,
                                                reserved_bytes=2, peak_reserved_bytes=6))[:2]
        assert (1, 2) == memory_readings(sample(allocated_bytes=1, peak_allocated_bytes=0,
                                                reserved_bytes=2))[:2]

    @pytest.mark.parametrize(("current", "peak", "reading"), [
        (None, None, None), (None, 5, 5), (None, 0, None), (None, -3, None), (0, 4, 4),
        (7, None, 7), (7, 9, 9), (9, 7, 9), (-2, None, None), (-2, -5, -2)])
    def test_host_rss_is_the_larger_of_current_and_peak(
        self, current: int | None, peak: int | None, reading: int | None
    ) -> None:
        """Host RSS is max(current, peak), each 0 when missing; 0 is no reading."""
        assert reading == memory_readings(sample(host_rss_bytes=current,
                                                 host_peak_rss_bytes=peak))[3]

    def test_the_highest_reading_is_a_stages_peak(self) -> None:
        """The largest reading of any kind; ``None`` for a sample without one."""
        assert 9 == highest((3, None, 9, 4))
        assert 0 == highest((None, 0, None, None))
        assert highest((None, None, None, None)) is None


class TestStagesQueuesDevices:
    def test_a_lost_stage_start_is_its_end_less_its_duration(self) -> None:
        """Nanoseconds, from the measured duration."""
        ended = StageEnded(job="a", seq=3, ts=10 * SECOND, stage="decode", duration_s=2.5)
        assert 7_500_000_000 == stage_start(ended)

    @pytest.mark.parametrize("duration", [math.inf, math.nan])
    def test_a_duration_that_is_no_time_has_no_start(self, duration: float) -> None:
        """An infinite or NaN duration raises: there is no start to reconstruct."""
        ended = StageEnded(job="a", seq=3, ts=10 * SECOND, stage="decode", duration_s=duration)
        with pytest.raises((OverflowError, ValueError)):
            stage_start(ended)

    def test_queue_wait_is_never_negative(self) -> None:
        """Seconds between queueing and start; 0 where another process's clock ran ahead."""
        assert 1.5 == queue_wait_s(SECOND, int(2.5 * SECOND))
        assert 0.0 == queue_wait_s(3 * SECOND, 2 * SECOND)

    def test_a_device_is_named_by_kind_and_index(self) -> None:
        """``cuda:1`` for an indexed device, its kind alone otherwise."""
        assert "cuda:1" == device_label(DeviceInfo(kind="cuda", name="H100", index=1))
        assert "cpu" == device_label(DeviceInfo(kind="cpu", name="cpu"))

    def test_a_stage_occurrence_has_a_role(self) -> None:
        """The role names the stage and which occurrence of it."""
        assert "stage:denoise:1" == stage_role("denoise", 1)


class TestCallersAgree:
    def test_every_fold_keeps_the_same_host_rss_peak(self) -> None:
        """The jobs, memory and metrics projections agree on a CPU job's RSS peak."""
        events: list[Event] = [
            JobQueued(job="a", seq=0, ts=0, model="m", task="t2v"),
            JobStarted(job="a", seq=1, ts=SECOND, model="m", family="wan2.1", variant="m",
                       task="t2v", width=32, height=32, num_frames=5, steps=2,
                       guidance_scale=5.0, cfg=True, device=DeviceInfo(kind="cpu", name="cpu")),
            MemorySampled(job="a", seq=2, ts=2 * SECOND, device="cpu", host_rss_bytes=GIB,
                          host_peak_rss_bytes=GIB + 1),
            MemorySampled(job="a", seq=3, ts=3 * SECOND, device="cpu",
                          host_peak_rss_bytes=3 * GIB),
        ]
        jobs, memory, metrics = JobsProjection(), MemoryProjection(), MetricsProjection()
        states = [jobs.initial(), memory.initial(), metrics.initial()]
        for event in events:
            states = [fold.apply(state, event)
                      for fold, state in zip((jobs, memory, metrics), states, strict=True)]
        assert 3 * GIB == states[0].jobs["a"].peak_rss_bytes
        assert 3 * GIB == states[1].running["a"].peaks["host_rss"]
        assert 3 * GIB == states[2].tracked["a"].peaks["host_rss"]
