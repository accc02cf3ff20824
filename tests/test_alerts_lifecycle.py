"""The alert lifecycle (pending -> firing -> resolved) as pure state, what notifications say in
each format, and the `[alerts]` configuration."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from gradwatch.alerts.config import AlertsConfig
from gradwatch.alerts.lifecycle import Lifecycle
from gradwatch.alerts.message import Notification, alertmanager_alert, alertname, payload, slack, text
from gradwatch.alerts.rules import RULE_IDS, check_threshold, thresholds_applied
from gradwatch.diagnose import Evidence, Finding
from gradwatch.diagnose import thresholds as th


def _finding(rule: str = "dying_units", severity: str = "warning", value: float = 0.7,
             layers: tuple[str, ...] = ("fc1", "fc2"), steps: tuple[int, ...] = (40, 80)) -> Finding:
    return Finding(rule, severity, "Dying ReLU units",
                   Evidence(("2 ReLU-family layers have more than 50% dead units",),
                            {"value": value, "threshold": 0.5}, layers, steps),
                   ("a learning rate too high", "initialisation"), ("use LeakyReLU", "lower the learning rate"))


def _hold(steps: int = 0, seconds: float = 0.0):
    return lambda rule: (steps, seconds)


def test_a_finding_fires_at_once_without_for_and_is_notified_once() -> None:
    life = Lifecycle(_hold())
    (t,) = life.observe("r1", "run-a", [_finding()], step=80, now=100.0)
    assert t.kind == "firing"
    a = t.alert
    assert (a.run_id, a.run_name, a.rule, a.severity, a.layer, a.step, a.value, a.threshold) == \
        ("r1", "run-a", "dying_units", "warning", "fc1", 40, 0.7, 0.5)
    assert (a.cause, a.remedy, a.started_at, a.state) == ("a learning rate too high", "use LeakyReLU", 100.0, "firing")
    # still firing: new numbers, no transition, so nothing is sent twice
    assert life.observe("r1", "run-a", [_finding(value=0.8)], step=100, now=101.0) == []
    (firing,) = life.firing()
    assert firing.value == 0.8 and firing.started_at == 100.0 and firing.step == 40


def test_pending_until_its_for_steps_and_seconds_have_passed() -> None:
    life = Lifecycle(_hold(steps=50, seconds=10.0))
    assert life.observe("r1", "a", [_finding()], step=100, now=0.0) == []
    assert life.observe("r1", "a", [_finding()], step=160, now=5.0) == []  # 60 steps, but 5 s
    assert life.firing() == []
    (t,) = life.observe("r1", "a", [_finding()], step=170, now=10.0)
    assert t.kind == "firing" and t.alert.since_step == 100 and t.alert.since == 0.0


def test_a_pending_alert_that_clears_is_dropped_unseen() -> None:
    life = Lifecycle(_hold(steps=50))
    assert life.observe("r1", "a", [_finding()], step=100, now=0.0) == []
    assert life.observe("r1", "a", [], step=120, now=1.0) == []
    assert life.runs() == set()
    assert life.observe("r1", "a", [_finding()], step=130, now=2.0) == []  # pending again, from step 130
    assert life.observe("r1", "a", [_finding()], step=175, now=3.0) == []


def test_resolved_when_the_rule_finds_nothing_or_the_run_ends() -> None:
    life = Lifecycle(_hold())
    life.observe("r1", "a", [_finding(), _finding("saturation")], step=10, now=1.0)
    life.observe("r2", "b", [_finding()], step=10, now=1.0)
    (t,) = life.observe("r1", "a", [_finding("saturation")], step=20, now=2.0)
    assert (t.kind, t.alert.rule, t.alert.ended_at, t.alert.state) == ("resolved", "dying_units", 2.0, "resolved")
    (t,) = life.end_run("r1", now=3.0)
    assert (t.kind, t.alert.rule) == ("resolved", "saturation")
    assert [a.run_id for a in life.firing()] == ["r2"]
    assert life.end_run("r1", now=4.0) == []


def test_severity_rises_while_firing_and_never_falls() -> None:
    life = Lifecycle(_hold())
    life.observe("r1", "a", [_finding(severity="warning")], step=10, now=1.0)
    (t,) = life.observe("r1", "a", [_finding(severity="error", value=0.95)], step=20, now=2.0)
    assert (t.kind, t.alert.severity, t.alert.previous_severity) == ("escalated", "error", "warning")
    assert t.alert.started_at == 1.0
    assert life.observe("r1", "a", [_finding(severity="warning")], step=30, now=3.0) == []
    assert life.firing()[0].severity == "error"


def test_the_most_severe_finding_of_a_rule_counts() -> None:
    life = Lifecycle(_hold())
    (t,) = life.observe("r1", "a", [_finding(severity="warning"), _finding(severity="error")], step=1, now=1.0)
    assert t.alert.severity == "error"


def test_restored_alerts_are_not_notified_again() -> None:
    first = Lifecycle(_hold())
    (t,) = first.observe("r1", "a", [_finding()], step=10, now=1.0)
    again = Lifecycle(_hold())
    again.restore([t.alert])
    assert again.observe("r1", "a", [_finding()], step=20, now=2.0) == []
    (t2,) = again.observe("r1", "a", [], step=30, now=3.0)
    assert t2.kind == "resolved" and t2.alert.started_at == 1.0


# --------------------------------------------------------------------------- messages

def _fired(**kw):
    life = Lifecycle(_hold())
    (t,) = life.observe("3f9a2c41d0b7", "bert base", [_finding(**kw)], step=80, now=1_700_000_000.0)
    return t.alert


def test_every_format_names_run_layer_step_value_threshold_cause_remedy_and_command() -> None:
    n = Notification("firing", _fired())
    body = payload(n)
    assert body["status"] == "firing" and body["version"] == 1
    a = body["alert"]
    assert a["run"] == {"id": "3f9a2c41d0b7", "name": "bert base"}
    assert (a["layer"], a["step"], a["value"], a["threshold"]) == ("fc1", 40, 0.7, 0.5)
    assert (a["cause"], a["remedy"]) == ("a learning rate too high", "use LeakyReLU")
    assert a["command"] == "gradwatch diagnose 'bert base'"
    assert a["started_at"] == "2023-11-14T22:13:20.000Z" and a["ended_at"] is None
    json.dumps(body, allow_nan=False)
    for rendered in (text(n), slack(n)["text"], body["text"]):
        for part in ("bert base", "3f9a2c41d0b7", "layer fc1", "step 40", "value 0.7", "threshold 0.5",
                     "a learning rate too high", "use LeakyReLU", "gradwatch diagnose 'bert base'"):
            assert part in rendered, (part, rendered)
    assert text(n).splitlines()[0] == "[WARNING] Dying ReLU units: run bert base (3f9a2c41d0b7), layer fc1, step 40"
    assert slack(n)["text"].startswith("*[WARNING] Dying ReLU units")


def test_non_finite_values_are_strings_in_json() -> None:
    body = payload(Notification("firing", _fired(value=math.inf)))
    assert body["alert"]["value"] == "inf"
    json.dumps(body, allow_nan=False)


def test_alertmanager_alert_follows_its_conventions() -> None:
    a = _fired(severity="error")
    am = alertmanager_alert(a, ends_at=1_700_000_060.0)
    assert am["labels"] == {"alertname": "GradwatchDyingUnits", "severity": "critical", "run": "3f9a2c41d0b7",
                            "run_name": "bert base", "rule": "dying_units", "source": "gradwatch", "layer": "fc1"}
    ann = am["annotations"]
    assert ann["summary"] == "Dying ReLU units: run bert base (3f9a2c41d0b7), layer fc1, step 40"
    assert (ann["value"], ann["threshold"], ann["step"]) == ("0.7", "0.5", "40")
    assert ann["cause"] == "a learning rate too high" and ann["remedy"] == "use LeakyReLU"
    assert ann["command"] == "gradwatch diagnose 'bert base'"
    assert am["startsAt"] == "2023-11-14T22:13:20.000Z" and am["endsAt"] == "2023-11-14T22:14:20.000Z"
    assert alertname("nonfinite_loss") == "GradwatchNonfiniteLoss"


# --------------------------------------------------------------------------- configuration

def test_defaults_need_no_configuration() -> None:
    c = AlertsConfig()
    assert c.enabled and c.min_severity == "warning" and c.webhooks == [] and c.alertmanager.url is None
    assert c.rule("dying_units").enabled and c.rule("dying_units").for_steps is None


@pytest.mark.parametrize(("data", "message"), [
    pytest.param({"rules": {"dyin_units": {}}}, "unknown rule 'dyin_units'", id="unknown-rule"),
    pytest.param({"rules": {"dying_units": {"severity": "fatal"}}}, "Input should be 'error', 'warning' or 'info'",
                 id="severity"),
    pytest.param({"rules": {"dying_units": {"for_steps": -1}}}, "greater than or equal to 0", id="for-steps"),
    pytest.param({"thresholds": {"spike_factr": 3}}, "unknown threshold 'spike_factr'", id="unknown-threshold"),
    pytest.param({"thresholds": {"spike_factor": True}}, "must be a positive number", id="bool-threshold"),
    pytest.param({"thresholds": {"spike_lookback": 2.5}}, "whole number", id="int-threshold"),
    pytest.param({"webhooks": [{"url": "ftp://hooks.example/T0K3N"}]}, "http:// or https://", id="webhook-url"),
    pytest.param({"webhooks": [{"url": "http://a", "name": "x"}, {"url": "http://b", "name": "x"}]}, "unique",
                 id="names"),
    pytest.param({"window_steps": 5}, "greater than or equal to 20", id="window"),
])
def test_bad_configuration_is_refused(data: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as info:
        AlertsConfig.model_validate(data)
    assert "T0K3N" not in str(info.value.errors(include_input=False))


def test_every_rule_id_is_configurable() -> None:
    config = AlertsConfig.model_validate({"rules": {r: {"for_steps": 3} for r in RULE_IDS}})
    assert all(config.rule(r).for_steps == 3 for r in RULE_IDS)


def test_threshold_overrides_apply_only_during_an_evaluation() -> None:
    name, value = check_threshold("dead_ratio", 0.8)
    assert (name, value) == ("DEAD_RATIO", 0.8)
    before = th.DEAD_RATIO
    with thresholds_applied({name: value}):
        assert th.DEAD_RATIO == 0.8
    assert th.DEAD_RATIO == before


def test_transitions_that_could_not_be_stored_are_made_again() -> None:
    life = Lifecycle(_hold())
    (t,) = life.observe("r1", "a", [_finding()], step=10, now=1.0)
    life.undo(t)
    (again,) = life.observe("r1", "a", [_finding()], step=20, now=2.0)
    assert again.kind == "firing"
    (up,) = life.observe("r1", "a", [_finding(severity="error")], step=30, now=3.0)
    life.undo(up)
    assert life.firing()[0].severity == "warning"
    (up,) = life.observe("r1", "a", [_finding(severity="error")], step=40, now=4.0)
    assert up.kind == "escalated"
    (gone,) = life.observe("r1", "a", [], step=50, now=5.0)
    life.undo(gone)
    (gone_again,) = life.observe("r1", "a", [], step=60, now=6.0)
    assert gone_again.kind == "resolved" and gone_again.alert.ended_at == 6.0
