"""End to end: a training process writes, `serve` ingests, a real Prometheus scrapes.

The values read back through Prometheus's query API are compared with what the training
process computed itself (total and per-layer gradient norms straight from `p.grad`, the
loss, the learning rates, the number of clipped steps) and with what the agent measured
(`watcher.snapshot()`). Then the run finishes and its series leave Prometheus after the
grace period. Skipped without `prometheus` unless GRADWATCH_REQUIRE_SERVERS=1.
"""

from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.prometheus import PrometheusServer, free_port, prometheus_factory, wait_until  # noqa: F401
from tests.fixtures.runlogs import SyntheticRun
from tests.fixtures.service import serve_factory  # noqa: F401 - fixture
from tests.fixtures.tls import tls_files  # noqa: F401 - fixture

pytestmark = pytest.mark.slow

STEPS = 30
MAX_NORM = 0.3

TRAIN = r"""
import json, math, sys, time
from pathlib import Path
import torch
import gradwatch

out, go = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                            torch.nn.Linear(16, 1))
opt = torch.optim.SGD([{"params": list(model[0].parameters()) + list(model[2].parameters()), "lr": 0.05},
                       {"params": model[4].parameters(), "lr": 0.01}])
every = {"flush_every": 5, "param_every": 5, "update_ratio_every": 5, "activation_every": 5}
watcher = gradwatch.watch(model, opt, run="e2e", config={"clip": {"mode": "norm", "max_norm": MAX_NORM},
                                                        "measure": every})
x, y = torch.randn(64, 8), torch.randn(64, 1)
clipped, total, layers, loss_value = 0, None, {}, None
for step in range(STEPS):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    with torch.no_grad():  # the reference: norms straight from the gradients, before clipping
        total = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in model.parameters()))
        layers = {name: math.sqrt(sum(float(p.grad.norm()) ** 2 for p in m.parameters()))
                  for name, m in model.named_children() if isinstance(m, torch.nn.Linear)}
    clipped += total > MAX_NORM
    opt.step()
    watcher.log(loss=loss)
    loss_value = float(loss)
snapshot = watcher.snapshot()
out.write_text(json.dumps({"run_id": watcher.run_id, "total": total, "layers": layers, "loss": loss_value,
                           "clipped": clipped, "lr": [g["lr"] for g in opt.param_groups],
                           "snapshot": snapshot}, default=str))
while not go.exists():
    time.sleep(0.05)
watcher.close()
""".replace("STEPS", str(STEPS)).replace("MAX_NORM", str(MAX_NORM))


def _one(prom: PrometheusServer, expr: str) -> float:
    result = prom.query(expr)
    assert len(result) == 1, f"{expr}: {result}"
    return float(result[0]["value"][1])


def _by_layer(prom: PrometheusServer, metric: str, run_id: str) -> dict[str, float]:
    return prom.values(f'{metric}{{run="{run_id}"}}', "layer")


def _layer_update_ratio(params: dict[str, dict[str, Any]], layer: str) -> float:
    mine = [v for name, v in params.items() if name.startswith(f"{layer}.")]
    moved = math.sqrt(sum((v["update_ratio"] * v["param_norm"]) ** 2 for v in mine))
    return moved / math.sqrt(sum(v["param_norm"] ** 2 for v in mine))


def test_training_values_reach_prometheus(tmp_path: Path, serve_factory, prometheus_factory) -> None:  # noqa: F811
    port = free_port()
    serve = serve_factory(["--home", str(tmp_path), "--port", str(port), "--grace", "3",
                           "--poll-interval", "0.2"])
    serve.started()
    prom = prometheus_factory([f"127.0.0.1:{port}"])
    prom.wait_target_up()

    ref_path, go = tmp_path / "reference.json", tmp_path / "go"
    env = {**os.environ, "GRADWATCH_HOME": str(tmp_path)}
    train = subprocess.Popen([sys.executable, "-c", TRAIN, str(ref_path), str(go)], env=env)
    try:
        wait_until(lambda: True if ref_path.exists() or train.poll() is not None else None, "the training run")
        assert train.poll() is None, f"training failed with {train.returncode}"
        ref = json.loads(ref_path.read_text())
        run = ref["run_id"]
        snap = ref["snapshot"]

        prom.wait_for(f'gradwatch_step{{run="{run}"}}', lambda r: len(r) == 1 and r[0]["value"][1] == str(STEPS - 1),
                      "the last step in Prometheus")
        labels = f'run="{run}",rank="0"'
        approx = lambda x: pytest.approx(x, rel=1e-4)  # noqa: E731 - float32 in the run log
        assert _one(prom, f"gradwatch_global_grad_norm{{{labels}}}") == approx(ref["total"])
        assert _one(prom, f"gradwatch_global_grad_norm_clipped{{{labels}}}") == approx(min(ref["total"], MAX_NORM))
        assert _one(prom, f"gradwatch_clip_threshold{{{labels}}}") == approx(MAX_NORM)
        assert _one(prom, f"gradwatch_loss{{{labels}}}") == approx(ref["loss"])
        assert _one(prom, f"gradwatch_clipped_steps_total{{{labels}}}") == ref["clipped"]
        assert 0 < ref["clipped"] < STEPS  # the reference run does clip, but not every step
        assert _one(prom, f"gradwatch_skipped_steps_total{{{labels}}}") == 0
        assert _one(prom, f"gradwatch_nonfinite_steps_total{{{labels}}}") == 0
        assert prom.values(f"gradwatch_learning_rate{{{labels}}}", "group") == {
            "0": approx(ref["lr"][0]), "1": approx(ref["lr"][1])}

        grad = _by_layer(prom, "gradwatch_layer_grad_norm", run)
        assert grad == {name: approx(value) for name, value in ref["layers"].items()}
        # the default label tiers: a Sequential's children are its blocks, at their depth, without rank
        (first,) = prom.query(f'gradwatch_layer_grad_norm{{run="{run}",layer="0"}}')
        assert {k: v for k, v in first["metric"].items() if k not in ("instance", "job")} == {
            "__name__": "gradwatch_layer_grad_norm", "run": run, "run_name": "e2e", "project": "default",
            "layer": "0", "depth": "0"}
        assert _by_layer(prom, "gradwatch_layer_act_grad_norm", run) == {
            name: approx(v["act_grad_norm"]) for name, v in snap["layers"].items()}
        assert _by_layer(prom, "gradwatch_layer_zero_ratio", run) == {"1": approx(snap["layers"]["1"]["zero_ratio"])}
        assert _by_layer(prom, "gradwatch_layer_dead_ratio", run) == {"1": approx(snap["layers"]["1"]["dead_ratio"])}
        assert _by_layer(prom, "gradwatch_layer_saturation_ratio", run) == {
            "3": approx(snap["layers"]["3"]["saturation_ratio"])}
        assert _by_layer(prom, "gradwatch_layer_update_ratio", run) == {
            layer: approx(_layer_update_ratio(snap["params"], layer)) for layer in ("0", "2", "4")}

        info = prom.query(f'gradwatch_run_info{{run="{run}"}}')
        assert len(info) == 1 and info[0]["metric"]["name"] == "e2e" and info[0]["metric"]["device"] == "cpu"
        assert _one(prom, f'gradwatch_run_status{{run="{run}",status="running"}}') == 1

        go.touch()  # the run finishes; after the 3 s grace its series leave /metrics and Prometheus
        assert wait_until(train.poll, "the training process to exit") == 0
        prom.wait_for(f'gradwatch_step{{run="{run}"}}', lambda r: r == [], "the finished run's series to go")
        assert prom.query(f'gradwatch_run_info{{run="{run}"}}') == []
        assert _one(prom, "gradwatch_exporter_runs") == 0
    finally:
        go.touch()
        if train.poll() is None:
            train.kill()
            train.wait()
    assert serve.stop() == 0


def test_prometheus_scrapes_over_tls_with_basic_auth(tmp_path: Path, serve_factory, prometheus_factory,  # noqa: F811
                                                     tls_files: tuple[Path, Path]) -> None:  # noqa: F811
    cert, key = tls_files
    SyntheticRun(run_id="tlsrun").write(tmp_path, steps=40, close=False)
    port = free_port()
    serve = serve_factory(["--home", str(tmp_path), "--port", str(port), "--tls-cert", str(cert),
                           "--tls-key", str(key), "--basic-auth-user", "prom"],
                          env={"GRADWATCH_BASIC_AUTH_PASSWORD": "pw-e2e-secret"})
    serve.started()
    prom = prometheus_factory([f"127.0.0.1:{port}"], scheme="https", basic_auth=("prom", "pw-e2e-secret"),
                              ca_file=cert)
    target = prom.wait_target_up()
    assert target["scrapeUrl"].startswith("https://")
    result = prom.wait_for('gradwatch_step{run="tlsrun"}', lambda r: len(r) == 1, "the TLS-scraped step")
    assert result[0]["value"][1] == "39"
    assert serve.stop() == 0
    assert "pw-e2e-secret" not in serve.log_path.read_text()
    assert base64.b64encode(b"prom:pw-e2e-secret").decode() not in serve.log_path.read_text()


def test_a_nan_loss_reaches_prometheus_as_nan_and_fires_the_alert_rules(tmp_path: Path, serve_factory,  # noqa: F811
                                                                         prometheus_factory) -> None:  # noqa: F811
    """A real run whose batch holds NaN from step 53 to its last step 59: Prometheus scrapes NaN
    for the loss and the total norm (not their last finite values), and the expressions of the
    shipped alert rules for a non-finite loss, gradients and activations select the run."""
    import yaml

    from tests.fixtures.cli_runs import train_nan_batch

    run = train_nan_batch(tmp_path, steps=60).run_id
    port = free_port()
    serve = serve_factory(["--home", str(tmp_path), "--port", str(port), "--grace", "3600", "--poll-interval", "0.2"])
    serve.started()
    prom = prometheus_factory([f"127.0.0.1:{port}"])
    prom.wait_target_up()
    prom.wait_for(f'gradwatch_step{{run="{run}"}}', lambda r: len(r) == 1 and r[0]["value"][1] == "59",
                  "the last step in Prometheus")
    for metric in ("gradwatch_loss", "gradwatch_global_grad_norm"):
        (sample,) = prom.query(f'{metric}{{run="{run}"}}')
        assert sample["value"][1] == "NaN", metric
    assert _one(prom, f'gradwatch_nonfinite_loss_steps_total{{run="{run}"}}') == 7
    rules = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "gradwatch-alerts.yml"
    exprs = {r["alert"]: r["expr"] for g in yaml.safe_load(rules.read_text())["groups"] for r in g["rules"]
             if "alert" in r}
    for name in ("GradwatchLossNotFinite", "GradwatchNonFiniteGradients", "GradwatchActivationsNotFinite"):
        assert {r["metric"]["run"] for r in prom.query(exprs[name])} == {run}, name
    assert prom.query(exprs["GradwatchGradNormOverflow"]) == []
    assert serve.stop() == 0
