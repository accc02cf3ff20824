"""deploy/: Prometheus config and alert rules (promtool), Alertmanager (amtool), Grafana
provisioning, the compose file and the systemd unit.

The alert rules are unit-tested by promtool (deploy/prometheus/gradwatch-alerts.test.yml),
checked against the metrics a real `gradwatch serve` serves (the `served` fixture of
tests/test_dashboards.py) and, in the slow test, loaded by a real Prometheus with the
deploy config, where every rule must evaluate without error against that service.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.prometheus import http_get, launch_prometheus, require_binary, wait_until
from tests.fixtures.service import serve_command
from tests.test_dashboards import Served, check_against_served, metric_names, served  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
LONGTERM_CONFIG = DEPLOY / "prometheus" / "prometheus-longterm.yml"
LONGTERM_COMPOSE = DEPLOY / "docker-compose.longterm.yml"
RULES = DEPLOY / "prometheus" / "gradwatch-alerts.yml"
RULES_TEST = DEPLOY / "prometheus" / "gradwatch-alerts.test.yml"
ALERTMANAGER = DEPLOY / "alertmanager" / "alertmanager.yml"
COMPOSE = DEPLOY / "docker-compose.yml"
UNIT = DEPLOY / "systemd" / "gradwatch.service"
SEVERITIES = {"critical", "warning", "info"}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, cwd=DEPLOY)


def _alerts() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


# --------------------------------------------------------------------------- Prometheus
def test_prometheus_config_passes_promtool() -> None:
    proc = _run(require_binary("promtool"), "check", "config", str(PROM_CONFIG))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in proc.stdout + proc.stderr  # the rule file was loaded


def test_prometheus_config_scrapes_serve_and_alerts_alertmanager() -> None:
    config = yaml.safe_load(PROM_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["gradwatch"]["static_configs"] == [{"targets": ["127.0.0.1:9464"]}]
    assert config["rule_files"] == [RULES.name]
    assert config["alerting"]["alertmanagers"][0]["static_configs"] == [{"targets": ["127.0.0.1:9093"]}]
    text = PROM_CONFIG.read_text()
    assert re.search(r"^\s*# - job_name: gradwatch-pushgateway$", text, re.MULTILINE)
    assert re.search(r"^\s*#\s+honor_labels: true$", text, re.MULTILINE)


def test_longterm_config_passes_promtool() -> None:
    proc = _run(require_binary("promtool"), "check", "config", str(LONGTERM_CONFIG))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in proc.stdout + proc.stderr


def test_longterm_config_is_the_base_config_plus_remote_write() -> None:
    """prometheus-longterm.yml cannot drift from prometheus.yml: only `remote_write` differs, and
    it keeps every gradwatch metric, the scrape health and the alerts."""
    from gradwatch.service.catalog import METRICS
    from gradwatch.service.tiers import TIER_METRICS

    base, longterm = yaml.safe_load(PROM_CONFIG.read_text()), yaml.safe_load(LONGTERM_CONFIG.read_text())
    (remote,) = longterm.pop("remote_write")
    assert longterm == base
    assert remote["url"] == "http://127.0.0.1:8428/api/v1/write"
    (keep,) = remote["write_relabel_configs"]
    assert keep["action"] == "keep" and keep["source_labels"] == ["__name__"]
    pattern = re.compile(keep["regex"])
    kept = [spec.name for spec in (*METRICS, *TIER_METRICS)] + ["gradwatch_run_info", "up", "ALERTS"]
    assert all(pattern.fullmatch(name) for name in kept)
    assert not pattern.fullmatch("prometheus_tsdb_head_series") and not pattern.fullmatch("scrape_duration_seconds")


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Compose's merge of two files for what these tests read: services' keys replaced, volumes
    merged by their target path (the override's win)."""
    services = {name: dict(service) for name, service in base["services"].items()}
    for name, extra in override["services"].items():
        merged = services.setdefault(name, {})
        for key, value in extra.items():
            if key == "volumes":
                by_target = {v.split(":")[1]: v for v in merged.get("volumes", [])}
                by_target.update({v.split(":")[1]: v for v in value})
                merged["volumes"] = list(by_target.values())
            else:
                merged[key] = value
    return services


def test_longterm_compose_profile() -> None:
    override = yaml.safe_load(LONGTERM_COMPOSE.read_text())
    services = _merged(yaml.safe_load(COMPOSE.read_text()), override)
    vm = services["victoriametrics"]
    assert vm["network_mode"] == "host" and "-httpListenAddr=127.0.0.1:8428" in vm["command"]
    assert "-retentionPeriod=12" in vm["command"] and re.search(r":v\d+\.\d+\.\d+$", vm["image"])
    mounts = {name: {v.split(":")[1]: v.split(":")[0] for v in s.get("volumes", [])} for name, s in services.items()}
    assert mounts["prometheus"]["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus-longterm.yml"
    assert mounts["prometheus"][f"/etc/prometheus/{RULES.name}"] == f"./prometheus/{RULES.name}"  # kept from the base
    assert mounts["grafana"]["/etc/grafana/provisioning/datasources"] == "./grafana/provisioning-longterm/datasources"
    assert "victoriametrics" in services["prometheus"]["depends_on"]
    for name, by_target in mounts.items():
        for source in by_target.values():
            if source.startswith("."):
                assert (DEPLOY / source).exists() or source == "./secrets", f"{name}: {source} does not exist"
    assert set(override["volumes"]) == {"victoriametrics-data"}


def test_longterm_datasources() -> None:
    base = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/gradwatch.yml").read_text())
    longterm = yaml.safe_load((DEPLOY / "grafana/provisioning-longterm/datasources/gradwatch.yml").read_text())
    prometheus, victoria = longterm["datasources"]
    assert base["datasources"] == [prometheus]  # the same Prometheus data source, unchanged
    assert victoria["type"] == "prometheus" and victoria["url"] == "http://127.0.0.1:8428"
    assert victoria["uid"] != prometheus["uid"] and not victoria["isDefault"]


def test_alert_rules_pass_promtool_check() -> None:
    proc = _run(require_binary("promtool"), "check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in proc.stdout


def test_alert_rules_unit_tests_pass() -> None:
    proc = _run(require_binary("promtool"), "test", "rules", str(RULES_TEST))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    identity = ("run", "rank", "layer", "instance")
    for alert in _alerts():
        name, names = alert["alert"], metric_names(alert["expr"])
        fires, quiet = False, False
        for group in tests:
            series = []
            for s in group["input_series"]:
                metric, _, body = s["series"].partition("{")
                if metric in names:
                    series.append(dict(re.findall(r'(\w+)="([^"]*)"', body)))
            for case in group.get("alert_rule_test", []):
                if case["alertname"] != name:
                    continue
                expected = [e["exp_labels"] for e in case.get("exp_alerts", [])]
                if not expected:
                    quiet = True
                    continue
                fires = True
                assert all(e["severity"] == alert["labels"]["severity"] for e in expected), name
                assert all(e.get("exp_annotations") for e in case["exp_alerts"]), f"{name}: check the annotations"
                # an input series matching no expected alert is a case that must stay quiet
                quiet |= any(not any(all(str(e.get(k)) == v for k, v in s.items() if k in identity) for e in expected)
                             for s in series)
        assert fires, f"{name}: no test case where it fires"
        assert quiet, f"{name}: no test case where it must not fire"


def test_alerts_have_severity_and_annotations_with_their_labels(served: Served) -> None:  # noqa: F811
    """Runs are named by their names (and the description adds project and id), layers by name."""
    for alert in _alerts():
        name = alert["alert"]
        assert alert["labels"]["severity"] in SEVERITIES, name
        annotations = alert["annotations"]
        assert set(annotations) >= {"summary", "description"}, name
        labels = set.intersection(*(served.labels.get(m, {"job", "instance"}) for m in metric_names(alert["expr"])))
        for label in ("run_name", "layer"):
            if label in labels:
                for key in ("summary", "description"):
                    assert f"$labels.{label} " in annotations[key], f"{name}: {key} should name the {label}"
        if "run_name" in labels:
            assert "$labels.project " in annotations["description"], f"{name}: the description should name the project"
            assert "$labels.run " in annotations["description"], f"{name}: the description should give the run id"
            assert "$labels.run }}" not in annotations["summary"], f"{name}: the summary names the run by its id"
    assert {a["labels"]["severity"] for a in _alerts()} == SEVERITIES


def test_layer_alerts_work_with_and_without_per_rank_series() -> None:
    """Layer series have no rank by default: layer rules group by run and rank (an absent
    label groups as empty), and their annotations print a rank only when there is one."""
    for alert in _alerts():
        if "gradwatch_layer_" not in alert["expr"]:
            continue
        for grouping in re.findall(r"\b(?:on|by)\s*\(([^)]*)\)", alert["expr"]):
            assert {g.strip() for g in grouping.split(",")} == {"run", "rank"}, alert["alert"]
        text = alert["annotations"]["summary"] + alert["annotations"]["description"]
        guarded = text.replace("{{ with $labels.rank }}", "").replace("{{ if not $labels.rank }}", "")
        assert "$labels.rank }}" not in guarded, alert["alert"]


def test_alert_rules_use_only_served_metrics_and_labels(served: Served) -> None:  # noqa: F811
    problems = [f"{a['alert']}: {p}" for a in _alerts() for p in check_against_served(a["expr"], served.labels)]
    assert problems == []


@pytest.mark.slow
def test_deploy_config_and_rules_evaluate_in_a_real_prometheus(served: Served, tmp_path: Path) -> None:  # noqa: F811
    """The deploy config as shipped, but scraping the test's service every second and
    evaluating the rules every second: every rule must run without error."""
    config = PROM_CONFIG.read_text().replace('"127.0.0.1:9464"', f'"{served.address}"')
    config = config.replace("scrape_interval: 5s", "scrape_interval: 1s").replace("scrape_timeout: 5s",
                                                                                   "scrape_timeout: 1s")
    assert served.address in config and "scrape_interval: 1s" in config
    (tmp_path / "prometheus.yml").write_text(config)
    rules = RULES.read_text()
    assert rules.count("interval: 30s") == len(yaml.safe_load(rules)["groups"])
    (tmp_path / RULES.name).write_text(rules.replace("interval: 30s", "interval: 1s"))
    prom = launch_prometheus(tmp_path, tmp_path / "prometheus.yml")
    try:
        def evaluated() -> list[dict[str, Any]] | None:
            body = json.loads(http_get(f"{prom.url}/api/v1/rules"))
            rules = [r for g in body["data"]["groups"] for r in g["rules"]]
            done = rules and all(not r["lastEvaluation"].startswith("0001") for r in rules)
            up = prom.query(f'gradwatch_step{{run="{served.run}"}}')
            return rules if done and up else None

        wait_until(lambda: evaluated() if prom.query('count_over_time(up{job="gradwatch"}[1m]) >= 3') else None,
                   "three scrapes")
        rules = evaluated()
        assert rules is not None and len(rules) == len(_alerts())
        assert [(r["name"], r["lastError"]) for r in rules if r["health"] != "ok"] == []
        firing = {r["name"] for r in rules if r["state"] == "firing"}
        assert "GradwatchExporterDown" not in firing and "GradwatchRunCrashed" not in firing
        assert prom.values('up{job="gradwatch"}', "instance") == {served.address: 1.0}
    finally:
        prom.stop()


# --------------------------------------------------------------------------- Alertmanager
def _amtool() -> tuple[str, tuple[int, int]]:
    amtool = require_binary("amtool")
    out = _run(amtool, "--version")
    match = re.search(r"version (\d+)\.(\d+)", out.stdout + out.stderr)
    assert match, out.stdout + out.stderr
    return amtool, (int(match.group(1)), int(match.group(2)))


def _checkable_alertmanager_config(tmp_path: Path, version: tuple[int, int]) -> Path:
    """The config as shipped; for amtool before 0.26 (no `url_file`), the same config with
    each url_file turned into a placeholder url, so that everything else is still checked."""
    text = ALERTMANAGER.read_text()
    if version >= (0, 26):
        return ALERTMANAGER
    path = tmp_path / "alertmanager.yml"
    path.write_text(re.sub(r"url_file: (\S+)", r"url: http://127.0.0.1:9/\1", text))
    return path


def test_alertmanager_config_passes_amtool(tmp_path: Path) -> None:
    amtool, version = _amtool()
    proc = _run(amtool, "check-config", str(_checkable_alertmanager_config(tmp_path, version)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@pytest.mark.parametrize(("severity", "receiver"), [
    pytest.param("critical", "gradwatch-page", id="critical-pages"),
    pytest.param("warning", "gradwatch-webhook", id="warning"),
    pytest.param("info", "gradwatch-webhook", id="info"),
])
def test_alertmanager_routes_by_severity(tmp_path: Path, severity: str, receiver: str) -> None:
    amtool, version = _amtool()
    config = _checkable_alertmanager_config(tmp_path, version)
    proc = _run(amtool, "config", "routes", "test", f"--config.file={config}", f"severity={severity}",
                "alertname=GradwatchGradNormHigh", "run=r1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == receiver


def test_alertmanager_config_holds_no_webhook_url_and_inhibits_real_alerts() -> None:
    config = yaml.safe_load(ALERTMANAGER.read_text())
    hooks = [h for r in config["receivers"] for h in r.get("webhook_configs", [])]
    assert hooks and all("url" not in h and h["url_file"].startswith("/etc/alertmanager/secrets/") for h in hooks)
    assert not re.search(r"https?://", ALERTMANAGER.read_text().split("global:")[1])
    names = {a["alert"] for a in _alerts()}
    for rule in config["inhibit_rules"]:
        for matcher in rule["source_matchers"] + rule["target_matchers"]:
            m = re.fullmatch(r'alertname(=~|=)"([^"]+)"', matcher)
            if m:
                assert set(m.group(2).split("|")) <= names, matcher


# --------------------------------------------------------------------------- Grafana, compose
def test_grafana_provisioning() -> None:
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/gradwatch.yml").read_text())
    (source,) = ds["datasources"]
    assert ds["apiVersion"] == 1 and source["type"] == "prometheus" and source["url"] == "http://127.0.0.1:9090"
    boards = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/gradwatch.yml").read_text())
    (provider,) = boards["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards/gradwatch"


def test_compose_file_is_consistent() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"gradwatch", "prometheus", "alertmanager", "grafana"}
    mounts: dict[str, dict[str, str]] = {}
    for name, service in services.items():
        assert service["network_mode"] == "host", name  # the 127.0.0.1 addresses of the configs hold
        mounts[name] = {}
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            mounts[name][target] = source
            if source.startswith("."):
                assert (DEPLOY / source).exists() or source == "./secrets", f"{name}: {source} does not exist"
    assert mounts["prometheus"]["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus.yml"
    assert mounts["prometheus"][f"/etc/prometheus/{RULES.name}"] == f"./prometheus/{RULES.name}"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert "--web.listen-address=127.0.0.1:9090" in services["prometheus"]["command"]
    assert "--web.listen-address=127.0.0.1:9093" in services["alertmanager"]["command"]
    assert mounts["alertmanager"]["/etc/alertmanager/secrets"] == "./secrets"
    assert mounts["grafana"]["/var/lib/grafana/dashboards/gradwatch"] == "../dashboards"
    version = re.search(r":v(\d+)\.(\d+)", services["alertmanager"]["image"])
    assert version and (int(version.group(1)), int(version.group(2))) >= (0, 26), "url_file needs 0.26"
    # secrets come from the environment, never from the file
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]*\}", services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"])
    build = services["gradwatch"]["build"]
    dockerfile = (DEPLOY / build["context"] / build["dockerfile"]).read_text()
    assert dockerfile.startswith("#") and "\nFROM python:3.11-slim\n" in dockerfile
    assert services["gradwatch"]["command"][:1] == ["serve"] and "ENTRYPOINT [\"gradwatch\"]" in dockerfile


# --------------------------------------------------------------------------- systemd
def _unit() -> dict[str, list[tuple[str, str]]]:
    """The unit's sections as (key, value) lists (keys may repeat, so not configparser)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, sep, value = line.partition("=")
        assert current is not None and sep, f"not a unit line: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def test_systemd_unit_structure() -> None:
    unit = _unit()
    assert set(unit) == {"Unit", "Service", "Install"}
    service = dict(unit["Service"])
    envs = [v for k, v in unit["Service"] if k == "Environment"]
    home = next(v.split("=", 1)[1] for v in envs if v.startswith("GRADWATCH_HOME="))
    assert service["ExecStart"].split()[0].startswith("/") and service["ExecStart"].split()[1:] == ["serve"]
    assert service["User"] and service["User"] != "root"
    assert service["EnvironmentFile"] == "-/etc/gradwatch/env"
    assert service["Restart"] == "on-failure"
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert home in service["ReadWritePaths"].split()
    assert "PASSWORD" not in UNIT.read_text().replace("GRADWATCH_BASIC_AUTH_PASSWORD, a", "")
    assert dict(unit["Install"])["WantedBy"] == "multi-user.target"


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the structural test still ran)")
    script = serve_command()[0]
    if not script.endswith("gradwatch"):
        pytest.skip("no gradwatch console script next to this Python")
    unit = tmp_path / UNIT.name  # ExecStart must exist: point it at this environment's script
    unit.write_text(UNIT.read_text().replace("/opt/gradwatch/venv/bin/gradwatch", script))
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Unknown" not in proc.stderr and "ignoring" not in proc.stderr, proc.stderr
