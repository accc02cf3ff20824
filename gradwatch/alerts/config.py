"""Configuration of the live rules engine and its notifiers: the `[alerts]` section of the service
config. Every default works without configuration; docs/alerts.md describes each field."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from gradwatch.alerts.rules import RULE_IDS, check_threshold

Severity = Literal["error", "warning", "info"]
SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "error": 2}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _http_url(url: str, what: str) -> str:
    """`url` when it is an http(s) URL with a host; the error never repeats it (it may hold a token)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be an http:// or https:// URL with a host")
    return url


class RuleConfig(_Section):
    """Per-rule settings; unset fields keep the rule's defaults."""

    enabled: bool = True
    severity: Severity | None = None  # replaces the severity the rule gives its findings
    for_steps: int | None = Field(default=None, ge=0, le=10_000_000)
    for_seconds: float | None = Field(default=None, ge=0, le=30 * 86400)


class Target(_Section):
    """How one receiver is reached: timeout per attempt, retries after a failure, first backoff."""

    timeout: float = Field(default=5.0, gt=0, le=120)
    retries: int = Field(default=3, ge=0, le=20)
    backoff: float = Field(default=1.0, gt=0, le=300)


class WebhookConfig(Target):
    """A URL that receives a JSON POST per alert that fires or resolves. The URL is a secret
    (chat webhooks carry their token in it): logs name the webhook by `name`, or by its host."""

    url: SecretStr
    name: str | None = Field(default=None, min_length=1, max_length=100)
    format: Literal["json", "slack"] = "json"

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: SecretStr) -> SecretStr:
        _http_url(url.get_secret_value(), "webhook URL")
        return url


class AlertmanagerConfig(Target):
    """An Alertmanager to post alerts to (`/api/v2/alerts`); firing alerts are re-sent every
    `resend_interval` seconds, as Prometheus does, or Alertmanager would resolve them itself."""

    url: SecretStr | None = None
    resend_interval: float = Field(default=60.0, ge=1, le=3600)

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: SecretStr | None) -> SecretStr | None:
        if url is not None:
            _http_url(url.get_secret_value(), "alertmanager URL")
        return url


class AlertsConfig(_Section):
    """The rules engine: which findings become alerts, over which window, and where they go."""

    enabled: bool = True
    window_steps: int = Field(default=500, ge=20, le=1_000_000)
    evaluate_every: float = Field(default=2.0, ge=0, le=3600)
    layers_every: float = Field(default=60.0, ge=0, le=86400)
    min_severity: Severity = "warning"
    stalled_after: float = Field(default=600.0, gt=0, le=7 * 86400)
    queue_size: int = Field(default=1000, ge=1, le=1_000_000)
    thresholds: dict[str, float] = Field(default_factory=dict)
    rules: dict[str, RuleConfig] = Field(default_factory=dict)
    webhooks: list[WebhookConfig] = Field(default_factory=list)
    alertmanager: AlertmanagerConfig = Field(default_factory=AlertmanagerConfig)

    @field_validator("thresholds", mode="before")
    @classmethod
    def _check_thresholds(cls, value: object) -> object:
        if not isinstance(value, dict):
            return value
        return dict(check_threshold(str(name), v) for name, v in value.items())

    @field_validator("rules")
    @classmethod
    def _check_rules(cls, rules: dict[str, RuleConfig]) -> dict[str, RuleConfig]:
        unknown = sorted(set(rules) - set(RULE_IDS))
        if unknown:
            raise ValueError(f"unknown rule {unknown[0]!r}; known: {', '.join(RULE_IDS)}")
        return rules

    @model_validator(mode="after")
    def _unique_names(self) -> AlertsConfig:
        names = [w.name for w in self.webhooks if w.name is not None]
        if len(names) != len(set(names)):
            raise ValueError("webhook names must be unique")
        return self

    def rule(self, rule_id: str) -> RuleConfig:
        """The settings of one rule (defaults when the config says nothing about it)."""
        return self.rules.get(rule_id) or RuleConfig()
