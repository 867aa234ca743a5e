"""What wantel's six dashboards show: panels as plain data, one question each.

Kept apart from :mod:`dashboards.build` (which turns them into Grafana JSON with the official
``grafana-foundation-sdk``) so the panels read as a list of questions and PromQL, and so
``docs/dashboards.md`` and the tests can walk the same list. Every panel's ``question`` becomes
its Grafana description: the hover text says what the panel answers.

Conventions, so every query runs unchanged against a real Prometheus once template variables
are substituted (the end-to-end test does exactly that): ``$model``, ``$device`` and ``$job``
are matched with ``=~`` / ``=``; rates use ``$__rate_interval``; windowed statistics that need
more history than a scrape interval use the ``$window`` variable.

Every dashboard filters by the scrape target (``$instance``) as well as by model, so one
Grafana serves a fleet of wantel servers; per-job series carry ``job_id`` and ``worker``.
Thresholds are set on every panel (:attr:`Panel.thresholds`, base green unless said): Grafana's
own default (red at 80) means nothing for ratios of 0-1 or for counts.

Gaps in the exported metrics, and what is shown instead (see ``docs/dashboards.md``):
throughput is steps/s, frames/s and jobs/min (frames and seconds of video are counted when a
job completes); the ETA's p10–p90
interval is exported for running jobs (``wantel_job_eta_p10_seconds`` / ``_p90_seconds``, drawn
by the job drill-down), and how often it covered the actual time and the sum of absolute errors
are counters beside the signed-error histogram, so the ETA quality dashboard shows interval
coverage and mean absolute error per bucket over the hour its alert watches; stage, step and
memory series carry no ``job_id`` label, so the job drill-down shows them for the job's model
over the job's time range. Out-of-memory failures are exported apart (``wantel_jobs_oom_total``) and
shown beside the other failures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

from dashboards.rules import RuleParams

PanelKind = Literal["timeseries", "stat", "bargauge"]

#: Jaeger's UI as compose publishes it: the default trace backend of the job drill-down.
JAEGER_URL: Final = "http://localhost:16686"
#: Span attribute that carries the job id (``exporters/otel.py``).
JOB_ATTRIBUTE: Final = "wantel.job"
#: Stands for the trace link in specs; :func:`trace_link` resolves it at build time.
TRACE_LINK: Final = "wantel:trace-link"
#: Where a trace link puts the job id, in a ``--trace-url`` template.
JOB_ID_FIELD: Final = "{job_id}"


@dataclass(frozen=True)
class BuildOptions:
    """What a deployment sets at ``wantel dashboards build`` time.

    ``trace_url``: Jaeger's UI base URL (the link searches its traces by the job's
    ``wantel.job`` tag), or any URL template holding ``{job_id}`` — Grafana Explore over a
    Tempo data source, Tempo's or another UI (see ``docs/dashboards.md``). ``datasource``: the
    Prometheus data source the ``datasource`` variable selects by default (its name in Grafana).
    ``scrape_job``: the scrape job the telemetry-health dashboard selects by default; ``None``
    selects all of them (the variable lists every job that scrapes wantel, from
    ``wantel_build_info``).
    """

    trace_url: str = JAEGER_URL
    datasource: str = "Prometheus"
    scrape_job: str | None = None


def trace_link(trace_url: str, job_id: str = "${job_id}") -> str:
    """The link to a job's traces: Jaeger's search by tag, or ``trace_url`` with ``{job_id}``
    replaced (by the Grafana variable, URL-encoded by Grafana)."""
    if JOB_ID_FIELD in trace_url:
        return trace_url.replace(JOB_ID_FIELD, job_id)
    return (trace_url.rstrip("/") + "/search?service=wantel&tags=%7B%22" + JOB_ATTRIBUTE
            + "%22%3A%22" + job_id + "%22%7D")


@dataclass(frozen=True)
class Query:
    """One PromQL target of a panel."""

    expr: str
    legend: str = "__auto"
    #: Ask Prometheus for exemplars (trace ids) with the series; Grafana links them to Jaeger.
    exemplar: bool = False


@dataclass(frozen=True)
class Link:
    """A link shown on a panel's header."""

    title: str
    url: str


@dataclass(frozen=True)
class Panel:
    """A panel: the question it answers, its queries and how to draw them."""

    title: str
    question: str
    queries: tuple[Query, ...]
    kind: PanelKind = "timeseries"
    unit: str = "short"
    width: int = 12
    height: int = 8
    minimum: float | None = None
    maximum: float | None = None
    #: Shown instead of "No data" where no series is the normal, healthy case (no drops yet).
    no_value: str | None = None
    links: tuple[Link, ...] = ()
    stack: bool = False
    #: A dashed horizontal line at this value (a goal, or an alert's threshold); time series
    #: only. Drawn by Grafana from the panel's thresholds, so it needs no query of its own.
    line_at: float | None = None
    #: Threshold steps above the base colour, as (value, colour): what colours a stat or bar
    #: gauge. Empty: the base colour everywhere (never Grafana's default red at 80).
    thresholds: tuple[tuple[float, str], ...] = ()
    #: The colour below the first step (red where a high value is the good one).
    base_color: str = "green"


@dataclass(frozen=True)
class Variable:
    """A template variable: ``query`` (label values), ``custom`` (choices) or ``datasource``."""

    name: str
    label: str
    kind: Literal["query", "custom", "datasource"]
    query: str = ""
    multi: bool = False
    include_all: bool = False
    hidden: bool = False
    choices: tuple[str, ...] = ()
    default: str | None = None


@dataclass(frozen=True)
class Row:
    """A titled row of panels."""

    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Dashboard:
    """One dashboard: file name, uid, title, variables, rows."""

    slug: str
    uid: str
    title: str
    description: str
    variables: tuple[Variable, ...]
    rows: tuple[Row, ...]
    tags: tuple[str, ...] = ("wantel",)
    time_from: str = "now-1h"
    links: tuple[Link, ...] = field(default=())

    @property
    def panels(self) -> tuple[Panel, ...]:
        """Every panel, row by row."""
        return tuple(panel for row in self.rows for panel in row.panels)


DATASOURCE: Final = Variable("datasource", "Prometheus", "datasource", query="prometheus")
#: The wantel servers scraped (any scrape job): every dashboard filters by them.
INSTANCE: Final = Variable("instance", "Instance", "query",
                           query="label_values(wantel_build_info, instance)",
                           multi=True, include_all=True)
MODEL: Final = Variable("model", "Model", "query",
                        query="label_values(wantel_jobs_running, model)",
                        multi=True, include_all=True)
WORKER: Final = Variable("worker", "Worker", "query",
                         query="label_values(wantel_job_progress_ratio, worker)",
                         multi=True, include_all=True)
#: Window of statistics that need more than a scrape interval of history (quantiles of rare
#: events, counts): a variable, so a user widens it on a quiet fleet.
WINDOW: Final = Variable("window", "Window", "custom", choices=("15m", "1h", "6h", "1d", "7d"),
                         default="1h")
INST: Final = 'instance=~"$instance"'
M: Final = 'model=~"$model",' + INST
RATE: Final = "$__rate_interval"
#: Units Grafana has no id for, written as its custom ``suffix:`` units.
STEPS_PER_S: Final = "suffix: steps/s"
FRAMES_PER_S: Final = "suffix: frames/s"
JOBS_PER_MIN: Final = "suffix: jobs/min"
EVENTS_PER_S: Final = "suffix: events/s"


def _quantile(q: float, metric: str, by: str, selector: str, window: str = RATE) -> str:
    return (f"histogram_quantile({q:g}, sum by ({by}, le) "
            f"(rate({metric}_bucket{{{selector}}}[{window}])))")


FLEET: Final = Dashboard(
    slug="fleet-overview", uid="wantel-fleet", title="wantel / Fleet overview",
    description="Throughput, jobs, durations and failures of every model the fleet runs.",
    variables=(DATASOURCE, INSTANCE, MODEL, WORKER, WINDOW),
    rows=(
        Row("Now", (
            Panel("Steps per second", "How fast is the fleet denoising right now (rate of "
                  "wantel_denoise_steps_total over the selected instances and models)?",
                  (Query(f"sum(rate(wantel_denoise_steps_total{{{M}}}[{RATE}]))", "steps/s"),),
                  kind="stat", unit=STEPS_PER_S, width=6, height=4, minimum=0),
            Panel("Running jobs", "How many jobs are running right now?",
                  (Query(f"sum(wantel_jobs_running{{{M}}})", "running"),),
                  kind="stat", unit="none", width=6, height=4, minimum=0),
            Panel("Workers alive", "How many workers heartbeat (heard from within 60 s)? "
                  "Each wantel server counts the workers writing to its log.",
                  (Query(f"sum(wantel_workers_alive{{{INST}}})", "workers"),),
                  kind="stat", unit="none", width=6, height=4, minimum=0),
            Panel("Jobs lost mid-run", "How many jobs were lost in the last hour because their "
                  "worker went silent while they ran (WantelJobLost pages on any)?",
                  (Query(f"sum(wantel_jobs_lost{{{M}}}) or vector(0)", "lost"),),
                  kind="stat", unit="none", width=6, height=4, minimum=0,
                  thresholds=((1, "red"),)),
            Panel("Jobs ended in range", "How many jobs ended in the time range, by outcome?",
                  (Query(f"sum by (status) (increase(wantel_jobs_total{{{M}}}[$__range]))",
                         "{{status}}"),),
                  kind="stat", unit="none", width=24, height=4, minimum=0),
        )),
        Row("Throughput", (
            Panel("Steps per second by model",
                  "Which models is the fleet spending its denoising on?",
                  (Query(f"sum by (model) (rate(wantel_denoise_steps_total{{{M}}}[{RATE}]))",
                         "{{model}}"),),
                  unit=STEPS_PER_S, stack=True, minimum=0),
            Panel("Frames per second by model",
                  "How many video frames does the fleet produce per second (frames of "
                  "completed jobs, counted when each job completes)?",
                  (Query(f"sum by (model) (rate(wantel_frames_total{{{M}}}[{RATE}]))",
                         "{{model}}"),),
                  unit=FRAMES_PER_S, stack=True, minimum=0),
            Panel("Jobs per minute by status",
                  "How many jobs complete, fail or are cancelled per minute?",
                  (Query(f"sum by (status) (rate(wantel_jobs_total{{{M}}}[{RATE}])) * 60",
                         "{{status}}"),),
                  unit=JOBS_PER_MIN, stack=True, minimum=0),
            Panel("Running jobs by model", "Which models are busy, and since when?",
                  (Query(f"sum by (model) (wantel_jobs_running{{{M}}})", "{{model}}"),),
                  unit="none", stack=True, minimum=0),
            Panel("Smoothed steps per second by model",
                  "What step rate does each model reach while it runs (EMA of measured step "
                  "times; 0 while none of its jobs runs)?",
                  (Query(f"max by (model) (wantel_steps_per_second{{{M}}})", "{{model}}"),),
                  unit=STEPS_PER_S, minimum=0),
            Panel("Progress of running jobs",
                  "How far is each running job, on which worker (filter with $worker)?",
                  (Query(f'max by (job_id, worker) (wantel_job_progress_ratio{{{M},'
                         f'worker=~"$worker"}})', "{{job_id}} ({{worker}})"),),
                  unit="percentunit", minimum=0, maximum=1),
        )),
        Row("Latency and failures", (
            Panel("Job duration p50 / p95 by model",
                  "How long does a completed job take, typically and at worst?",
                  (Query(_quantile(0.5, "wantel_job_duration_seconds", "model",
                                   f'status="completed",{M}', "$window"), "p50 {{model}}"),
                   Query(_quantile(0.95, "wantel_job_duration_seconds", "model",
                                   f'status="completed",{M}', "$window"), "p95 {{model}}")),
                  unit="s", minimum=0),
            Panel("Failed and cancelled jobs",
                  "Are jobs failing, and which models? (Out-of-memory failures are among the "
                  "failed and drawn apart as oom; the WantelJobOutOfMemory alert pages on any.)",
                  (Query(f'sum by (model, status) (increase(wantel_jobs_total'
                         f'{{status=~"failed|cancelled",{M}}}[$window]))',
                         "{{status}} {{model}}"),
                   Query(f"sum by (model) (increase(wantel_jobs_oom_total{{{M}}}[$window]))",
                         "oom {{model}}")),
                  unit="none", no_value="0", minimum=0),
            Panel("Mean step time by model and expert",
                  "How long does one denoising step take, per expert of Wan 2.2 A14B?",
                  (Query(f"sum by (model, expert) (rate(wantel_denoise_step_duration_seconds_sum"
                         f"{{{M}}}[{RATE}]))\n/ sum by (model, expert) (rate("
                         f"wantel_denoise_step_duration_seconds_count{{{M}}}[{RATE}]))",
                         "{{model}} {{expert}}"),),
                  unit="s", minimum=0),
            Panel("Stage time p50 by stage",
                  "Where does a job's time go: load, encode, denoise, decode or save?",
                  (Query(_quantile(0.5, "wantel_stage_duration_seconds", "stage", M,
                                   "$window"), "{{stage}}"),),
                  unit="s", minimum=0),
        )),
    ),
)

JOB_VAR: Final = Variable("job_id", "Job", "query",
                          query=f"label_values(wantel_job_progress_ratio{{{INST}}}, job_id)")
JOB_MODEL: Final = Variable("model", "Model", "query",
                            query='label_values(wantel_job_progress_ratio{job_id="$job_id"}, '
                                  'model)', hidden=True)
J: Final = 'job_id="$job_id"'

JOB: Final = Dashboard(
    slug="job-drilldown", uid="wantel-job", title="wantel / Job drill-down",
    description="One running job: progress, ETA, and its model's stage, step and memory "
                "figures over the job's time range; its trace in the trace backend.",
    variables=(DATASOURCE, INSTANCE, JOB_VAR, JOB_MODEL),
    time_from="now-15m",
    links=(Link("Traces of this job", TRACE_LINK),),
    rows=(
        Row("Progress", (
            Panel("Progress", "How far is the job (weighted by each stage's expected cost)?",
                  (Query(f"max by (job_id) (wantel_job_progress_ratio{{{J}}})", "progress"),),
                  unit="percentunit", minimum=0, maximum=1,
                  links=(Link("Traces of this job", TRACE_LINK),)),
            Panel("ETA with its p10-p90 interval (remaining seconds)",
                  "When will the job finish, how sure is the estimate, and how did it move as "
                  "the job ran?",
                  (Query(f"max by (job_id) (wantel_job_eta_seconds{{{J}}})", "ETA"),
                   Query(f"max by (job_id) (wantel_job_eta_p10_seconds{{{J}}})", "p10"),
                   Query(f"max by (job_id) (wantel_job_eta_p90_seconds{{{J}}})", "p90")),
                  unit="s", minimum=0),
        )),
        Row("The job's model over the job's time range", (
            Panel("Stage durations (p50, model)",
                  "How long do this model's stages take? (Stage series carry no job_id label: "
                  "the figures are the model's over the time range.)",
                  (Query(_quantile(0.5, "wantel_stage_duration_seconds", "stage",
                                   f'model="$model",{INST}', "$__range"), "{{stage}}"),),
                  kind="bargauge", unit="s", minimum=0),
            Panel("Step duration (model, with trace exemplars)",
                  "How long do this model's steps take, per expert? Exemplar dots carry "
                  "trace_id: click one to open that job's trace (the data source's exemplar "
                  "link).",
                  (Query(_quantile(0.5, "wantel_denoise_step_duration_seconds", "expert",
                                   f'model="$model",{INST}'), "p50 {{expert}}", exemplar=True),
                   Query(_quantile(0.95, "wantel_denoise_step_duration_seconds", "expert",
                                   f'model="$model",{INST}'), "p95 {{expert}}")),
                  unit="s", minimum=0),
            Panel("Device memory over the job",
                  "How much memory did the devices of the selected instances use while the "
                  "job ran?",
                  (Query(f"max by (instance, device, source) "
                         f"(wantel_device_memory_used_bytes{{{INST}}})",
                         "{{instance}} {{device}} {{source}}"),),
                  unit="bytes", minimum=0),
            Panel("Peak memory per job (p95, model)",
                  "How much memory do jobs of this model peak at?",
                  (Query(_quantile(0.95, "wantel_job_peak_memory_bytes", "kind",
                                   f'model="$model",{INST}', "$__range"), "{{kind}}"),),
                  kind="bargauge", unit="bytes", minimum=0),
        )),
    ),
)

DEVICE: Final = Variable("device", "Device", "query",
                         query=f"label_values(wantel_device_memory_used_bytes{{{INST}}}, device)",
                         multi=True, include_all=True)
D: Final = 'device=~"$device",' + INST
#: The labels a device's series carry (wantel's name, and DCGM exporter's for the same GPU).
BY_DEVICE: Final = "instance, device, gpu, UUID, Hostname"
DEVICE_LEGEND: Final = "{{instance}} {{device}}"

GPU: Final = Dashboard(
    slug="gpu-memory", uid="wantel-gpu", title="wantel / GPU and memory",
    description="Device memory, per-job peaks, headroom, and NVML utilisation, temperature, "
                "power and throttling. Device series carry DCGM exporter's gpu, UUID and "
                "Hostname labels, so DCGM panels can be joined on them.",
    variables=(DATASOURCE, INSTANCE, DEVICE, MODEL, WINDOW),
    rows=(
        Row("Memory", (
            Panel("Device memory used vs total", "How full is each device's memory?",
                  (Query(f"max by ({BY_DEVICE}, source) "
                         f"(wantel_device_memory_used_bytes{{{D}}})",
                         f"used {DEVICE_LEGEND} ({{{{source}}}})"),
                   Query(f"max by ({BY_DEVICE}) (wantel_device_memory_total_bytes{{{D}}})",
                         f"total {DEVICE_LEGEND}")),
                  unit="bytes", minimum=0),
            Panel("Headroom", "How much device memory is left for the next, larger job?",
                  (Query(f"max by ({BY_DEVICE}) (wantel_device_memory_total_bytes{{{D}}})\n"
                         f"- on ({BY_DEVICE}) max by ({BY_DEVICE}) "
                         f'(wantel_device_memory_used_bytes{{{D},source=~"nvml|torch_reserved"}})',
                         DEVICE_LEGEND),),
                  unit="bytes", minimum=0),
            Panel("Peak memory per job by model (p95)",
                  "How much memory do jobs of each model peak at (torch allocated and reserved, "
                  "whole device, or host RSS on CPU)?",
                  (Query(_quantile(0.95, "wantel_job_peak_memory_bytes", "model, kind", M,
                                   "$window"), "{{model}} {{kind}}"),),
                  unit="bytes", minimum=0),
            Panel("Memory used, share of total",
                  "Which device is closest to its limit? Orange from 90 %; red from 95 %, where "
                  "WantelGpuMemoryNearLimit fires.",
                  (Query(f'max by ({BY_DEVICE}) (wantel_device_memory_used_bytes{{{D},'
                         f'source=~"nvml|torch_reserved"}})\n/ on ({BY_DEVICE}) '
                         f"max by ({BY_DEVICE}) (wantel_device_memory_total_bytes{{{D}}})",
                         DEVICE_LEGEND),),
                  kind="bargauge", unit="percentunit", minimum=0, maximum=1,
                  thresholds=((0.9, "orange"), (RuleParams().memory_ratio, "red"))),
        )),
        Row("GPU (NVML)", (
            Panel("Utilisation", "Is the GPU busy, or waiting on the CPU, the disk or offload?",
                  (Query(f"max by ({BY_DEVICE}) (wantel_gpu_utilization_ratio{{{D}}})",
                         DEVICE_LEGEND),),
                  unit="percentunit", minimum=0, maximum=1, width=6),
            Panel("Temperature", "Is a GPU running hot enough to throttle (orange from 80 °C, "
                  "red from 87 °C, where data-centre GPUs begin to slow down)?",
                  (Query(f"max by ({BY_DEVICE}) (wantel_gpu_temperature_celsius{{{D}}})",
                         DEVICE_LEGEND),),
                  unit="celsius", width=6, minimum=0, thresholds=((80, "orange"), (87, "red"))),
            Panel("Power", "How much power does each GPU draw (NVML's reading at the latest "
                  "sample)?",
                  (Query(f"max by ({BY_DEVICE}) (wantel_gpu_power_watts{{{D}}})",
                         DEVICE_LEGEND),),
                  unit="watt", width=6, minimum=0),
            Panel("Throttle events", "Are clocks being throttled, and why (power, thermal)?",
                  (Query(f"sum by (instance, device, reason) (increase("
                         f"wantel_gpu_throttle_events_total{{{D}}}[$window]))",
                         "{{instance}} {{device}} {{reason}}"),),
                  unit="none", width=6, no_value="0", minimum=0),
        )),
    ),
)

ETA_M: Final = M
_ETA: Final = "wantel_eta_relative_error_bucket"


def _within(tolerance: str) -> str:
    """Share of ETAs whose signed error lies in (−tolerance, +tolerance], by progress bucket."""
    inc = "sum by (progress_bucket) (increase(" + _ETA + '{{{m},le="{le}"}}[$window]))'
    return (f"({inc.format(m=ETA_M, le=tolerance)}\n - {inc.format(m=ETA_M, le='-' + tolerance)})"
            f"\n/ {inc.format(m=ETA_M, le='+Inf')}")


#: The window of the coverage and absolute-error panels and the buckets the alert pools: those
#: ``WantelEtaUnreliable`` judges (``dashboards.rules``), so the panels show what the alert sees.
_RULES: Final = RuleParams()
ETA_ALERT_WINDOW: Final = _RULES.eta_quality_window
ETA_UNPOOLED: Final = _RULES.eta_unpooled_bucket
ETA_POOLED: Final = f'progress_bucket!="{ETA_UNPOOLED}"'


def _per_scored_eta(counter: str, by: str, selector: str = ETA_M) -> str:
    """``counter``'s increase per scored ETA (the histogram's ``+Inf`` bucket) over the hour."""
    return (f"sum by ({by}) (increase({counter}{{{selector}}}[{ETA_ALERT_WINDOW}]))\n"
            f'/ sum by ({by}) (increase({_ETA}{{{selector},le="+Inf"}}[{ETA_ALERT_WINDOW}]))')


ETA: Final = Dashboard(
    slug="eta-quality", uid="wantel-eta", title="wantel / ETA quality",
    description="How far to trust the ETA at each point of a job: signed relative error of "
                "every ETA issued during completed jobs, by progress bucket.",
    variables=(DATASOURCE, INSTANCE, MODEL, WINDOW),
    time_from="now-6h",
    rows=(
        Row("Residuals", (
            Panel("Median signed error by progress bucket",
                  "Are ETAs biased at each stage of a job? Negative: the ETA was too short.",
                  (Query(_quantile(0.5, "wantel_eta_relative_error", "progress_bucket", ETA_M,
                                   "$window"), "{{progress_bucket}}"),),
                  unit="percentunit"),
            Panel("Error spread (p10 / p90) by progress bucket",
                  "How wide is the error distribution at each stage of a job?",
                  (Query(_quantile(0.1, "wantel_eta_relative_error", "progress_bucket", ETA_M,
                                   "$window"), "p10 {{progress_bucket}}"),
                   Query(_quantile(0.9, "wantel_eta_relative_error", "progress_bucket", ETA_M,
                                   "$window"), "p90 {{progress_bucket}}")),
                  unit="percentunit"),
            Panel("Error distribution (all progress)",
                  "How many ETAs fell in each error bucket (cumulative, ≤ le)?",
                  (Query(f"sum by (le) (increase({_ETA}{{{ETA_M}}}[$window]))", "≤ {{le}}"),),
                  kind="bargauge", unit="none", minimum=0),
            Panel("ETAs scored per progress bucket",
                  "How much evidence stands behind each bucket's figures?",
                  (Query(f'sum by (progress_bucket) (increase({_ETA}{{{ETA_M},le="+Inf"}}'
                         "[$window]))", "{{progress_bucket}}"),),
                  kind="bargauge", unit="none", minimum=0),
        )),
        Row("Accuracy over time", (
            Panel("ETAs within ±10 %",
                  "What share of ETAs landed within 10 % of the actual remaining time?",
                  (Query(_within("0.1"), "{{progress_bucket}}"),),
                  unit="percentunit", minimum=0, maximum=1),
            Panel("ETAs within ±25 %",
                  "What share of ETAs landed within 25 %? (The ETA drift alert watches this "
                  "share at 10-25 % progress.)",
                  (Query(_within("0.25"), "{{progress_bucket}}"),),
                  unit="percentunit", minimum=0, maximum=1),
        )),
        Row("Interval coverage and absolute error (what WantelEtaUnreliable watches)", (
            Panel(f"Interval coverage ({ETA_ALERT_WINDOW}), by bucket",
                  "How often did the actual remaining time fall inside the ETA's p10-p90 "
                  "interval, per model and progress bucket? The dashed line is the 80 % an "
                  "honest p10-p90 interval covers. The alert series pools every bucket but "
                  f"{ETA_UNPOOLED}; WantelEtaUnreliable fires below "
                  f"{_RULES.eta_min_coverage * 100:g} %.",
                  (Query(_per_scored_eta("wantel_eta_interval_covered_total",
                                         "model, progress_bucket"),
                         "{{model}} {{progress_bucket}}"),
                   Query(_per_scored_eta("wantel_eta_interval_covered_total", "model",
                                         f"{ETA_M},{ETA_POOLED}"),
                         "{{model}} alert (all but " + ETA_UNPOOLED + ")")),
                  unit="percentunit", minimum=0, maximum=1, line_at=0.8),
            Panel(f"Mean absolute error ({ETA_ALERT_WINDOW}), by bucket",
                  "How far off were ETAs on average (|predicted - actual| / actual remaining "
                  f"time), per model and progress bucket? The dashed line is the "
                  f"{_RULES.eta_max_abs_error * 100:g} % above which WantelEtaUnreliable "
                  f"fires (on the alert series: every bucket but {ETA_UNPOOLED}, where a short "
                  "remaining time makes relative errors large).",
                  (Query(_per_scored_eta("wantel_eta_absolute_relative_error_total",
                                         "model, progress_bucket"),
                         "{{model}} {{progress_bucket}}"),
                   Query(_per_scored_eta("wantel_eta_absolute_relative_error_total", "model",
                                         f"{ETA_M},{ETA_POOLED}"),
                         "{{model}} alert (all but " + ETA_UNPOOLED + ")")),
                  unit="percentunit", minimum=0, line_at=_RULES.eta_max_abs_error),
        )),
    ),
)

#: The scrape jobs that scrape wantel, whatever they are named (a kube-prometheus
#: ServiceMonitor names its own); ``--scrape-job`` picks the default.
SCRAPE_JOB: Final = Variable("scrape_job", "Scrape job", "query",
                             query="label_values(wantel_build_info, job)", multi=True,
                             include_all=True)
S: Final = 'job=~"$scrape_job",' + INST

HEALTH: Final = Dashboard(
    slug="telemetry-health", uid="wantel-health", title="wantel / Telemetry health",
    description="Is the telemetry itself working: events flowing, nothing dropped or "
                "quarantined, projections current, every target scraped.",
    variables=(DATASOURCE, SCRAPE_JOB, INSTANCE),
    rows=(
        Row("Flow", (
            Panel("Events per second by type", "What is the log receiving, and at what rate?",
                  (Query(f"sum by (type) (rate(wantel_events_total{{{S}}}[{RATE}]))",
                         "{{type}}"),),
                  unit=EVENTS_PER_S, stack=True, minimum=0),
            Panel("Dropped events by reason",
                  "Did an emitter drop events because its queue was full?",
                  (Query(f"sum by (instance, reason) (increase(wantel_events_dropped_total"
                         f"{{{S}}}[{RATE}]))", "{{instance}} {{reason}}"),),
                  unit="none", no_value="0", minimum=0),
            Panel("Quarantined log records", "Did the projector skip damaged records (any is "
                  "red)?",
                  (Query(f"sum(wantel_log_quarantined_total{{{S}}})", "quarantined"),),
                  kind="stat", unit="none", width=6, height=4, thresholds=((1, "red"),)),
            Panel("Running jobs without per-job series",
                  "Did the per-job series cap leave running jobs out of /metrics (any is "
                  "orange)?",
                  (Query(f"sum(wantel_series_folded_total{{{S}}})", "folded"),),
                  kind="stat", unit="none", width=6, height=4, thresholds=((1, "orange"),)),
            Panel("Workers alive", "How many workers heartbeat (each server counts the workers "
                  "writing to its log)?",
                  (Query(f"sum(wantel_workers_alive{{{S}}})", "workers"),),
                  kind="stat", unit="none", width=6, height=4),
            Panel("Projection backlog", "How many stored events had the projections not read "
                  "at their last read (0: caught up)?",
                  (Query(f"max(wantel_projection_backlog_events{{{S}}})", "backlog"),),
                  kind="stat", unit="none", width=6, height=4, thresholds=((1, "orange"),)),
        )),
        Row("Freshness and scraping", (
            Panel("Projection lag", "How long ago was the newest event applied? It grows "
                  "while the fleet is idle; it matters (WantelProjectionLag) only with a "
                  "backlog.",
                  (Query(f"max by (instance) (wantel_projection_lag_seconds{{{S}}})",
                         "{{instance}}"),),
                  unit="s", width=8, minimum=0),
            Panel("Scrape health (up)", "Can Prometheus scrape every wantel target (1 up, "
                  "0 down)?",
                  (Query(f"min by (instance) (up{{{S}}})", "{{instance}}"),),
                  unit="none", minimum=0, maximum=1, width=8, base_color="red",
                  thresholds=((1, "green"),)),
            Panel("Scrape duration", "How long does a /metrics scrape take?",
                  (Query(f"max by (instance) (scrape_duration_seconds{{{S}}})",
                         "{{instance}}"),),
                  unit="s", width=8, minimum=0),
        )),
    ),
)

#: The dimension the Compare dashboard groups by: one of the labels every
#: ``wantel_compare_*`` series carries (``telemetry/projections/compare.py``), as
#: ``wantel compare --by`` offers them (but ``config``, which no label carries).
BY: Final = Variable("by", "Compare by", "custom",
                     choices=("model", "variant", "worker", "device"), default="model")
COMPARE_MODEL: Final = Variable("model", "Model", "query",
                                query=f"label_values(wantel_compare_jobs_total{{{INST}}}, model)",
                                multi=True, include_all=True)
#: How far back the comparison reaches (``wantel compare --since``).
COMPARE_WINDOW: Final = Variable("window", "Window", "custom",
                                 choices=("1h", "6h", "1d", "7d", "30d"), default="1d")
C: Final = M
_BY: Final = "$by"
BY_LEGEND: Final = "{{$by}}"


def _per(numerator: str, denominator: str, by: str = _BY) -> str:
    """``numerator``'s increase over ``denominator``'s, per ``by``, over the window."""
    return (f"sum by ({by}) (increase({numerator}{{{C}}}[$window]))\n"
            f"/ sum by ({by}) (increase({denominator}{{{C}}}[$window]))")


COMPARE: Final = Dashboard(
    slug="compare", uid="wantel-compare", title="wantel / Compare",
    description="Models, variants, workers or devices side by side over a window: the figures "
                "of `wantel compare --by …` (jobs, p50/p90 duration, steps/s, seconds per "
                "frame, peak memory, ETA error, failure rate by category), grouped by the "
                "dimension $by picks.",
    variables=(DATASOURCE, INSTANCE, BY, COMPARE_MODEL, COMPARE_WINDOW),
    time_from="now-24h",
    rows=(
        Row("Volume and speed", (
            Panel("Jobs", "How many jobs ended in the window, per $by (any outcome)?",
                  (Query(f"sum by ({_BY}) (increase(wantel_compare_jobs_total{{{C}}}"
                         "[$window]))", BY_LEGEND),),
                  kind="bargauge", unit="none", width=8, minimum=0),
            Panel("Duration p50 / p90", "How long does a completed job take, typically and at "
                  "worst, per $by?",
                  (Query(_quantile(0.5, "wantel_compare_job_duration_seconds", _BY, C,
                                   "$window"), "p50 " + BY_LEGEND),
                   Query(_quantile(0.9, "wantel_compare_job_duration_seconds", _BY, C,
                                   "$window"), "p90 " + BY_LEGEND)),
                  kind="bargauge", unit="s", width=8, minimum=0),
            Panel("Steps per second", "How fast does each $by denoise (measured steps of "
                  "completed jobs over the seconds they took)?",
                  (Query(_per("wantel_compare_denoise_steps_total",
                              "wantel_compare_denoise_step_seconds_total"), BY_LEGEND),),
                  kind="bargauge", unit=STEPS_PER_S, width=8, minimum=0),
            Panel("Seconds per frame", "What does one generated frame cost, per $by (the "
                  "completed jobs' durations over their frames)?",
                  (Query(_per("wantel_compare_job_duration_seconds_sum",
                              "wantel_compare_frames_total"), BY_LEGEND),),
                  kind="bargauge", unit="s", width=8, minimum=0),
            Panel("Peak memory p50", "How much memory does a job peak at, per $by (host RSS on "
                  "a CPU, torch allocated on CUDA: the kind each device predicts)?",
                  (Query(_quantile(0.5, "wantel_compare_job_peak_memory_bytes",
                                   f"{_BY}, kind", C, "$window"),
                         BY_LEGEND + " {{kind}}"),),
                  kind="bargauge", unit="bytes", width=8, minimum=0),
            Panel("ETA error before start (p50)", "How far off was the ETA issued as each "
                  "completed job started (|predicted - actual| / actual), per $by?",
                  (Query(_quantile(0.5, "wantel_compare_eta_absolute_error_ratio", _BY, C,
                                   "$window"), BY_LEGEND),),
                  kind="bargauge", unit="percentunit", width=8, minimum=0,
                  thresholds=((0.25, "orange"), (0.5, "red"))),
        )),
        Row("Failures", (
            Panel("Failure rate", "What share of the jobs that ended failed, per $by?",
                  (Query(f'sum by ({_BY}) (increase(wantel_compare_jobs_total{{status="failed",'
                         f"{C}}}[$window]))\n/ sum by ({_BY}) (increase("
                         f"wantel_compare_jobs_total{{{C}}}[$window]))", BY_LEGEND),),
                  kind="bargauge", unit="percentunit", width=12, minimum=0, maximum=1,
                  thresholds=((0.05, "orange"), (0.2, "red"))),
            Panel("Failure rate by category", "Why do jobs fail, per $by: the share of its "
                  "ended jobs that failed in each category (oom_device, oom_host, "
                  "invalid_input, model_load, numerical, io, interrupted, internal)?",
                  (Query(f"sum by ({_BY}, category) (increase(wantel_compare_failures_total"
                         f"{{{C}}}[$window]))\n/ ignoring (category) group_left sum by "
                         f"({_BY}) (increase(wantel_compare_jobs_total{{{C}}}[$window]))",
                         BY_LEGEND + " {{category}}"),),
                  kind="bargauge", unit="percentunit", width=12, minimum=0, maximum=1,
                  no_value="0", thresholds=((0.05, "orange"), (0.2, "red"))),
        )),
    ),
)

DASHBOARDS: Final[tuple[Dashboard, ...]] = (FLEET, JOB, GPU, ETA, HEALTH, COMPARE)

__all__ = ["DASHBOARDS", "BuildOptions", "Dashboard", "Link", "Panel", "Query", "Row",
           "Variable", "trace_link"]
