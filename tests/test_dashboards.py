"""Grafana dashboards are code: structure, datasource variable, and every query checked
against what `gradwatch serve` really serves.

The served metric names and labels are not a list written here: a real training run is
recorded with the agent (clipping by norm, ReLU and Tanh layers, two param groups, an
extra scalar), ingested by a real `gradwatch serve --per-param` subprocess, and its
`/metrics` text is parsed (`served` fixture, shared with tests/test_deploy.py). Every
metric name and label in a dashboard query or an alert rule must appear there. The
queries are also parsed by promtool and, in the slow test, run against a real Prometheus
scraping that service: each one must succeed and (but for three named ones) return data.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.prometheus import (PrometheusServer, free_port, http_get, require_binary, wait_until)
from tests.fixtures.service import ServeProcess

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_FILES = sorted((ROOT / "dashboards").glob("*.json"))
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
#: series Prometheus itself adds to every scrape target (used by GradwatchExporterDown)
PROMETHEUS_SERIES = {"up": {"job", "instance"}}
#: labels Prometheus attaches to every scraped series
TARGET_LABELS = {"job", "instance"}
STEPS = 12

TRAIN_CONFIG = {"clip": {"mode": "norm", "max_norm": 0.05},
                "measure": {"flush_every": 4, "param_every": 2, "update_ratio_every": 2, "activation_every": 2}}


# --------------------------------------------------------------------------- the real exporter
@dataclass
class Served:
    """A running `gradwatch serve` with one finished run in its home, and what it serves."""

    address: str                   # host:port of /metrics
    run: str                       # the run id
    labels: dict[str, set[str]]    # sample name on /metrics -> its label names


def _train(home: Path) -> str:
    """Record a small real training run with the agent; return its run id."""
    import torch

    import gradwatch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 1))
    opt = torch.optim.SGD([{"params": list(model[0].parameters()) + list(model[2].parameters()), "lr": 0.05},
                           {"params": model[4].parameters(), "lr": 0.01}])
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    with gradwatch.watch(model, opt, run="dashboards", config={**TRAIN_CONFIG, "home": str(home)}) as watcher:
        for _ in range(STEPS):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            watcher.log(loss=loss, accuracy=0.5)
        return watcher.run_id


def _parse(text: str) -> dict[str, set[str]]:
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def start_served(home: Path) -> tuple[ServeProcess, Served]:
    """Train a run into `home`, start `gradwatch serve` on it and wait until it serves all of it."""
    run = _train(home)
    port = free_port()
    serve = ServeProcess(["--home", str(home), "--port", str(port), "--per-param", "--grace", "3600",
                          "--poll-interval", "0.1"], home / "serve.log")
    serve.started()

    def complete() -> dict[str, set[str]] | None:
        text = http_get(f"http://127.0.0.1:{port}/metrics").decode()
        # the close record is the log's last: once the end time is served, all of it is
        return _parse(text) if f'gradwatch_run_end_time_seconds{{run="{run}"}}' in text else None

    labels = wait_until(complete, "serve to export the finished run")
    return serve, Served(f"127.0.0.1:{port}", run, labels)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    serve, result = start_served(tmp_path_factory.mktemp("served"))
    try:
        yield result
    finally:
        assert serve.stop() == 0


# --------------------------------------------------------------------------- PromQL helpers
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_SELECTOR = re.compile(r"(?<![\w:$])([a-zA-Z_:][\w:]*)?\s*\{([^{}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*(\"(?:\\.|[^\"\\])*\")")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENT = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
             "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Every metric name a PromQL expression selects (functions, keywords, labels excluded)."""
    names = {name for name, _ in selectors(expr) if name}
    rest = _SELECTOR.sub(" ", _STRING.sub('""', expr))
    rest = _RANGE.sub(" ", _GROUPING.sub(" ", rest))
    names |= {m.group(1) for m in _IDENT.finditer(rest) if m.group(1).lower() not in _KEYWORDS}
    return names


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric name, {label: quoted value}) of each `name{...}` selector."""
    def name(m: re.Match[str]) -> str:
        return "" if m.group(1) is None or m.group(1).lower() in _KEYWORDS else m.group(1)

    return [(name(m), {lm.group(1): lm.group(3) for lm in _MATCHER.finditer(m.group(2))})
            for m in _SELECTOR.finditer(expr)]


def check_against_served(expr: str, labels: dict[str, set[str]]) -> list[str]:
    """Problems of one expression: metric names not served, label matchers on labels the
    metric does not have."""
    known = {**labels, **PROMETHEUS_SERIES}
    problems = [f"{name!r} is not served by gradwatch serve" for name in sorted(metric_names(expr))
                if name not in known]
    for name, matchers in selectors(expr):
        if "__name__" in matchers:
            problems.append(f"selecting by __name__ ({matchers['__name__']}) escapes this check")
        for label in matchers:
            if name in known and label not in known[name] | TARGET_LABELS:
                problems.append(f"{name} has no label {label!r} (served: {sorted(known[name])})")
    return problems


def check_syntax(exprs: dict[str, str], workdir: Path) -> None:
    """Parse every expression with promtool (as recording rules of a throwaway file)."""
    promtool = require_binary("promtool")
    rules = {"groups": [{"name": "syntax", "rules": [{"record": f"check:expr_{i}", "expr": expr}
                                                     for i, expr in enumerate(exprs.values())]}]}
    path = workdir / "syntax-rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n" + "\n".join(
        f"expr_{i}: {where}: {expr}" for i, (where, expr) in enumerate(exprs.items()))


# --------------------------------------------------------------------------- dashboard helpers
def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def variable_query(var: dict[str, Any]) -> str:
    query = var["query"]
    return query["query"] if isinstance(query, dict) else query


def queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """{"panel title / refId": expr} of every panel target, and the query variables' series
    selectors ("label_values(SELECTOR, label)")."""
    out = {}
    for panel in panels(dashboard):
        for t in panel.get("targets", []):
            out[f"{panel['title']} / {t['refId']}"] = t["expr"]
    for var in variables(dashboard).values():
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable_query(var))
            assert match, f"variable {var['name']}: {variable_query(var)!r} is not label_values(selector, label)"
            out[f"variable {var['name']}"] = match.group(1)
    return out


def substitute(expr: str, run: str, rate_interval: str = "1m") -> str:
    """Grafana's variables as Grafana would fill them in for one run."""
    return (expr.replace("$__rate_interval", rate_interval).replace("$run", run).replace("$rank", "0")
            .replace("$layer", ".*"))


def all_dashboard_queries() -> dict[str, str]:
    return {f"{path.name}: {where}": expr for path in DASHBOARD_FILES for where, expr in queries(load(path)).items()}


# --------------------------------------------------------------------------- structure
def test_both_dashboards_exist() -> None:
    assert [p.name for p in DASHBOARD_FILES] == ["gradwatch-layers.json", "gradwatch-overview.json"]


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_dashboard_structure(path: Path) -> None:
    d = load(path)
    assert d["uid"] == path.stem and len(d["uid"]) <= 40
    assert d["title"].startswith("gradwatch / ") and "gradwatch" in d["tags"]
    assert "id" not in d or d["id"] is None, "an exported dashboard must not carry its database id"
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    for panel in panels(d):
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel.get("description"), f"panel {panel['id']} needs a title and description"
        assert panel["targets"], panel["title"]


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_every_panel_and_query_uses_the_datasource_variable(path: Path) -> None:
    d = load(path)
    ds = variables(d)["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for panel in panels(d):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE) == DATASOURCE, f"{panel['title']} / {target['refId']}"
    for var in variables(d).values():
        if var["type"] == "query":
            assert var["datasource"] == DATASOURCE, var["name"]
    assert "${DS_" not in path.read_text(), "export for sharing externally leaves ${DS_...} inputs"


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_run_variable_lists_the_runs_and_every_used_variable_is_defined(path: Path) -> None:
    d = load(path)
    run = variables(d)["run"]
    assert run["type"] == "query" and variable_query(run) == "label_values(gradwatch_run_info, run)"
    defined = set(variables(d)) | {"__rate_interval", "__interval"}
    for where, expr in queries(d).items():
        used = set(re.findall(r"\$\{?(\w+)", expr))
        assert used <= defined, f"{where}: undefined variables {used - defined}"


def test_every_selector_of_a_run_series_is_filtered_by_the_run_variable(served: Served) -> None:
    for where, expr in all_dashboard_queries().items():
        if where.endswith("variable run"):
            continue  # the variable that lists the runs
        for name, matchers in selectors(expr):
            if "run" in served.labels.get(name, set()):
                assert matchers.get("run") == '"$run"', f"{where}: {name} is not filtered by run"


# --------------------------------------------------------------------------- against the exporter
def test_served_metrics_cover_the_catalog(served: Served) -> None:
    """The fixture's run exercises every metric, so the checks below miss nothing."""
    from gradwatch.service.catalog import METRICS

    assert {spec.name for spec in METRICS} <= set(served.labels)


def test_metric_name_extraction() -> None:
    expr = ('increase(gradwatch_clipped_steps_total{run=~"$run"}[$__rate_interval])\n'
            '  / on(run, rank) group_left() (delta(gradwatch_step{rank="0"}[5m]) > 0) and up == 1e-4 * time()'
            ' or max by (gradwatch_version) (gradwatch_run_info) or {job="x"} or log10(nope_total)')
    assert metric_names(expr) == {"gradwatch_clipped_steps_total", "gradwatch_step", "up", "gradwatch_run_info",
                                  "nope_total"}
    assert selectors('a{run="$run", layer=~"$layer"} / b') == [("a", {"run": '"$run"', "layer": '"$layer"'})]
    labels = {"gradwatch_step": {"run", "rank"}}
    assert check_against_served('gradwatch_step{run="x"} + up{job="gradwatch"}', labels) == []
    assert check_against_served('gradwatch_stpe{run="x"}', labels) == ["'gradwatch_stpe' is not served by gradwatch serve"]
    assert check_against_served('gradwatch_step{layer="0"}', labels) == [
        "gradwatch_step has no label 'layer' (served: ['rank', 'run'])"]
    assert check_against_served('{__name__=~"gradwatch_.*"}', labels) == [
        'selecting by __name__ ("gradwatch_.*") escapes this check']


def test_dashboard_queries_use_only_served_metrics_and_labels(served: Served) -> None:
    problems = [f"{where}: {p}" for where, expr in all_dashboard_queries().items()
                for p in check_against_served(expr, served.labels)]
    assert problems == []


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    check_syntax({where: substitute(expr, "r") for where, expr in all_dashboard_queries().items()}, tmp_path)


def _instant(prom: PrometheusServer, expr: str) -> list[dict[str, Any]]:
    return prom.query(expr)


#: queries that need a run that is still recording steps (the fixture's run has finished)
NEEDS_LIVE_STEPS = {"Clipped, skipped and non-finite steps / A", "Clipped, skipped and non-finite steps / B",
                    "Clipped, skipped and non-finite steps / C"}


@pytest.mark.slow
def test_dashboard_queries_return_data_from_a_real_prometheus(served: Served, tmp_path: Path) -> None:
    from tests.fixtures.prometheus import start_prometheus

    prom = start_prometheus(tmp_path / "prometheus", [served.address])
    try:
        prom.wait_target_up()
        # two scrapes of every series, so that range functions over 1m have two points
        prom.wait_for(f'count_over_time(gradwatch_step{{run="{served.run}"}}[1m]) >= 2', lambda r: len(r) == 1)
        failures = []
        for path in DASHBOARD_FILES:
            for where, expr in queries(load(path)).items():
                result = _instant(prom, substitute(expr, served.run))  # raises on a query error
                if not result and where not in NEEDS_LIVE_STEPS:
                    failures.append(f"{path.name}: {where}: no data for {expr}")
                if where.startswith("variable "):
                    label = re.fullmatch(r"label_values\(.+,\s*(\w+)\)",
                                         variable_query(variables(load(path))[where.split()[1]])).group(1)
                    body = json.loads(http_get(f"{prom.url}/api/v1/label/{label}/values?" + urllib.parse.urlencode(
                        {"match[]": substitute(expr, served.run)})))
                    if not body["data"]:
                        failures.append(f"{path.name}: {where}: no values")
        assert failures == []
        assert prom.values(f'gradwatch_run_info{{run="{served.run}"}}', "run") == {served.run: 1.0}
    finally:
        prom.stop()
