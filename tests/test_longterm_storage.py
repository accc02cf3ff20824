"""Long-term storage: gradwatch's series reach VictoriaMetrics through Prometheus's remote write.

A real `gradwatch serve` exports a running run; a real Prometheus, configured with the shipped
deploy/prometheus/prometheus-longterm.yml (only its addresses and intervals changed), scrapes
it and remote-writes to a real VictoriaMetrics (Debian's `victoria-metrics`). The same series,
labels included, must be queryable there, the ones the profile does not keep must not, and
every query of the shipped dashboards must run on VictoriaMetrics as it runs on Prometheus
(Grafana uses it as a Prometheus data source). Skipped without the `prometheus` or
`victoria-metrics` binary unless GRADWATCH_REQUIRE_SERVERS=1.
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.prometheus import free_port, http_get, launch_prometheus, wait_until
from tests.fixtures.runlogs import SyntheticRun
from tests.fixtures.service import serve_factory  # noqa: F401 - fixture
from tests.fixtures.victoria import start_victoria
from tests.test_dashboards import DASHBOARD_FILES, load, queries, substitute

pytestmark = pytest.mark.slow

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
RUN = "vmrun01"


def _series(url: str, match: str) -> set[tuple[tuple[str, str], ...]]:
    """Label sets (without the scrape's instance and job) of the series `match` selects."""
    body = json.loads(http_get(f"{url}/api/v1/series?" + urllib.parse.urlencode({"match[]": match})))
    return {tuple(sorted((k, v) for k, v in s.items() if k not in ("instance", "job"))) for s in body["data"]}


def _longterm_config(tmp_path: Path, serve_address: str, write_url: str) -> Path:
    """The shipped long-term config and rules, pointed at the test's servers, 1 s intervals."""
    config = (DEPLOY / "prometheus-longterm.yml").read_text()
    for old, new in (('"127.0.0.1:9464"', f'"{serve_address}"'), ("http://127.0.0.1:8428/api/v1/write", write_url),
                     ("scrape_interval: 5s", "scrape_interval: 1s"), ("scrape_timeout: 5s", "scrape_timeout: 1s")):
        assert old in config, old
        config = config.replace(old, new)
    (tmp_path / "prometheus.yml").write_text(config)
    (tmp_path / "gradwatch-alerts.yml").write_text((DEPLOY / "gradwatch-alerts.yml").read_text())
    return tmp_path / "prometheus.yml"


def test_series_arrive_in_victoriametrics_through_remote_write(tmp_path: Path,
                                                               serve_factory: Any) -> None:  # noqa: F811
    SyntheticRun(run_id=RUN, name="long-run", project="archive", param_every=1, act_every=1).write(
        tmp_path / "home", steps=30, close=False)
    port = free_port()
    serve = serve_factory(["--home", str(tmp_path / "home"), "--port", str(port), "--per-param"])
    serve.started()
    vm = start_victoria(tmp_path / "vm")
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    try:
        prom = launch_prometheus(workdir, _longterm_config(workdir, f"127.0.0.1:{port}", vm.write_url))
    except BaseException:
        vm.stop()
        raise
    try:
        prom.wait_target_up()
        selector = f'{{__name__=~"gradwatch_.*", run="{RUN}"}}'
        in_prometheus = wait_until(lambda: _series(prom.url, selector) or None, "gradwatch series in Prometheus")

        def arrived() -> set[tuple[tuple[str, str], ...]] | None:
            got = _series(vm.url, selector)
            return got if got >= in_prometheus else None

        in_victoria = wait_until(arrived, "the same series in VictoriaMetrics (remote write)")
        assert in_victoria == in_prometheus
        names = {dict(s)["__name__"] for s in in_victoria}
        assert {"gradwatch_step", "gradwatch_layer_grad_norm", "gradwatch_layer_max_rank", "gradwatch_param_norm",
                "gradwatch_run_info"} <= names
        (step,) = vm.query(f'gradwatch_step{{run="{RUN}"}}')
        assert step["value"][1] == "29"
        assert {k: step["metric"][k] for k in ("run", "run_name", "project", "rank")} == {
            "run": RUN, "run_name": "long-run", "project": "archive", "rank": "0"}
        flow = vm.query(f'gradwatch_layer_act_grad_norm{{run="{RUN}"}}')
        depths = {s["metric"]["layer"]: s["metric"]["depth"] for s in flow}
        assert depths == {f"net.{i}": str(i) for i in range(6)}
        # the profile keeps gradwatch's series and scrape health, not Prometheus's own bookkeeping
        assert prom.query('scrape_duration_seconds{job="gradwatch"}') and not vm.query("scrape_duration_seconds")
        assert vm.query('up{job="gradwatch"}')

        # every dashboard query runs on VictoriaMetrics, as Grafana sends it to a Prometheus data source
        failures = []
        for path in DASHBOARD_FILES:
            for where, expr in queries(load(path)).items():
                try:
                    vm.query(substitute(expr, RUN))
                except AssertionError as exc:
                    failures.append(f"{path.name}: {where}: {exc}")
        assert failures == []
        assert vm.query(substitute('log10(max by (depth, layer) (gradwatch_layer_act_grad_norm{run="$run", '
                                   'rank=~"$rank"}))', RUN))
    finally:
        prom.stop()
        vm.stop()
    assert serve.stop() == 0
