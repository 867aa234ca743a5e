"""Alert rules, their promtool tests and runbooks; the Prometheus, Alertmanager, compose files."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards.rules import (
    DEFAULT_RUNBOOK_URL,
    RuleParams,
    alert_rules,
    anchor,
    recording_rules,
    render_rules,
)

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "dashboards" / "alerts" / "wantel.yml"
RULE_TESTS = sorted((REPO / "dashboards" / "alerts" / "tests").glob("*.yml"))
PROMETHEUS_CONFIG = REPO / "dashboards" / "prometheus" / "prometheus.yml"
ALERTMANAGER_CONFIG = REPO / "dashboards" / "alertmanager" / "alertmanager.yml"
COMPOSE = REPO / "docker-compose.yml"
PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")
DOCKER_COMPOSE = shutil.which("docker-compose")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="no promtool (Debian prometheus)")


def _run(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=120, cwd=cwd)


@needs_promtool
def test_rule_file_passes_promtool_check() -> None:
    """promtool accepts the committed rule file."""
    done = _run(str(PROMTOOL), "check", "rules", str(RULES))
    assert 0 == done.returncode, done.stdout + done.stderr


@needs_promtool
def test_fast_rules_pass_promtool_check(tmp_path: Path) -> None:
    """The test-timed rendering of the same rules is valid too."""
    path = tmp_path / "fast.yml"
    path.write_text(render_rules(RuleParams.fast()))
    done = _run(str(PROMTOOL), "check", "rules", str(path))
    assert 0 == done.returncode, done.stdout + done.stderr


@needs_promtool
@pytest.mark.parametrize("test_file", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_rule_tests_pass(test_file: Path) -> None:
    """Each promtool unit-test file passes: alerts fire where they should, and only there."""
    done = _run(str(PROMTOOL), "test", "rules", test_file.name, cwd=test_file.parent)
    assert 0 == done.returncode, done.stdout + done.stderr


def _alert_tests() -> list[dict[str, Any]]:
    cases = []
    for path in RULE_TESTS:
        for group in yaml.safe_load(path.read_text())["tests"]:
            cases += group.get("alert_rule_test", [])
    return cases


def test_every_alert_has_firing_and_silent_cases() -> None:
    """Each alert has a promtool case where it fires and one where it stays silent."""
    cases = _alert_tests()
    names = [rule.name for rule in alert_rules(RuleParams())]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    silent = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert ([], []) == ([n for n in names if n not in fires], [n for n in names if n not in silent])


def test_every_alert_has_a_runbook_section() -> None:
    """Each alert's runbook_url anchor is a heading of docs/runbooks.md."""
    text = (REPO / "docs" / "runbooks.md").read_text()
    headings = {line[3:].strip().lower() for line in text.splitlines() if line.startswith("## ")}
    rules = yaml.safe_load(RULES.read_text())["groups"]
    alerts = [r for g in rules for r in g["rules"] if "alert" in r]
    assert len(alerts) == len(alert_rules(RuleParams()))
    for alert in alerts:
        url = alert["annotations"]["runbook_url"]
        assert url == f"{DEFAULT_RUNBOOK_URL}#{anchor(alert['alert'])}"
        assert url.startswith("https://")
        assert url.split("#")[1] in headings


def test_alerts_use_kube_prometheus_severities() -> None:
    """Severities are critical or warning only (kube-prometheus' convention)."""
    assert {"critical", "warning"} == {rule.severity for rule in alert_rules(RuleParams())}


def test_no_rule_depends_on_a_scrape_job_name_unless_asked() -> None:
    """The default rules name no scrape job; with matchers, every selector of a wantel series
    and of ``up`` carries them (and promtool accepts the result)."""
    assert 'job="' not in render_rules(RuleParams())
    params = RuleParams(matchers='job="gpu-nodes",namespace="ml"')
    text = "\n".join(rule.expr for rule in [*recording_rules(params), *alert_rules(params)])
    selectors = re.findall(r"\b(wantel_[a-z_]+|up)\b(\{[^}]*\})?", text)
    assert selectors
    missing = [name for name, labels in selectors
               if 'job="gpu-nodes",namespace="ml"' not in labels]
    assert [] == missing


def test_no_per_job_label_is_called_job() -> None:
    """Running jobs are keyed by job_id; ``job`` appears only as the scrape job, beside
    ``instance``, in the target-down rule."""
    text = render_rules(RuleParams())
    assert "on (job)" not in text and "$labels.job " not in text and "job, model" not in text
    assert ["(job, instance)", "(job, instance)"] == re.findall(r"\(job\b[^)]*\)", text)


@needs_promtool
def test_prometheus_config_passes_promtool() -> None:
    """promtool accepts the config compose mounts, including the rule file it references."""
    done = _run(str(PROMTOOL), "check", "config", str(PROMETHEUS_CONFIG))
    assert 0 == done.returncode, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout + done.stderr


def test_prometheus_config_needs_no_honor_labels() -> None:
    """The shipped scrape config keeps Prometheus' own target labels (no honor_labels)."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert [] == [job["job_name"] for job in config["scrape_configs"] if "honor_labels" in job]
    assert "honor_labels" not in PROMETHEUS_CONFIG.read_text().replace("No honor_labels", "")


def test_inhibition_is_scoped_by_instance() -> None:
    """A target that is down mutes only its own alerts: every inhibit rule is equal on
    instance."""
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    assert config["inhibit_rules"]
    assert all(["instance"] == rule["equal"] for rule in config["inhibit_rules"])


@pytest.mark.skipif(AMTOOL is None, reason="no amtool (Debian prometheus-alertmanager)")
def test_alertmanager_config_passes_amtool() -> None:
    """amtool accepts the Alertmanager config compose mounts."""
    done = _run(str(AMTOOL), "check-config", str(ALERTMANAGER_CONFIG))
    assert 0 == done.returncode, done.stdout + done.stderr


@pytest.mark.skipif(DOCKER_COMPOSE is None, reason="no docker-compose (Debian, v1)")
def test_compose_file_is_valid(tmp_path: Path) -> None:
    """Debian's docker-compose (v1) accepts docker-compose.yml and resolves every service."""
    done = _run(str(DOCKER_COMPOSE), "-f", str(COMPOSE), "config", "--services")
    assert 0 == done.returncode, done.stdout + done.stderr
    assert ["alertmanager", "grafana", "jaeger", "nats", "prometheus", "wantel", "worker-a",
            "worker-b"] == sorted(done.stdout.split())


def test_compose_mounts_the_tested_files() -> None:
    """Every host path compose mounts exists, and the configs are the files tested here."""
    compose = yaml.safe_load(COMPOSE.read_text())
    mounted: set[Path] = set()
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                path = (REPO / source).resolve()
                assert path.exists(), volume
                mounted.add(path)
    expected = {PROMETHEUS_CONFIG, RULES.parent, ALERTMANAGER_CONFIG,
                REPO / "dashboards" / "generated",
                REPO / "deploy" / "nats" / "nats-server.conf",  # what tests/nats_server.py runs
                REPO / "deploy" / "fleet" / "worker.sh"}
    assert set() == expected - mounted
    for service in compose["services"].values():
        image = service.get("image", "")
        assert "wantel:local" == image or (":" in image and not image.endswith(":latest")), image
