"""The `[alerts]` section of the service config: defaults, TOML, flags and environment, one-line
errors that never repeat a webhook URL, exit status 2 for a bad config file."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from gradwatch.service.cli import serve
from gradwatch.service.settings import SettingsError, load_settings
from tests.fixtures.settings import clean_env, toml_file  # noqa: F401 - clean_env is an autouse fixture


def test_alerts_need_no_configuration() -> None:
    a = load_settings().alerts
    assert a.enabled and a.webhooks == [] and a.alertmanager.url is None and a.min_severity == "warning"
    assert (a.window_steps, a.evaluate_every, a.layers_every, a.stalled_after) == (500, 2.0, 60.0, 600.0)


def test_toml_section_with_rules_thresholds_and_receivers(tmp_path: Path) -> None:
    config = toml_file(tmp_path, """
[alerts]
window_steps = 200
min_severity = "error"

[alerts.thresholds]
spike_factor = 20
dead_ratio = 0.8

[alerts.rules.dying_units]
severity = "error"
for_steps = 100

[alerts.rules.stalled_run]
enabled = false

[[alerts.webhooks]]
url = "https://hooks.example.com/services/T000/B000/XXXX"
format = "slack"
name = "team"

[alerts.alertmanager]
url = "http://alertmanager:9093"
resend_interval = 30
""")
    a = load_settings({}, config).alerts
    assert (a.window_steps, a.min_severity) == (200, "error")
    assert a.thresholds == {"SPIKE_FACTOR": 20.0, "DEAD_RATIO": 0.8}
    assert a.rule("dying_units").severity == "error" and a.rule("dying_units").for_steps == 100
    assert not a.rule("stalled_run").enabled and a.rule("saturation").enabled
    (hook,) = a.webhooks
    assert (hook.format, hook.name, hook.timeout, hook.retries) == ("slack", "team", 5.0, 3)
    assert "XXXX" not in repr(hook) and hook.url.get_secret_value().endswith("/XXXX")
    assert a.alertmanager.url is not None and a.alertmanager.resend_interval == 30


def test_webhook_flags_add_to_the_config_file(tmp_path: Path) -> None:
    config = toml_file(tmp_path, '[[alerts.webhooks]]\nurl = "https://a.example/1"\n')
    a = load_settings({"alerts": {"webhooks": [{"url": "https://b.example/2", "format": "slack"}]}}, config).alerts
    assert [(w.url.get_secret_value(), w.format) for w in a.webhooks] == [
        ("https://a.example/1", "json"), ("https://b.example/2", "slack")]


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADWATCH_ALERTS__MIN_SEVERITY", "info")
    monkeypatch.setenv("GRADWATCH_ALERTS__WEBHOOKS", '[{"url": "https://hooks.example/env"}]')
    monkeypatch.setenv("GRADWATCH_ALERTS__ALERTMANAGER__URL", "http://am:9093")
    a = load_settings().alerts
    assert a.min_severity == "info" and a.webhooks[0].url.get_secret_value() == "https://hooks.example/env"


@pytest.mark.parametrize(("text", "message"), [
    pytest.param('[alerts]\nwindow_steps = 5\n', r"^invalid configuration: alerts.window_steps: .*20 \(got 5\)$",
                 id="window"),
    pytest.param('[alerts.rules.dyingunits]\nfor_steps = 3\n', r"alerts.rules: unknown rule 'dyingunits'; known: ",
                 id="rule"),
    pytest.param('[alerts.thresholds]\nspike_factor = -1\n', r"threshold 'spike_factor' must be a positive number",
                 id="threshold"),
    pytest.param('[[alerts.webhooks]]\nurl = "ftp://hooks.example/T0K3N"\n',
                 r"^invalid configuration: alerts.webhooks.0.url: webhook URL must be an http:// or https:// URL "
                 r"with a host$", id="webhook-url"),
    pytest.param('[[alerts.webhooks]]\nurl = "https://hooks.example/T0K3N"\ntimeout = 0\n',
                 r"^invalid configuration: alerts.webhooks.0.timeout: Input should be greater than 0$",
                 id="webhook-timeout"),
    pytest.param('[[alerts.webhooks]]\nurl = "https://hooks.example/T0K3N"\ncolour = 1\n',
                 r"alerts.webhooks.0.colour: Extra inputs are not permitted$", id="webhook-extra"),
])
def test_bad_alert_settings_are_one_line_and_never_show_a_url(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message) as info:
        load_settings({}, toml_file(tmp_path, text))
    assert "\n" not in str(info.value) and "T0K3N" not in str(info.value)


def test_a_bad_config_file_exits_2_with_one_line(tmp_path: Path) -> None:
    config = toml_file(tmp_path, '[alerts]\nmin_severity = "loud"\n')
    result = CliRunner().invoke(serve, ["--home", str(tmp_path), "--port", "0", "--config", str(config)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "Error: invalid configuration: alerts.min_severity: Input should be 'error', 'warning' or 'info' "
        "(got 'loud')"]
