"""The Prometheus collector: every metric of the design, rendered from projection state."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Info, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from exporters.prometheus import (
    Encoder,
    Exposition,
    WantelCollector,
    build_info,
    make_registry,
    render,
)
from telemetry.engine import CheckpointStore, ProjectionEngine, ProjectionRunner
from telemetry.events import (
    DeviceInfo,
    Event,
    EventsDropped,
    GpuSampled,
    JobCompleted,
    JobFailed,
    JobQueued,
    JobStarted,
    MemorySampled,
    StageEnded,
    StageProgress,
    StageStarted,
    StepEnded,
    WorkerHeartbeat,
)
from telemetry.log.local import LocalLog
from telemetry.log.memory import MemoryLog
from telemetry.projections import default_projections
from telemetry.projections.eta import Histogram
from telemetry.tracing import trace_id_for

SECOND = 1_000_000_000
GIB = 2**30
T0 = 1_700_000_000  # event times are seconds after this
OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
#: A GPU as NVML names it, and the labels its series carry to join DCGM exporter's.
UUID = "GPU-5fb4f1f2-0d5e-a1c4-1e3b-0123456789ab"
DCGM = ("Hostname=h", f"UUID={UUID}", "device=cuda:0", "gpu=2")

#: Every metric of DESIGN.md's table (family names as OpenMetrics reports them).
DESIGN_METRICS = {
    "wantel_jobs", "wantel_jobs_running", "wantel_job_duration_seconds",
    "wantel_queue_wait_seconds", "wantel_stage_duration_seconds", "wantel_denoise_steps",
    "wantel_denoise_step_duration_seconds", "wantel_steps_per_second",
    "wantel_job_progress_ratio", "wantel_job_eta_seconds", "wantel_eta_relative_error",
    "wantel_job_peak_memory_bytes", "wantel_device_memory_used_bytes",
    "wantel_device_memory_total_bytes", "wantel_gpu_utilization_ratio",
    "wantel_gpu_temperature_celsius", "wantel_gpu_power_watts", "wantel_gpu_throttle_events",
    "wantel_frames", "wantel_video_seconds", "wantel_events",
    "wantel_events_dropped", "wantel_log_quarantined", "wantel_projection_lag_seconds",
    "wantel_workers_alive", "wantel_build_info",
}


class Stream:
    """Events of one stream with consecutive seqs, at ``T0 + t`` seconds."""

    def __init__(self, job: str, model: str = "tiny-t2v") -> None:
        self.job, self.model = job, model
        self.seq = itertools.count()

    def kw(self, t: float) -> dict[str, Any]:
        """The common fields of the next event at ``t``."""
        return {"job": self.job, "seq": next(self.seq), "ts": int((T0 + t) * SECOND),
                "worker": "w1"}

    def started(self, t: float, steps: int = 4, traceparent: str | None = None) -> JobStarted:
        """JobStarted of a tiny CPU job."""
        return JobStarted(**self.kw(t), model=self.model, family="wan2.2", variant=self.model,
                          task="t2v", width=32, height=32, num_frames=5, steps=steps,
                          guidance_scale=5.0, cfg=True, device=DeviceInfo(kind="cuda", name="x"),
                          traceparent=traceparent)

    def steps(self, t: float, n: int, total: int = 4, expert: str | None = None) -> list[Event]:
        """``n`` steps of 0.25 s from ``t``, inside a denoise stage start."""
        events: list[Event] = [StageStarted(**self.kw(t), stage="denoise")]
        events += [StepEnded(**self.kw(t + (i + 1) / 4), step=i, total_steps=total,
                             duration_s=0.25, expert=expert) for i in range(n)]
        return events

    def completed(self, t: float, duration: float) -> list[Event]:
        """The denoise stage's end, then JobCompleted."""
        return [StageEnded(**self.kw(t), stage="denoise", duration_s=1.0),
                JobCompleted(**self.kw(t), duration_s=duration)]


def a_full_history() -> list[Event]:
    """A queued job that ran and completed on a GPU, another running, drops and a heartbeat."""
    a, b, w = Stream("a", "tiny-t2v-a14b"), Stream("b"), Stream("worker/w1")
    events: list[Event] = [
        JobQueued(**a.kw(0), model="tiny-t2v-a14b", task="t2v", traceparent=TRACEPARENT),
        a.started(2),
        MemorySampled(**a.kw(2.1), device="cuda:0", allocated_bytes=GIB, reserved_bytes=2 * GIB,
                      device_used_bytes=3 * GIB, device_total_bytes=80 * GIB),
        *a.steps(2.2, 4, expert="high_noise"),
        GpuSampled(**w.kw(3), device="cuda:0", gpu=2, uuid=UUID, utilization_ratio=0.9,
                   temperature_celsius=70, power_watts=250.5, throttle_reasons=("sw_power_cap",)),
        *a.completed(4, 2.0),
        b.started(5),
        *b.steps(5.1, 2),
        WorkerHeartbeat(**w.kw(6), host="h", pid=1),
        EventsDropped(**w.kw(6.1), counts={"queue_full": 3}),
    ]
    return events


def runner_over(events: list[Event]) -> ProjectionRunner:
    """A runner that has applied ``events``."""
    log = MemoryLog()
    log.append(events)
    runner = ProjectionRunner(log, ProjectionEngine(default_projections()))
    runner.catch_up()
    return runner


def registry_of(runner: ProjectionRunner, **options: Any) -> CollectorRegistry:
    """A registry whose clock is fixed at ``T0 + 10`` s (the lag gauge becomes exact)."""
    return make_registry(runner, clock=lambda: T0 + 10.0, **options)


def samples(registry: CollectorRegistry, accept: str | None = None) -> dict[tuple[str, ...], float]:
    """Every sample as ``(name, *sorted label items)`` → value, parsed back from the body."""
    body, _ = render(registry, accept)
    parse = parse_openmetrics if accept else parse_text
    return {
        (s.name, *(f"{k}={v}" for k, v in sorted(s.labels.items()))): s.value
        for family in parse(body.decode())
        for s in family.samples
    }


def families(registry: CollectorRegistry) -> set[str]:
    """Names of the families that have samples, as OpenMetrics reports them."""
    body, _ = render(registry, OPENMETRICS)
    return {f.name for f in parse_openmetrics(body.decode()) if f.samples}


def counters(registry: CollectorRegistry) -> dict[tuple[str, ...], float]:
    """The samples derived from the log alone: counters and histograms, no clock or gauges."""
    return {k: v for k, v in samples(registry).items()
            if k[0].endswith(("_total", "_bucket", "_count", "_sum"))}


# -- synthetic events -------------------------------------------------------------------------

def test_every_design_metric_is_rendered() -> None:
    """With a GPU job, a running job, drops and a heartbeat, every table metric has samples."""
    assert DESIGN_METRICS <= families(registry_of(runner_over(a_full_history())))


def test_values_come_from_the_projections() -> None:
    """Spot values: counts, running, per-job gauges, memory, GPU, health, lag, build info."""
    got = samples(registry_of(runner_over(a_full_history())))
    version, torch, diffusers = build_info()
    expected = {
        ("wantel_jobs_total", "model=tiny-t2v-a14b", "status=completed", "task=t2v"): 1.0,
        ("wantel_jobs_total", "model=tiny-t2v-a14b", "status=failed", "task=t2v"): 0.0,
        ("wantel_jobs_running", "model=tiny-t2v"): 1.0,
        ("wantel_jobs_running", "model=tiny-t2v-a14b"): 0.0,
        ("wantel_denoise_steps_total", "model=tiny-t2v-a14b"): 4.0,
        ("wantel_denoise_steps_total", "model=tiny-t2v"): 2.0,
        ("wantel_steps_per_second", "model=tiny-t2v"): 4.0,
        ("wantel_queue_wait_seconds_sum", "model=tiny-t2v-a14b"): 2.0,
        ("wantel_denoise_step_duration_seconds_count", "expert=high_noise",
         "model=tiny-t2v-a14b"): 4.0,
        ("wantel_job_peak_memory_bytes_sum", "kind=device", "model=tiny-t2v-a14b"): 3.0 * GIB,
        ("wantel_device_memory_used_bytes", *DCGM, "source=nvml"): 3.0 * GIB,
        ("wantel_device_memory_total_bytes", *DCGM): 80.0 * GIB,
        ("wantel_gpu_utilization_ratio", *DCGM): 0.9,
        ("wantel_gpu_temperature_celsius", *DCGM): 70.0,
        ("wantel_gpu_power_watts", *DCGM): 250.5,
        ("wantel_gpu_throttle_events_total", *DCGM, "reason=sw_power_cap"): 1.0,
        ("wantel_frames_total", "model=tiny-t2v-a14b"): 5.0,
        ("wantel_frames_total", "model=tiny-t2v"): 0.0,
        ("wantel_video_seconds_total", "model=tiny-t2v-a14b"): 5 / 16,
        ("wantel_events_total", "type=StepEnded"): 6.0,
        ("wantel_events_dropped_total", "reason=queue_full"): 3.0,
        ("wantel_log_quarantined_total",): 0.0,
        ("wantel_projection_lag_seconds",): pytest.approx(10.0 - 6.1),
        ("wantel_workers_alive",): 1.0,
        ("wantel_build_info", f"diffusers={diffusers}", f"torch={torch}",
         f"version={version}"): 1.0,
        ("wantel_series_folded_total",): 0.0,
    }
    assert expected == {k: got.get(k) for k in expected}
    assert 0 < got[("wantel_job_progress_ratio", "job_id=b", "model=tiny-t2v", "worker=w1")] < 1
    assert 0 < got[("wantel_job_eta_seconds", "job_id=b", "model=tiny-t2v", "worker=w1")]
    assert [] == [key for key in got if any(part.startswith("job=") for part in key)]


def test_a_running_jobs_last_progress_is_its_latest_step_not_its_latest_sample() -> None:
    """The stall alert's clock: when the running job last stepped (or crossed a stage, or
    started), in Unix seconds; a memory sample taken afterwards (an NVML sampler runs while a
    step hangs) does not move it, and an ended job has none."""
    b = Stream("b")
    b.seq = itertools.count(100)  # after the history's events of b
    events = [*a_full_history(),
              MemorySampled(**b.kw(7.5), device="cuda:0", device_used_bytes=GIB)]
    got = samples(registry_of(runner_over(events)))
    moved = {k: v for k, v in got.items() if k[0] == "wantel_job_last_progress_timestamp_seconds"}
    assert moved == {("wantel_job_last_progress_timestamp_seconds", "job_id=b", "model=tiny-t2v",
                      "worker=w1"): pytest.approx(T0 + 5.6)}


def test_a_decodes_pieces_move_the_stall_clock() -> None:
    """A long decode that reports its pieces is progress: the clock is its newest piece."""
    b = Stream("b")
    b.seq = itertools.count(100)  # after the history's events of b
    events = [*a_full_history(), StageStarted(**b.kw(6.0), stage="decode"),
              StageProgress(**b.kw(6.5), stage="decode", done=1, total=21),
              StageProgress(**b.kw(9.0), stage="decode", done=2, total=21)]
    got = samples(registry_of(runner_over(events)))
    assert pytest.approx(T0 + 9.0) == got[("wantel_job_last_progress_timestamp_seconds",
                                           "job_id=b", "model=tiny-t2v", "worker=w1")]


def test_a_running_jobs_eta_gauges_are_as_of_its_latest_step() -> None:
    """Between two ETA issues (about every tenth of the loop) the steps use up the ETA: the
    gauges are the latest issued ETA less the time from its issue to the job's latest event,
    so Grafana counts down at every scrape instead of stepping every tenth of the loop."""
    c = Stream("c")
    events = [c.started(0, steps=40), *c.steps(0, 14, total=40)]  # issued at 12, not 13, 14
    runner = runner_over(events)
    issued = runner.engine.states["eta"].running["c"].issued[-1]
    last = runner.engine.states["jobs"].jobs["c"].last_ts
    age = (last - issued.ts) / 1e9
    assert age == pytest.approx(0.5)
    got = samples(registry_of(runner))
    key = ("job_id=c", "model=tiny-t2v", "worker=w1")
    assert got[("wantel_job_eta_seconds", *key)] == pytest.approx(issued.remaining_s - age)
    assert got[("wantel_job_eta_p10_seconds", *key)] == pytest.approx(
        max(0.0, issued.p10_s - age))
    assert got[("wantel_job_eta_p90_seconds", *key)] == pytest.approx(issued.p90_s - age)


def test_eta_error_histogram_has_buckets_but_no_sum() -> None:
    """ETA residuals render per model and progress bucket, without _sum (buckets go negative)."""
    got = samples(registry_of(runner_over(a_full_history())))
    names = {k[0] for k in got if k[0].startswith("wantel_eta_relative_error")}
    assert {"wantel_eta_relative_error_bucket"} == names
    infs = {k: v for k, v in got.items()
            if k[0] == "wantel_eta_relative_error_bucket" and "le=+Inf" in k}
    assert all(k[2] == "model=tiny-t2v-a14b" for k in infs)
    assert 0 < sum(infs.values())


ETA_COUNTERS = ("wantel_eta_interval_covered_total", "wantel_eta_absolute_relative_error_total")
ODD_MODEL = 'we"ird\\model\nname'


def _eta_figures(got: dict[tuple[str, ...], float]) -> dict[tuple[str, ...], float]:
    """The ETA counters and the histogram's count (its ``le="+Inf"`` bucket), from samples."""
    return {k: v for k, v in got.items()
            if k[0] in ETA_COUNTERS or (k[0] == "wantel_eta_relative_error_bucket"
                                        and "le=+Inf" in k)}


@pytest.mark.parametrize("accept", [None, OPENMETRICS])
def test_eta_coverage_and_absolute_error_are_exported_as_counters(accept: str | None) -> None:
    """Per model and progress bucket (and before_start): ETAs inside their p10-p90 interval and
    the sum of |relative error|, beside the histogram's count, exactly as the projection holds
    them, in both formats (parsed back by prometheus_client's parsers), label values escaped."""
    runner = runner_over(a_full_history())
    eta = runner.engine.states["eta"]
    live, late, first = Histogram(), Histogram(), Histogram()
    live.add_all([-0.5, 0.25, 0.75], 2)  # dyadic: the sums are exact
    late.add_all([0.125], 0)
    first.add(-0.375, True)
    eta.residuals = {"tiny-t2v": {"10-25": live}, ODD_MODEL: {"75-100": late}}
    eta.before_start = {"tiny-t2v": first}
    got = samples(registry_of(runner), accept)
    count = "wantel_eta_relative_error_bucket"
    covered, absolute = ETA_COUNTERS
    m, odd = "model=tiny-t2v", f"model={ODD_MODEL}"
    assert {
        (covered, m, "progress_bucket=10-25"): 2.0,
        (absolute, m, "progress_bucket=10-25"): 1.5,
        (count, "le=+Inf", m, "progress_bucket=10-25"): 3.0,
        (covered, m, "progress_bucket=before_start"): 1.0,
        (absolute, m, "progress_bucket=before_start"): 0.375,
        (count, "le=+Inf", m, "progress_bucket=before_start"): 1.0,
        (covered, odd, "progress_bucket=75-100"): 0.0,
        (absolute, odd, "progress_bucket=75-100"): 0.125,
        (count, "le=+Inf", odd, "progress_bucket=75-100"): 1.0,
    } == _eta_figures(got)
    # The before-start histogram has its buckets too: -0.375 is in (-0.5, -0.25].
    assert (0.0, 1.0) == (got[(count, "le=-0.5", m, "progress_bucket=before_start")],
                          got[(count, "le=-0.25", m, "progress_bucket=before_start")])
    body, _ = render(registry_of(runner), accept)
    stock = generate_openmetrics if accept else generate_latest
    assert stock(registry_of(runner)).decode() == body.decode()
    if accept:
        kinds = {f.name: f.type for f in parse_openmetrics(body.decode())}
        assert ("counter", "counter") == (kinds["wantel_eta_interval_covered"],
                                          kinds["wantel_eta_absolute_relative_error"])


def test_eta_counters_follow_scored_jobs() -> None:
    """After real folds of completed jobs, every scored (model, bucket), before_start included,
    has both counters, equal to the projection's covered count and |error| sum; a running job
    adds nothing until it completes."""
    b, c = Stream("b"), Stream("c")
    b.seq = itertools.count(4)  # a_full_history has b's start, its denoise stage, two steps
    events = [*a_full_history(),
              *(StepEnded(**b.kw(6.5 + i / 4), step=i, total_steps=4, duration_s=0.25)
                for i in (2, 3)),
              *b.completed(8, 3.0), c.started(9), *c.steps(9.1, 3)]
    runner = runner_over(events)
    eta = runner.engine.states["eta"]
    assert ({"a", "b"}, {"c"}) == (set(eta.finished), set(eta.running))
    expected: dict[tuple[str, ...], float] = {}
    series = [(model, bucket, hist) for model, by in eta.residuals.items()
              for bucket, hist in by.items()]
    series += [(model, "before_start", hist) for model, hist in eta.before_start.items()]
    for model, bucket, hist in series:
        labels = (f"model={model}", f"progress_bucket={bucket}")
        expected[(ETA_COUNTERS[0], *labels)] = float(hist.covered)
        expected[(ETA_COUNTERS[1], *labels)] = hist.sum_abs
        expected[("wantel_eta_relative_error_bucket", "le=+Inf", *labels)] = float(hist.total)
    assert {"tiny-t2v", "tiny-t2v-a14b"} == {model for model, _, _ in series}
    assert {"before_start"} < {bucket for _, bucket, _ in series}
    assert 0 < sum(v for k, v in expected.items() if k[0] == ETA_COUNTERS[1])
    for accept in (None, OPENMETRICS):
        assert expected == _eta_figures(samples(registry_of(runner), accept))


def test_per_job_gauges_vanish_when_the_job_ends() -> None:
    """A running job has progress and ETA series; once it completes they are gone."""
    b = Stream("b")
    running = [b.started(1), *b.steps(1.1, 3)]
    before = samples(registry_of(runner_over(running)))
    after = samples(registry_of(runner_over(running + b.completed(3, 2.0))))
    per_job = ("wantel_job_progress_ratio", "wantel_job_eta_seconds")
    assert [("wantel_job_eta_seconds", "job_id=b", "model=tiny-t2v", "worker=w1"),
            ("wantel_job_progress_ratio", "job_id=b", "model=tiny-t2v", "worker=w1")] == sorted(
        k for k in before if k[0] in per_job)
    assert [] == [k for k in after if k[0] in per_job]


def test_per_job_series_are_capped_and_the_rest_counted() -> None:
    """Beyond max_job_series running jobs, the newest have no series and each is counted once."""
    events: list[Event] = []
    for i in range(5):
        s = Stream(f"j{i}")
        events += [s.started(i), *s.steps(i + 0.1, 2)]
    log = MemoryLog()
    log.append(events)
    runner = ProjectionRunner(log, ProjectionEngine(default_projections()))
    runner.catch_up()
    registry = registry_of(runner, max_job_series=2)
    first = samples(registry)
    again = samples(registry)  # a second scrape folds the same jobs: not counted again
    shown = sorted(k[1] for k in again if k[0] == "wantel_job_progress_ratio")
    assert (["job_id=j0", "job_id=j1"], 3.0, 3.0) == (
        shown, first[("wantel_series_folded_total",)], again[("wantel_series_folded_total",)])
    j0, j5 = Stream("j0"), Stream("j5")
    j0.seq = itertools.count(4)  # after started, stage started and two steps
    log.append([*j0.completed(10, 9.0), j5.started(11)])
    runner.catch_up()
    third = samples(registry)
    shown = sorted(k[1] for k in third if k[0] == "wantel_job_progress_ratio")
    assert (["job_id=j1", "job_id=j2"], 4.0) == (shown, third[("wantel_series_folded_total",)])


def test_openmetrics_is_served_when_asked_and_carries_exemplars() -> None:
    """Accept: openmetrics gets OpenMetrics with trace_id exemplars; no Accept gets text."""
    registry = registry_of(runner_over(a_full_history()))
    text, text_type = render(registry, None)
    om, om_type = render(registry, OPENMETRICS)
    assert (True, True) == (text_type.startswith("text/plain"),
                            om_type.startswith("application/openmetrics-text"))
    assert (b"# {" not in text, om.endswith(b"# EOF\n")) == (True, True)
    exemplars = {
        (family.name, s.exemplar.labels["trace_id"])
        for family in parse_openmetrics(om.decode()) for s in family.samples if s.exemplar
    }
    caller = "0af7651916cd43dd8448eb211c80319c"  # job a's traceparent
    assert {("wantel_job_duration_seconds", caller),
            ("wantel_queue_wait_seconds", caller),
            ("wantel_denoise_step_duration_seconds", caller),
            ("wantel_denoise_step_duration_seconds", run_trace(a_full_history(), "b"))
            } == exemplars


@pytest.mark.parametrize("accept", [None, OPENMETRICS])
def test_encoder_writes_exactly_what_prometheus_client_writes(accept: str | None) -> None:
    """render()'s bytes equal prometheus_client's encoders', label values needing escapes too."""
    odd = Stream("odd", 'we"ird\\model\nname')
    registry = registry_of(runner_over(
        a_full_history() + [odd.started(7), *odd.steps(7.1, 2), *odd.completed(8, 1.0)]))
    body, _ = render(registry, accept)
    stock = generate_openmetrics(registry) if accept else generate_latest(registry)
    assert stock.decode() == body.decode()


def test_an_exposition_keeps_its_label_cache_and_its_bytes() -> None:
    """An Exposition's encoder (its own, not the module's) writes the library's bytes on every
    scrape, its label cache warm, in both formats and with a cache smaller than the series."""
    runner = runner_over(a_full_history())
    exposition = Exposition(runner, clock=lambda: T0 + 10.0)
    tiny = Exposition(runner, clock=lambda: T0 + 10.0)
    tiny.encoder = Encoder(max_label_sets=3)
    for _ in range(2):
        for accept, stock in ((None, generate_latest), (OPENMETRICS, generate_openmetrics)):
            expected = stock(exposition.registry).decode()
            assert expected == exposition.render(accept)[0].decode()
            assert expected == tiny.render(accept)[0].decode()
    assert exposition.encoder._label_strings  # filled by the scrapes above
    assert not Exposition(runner).encoder._label_strings  # another app's starts empty


def test_other_collectors_are_encoded_by_the_library() -> None:
    """A registry with kinds the fast path skips (info) renders as prometheus_client does."""
    registry = registry_of(runner_over(a_full_history()))
    Info("wantel_extra", "An info metric from another collector.", registry=registry).info(
        {"a": "b"})
    for accept, stock in ((None, generate_latest), (OPENMETRICS, generate_openmetrics)):
        assert stock(registry) == render(registry, accept)[0]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_finds_nothing_to_lint() -> None:
    """`promtool check metrics` on the text exposition reports no findings."""
    body, _ = render(registry_of(runner_over(a_full_history())), None)
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True,
                            timeout=60)
    assert (0, b"", b"") == (result.returncode, result.stdout, result.stderr)


def test_the_exporter_never_imports_torch() -> None:
    """Importing the exporter and reading build info leaves torch unimported."""
    code = ("import sys; from exporters.prometheus import build_info; build_info(); "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).parents[2], timeout=60)
    assert "False" == result.stdout.strip(), result.stderr


def test_collector_reads_state_under_the_runner_lock() -> None:
    """collect() holds runner.lock, so it never sees a half-applied batch."""
    runner = runner_over(a_full_history())
    seen: list[bool] = []

    class Spy:
        def __enter__(self) -> None:
            seen.append(True)

        def __exit__(self, *exc: object) -> None:
            pass

    collector = WantelCollector(runner)  # attaching its backlog sink takes the lock too
    runner.lock = Spy()  # type: ignore[assignment]
    list(collector.collect())
    assert [True] == seen


def test_a_silent_fleet_has_no_workers_alive() -> None:
    """Workers count as alive within the timeout of the wall clock, not only of the last event."""
    runner = runner_over(a_full_history())  # the heartbeat is at T0 + 6 s
    alive = {}
    for now in (T0 + 10.0, T0 + 67.0):
        registry = make_registry(runner, clock=lambda now=now: now, worker_timeout_s=60.0)
        alive[now - T0] = samples(registry)[("wantel_workers_alive",)]
    assert {10.0: 1.0, 67.0: 0.0} == alive


def test_a_runner_without_the_needed_projections_is_refused() -> None:
    """Building the collector over an engine lacking projections fails at once, naming them."""
    runner = ProjectionRunner(MemoryLog(), ProjectionEngine(default_projections()[:1]))
    with pytest.raises(ValueError, match="'eta', 'health', 'memory', 'metrics', 'throughput'"):
        WantelCollector(runner)


# -- real tiny jobs ---------------------------------------------------------------------------

TINY_JOBS = (("real-t2v", "tiny-t2v"), ("real-a14b", "tiny-t2v-a14b"))
STEPS = 3


@pytest.fixture(scope="module")
def real_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A log of two real tiny jobs (Wan 2.1 T2V and Wan 2.2 A14B), 32 px, 5 frames, 3 steps."""
    import torch

    from inference.runner import GenerationRequest, generate, prepare
    from telemetry.emitter import Emitter

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("real")
    log = LocalLog(root / "log", fsync="never")
    with Emitter(log) as emitter:
        for job, model in TINY_JOBS:
            request = GenerationRequest(model=model, prompt="waves", frames=5, height=32,
                                        width=32, steps=STEPS, job=job, device="cpu",
                                        out=str(root / f"{job}.mp4"))
            generate(prepare(request), emitter)
    log.close()
    yield root / "log"


def replay(path: Path, checkpoint: Path | None = None) -> ProjectionRunner:
    """A fresh runner over the log at ``path``, restored from ``checkpoint`` if given."""
    store = CheckpointStore(checkpoint) if checkpoint is not None else None
    runner = ProjectionRunner(LocalLog(path, create=False),
                              ProjectionEngine(default_projections()), store)
    runner.catch_up()
    return runner


def test_real_jobs_are_counted_and_timed(real_log: Path) -> None:
    """Two real tiny jobs: two completions, their steps, every stage timed, exemplars per job."""
    registry = registry_of(replay(real_log))
    got = samples(registry)
    assert {
        ("wantel_jobs_total", "model=tiny-t2v", "status=completed", "task=t2v"): 1.0,
        ("wantel_jobs_total", "model=tiny-t2v-a14b", "status=completed", "task=t2v"): 1.0,
        ("wantel_denoise_steps_total", "model=tiny-t2v"): float(STEPS),
        ("wantel_denoise_steps_total", "model=tiny-t2v-a14b"): float(STEPS),
        ("wantel_jobs_running", "model=tiny-t2v"): 0.0,
    } == {k: got[k] for k in (
        ("wantel_jobs_total", "model=tiny-t2v", "status=completed", "task=t2v"),
        ("wantel_jobs_total", "model=tiny-t2v-a14b", "status=completed", "task=t2v"),
        ("wantel_denoise_steps_total", "model=tiny-t2v"),
        ("wantel_denoise_steps_total", "model=tiny-t2v-a14b"),
        ("wantel_jobs_running", "model=tiny-t2v"))}
    stages = {k[2] for k in got
              if k[0] == "wantel_stage_duration_seconds_count" and k[1] == "model=tiny-t2v"}
    assert {"stage=load", "stage=text_encode", "stage=denoise", "stage=decode",
            "stage=save"} <= stages
    experts = {k[1]: v for k, v in got.items()
               if k[0] == "wantel_denoise_step_duration_seconds_count"
               and k[2] == "model=tiny-t2v-a14b"}
    assert {"expert=high_noise": 1.0, "expert=low_noise": 2.0} == experts  # boundary 0.875
    kinds = {k[1] for k in got if k[0] == "wantel_job_peak_memory_bytes_count"}
    assert {"kind=host_rss"} == kinds  # CPU: no allocator or NVML readings
    body, _ = render(registry, OPENMETRICS)
    traces = {s.exemplar.labels["trace_id"] for f in parse_openmetrics(body.decode())
              for s in f.samples if s.exemplar and f.name == "wantel_job_duration_seconds"}
    events = [e for item in LocalLog(real_log, create=False).read()
              for e in getattr(item, "events", ())]
    assert {run_trace(events, job) for job, _ in TINY_JOBS} == traces


def test_counters_survive_a_restart(real_log: Path, tmp_path: Path) -> None:
    """A new runner over the same log (replayed or from a checkpoint) reports equal counters."""
    first = replay(real_log, tmp_path / "ckpt")
    from_checkpoint = replay(real_log, tmp_path / "ckpt")
    replayed = replay(real_log)
    expected = counters(registry_of(first))
    assert 0 < len(expected)
    assert (expected, expected) == (counters(registry_of(from_checkpoint)),
                                    counters(registry_of(replayed)))
    assert 0 == from_checkpoint.catch_up()  # nothing re-applied: no double counting


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_real_job_metrics(real_log: Path) -> None:
    """`promtool check metrics` finds nothing in the exposition of real jobs."""
    body, _ = render(registry_of(replay(real_log)), None)
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True,
                            timeout=60)
    assert (0, b"", b"") == (result.returncode, result.stdout, result.stderr)


def test_out_of_memory_failures_are_counted_by_model() -> None:
    """A JobFailed with oom=True counts in wantel_jobs_oom_total; other failures do not."""
    oom, plain = Stream("oom-job"), Stream("plain-failure")
    events: list[Event] = [
        oom.started(0), JobFailed(**oom.kw(1), duration_s=1.0, stage="denoise", step=2,
                                  error_type="OutOfMemoryError", message="CUDA out of memory",
                                  oom=True),
        plain.started(2), JobFailed(**plain.kw(3), duration_s=1.0, error_type="ValueError",
                                    message="bad input"),
    ]
    got = samples(registry_of(runner_over(events)))
    assert 1.0 == got[("wantel_jobs_oom_total", "model=tiny-t2v")]
    assert 2.0 == got[("wantel_jobs_total", "model=tiny-t2v", "status=failed", "task=t2v")]


def test_a_silent_fleet_leaves_no_job_running() -> None:
    """When no event arrives for longer than the liveness timeout (wall clock), a job that never
    ended is no longer counted as running, and its per-job gauges go."""
    running = Stream("stuck")
    events: list[Event] = [running.started(0), *running.steps(0.1, 2)]
    runner = runner_over(events)
    soon = samples(make_registry(runner, clock=lambda: T0 + 10.0))
    later = samples(make_registry(runner, clock=lambda: T0 + 1_000.0))
    assert 1.0 == soon[("wantel_jobs_running", "model=tiny-t2v")]
    assert 0.0 == later[("wantel_jobs_running", "model=tiny-t2v")]
    assert not [k for k in later if k[0] == "wantel_job_eta_seconds"]


def test_a_job_lost_mid_run_is_counted_by_worker_and_a_clean_stop_is_not() -> None:
    """A worker silent past the timeout while its job runs loses that job (by model and
    worker, for an hour); a worker that went silent after its job ended loses nothing."""
    done, stuck = Stream("done"), Stream("stuck")
    events: list[Event] = [done.started(0), *done.steps(0.1, 4), *done.completed(2, 2.0)]
    clean = samples(make_registry(runner_over(events), clock=lambda: T0 + 1_000.0))
    assert [] == [k for k in clean if k[0] == "wantel_jobs_lost"]
    runner = runner_over([*events, stuck.started(3), *stuck.steps(3.1, 2)])
    lost = {now: samples(make_registry(runner, clock=lambda now=now: T0 + now))
            for now in (10.0, 1_000.0, 5_000.0)}
    key = ("wantel_jobs_lost", "model=tiny-t2v", "worker=w1")
    assert [None, 1.0, None] == [lost[now].get(key) for now in (10.0, 1_000.0, 5_000.0)]


def test_a_job_the_projection_abandoned_still_counts_as_lost() -> None:
    """Once newer events from another worker make the projection mark the silent worker's job
    abandoned, it stays lost (the page does not resolve itself at the sweep)."""
    stuck, other = Stream("stuck"), Stream("other")
    events: list[Event] = [stuck.started(0), *stuck.steps(0.1, 2)]
    later = [WorkerHeartbeat(**{**other.kw(t), "worker": "w2"}, host="h2", pid=2)
             for t in range(10, 200, 10)]
    runner = runner_over(events + later)
    assert "abandoned" == runner.engine.states["jobs"].jobs["stuck"].status
    got = samples(make_registry(runner, clock=lambda: T0 + 200.0))
    assert 1.0 == got[("wantel_jobs_lost", "model=tiny-t2v", "worker=w1")]


def test_smoothed_steps_per_second_is_zero_while_the_model_is_idle() -> None:
    """The EMA is shown while a job of the model runs, and 0 once none does."""
    a = Stream("a")
    running = [a.started(0), *a.steps(0.1, 2)]
    busy = samples(registry_of(runner_over(running)))
    idle = samples(registry_of(runner_over([*running, *a.completed(1, 1.0)])))
    assert (4.0, 0.0) == (busy[("wantel_steps_per_second", "model=tiny-t2v")],
                          idle[("wantel_steps_per_second", "model=tiny-t2v")])


def test_backlog_is_zero_once_the_projections_have_read_the_log() -> None:
    """``wantel_projection_backlog_events`` is what the last read left unread: 0 when caught up
    (so an idle fleet's growing lag is told from a projection falling behind)."""
    got = samples(registry_of(runner_over(a_full_history())))
    assert 0.0 == got[("wantel_projection_backlog_events",)]


def run_trace(events: list[Event] | Any, job: str) -> str:
    """The trace id of ``job``'s run in ``events``: keyed by its opening event's ``ts`` (its
    JobQueued, else its JobStarted; :func:`telemetry.tracing.job_trace_id`)."""
    opening = next(e for e in events if e.job == job and isinstance(e, (JobQueued, JobStarted)))
    return trace_id_for(job, None, opening.ts)


def test_memory_prediction_error_is_exported_per_model_and_kind() -> None:
    """A completed GPU job's predicted peak is scored against its recorded peak: the signed
    error histogram (no _sum: buckets go negative) and the sum of |error| beside it, as the
    memory projection holds them."""
    runner = runner_over(a_full_history())
    memory = runner.engine.states["memory"]
    got = samples(registry_of(runner))
    scored = {(model, kind): hist for model, kinds in memory.errors.items()
              for kind, hist in kinds.items()}
    assert scored
    for (model, kind), hist in scored.items():
        count = got[("wantel_memory_prediction_relative_error_bucket", f"kind={kind}", "le=+Inf",
                     f"model={model}")]
        assert hist.total == count
        assert got[("wantel_memory_prediction_absolute_relative_error_total", f"kind={kind}",
                    f"model={model}")] == pytest.approx(hist.sum_abs)
    assert not any(k[0] == "wantel_memory_prediction_relative_error_sum" for k in got)


# -- queues ----------------------------------------------------------------------------------

def test_queue_depth_worker_free_time_and_start_scores() -> None:
    """Two jobs wait behind a running one: the depth by queue and model, the worker's
    predicted free time, once the next job starts its predicted start scored, and once it
    completes the finish predicted with it (the same three families, no _sum)."""
    import msgspec

    from tests.telemetry.test_queues import T0 as QUEUES_T0
    from tests.telemetry.test_queues import done, q, start

    def at(event: Event, seconds: float) -> Event:  # the scenario at T0 (the clock's base)
        return msgspec.structs.replace(event, ts=int((T0 + seconds) * 1e9))

    history: list[Event] = []
    for i, job in enumerate(["h1", "h2"]):
        history += [q(job, 0), start(job, 1, "w"), done(job, 2, 2.0 + i * 0.1)]
    waiting = [q("r", 3), start("r", 3, "w"), q("x", 4), q("y", 4)]
    events = [at(e, (e.ts - QUEUES_T0) / 1e9) for e in history + waiting]
    beat = WorkerHeartbeat(job="worker/w", seq=0, ts=int((T0 + 4) * 1e9), worker="w",
                           host="h", pid=1)
    runner = runner_over([*events, beat])
    registry = registry_of(runner)
    got = samples(registry)
    assert got[("wantel_queue_depth", "model=m", "queue=default")] == 2.0
    free = got[("wantel_worker_predicted_free_seconds", "worker=w")]
    assert 0.0 <= free < 3.0
    assert not any(k[0].startswith("wantel_queue_start_relative_error") for k in got)
    runner.log.append([at(done("r", 0, 2.0, seq=2), 5.0), at(start("x", 0, "w", seq=1), 5.1)])
    runner.catch_up()
    got = samples(registry)
    scored = got[("wantel_queue_start_relative_error_bucket", "checkpoint=first", "le=+Inf",
                  "queue=default")]
    assert scored == 1.0
    assert ("wantel_queue_start_interval_covered_total", "checkpoint=first",
            "queue=default") in got
    assert got[("wantel_queue_depth", "model=m", "queue=default")] == 1.0
    assert not any(k[0].startswith("wantel_queue_finish_relative_error") for k in got)
    runner.log.append([at(done("x", 0, 2.0), 7.1)])
    runner.catch_up()
    got = samples(registry)
    # x queued before the scorer joined: its one prediction (at 5.0) is both checkpoints'.
    for checkpoint in ("first", "half"):
        assert got[("wantel_queue_finish_relative_error_bucket", f"checkpoint={checkpoint}",
                    "le=+Inf", "queue=default")] == 1.0
        assert ("wantel_queue_finish_interval_covered_total", f"checkpoint={checkpoint}",
                "queue=default") in got
        assert ("wantel_queue_finish_absolute_relative_error_total",
                f"checkpoint={checkpoint}", "queue=default") in got
    assert not any(k[0] == "wantel_queue_finish_relative_error_sum" for k in got)


def test_a_stopped_worker_is_not_alive_and_raises_no_lost_job() -> None:
    """WorkerStopped: wantel_workers_alive drops at once (well within the timeout), and no
    wantel_jobs_lost ever, not even for a job it stopped in the middle of (scale-down)."""
    from telemetry.events import WorkerStopped

    done, cut, w = Stream("done"), Stream("cut"), Stream("worker/w1")
    events: list[Event] = [done.started(0), *done.steps(0.1, 4), *done.completed(2, 2.0),
                           WorkerHeartbeat(**w.kw(3), host="h", pid=1)]
    runner = runner_over(events)
    assert (1.0, 0.0) == tuple(samples(registry_of(runner))[(name,)] for name in (
        "wantel_workers_alive", "wantel_workers_stopped"))
    stopped = runner_over([*events, cut.started(4), *cut.steps(4.1, 2),
                           WorkerStopped(**w.kw(5), host="h", pid=1)])
    for now in (T0 + 10.0, T0 + 1_000.0):
        got = samples(make_registry(stopped, clock=lambda now=now: now))
        assert 0.0 == got[("wantel_workers_alive",)]
        assert 1.0 == got[("wantel_workers_stopped",)]  # WantelWorkerDown leaves it out
        assert [] == [k for k in got if k[0] == "wantel_jobs_lost"]
        assert 0.0 == got[("wantel_jobs_running", "model=tiny-t2v")]
    assert "abandoned" == stopped.engine.states["jobs"].jobs["cut"].status


def test_a_declared_loss_counts_its_running_jobs_lost_at_once() -> None:
    """WorkerLost: the worker's running job is lost (abandoned by the event), counted in
    wantel_jobs_lost, and the worker is not alive."""
    from telemetry.events import WorkerLost

    stuck = Stream("stuck")
    events: list[Event] = [stuck.started(0), *stuck.steps(0.1, 2)]
    last = events[-1].ts
    runner = runner_over([*events, WorkerLost(job="wantel/lost/w1", seq=0,
                                              ts=last + 61 * SECOND, worker="w1",
                                              last_seen_ts=last, declared_by="agg")])
    got = samples(make_registry(runner, clock=lambda: T0 + 70.0))
    assert 1.0 == got[("wantel_jobs_lost", "model=tiny-t2v", "worker=w1")]
    assert 0.0 == got[("wantel_workers_alive",)]


# -- the cap on model label values -----------------------------------------------------------

def many_models(count: int, *, running: int = 0) -> list[Event]:
    """One completed job of each of ``count`` models (``m000``, …), then ``running`` more
    models with a job still running."""
    events: list[Event] = []
    for index in range(count + running):
        stream = Stream(f"job-{index}", f"m{index:03d}")
        events += [stream.started(index), *stream.steps(index + 0.1, 2)]
        if index < count:
            events += stream.completed(index + 0.9, 0.9)
    return events


def test_models_beyond_the_cap_are_added_up_under_other_and_counted() -> None:
    """Five models, a cap of three: the first three named keep their series, the rest add up
    under model="other" (counters, histograms and gauges alike), and the count says so; the
    output still parses as OpenMetrics."""
    runner = runner_over(many_models(4, running=1))
    got = samples(registry_of(runner, max_models=3))
    models = {label.split("=", 1)[1] for key in got for label in key[1:]
              if label.startswith("model=")}
    assert {"m000", "m001", "m002", "other"} == models
    assert 2.0 == got[("wantel_models_folded",)]
    completed = ("wantel_jobs_total", "model={}", "status=completed", "task=t2v")

    def completed_of(model: str) -> float:
        return got[tuple(part.format(model) for part in completed)]

    assert [1.0, 1.0, 1.0, 1.0] == [completed_of(m) for m in ("m000", "m001", "m002", "other")]
    assert 1.0 == got[("wantel_jobs_running", "model=other")]
    assert 4.0 == got[("wantel_denoise_steps_total", "model=other")]  # m003's 2 and m004's 2
    assert 2.0 == got[("wantel_job_duration_seconds_count", "model=other", "status=completed",
                       "task=t2v")] + got[("wantel_job_duration_seconds_count", "model=m000",
                                            "status=completed", "task=t2v")]
    assert samples(registry_of(runner, max_models=3), OPENMETRICS)


def test_the_models_that_keep_their_series_never_change() -> None:
    """The kept models are the first the log named, whatever comes after: a series never moves
    to "other" (its counters would reset); under the cap nothing is folded."""
    first = runner_over(many_models(3))
    later = runner_over(many_models(30))
    kept = {label for key in samples(registry_of(later, max_models=3)) for label in key[1:]
            if label.startswith("model=")}
    assert {"model=m000", "model=m001", "model=m002", "model=other"} == kept
    assert 0.0 == samples(registry_of(first, max_models=3))[("wantel_models_folded",)]
    assert not any("model=other" in key for key in samples(registry_of(first, max_models=3)))


def test_two_thousand_models_make_a_bounded_scrape() -> None:
    """The defect's own case, 2,000 model names: at the default cap (100) the series that
    carry a model have at most 101 values of it."""
    got = samples(registry_of(runner_over(many_models(2000))))
    models = {label for key in got for label in key[1:] if label.startswith("model=")}
    assert 101 == len(models)
    assert 1900.0 == got[("wantel_models_folded",)]
