"""End to end with real processes: a training job (a tiny torch model under `gradwatch.watch`)
turns NaN; `gradwatch serve` (a subprocess on 127.0.0.1) delivers the alert to real HTTP
receivers (one answering at once, one that is down until after the alert fired, one slow) and
to a real Alertmanager, and resolves it when the run ends. The time from the NaN step to the
webhook is measured and printed (docs/alerts.md records it); the bound asserted is generous.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.alertmanager import alertmanager_factory  # noqa: F401 - fixture
from tests.fixtures.cli_runs import run_cli
from tests.fixtures.prometheus import free_port, wait_until
from tests.fixtures.receiver import Received, receiver_factory  # noqa: F401 - fixture
from tests.fixtures.service import serve_factory  # noqa: F401 - fixture

pytestmark = pytest.mark.slow

NAN_STEP = 30
#: What "within 5 s" is checked against: generous, so a loaded machine cannot fail it.
LATENCY_BOUND_S = 60.0

TRAIN = r"""
import json, math, sys, time
from pathlib import Path
import torch
import gradwatch

out, go = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(32, 4), torch.randn(32, 1)
with gradwatch.watch(model, opt, run="nan e2e", config={"guards": {"nonfinite": "skip"}}) as watcher:
    for step in range(NAN_STEP + 20):
        batch = x.clone()
        if step >= NAN_STEP:
            batch[0, 0] = math.nan  # a corrupt batch: the loss and the gradients are NaN from here
        if step == NAN_STEP:
            out.write_text(json.dumps({"run_id": watcher.run_id, "nan_at": time.time()}))
        loss = torch.nn.functional.mse_loss(model(batch), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        watcher.log(loss=loss)
        time.sleep(0.05)
    while not go.exists():
        time.sleep(0.05)
""".replace("NAN_STEP", str(NAN_STEP))


class Training:
    """The training subprocess: `info` once it reached the NaN step, `finish()` ends the run."""

    def __init__(self, home: Path) -> None:
        self.out, self.go = home / "train.json", home / "go"
        env = {**os.environ, "GRADWATCH_HOME": str(home)}
        self.process = subprocess.Popen([sys.executable, "-c", TRAIN, str(self.out), str(self.go)], env=env)

    def info(self) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            assert self.process.poll() is None, f"training failed with {self.process.returncode}"
            return json.loads(self.out.read_text()) if self.out.exists() else None
        return wait_until(probe, "the training job to reach its NaN step")

    def finish(self) -> None:
        self.go.touch()
        assert wait_until(self.process.poll, "the training job to exit") == 0

    def kill(self) -> None:
        self.go.touch()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _one(posts: list[Received], status: str, rule: str = "nonfinite_loss") -> list[Received]:
    return [p for p in posts if p.body.get("status") == status and p.body.get("alert", {}).get("rule") == rule]


def _am_resolved(posts: list[Received]) -> bool:
    return any(p.body["status"] == "resolved" and any(
        a["labels"]["alertname"] == "GradwatchNonfiniteLoss" for a in p.body["alerts"]) for p in posts)


def test_a_nan_run_is_alerted_to_webhooks_and_alertmanager_and_resolved_when_it_ends(
        tmp_path: Path, serve_factory, receiver_factory, alertmanager_factory) -> None:  # noqa: F811
    fast, slow, am_hook = receiver_factory(), receiver_factory(delay=1.0), receiver_factory()
    am = alertmanager_factory(f"{am_hook.url}/am")
    late_port = free_port()
    config = tmp_path / "serve.toml"
    config.write_text(f"""
[[alerts.webhooks]]
url = "http://127.0.0.1:{late_port}/hook/SECRET-PATH-TOKEN"
name = "late"
retries = 10
backoff = 0.5

[[alerts.webhooks]]
url = "{slow.url}/slow"
timeout = 10
""")
    serve = serve_factory(["--home", str(tmp_path), "--port", "0", "--poll-interval", "0.2", "--config", str(config),
                           "--webhook", f"{fast.url}/hook?token=QUERY-TOKEN", "--alertmanager", am.url])
    receivers = ["webhook late", f"webhook #2 {slow.url}", f"webhook #3 {fast.url}", f"alertmanager {am.url}"]
    assert serve.started()["alert_receivers"] == receivers
    train = Training(tmp_path)
    try:
        info = train.info()
        run_id = info["run_id"]
        (firing,) = _one(fast.wait_for(lambda p: _one(p, "firing"), "the alert at the webhook"), "firing")
        latency = firing.at - info["nan_at"]
        print(f"\nalert latency, NaN step to webhook: {latency:.2f} s")
        assert 0 < latency < LATENCY_BOUND_S
        alert = firing.body["alert"]
        assert firing.path == "/hook?token=QUERY-TOKEN"
        assert alert["run"] == {"id": run_id, "name": "nan e2e"} and alert["severity"] == "error"
        assert alert["step"] == NAN_STEP and alert["command"] == "gradwatch diagnose 'nan e2e'"
        assert alert["cause"] and alert["remedy"] and alert["started_at"]
        assert f"step {NAN_STEP}" in firing.body["text"] and "gradwatch diagnose 'nan e2e'" in firing.body["text"]

        late = receiver_factory(port=late_port)  # the receiver that was down comes up: a retry delivers
        late.wait_for(lambda p: _one(p, "firing"), "the retried delivery to the receiver that was down")
        slow.wait_for(lambda p: _one(p, "firing"), "the delivery to the slow receiver")

        def held() -> dict[str, Any] | None:
            return next((a for a in am.alerts() if a["labels"].get("alertname") == "GradwatchNonfiniteLoss"), None)
        held_alert = wait_until(held, "Alertmanager to hold the alert")
        labels, annotations = held_alert["labels"], held_alert["annotations"]
        assert labels["run"] == run_id and labels["run_name"] == "nan e2e" and labels["severity"] == "critical"
        assert labels["rule"] == "nonfinite_loss" and held_alert["status"]["state"] == "active"
        assert annotations["step"] == str(NAN_STEP) and annotations["command"] == "gradwatch diagnose 'nan e2e'"
        assert annotations["cause"] and annotations["remedy"] and f"run nan e2e ({run_id})" in annotations["summary"]

        train.finish()
        for rec in (fast, late, slow):
            (resolved,) = _one(rec.wait_for(lambda p: _one(p, "resolved"), "the resolved alert"), "resolved")
            assert resolved.body["alert"]["ended_at"] and resolved.body["alert"]["run"]["id"] == run_id
        am_hook.wait_for(_am_resolved, "Alertmanager's resolved notification")
        assert len(_one(fast.posts, "firing")) == 1  # notified once while it fired
    finally:
        train.kill()
    assert serve.stop() == 0
    log = serve.log_path.read_text()
    assert "SECRET-PATH-TOKEN" not in log and "QUERY-TOKEN" not in log
    events = serve.events()
    fired = [e for e in events if e["event"] == "alert_firing" and e["rule"] == "nonfinite_loss"]
    assert len(fired) == 1 and fired[0]["run_name"] == "nan e2e" and fired[0]["step"] == NAN_STEP
    assert any(e["event"] == "alert_resolved" and e["rule"] == "nonfinite_loss" for e in events)
    assert {e["receiver"] for e in events if e["event"] == "alert_delivered"} == set(receivers)

    listed = json.loads(run_cli("alerts", "--run", run_id, "--json", "--home", str(tmp_path)).stdout)
    loss = next(a for a in listed if a["rule"] == "nonfinite_loss")
    assert loss["state"] == "resolved" and loss["step"] == NAN_STEP and loss["run"]["name"] == "nan e2e"
