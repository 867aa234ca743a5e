"""The compose fleet's scrape configuration, against a real Prometheus and real ``wantel serve``
endpoints: the aggregator's series keep their names, each worker's are renamed
``wantel_worker_*`` (so no dashboard's sum counts a job twice) and stay queryable per node."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from telemetry.log.local import LocalLog
from tests.e2e.servers import PROMETHEUS, REPO_PROMETHEUS_CONFIG, poll, run_prometheus

pytestmark = pytest.mark.skipif(not PROMETHEUS.exists(), reason="no /usr/bin/prometheus")


@contextlib.contextmanager
def serving(log_dir: Path) -> Iterator[str]:
    """`wantel serve --log DIR --port 0`'s machinery, in this process; yields host:port."""
    from wantel.cli import build_parser
    from wantel.serving import open_serving

    LocalLog(log_dir).close()
    args = build_parser("serve").parse_args(["serve", "--log", str(log_dir), "--port", "0"])
    server = open_serving(args)
    server.start()
    try:
        yield server.url.split("//", 1)[1].rstrip("/")
    finally:
        server.stop()


def fleet_config(aggregator: str, workers: list[str]) -> str:
    """The repository's prometheus.yml with its targets on loopback, intervals of 1 s."""
    config: dict[str, Any] = yaml.safe_load(REPO_PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s",
                            evaluation_interval="1s")
    config.pop("alerting")
    config["rule_files"] = []
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["wantel"].update(scrape_interval="1s", static_configs=[{"targets": [aggregator]}])
    jobs["wantel-workers"].update(scrape_interval="1s",
                                  static_configs=[{"targets": workers}])
    config["scrape_configs"] = [jobs["wantel"], jobs["wantel-workers"]]
    return str(yaml.safe_dump(config, sort_keys=False))


def test_workers_series_are_renamed_and_the_aggregators_kept(tmp_path: Path) -> None:
    """Both scrape jobs of dashboards/prometheus/prometheus.yml, one target each."""
    with contextlib.ExitStack() as stack:
        aggregator = stack.enter_context(serving(tmp_path / "agg"))
        worker = stack.enter_context(serving(tmp_path / "wa"))
        prom = stack.enter_context(run_prometheus(tmp_path / "prom",
                                                  fleet_config(aggregator, [worker])))
        renamed = poll("the worker's series renamed",
                       lambda: prom.query("wantel_worker_build_info") or None,
                       detail=prom.targets_detail)
        kept = poll("the aggregator's series", lambda: prom.query("wantel_build_info") or None,
                    detail=prom.targets_detail)
    assert [worker] == [series["metric"]["instance"] for series in renamed]
    assert [aggregator] == [series["metric"]["instance"] for series in kept]
    assert {"wantel-workers"} == {series["metric"]["job"] for series in renamed}
