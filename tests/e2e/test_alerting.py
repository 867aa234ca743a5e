"""A stalled job fires WantelJobStalled through a real Prometheus and Alertmanager to a webhook.

The chain is the production one: a tiny real job writes events to a local log; ``wantel
serve``'s machinery (:class:`wantel.serving.Serving`) serves ``/metrics``; a real Prometheus
evaluates the repository's rules; a real Alertmanager routes by the repository's
``alertmanager.yml`` to a webhook server in this test. Only timing differs, and only as
parameters: the rules are rendered with :meth:`dashboards.rules.RuleParams.fast` (1 s
evaluation, a 3 s stall floor, no ``for:``), Prometheus resends after 1 s, and the routes'
``group_wait`` is 0 s. The job is held mid-denoise by a test-only ``callback_on_step_end``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards.rules import RuleParams, render_rules
from telemetry.log.local import LocalLog
from tests.e2e.jobs import paused_job
from tests.e2e.servers import (
    ALERTMANAGER,
    PROMETHEUS,
    REPO_PROMETHEUS_CONFIG,
    Webhook,
    free_port,
    get_json,
    poll,
    repo_prometheus_config,
    run_alertmanager,
    run_prometheus,
    run_webhook,
)
from wantel.serving import Serving

REPO = Path(__file__).resolve().parents[2]
ALERTMANAGER_CONFIG = REPO / "dashboards" / "alertmanager" / "alertmanager.yml"
DEADLINE_S = 60.0

pytestmark = pytest.mark.skipif(not (PROMETHEUS.exists() and ALERTMANAGER.exists()),
                                reason="needs Debian's prometheus and prometheus-alertmanager")


def _alertmanager_config(webhook: str) -> str:
    """The repository's routing tree with the test's webhook and no grouping delay."""
    config: dict[str, Any] = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    receiver = next(r for r in config["receivers"] if r["name"] == config["route"]["receiver"])
    receiver["webhook_configs"] = [{"url": webhook, "send_resolved": True}]

    def fast(route: dict[str, Any]) -> None:
        route["group_wait"] = "0s"
        for child in route.get("routes", []):
            fast(child)

    fast(config["route"])
    return str(yaml.safe_dump(config, sort_keys=False))


def _firing(hook: Webhook, alertname: str) -> dict[str, Any] | None:
    for body in list(hook.bodies):
        for alert in body.get("alerts", []):
            if alert["labels"].get("alertname") == alertname and alert["status"] == "firing":
                found: dict[str, Any] = alert
                return found
    return None


def test_stalled_job_reaches_the_webhook(tmp_path: Path) -> None:
    """A job held mid-denoise is reported stalled, with its job_id, worker, instance and
    runbook, by webhook."""
    rules = tmp_path / "wantel.yml"
    rules.write_text(render_rules(RuleParams.fast()))
    log = LocalLog(tmp_path / "log", fsync="never")
    serving = Serving(log, port=0)
    serving.start()
    try:
        with run_webhook() as hook, \
                run_alertmanager(tmp_path / "am", _alertmanager_config(hook.url)) as am, \
                run_prometheus(tmp_path / "prom",
                               repo_prometheus_config(f"127.0.0.1:{serving.http.port}",
                                                      rule_files=[rules], alertmanager=am),
                               ["--rules.alert.resend-delay=1s"]) as prometheus, \
                paused_job(tmp_path / "log", "stuck-job") as held:
            assert held.paused.wait(120), "the job never reached its pause"
            assert [] == held.errors
            alert = poll("WantelJobStalled at the webhook",
                         lambda: _firing(hook, "WantelJobStalled"), deadline_s=DEADLINE_S,
                         detail=lambda: f"{prometheus.targets_detail()}\n"
                                        f"alerts: {prometheus.query('ALERTS')}\n"
                                        f"webhook: {hook.bodies}")
            assert [] == held.errors
            assert ("stuck-job", "tiny-t2v", "critical", f"127.0.0.1:{serving.http.port}") == (
                alert["labels"]["job_id"], alert["labels"]["model"],
                alert["labels"]["severity"], alert["labels"]["instance"])
            assert alert["labels"]["worker"]
            assert alert["annotations"]["runbook_url"].startswith("https://")
            assert alert["annotations"]["runbook_url"].endswith("#wanteljobstalled")
    finally:
        serving.stop()
        log.close()


@contextlib.contextmanager
def _wantel_serve(workdir: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A real ``wantel serve`` process on its own (empty) log and a free port; yields the
    process and its ``host:port``. Stopped on exit if the test has not stopped it."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    output = workdir / "serve.log"
    with open(output, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "wantel", "serve", "--log", str(workdir / "log"),
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=sink, stderr=subprocess.STDOUT, cwd=REPO)
    address = f"127.0.0.1:{port}"
    try:
        def ready() -> bool | None:
            if process.poll() is not None:
                pytest.fail(f"wantel serve exited: {output.read_text()[-3000:]}")
            with urllib.request.urlopen(f"http://{address}/healthz", timeout=2) as response:
                return True if response.status == 200 else None

        poll("wantel serve ready", ready, detail=lambda: output.read_text()[-3000:])
        yield process, address
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)


def _fleet_prometheus_config(targets_file: Path, rules: Path, alertmanager: str) -> str:
    """The repository's Prometheus config with the wantel scrape job renamed ``gpu-nodes`` (as a
    ServiceMonitor would name it) and its targets discovered from ``targets_file``."""
    config: dict[str, Any] = yaml.safe_load(REPO_PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(rules)]
    config["alerting"]["alertmanagers"][0]["static_configs"] = [{"targets": [alertmanager]}]
    (scrape,) = [job for job in config["scrape_configs"] if job["job_name"] == "wantel"]
    scrape.pop("static_configs")
    scrape.update(job_name="gpu-nodes", scrape_interval="1s", scrape_timeout="1s",
                  file_sd_configs=[{"files": [str(targets_file)], "refresh_interval": "1s"}])
    config["scrape_configs"] = [scrape]
    return str(yaml.safe_dump(config, sort_keys=False))


def _write_targets(path: Path, targets: list[str]) -> None:
    """File service discovery's targets, replaced atomically (Prometheus watches the file)."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps([{"targets": targets}]))
    os.replace(temporary, path)


def _alerts(hook: Webhook) -> list[dict[str, Any]]:
    """Every alert the webhook received, in arrival order."""
    return [alert for body in list(hook.bodies) for alert in body.get("alerts", [])]


def _post_alerts(alertmanager: str, alerts: list[dict[str, Any]]) -> None:
    request = urllib.request.Request(f"http://{alertmanager}/api/v2/alerts",
                                     data=json.dumps(alerts).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert 200 == response.status


def _alert_states(alertmanager: str, alertname: str,
                  expect: int) -> dict[str, dict[str, Any]] | None:
    """Alertmanager's view of ``alertname``'s alerts by instance (state and inhibitors), once
    it holds ``expect`` of them."""
    found = get_json(f"http://{alertmanager}/api/v2/alerts?"
                     + urllib.parse.urlencode({"filter": f'alertname="{alertname}"'}))
    states = {alert["labels"].get("instance", ""): alert["status"] for alert in found}
    return states if len(states) == expect else None


def test_scale_down_pages_nothing_a_killed_server_pages_once(tmp_path: Path) -> None:
    """Two real ``wantel serve`` targets under a scrape job not named ``wantel``: the one
    scaled down cleanly (removed from discovery, then stopped) pages nothing; the one killed
    with SIGKILL pages once, critical, with its instance. Its other alerts are then inhibited
    by Alertmanager's rule, another instance's are not."""
    rules = tmp_path / "wantel.yml"
    rules.write_text(render_rules(RuleParams.fast()))
    targets = tmp_path / "targets.json"
    with run_webhook() as hook, \
            run_alertmanager(tmp_path / "am", _alertmanager_config(hook.url)) as am, \
            _wantel_serve(tmp_path / "down") as (scaled, scaled_at), \
            _wantel_serve(tmp_path / "killed") as (killed, killed_at):
        _write_targets(targets, [scaled_at, killed_at])
        with run_prometheus(tmp_path / "prom", _fleet_prometheus_config(targets, rules, am),
                            ["--rules.alert.resend-delay=1s"]) as prometheus:
            poll("both wantel targets scraped with their build info",
                 lambda: len(prometheus.query(
                     'wantel_build_info{job="gpu-nodes"} and on (instance) up == 1')) == 2
                 or None, detail=prometheus.targets_detail)
            # Scale down: out of discovery first (as an orchestrator drains), then stopped.
            _write_targets(targets, [killed_at])
            poll("the scaled-down target dropped from discovery",
                 lambda: prometheus.query(f'up{{instance="{scaled_at}"}}') == []
                 or None, detail=prometheus.targets_detail)
            scaled.terminate()
            assert 0 == scaled.wait(timeout=30), "wantel serve did not stop cleanly"
            killed.send_signal(signal.SIGKILL)
            killed.wait(timeout=30)
            page = poll("WantelTargetDown of the killed server at the webhook",
                        lambda: next((a for a in _alerts(hook)
                                      if a["labels"]["alertname"] == "WantelTargetDown"
                                      and a["status"] == "firing"), None),
                        deadline_s=DEADLINE_S,
                        detail=lambda: f"{prometheus.targets_detail()}\n"
                                       f"alerts: {prometheus.query('ALERTS')}\n"
                                       f"webhook: {hook.bodies}")
            assert ("critical", killed_at, "gpu-nodes") == (
                page["labels"]["severity"], page["labels"]["instance"], page["labels"]["job"])
            assert page["annotations"]["runbook_url"].startswith("https://")
            # The scaled-down target left discovery before the killed one went down, and the
            # rules fire at once (no for:): had it been going to page, it would have by now.
            # Prometheus' own view agrees: no alert of any kind names it.
            assert [] == [a for a in _alerts(hook) if a["labels"].get("instance") == scaled_at]
            assert [] == prometheus.query(f'ALERTS{{instance="{scaled_at}"}}')
            pages = {(a["labels"]["alertname"], a["labels"].get("instance"))
                     for a in _alerts(hook) if a["labels"].get("severity") == "critical"}
            assert {("WantelTargetDown", killed_at)} == pages

            # The inhibit rule, in the same Alertmanager: a stall on the down instance is muted
            # while its target is down, a stall on another instance goes out.
            stalled = [{"labels": {"alertname": "WantelJobStalled", "severity": "critical",
                                   "instance": instance, "job_id": f"job-on-{instance}",
                                   "model": "tiny-t2v", "worker": "w1"},
                        "annotations": {"summary": "stalled"}}
                       for instance in (killed_at, "elsewhere:9464")]
            _post_alerts(am, stalled)
            delivered = poll("the other instance's stall at the webhook",
                             lambda: next((a for a in _alerts(hook)
                                           if a["labels"]["alertname"] == "WantelJobStalled"),
                                          None), deadline_s=DEADLINE_S,
                             detail=lambda: f"webhook: {hook.bodies}")
            assert "elsewhere:9464" == delivered["labels"]["instance"]
            states = poll("Alertmanager's verdict on both stalls",
                          lambda: _alert_states(am, "WantelJobStalled", expect=2))
            assert "suppressed" == states[killed_at]["state"]
            assert states[killed_at]["inhibitedBy"]
            assert ("active", []) == (states["elsewhere:9464"]["state"],
                                      states["elsewhere:9464"]["inhibitedBy"])
            assert [] == [a for a in _alerts(hook)
                          if a["labels"]["alertname"] == "WantelJobStalled"
                          and a["labels"]["instance"] == killed_at]
