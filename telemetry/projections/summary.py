"""One job as every view shows it: the read model behind ``/api/jobs``, ``wantel replay`` and
``wantel run``.

What is known of a job is spread over the projections: status, stages and steps in ``jobs``,
its ETA in ``eta``, its memory peaks in ``memory``, its smoothed rate in ``throughput``.
:func:`job_summary` gathers them in one place, with one definition of each figure, and each view
formats the same :class:`JobSummary` (the server's JSON, replay's JSON and table, ``run``'s last
line and JSON). It is a read of the states, not a projection: it keeps nothing.

Steps per second has three readings, each named here once:

* :attr:`JobSummary.mean_steps_per_second`: steps done over the device time they took (the
  jobs projection's), what replay and ``run`` print as ``steps_per_second``;
* :attr:`JobSummary.smoothed_steps_per_second`: the exponential moving average of a running
  job's steps (the throughput projection's; ``None`` once the job ended), replay's
  ``steps_per_second_smoothed``;
* :attr:`JobSummary.steps_per_second`: what a live view shows, the smoothed rate while the job
  runs and the mean after, the server's ``steps_per_second``.

For a job that has ended, the three views therefore print the same figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from telemetry.projections.eta import EtaPoint, EtaState, FinishedEta
from telemetry.projections.jobs import JobsState, JobView
from telemetry.projections.memory import MemoryState
from telemetry.projections.throughput import ThroughputState

#: The peak that matters on a job's device, in order: the allocator's on a GPU, the process's
#: RSS on a CPU.
PEAK_KINDS = ("torch_allocated", "host_rss")


@dataclass(frozen=True, slots=True)
class JobSummary:
    """What every projection knows of one job, read at one position."""

    view: JobView
    #: The latest ETA issued while the job runs (``None`` before the first and once it ended).
    latest_eta: EtaPoint | None
    #: Every ETA issued so far while running; once ended, the first of each progress bucket.
    eta_history: list[EtaPoint]
    #: The ETA's scores once the job ended (residuals by bucket, the error before it started).
    finished_eta: FinishedEta | None
    #: Peak bytes by kind (``torch_allocated``, ``host_rss``, …); empty before a sample.
    peaks: dict[str, int]
    #: EMA of a running job's step rate; ``None`` before a measured step and once it ended.
    smoothed_steps_per_second: float | None

    @property
    def job(self) -> str:
        """The job's id."""
        return self.view.job

    @property
    def mean_steps_per_second(self) -> float | None:
        """Steps done over the device time they took; ``None`` before a measured step."""
        return self.view.steps_per_second

    @property
    def steps_per_second(self) -> float | None:
        """The rate a live view shows: smoothed while running (once measured), else the mean."""
        return self.smoothed_steps_per_second or self.mean_steps_per_second

    @property
    def progress(self) -> float | None:
        """1 once completed; while running, the ETA model's progress (weighted by each
        stage's expected cost, not a bare step count); else steps done over steps."""
        view = self.view
        if view.status == "completed":
            return 1.0
        if self.latest_eta is not None:
            return self.latest_eta.progress
        if view.total_steps:
            return view.steps_done / view.total_steps
        return None

    @property
    def peak_memory_bytes(self) -> int | None:
        """The peak that matters on the job's device (see :data:`PEAK_KINDS`), else the jobs
        projection's own reading."""
        for kind in PEAK_KINDS:
            if kind in self.peaks:
                return self.peaks[kind]
        return self.view.peak_memory_bytes

    @property
    def stage_durations(self) -> dict[str, float]:
        """Seconds per finished stage, summed if a stage ran more than once."""
        return self.view.stage_durations()


def job_summary(states: dict[str, Any], job: str | JobView) -> JobSummary | None:
    """``job`` (an id, or a view already taken out of the jobs state) as the projections in
    ``states`` know it; ``None`` for an id the jobs projection does not hold."""
    if isinstance(job, str):
        jobs: JobsState = states["jobs"]
        found = jobs.jobs.get(job)
        if found is None:
            return None
        view = found
    else:
        view = job
    eta: EtaState = states["eta"]
    memory: MemoryState = states["memory"]
    throughput: ThroughputState = states["throughput"]
    running = eta.running.get(view.job)
    finished = eta.finished.get(view.job)
    issued = running.issued if running is not None else []
    if issued:
        history = issued
    elif finished is not None:
        history = finished.history
    else:
        history = []
    job_memory = memory.running.get(view.job) or memory.finished.get(view.job)
    rate = throughput.jobs.get(view.job)
    return JobSummary(
        view=view,
        latest_eta=issued[-1] if issued else None,
        eta_history=history,
        finished_eta=finished,
        peaks=dict(job_memory.peaks) if job_memory is not None else {},
        smoothed_steps_per_second=rate.ema if rate is not None else None,
    )


__all__ = ["PEAK_KINDS", "JobSummary", "job_summary"]
