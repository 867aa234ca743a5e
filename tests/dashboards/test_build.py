"""The generated dashboards: reproducible, structurally sound, and PromQL that parses."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dashboards import specs
from dashboards.build import render_all
from dashboards.outputs import DEFAULT_OUT, DEFAULT_RULES, build_all
from dashboards.rules import RuleParams, render_rules
from wantel.cli import main

REPO = Path(__file__).resolve().parents[2]
PROMTOOL = shutil.which("promtool")
GRID = 24
PANEL_TYPES = {"timeseries", "stat", "bargauge", "row"}
BUILTINS = {"__rate_interval", "__range", "__interval"}
VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
#: Grafana unit ids the dashboards use (from Grafana's valueFormats registry).
UNITS = {"short", "none", "s", "bytes", "percentunit", "celsius", "watt"}
#: Grafana's custom units (``suffix:…``) the dashboards use where it has no id.
CUSTOM_UNITS = {specs.STEPS_PER_S, specs.FRAMES_PER_S, specs.JOBS_PER_MIN, specs.EVENTS_PER_S}
#: Top-level keys of a schemaVersion 41 dashboard as the SDK writes them; anything else is a
#: typo in our builder calls, not something Grafana would read.
DASHBOARD_KEYS = {"annotations", "description", "editable", "fiscalYearStartMonth",
                  "graphTooltip", "links", "panels", "refresh", "schemaVersion", "tags",
                  "templating", "time", "timepicker", "timezone", "title", "uid", "version",
                  "liveNow", "weekStart", "id"}


def _dashboards() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, text in sorted(render_all().items()):
        yield name, json.loads(text)


def test_committed_files_are_what_the_build_writes(tmp_path: Path) -> None:
    """Regenerating gives byte-identical dashboards and rule file to the committed ones."""
    changed = build_all(tmp_path)
    written = {path.name: path.read_bytes() for path in changed}
    committed = {path.name: path.read_bytes() for path in sorted(DEFAULT_OUT.glob("*.json"))}
    committed[DEFAULT_RULES.name] = DEFAULT_RULES.read_bytes()
    assert committed == written


def test_build_twice_is_byte_identical(tmp_path: Path) -> None:
    """A second build in the same process renders exactly the same bytes."""
    first = render_all()
    assert first == render_all()
    assert render_rules() == render_rules(RuleParams())


def test_cli_build_writes_into_out_dir(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`wantel dashboards build --out DIR` writes six dashboards and the rules, then is idle."""
    try:
        code = main(["dashboards", "build", "--out", str(tmp_path)])
    except SystemExit as exc:  # the command is not registered in wantel/cli.py yet
        pytest.skip(f"wantel dashboards is not registered ({exc})")
    assert 0 == code
    expected = sorted([*(f"{d.slug}.json" for d in specs.DASHBOARDS), "wantel.yml"])
    assert expected == sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert 0 == main(["dashboards", "build", "--out", str(tmp_path)])
    assert "" == capsys.readouterr().out


def test_six_dashboards_with_unique_uids() -> None:
    """Six dashboards, unique uids and titles, Grafana 11.6's schemaVersion 41."""
    found = dict(_dashboards())
    assert 6 == len(found)
    assert 6 == len({d["uid"] for d in found.values()})
    assert 6 == len({d["title"] for d in found.values()})
    assert {41} == {d["schemaVersion"] for d in found.values()}
    for name, dashboard in found.items():
        assert set(dashboard) <= DASHBOARD_KEYS, (name, set(dashboard) - DASHBOARD_KEYS)
        assert "wantel" in dashboard["tags"]


def _check_variables(name: str, dashboard: dict[str, Any]) -> set[str]:
    variables = dashboard["templating"]["list"]
    names = [v["name"] for v in variables]
    assert len(names) == len(set(names)), name
    datasource = [v for v in variables if v["type"] == "datasource"]
    assert 1 == len(datasource) and "datasource" == datasource[0]["name"], name
    assert "prometheus" == datasource[0]["query"]
    for variable in variables:
        if variable["type"] == "query":
            assert {"type": "prometheus", "uid": "${datasource}"} == variable["datasource"]
            query = variable["query"]
            assert (query if isinstance(query, str) else query["query"]).startswith(
                "label_values("), (name, variable["name"])
        if variable["type"] == "custom":
            assert variable["current"]["value"] in variable["query"].split(","), name
    return set(names)


def _check_layout(name: str, panels: list[dict[str, Any]]) -> None:
    """Panels sit inside the 24-column grid and never overlap."""
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= GRID, (name, panel["title"], pos)
        assert pos["w"] > 0 and pos["h"] > 0, (name, panel["title"])
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}
        assert set() == cells & mine, (name, panel["title"], pos)
        cells |= mine


def test_panels_are_complete_and_consistent() -> None:
    """Every panel: known type, unique id, a question, datasource var, refIds, known units."""
    for name, dashboard in _dashboards():
        defined = _check_variables(name, dashboard) | BUILTINS
        panels = dashboard["panels"]
        _check_layout(name, panels)
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), name
        for panel in panels:
            assert panel["type"] in PANEL_TYPES, (name, panel["type"])
            if panel["type"] == "row":
                continue
            where = (name, panel["title"])
            assert panel["description"].strip(), where
            assert {"type": "prometheus", "uid": "${datasource}"} == panel["datasource"], where
            assert panel["fieldConfig"]["defaults"]["unit"] in UNITS | CUSTOM_UNITS, where
            targets = panel["targets"]
            assert targets, where
            refs = [t["refId"] for t in targets]
            assert [chr(ord("A") + i) for i in range(len(targets))] == refs, where
            for target in targets:
                assert panel["datasource"] == target["datasource"], where
                assert target["expr"].strip(), where
                used = {a or b for a, b in VARIABLE.findall(target["expr"])}
                assert set() == used - defined, where


def test_specs_match_the_generated_panels() -> None:
    """Each spec panel appears once, with its queries in order (nothing dropped by the SDK)."""
    for spec in specs.DASHBOARDS:
        generated = json.loads(render_all()[f"{spec.slug}.json"])
        panels = [p for p in generated["panels"] if p["type"] != "row"]
        assert [p.title for p in spec.panels] == [p["title"] for p in panels]
        assert [[q.expr for q in p.queries] for p in spec.panels] == [
            [t["expr"] for t in p["targets"]] for p in panels]


def test_docs_describe_every_panel() -> None:
    """docs/dashboards.md names every dashboard and every panel."""
    text = (REPO / "docs" / "dashboards.md").read_text()
    missing = [f"{d.title} / {p.title}" for d in specs.DASHBOARDS for p in d.panels
               if p.title not in text] + [d.title for d in specs.DASHBOARDS if d.title not in text]
    assert [] == missing


@pytest.mark.skipif(PROMTOOL is None, reason="no promtool")
def test_every_panel_query_parses_as_promql(tmp_path: Path) -> None:
    """promtool parses every panel query (variables substituted) as a recording rule."""
    values = {"__rate_interval": "1m", "__range": "1h", "__interval": "15s", "model": ".*",
              "device": ".*", "job_id": "some-job", "window": "1h", "scrape_job": "wantel",
              "datasource": "prometheus", "instance": ".*", "worker": ".*"}
    rules: list[dict[str, str]] = []
    for _, dashboard in _dashboards():
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                # The Compare dashboard's $by: every dimension it offers must parse.
                for by in specs.BY.choices:
                    chosen = {**values, "by": by}
                    expr = VARIABLE.sub(lambda m, chosen=chosen: chosen[m.group(1) or m.group(2)],  # type: ignore[misc]
                                        target["expr"])
                    rules.append({"record": f"panel:{len(rules)}", "expr": expr})
                    if "$by" not in target["expr"]:
                        break
    path = tmp_path / "panels.yml"
    path.write_text(json.dumps({"groups": [{"name": "panels", "rules": rules}]}))
    done = subprocess.run([str(PROMTOOL), "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert 0 == done.returncode, done.stdout + done.stderr


def test_every_panel_has_thresholds_and_none_is_red_at_80() -> None:
    """Every panel sets its thresholds: never Grafana's default red at 80, which would paint a
    0-1 ratio or a small count; a ratio panel's steps lie within 0-1."""
    for name, dashboard in _dashboards():
        for panel in dashboard["panels"]:
            if panel["type"] == "row":
                continue
            defaults = panel["fieldConfig"]["defaults"]
            steps = defaults["thresholds"]["steps"]
            where = (name, panel["title"])
            assert steps[0]["value"] is None, where
            assert {"color": "red", "value": 80} not in steps, where
            if defaults["unit"] == "percentunit":
                assert all(0 <= s["value"] <= 1 for s in steps[1:]), where


def test_no_query_or_variable_uses_a_job_label_for_wantel_jobs() -> None:
    """Per-job series are selected by job_id; job is only ever the scrape job."""
    for name, dashboard in _dashboards():
        text = json.dumps(dashboard)
        assert 'job=\\"$job\\"' not in text and "(job," not in text, name
        assert "honor_labels" not in text, name


def test_every_dashboard_filters_by_instance() -> None:
    """Each dashboard has an instance variable, and every query with a wantel series uses it."""
    for name, dashboard in _dashboards():
        names = {v["name"] for v in dashboard["templating"]["list"]}
        assert "instance" in names, name
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                assert "$instance" in target["expr"] or '"$job_id"' in target["expr"], (
                    name, panel["title"])


@pytest.mark.parametrize(("trace_url", "expected"), [
    (None, "http://localhost:16686/search?service=wantel&tags=%7B%22wantel.job%22%3A%22"
           "${job_id}%22%7D"),
    ("https://jaeger.example.com/", "https://jaeger.example.com/search?service=wantel&tags="
                                    "%7B%22wantel.job%22%3A%22${job_id}%22%7D"),
    ("/explore?q={job_id}", "/explore?q=${job_id}"),
])
def test_trace_links_follow_the_configured_backend(trace_url: str | None,
                                                   expected: str) -> None:
    """The job drill-down links traces through the configured backend (Jaeger's search, or
    a template such as Grafana Explore over Tempo)."""
    options = specs.BuildOptions() if trace_url is None else specs.BuildOptions(
        trace_url=trace_url)
    job = json.loads(render_all(options)["job-drilldown.json"])
    urls = [link["url"] for link in job["links"]]
    urls += [link["url"] for panel in job["panels"] for link in panel.get("links", [])]
    assert urls and {expected} == set(urls)


def test_datasource_and_scrape_job_defaults_are_the_options() -> None:
    """``--datasource`` and ``--scrape-job`` become the variables' default selections."""
    options = specs.BuildOptions(datasource="Mimir", scrape_job="gpu-nodes")
    for name, text in render_all(options).items():
        variables = {v["name"]: v for v in json.loads(text)["templating"]["list"]}
        assert "Mimir" == variables["datasource"]["current"]["value"], name
        if "scrape_job" in variables:
            assert "gpu-nodes" == variables["scrape_job"]["current"]["value"], name


def test_cli_takes_the_deployment_flags(tmp_path: Path) -> None:
    """`wantel dashboards build` writes rules for the scrape job with absolute runbook links,
    and dashboards for the trace backend and data source given."""
    assert 0 == main(["dashboards", "build", "--out", str(tmp_path), "--scrape-job", "gpu",
                      "--runbook-url", "https://wiki.example.com/runbooks.md",
                      "--trace-url", "https://tempo-ui.example.com/t?job={job_id}",
                      "--datasource", "Mimir"])
    rules = (tmp_path / "wantel.yml").read_text()
    assert 'up{job=\\"gpu\\"}' in rules or 'up{job="gpu"}' in rules
    assert "https://wiki.example.com/runbooks.md#wanteltargetdown" in rules
    job = (tmp_path / "job-drilldown.json").read_text()
    assert "https://tempo-ui.example.com/t?job=${job_id}" in job and '"Mimir"' in job


@pytest.mark.parametrize("argv", [
    ["--runbook-url", "docs/runbooks.md"],
    ["--trace-url", "jaeger:16686"],
    ["--selector", "namespace=gpu"],
    ["--scrape-job", " "],
    ["--datasource", ""],
])
def test_cli_refuses_bad_deployment_flags(tmp_path: Path, argv: list[str],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A relative runbook URL, a trace URL that is no URL, a selector that is no matcher, an
    empty scrape job or data source: one clear line and exit 2, nothing written."""
    assert 2 == main(["dashboards", "build", "--out", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert 1 == len(err.strip().splitlines()) and argv[0] in err
    assert [] == list(tmp_path.iterdir())
