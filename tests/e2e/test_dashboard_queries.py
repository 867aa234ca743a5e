"""Every panel query of every generated dashboard runs on a real Prometheus and returns data.

Real tiny jobs of several Wan layouts, a CogVideoX and a Stable Diffusion one run through
``generate()`` into a local log, and one tiny job fails out of memory (injected); ``wantel
serve``'s machinery (:class:`wantel.serving.Serving`) follows the log and serves ``/metrics``;
a real Prometheus (exemplar storage on) scrapes it every second. One job is held mid-denoise
until Prometheus has seen its per-job gauges, so the job drill-down has a running job.

GPU-only metrics (NVML utilisation, temperature, throttle events, device memory with a total)
cannot come from a CPU run. They are fed honestly as *synthetic* ``GpuSampled`` and
``MemorySampled`` events (device ``cuda:0``) appended to the same real log, so they pass through
the real projections, the real collector and the real Prometheus like a GPU worker's samples
would. Likewise one synthetic ``EventsDropped`` report, so the drop panel has a series.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from telemetry.emitter import Emitter
from telemetry.events import UNSEQUENCED, EventsDropped, GpuSampled, MemorySampled
from telemetry.log.local import LocalLog
from tests.e2e.jobs import paused_job, run_out_of_memory_job, run_tiny_jobs, run_traces
from tests.e2e.servers import (
    PROMETHEUS,
    Prometheus,
    api,
    poll,
    repo_prometheus_config,
    run_prometheus,
)
from wantel.serving import Serving

GENERATED = Path(__file__).resolve().parents[2] / "dashboards" / "generated"
#: Wan's layouts, and two pipelines beyond Wan (a CogVideoX video and a Stable Diffusion image
#: model), whose own model labels the panels must select.
VARIANTS = ("tiny-t2v", "tiny-t2v-a14b", "tiny-i2v", "tiny-ti2v", "tiny-cogvideox", "tiny-sd")
BEYOND_WAN = ("tiny-cogvideox", "tiny-sd")
RATE_INTERVAL = "4s"  # what Grafana picks for a 1 s scrape interval: 4 x scrape interval
LABEL_VALUES = re.compile(r"^label_values\((?:(?P<match>.+),\s*)?(?P<label>\w+)\)$")
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")

pytestmark = pytest.mark.skipif(not PROMETHEUS.exists(), reason="no /usr/bin/prometheus")


def _gpu_samples(emitter: Emitter, *, throttled: bool) -> None:
    """Synthetic NVML and allocator readings of a GPU worker's device ``cuda:0``."""
    now = time.time_ns()
    stream = "worker/synthetic-gpu"
    emitter.emit(MemorySampled(job=stream, seq=UNSEQUENCED, ts=now, worker="synthetic-gpu",
                               device="cuda:0", allocated_bytes=20 << 30,
                               reserved_bytes=24 << 30, device_used_bytes=26 << 30,
                               device_total_bytes=80 << 30))
    emitter.emit(GpuSampled(job=stream, seq=UNSEQUENCED, ts=now, worker="synthetic-gpu",
                            device="cuda:0", gpu=0, uuid="GPU-00000000-e2e0-0000-0000-000000000000",
                            utilization_ratio=0.93, temperature_celsius=71.0,
                            power_watts=640.0,
                            throttle_reasons=("sw_thermal",) if throttled else ()))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Prometheus, float,
                                                                       list[str], Path]]:
    """Serving + Prometheus after a real run; yields (prometheus, start time, job ids, the
    log's directory)."""
    tmp = tmp_path_factory.mktemp("dashboards-e2e")
    log = LocalLog(tmp / "log", fsync="never")
    serving = Serving(log, port=0)
    serving.start()
    try:
        metrics = f"127.0.0.1:{serving.http.port}"
        with run_prometheus(tmp / "prometheus", repo_prometheus_config(metrics)) as prometheus:
            start = time.time() - 5
            poll("wantel target up", lambda: prometheus.query('up{job="wantel"} == 1') or None,
                 detail=prometheus.targets_detail)
            emitter = Emitter(LocalLog(tmp / "log", create=False, fsync="never"),
                              worker="synthetic-gpu", flush_interval=0.02)
            try:
                _gpu_samples(emitter, throttled=False)
                _gpu_samples(emitter, throttled=True)  # a throttle reason newly appears
                emitter.emit(EventsDropped(job="worker/synthetic-gpu", seq=UNSEQUENCED,
                                           ts=time.time_ns(), worker="synthetic-gpu",
                                           counts={"queue_full": 3}))
                emitter.flush()
                jobs = run_tiny_jobs(tmp / "log", tmp, VARIANTS)
                with paused_job(tmp / "log", "held-job") as held:
                    assert held.paused.wait(120), "the held job never reached its pause"
                    assert [] == held.errors
                    poll("held job's progress scraped",
                         lambda: prometheus.query('wantel_job_progress_ratio{job_id="held-job"}')
                         or None, detail=prometheus.targets_detail)
                assert [] == held.errors
                jobs.append("held-job")
                # After a scrape of the tiny jobs' ends (the held job's poll): their failure
                # series stood at 0, so this failure is an increase the failure panels show.
                run_out_of_memory_job(tmp / "log", "oom-job")
                jobs.append("oom-job")
                poll("every job's end scraped",
                     lambda: prometheus.query("sum(wantel_jobs_total) >= "
                                              f"{len(jobs)}") or None,
                     detail=prometheus.targets_detail)
                poll("throttle event scraped",
                     lambda: prometheus.query("wantel_gpu_throttle_events_total") or None,
                     detail=prometheus.targets_detail)
                # Rates need two samples: wait for two more scrapes of the final state.
                ended = time.time()
                poll("two scrapes after the last job",
                     lambda: prometheus.query(f'timestamp(up{{job="wantel"}}) > {ended + 2.5}')
                     or None, detail=prometheus.targets_detail)
            finally:
                emitter.close()
            yield prometheus, start, jobs, tmp / "log"
    finally:
        serving.stop()
        log.close()


def _dashboards() -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(GENERATED.glob("*.json"))]


def _substitute(expr: str, values: dict[str, str]) -> str:
    """Replace ``$name`` / ``${name}`` with its value; fail on a variable nobody defined."""
    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"undefined variable ${name} in {expr!r}"
        return values[name]

    return VARIABLE.sub(one, expr)


def _variable_values(prometheus: Prometheus, dashboard: dict[str, Any], start: float,
                     end: float) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Each variable's value as Grafana would substitute it: ``All`` (``.*``) for multi-value
    variables, the first real value otherwise; also every real value each query offers."""
    values = {"__rate_interval": RATE_INTERVAL, "__range": f"{math.ceil(end - start)}s",
              "datasource": "prometheus"}
    offered: dict[str, list[str]] = {}
    for variable in dashboard["templating"]["list"]:
        name = variable["name"]
        if variable["type"] == "datasource":
            continue
        if variable["type"] == "custom":
            values[name] = variable["current"]["value"]
            continue
        query = variable["query"]
        text = query if isinstance(query, str) else query["query"]
        found = LABEL_VALUES.match(text)
        assert found, f"{dashboard['uid']}: ${name}: unsupported variable query {text!r}"
        match = _substitute(found["match"], values) if found["match"] else None
        params = {"start": f"{start:.3f}", "end": f"{end:.3f}"}
        if match:
            params["match[]"] = match
        real = api(prometheus.base, f"/api/v1/label/{found['label']}/values", **params)
        assert real, f"{dashboard['uid']}: ${name}: {text!r} offers no value"
        offered[name] = sorted(real)
        values[name] = ((variable.get("allValue") or ".*") if variable.get("includeAll")
                        else offered[name][0])
    return values, offered


def _has_data(result: list[dict[str, Any]]) -> bool:
    return any(not math.isnan(float(value)) for series in result
               for _, value in series.get("values", []))


def test_every_panel_query_returns_data(
        stack: tuple[Prometheus, float, list[str], Path]) -> None:
    """Each target of each panel, variables substituted, is valid PromQL with data."""
    prometheus, start, _, _ = stack
    end = time.time()
    empty: list[str] = []
    checked = 0
    dashboards = _dashboards()
    assert 6 == len(dashboards)
    for dashboard in dashboards:
        values, offered = _variable_values(prometheus, dashboard, start, end)
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = _substitute(target["expr"], values)
                result = api(prometheus.base, "/api/v1/query_range", query=expr,
                             start=f"{start:.3f}", end=f"{end:.3f}", step="1")["result"]
                checked += 1
                if not _has_data(result):
                    empty.append(f"{dashboard['uid']} / {panel['title']} / "
                                 f"{target['refId']}: {expr}")
                # Every single real value of a multi-value variable is valid PromQL too.
                for name, choices in offered.items():
                    for choice in choices:
                        api(prometheus.base, "/api/v1/query",
                            query=_substitute(target["expr"], {**values, name: choice}))
    assert [] == empty
    assert checked >= 30


def test_exemplar_panels_link_real_traces(
        stack: tuple[Prometheus, float, list[str], Path]) -> None:
    """Panels with exemplars get trace ids of the jobs that ran (the Jaeger links' targets)."""
    prometheus, start, jobs, log_dir = stack
    end = time.time()
    exemplar_targets = [
        (dashboard, target) for dashboard in _dashboards() for panel in dashboard["panels"]
        for target in panel.get("targets", []) if target.get("exemplar")]
    assert exemplar_targets
    for dashboard, target in exemplar_targets:
        values, _ = _variable_values(prometheus, dashboard, start, end)
        series = api(prometheus.base, "/api/v1/query_exemplars",
                     query=_substitute(target["expr"], values),
                     start=f"{start:.3f}", end=f"{end + 60:.3f}")
        traces = {e["labels"]["trace_id"] for s in series for e in s["exemplars"]}
        assert traces, f"{dashboard['uid']}: no exemplar for {target['expr']}"
        assert set() == traces - run_traces(log_dir, jobs)


def test_model_panels_select_pipelines_beyond_wan(
        stack: tuple[Prometheus, float, list[str], Path]) -> None:
    """The dashboards' ``$model`` variable offers the non-Wan models under their own labels,
    and fleet-overview panels that select by model select series of each of them alone.

    The series are what is checked, not their values: a model that ran one job has counters
    that appeared with their final value, so Prometheus sees no increase to rate (NaN) —
    the same for any model's first job, Wan's included."""
    prometheus, start, _, _ = stack
    end = time.time()
    fleet = next(d for d in _dashboards() if d["uid"] == "wantel-fleet")
    values, offered = _variable_values(prometheus, fleet, start, end)
    assert set(BEYOND_WAN) <= set(offered["model"])
    panels = {"Jobs per minute by status", "Steps per second by model",
              "Stage time p50 by stage", "Mean step time by model and expert"}
    checked = 0
    for panel in fleet["panels"]:
        if panel["title"] not in panels:
            continue
        for target in panel.get("targets", []):
            for model in BEYOND_WAN:
                expr = _substitute(target["expr"], {**values, "model": model})
                result = api(prometheus.base, "/api/v1/query_range", query=expr,
                             start=f"{start:.3f}", end=f"{end:.3f}", step="1")["result"]
                assert result, f"{panel['title']} selects nothing for {model}: {expr}"
                assert {model} >= {r["metric"].get("model", model) for r in result}
                checked += 1
    assert 2 * len(panels) == checked


def test_compare_dashboard_groups_by_every_dimension(
        stack: tuple[Prometheus, float, list[str], Path]) -> None:
    """Each ``$by`` the Compare dashboard offers gives every panel data, one series per group
    of that dimension: the models that ran (Wan's and beyond), the one worker, the CPU."""
    prometheus, start, _, _ = stack
    end = time.time()
    compare = next(d for d in _dashboards() if d["uid"] == "wantel-compare")
    values, _ = _variable_values(prometheus, compare, start, end)
    by_variable = next(v for v in compare["templating"]["list"] if v["name"] == "by")
    choices = [option["value"] for option in by_variable["options"]]
    assert ["model", "variant", "worker", "device"] == choices
    for by in choices:
        groups: set[str] = set()
        for panel in compare["panels"]:
            for target in panel.get("targets", []):
                expr = _substitute(target["expr"], {**values, "by": by})
                result = api(prometheus.base, "/api/v1/query_range", query=expr,
                             start=f"{start:.3f}", end=f"{end:.3f}", step="1")["result"]
                assert _has_data(result), f"by {by}: {panel['title']}: {expr}"
                groups |= {series["metric"][by] for series in result}
        if by in ("model", "variant"):
            assert set(VARIANTS) <= groups
        else:
            assert 1 == len(groups), (by, groups)
    oom = api(prometheus.base, "/api/v1/query", query='sum by (model, category) '
              '(wantel_compare_failures_total > 0)')["result"]
    assert [("tiny-cogvideox", "oom_device")] == [
        (s["metric"]["model"], s["metric"]["category"]) for s in oom]
