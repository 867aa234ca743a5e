"""Alert rules, their promtool tests and runbooks; the Prometheus, Alertmanager, compose files."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards.rules import RuleParams, alert_rules, anchor, render_rules

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
        assert url == f"docs/runbooks.md#{anchor(alert['alert'])}"
        assert url.split("#")[1] in headings


@needs_promtool
def test_prometheus_config_passes_promtool() -> None:
    """promtool accepts the config compose mounts, including the rule file it references."""
    done = _run(str(PROMTOOL), "check", "config", str(PROMETHEUS_CONFIG))
    assert 0 == done.returncode, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout + done.stderr


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
    assert ["alertmanager", "grafana", "jaeger", "prometheus", "wantel"] == sorted(
        done.stdout.split())


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
                REPO / "dashboards" / "generated"}
    assert set() == expected - mounted
    for service in compose["services"].values():
        image = service.get("image", "")
        assert "wantel:local" == image or (":" in image and not image.endswith(":latest")), image
