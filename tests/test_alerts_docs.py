"""docs/alerts.md against the code: every rule the engine knows has its row and paragraph, every
alert metric its row (as docs/metrics.md lists the others), every `[alerts]` setting its line."""

from __future__ import annotations

import re
from pathlib import Path

from gradwatch.alerts.config import AlertmanagerConfig, AlertsConfig, RuleConfig, WebhookConfig
from gradwatch.alerts.rules import RULE_IDS
from gradwatch.service.catalog import ALERT_METRICS

DOCS = Path(__file__).resolve().parents[1] / "docs"
ALERTS = (DOCS / "alerts.md").read_text()


def test_every_rule_has_its_row_and_paragraph() -> None:
    assert set(re.findall(r"^\| `([a-z_]+)` \| ", ALERTS, re.M)) >= set(RULE_IDS)
    for rule in RULE_IDS:
        assert f"\n**`{rule}`" in ALERTS, rule


def test_the_diagnosis_rules_are_the_ones_the_engine_configures() -> None:
    contract = (DOCS / "diagnosis.md").read_text().split("Finding ids are stable:")[1].split(".\n")[0]
    assert set(re.findall(r"`([a-z_]+)`", contract)) | {"stalled_run"} == set(RULE_IDS)


def test_every_alert_metric_is_documented_with_its_type_and_labels() -> None:
    for spec in ALERT_METRICS:
        row = next(line for line in ALERTS.splitlines() if line.startswith(f"| `{spec.name}` |"))
        assert f"| {spec.type} |" in row and all(f"`{label}`" in row for label in spec.labels), spec.name


def test_every_setting_is_in_the_example() -> None:
    example = ALERTS.split("```toml")[1].split("```")[0]
    for model in (AlertsConfig, RuleConfig, WebhookConfig, AlertmanagerConfig):
        for name in model.model_fields:
            assert re.search(rf"\b{name}\b", example), (model.__name__, name)
