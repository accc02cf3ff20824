"""A small typed builder for Grafana dashboards: the one source of dashboards/*.json.

Dashboards are declared as frozen dataclasses (`Dashboard` of `Row`s of panels, `Query`s,
variables) and rendered by `Dashboard.to_json()` into the JSON model Grafana 11 stores
(schemaVersion 39). The builder lays panels out itself: each row spans the full width and
its panels flow left to right in Grafana's 24-column grid, wrapping to a new line; panel ids
follow document order. Everything Grafana needs but gradwatch never varies (tooltip mode,
legend layout, the heatmap's colours) is fixed here, so the dashboard modules say only what
differs. Every panel and query uses the `datasource` variable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

__all__ = ["DATASOURCE", "Dashboard", "DatasourceVariable", "Heatmap", "Link", "Query", "QueryVariable", "Row",
           "Stat", "Table", "TimeSeries"]

DATASOURCE: dict[str, str] = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39  # Grafana 11.1, the version deploy/docker-compose.yml pins
GRID_WIDTH = 24
Json = dict[str, Any]


@dataclass(frozen=True)
class Query:
    """One PromQL target; `legend` is Grafana's legend format (``{{label}}`` placeholders)."""

    expr: str
    legend: str = "__auto"
    table: bool = False  # an instant query shown as a table, instead of a range query over time

    def to_json(self, ref_id: str) -> Json:
        out: Json = {"datasource": DATASOURCE, "refId": ref_id, "expr": self.expr, "legendFormat": self.legend,
                     "range": not self.table, "instant": self.table, "editorMode": "code"}
        if self.table:
            out["format"] = "table"
        return out


@dataclass(frozen=True)
class Link:
    """A data link on a panel's series or a table column; `url` may use Grafana's variables."""

    title: str
    url: str

    def to_json(self) -> Json:
        return {"title": self.title, "url": self.url}


@dataclass(frozen=True)
class TimeSeries:
    """A time series panel. `thresholds` are (value, colour) steps above the `base` colour,
    drawn as lines and areas when given (a band: a base colour below it, green in it, red above),
    as lines only with `threshold_lines` (a reference value); `dashed` lists the refIds drawn dashed."""

    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    log: bool = False
    min: float | None = None
    max: float | None = None
    thresholds: tuple[tuple[float, str], ...] = ()
    base: str = "green"
    threshold_lines: bool = False
    dashed: tuple[str, ...] = ()
    links: tuple[Link, ...] = ()
    width: int = 12
    height: int = 9

    def body(self) -> Json:
        defaults: Json = {
            "unit": self.unit,
            "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 0, "showPoints": "never",
                       "spanNulls": False,
                       "scaleDistribution": {"type": "log", "log": 10} if self.log else {"type": "linear"},
                       "thresholdsStyle": {"mode": self._threshold_style()}},
            "thresholds": _thresholds(self.thresholds, self.base),
            "color": {"mode": "palette-classic"},
        }
        if self.min is not None:
            defaults["min"] = self.min
        if self.max is not None:
            defaults["max"] = self.max
        overrides = [{"matcher": {"id": "byFrameRefID", "options": ref},
                      "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}]}
                     for ref in self.dashed]
        out: Json = {"type": "timeseries", "fieldConfig": {"defaults": defaults, "overrides": overrides},
                     "options": {"legend": {"displayMode": "table", "placement": "bottom", "showLegend": True,
                                            "calcs": ["lastNotNull", "max"]},
                                 "tooltip": {"mode": "multi", "sort": "desc"}}}
        if self.links:
            out["links"] = [link.to_json() for link in self.links]
        return out

    def _threshold_style(self) -> str:
        if not self.thresholds:
            return "off"
        return "line" if self.threshold_lines else "line+area"


@dataclass(frozen=True)
class Heatmap:
    """One series per row, coloured by value (already log10 in the query when it should be):
    Grafana's heatmap with "calculate" off, rows in the order the query returns them."""

    title: str
    description: str
    queries: tuple[Query, ...]
    width: int = 12
    height: int = 10

    def body(self) -> Json:
        return {"type": "heatmap",
                "fieldConfig": {"defaults": {"custom": {"hideFrom": {"legend": False, "tooltip": False, "viz": False},
                                                        "scaleDistribution": {"type": "linear"}}},
                                "overrides": []},
                "options": {"calculate": False, "cellGap": 1, "cellValues": {"decimals": 1},
                            "color": {"mode": "scheme", "scheme": "Spectral", "scale": "linear", "steps": 64,
                                      "reverse": False, "exponent": 0.5, "fill": "dark-orange"},
                            "rowsFrame": {"layout": "auto"}, "showValue": "never", "legend": {"show": True},
                            "yAxis": {"axisPlacement": "left", "reverse": False},
                            "tooltip": {"mode": "single", "yHistogram": False, "showColorScale": True},
                            "exemplars": {"color": "rgba(255,0,255,0.7)"}}}


@dataclass(frozen=True)
class Table:
    """A table of instant queries; `transformations` and `overrides` are Grafana's own JSON."""

    title: str
    description: str
    queries: tuple[Query, ...]
    transformations: tuple[Json, ...] = ()
    overrides: tuple[Json, ...] = ()
    width: int = 24
    height: int = 8

    def body(self) -> Json:
        return {"type": "table", "transformations": list(self.transformations),
                "fieldConfig": {"defaults": {"custom": {"align": "auto", "cellOptions": {"type": "auto"}}},
                                "overrides": list(self.overrides)},
                "options": {"showHeader": True, "cellHeight": "sm",
                            "footer": {"show": False, "reducer": ["sum"], "fields": ""}}}


@dataclass(frozen=True)
class Stat:
    """Big numbers: the last value of each query; `overrides` are Grafana's own JSON."""

    title: str
    description: str
    queries: tuple[Query, ...]
    overrides: tuple[Json, ...] = ()
    width: int = 6
    height: int = 7

    def body(self) -> Json:
        return {"type": "stat",
                "fieldConfig": {"defaults": {"thresholds": _thresholds(()), "unit": "short"},
                                "overrides": list(self.overrides)},
                "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                            "colorMode": "value", "graphMode": "none", "justifyMode": "auto", "orientation": "auto",
                            "textMode": "auto", "wideLayout": True, "showPercentChange": False}}


Panel = Union[TimeSeries, Heatmap, Table, Stat]


@dataclass(frozen=True)
class Row:
    """A titled row of panels; a collapsed row holds its panels until opened."""

    title: str
    panels: tuple[Panel, ...]
    collapsed: bool = False


@dataclass(frozen=True)
class DatasourceVariable:
    """`$datasource`: any Prometheus-compatible data source (Prometheus, VictoriaMetrics, Mimir)."""

    name: str = "datasource"
    label: str = "Prometheus"

    def to_json(self) -> Json:
        return {"name": self.name, "label": self.label, "type": "datasource", "query": "prometheus", "current": {},
                "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1, "regex": "",
                "skipUrlSync": False}


@dataclass(frozen=True)
class QueryVariable:
    """A variable filled by a query: ``label_values(selector, label)``, or
    ``query_result(expr)`` with a `regex` whose named groups `text` and `value` give each
    option's shown name and its value. `all_value` is what "All" stands for (None: every
    option, as a regex alternation). `sort`: Grafana's code (1 alphabetical, 7 natural)."""

    name: str
    label: str
    query: str
    multi: bool = False
    include_all: bool = False
    all_value: str | None = None
    regex: str = ""
    sort: int = 1

    def to_json(self) -> Json:
        query_type = 3 if self.query.startswith("query_result(") else 1  # Grafana's PromVariableQueryType
        out: Json = {"name": self.name, "label": self.label, "type": "query", "datasource": DATASOURCE,
                     "definition": self.query,
                     "query": {"query": self.query, "refId": f"{self.name}-query", "qryType": query_type},
                     "current": {}, "hide": 0, "includeAll": self.include_all, "multi": self.multi, "options": [],
                     "refresh": 2, "regex": self.regex, "sort": self.sort, "skipUrlSync": False}
        if self.all_value is not None:
            out["allValue"] = self.all_value
        return out


Variable = Union[DatasourceVariable, QueryVariable]

#: the link every gradwatch dashboard carries: a menu of the others (by tag), keeping time and variables
DASHBOARD_LINKS: tuple[Json, ...] = ({"title": "gradwatch", "type": "dashboards", "tags": ["gradwatch"],
                                     "asDropdown": False, "includeVars": True, "keepTime": True,
                                     "icon": "external link", "targetBlank": False, "tooltip": "", "url": ""},)


@dataclass(frozen=True)
class Dashboard:
    """A whole dashboard: identity, variables and rows; `to_json()` is what Grafana imports."""

    uid: str
    title: str
    description: str
    variables: tuple[Variable, ...]
    rows: tuple[Row, ...]
    tags: tuple[str, ...] = ("gradwatch",)
    links: tuple[Json, ...] = DASHBOARD_LINKS

    def to_json(self) -> Json:
        panels: list[Json] = []
        next_id, y = 1, 0
        for row in self.rows:
            row_json: Json = {"id": next_id, "type": "row", "title": row.title, "collapsed": row.collapsed,
                              "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y}, "panels": []}
            next_id, y = next_id + 1, y + 1
            laid, next_id, y = _layout(row.panels, next_id, y)
            panels.append(row_json)
            if row.collapsed:
                row_json["panels"] = laid
            else:
                panels.extend(laid)
        return {
            "uid": self.uid, "title": self.title, "description": self.description, "tags": list(self.tags),
            "editable": False, "graphTooltip": 1, "schemaVersion": SCHEMA_VERSION, "version": 1, "refresh": "10s",
            "timezone": "", "time": {"from": "now-1h", "to": "now"}, "timepicker": {}, "fiscalYearStartMonth": 0,
            "liveNow": False, "weekStart": "", "links": list(self.links),
            "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                      "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                      "name": "Annotations & Alerts", "type": "dashboard"}]},
            "templating": {"list": [v.to_json() for v in self.variables]},
            "panels": panels,
        }


def _layout(row_panels: tuple[Panel, ...], next_id: int, y: int) -> tuple[list[Json], int, int]:
    """Panels placed left to right from `y`, wrapping at the grid's width; returns them, the
    next free id and the next free line."""
    out: list[Json] = []
    x, line_height = 0, 0
    for panel in row_panels:
        if x + panel.width > GRID_WIDTH:
            x, y, line_height = 0, y + line_height, 0
        out.append({"id": next_id, "title": panel.title, "description": panel.description,
                    "datasource": DATASOURCE, "gridPos": {"x": x, "y": y, "w": panel.width, "h": panel.height},
                    "targets": [q.to_json(chr(ord("A") + i)) for i, q in enumerate(panel.queries)], **panel.body()})
        next_id, x, line_height = next_id + 1, x + panel.width, max(line_height, panel.height)
    return out, next_id, y + line_height


def _thresholds(steps: tuple[tuple[float, str], ...], base: str = "green") -> Json:
    return {"mode": "absolute",
            "steps": [{"color": base, "value": None}, *({"color": c, "value": v} for v, c in steps)]}
