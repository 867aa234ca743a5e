"""Turn :mod:`dashboards.specs` into Grafana dashboard JSON with ``grafana-foundation-sdk``.

Grafana's own SDK (pinned ``1769699379!11.6.0``, schemaVersion 41) builds the JSON, so field
names, defaults and nesting are Grafana's, not ours; this module only maps each spec to the
SDK's builders and fixes what the SDK leaves open: every query gets a ``refId`` (A, B, …),
every panel and variable names the ``${datasource}`` variable, panels get stable ids and are
laid out on the 24-column grid row by row, and the ``auto*`` keys the SDK adds to every
variable are kept only on interval variables (the only kind Grafana's schema gives them).
Output is ``json.dumps(..., sort_keys=True, indent=2)`` plus a newline, so regenerating gives
byte-identical files.
"""

from __future__ import annotations

import json
import string
from typing import Any, Final

from grafana_foundation_sdk.builders import bargauge, common, prometheus, stat, timeseries
from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

from dashboards import specs

DATASOURCE_REF: Final = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
GRID_WIDTH: Final = 24


def _target(query: specs.Query, ref_id: str) -> prometheus.Dataquery:
    target = (prometheus.Dataquery().expr(query.expr).legend_format(query.legend)
              .ref_id(ref_id).datasource(DATASOURCE_REF).range())
    if query.exemplar:
        target = target.exemplar(True)
    return target


def _thresholds(spec: specs.Panel) -> Any:
    """The panel's threshold steps: its base colour, then its own steps (never Grafana's
    default red at 80, which means nothing for ratios of 0-1 or for counts)."""
    return (gd.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE)
            .steps([dm.Threshold(None, spec.base_color),
                    *(dm.Threshold(value, color) for value, color in spec.thresholds)]))


def _panel(spec: specs.Panel, options: specs.BuildOptions) -> Any:
    """The SDK builder for one panel spec."""
    builder: Any
    if spec.kind == "stat":
        builder = stat.Panel().graph_mode(cm.BigValueGraphMode.AREA)
    elif spec.kind == "bargauge":
        builder = (bargauge.Panel().orientation(cm.VizOrientation.HORIZONTAL)
                   .display_mode(cm.BarGaugeDisplayMode.GRADIENT))
    else:
        builder = (timeseries.Panel().line_width(1).fill_opacity(10)
                   .show_points(cm.VisibilityMode.NEVER)
                   .legend(common.VizLegendOptions().show_legend(True)
                           .display_mode(cm.LegendDisplayMode.LIST)
                           .placement(cm.LegendPlacement.BOTTOM))
                   .tooltip(common.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI)
                            .sort(cm.SortOrder.DESCENDING)))
        if spec.stack:
            builder = builder.stacking(common.StackingConfig().mode(cm.StackingMode.NORMAL))
        if spec.line_at is not None:  # the base step (-Infinity) draws nothing
            builder = (builder
                       .thresholds(gd.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE)
                                   .steps([dm.Threshold(None, "transparent"),
                                           dm.Threshold(spec.line_at, "green")]))
                       .thresholds_style(common.GraphThresholdsStyleConfig()
                                         .mode(cm.GraphThresholdsStyleMode.DASHED)))
    if spec.kind != "timeseries" or spec.line_at is None:
        builder = builder.thresholds(_thresholds(spec))
    builder = (builder.title(spec.title).description(spec.question).unit(spec.unit)
               .datasource(DATASOURCE_REF).height(spec.height).span(spec.width))
    if spec.minimum is not None:
        builder = builder.min(spec.minimum)
    if spec.maximum is not None:
        builder = builder.max(spec.maximum)
    if spec.no_value is not None:
        builder = builder.no_value(spec.no_value)
    if spec.links:
        builder = builder.links([gd.DashboardLink(link.title).type(dm.DashboardLinkType.LINK)
                                 .url(_url(link, options)).target_blank(True)
                                 for link in spec.links])
    for index, query in enumerate(spec.queries):
        builder = builder.with_target(_target(query, string.ascii_uppercase[index]))
    return builder


def _url(link: specs.Link, options: specs.BuildOptions) -> str:
    """A link's URL, the trace link resolved for the configured trace backend."""
    return specs.trace_link(options.trace_url) if link.url == specs.TRACE_LINK else link.url


def _current(value: str) -> dm.VariableOption:
    return dm.VariableOption(selected=True, text=value, value=value)


def _variable(spec: specs.Variable, options: specs.BuildOptions) -> Any:
    """The SDK builder for one template variable."""
    if spec.kind == "datasource":
        return (gd.DatasourceVariable(spec.name).label(spec.label).type(spec.query)
                .current(_current(options.datasource)))
    if spec.kind == "custom":
        default = spec.default or spec.choices[0]
        return (gd.CustomVariable(spec.name).label(spec.label).values(",".join(spec.choices))
                .current(dm.VariableOption(selected=True, text=default, value=default))
                .options([dm.VariableOption(selected=choice == default, text=choice,
                                            value=choice) for choice in spec.choices]))
    builder = (gd.QueryVariable(spec.name).label(spec.label).query(spec.query)
               .datasource(DATASOURCE_REF).refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
               .sort(dm.VariableSort.ALPHABETICAL_ASC))
    if spec.multi:
        builder = builder.multi(True)
    if spec.include_all:
        builder = builder.include_all(True).all_value(".*")
    if spec.hidden:
        builder = builder.hide(dm.VariableHide.HIDE_VARIABLE)
    if spec is specs.SCRAPE_JOB:
        builder = builder.current(
            _current(options.scrape_job) if options.scrape_job
            else dm.VariableOption(selected=True, text="All", value="$__all"))
    return builder


def build(spec: specs.Dashboard, options: specs.BuildOptions | None = None) -> dm.Dashboard:
    """The SDK's dashboard model for one spec, for a deployment's ``options``."""
    options = options or specs.BuildOptions()
    builder = (gd.Dashboard(spec.title).uid(spec.uid).description(spec.description)
               .tags(list(spec.tags)).editable().refresh("10s")
               .time(spec.time_from, "now").timezone("browser")
               .tooltip(dm.DashboardCursorSync.CROSSHAIR))
    for variable in spec.variables:
        builder = builder.with_variable(_variable(variable, options))
    for link in spec.links:
        builder = builder.link(gd.DashboardLink(link.title).type(dm.DashboardLinkType.LINK)
                               .url(_url(link, options)).target_blank(True)
                               .include_vars(False)
                               .keep_time(False))
    next_id = 1  # Grafana keys panel state (links, fullscreen) by id: stable, unique, from 1
    for row in spec.rows:
        builder = builder.with_row(gd.Row(row.title).id(next_id))
        next_id += 1
        for panel in row.panels:
            builder = builder.with_panel(_panel(panel, options).id(next_id))
            next_id += 1
    return builder.build()


#: Keys the SDK writes on every variable that only interval variables have in Grafana's
#: ``VariableModel`` (``@grafana/schema``): dropped elsewhere so the JSON matches the schema.
INTERVAL_ONLY_KEYS: Final = ("auto", "auto_count", "auto_min")


def to_dict(model: dm.Dashboard) -> dict[str, Any]:
    """The dashboard as Grafana's JSON model, without the SDK's interval-only variable keys."""
    data: dict[str, Any] = json.loads(json.dumps(model, cls=JSONEncoder))
    for variable in data.get("templating", {}).get("list", []):
        if variable.get("type") != "interval":
            for key in INTERVAL_ONLY_KEYS:
                variable.pop(key, None)
    return data


def to_json(model: dm.Dashboard) -> str:
    """Deterministic JSON text of a dashboard model."""
    return json.dumps(to_dict(model), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def render_all(options: specs.BuildOptions | None = None) -> dict[str, str]:
    """``{file name: JSON text}`` of every dashboard, for a deployment's ``options``."""
    return {f"{spec.slug}.json": to_json(build(spec, options)) for spec in specs.DASHBOARDS}


__all__ = ["build", "render_all", "to_dict", "to_json"]
