"""The Compare dashboard's series (``wantel_compare_*``) hold ``wantel compare``'s figures.

The recorded corpus (64 real tiny CPU jobs) plus two failures is folded by the real
projections and rendered by the real collector; every group's figures are checked against
the same jobs as ``wantel compare --json`` reports them and as the events themselves say.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from telemetry.eta.jobs import job_records
from telemetry.eta.shape import device_class
from telemetry.events import DeviceInfo, Event, JobFailed, JobStarted, MemorySampled
from telemetry.log.base import Batch
from telemetry.log.local import LocalLog
from telemetry.projections.compare import stable_worker
from tests.exporters.test_prometheus import registry_of, runner_over, samples
from wantel.cli import main

CORPUS = Path(__file__).parents[1] / "fixtures" / "eta-corpus"


def _failures(ts: int) -> list[Event]:
    """Two failed jobs on one host's two processes: an OOM and a bad input."""
    events: list[Event] = []
    for job, worker, category in (("f1", "gpu-1:100:5", "oom_host"),
                                  ("f2", "gpu-1:200:9", "invalid_input")):
        events += [
            JobStarted(job=job, seq=0, ts=ts, worker=worker, model="tiny-cogvideox",
                       family="cogvideox", variant="tiny-cogvideox", task="t2v", width=32,
                       height=32, num_frames=9, steps=4, guidance_scale=5.0, cfg=True,
                       device=DeviceInfo(kind="cpu", name="cpu")),
            MemorySampled(job=job, seq=1, ts=ts + 1, worker=worker, device="cpu",
                          host_rss_bytes=600 << 20),
            JobFailed(job=job, seq=2, ts=ts + 10**9, worker=worker, stage="denoise",
                      error_type="MemoryError", message="x", category=category,
                      duration_s=1.0),
        ]
        ts += 2 * 10**9
    return events


@pytest.fixture(name="history", scope="module")
def _history(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Event]]:
    log_dir = tmp_path_factory.mktemp("compare") / "log"
    shutil.copytree(CORPUS, log_dir)
    log = LocalLog(log_dir, create=False)
    events = [e for item in log.read() if isinstance(item, Batch) for e in item.events]
    extra = _failures(max(e.ts for e in events) + 10**9)
    log.append(extra)
    log.close()
    return log_dir, events + extra


def test_worker_names_are_stable() -> None:
    """A default ``host:pid:start`` worker is its host; a chosen name is itself."""
    assert ("gpu-1", "gpu-1", "worker-a", "a:b", "unknown") == (
        stable_worker("gpu-1:100:5"), stable_worker("gpu-1:200:9"), stable_worker("worker-a"),
        stable_worker("a:b"), stable_worker(None))


@pytest.mark.parametrize("by", ["model", "variant", "worker", "device"])
def test_series_hold_what_wantel_compare_reports(
        by: str, history: tuple[Path, list[Event]], capsys: pytest.CaptureFixture[str]) -> None:
    """Per group: ended jobs and failure categories as ``wantel compare`` counts them; the
    duration histogram's count and sum, frames, measured steps and their seconds, and the
    scored before-start ETA errors as the events say."""
    log_dir, events = history
    assert 0 == main(["compare", "--log", str(log_dir), "--by", by, "--json"])
    rows = {row[by]: row for row in json.loads(capsys.readouterr().out)}
    got = samples(registry_of(runner_over(events)))

    def total(name: str, group: str, **labels: str) -> float:
        return sum(value for key, value in got.items() if key[0] == name
                   and f"{by}={group}" in key[1:]
                   and all(f"{k}={v}" in key[1:] for k, v in labels.items()))

    records = job_records(events)
    for name, row in rows.items():
        # The CLI groups by the full worker name; the series by its stable name.
        group = stable_worker(name) if by == "worker" else name
        mine = [r for r in records if {
            "model": r.started.model, "variant": r.started.variant,
            "worker": stable_worker(r.started.worker),
            "device": device_class(r.started.device.kind, r.started.device.name),
        }[by] == group]
        completed = [r for r in mine if r.completed]
        assert total("wantel_compare_jobs_total", group) >= row["jobs"]
        assert len(mine) == total("wantel_compare_jobs_total", group)
        assert len(completed) == total("wantel_compare_jobs_total", group, status="completed")
        for category, count in row["failures"].items():
            assert count <= total("wantel_compare_failures_total", group, category=category)
        assert len(completed) == total("wantel_compare_job_duration_seconds_count", group)
        assert sum(r.duration_s for r in completed) == pytest.approx(
            total("wantel_compare_job_duration_seconds_sum", group))
        assert sum(r.started.num_frames for r in completed) == total(
            "wantel_compare_frames_total", group)
        assert sum(len(r.step_durations) for r in completed) == total(
            "wantel_compare_denoise_steps_total", group)
        assert sum(sum(r.step_durations) for r in completed) == pytest.approx(
            total("wantel_compare_denoise_step_seconds_total", group))
        scored = total("wantel_compare_eta_absolute_error_ratio_count", group)
        assert 0 < scored <= len(completed) or not completed
    assert 66 == sum(v for k, v in got.items() if k[0] == "wantel_compare_jobs_total")


def test_failures_count_by_category_and_peaks_by_their_kind(
        history: tuple[Path, list[Event]]) -> None:
    """The two failed jobs count under their host, in their categories, from 0 in the
    others; their CPU peaks are host RSS; every failure rate has a 0 where nothing failed."""
    _, events = history
    got = samples(registry_of(runner_over(events)))
    group = {"device=cpu", "model=tiny-cogvideox", "variant=tiny-cogvideox", "worker=gpu-1"}

    def series(name: str) -> dict[frozenset[str], float]:
        return {frozenset(key[1:]) - group: value for key, value in got.items()
                if key[0] == name and group <= set(key[1:])}

    failures = series("wantel_compare_failures_total")
    assert {frozenset({"category=oom_host"}): 1.0,
            frozenset({"category=invalid_input"}): 1.0} == {k: v for k, v in failures.items()
                                                           if v}
    assert 8 == len(failures)  # every category, from 0
    assert {frozenset({"status=failed"}): 2.0, frozenset({"status=completed"}): 0.0,
            frozenset({"status=cancelled"}): 0.0} == series("wantel_compare_jobs_total")
    assert {frozenset({"kind=host_rss"}): 2.0} == series(
        "wantel_compare_job_peak_memory_bytes_count")
