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
    Webhook,
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
    """A job held mid-denoise is reported stalled, with its job label and runbook, by webhook."""
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
            assert ("stuck-job", "tiny-t2v", "page") == (
                alert["labels"]["job"], alert["labels"]["model"], alert["labels"]["severity"])
            assert alert["annotations"]["runbook_url"].endswith("#wanteljobstalled")
    finally:
        serving.stop()
        log.close()
