"""The generated dashboards validate against Grafana's own Dashboard type, as a JSON Schema.

The schema is derived from ``@grafana/schema`` 11.6.0 (the version of the Grafana image in
docker-compose.yml) by ``ts-json-schema-generator``; ``fixtures/make_grafana_schema.sh`` makes it.
Every object in it forbids unknown keys, so a misspelt field fails here, not silently in Grafana.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dashboards.build import render_all

jsonschema = pytest.importorskip("jsonschema")

SCHEMA = Path(__file__).parent / "fixtures" / "grafana-dashboard.schema.json"


def _validator() -> Any:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("name", sorted(render_all()))
def test_dashboard_matches_grafana_schema(name: str) -> None:
    """Each generated dashboard has no schema violation."""
    dashboard = json.loads(render_all()[name])
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in _validator().iter_errors(dashboard)]
    assert [] == errors


def test_schema_rejects_unknown_keys() -> None:
    """The schema is strict: an unknown panel key or a mistyped gridPos fails validation."""
    dashboard = json.loads(render_all()["fleet-overview.json"])
    dashboard["panels"][1]["legendd"] = {}
    dashboard["panels"][2]["gridPos"]["w"] = "wide"
    errors = sorted(e.message for e in _validator().iter_errors(dashboard))
    assert 2 == len(errors)
