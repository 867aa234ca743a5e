"""Prometheus exposition: a custom collector that renders projection state at scrape time.

Nothing on the inference path touches a Prometheus metric object: the emitter only appends
events, projections fold them, and :class:`WantelCollector` builds fresh ``*MetricFamily``
objects from the projections' state whenever ``/metrics`` is scraped (prometheus_client's
custom-collector pattern). Counters therefore come from the log, so a restarted server over
the same log reports the same values, and a scrape costs the same whether 10 or 10 000 jobs
have run (only running jobs are iterated; everything else is already aggregated).

Where each metric comes from:

* ``metrics`` projection — job counts, duration / queue-wait / stage / step histograms with
  exemplars, step counts, peak-memory histograms, GPU readings and throttle counts;
* ``jobs`` — running jobs, alive workers; ``eta`` — per-job progress and ETA, ETA residuals;
* ``throughput`` — smoothed steps/s; ``memory`` — per-device memory;
* ``health`` and the engine's own health — events by type, drops, quarantined records.

:func:`render` picks OpenMetrics (which carries exemplars) when the scraper asks for it and the
classic text format otherwise.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import cache
from importlib import metadata
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar as PromExemplar
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from exporters.queue_scores import QueueScorer
from telemetry.engine import Health, ProjectionRunner
from telemetry.guidance import CATEGORIES
from telemetry.liveness import WORKER_TIMEOUT_S
from telemetry.projections.compare import ABS_ERROR_BUCKETS, LABELS, CompareState
from telemetry.projections.eta import ERROR_EDGES, EtaState, current
from telemetry.projections.health import HealthState
from telemetry.projections.jobs import JobsState, JobView
from telemetry.projections.memory import MemoryState
from telemetry.projections.metrics import (
    DURATION_BUCKETS,
    MEMORY_BUCKETS,
    SEP,
    VIDEO_FPS,
    Exemplar,
    HistogramSeries,
    MetricsState,
)
from telemetry.projections.queues import forecast
from telemetry.projections.throughput import ThroughputState
from telemetry.runner import Applied, Sink

#: How many ``model`` label values the exporter gives series of their own (WantelCollector).
MAX_MODELS: Final = 100
#: The model the rest are added up under.
OTHER_MODEL: Final = "other"

#: Terminal statuses every (model, task) pair is exported with, at zero until one happens, so
#: ``increase(wantel_jobs_total{status="failed"}[5m])`` sees the very first failure.
STATUSES: Final = ("completed", "failed", "cancelled")
DIST: Final = "wan-telemetry"
#: The projections whose state the collector reads.
REQUIRED_PROJECTIONS: Final = ("metrics", "jobs", "eta", "throughput", "memory", "health")
#: ``progress_bucket`` of the ETA issued at job start, beside the live buckets (``0-10`` …).
BEFORE_START: Final = "before_start"
#: Labels of the per-job gauges. The job id is ``job_id``, never ``job``: that is the target
#: label Prometheus sets itself, and keeping ours would need ``honor_labels``.
JOB_LABELS: Final = ("job_id", "model", "worker")
#: Labels of device series: wantel's ``device`` (``cuda:0``) and the labels DCGM exporter puts
#: on the same GPU — ``gpu`` (NVML index), ``UUID`` and ``Hostname`` — so its series join ours
#: with ``on (UUID)`` or ``on (Hostname, gpu)``. Empty where unknown (CPU, no NVML).
DEVICE_LABELS: Final = ("device", "gpu", "UUID", "Hostname")
#: How long a lost job (running per the log, nobody heard from it within the liveness timeout)
#: stays in ``wantel_jobs_lost``, in seconds after it was last heard from.
LOST_WINDOW_S: Final = 3600.0


@cache
def _le_labels(edges: tuple[float, ...]) -> tuple[str, ...]:
    """``le`` label values of ``edges`` plus ``+Inf``, formatted once per edge set."""
    go_string: Callable[[float], str] = floatToGoString  # untyped upstream
    return (*(go_string(edge) for edge in edges), "+Inf")


@cache
def build_info() -> tuple[str, str, str]:
    """Versions of wantel, torch and diffusers from package metadata (torch is never imported)."""
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "unknown"

    return version(DIST), version("torch"), version("diffusers")


def _add_histogram(family: HistogramMetricFamily, labels: dict[str, str],
                   edges: tuple[float, ...], counts: list[int], *,
                   exemplars: Mapping[int, Exemplar] | None, sum_value: float | None) -> None:
    """Append one series' cumulative buckets (with exemplars), ``_count`` and ``_sum``.

    The samples prometheus_client's ``add_metric`` would build, without rebuilding the label
    dict from scratch per bucket (that was most of the collect time). ``sum_value=None`` (for
    histograms with negative buckets, where OpenMetrics forbids a sum) leaves both out, as the
    library does.
    """
    samples = family.samples
    bucket_name = family.name + "_bucket"
    cumulative = 0
    for index, le in enumerate(_le_labels(edges)):
        cumulative += counts[index]
        found = exemplars.get(index) if exemplars else None
        exemplar = (None if found is None
                    else PromExemplar({"trace_id": found.trace_id}, found.value, found.ts_s))
        samples.append(Sample(bucket_name, {**labels, "le": le}, cumulative, None, exemplar))
    if sum_value is not None:
        samples.append(Sample(family.name + "_count", labels, cumulative))
        samples.append(Sample(family.name + "_sum", labels, sum_value))


def _histogram(name: str, doc: str, labels: list[str], edges: tuple[float, ...], *,
               series: Iterable[HistogramSeries], unit: str = "") -> HistogramMetricFamily:
    """A histogram family from the metrics projection's stored series."""
    family = HistogramMetricFamily(name, doc, labels=labels, unit=unit)
    for hist in series:
        _add_histogram(family, dict(zip(labels, hist.labels, strict=True)), edges, hist.counts,
                       exemplars=hist.exemplars, sum_value=hist.sum)
    return family


def _compare_families(compare: CompareState, eta: EtaState) -> list[Metric]:
    """``wantel compare``'s figures as series labelled by every dimension it groups by
    (:data:`~telemetry.projections.compare.LABELS`: model, variant, worker, device), for the
    Compare dashboard's ``sum by ($by)`` (:mod:`telemetry.projections.compare`)."""
    labels = list(LABELS)
    jobs = CounterMetricFamily("wantel_compare_jobs", "Ended jobs by outcome, labelled by "
                               "every dimension the Compare dashboard groups by.",
                               labels=[*labels, "status"])
    counts: dict[tuple[str, ...], int] = {}
    for series in compare.jobs.values():  # every outcome of a group, from 0 (a failure rate
        for status in STATUSES:           # of 0 is a figure, not a missing series)
            counts.setdefault((*series.labels[:-1], status), 0)
        counts[series.labels] = series.value
    for key, value in counts.items():
        jobs.add_metric(list(key), value)
    failures = CounterMetricFamily("wantel_compare_failures", "Failed jobs by failure "
                                   "category (else error type).", labels=[*labels, "category"])
    failed: dict[tuple[str, ...], int] = {}
    for group in dict.fromkeys(key[:-1] for key in counts):  # every category, from 0: a
        for category in CATEGORIES:                          # failure's first increase shows
            failed[(*group, category)] = 0
    for series in compare.failures.values():
        failed[series.labels] = series.value
    for key, value in failed.items():
        failures.add_metric(list(key), value)
    steps = CounterMetricFamily("wantel_compare_denoise_steps", "Measured denoising steps of "
                                "completed jobs.", labels=labels)
    seconds = CounterMetricFamily("wantel_compare_denoise_step", "Seconds those steps took "
                                  "(steps/s = steps ÷ seconds).", labels=labels,
                                  unit="seconds")
    for series in compare.steps.values():
        steps.add_metric(list(series.labels), series.value)
        seconds.add_metric(list(series.labels),
                           compare.step_seconds.get(SEP.join(series.labels), 0.0))
    frames = CounterMetricFamily("wantel_compare_frames", "Frames of completed jobs "
                                 "(seconds per frame = duration sum ÷ frames).", labels=labels)
    for series in compare.frames.values():
        frames.add_metric(list(series.labels), series.value)
    return [
        jobs, failures, steps, seconds, frames,
        _histogram("wantel_compare_job_duration_seconds", "Duration of completed jobs.",
                   labels, DURATION_BUCKETS, series=compare.duration.values(),
                   unit="seconds"),
        _histogram("wantel_compare_job_peak_memory_bytes", "Peak memory of ended jobs, of the "
                   "kind their device predicts (host_rss on a CPU, torch_allocated on CUDA).",
                   [*labels, "kind"], MEMORY_BUCKETS, series=compare.peak_memory.values(),
                   unit="bytes"),
        _histogram("wantel_compare_eta_absolute_error_ratio", "|error| of the ETA issued "
                   "before each completed job started, as a share of its actual duration.",
                   labels, ABS_ERROR_BUCKETS, series=eta.before_start_by.values(),
                   unit="ratio"),
    ]


class _Scored(Protocol):
    """What the exporter reads of an ETA residual histogram (``telemetry.projections.eta``)."""

    @property
    def counts(self) -> list[int]: ...
    @property
    def covered(self) -> int: ...
    @property
    def sum_abs(self) -> float: ...


def _eta_series(eta: EtaState) -> Iterator[tuple[dict[str, str], _Scored]]:
    """Each scored (model, progress bucket) of the ETA projection and its histogram.

    The live buckets (``0-10`` … ``75-100``) from ``EtaState.residuals``, then the estimate
    issued at job start as ``progress_bucket="before_start"`` (``EtaState.before_start``);
    a histogram with nothing counted yet is left out.
    """
    for model in dict.fromkeys([*eta.residuals, *eta.before_start]):
        for bucket, hist in eta.residuals.get(model, {}).items():
            if hist.counts:
                yield {"model": model, "progress_bucket": bucket}, hist
        first = eta.before_start.get(model)
        if first is not None and first.counts:
            yield {"model": model, "progress_bucket": BEFORE_START}, first


def _queue_series(scores: Mapping[tuple[str, str], _Scored]
                  ) -> Iterator[tuple[dict[str, str], _Scored]]:
    """Each scored (queue, checkpoint) of a :class:`~exporters.queue_scores.QueueScorer`
    read, in order."""
    for (queue, checkpoint), hist in sorted(scores.items()):
        yield {"queue": queue, "checkpoint": checkpoint}, hist


def _scored_families(prefix: str, labels: list[str],
                     series: Iterable[tuple[dict[str, str], _Scored]], *, error_help: str,
                     covered_help: str, scored: str) -> list[Metric]:
    """How good past predictions were: ``<prefix>_relative_error``, the signed error
    histogram (no ``_sum``: its buckets go negative), and two counters beside it so PromQL
    can window what the histogram cannot give: ``<prefix>_interval_covered_total``
    (predictions whose actual value fell inside their p10–p90 interval) and
    ``<prefix>_absolute_relative_error_total`` (the sum of |relative error|). Divided by the
    increase of the histogram's ``le="+Inf"`` bucket (its count), they give interval coverage
    and mean absolute relative error over any window. The three carry the same series, which
    appear together with their first score. The ETA's and the queue's predicted start and
    finish are all exported by it.
    """
    errors = HistogramMetricFamily(f"{prefix}_relative_error", error_help, labels=labels)
    covered = CounterMetricFamily(f"{prefix}_interval_covered", covered_help, labels=labels)
    absolute = CounterMetricFamily(f"{prefix}_absolute_relative_error",
                                   f"Sum of the absolute relative errors of {scored}.",
                                   labels=labels)
    for series_labels, hist in series:
        _add_histogram(errors, series_labels, ERROR_EDGES, hist.counts, exemplars=None,
                       sum_value=None)
        covered.samples.append(Sample(covered.name + "_total", series_labels, hist.covered))
        absolute.samples.append(Sample(absolute.name + "_total", series_labels, hist.sum_abs))
    return [errors, covered, absolute]


def _non_finite(metrics: MetricsState) -> Metric:
    """``wantel_observations_skipped_total{metric}``: NaN or infinite values an event recorded,
    left out of a histogram (one would make its ``_sum`` NaN for good)."""
    family = CounterMetricFamily(
        "wantel_observations_skipped",
        "Values left out of a histogram because they were NaN or infinite, by histogram.",
        labels=["metric", "reason"])
    skipped = {"wantel_job_duration_seconds": metrics.job_duration,
               "wantel_queue_wait_seconds": metrics.queue_wait,
               "wantel_stage_duration_seconds": metrics.stage_duration,
               "wantel_denoise_step_duration_seconds": metrics.step_duration,
               "wantel_job_peak_memory_bytes": metrics.peak_memory}
    for name, series in skipped.items():
        count = sum(hist.non_finite for hist in series.values())
        if count:
            family.add_metric([name, "non_finite"], count)
    return family


def _heard_from(view: JobView, jobs: JobsState, horizon_ns: float) -> bool:
    """Whether a running job, or its worker, spoke since ``horizon_ns`` (wall clock).

    The projection marks a job abandoned only when newer events arrive; when the whole fleet
    goes silent nothing arrives, so the exporter also asks the wall clock: a job nobody has
    heard from within the liveness timeout is not counted as running.
    """
    if (view.last_ts or 0) >= horizon_ns:
        return True
    worker = jobs.workers.get(view.worker) if view.worker is not None else None
    return worker is not None and worker.last_ts >= horizon_ns


def _device_labels(device: str, metrics: MetricsState, jobs: JobsState) -> list[str]:
    """:data:`DEVICE_LABELS` values of ``device``: its NVML index and UUID from its latest GPU
    sample, and the host its sampling worker heartbeats from ("" where unknown)."""
    reading = metrics.gpus.get(device)
    if reading is None:
        return [device, "", "", ""]
    worker = jobs.workers.get(reading.worker) if reading.worker is not None else None
    return [device, "" if reading.gpu is None else str(reading.gpu), reading.uuid or "",
            (worker.host or "") if worker is not None else ""]


def _running_by_model(jobs: JobsState, horizon_ns: float) -> dict[str, int]:
    """Running jobs heard from since ``horizon_ns``, by model."""
    running: dict[str, int] = {}
    for job in jobs.active:
        view = jobs.jobs[job]
        if (view.status == "running" and view.model is not None
                and _heard_from(view, jobs, horizon_ns)):
            running[view.model] = running.get(view.model, 0) + 1
    return running


def _lost_jobs(jobs: JobsState, horizon_ns: float, since_ns: float) -> dict[tuple[str, str], int]:
    """Lost jobs by (model, worker): running per the log, yet neither they nor their worker
    spoke since ``horizon_ns`` (or already marked ``abandoned`` by the projection: its worker
    declared lost, or silent), last heard from after ``since_ns``. A worker that stopped
    (``WorkerStopped``) loses none, not even a job it stopped in the middle of."""
    lost: dict[tuple[str, str], int] = {}

    def count(view: JobView) -> None:
        key = (view.model or "unknown", view.worker or "")
        lost[key] = lost.get(key, 0) + 1

    for job in jobs.active:
        view = jobs.jobs[job]
        if (view.status == "running" and (view.last_ts or 0) >= since_ns
                and not _heard_from(view, jobs, horizon_ns)):
            count(view)
    # Abandoned jobs were moved to the newest end of ``finished`` by a sweep: walk back from
    # there until jobs last heard from well before the window (the order is the end order).
    slack_ns = 2 * (horizon_ns - since_ns)
    for job in reversed(jobs.finished):
        ended = jobs.jobs.get(job)
        if ended is None:
            continue
        if (ended.last_ts or 0) < since_ns - slack_ns:
            break
        if (ended.status == "abandoned" and ended.abandon_reason != "worker stopped"
                and (ended.last_ts or 0) >= since_ns):
            count(ended)  # a worker that stopped mid-job was scaled down, not lost
    return lost


#: Numbers the collectors' backlog sinks: a runner refuses two sinks of one name.
_COLLECTORS: Final = itertools.count(1)


class _Backlog(Sink):
    """Remembers how many events were stored beyond the runner's last step when it read it
    (:attr:`Applied.behind`): 0 once it has read everything there was."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.behind = 0

    def on_applied(self, applied: Applied) -> None:
        """Keep the step's backlog."""
        self.behind = applied.behind


class WantelCollector(Collector):
    """Renders every ``wantel_*`` metric from a runner's projection state at scrape time.

    ``max_job_series`` caps the running jobs given per-job gauges (the oldest running jobs keep
    theirs, so series stay stable between scrapes); each job left out is counted once in
    ``wantel_series_folded_total``. ``max_models`` caps the values of the ``model`` label:
    the first models the log named keep theirs (the order never changes, so a series never
    moves), every later one is folded into ``model="other"`` (its samples added up) and
    counted in ``wantel_models_folded`` — 2,000 model names once made 146,884 series and a
    2.3 s scrape. ``clock`` (wall seconds) only feeds the lag gauge: the exporter may read the
    clock, projections may not.
    """

    def __init__(
        self,
        runner: ProjectionRunner,
        *,
        max_job_series: int = 200,
        max_models: int = MAX_MODELS,
        worker_timeout_s: float = WORKER_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        missing = sorted(set(REQUIRED_PROJECTIONS) - set(runner.engine.states))
        if missing:
            raise ValueError(f"the runner lacks projections {missing}: build its engine from "
                             "telemetry.projections.default_projections()")
        self.runner = runner
        self.max_job_series = max_job_series
        self.max_models = max_models
        self.worker_timeout_s = worker_timeout_s
        self.clock = clock
        self._fold_lock = threading.Lock()
        self._folded_now: set[str] = set()
        self._folded_total = 0
        number = next(_COLLECTORS)
        self._backlog = _Backlog(f"prometheus-backlog-{number}")
        runner.add_sink(self._backlog)
        self._queue_scores: QueueScorer | None = None
        if "queues" in runner.engine.states:
            self._queue_scores = QueueScorer()
            self._queue_scores.name = f"queue-scores-{number}"
            runner.add_sink(self._queue_scores)

    def describe(self) -> Iterable[Metric]:
        """Nothing up front: families depend on the log, and describing must not fold it."""
        return ()

    def collect(self) -> Iterator[Metric]:
        """Fresh metric families from the projections, read under the runner's lock."""
        now = self.clock()
        with self.runner.lock:
            engine = self.runner.engine
            families = self._families(engine.states, engine.health, now)
        yield from families

    # -- families ---------------------------------------------------------------------------

    def _families(self, states: Mapping[str, Any], health: Health, now: float) -> list[Metric]:
        metrics: MetricsState = states["metrics"]
        jobs: JobsState = states["jobs"]
        eta: EtaState = states["eta"]
        throughput: ThroughputState = states["throughput"]
        memory: MemoryState = states["memory"]
        drops: HealthState = states["health"]
        out: list[Metric] = []
        horizon_ns = (now - self.worker_timeout_s) * 1e9
        running = _running_by_model(jobs, horizon_ns)
        out.extend(self._job_families(metrics, jobs, throughput, running, now))
        out.extend(self._running_job_families(jobs, eta, horizon_ns))
        out.extend(self._step_families(metrics, throughput, running))
        out.extend(self._eta_families(eta))
        out.extend(self._memory_families(metrics, memory, jobs))
        out.extend(self._gpu_families(metrics, jobs))
        compare: CompareState | None = states.get("compare")
        if compare is not None:
            out.extend(_compare_families(compare, eta))
        out.extend(self._health_families(health, drops, now))
        out.append(_non_finite(metrics))
        if "queues" in states:
            out.extend(self._queue_families(states, now))
        alive = GaugeMetricFamily("wantel_workers_alive",
                                  "Workers heard from within the liveness timeout.")
        # The projection's horizon is the newest event's time, which stops advancing when every
        # worker is gone; the wall clock makes a silent fleet read 0 rather than its last count.
        alive.add_metric([], sum(1 for worker in jobs.alive_workers(self.worker_timeout_s)
                                 if worker.last_ts >= horizon_ns))
        out.append(alive)
        stopped = GaugeMetricFamily(
            "wantel_workers_stopped",
            "Known workers whose latest word is WorkerStopped (a clean shutdown: a scale-down, "
            "never a lost worker).")
        stopped.add_metric([], sum(1 for worker in jobs.workers.values()
                                   if worker.gone == "stopped"))
        out.append(stopped)
        info = GaugeMetricFamily("wantel_build_info", "Versions of wantel, torch and diffusers.",
                                 labels=["version", "torch", "diffusers"])
        info.add_metric(list(build_info()), 1)
        out.append(info)
        folded = GaugeMetricFamily("wantel_models_folded",
                                   "Models whose series are added up under model=\"other\" "
                                   "(beyond the exporter's cap on model label values).")
        models = list(metrics.models)
        folded.add_metric([], max(0, len(models) - self.max_models))
        out.append(folded)
        if len(models) > self.max_models:
            fold_models(out, frozenset(models[:self.max_models]))
        return out

    def _job_families(self, metrics: MetricsState, jobs: JobsState,
                      throughput: ThroughputState, running_now: Mapping[str, int],
                      now: float) -> list[Metric]:
        total = CounterMetricFamily("wantel_jobs_total", "Jobs that ended, by outcome.",
                                    labels=["model", "task", "status"])
        values: dict[tuple[str, ...], int] = {}
        for series in metrics.jobs_total.values():
            model, task, _ = series.labels
            for status in STATUSES:
                values.setdefault((model, task, status), 0)
            values[series.labels] = series.value
        for labels, value in values.items():
            total.add_metric(list(labels), value)
        oom = CounterMetricFamily("wantel_jobs_oom", "Jobs that failed out of (device) memory.",
                                  labels=["model"])
        oom_values = dict.fromkeys((model for model, _, _ in values), 0)
        for series in metrics.jobs_oom.values():
            oom_values[series.labels[0]] = series.value
        for model, value in oom_values.items():
            oom.add_metric([model], value)
        running_by_model: dict[str, int] = dict.fromkeys(throughput.models, 0)
        for model, _, _ in values:
            running_by_model.setdefault(model, 0)
        running_by_model.update(running_now)
        running = GaugeMetricFamily("wantel_jobs_running", "Jobs running now.",
                                    labels=["model"])
        for model, count in running_by_model.items():
            running.add_metric([model], count)
        lost = GaugeMetricFamily(
            "wantel_jobs_lost",
            "Jobs running per the log whose worker, and the job, went silent past the liveness "
            f"timeout (lost mid-run), by worker; each counts for {LOST_WINDOW_S:g} s after it "
            "was last heard from.", labels=["model", "worker"])
        horizon_ns = (now - self.worker_timeout_s) * 1e9
        for (model, worker), count in sorted(
                _lost_jobs(jobs, horizon_ns, (now - LOST_WINDOW_S) * 1e9).items()):
            lost.add_metric([model, worker], count)
        frames = CounterMetricFamily("wantel_frames", "Video frames of completed jobs.",
                                     labels=["model"])
        seconds = CounterMetricFamily(
            "wantel_video_seconds",
            "Seconds of video of completed jobs (frames at their family's native rate: Wan "
            f"{VIDEO_FPS:g} fps, TI2V-5B 24, CogVideoX 8; none for images).",
            labels=["model"], unit="seconds")
        for model in running_by_model:  # every model known, from 0
            made = metrics.frames.get(model)
            frames.add_metric([model], made.value if made is not None else 0)
            seconds.add_metric([model], metrics.video_seconds.get(model, 0.0))
        return [
            total,
            oom,
            running,
            lost,
            frames,
            seconds,
            _histogram("wantel_job_duration_seconds",
                       "Duration of ended jobs, from start to end; exemplars name the trace.",
                       ["model", "task", "status"], DURATION_BUCKETS,
                       series=metrics.job_duration.values(), unit="seconds"),
            _histogram("wantel_queue_wait_seconds",
                       "Time from JobQueued to JobStarted (jobs that were queued).",
                       ["model"], DURATION_BUCKETS, series=metrics.queue_wait.values(),
                       unit="seconds"),
            _histogram("wantel_stage_duration_seconds", "Duration of pipeline stages.",
                       ["model", "stage"], DURATION_BUCKETS,
                       series=metrics.stage_duration.values(), unit="seconds"),
        ]

    def _running_job_families(self, jobs: JobsState, eta: EtaState,
                              horizon_ns: float) -> list[Metric]:
        labels = list(JOB_LABELS)
        progress = GaugeMetricFamily("wantel_job_progress_ratio",
                                     "Cost-weighted progress of a running job (0-1).",
                                     labels=labels, unit="ratio")
        remaining = GaugeMetricFamily("wantel_job_eta_seconds",
                                      "Expected remaining seconds of a running job.",
                                      labels=labels, unit="seconds")
        low = GaugeMetricFamily("wantel_job_eta_p10_seconds",
                                "The ETA's 10th percentile: the job is unlikely to end sooner.",
                                labels=labels, unit="seconds")
        high = GaugeMetricFamily("wantel_job_eta_p90_seconds",
                                 "The ETA's 90th percentile: the job is unlikely to end later.",
                                 labels=labels, unit="seconds")
        # The stall alert's clock: a timestamp, so ``time() - it`` needs no range window (a
        # ``changes()`` window saw one sample per window at a 1-2 min scrape interval, or on
        # Prometheus 3's left-open ranges, and paged on every job; and the progress gauge
        # moves only when an ETA is issued, every ~tenth of the loop).
        moved = GaugeMetricFamily(
            "wantel_job_last_progress_timestamp_seconds",
            "When a running job last made progress (its latest step, stage boundary, decode "
            "piece or its start), Unix seconds by its worker's clock: time() minus this is "
            "how long it has made none.", labels=labels, unit="seconds")
        shown = 0
        folded: list[str] = []
        for job in jobs.active:
            view = jobs.jobs[job]
            if view.status != "running" or not _heard_from(view, jobs, horizon_ns):
                continue
            point = current(eta, job)
            if point is None:
                continue
            if shown >= self.max_job_series:
                folded.append(job)
                continue
            shown += 1
            values = [job, eta.running[job].model, view.worker or ""]
            progress.add_metric(values, point.progress)
            # As of the job's latest event, not of the ETA's issue (about every tenth of the
            # loop): the steps since have already used that much of it (the worker's clock on
            # both sides), as the live page counts it down.
            left, p10, p90 = point.aged(max(0.0, ((view.last_ts or point.ts) - point.ts) / 1e9))
            remaining.add_metric(values, left)
            low.add_metric(values, p10)
            high.add_metric(values, p90)
            if view.last_ts is not None:  # steps, stages and lifecycle events move it
                moved.add_metric(values, view.last_ts / 1e9)
        folded_total = CounterMetricFamily(
            "wantel_series_folded",
            "Running jobs left without per-job series by the cardinality cap.")
        folded_total.add_metric([], self._count_folded(folded))
        return [progress, remaining, low, high, moved, folded_total]

    def _count_folded(self, folded: list[str]) -> int:
        """Count each job the first time it is folded away; forget jobs no longer folded."""
        with self._fold_lock:
            now = set(folded)
            self._folded_total += len(now - self._folded_now)
            self._folded_now = now
            return self._folded_total

    def _step_families(self, metrics: MetricsState, throughput: ThroughputState,
                       running: Mapping[str, int]) -> list[Metric]:
        steps = CounterMetricFamily("wantel_denoise_steps_total", "Denoising steps completed.",
                                    labels=["model"])
        for series in metrics.denoise_steps.values():
            steps.add_metric(list(series.labels), series.value)
        rate = GaugeMetricFamily("wantel_steps_per_second",
                                 "Smoothed denoising steps per second while the model has a "
                                 "running job (EMA of measured steps); 0 while none runs.",
                                 labels=["model"])
        for model, figures in throughput.models.items():
            if figures.ema is not None:
                rate.add_metric([model], figures.ema if running.get(model) else 0.0)
        return [
            steps,
            _histogram("wantel_denoise_step_duration_seconds",
                       "Device time of one denoising step; exemplars name the trace.",
                       ["model", "expert"], DURATION_BUCKETS,
                       series=metrics.step_duration.values(), unit="seconds"),
            rate,
        ]

    def _eta_families(self, eta: EtaState) -> list[Metric]:
        """How good past ETAs were, per model and progress bucket (``before_start`` too):
        the three families of :func:`_scored_families`, ETAs scored against the actual
        remaining time."""
        return _scored_families(
            "wantel_eta", ["model", "progress_bucket"], _eta_series(eta),
            error_help="Signed relative error of issued ETAs vs the actual remaining time, by "
            "progress.",
            covered_help="Scored ETAs whose actual remaining time fell inside their p10-p90 "
            "interval.",
            scored="scored ETAs")

    def _queue_families(self, states: Mapping[str, Any], now: float) -> list[Metric]:
        """Queue depth by queue and model, each live worker's predicted free time (seconds
        from now; 0 with a free slot), and how good past predicted starts and finishes were.

        The forecast is read at the scrape's wall clock
        (:func:`telemetry.projections.queues.forecast`); the start and finish scores are the
        :class:`~exporters.queue_scores.QueueScorer`'s, in the ETA error's shape
        (:func:`_scored_families`).
        """
        ahead = forecast(dict(states), now, worker_timeout_s=self.worker_timeout_s)
        depth = GaugeMetricFamily("wantel_queue_depth", "Jobs waiting in a queue.",
                                  labels=["queue", "model"])
        for (queue, model), count in sorted(ahead.depth.items()):
            depth.add_metric([queue, model], count)
        free = GaugeMetricFamily(
            "wantel_worker_predicted_free_seconds",
            "Seconds until a worker can take its next job (its earliest running job's "
            "predicted end; 0 with a free slot).", labels=["worker"], unit="seconds")
        for name, worker in sorted(ahead.workers.items()):
            if worker.free is not None:
                free.add_metric([name], max(worker.free.at - now, 0.0))
        starts, finishes = (self._queue_scores.read() if self._queue_scores is not None
                            else ({}, {}))
        labels = ["queue", "checkpoint"]
        return [
            depth,
            free,
            *_scored_families(
                "wantel_queue_start", labels, _queue_series(starts),
                error_help="Signed relative error of a queued job's predicted wait vs its "
                "actual wait, by checkpoint (first: its first prediction; half: the one in "
                "effect halfway through its wait).",
                covered_help="Scored predicted starts whose actual start fell inside their "
                "p10-p90 interval.",
                scored="scored predicted starts"),
            *_scored_families(
                "wantel_queue_finish", labels, _queue_series(finishes),
                error_help="Signed relative error of a queued job's predicted time to finish "
                "vs the actual, by checkpoint of its wait (the finish predicted with the start "
                "scored there), scored when it completes.",
                covered_help="Scored predicted finishes whose actual end fell inside their "
                "p10-p90 interval.",
                scored="scored predicted finishes"),
        ]

    def _memory_families(self, metrics: MetricsState, memory: MemoryState,
                         jobs: JobsState) -> list[Metric]:
        used = GaugeMetricFamily("wantel_device_memory_used_bytes",
                                 "Latest memory reading of a device, by source.",
                                 labels=[*DEVICE_LABELS, "source"], unit="bytes")
        total = GaugeMetricFamily("wantel_device_memory_total_bytes",
                                  "Total memory of a device.", labels=list(DEVICE_LABELS),
                                  unit="bytes")
        for device, readings in memory.devices.items():
            labels = _device_labels(device, metrics, jobs)
            for source, value in readings.used.items():
                used.add_metric([*labels, source], value)
            if readings.total is not None:
                total.add_metric(labels, readings.total)
        errors = HistogramMetricFamily(
            "wantel_memory_prediction_relative_error",
            "Signed relative error of completed jobs' predicted peak memory vs the observed "
            "peak, by the kind predicted.", labels=["model", "kind"])
        absolute = CounterMetricFamily(
            "wantel_memory_prediction_absolute_relative_error",
            "Sum of the absolute relative errors of scored peak-memory predictions.",
            labels=["model", "kind"])
        for model, by_kind in memory.errors.items():
            for kind, hist in by_kind.items():
                if hist.counts:
                    series = {"model": model, "kind": kind}
                    _add_histogram(errors, series, ERROR_EDGES, hist.counts, exemplars=None,
                                   sum_value=None)
                    absolute.samples.append(Sample(absolute.name + "_total", series,
                                                   hist.sum_abs))
        return [
            _histogram("wantel_job_peak_memory_bytes", "Peak memory of ended jobs, by kind.",
                       ["model", "kind"], MEMORY_BUCKETS,
                       series=metrics.peak_memory.values(), unit="bytes"),
            used,
            total,
            errors,
            absolute,
        ]

    def _gpu_families(self, metrics: MetricsState, jobs: JobsState) -> list[Metric]:
        """GPU gauges and throttle counts, only where NVML reported something."""
        out: list[Metric] = []
        labels = list(DEVICE_LABELS)
        utilization = GaugeMetricFamily("wantel_gpu_utilization_ratio",
                                        "GPU utilization (0-1) at the latest NVML sample.",
                                        labels=labels, unit="ratio")
        temperature = GaugeMetricFamily("wantel_gpu_temperature_celsius",
                                        "GPU temperature at the latest NVML sample.",
                                        labels=labels, unit="celsius")
        power = GaugeMetricFamily("wantel_gpu_power_watts",
                                  "GPU power draw at the latest NVML sample.",
                                  labels=labels, unit="watts")
        for device, reading in metrics.gpus.items():
            values = _device_labels(device, metrics, jobs)
            if reading.utilization_ratio is not None:
                utilization.add_metric(values, reading.utilization_ratio)
            if reading.temperature_celsius is not None:
                temperature.add_metric(values, reading.temperature_celsius)
            if reading.power_watts is not None:
                power.add_metric(values, reading.power_watts)
        out.extend(f for f in (utilization, temperature, power) if f.samples)
        if metrics.throttle_events:
            throttles = CounterMetricFamily(
                "wantel_gpu_throttle_events_total",
                "Times a clock-throttle reason newly appeared in a device's samples.",
                labels=[*labels, "reason"])
            for series in metrics.throttle_events.values():
                device, reason = series.labels
                throttles.add_metric([*_device_labels(device, metrics, jobs), reason],
                                     series.value)
            out.append(throttles)
        return out

    def _health_families(self, health: Health, drops: HealthState, now: float) -> list[Metric]:
        events = CounterMetricFamily("wantel_events_total", "Events applied, by type.",
                                     labels=["type"])
        for kind, count in sorted(health.events_by_type.items()):
            events.add_metric([kind], count)
        dropped = CounterMetricFamily("wantel_events_dropped_total",
                                      "Events the emitters dropped under overload, by reason.",
                                      labels=["reason"])
        for reason, count in sorted(drops.dropped().items()):
            dropped.add_metric([reason], count)
        quarantined = CounterMetricFamily("wantel_log_quarantined",
                                          "Damaged log records skipped (quarantined).")
        quarantined.add_metric([], health.quarantined_records)
        gaps = CounterMetricFamily(
            "wantel_log_gaps", "Holes in the log's positions (a deleted or emptied segment, a "
            "lost tail): positions it gave out and no longer holds.")
        gaps.add_metric([], health.gaps)
        gap_positions = CounterMetricFamily(
            "wantel_log_gap_positions", "Positions inside the log's holes (events lost, or "
            "reserved and never written before a power cut).")
        gap_positions.add_metric([], health.gap_positions)
        errors = CounterMetricFamily("wantel_projection_errors_total",
                                     "Events a projection raised on (the others carried on).",
                                     labels=["projection"])
        for name, count in sorted(health.projection_errors.items()):
            errors.add_metric([name], count)
        lag = GaugeMetricFamily("wantel_projection_lag_seconds",
                                "Wall-clock seconds since the newest event applied.",
                                unit="seconds")
        if health.last_event_ts is not None:
            lag.add_metric([], max(0.0, now - health.last_event_ts / 1e9))
        backlog = GaugeMetricFamily(
            "wantel_projection_backlog_events",
            "About how many events the log held beyond the projections' last read (0: they "
            "had read everything stored; an idle fleet's lag grows, its backlog stays 0).")
        backlog.add_metric([], self._backlog.behind)
        return [events, dropped, quarantined, gaps, gap_positions, errors, lag, backlog]


def make_registry(runner: ProjectionRunner, **options: Any) -> CollectorRegistry:
    """A registry holding only a :class:`WantelCollector` over ``runner`` (the one place a
    registry is built; ``options`` go to the collector)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WantelCollector(runner, **options))
    return registry


class Exposition:
    """``/metrics`` over one runner: its registry and its encoder, built together by the app.

    The encoder keeps formatted label sets between scrapes (series are stable, so after the
    first scrape nearly every lookup hits); that state lives here, one per served app, not in
    the module.
    """

    def __init__(self, runner: ProjectionRunner, **options: Any) -> None:
        self.registry = make_registry(runner, **options)
        self.encoder = Encoder()

    def render(self, accept_header: str | None) -> tuple[bytes, str]:
        """The exposition body and its content type for a scraper's ``Accept`` header."""
        return render(self.registry, accept_header, self.encoder)


def render(registry: CollectorRegistry, accept_header: str | None,
           encoder: Encoder | None = None) -> tuple[bytes, str]:
    """The exposition body and its content type for a scraper's ``Accept`` header.

    OpenMetrics (with exemplars) when the scraper accepts it — Prometheus does by itself — else
    the classic text format, which is what ``promtool check metrics`` and curl get. The format
    is negotiated by prometheus_client (:func:`~prometheus_client.exposition.choose_encoder`);
    the bytes come from ``encoder`` (:class:`Encoder`; a fresh one if not given), which writes
    exactly what prometheus_client's encoders write, a few times faster (``docs/design-notes.md``
    has the measurement).
    """
    library_encoder, content_type = choose_encoder(accept_header or "")
    openmetrics = content_type.startswith("application/openmetrics-text")
    metrics = list(registry.collect())
    body = (encoder or Encoder()).encode(metrics, openmetrics=openmetrics)
    if body is None:  # something the fast path does not handle: the library's own encoder
        body = library_encoder(_Collected(metrics))
    return body, content_type


class _Collected(Collector):
    """Families already collected, offered again to an encoder without collecting twice."""

    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        """The stored families."""
        return self.metrics


def fold_models(families: list[Metric], kept: frozenset[str]) -> None:
    """Give every sample whose ``model`` is not in ``kept`` the model ``other``, adding up the
    samples that then share a name and labels (counters, histogram buckets, sums and counts
    add; so do the gauges that carry a model: jobs running or lost, steps/s, queue depth —
    the per-job gauges never collide, their ``job_id`` differs). In place."""
    for family in families:
        if all(sample.labels.get("model", OTHER_MODEL) in kept or
               sample.labels.get("model") == OTHER_MODEL for sample in family.samples):
            continue
        merged: dict[tuple[str, tuple[tuple[str, str], ...]], Sample] = {}
        for original in family.samples:
            model = original.labels.get("model")
            sample = (original if model is None or model in kept else
                      original._replace(labels={**original.labels, "model": OTHER_MODEL}))
            key = (sample.name, tuple(sorted(sample.labels.items())))
            before = merged.get(key)
            merged[key] = sample if before is None else before._replace(
                value=before.value + sample.value,
                exemplar=before.exemplar or sample.exemplar)
        family.samples = list(merged.values())


_PLAIN_TYPES: Final = frozenset({"counter", "gauge", "histogram", "unknown"})
_LEGACY_NAME: Final = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def _escape_value(value: str) -> str:
    """A label value as both exposition formats write it: ``\\``, newline and ``"`` escaped."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _go_float(value: float) -> str:
    """``floatToGoString``: Python's repr except ±Inf, NaN and large positive values."""
    number = float(value)
    if -1e6 < number < 1e6:  # repr is already Go's format here (and NaN fails the test)
        return repr(number)
    go_string: Callable[[float], str] = floatToGoString  # untyped upstream
    return go_string(number)


class Encoder:
    """prometheus_client's text and OpenMetrics encoders, byte for byte, with label sets
    formatted once.

    prometheus_client re-validates and re-escapes every label name of every sample (~5-10 µs a
    sample); with a histogram family per model and stage, its OpenMetrics encoder alone takes
    longer than the 10 ms a scrape may cost at 10,000 finished jobs (measured in
    ``docs/design-notes.md``). This writes the same bytes with each label set formatted once
    and kept (up to ``max_label_sets``, then the cache starts over). It covers what wantel
    emits — counters, gauges and classic histograms with legacy-valid names, exemplars, no
    timestamps — and :meth:`encode` returns ``None`` for anything else (:func:`render` then uses
    the library's encoder). A test holds it to the library's bytes.
    """

    def __init__(self, *, max_label_sets: int = 100_000) -> None:
        self.max_label_sets = max_label_sets
        #: Label sets already formatted (``{a="x",b="y"}``), keyed by their items in order.
        self._label_strings: dict[tuple[tuple[str, str], ...], str] = {}

    def _label_string(self, items: tuple[tuple[str, str], ...]) -> str:
        """``{k="v",…}`` sorted by name (``""`` without labels), formatted once per label set."""
        cache = self._label_strings
        text = cache.get(items)
        if text is None:
            if len(cache) >= self.max_label_sets:
                cache.clear()
            inner = ",".join(f'{name}="{_escape_value(value)}"' for name, value in sorted(items))
            text = cache[items] = "{" + inner + "}" if inner else ""
        return text

    def encode(self, metrics: Iterable[Metric], *, openmetrics: bool) -> bytes | None:
        """The exposition of ``metrics``, byte for byte what prometheus_client writes, or
        ``None`` if a family or sample is of a kind this does not write."""
        label_string = self._label_string
        out: list[str] = []
        append = out.append
        for metric in metrics:
            name, kind = metric.name, metric.type
            if kind not in _PLAIN_TYPES or not _LEGACY_NAME.match(name):
                return None
            if openmetrics:
                append(f"# HELP {name} {_escape_value(metric.documentation)}\n"
                       f"# TYPE {name} {kind}\n")
                if metric.unit:
                    append(f"# UNIT {name} {metric.unit}\n")
            else:
                shown = name + "_total" if kind == "counter" else name
                doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
                append(f"# HELP {shown} {doc}\n"
                       f"# TYPE {shown} {'untyped' if kind == 'unknown' else kind}\n")
            for sample in metric.samples:
                if sample.timestamp is not None or sample.native_histogram is not None:
                    return None
                if not openmetrics and sample.name.endswith(("_created", "_gsum", "_gcount")):
                    return None
                labels = label_string(tuple(sample.labels.items()))
                exemplar = sample.exemplar
                if exemplar is None or not openmetrics:
                    append(f"{sample.name}{labels} {_go_float(sample.value)}\n")
                    continue
                if not ((kind == "histogram" and sample.name.endswith("_bucket"))
                        or (kind == "counter" and sample.name.endswith("_total"))):
                    return None
                stamp = "" if exemplar.timestamp is None else f" {exemplar.timestamp}"
                append(f"{sample.name}{labels} {_go_float(sample.value)} # "
                       f"{label_string(tuple(exemplar.labels.items())) or '{}'} "
                       f"{_go_float(exemplar.value)}{stamp}\n")
        if openmetrics:
            append("# EOF\n")
        return "".join(out).encode("utf-8")


__all__ = ["Encoder", "Exposition", "WantelCollector", "build_info", "make_registry", "render"]
