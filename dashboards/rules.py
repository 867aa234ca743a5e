"""Prometheus alert and recording rules, written as code so tests can re-time them.

The committed ``dashboards/alerts/wantel.yml`` is :func:`render_rules` with the production
:class:`RuleParams`; ``wantel dashboards build`` rewrites it and a test holds the file to be
byte-identical. Rules are code rather than hand-edited YAML for one reason: the end-to-end
alerting test must run *these* rules, not a look-alike, yet it cannot wait minutes for a
``for:`` clause or a 30 s evaluation interval. :meth:`RuleParams.fast` gives the same
expressions with second-scale windows, and nothing else differs.

Why the stall rule looks the way it does: a fixed ``increase(steps[5m]) == 0`` window is
wrong both ways (a big model legitimately takes minutes per step; a small one is stuck long
before five minutes). So the alert compares the time since each running job last made
progress with several expected step times of the job's model (mean step duration over a
day), never less than a floor that covers load and decode. wantel exports that moment itself
(``wantel_job_last_progress_timestamp_seconds``: its latest step, stage boundary, decode
piece or start), so no range window depends on the operator's scrape interval. (It was
found from the progress gauge with a subquery over ``changes(…[1m])``: at a scrape interval
of 1–2 min, or on Prometheus 3's left-open ranges, a window held one sample, saw no change,
and every running job paged; and the gauge only moves when an ETA is issued, every tenth of
the loop.)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final

#: Severities, as kube-prometheus names them: ``critical`` wakes someone (work is failing,
#: stuck or lost now), ``warning`` is looked at in working hours.
SEVERITY_CRITICAL: Final = "critical"
SEVERITY_WARNING: Final = "warning"
#: Where the runbooks are unless ``--runbook-url`` says: an absolute URL (Alertmanager's
#: receivers cannot resolve a relative one). ``.invalid`` is reserved and never resolves, so
#: a deployment that forgot ``--runbook-url`` shows a link that plainly needs setting; the
#: anchors are those of ``docs/runbooks.md`` wherever it is served.
DEFAULT_RUNBOOK_URL: Final = "https://wantel.invalid/docs/runbooks.md"


def selector(*matchers: str) -> str:
    """``{a,b}`` of the non-empty matchers, or "" (PromQL refuses ``{}``)."""
    inner = ",".join(m for m in matchers if m)
    return "{" + inner + "}" if inner else ""


def scrape_job_matcher(scrape_job: str | None) -> str:
    """The matcher that picks wantel's targets by scrape job (``job="…"``), "" for any."""
    if not scrape_job:
        return ""
    return 'job="' + scrape_job.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class RuleParams:
    """Every tunable of the rules. Production defaults; :meth:`fast` for end-to-end tests."""

    interval: str = "30s"
    #: Stall detection: a job is stalled after ``stall_steps`` expected step times of its model
    #: without progress, never fewer than ``stall_floor_s`` seconds, for ``stall_for``.
    stall_steps: int = 5
    stall_floor_s: int = 120
    stall_for: str = "1m"
    eta_window: str = "1h"
    eta_tolerance: float = 0.25
    eta_bad_share: float = 0.5
    eta_min_samples: int = 20
    eta_for: str = "10m"
    #: ETA reliability (``WantelEtaUnreliable``): p10-p90 coverage and mean absolute relative
    #: error per model over ``eta_quality_window``, pooled over every progress bucket but
    #: ``eta_unpooled_bucket``, judged from ``eta_quality_min_scored`` scored ETAs on.
    eta_quality_window: str = "1h"
    eta_unpooled_bucket: str = "75-100"
    eta_min_coverage: float = 0.6
    eta_max_abs_error: float = 0.5
    eta_quality_min_scored: int = 100
    eta_quality_for: str = "15m"
    throughput_ratio: float = 0.7
    throughput_min_steps: int = 50
    throughput_for: str = "15m"
    memory_ratio: float = 0.95
    memory_for: str = "5m"
    failure_window: str = "15m"
    failure_ratio: float = 0.1
    failure_min_jobs: int = 5
    failure_for: str = "5m"
    drop_window: str = "10m"
    lag_threshold_s: int = 60
    lag_for: str = "5m"
    worker_window: str = "1h"
    worker_for: str = "5m"
    lost_for: str = "0s"
    #: Label matchers every rule adds to wantel's series (and to ``up``), e.g. ``job="gpu"``
    #: (``wantel dashboards build --scrape-job gpu``); "" matches wantel's series wherever
    #: they are scraped: the rules key on wantel's own series, never on a scrape-job name.
    matchers: str = ""
    #: A target counts as wantel's while it exported ``wantel_build_info`` within this.
    target_lookback: str = "1d"
    target_for: str = "2m"
    runbook_base: str = DEFAULT_RUNBOOK_URL

    @classmethod
    def fast(cls, **overrides: object) -> RuleParams:
        """Second-scale timing for a test that scrapes and evaluates every second."""
        fast = cls(interval="1s", stall_floor_s=3, stall_for="0s", target_for="0s",
                   lag_for="0s")
        return replace(fast, **overrides)  # type: ignore[arg-type]

    def of(self, metric: str, *matchers: str) -> str:
        """``metric`` with :attr:`matchers` and ``matchers``: wantel's series, selected."""
        return metric + selector(self.matchers, *matchers)


@dataclass(frozen=True)
class Rule:
    """One recording rule (``record``) or alert (``alert``)."""

    name: str
    expr: str
    alert: bool = True
    for_: str | None = None
    severity: str | None = None
    summary: str | None = None
    description: str | None = None


def _pct(ratio: float) -> str:
    return f"{ratio * 100:g} %"


def eta_quality_records(p: RuleParams) -> tuple[str, str, str]:
    """Names of the recording rules of ETA quality: scored ETAs, coverage, mean |error|."""
    w = p.eta_quality_window
    return (f"wantel:eta_scored:increase{w}", f"wantel:eta_interval_coverage:ratio{w}",
            f"wantel:eta_absolute_relative_error:mean{w}")


INF_BUCKET: Final = 'le="+Inf"'
FAILED: Final = 'status="failed"'
#: The memory sources that fill a device (NVML's whole-device use, torch's reservations).
DEVICE_SOURCES: Final = 'source=~"nvml|torch_reserved"'
#: The labels a running job's series keep through the stall rules: where it runs and what.
JOB_KEY: Final = "instance, job_id, model, worker"
#: The labels of a device's series (``exporters.prometheus.DEVICE_LABELS``) and its target.
DEVICE_KEY: Final = "instance, device, gpu, UUID, Hostname"


def recording_rules(p: RuleParams) -> list[Rule]:
    """The recording rules the stall and ETA reliability alerts need (also handy elsewhere)."""
    scored, coverage, abs_error = eta_quality_records(p)
    pooled = f'progress_bucket!="{p.eta_unpooled_bucket}"'

    def per_model(counter: str) -> str:
        return (f"sum by (model) (increase({p.of(counter, pooled)}"
                f"[{p.eta_quality_window}]))")

    return [
        # Counters live as long as the log, so an idle model's rates are 0/0: keep only models
        # that stepped in the last day (the others fall back to the floor below).
        Rule("wantel:denoise_step_seconds:mean1d", alert=False, expr=(
            f"sum by (model) (rate({p.of('wantel_denoise_step_duration_seconds_sum')}[1d]))\n"
            f"/ (sum by (model) (rate({p.of('wantel_denoise_step_duration_seconds_count')}"
            f"[1d])) > 0)")),
        # Several expected step times, never under the floor; the floor alone for a model with
        # no step in the last day.
        Rule("wantel:job_stall_threshold_seconds", alert=False, expr=(
            f"clamp_min({p.stall_steps} * wantel:denoise_step_seconds:mean1d, "
            f"{p.stall_floor_s})\n"
            f"or on (model) (0 * max by (model) ({p.of('wantel_jobs_running')}) "
            f"+ {p.stall_floor_s})")),
        # When each running job last made progress (as wantel saw it: no range window, so any
        # scrape interval works), keeping where it runs: the scrape target and the worker.
        Rule("wantel:job_progress_changed_timestamp_seconds", alert=False, expr=(
            f"max by ({JOB_KEY}) ({p.of('wantel_job_last_progress_timestamp_seconds')})")),
        # ETAs scored per model over the window (the histogram's count is its +Inf bucket),
        # every progress bucket but the last: near the end the actual remaining time is a
        # fraction of a second, and relative errors there are large whatever the model.
        Rule(scored, alert=False, expr=(
            f"sum by (model) (increase("
            f"{p.of('wantel_eta_relative_error_bucket', INF_BUCKET, pooled)}"
            f"[{p.eta_quality_window}]))")),
        # Share of those whose actual remaining time fell inside their p10-p90 interval, and
        # their mean absolute relative error; models with no scored ETA in the window drop out.
        Rule(coverage, alert=False, expr=(
            f"{per_model('wantel_eta_interval_covered_total')}\n/ ({scored} > 0)")),
        Rule(abs_error, alert=False, expr=(
            f"{per_model('wantel_eta_absolute_relative_error_total')}\n/ ({scored} > 0)")),
    ]


def alert_rules(p: RuleParams) -> list[Rule]:
    """The alerts, each with a runbook section in ``docs/runbooks.md``.

    Every alert keeps the labels that say where to look — ``instance`` (the scrape target),
    ``worker``, ``device`` and its DCGM labels, ``model``, ``job_id`` — wherever its series
    have them; the ETA and throughput alerts judge a model over the fleet.
    """
    tol = f"{p.eta_tolerance:g}"

    def eta(le: str) -> str:
        return (p.of("wantel_eta_relative_error_bucket", 'progress_bucket="10-25"', f'le="{le}"')
                + f"[{p.eta_window}]")

    eta_count = f"sum by (model) (increase({eta('+Inf')}))"
    step_count = p.of("wantel_denoise_step_duration_seconds_count")
    step_sum = p.of("wantel_denoise_step_duration_seconds_sum")
    speed = (f"sum by (model) (rate({step_count}[1h]{{off}}))\n"
             f"/ sum by (model) (rate({step_sum}[1h]{{off}}))")
    by_model = "instance, model"
    ended = f"sum by ({by_model}) (increase({p.of('wantel_jobs_total')}[{p.failure_window}]))"
    scored, coverage, abs_error = eta_quality_records(p)
    up = "up" + selector(p.matchers)
    moved = p.of("wantel_job_last_progress_timestamp_seconds")
    return [
        # Its age when last scraped (the scrape's time less the job's last progress), not
        # ``time() -``: between two scrapes it does not grow, so a long scrape interval
        # delays the alert by one interval and never raises it.
        Rule("WantelJobStalled", for_=p.stall_for, severity=SEVERITY_CRITICAL, expr=(
            f"max by ({JOB_KEY}) (timestamp({moved}) - {moved})\n"
            "> on (model) group_left () wantel:job_stall_threshold_seconds"),
             summary="Job {{ $labels.job_id }} ({{ $labels.model }}) on {{ $labels.worker }} "
                     "({{ $labels.instance }}) has made no progress for "
                     "{{ $value | humanizeDuration }}",
             description=f"No step (or stage) of a running job for more than {p.stall_steps} "
                         f"expected step times of its model (at least {p.stall_floor_s} s)."),
        Rule("WantelJobLost", for_=p.lost_for, severity=SEVERITY_CRITICAL, expr=(
            f"max by (instance, model, worker) ({p.of('wantel_jobs_lost')}) > 0"),
             summary="{{ $value }} {{ $labels.model }} job(s) of worker {{ $labels.worker }} "
                     "were lost mid-run ({{ $labels.instance }})",
             description="A worker went silent while its jobs were running: it crashed, was "
                         "killed or lost its node. A worker that stops after its jobs ended "
                         "(a clean scale-down) loses none and raises nothing here."),
        Rule("WantelEtaDrift", for_=p.eta_for, severity=SEVERITY_WARNING, expr=(
            f"1 - (\n"
            f"  sum by (model) (increase({eta(tol)}))\n"
            f"  - sum by (model) (increase({eta('-' + tol)}))\n"
            f") / {eta_count}\n"
            f"> {p.eta_bad_share:g}\n"
            f"and on (model) {eta_count} >= {p.eta_min_samples}"),
             summary="ETAs of {{ $labels.model }} at 10-25 % progress are off",
             description=f"Over {p.eta_window}, more than {_pct(p.eta_bad_share)} of the ETAs "
                         f"issued at 10-25 % progress missed the actual remaining time by more "
                         f"than {_pct(p.eta_tolerance)} (share now {{{{ $value | "
                         f"humanizePercentage }}}})."),
        Rule("WantelEtaUnreliable", for_=p.eta_quality_for, severity=SEVERITY_WARNING, expr=(
            f"(\n  {coverage} < {p.eta_min_coverage:g}\n"
            f"  or {abs_error} > {p.eta_max_abs_error:g}\n)\n"
            f"and on (model) {scored} >= {p.eta_quality_min_scored}"),
             summary="ETAs of {{ $labels.model }} are unreliable",
             description=(
                 f"Over {p.eta_quality_window}, of the {_query(scored, 'humanize')} ETAs scored "
                 f"(every progress bucket but {p.eta_unpooled_bucket}), "
                 f"{_query(coverage, 'humanizePercentage')} had the actual remaining time "
                 f"inside their p10-p90 interval (alert below {_pct(p.eta_min_coverage)}) and "
                 f"the mean absolute error was {_query(abs_error, 'humanizePercentage')} "
                 f"(alert above {_pct(p.eta_max_abs_error)}).")),
        Rule("WantelThroughputDrop", for_=p.throughput_for, severity=SEVERITY_WARNING, expr=(
            f"(\n{_indent(speed.replace('{off}', ''))}\n)\n"
            f"< {p.throughput_ratio:g} * (\n{_indent(speed.replace('{off}', ' offset 1d'))}\n)\n"
            f"and on (model) sum by (model) "
            f"(increase({step_count}[1h])) "
            f">= {p.throughput_min_steps}"),
             summary="Denoising of {{ $labels.model }} is slower than this hour yesterday",
             description=f"Steps per second of denoising time fell below "
                         f"{_pct(p.throughput_ratio)} of the same hour yesterday (now "
                         f"{{{{ $value | humanize }}}} steps/s). Demand does not move this "
                         f"figure; the device, its clocks or the software do."),
        Rule("WantelGpuMemoryNearLimit", for_=p.memory_for, severity=SEVERITY_WARNING, expr=(
            f"max by ({DEVICE_KEY}) "
            f"({p.of('wantel_device_memory_used_bytes', DEVICE_SOURCES)})\n"
            f"/ on ({DEVICE_KEY}) max by ({DEVICE_KEY}) "
            f"({p.of('wantel_device_memory_total_bytes')})\n"
            f"> {p.memory_ratio:g}"),
             summary="{{ $labels.device }} of {{ $labels.instance }} memory is "
                     "{{ $value | humanizePercentage }} full",
             description=f"Device memory above {_pct(p.memory_ratio)} of its total: the next "
                         f"larger request may run out of memory."),
        Rule("WantelJobFailureRatioHigh", for_=p.failure_for, severity=SEVERITY_CRITICAL, expr=(
            f"sum by ({by_model}) (increase({p.of('wantel_jobs_total', FAILED)}"
            f"[{p.failure_window}]))\n"
            f"/ {ended}\n"
            f"> {p.failure_ratio:g}\n"
            f"and on ({by_model}) {ended} >= {p.failure_min_jobs}"),
             summary="{{ $value | humanizePercentage }} of {{ $labels.model }} jobs failed "
                     "({{ $labels.instance }})",
             description=f"More than {_pct(p.failure_ratio)} of the jobs that ended in the "
                         f"last {p.failure_window} failed."),
        Rule("WantelJobOutOfMemory", for_="0s", severity=SEVERITY_CRITICAL, expr=(
            f"sum by ({by_model}) (increase({p.of('wantel_jobs_oom_total')}"
            f"[{p.failure_window}])) > 0"),
             summary="A {{ $labels.model }} job ran out of memory ({{ $labels.instance }})",
             description="A job failed with an out-of-memory error (JobFailed.oom)."),
        Rule("WantelEventsDropped", for_="0s", severity=SEVERITY_WARNING, expr=(
            f"sum by (instance, reason) (increase({p.of('wantel_events_dropped_total')}"
            f"[{p.drop_window}])) > 0"),
             summary="Emitters dropped telemetry events ({{ $labels.reason }}, "
                     "{{ $labels.instance }})",
             description="An emitter's queue overflowed and it dropped events: dashboards and "
                         "ETAs miss data."),
        Rule("WantelLogQuarantined", for_="0s", severity=SEVERITY_WARNING, expr=(
            f"sum by (instance) (increase({p.of('wantel_log_quarantined_total')}"
            f"[{p.drop_window}])) > 0"),
             summary="Damaged log records were quarantined ({{ $labels.instance }})",
             description="The projector skipped records it could not decode."),
        Rule("WantelLogGap", for_="0s", severity=SEVERITY_WARNING, expr=(
            f"sum by (instance) (increase({p.of('wantel_log_gaps_total')}"
            f"[{p.drop_window}])) > 0"),
             summary="The event log of {{ $labels.instance }} lost positions",
             description="A reader found positions the log gave out and no longer holds: a "
                         "deleted or emptied segment, a cut tail, or events lost in a power "
                         "cut."),
        Rule("WantelProjectionLag", for_=p.lag_for, severity=SEVERITY_WARNING, expr=(
            f"max by (instance) ({p.of('wantel_projection_lag_seconds')}) "
            f"> {p.lag_threshold_s}\n"
            f"and on (instance) max by (instance) ({p.of('wantel_projection_backlog_events')}) "
            f"> 0"),
             summary="Projections of {{ $labels.instance }} are {{ $value | humanizeDuration }} "
                     "behind the log",
             description=f"The newest event applied is more than {p.lag_threshold_s} s old and "
                         f"the log holds events not yet read. (An idle or scaled-to-zero fleet "
                         f"writes nothing: its lag grows with nothing to read, and stays "
                         f"silent here.)"),
        # Workers gone, less those that said they stopped (WorkerStopped: a scale-down). An
        # exporter without the stopped gauge (older wantel) counts none: `or … * 0`.
        Rule("WantelWorkerDown", for_=p.worker_for, severity=SEVERITY_WARNING, expr=(
            f"max by (instance) (max_over_time({p.of('wantel_workers_alive')}"
            f"[{p.worker_window}]))\n"
            f"- max by (instance) ({p.of('wantel_workers_alive')})\n"
            f"- (\n  max by (instance) (clamp_min({p.of('wantel_workers_stopped')}"
            f" - min_over_time({p.of('wantel_workers_stopped')}[{p.worker_window}]), 0))\n"
            f"  or max by (instance) ({p.of('wantel_workers_alive')}) * 0\n) > 0"),
             summary="{{ $value }} worker(s) stopped heartbeating ({{ $labels.instance }})",
             description=f"Fewer workers are alive than at some point in the last "
                         f"{p.worker_window}, not counting those that stopped cleanly "
                         f"(WorkerStopped: a scale-down). A worker that went silent may have "
                         f"crashed or lost its network; a worker lost with jobs running raises "
                         f"WantelJobLost."),
        Rule("WantelTargetDown", for_=p.target_for, severity=SEVERITY_CRITICAL, expr=(
            f"{up} == 0\n"
            f"and on (job, instance) max by (job, instance) "
            f"(max_over_time({p.of('wantel_build_info')}[{p.target_lookback}]))"),
             summary="Prometheus cannot scrape wantel at {{ $labels.instance }}",
             description=f"A target that served wantel's /metrics within "
                         f"{p.target_lookback} is still discovered but down or unreachable. A "
                         f"target removed from discovery (a scale-down) is not down."),
    ]


def _query(record: str, humanize: str) -> str:
    """An annotation template: ``record``'s value for the alert's model, humanized."""
    return (f'{{{{ with printf "{record}{{model=%q}}" $labels.model | query }}}}'
            f"{{{{ . | first | value | {humanize} }}}}{{{{ end }}}}")


def _indent(text: str, by: str = "  ") -> str:
    return "\n".join(by + line for line in text.splitlines())


def anchor(name: str) -> str:
    """The runbook section of an alert (GitHub's anchor of the heading ``## Name``)."""
    return name.lower()


def _quote(text: str) -> str:
    """A YAML double-quoted scalar."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _block(key: str, text: str, indent: str) -> list[str]:
    """``key: |`` with ``text`` as a literal block (one-line texts stay inline)."""
    if "\n" not in text:
        return [f"{indent}{key}: {_quote(text)}"]
    return [f"{indent}{key}: |-", *(f"{indent}  {line}" for line in text.splitlines())]


def render_rules(params: RuleParams | None = None) -> str:
    """The rule file Prometheus loads (``rule_files``), as deterministic YAML text."""
    p = params or RuleParams()
    lines = [
        "# Generated by `wantel dashboards build` from dashboards/rules.py: edit that, not this.",
        f"# Runbooks: {p.runbook_base}. Tests: dashboards/alerts/tests/ (promtool test rules).",
        "groups:",
    ]
    for group, rules in (("wantel.records", recording_rules(p)), ("wantel.alerts",
                                                                  alert_rules(p))):
        lines += [f"  - name: {group}", f"    interval: {p.interval}", "    rules:"]
        for rule in rules:
            if not rule.alert:
                lines.append(f"      - record: {rule.name}")
                lines += _block("expr", rule.expr, "        ")
                continue
            lines.append(f"      - alert: {rule.name}")
            lines += _block("expr", rule.expr, "        ")
            lines.append(f"        for: {rule.for_}")
            lines += ["        labels:", f"          severity: {rule.severity}"]
            lines.append("        annotations:")
            lines.append(f"          summary: {_quote(rule.summary or rule.name)}")
            lines.append(f"          description: {_quote(rule.description or '')}")
            runbook = p.runbook_base + "#" + anchor(rule.name)
            lines.append(f"          runbook_url: {_quote(runbook)}")
    return "\n".join(lines) + "\n"


__all__ = ["DEFAULT_RUNBOOK_URL", "Rule", "RuleParams", "alert_rules", "anchor",
           "eta_quality_records", "recording_rules", "render_rules", "scrape_job_matcher",
           "selector"]
