"""The rules engine on a real SQLite store, fed by run logs written step by step: the diagnosis
rules on a window of recent steps, alerts stored with their numbers, notified once, resolved
when the condition clears or the run ends, configuration, restarts and the stalled-run rule."""

from __future__ import annotations

import io
import json
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from gradwatch.alerts import AlertEngine, AlertsConfig
from gradwatch.alerts.lifecycle import Alert
from gradwatch.alerts.message import Notification
from gradwatch.diagnose import RULES, RunData
from gradwatch.diagnose.load import RunWindow, load_run_data
from gradwatch.ingest import Ingester
from gradwatch.service.alert_metrics import AlertCollector
from gradwatch.service.logs import JsonFormatter
from gradwatch.store import Store, StoreError
from tests.fixtures.live_log import LiveLog

NAN_FROM = 45


class Recorder:
    """A notifier that keeps what it is told."""

    label = "recorder"

    def __init__(self) -> None:
        self.sent: list[Notification] = []
        self.ticks = 0

    def start(self) -> None:
        pass

    def notify(self, n: Notification) -> None:
        self.sent.append(n)

    def tick(self, firing: list[Alert], now: float) -> None:
        self.ticks += 1

    def stop(self, timeout: float) -> None:
        pass


class Harness:
    """A store, an ingester and an engine on one home, with a clock the test moves."""

    def __init__(self, home: Path, config: AlertsConfig | None = None, rules=RULES) -> None:
        self.home = home
        self.now = 1_000.0
        self.store = Store.open(home=home)
        self.ingester = Ingester(self.store, home, clock=lambda: self.now)
        self.recorder = Recorder()
        out = io.StringIO()
        handler = logging.StreamHandler(out)
        handler.setFormatter(JsonFormatter())
        self.logger = logging.getLogger(f"test-engine-{id(self)}")
        self.logger.handlers, self.logger.propagate = [handler], False
        self.logger.setLevel(logging.INFO)
        self.log = out
        self.engine = AlertEngine(self.store, config or AlertsConfig(), [self.recorder], self.logger,
                                  clock=lambda: self.now, rules=rules, home=home)
        self.engine.start()

    def tick(self, seconds: float = 5.0):
        """Move the clock, ingest, evaluate; the transitions."""
        self.now += seconds
        report = self.ingester.poll_once()
        return self.engine.evaluate(report.finished + report.crashed)

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.log.getvalue().splitlines()]

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def harness(tmp_path: Path):
    made: list[Harness] = []

    def make(config: AlertsConfig | None = None, rules=RULES) -> Harness:
        h = Harness(tmp_path, config, rules)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def _nan_after(step: int):
    return lambda s: np.where(s >= step, np.nan, 1.0)


def test_a_nan_loss_fires_once_is_stored_with_its_numbers_and_resolves_when_the_run_ends(harness, tmp_path) -> None:
    h = harness()
    log = LiveLog(tmp_path, name="nan-run")
    log.write(40)
    assert h.tick() == []
    log.write(20, loss=_nan_after(NAN_FROM), norm=_nan_after(NAN_FROM), nonfinite=lambda s: (s >= NAN_FROM) * 4.0)
    fired = h.tick()
    rules = {t.alert.rule: t for t in fired}
    assert {"nonfinite_loss", "nonfinite_gradients"} <= set(rules)
    assert all(t.kind == "firing" for t in fired)
    loss = rules["nonfinite_loss"].alert
    assert (loss.run_name, loss.severity, loss.step) == ("nan-run", "error", NAN_FROM)
    stored = {a.rule: a for a in h.store.alerts(run_id=log.run_id)}
    row = stored["nonfinite_loss"]
    assert row.active and row.step == NAN_FROM and row.severity == "error" and row.message == loss.title
    assert row.cause == loss.cause and row.remedy == loss.remedy and row.cause and row.remedy
    assert (row.value, row.threshold) == (loss.value, loss.threshold)
    assert [n.status for n in h.recorder.sent] == ["firing"] * len(fired)

    log.write(20, loss=math.nan, norm=math.nan, nonfinite=4.0)  # still NaN: nothing new is sent
    assert h.tick() == []
    assert len(h.recorder.sent) == len(fired)

    log.close()
    resolved = h.tick()
    assert {t.alert.rule for t in resolved} == set(rules) and all(t.kind == "resolved" for t in resolved)
    assert all(not a.active and a.ended_at == h.now for a in h.store.alerts(run_id=log.run_id))
    assert [n.status for n in h.recorder.sent[len(fired):]] == ["resolved"] * len(fired)
    events = [e["event"] for e in h.events()]
    assert events.count("alert_firing") == len(fired) and events.count("alert_resolved") == len(fired)
    firing = next(e for e in h.events() if e["event"] == "alert_firing" and e["rule"] == "nonfinite_loss")
    assert firing["command"] == "gradwatch diagnose nan-run" and firing["step"] == NAN_FROM
    assert firing["run"] == log.run_id and firing["run_name"] == "nan-run" and firing["cause"] == loss.cause


def test_resolved_when_the_window_no_longer_holds_the_problem(harness, tmp_path) -> None:
    h = harness(AlertsConfig(window_steps=50))
    log = LiveLog(tmp_path)
    log.write(40)
    log.write(10, loss=math.nan)
    assert {t.alert.rule for t in h.tick()} == {"nonfinite_loss"}
    log.write(30)  # finite again, the NaN steps 40-49 still in the last 50 steps
    assert h.tick() == []
    log.write(30)
    (t,) = h.tick()
    assert (t.kind, t.alert.rule) == ("resolved", "nonfinite_loss")


def test_a_finding_must_hold_for_its_steps_before_it_fires(harness, tmp_path) -> None:
    h = harness(AlertsConfig.model_validate({"rules": {"dying_units": {"for_steps": 60}}}))
    log = LiveLog(tmp_path)
    log.write(40, dead=0.95)
    assert h.tick() == []  # pending from step 39
    log.write(40, dead=0.95)
    assert h.tick() == []  # 40 steps held
    log.write(40, dead=0.95)
    (t,) = h.tick()
    assert (t.kind, t.alert.rule, t.alert.severity, t.alert.layer) == ("firing", "dying_units", "error", "act")


def test_rules_can_be_disabled_their_severity_changed_and_min_severity_raised(harness, tmp_path) -> None:
    h = harness(AlertsConfig.model_validate({"rules": {"nonfinite_loss": {"enabled": False},
                                                       "dying_units": {"severity": "info", "for_steps": 0}}}))
    log = LiveLog(tmp_path)
    log.write(40, loss=math.nan, dead=0.95)
    assert h.tick() == []  # the loss rule is off; dying units is info, below min_severity "warning"


def test_thresholds_are_configurable(harness, tmp_path) -> None:
    config = AlertsConfig.model_validate({"thresholds": {"dead_ratio": 0.2},
                                          "rules": {"dying_units": {"for_steps": 0}}})
    h = harness(config)
    log = LiveLog(tmp_path)
    log.write(40, dead=0.3)  # under the default 0.5, over the configured 0.2
    (t,) = h.tick()
    assert t.alert.rule == "dying_units" and t.alert.threshold == 0.2


def test_a_restarted_engine_takes_up_firing_alerts_without_notifying_again(harness, tmp_path) -> None:
    first = harness()
    log = LiveLog(tmp_path)
    log.write(40, loss=math.nan)
    (t,) = first.tick()
    first.engine.stop()
    again = harness()
    log.write(20, loss=math.nan)
    assert again.tick() == []
    assert again.recorder.sent == []
    assert [a.rule for a in again.engine.snapshot().firing] == ["nonfinite_loss"]
    log.close()
    (resolved,) = again.tick()
    assert resolved.kind == "resolved" and resolved.alert.id == t.alert.id


def test_a_run_stalled_while_its_process_lives(harness, tmp_path) -> None:
    h = harness(AlertsConfig(stalled_after=60))
    log = LiveLog(tmp_path)
    log.write(40)
    assert h.tick() == []
    assert h.tick(30) == []
    (t,) = h.tick(31)
    assert (t.kind, t.alert.rule, t.alert.severity, t.alert.step) == ("firing", "stalled_run", "warning", 39)
    assert t.alert.value == 61 and t.alert.threshold == 60
    log.write(1)
    (t,) = h.tick()
    assert (t.kind, t.alert.rule) == ("resolved", "stalled_run")


def test_a_dead_process_is_not_stalled(harness, tmp_path) -> None:
    h = harness(AlertsConfig(stalled_after=60))
    log = LiveLog(tmp_path, pid=2 ** 22 + 12345)  # no such process on this host
    log.write(40)
    assert h.tick() == [] and h.tick(100) == []


def test_a_failing_rule_is_logged_once_and_the_others_still_run(harness, tmp_path) -> None:
    def broken(data: RunData):
        raise ValueError("boom")

    h = harness(rules=(broken, *RULES))
    log = LiveLog(tmp_path)
    log.write(40, loss=math.nan)
    assert {t.alert.rule for t in h.tick()} == {"nonfinite_loss"}
    log.write(20, loss=math.nan)
    h.tick()
    failures = [e for e in h.events() if e["event"] == "rule_failed"]
    assert len(failures) == 1 and failures[0]["rule"] == "broken" and failures[0]["error"] == "ValueError: boom"


def test_only_runs_whose_logs_lie_in_the_home_are_evaluated(harness, tmp_path) -> None:
    h = harness()
    other_home = tmp_path / "elsewhere"
    log = LiveLog(other_home)
    log.write(40, loss=math.nan)
    with Store.open(home=tmp_path) as store:  # the same store, fed from another host's home
        Ingester(store, other_home).poll_once()
    assert h.tick() == []


def test_the_window_holds_the_same_data_as_the_whole_run_over_its_steps(tmp_path) -> None:
    log = LiveLog(tmp_path)
    with Store.open(home=tmp_path) as store:
        ingester = Ingester(store, tmp_path)
        window = None
        for k in range(6):
            log.write(17, loss=lambda s: 1.0 + s, dead=lambda s: s / 1000)
            ingester.poll_once()
            window = window or RunWindow(store, log.run_id, steps=50)
            window.refresh(layers=k % 2 == 1)
        window.refresh()
        whole = load_run_data(store, log.run_id)
    part = window.data
    assert window.last_step == 101 and part.run["loss"].steps[0] == 52
    for metric, series in part.run.items():
        full = whole.run[metric]
        np.testing.assert_array_equal(series.steps, full.steps[full.steps >= 52], metric)
        np.testing.assert_array_equal(series.values, full.values[full.steps >= 52], metric)
    for metric, series in part.layer.items():
        full = whole.layer[metric]
        keep = full.steps >= 52
        np.testing.assert_array_equal(series.values, full.values[:, keep], metric)
        np.testing.assert_array_equal(series.present, full.present[:, keep], metric)
    np.testing.assert_allclose(part.run["param_norm_total"].values, 10.0)  # sqrt(4 x 5^2)
    assert part.group["lr"].values.shape == (1, 50)


def test_alert_metrics_on_the_exporter(harness, tmp_path) -> None:
    h = harness()
    log = LiveLog(tmp_path, name="nan-run")
    log.write(40, loss=math.nan)
    h.tick()
    registry = CollectorRegistry()
    registry.register(AlertCollector(h.engine.snapshot))
    text = generate_latest(registry).decode()
    assert (f'gradwatch_alert_active{{layer="",rule="nonfinite_loss",run="{log.run_id}",run_name="nan-run",'
            'severity="error"} 1.0') in text
    assert 'gradwatch_alerts_total{rule="nonfinite_loss",severity="error"} 1.0' in text
    log.close()
    h.tick()
    text = generate_latest(registry).decode()
    assert "gradwatch_alert_active{" not in text
    assert 'gradwatch_alerts_total{rule="nonfinite_loss",severity="error"} 1.0' in text


def test_severity_escalation_is_a_new_stored_alert_and_one_notification(harness, tmp_path) -> None:
    h = harness(AlertsConfig.model_validate({"layers_every": 0, "rules": {"dying_units": {"for_steps": 0}}}))
    log = LiveLog(tmp_path)
    log.write(40, dead=0.6)
    (t,) = h.tick()
    assert t.alert.severity == "warning"
    log.write(200, dead=0.97)
    (t2,) = h.tick()
    assert (t2.kind, t2.alert.severity, t2.alert.previous_severity) == ("escalated", "error", "warning")
    old, new = sorted(h.store.alerts(run_id=log.run_id), key=lambda a: a.id)
    assert (old.severity, old.active, new.severity, new.active) == ("warning", False, "error", True)
    assert h.recorder.sent[-1].escalated_from == "warning"
    assert h.recorder.sent[-1].alert.id == new.id


class FlakyStore:
    """The store, with its first `add_alert` failing as a database outage would."""

    def __init__(self, store: Store) -> None:
        self._store, self.failed = store, False

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    def add_alert(self, *args, **kwargs) -> int:
        if not self.failed:
            self.failed = True
            raise StoreError("cannot write sqlite:///gradwatch.db: database is locked")
        return self._store.add_alert(*args, **kwargs)


def test_an_alert_the_store_could_not_take_fires_on_the_next_pass(harness, tmp_path) -> None:
    h = harness()
    h.engine.store = FlakyStore(h.store)
    log = LiveLog(tmp_path)
    log.write(40, loss=math.nan)
    with pytest.raises(StoreError, match="database is locked"):
        h.tick()
    assert h.recorder.sent == [] and h.store.alerts() == []
    (t,) = h.tick()
    assert t.kind == "firing" and t.alert.id is not None
    assert [n.status for n in h.recorder.sent] == ["firing"] and len(h.store.alerts(active=True)) == 1


def test_a_moving_run_is_evaluated_at_most_every_evaluate_every_and_its_layers_read_every_layers_every(
        harness, tmp_path) -> None:
    h = harness(AlertsConfig.model_validate({"evaluate_every": 10, "layers_every": 60,
                                             "rules": {"dying_units": {"for_steps": 0}}}))
    log = LiveLog(tmp_path, run_id="cadence3")
    assert h.engine._phase(log.run_id, 60) == pytest.approx(5.04)  # its reads: at once, then 55 s later, every 60 s
    log.write(40)
    assert h.tick(1) == []  # evaluated, layers read
    log.write(40, dead=0.95)
    assert h.tick(10) == []  # evaluated, but the layers are not due yet
    log.write(10, dead=0.95, loss=lambda s: np.where(s >= 85, np.nan, 1.0))
    assert h.tick(5) == []  # moved, but evaluated 5 s ago
    got = {t.alert.rule: t.alert for t in h.tick(5)}
    assert set(got) == {"nonfinite_loss", "dying_units"}  # a NaN has the layers read at once
    assert got["nonfinite_loss"].step == 85


def test_runs_first_seen_together_are_evaluated_in_different_passes_afterwards(harness, tmp_path) -> None:
    evaluated: list[tuple[float, str]] = []

    def counting(data: RunData):
        evaluated.append((h.now, data.run_id))
        return []

    h = harness(AlertsConfig.model_validate({"evaluate_every": 2}), rules=(counting,))
    logs = [LiveLog(tmp_path, run_id=f"spread{i:02d}", name=f"spread{i}") for i in range(12)]
    for log in logs:
        log.write(20)
    h.tick(0.5)
    assert len(evaluated) == 12  # all at once on the pass that first sees them
    for _ in range(8):  # then every 2 s each, but at its own phase: the 0.5 s passes share them out
        for log in logs:
            log.write(1)
        h.tick(0.5)
    per_pass = Counter(t for t, _ in evaluated[12:])
    assert max(per_pass.values()) <= 4  # without phases: all 12 on one pass in four
    assert Counter(r for _, r in evaluated[12:]) == {log.run_id: 2 for log in logs}  # every 2 s, no more
