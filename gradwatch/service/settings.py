"""Configuration of `gradwatch serve`: one typed pydantic-settings model.

Sources, highest priority first: command-line flags (passed as keyword arguments), the
environment (prefix ``GRADWATCH_``, nested delimiter ``__``, e.g. ``GRADWATCH_PORT``,
``GRADWATCH_TLS__CERT``, ``GRADWATCH_PUSHGATEWAY__URL``), a TOML file (``--config``), defaults.
The basic auth password is also read from ``GRADWATCH_BASIC_AUTH_PASSWORD`` or from a file,
never from a flag, and is held as a `SecretStr` so it never reaches a log line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from gradwatch.agent.runlog import default_home
from gradwatch.alerts.config import AlertsConfig
from gradwatch.redact import redact

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

PASSWORD_ENV = "GRADWATCH_BASIC_AUTH_PASSWORD"
LogFormat = Literal["json", "text"]


class SettingsError(Exception):
    """The configuration cannot be loaded; the message is one line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TLSConfig(_Section):
    """Serve /metrics over HTTPS with this certificate chain and private key (PEM)."""

    cert: Path | None = None
    key: Path | None = None

    @model_validator(mode="after")
    def _both_or_neither(self) -> TLSConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        return self


class BasicAuthConfig(_Section):
    """HTTP basic auth on /metrics: a user and a password (value or file, never a flag)."""

    user: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None

    @model_validator(mode="after")
    def _password_for_user(self) -> BasicAuthConfig:
        if self.user is None:
            return self
        if not self.user or ":" in self.user:
            raise ValueError(f"basic auth user must be non-empty and without ':', got {self.user!r}")
        if self.password is None and self.password_file is None:
            raise ValueError(f"basic auth user {self.user!r} needs a password: set {PASSWORD_ENV} "
                             "or --basic-auth-password-file")
        return self

    def resolve_password(self) -> str:
        """The password: the file's first line when a file is given, else the value."""
        if self.password_file is not None:
            try:
                text = self.password_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise SettingsError(f"cannot read basic auth password file {self.password_file}: "
                                    f"{exc.strerror}") from None
            password = text.splitlines()[0] if text else ""
        else:
            password = self.password.get_secret_value() if self.password is not None else ""
        if not password:
            raise SettingsError("basic auth password is empty")
        return password


class PushConfig(_Section):
    """Push the metrics to a Prometheus Pushgateway every `interval` seconds (when `url` is set)."""

    url: str | None = None
    interval: float = Field(default=15.0, gt=0)
    job: str = Field(default="gradwatch", min_length=1)

    @model_validator(mode="after")
    def _http_url(self) -> PushConfig:
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"pushgateway URL must start with http:// or https://, got {self.url!r}")
        return self


class ServiceSettings(BaseSettings):
    """Everything `gradwatch serve` needs; see docs/service.md for each field."""

    model_config = SettingsConfigDict(env_prefix="GRADWATCH_", env_nested_delimiter="__",
                                      extra="forbid", case_sensitive=False)

    host: str = "127.0.0.1"
    port: int = Field(default=9464, ge=0, le=65535)
    db: str | None = None
    home: Path = Field(default_factory=default_home)
    poll_interval: float = Field(default=0.5, gt=0, le=60)
    grace: float = Field(default=300.0, ge=0)
    # label tiers of layer and param series (docs/metrics.md#label-tiers; gradwatch.service.tiers)
    per_param: bool = False
    per_layer: bool = False
    per_rank: bool = False
    block_levels: int | None = None  # None is "auto" (how files and the environment say it)
    log_format: LogFormat = "text"
    tls: TLSConfig = Field(default_factory=TLSConfig)
    basic_auth: BasicAuthConfig = Field(default_factory=BasicAuthConfig)
    pushgateway: PushConfig = Field(default_factory=PushConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)

    @field_validator("block_levels", mode="before")
    @classmethod
    def _auto_or_levels(cls, value: Any) -> int | None:
        """`"auto"` (None: `tiers.block_of` groups layers) or a whole number of name levels >= 1."""
        if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
            return None
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit() \
                or int(value) < 1:
            raise ValueError('must be "auto" or a whole number of name levels >= 1')
        return int(value)


class _PasswordEnvSource(PydanticBaseSettingsSource):
    """Reads the documented flat ``GRADWATCH_BASIC_AUTH_PASSWORD`` variable."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        value = os.environ.get(PASSWORD_ENV)
        return {"basic_auth": {"password": value}} if value else {}


def read_toml(path: Path) -> dict[str, Any]:
    """The parsed TOML config file, or a one-line `SettingsError`."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None


def load_settings(flags: dict[str, Any] | None = None, config_file: Path | None = None) -> ServiceSettings:
    """Merge flags > environment > TOML file > defaults into one validated `ServiceSettings`.

    `flags` holds only the options given on the command line (nested sections as dicts);
    a `None` value means "not given". Webhooks given as flags are added to the file's. Raises
    `SettingsError` with a one-line message.
    """
    file_data = read_toml(config_file) if config_file is not None else {}
    given = _drop_none(flags or {})
    extra = given.get("alerts", {}).get("webhooks")
    configured = file_data.get("alerts", {}).get("webhooks") if isinstance(file_data.get("alerts"), dict) else None
    if extra and isinstance(configured, list):
        given["alerts"]["webhooks"] = configured + extra

    class _Sourced(ServiceSettings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, _PasswordEnvSource(settings_cls),
                    InitSettingsSource(settings_cls, file_data))

    try:
        return _Sourced(**given)
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc)) from None
    except ValueError as exc:  # malformed nested environment values (e.g. JSON)
        raise SettingsError(redact(f"invalid configuration: {exc}".splitlines()[0])) from None


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            value = _drop_none(value)
            if value:
                out[key] = value
        elif value is not None:
            out[key] = value
    return out


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each bad setting and value (secrets are not echoed, credentials in any URL
    masked)."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        secret = "password" in loc or loc.startswith("basic_auth") or loc.startswith("alerts.webhooks") \
            or loc.endswith("url")
        shown = "" if secret or isinstance(value, (dict, list)) or not loc else f" (got {value!r})"
        parts.append(f"{loc}: {msg}{shown}" if loc else msg)
    return redact("invalid configuration: " + "; ".join(parts))
