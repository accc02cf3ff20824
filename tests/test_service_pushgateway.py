"""Pushing to a real Prometheus Pushgateway; failures logged once, credentials never logged."""

from __future__ import annotations

import io
import json
import math
import subprocess
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.parser import text_string_to_metric_families

from gradwatch.service.exporter import GradwatchCollector, RunLatest
from gradwatch.service.logs import setup_logging
from gradwatch.service.pushgateway import Pusher, redact_url
from gradwatch.store.models import LatestValue
from tests.fixtures.prometheus import free_port, require_binary, stop_process, wait_until
from tests.fixtures.pushgateway import Pushgateway, pushgateway  # noqa: F401 - fixture
from tests.fixtures.runlogs import SyntheticRun
from tests.fixtures.service import serve_factory  # noqa: F401 - fixture


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples if s.name == name}


def test_push_replaces_the_group(pushgateway: Pushgateway) -> None:  # noqa: F811
    runs = [RunLatest(id="r1", name="n", project="p", status="running",
                      values=[LatestValue("r1", 0, "grad_norm_total", "run", "", 3, 2.5)])]
    registry = CollectorRegistry()
    registry.register(GradwatchCollector(lambda: runs))
    stream = io.StringIO()
    pusher = Pusher(pushgateway.url, registry, interval=60, job="gwtest", instance="node7",
                    logger=setup_logging("json", stream))
    assert pusher.push_once()
    got = _samples(pushgateway.metrics(), "gradwatch_global_grad_norm")
    key = (("instance", "node7"), ("job", "gwtest"), ("project", "p"), ("rank", "0"), ("run", "r1"), ("run_name", "n"))
    assert got == {key: 2.5}

    runs.clear()  # the run left /metrics: the next push removes it from the gateway
    assert pusher.push_once()
    assert _samples(pushgateway.metrics(), "gradwatch_global_grad_norm") == {}
    assert _samples(pushgateway.metrics(), "gradwatch_exporter_runs") == {
        (("instance", "node7"), ("job", "gwtest")): 0.0}
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert events == ["push_ok"]  # logged on state changes only


def test_background_pushes_and_final_push(pushgateway: Pushgateway) -> None:  # noqa: F811
    runs: list[RunLatest] = []
    registry = CollectorRegistry()
    registry.register(GradwatchCollector(lambda: runs))
    pusher = Pusher(pushgateway.url, registry, interval=3600, instance="node8")
    pusher.start()  # pushes at once
    runs.append(RunLatest(id="r2", name="n", project="p", status="running",
                          values=[LatestValue("r2", 0, "loss", "run", "", 9, 0.25)]))
    pusher.stop()  # and once more on stop
    got = _samples(pushgateway.metrics(), "gradwatch_loss")
    assert list(got.values()) == [0.25]


def test_push_keeps_nan_and_inf_values(pushgateway: Pushgateway) -> None:  # noqa: F811
    runs = [RunLatest(id="r4", name="n", project="p", status="running",
                      values=[LatestValue("r4", 0, "loss", "run", "", 60, math.nan),
                              LatestValue("r4", 0, "grad_norm_total", "run", "", 60, math.inf),
                              LatestValue("r4", 0, "clip_coef", "run", "", 60, -math.inf)])]
    registry = CollectorRegistry()
    registry.register(GradwatchCollector(lambda: runs))
    assert Pusher(pushgateway.url, registry, instance="node9").push_once()
    text = pushgateway.metrics()
    (loss,) = _samples(text, "gradwatch_loss").values()
    assert math.isnan(loss)  # a NaN loss stays NaN on the gateway, for the alert rules
    assert list(_samples(text, "gradwatch_global_grad_norm").values()) == [math.inf]
    assert list(_samples(text, "gradwatch_clip_coefficient_ratio").values()) == [-math.inf]


def test_unreachable_gateway_is_logged_once_without_credentials() -> None:
    url = f"http://user:topsecret@127.0.0.1:{free_port()}"
    stream = io.StringIO()
    pusher = Pusher(url, CollectorRegistry(), logger=setup_logging("text", stream))
    assert not pusher.push_once()
    assert not pusher.push_once()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and " push_failed " in lines[0]
    assert "topsecret" not in stream.getvalue()


def test_redact_url() -> None:
    assert redact_url("https://u:p@gw.example:9091/x") == "https://u:***@gw.example:9091/x"
    assert redact_url("http://gw:9091/?token=abc") == "http://gw:9091/?token=***"
    assert redact_url("http://gw:9091") == "http://gw:9091"


def test_a_pushgateway_url_with_user_and_password_pushes_with_basic_auth(tmp_path: Path) -> None:
    """A real Pushgateway that requires basic auth (its --web.config.file) accepts the push of a
    URL holding `user:password@`, and refuses one without the credentials."""
    import base64
    import urllib.request

    import bcrypt

    config = tmp_path / "web.yml"
    config.write_text(f"basic_auth_users:\n  pusher: {bcrypt.hashpw(b'Pw:Secret', bcrypt.gensalt(4)).decode()}\n")
    port = free_port()
    with open(tmp_path / "gw.log", "wb") as log:
        process = subprocess.Popen([require_binary("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{port}",
                                    f"--web.config.file={config}", "--persistence.file="], stdout=log,
                                   stderr=subprocess.STDOUT)
    auth = {"Authorization": "Basic " + base64.b64encode(b"pusher:Pw:Secret").decode()}

    def get(path: str) -> str:
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=auth),
                                    timeout=5) as response:
            return response.read().decode()

    try:
        wait_until(lambda: get("/-/ready") is not None, "the pushgateway to be ready")
        registry = CollectorRegistry()
        Gauge("gradwatch_auth_probe", "a gauge pushed with basic auth", registry=registry).set(7)
        assert not Pusher(f"http://127.0.0.1:{port}", registry, job="authjob").push_once()
        assert Pusher(f"http://pusher:Pw%3ASecret@127.0.0.1:{port}", registry, job="authjob").push_once()
        assert "gradwatch_auth_probe" in get("/metrics")
    finally:
        stop_process(process)


def test_serve_pushes_ingested_runs(tmp_path: Path, pushgateway: Pushgateway,  # noqa: F811
                                    serve_factory) -> None:  # noqa: F811
    SyntheticRun(run_id="pushed1").write(tmp_path, steps=30, close=False)
    serve = serve_factory(["--home", str(tmp_path), "--port", "0", "--pushgateway", pushgateway.url,
                           "--push-interval", "0.5", "--push-job", "gwserve"])
    serve.started()

    def pushed() -> dict[tuple[tuple[str, str], ...], float] | None:
        got = _samples(pushgateway.metrics(), "gradwatch_step")
        return got or None

    got = wait_until(pushed, "serve to push the run's step")
    ((labels, value),) = got.items()
    assert dict(labels)["run"] == "pushed1" and dict(labels)["job"] == "gwserve" and value == 29
    assert serve.stop() == 0
    assert [e["event"] for e in serve.events()].count("push_ok") == 1


def test_serve_pushes_a_nan_loss_as_nan(tmp_path: Path, pushgateway: Pushgateway,  # noqa: F811
                                        serve_factory) -> None:  # noqa: F811
    """A real run whose loss is NaN from step 53 to its last step 59: the gateway holds NaN, not
    the last finite loss, and counts the 7 NaN steps."""
    from tests.fixtures.cli_runs import train_nan_batch

    run = train_nan_batch(tmp_path, steps=60).run_id
    serve = serve_factory(["--home", str(tmp_path), "--port", "0", "--grace", "3600", "--pushgateway",
                           pushgateway.url, "--push-interval", "0.5"])
    serve.started()

    def pushed() -> str | None:
        text = pushgateway.metrics()
        return text if list(_samples(text, "gradwatch_step").values()) == [59] else None

    text = wait_until(pushed, "serve to push the run's last step")
    (loss,) = _samples(text, "gradwatch_loss").items()
    assert dict(loss[0])["run"] == run and math.isnan(loss[1])
    assert list(_samples(text, "gradwatch_nonfinite_loss_steps_total").values()) == [7]
    assert serve.stop() == 0
