"""`gradwatch serve`: help, one-line errors, single instance, clean shutdown on signals."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gradwatch.service.cli import serve
from gradwatch.service.lock import ServiceLock, lock_path_for
from gradwatch.store import Store, default_url
from tests.fixtures.runlogs import SyntheticRun
from tests.fixtures.service import serve_command, serve_factory  # noqa: F401 - fixture


def _invoke(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(serve, args, env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_has_every_option_and_an_example(flag: str) -> None:
    code, out = _invoke([flag])
    assert code == 0
    assert "Example:" in out and "gradwatch serve --port 9464" in out
    for option in ("--host", "--port", "--db", "--home", "--config", "--pushgateway", "--push-interval",
                   "--grace", "--tls-cert", "--tls-key", "--basic-auth-user", "--poll-interval",
                   "--log-format", "GRADWATCH_BASIC_AUTH_PASSWORD"):
        assert option in out, option


def _error_line(out: str) -> str:
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    return lines[0]


def test_bad_setting_from_env(tmp_path: Path) -> None:
    code, out = _invoke(["--home", str(tmp_path)], env={"GRADWATCH_PORT": "many"})
    assert code == 2
    assert _error_line(out).startswith("Error: invalid configuration: port: ")


def test_port_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out = _invoke(["--home", str(tmp_path), "--port", str(port)])
    assert code == 1
    assert _error_line(out) == (f"Error: cannot listen on 127.0.0.1:{port}: address already in use "
                                "(another process holds the port; choose another with --port)")
    with ServiceLock(lock_path_for(default_url(tmp_path), tmp_path)):
        pass  # the failed start released its lock


def test_store_that_cannot_be_opened(tmp_path: Path) -> None:
    not_a_db = tmp_path / "notes.txt"
    not_a_db.write_text("hello, I am not a database\n" * 100)
    code, out = _invoke(["--home", str(tmp_path), "--port", "0", "--db", f"sqlite:///{not_a_db}"])
    assert code == 1
    assert _error_line(out).startswith("Error: sqlite:///") and "is not a gradwatch store" in out


def test_missing_tls_file(tmp_path: Path) -> None:
    code, out = _invoke(["--home", str(tmp_path), "--port", "0", "--tls-cert", str(tmp_path / "c.pem"),
                         "--tls-key", str(tmp_path / "k.pem")])
    assert code == 1
    assert _error_line(out) == f"Error: cannot load TLS certificate: {tmp_path / 'c.pem'}: no such file"


def test_second_serve_on_the_same_store_is_refused(tmp_path: Path, serve_factory) -> None:  # noqa: F811
    first = serve_factory(["--home", str(tmp_path), "--port", "0"])
    first.started()
    code, out = _invoke(["--home", str(tmp_path), "--port", "0"])
    assert code == 1
    assert _error_line(out).startswith(f"Error: another gradwatch serve (pid {first.pid}) already serves this store")
    assert first.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly_with_everything_ingested(tmp_path: Path, serve_factory, sig: int) -> None:  # noqa: F811
    # A long poll interval: the first pass runs at start (nothing there yet); the rest of the
    # data can only get into the store through the final pass of the shutdown.
    proc = serve_factory(["--home", str(tmp_path), "--port", "0", "--poll-interval", "60", "--no-alerts"])
    started = proc.started()
    run = SyntheticRun(run_id="shutdown1")
    run.write(tmp_path, steps=250, close=False)
    urllib.request.urlopen(started["url"], timeout=10).read()
    assert proc.stop(sig) == 0
    events = [e["event"] for e in proc.events()]
    assert events == ["started", "signal", "ingested", "stopped"]
    assert proc.events()[1]["signal"] == signal.Signals(sig).name
    with Store.open(home=tmp_path) as store:
        series = store.run_series("shutdown1", "grad_norm_total")
        np.testing.assert_array_equal(series.steps, np.arange(250))
        expected = run.value("grad_norm_total", np.arange(250), 0)
        np.testing.assert_allclose(series.values, expected, rtol=1e-6)
    with ServiceLock(lock_path_for(default_url(tmp_path), tmp_path)):
        pass


def test_port_taken_through_the_real_command(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([*serve_command(), "--home", str(tmp_path), "--port", str(port)],
                              capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"Error: cannot listen on 127.0.0.1:{port}: address already in use "
                                        "(another process holds the port; choose another with --port)"]


@pytest.mark.parametrize(("extra", "expected", "exit_code"), [
    pytest.param(["--basic-auth-user", "prom", "--basic-auth-password-file", "{tmp}/missing"],
                 r"^Error: cannot read basic auth password file .*/missing: No such file or directory$", 1,
                 id="pw-file"),
    pytest.param(["--db", "not a url"], r"^Error: not a database URL: 'not a url'$", 1, id="db-url"),
    pytest.param(["--config", "{tmp}/missing.toml"], r"^Error: cannot read config file .*missing.toml", 2, id="config"),
    pytest.param(["--pushgateway", "gw:9091"], r"^Error: invalid configuration: pushgateway: .*http://", 2, id="push"),
    pytest.param(["--webhook", "hooks.example/T0K3N"],
                 r"^Error: invalid configuration: alerts.webhooks.0.url: webhook URL must be an http:// "
                 r"or https:// URL with a host$", 2, id="webhook"),
    pytest.param(["--alertmanager", "ftp://am:9093"], r"^Error: invalid configuration: alerts.alertmanager.url: ", 2,
                 id="alertmanager"),
])
def test_bad_input_is_one_line(tmp_path: Path, extra: list[str], expected: str, exit_code: int) -> None:
    code, out = _invoke(["--home", str(tmp_path), "--port", "0", *[a.format(tmp=tmp_path) for a in extra]])
    assert code == exit_code
    assert re.match(expected, _error_line(out)), out


def test_home_that_is_a_file(tmp_path: Path) -> None:
    home = tmp_path / "file"
    home.write_text("")
    code, out = _invoke(["--port", "0"], env={"GRADWATCH_HOME": str(home)})
    assert code == 1
    assert _error_line(out).startswith("Error: cannot create lock file ")
