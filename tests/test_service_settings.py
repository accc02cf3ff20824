"""Service configuration: flags > environment > TOML file > defaults, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradwatch.service.settings import PASSWORD_ENV, SettingsError, load_settings
from tests.fixtures.settings import clean_env, toml_file  # noqa: F401 - clean_env is an autouse fixture


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    s = load_settings()
    assert (s.host, s.port, s.db, s.log_format, s.per_param) == ("127.0.0.1", 9464, None, "text", False)
    assert s.home == tmp_path / ".gradwatch"
    assert s.poll_interval <= 1.0
    assert s.tls.cert is None and s.basic_auth.user is None and s.pushgateway.url is None
    assert (s.per_layer, s.per_rank, s.block_levels) == (False, False, None)  # blocks, reduced across ranks


@pytest.mark.parametrize(("text", "env", "expected"), [
    pytest.param("per_layer = true\nper_rank = true\n", {}, (True, True, None), id="file"),
    pytest.param('block_levels = "auto"\n', {"GRADWATCH_BLOCK_LEVELS": "3"}, (False, False, 3), id="env-over-file"),
    pytest.param("block_levels = 2\n", {"GRADWATCH_PER_RANK": "1"}, (False, True, 2), id="file-and-env"),
    pytest.param("", {"GRADWATCH_BLOCK_LEVELS": "AUTO"}, (False, False, None), id="auto-any-case"),
])
def test_label_tiers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, env: dict[str, str],
                     expected: tuple[bool, bool, int | None]) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = load_settings({}, toml_file(tmp_path, text))
    assert (s.per_layer, s.per_rank, s.block_levels) == expected


def test_precedence_flags_over_env_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = toml_file(tmp_path, 'port = 1111\nhost = "0.0.0.0"\ngrace = 5\n[pushgateway]\nurl = "http://gw:9091"\n'
                             'interval = 7\n')
    monkeypatch.setenv("GRADWATCH_PORT", "2222")
    monkeypatch.setenv("GRADWATCH_GRACE", "6")
    monkeypatch.setenv("GRADWATCH_PUSHGATEWAY__INTERVAL", "8")
    s = load_settings({"port": 3333, "host": None}, config)
    assert s.port == 3333  # flag
    assert s.grace == 6  # env over file
    assert s.host == "0.0.0.0"  # file (the flag was not given)
    assert s.pushgateway.url == "http://gw:9091" and s.pushgateway.interval == 8  # nested: file + env


def test_home_from_gradwatch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADWATCH_HOME", str(tmp_path / "h"))
    assert load_settings().home == tmp_path / "h"


def test_password_from_env_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "s3cret-pw")
    s = load_settings({"basic_auth": {"user": "prom"}})
    assert s.basic_auth.resolve_password() == "s3cret-pw"
    assert "s3cret-pw" not in repr(s) and "s3cret-pw" not in str(s.model_dump())


def test_password_from_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    s = load_settings({"basic_auth": {"user": "prom", "password_file": secret}})
    assert s.basic_auth.resolve_password() == "from-file"


@pytest.mark.parametrize(("flags", "env", "message"), [
    pytest.param({"port": 70000}, {}, r"^invalid configuration: port: .*65535 \(got 70000\)$", id="port-range"),
    pytest.param({}, {"GRADWATCH_LOG_FORMAT": "xml"}, r"log_format: .*'json' or 'text' \(got 'xml'\)", id="log-format"),
    pytest.param({"tls": {"cert": "c.pem"}}, {}, r"TLS needs both a certificate and a key", id="tls-half"),
    pytest.param({"basic_auth": {"user": "prom"}}, {}, rf"needs a password: set {PASSWORD_ENV}", id="no-password"),
    pytest.param({"pushgateway": {"url": "gw:9091"}}, {}, r"must start with http:// or https://", id="push-url"),
    pytest.param({"poll_interval": 0}, {}, r"poll_interval: .*greater than 0", id="poll-interval"),
    pytest.param({}, {"GRADWATCH_BLOCK_LEVELS": "0"},
                 r"^invalid configuration: block_levels: must be \"auto\" or a whole number of name levels >= 1 "
                 r"\(got '0'\)$", id="block-levels-zero"),
    pytest.param({"block_levels": "two"}, {}, r"block_levels: must be \"auto\" .*\(got 'two'\)$",
                 id="block-levels-word"),
    pytest.param({"block_levels": True}, {}, r"block_levels: must be \"auto\" .*\(got True\)$", id="block-levels-bool"),
    pytest.param({}, {"GRADWATCH_PER_RANK": "often"}, r"per_rank: .*valid boolean.*\(got 'often'\)$", id="per-rank"),
])
def test_invalid_settings_one_line(flags: dict, env: dict[str, str], message: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError, match=message) as info:
        load_settings(flags)
    assert "\n" not in str(info.value)


def test_password_never_echoed_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADWATCH_BASIC_AUTH__PASSWORD", "hunter2")
    with pytest.raises(SettingsError) as info:
        load_settings({"basic_auth": {"user": "a:b"}})
    assert "hunter2" not in str(info.value) and "without ':'" in str(info.value)


@pytest.mark.parametrize(("text", "message"), [
    pytest.param("port = ", r"is not valid TOML", id="syntax"),
    pytest.param("colour = 'blue'\n", r"colour: Extra inputs are not permitted", id="unknown-key"),
])
def test_bad_config_file(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings({}, toml_file(tmp_path, text))


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"cannot read config file .*nope.toml: No such file"):
        load_settings({}, tmp_path / "nope.toml")


@pytest.mark.parametrize(("text", "env", "message"), [
    pytest.param("block_levels = 0\n", {}, "block_levels: must be", id="file"),
    pytest.param("", {"GRADWATCH_PER_LAYER": "sometimes"}, "per_layer: Input should be a valid boolean", id="env"),
])
def test_serve_refuses_bad_tiers_in_one_line_with_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str,
                                                          env: dict[str, str], message: str) -> None:
    from click.testing import CliRunner

    from gradwatch.service.cli import serve

    result = CliRunner().invoke(serve, ["--home", str(tmp_path), "--config", str(toml_file(tmp_path, text))], env=env)
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: invalid configuration: ") and message in line
