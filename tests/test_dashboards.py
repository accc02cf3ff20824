"""Grafana dashboards are code: generated from gradwatch/dashboards/, structure, variables,
legends, and every query checked against what `gradwatch serve` really serves.

The shipped dashboards/*.json must equal what the builder generates, byte for byte. The
served metric names and labels are not a list written here: a real training run is recorded
with the agent (an 11-block network, so that depth 10 comes after depth 2; clipping by norm,
ReLU and Tanh layers, a Linear followed by a LayerNorm, two residual attention blocks and a
two-output head for the attention, residual-stream and logit statistics, AdamW with weight
decay in two param groups, the spike guard, an extra scalar; beside it a short run with plain
SGD and weight decay, which alone has the grad-to-weight equilibrium), ingested by a real
`gradwatch serve --per-param` subprocess, and its `/metrics` text is parsed (`served`
fixture, shared with tests/test_deploy.py). Every metric name and label in a dashboard query,
a legend or an alert rule must appear there. The queries are also parsed by promtool and, in
the slow test, run against a real Prometheus scraping that service: each one must succeed
and (but for named ones) return data, and the heatmaps' rows come back in depth order.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from gradwatch.cli import main
from gradwatch.dashboards import DASHBOARDS, check, render
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
DEPTH = 11  # modules of the fixture's network: blocks 0..10, whose names do not sort by depth

TRAIN_CONFIG = {"clip": {"mode": "norm", "max_norm": 0.05},
                "measure": {"flush_every": 4, "param_every": 2, "update_ratio_every": 2, "activation_every": 2},
                "guards": {"spike": {"window": 8, "warmup": 4}}}


# --------------------------------------------------------------------------- the real exporter
@dataclass
class Served:
    """A running `gradwatch serve` with the fixture's finished runs in its home, and what it
    serves: at the default label tiers (`labels`), and the union with what a second service over
    the same run logs serves with every opt-in tier on (`all_tiers`: `rank` on layer series...)."""

    address: str                      # host:port of /metrics (default tiers, plus --per-param)
    run: str                          # the id of the main (AdamW) run, the one dashboards are checked on
    labels: dict[str, set[str]]       # sample name on /metrics -> its label names
    all_tiers: dict[str, set[str]]    # the same, over both services


def _model() -> Any:
    """The fixture's network: blocks 0..10, block 6 a bias-free Linear that LayerNorm 7 makes
    scale-invariant (the update and grad equilibria are derived for it), block 8 two residual
    attention blocks (the agent's attention layers and residual blocks), block 10 a head of two
    outputs (its logits layer)."""
    import torch

    class SelfAttention(torch.nn.Module):
        """Two heads of attention over the batch's rows as one sequence, through SDPA."""

        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.out = torch.nn.Linear(8, 24), torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(x).view(1, -1, 3, 2, 4).permute(2, 0, 3, 1, 4)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return self.out(y.transpose(1, 2).reshape(x.shape))

    class Residual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = SelfAttention()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.attn(x)

    hidden = [torch.nn.Linear(6, 8)]
    for i in range(DEPTH // 2 - 1):
        if i == 3:
            hidden += [torch.nn.LayerNorm(8), torch.nn.Sequential(Residual(), Residual())]
        else:
            hidden += [torch.nn.ReLU() if i % 2 == 0 else torch.nn.Tanh(),
                       torch.nn.Linear(8, 8, bias=i != 2)]
    model = torch.nn.Sequential(*hidden, torch.nn.Tanh(), torch.nn.Linear(8, 2))
    assert len(model) == DEPTH
    return model


def _train(home: Path) -> list[str]:
    """Record a small real training run with the agent and, before it, a short one with plain
    SGD; return their run ids, the first one's first."""
    import torch

    import gradwatch

    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randn(32, 2)
    sgd_model = _model()
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.05, weight_decay=0.01)
    with gradwatch.watch(sgd_model, sgd, run="dashboards-sgd", config={**TRAIN_CONFIG, "home": str(home)}) as w:
        for _ in range(4):
            sgd.zero_grad()
            torch.nn.functional.mse_loss(sgd_model(x), y).backward()
            sgd.step()
        sgd_run = w.run_id
    model = _model()
    linear = [m for m in model if isinstance(m, torch.nn.Linear)]
    others = [p for m in model if not isinstance(m, torch.nn.Linear) for p in m.parameters()]
    opt = torch.optim.AdamW([{"params": [p for m in linear[:-1] for p in m.parameters()] + others, "lr": 0.01},
                             {"params": linear[-1].parameters(), "lr": 0.002}], weight_decay=0.1)
    with gradwatch.watch(model, opt, run="dashboards", config={**TRAIN_CONFIG, "home": str(home)}) as watcher:
        for _ in range(STEPS):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            watcher.log(loss=loss, accuracy=0.5)
        return [watcher.run_id, sgd_run]


def _parse(text: str) -> dict[str, set[str]]:
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def _serve(home: Path, runs: list[str], env: dict[str, str] | None = None
           ) -> tuple[ServeProcess, str, dict[str, set[str]]]:
    """`gradwatch serve --per-param` on `home`, once it serves all of `runs`: the process, its
    address and the labels of each sample name."""
    port = free_port()
    serve = ServeProcess(["--home", str(home), "--port", str(port), "--per-param", "--grace", "3600",
                          "--poll-interval", "0.1"], home / "serve.log", env)
    serve.started()

    def complete() -> dict[str, set[str]] | None:
        text = http_get(f"http://127.0.0.1:{port}/metrics").decode()
        # the close record is the log's last: once the end time is served, all of it is
        done = all(re.search(rf'^gradwatch_run_end_time_seconds{{[^}}]*\brun="{run}"', text, re.MULTILINE)
                   for run in runs)
        return _parse(text) if done else None

    return serve, f"127.0.0.1:{port}", wait_until(complete, "serve to export the finished runs")


def start_served(home: Path) -> tuple[list[ServeProcess], Served]:
    """Train the runs into `home`, serve them at the default tiers and, from a copy of their run
    logs, with every opt-in tier; wait until both serve all of them."""
    runs = _train(home)
    serve, address, labels = _serve(home, runs)
    everything = home.parent / f"{home.name}-all-tiers"
    shutil.copytree(home / "logs", everything / "logs")
    serve_all, _, labels_all = _serve(everything, runs, {"GRADWATCH_PER_LAYER": "1", "GRADWATCH_PER_RANK": "1"})
    union = {name: labels.get(name, set()) | labels_all.get(name, set()) for name in {*labels, *labels_all}}
    return [serve, serve_all], Served(address, runs[0], labels, union)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    serves, result = start_served(tmp_path_factory.mktemp("served"))
    try:
        yield result
    finally:
        assert [serve.stop() for serve in serves] == [0, 0]


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


_LABEL_VALUES = re.compile(r"label_values\((.+),\s*(\w+)\)")
_QUERY_RESULT = re.compile(r"query_result\((.+)\)")


def queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """{"panel title / refId": expr} of every panel target, and the query variables' series
    selectors ("label_values(SELECTOR, label)") or expressions ("query_result(EXPR)")."""
    out = {}
    for panel in panels(dashboard):
        for t in panel.get("targets", []):
            out[f"{panel['title']} / {t['refId']}"] = t["expr"]
    for var in variables(dashboard).values():
        if var["type"] == "query":
            match = _LABEL_VALUES.fullmatch(variable_query(var)) or _QUERY_RESULT.fullmatch(variable_query(var))
            assert match, f"variable {var['name']}: {variable_query(var)!r} is neither label_values nor query_result"
            out[f"variable {var['name']}"] = match.group(1)
    return out


def targets(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """("panel title / refId", target) of every panel target."""
    return [(f"{panel['title']} / {t['refId']}", t) for panel in panels(dashboard) for t in panel.get("targets", [])]


def substitute(expr: str, run: str, rate_interval: str = "1m") -> str:
    """Grafana's variables as Grafana would fill them in for one run ("All" for the others)."""
    return (expr.replace("$__rate_interval", rate_interval).replace("$run", run).replace("$rank", ".*")
            .replace("$layer", ".*").replace("$project", ".*"))


def all_dashboard_queries() -> dict[str, str]:
    return {f"{path.name}: {where}": expr for path in DASHBOARD_FILES for where, expr in queries(load(path)).items()}


# --------------------------------------------------------------------------- generated from code
def test_both_dashboards_exist() -> None:
    assert [p.name for p in DASHBOARD_FILES] == ["gradwatch-layers.json", "gradwatch-overview.json"]
    assert sorted(f"{uid}.json" for uid in DASHBOARDS) == [p.name for p in DASHBOARD_FILES]


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_shipped_json_is_what_the_builder_generates(path: Path) -> None:
    assert path.read_text(encoding="utf-8") == render(path.stem), \
        "dashboards/ was edited by hand or not regenerated: run `gradwatch dashboards generate`"


def test_generate_writes_and_checks_through_the_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    stale = runner.invoke(main, ["dashboards", "generate", "--check", "--out", str(tmp_path)])
    assert stale.exit_code == 1 and stale.output.startswith(f"Error: out of date in {tmp_path}: ")
    assert "gradwatch-layers.json" in stale.output and len(stale.output.strip().splitlines()) == 1
    wrote = runner.invoke(main, ["dashboards", "generate", "--out", str(tmp_path)])
    assert wrote.exit_code == 0 and sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in DASHBOARD_FILES]
    assert check(tmp_path) == [] and check(ROOT / "dashboards") == []
    ok = runner.invoke(main, ["dashboards", "generate", "--check", "--out", str(tmp_path)])
    assert ok.exit_code == 0 and ok.output == f"{tmp_path}: up to date\n"


# --------------------------------------------------------------------------- structure


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


RUN_REGEX = '/name="(?<text>[^"]*)",project="[^"]*",run="(?<value>[^"]*)"/'


def _run_options(query_result_lines: list[str], regex: str) -> list[tuple[str, str]]:
    """(text, value) of each option, as Grafana derives them from query_result() lines."""
    pattern = re.compile(regex[1:-1].replace("(?<", "(?P<"))  # JavaScript's named groups in Python
    return [(m.group("text"), m.group("value")) for line in query_result_lines if (m := pattern.search(line))]


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_runs_are_picked_by_name_within_projects_and_every_used_variable_is_defined(path: Path) -> None:
    d = load(path)
    project, run = variables(d)["project"], variables(d)["run"]
    assert variable_query(project) == "label_values(gradwatch_run_info, project)" and project["allValue"] == ".*"
    assert variable_query(run) == ('query_result(max by (run, name, project) '
                                   '(gradwatch_run_info{project=~"$project"}))')
    assert run["regex"] == RUN_REGEX and run["query"]["qryType"] == 3  # Grafana's "query result" type
    assert "allValue" not in run, "All must stand for the runs of the chosen projects, not .*"
    # the line format of Grafana's query_result(): labels sorted by name, then value and time
    line = '{name="lstm lr=3e-3",project="nlp",run="3f9a2c01"} 1 1700000000000'
    assert _run_options([line], run["regex"]) == [("lstm lr=3e-3", "3f9a2c01")]
    defined = set(variables(d)) | {"__rate_interval", "__interval"}
    for where, expr in queries(d).items():
        used = set(re.findall(r"\$\{?(\w+)", expr))
        assert used <= defined, f"{where}: undefined variables {used - defined}"


def _placeholders(legend: str) -> set[str]:
    return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))


def _result_labels(expr: str, labels: dict[str, set[str]]) -> set[str]:
    """Labels an expression's result can have: those of its outermost `by (...)` if it
    aggregates, else those of the series it selects."""
    match = re.match(r"\s*(?:log10\()?\s*\w+\s+by\s*\(([^()]*)\)", expr)
    if match:
        return {label.strip() for label in match.group(1).split(",")}
    return set().union(*(labels.get(name, set()) for name in metric_names(expr))) | TARGET_LABELS


def test_legends_name_runs_by_name_and_use_only_labels_the_query_returns(served: Served) -> None:
    for path in DASHBOARD_FILES:
        for where, target in targets(load(path)):
            legend, expr = target["legendFormat"], target["expr"]
            used = _placeholders(legend)
            assert "run" not in used, f"{path.name}: {where}: a legend shows the run id instead of its name"
            returned = _result_labels(expr, served.labels)
            assert used <= returned, f"{path.name}: {where}: {legend!r} uses labels the query drops: {used - returned}"
            if "run_name" in returned and not target.get("format") == "table":
                assert "run_name" in used, f"{path.name}: {where}: {legend!r} should name the run (run_name)"


def test_layer_queries_keep_depth_and_legends_start_with_it(served: Served) -> None:
    for where, target in targets(load(ROOT / "dashboards" / "gradwatch-layers.json")):
        if any(name.startswith("gradwatch_layer_") for name in metric_names(target["expr"])) and \
                target.get("format") != "table":
            assert _result_labels(target["expr"], served.labels) == {"depth", "layer"}, where
            assert target["legendFormat"].startswith("{{depth}} {{layer}}"), where


def test_every_selector_of_a_run_series_is_filtered_by_the_run_variable(served: Served) -> None:
    for where, expr in all_dashboard_queries().items():
        if where.endswith(("variable run", "variable project")):
            continue  # the variables that list the runs and the projects
        for name, matchers in selectors(expr):
            if "run" in served.labels.get(name, set()):
                assert matchers.get("run") == '"$run"', f"{where}: {name} is not filtered by run"


# --------------------------------------------------------------------------- against the exporter
def test_served_metrics_cover_the_catalog(served: Served) -> None:
    """The fixture's run exercises every metric, so the checks below miss nothing."""
    from gradwatch.service.catalog import METRICS
    from gradwatch.service.tiers import TIER_METRICS

    assert {spec.name for spec in (*METRICS, *TIER_METRICS)} <= set(served.labels)


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
                for p in check_against_served(expr, served.all_tiers)]
    assert problems == []


def test_the_opt_in_tiers_add_rank_and_layers(served: Served) -> None:
    """The second service really serves the opt-in tiers (so `all_tiers` is not the default's)."""
    assert "rank" not in served.labels["gradwatch_layer_grad_norm"]
    assert "rank" in served.all_tiers["gradwatch_layer_grad_norm"]
    assert "rank" in served.all_tiers["gradwatch_param_grad_norm"]


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    check_syntax({where: substitute(expr, "r") for where, expr in all_dashboard_queries().items()}, tmp_path)


def _instant(prom: PrometheusServer, expr: str) -> list[dict[str, Any]]:
    return prom.query(expr)


#: queries that need a run that is still recording steps (the fixture's run has finished)
NEEDS_LIVE_STEPS = {f"Clipped, skipped and non-finite steps / {ref}" for ref in "ABCDE"}
#: variables with no values at the default label tiers (layer series have a rank only with per_rank)
PER_RANK_ONLY = {"gradwatch-layers.json: variable rank"}


def _query_result_lines(result: list[dict[str, Any]]) -> list[str]:
    """Grafana's text for each series of an instant query_result(): name{labels} value time."""
    lines = []
    for r in result:
        metric = dict(r["metric"])
        name = metric.pop("__name__", "")
        labels = ",".join(f'{k}="{v}"' for k, v in metric.items())  # Prometheus sends them sorted
        lines.append(f"{name}{{{labels}}} {r['value'][1]} {int(float(r['value'][0]) * 1000)}")
    return lines


def _range(prom: PrometheusServer, expr: str) -> list[dict[str, Any]]:
    """A range query over the last minute, as a Grafana panel sends it; the result's series in order."""
    import time

    now = time.time()
    body = json.loads(http_get(f"{prom.url}/api/v1/query_range?" + urllib.parse.urlencode(
        {"query": expr, "start": now - 60, "end": now, "step": 1})))
    assert body["status"] == "success", body
    return list(body["data"]["result"])


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
                if not result and where not in NEEDS_LIVE_STEPS and f"{path.name}: {where}" not in PER_RANK_ONLY:
                    failures.append(f"{path.name}: {where}: no data for {expr}")
                if not where.startswith("variable "):
                    continue
                var = variables(load(path))[where.split()[1]]
                if variable_query(var).startswith("query_result("):
                    if ("dashboards", served.run) not in _run_options(_query_result_lines(result), var["regex"]):
                        failures.append(f"{path.name}: {where}: the run is not an option by its name")
                    continue
                label = _LABEL_VALUES.fullmatch(variable_query(var)).group(2)
                body = json.loads(http_get(f"{prom.url}/api/v1/label/{label}/values?" + urllib.parse.urlencode(
                    {"match[]": substitute(expr, served.run)})))
                if not body["data"] and f"{path.name}: {where}" not in PER_RANK_ONLY:
                    failures.append(f"{path.name}: {where}: no values")
        assert failures == []
        assert prom.values(f'gradwatch_run_info{{run="{served.run}"}}', "run") == {served.run: 1.0}
        layers = load(ROOT / "dashboards" / "gradwatch-layers.json")
        for panel in panels(layers):
            if panel["type"] == "heatmap":
                rows = _range(prom, substitute(panel["targets"][0]["expr"], served.run))
                got = [(r["metric"]["depth"], r["metric"]["layer"]) for r in rows]
                # a Sequential's child i is block i at depth i: rows go 00, 01, ..., 10, never "0", "1", "10", "2"
                assert got and all(depth == layer.zfill(2) for depth, layer in got), got
                assert [int(layer) for _, layer in got] == sorted(int(layer) for _, layer in got), \
                    f"{panel['title']}: rows not in depth order: {got}"
                assert got[-1] == ("10", "10"), got
    finally:
        prom.stop()
