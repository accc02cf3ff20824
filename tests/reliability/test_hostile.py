"""Hostile input at the edges: run names and projects of any length and content, recorded by a
real agent, stored exactly on both backends and printed escaped by the CLI; and credentials
given in a store or Pushgateway URL, searched for in every line the CLI and `gradwatch serve`
print (errors, log lines, debug tracebacks): none may appear."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy.engine import make_url

import gradwatch
from gradwatch.store import Store
from tests.fixtures.pg import pg_database_url
from tests.fixtures.service import serve_factory  # noqa: F401 - a fixture
from tests.reliability.procs import run_cli
from tests.reliability.trainer import mlp

pytestmark = pytest.mark.reliability

NAME = ("run\x00with NUL\nand a newline\r\t" + "é€😀" * 20 + "x" * 300)[:300]
PROJECT = ("proj\n" + "p" * 10_000)[:10_000]
SECRETS = ("DbSecret12", "TokSecret34", "PushSecret3", "PushTok56")


def _url(backend: str, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}" if backend == "sqlite" else pg_database_url()


def _train_hostile(home: Path) -> str:
    torch.manual_seed(0)
    model = mlp(2, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, run=NAME, config={"home": str(home), "project": PROJECT}) as w:
        for _ in range(10):
            loss = model(torch.randn(4, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss.detach())
    return w.run_id


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_hostile_name_and_project_are_stored_exactly_and_listed_as_data(
        backend: str, tmp_path: Path, gradwatch_home: Path) -> None:
    run_id = _train_hostile(gradwatch_home)
    url = _url(backend, tmp_path)
    Store.open(url).close()  # an empty store (read commands never create one); the CLI ingests the log into it
    listed = run_cli("runs", "--home", str(gradwatch_home), "--db", url, "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert (row["id"], row["name"], row["project"], row["status"]) == (run_id, NAME, PROJECT, "finished")
    with Store.open(url) as store:
        run = store.run(run_id)
        assert (run.name, run.project) == (NAME, PROJECT)
    _assert_printed_as_data(gradwatch_home, url, run_id)


def _assert_printed_as_data(home: Path, url: str, run_id: str) -> None:
    table = run_cli("runs", "--home", str(home), "--db", url)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert len(lines) == 2 and run_id in lines[1]  # the header and one row: no newline of the name splits it
    shown = run_cli("show", run_id, "--home", str(home), "--db", url)
    assert shown.returncode == 0, shown.stderr
    for out in (table.stdout, shown.stdout):
        assert not any(c in out for c in "\x00\r\t"), "a control character of the name was printed raw"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _assert_no_secret(text: str) -> None:
    found = [s for s in SECRETS if s in text]
    assert not found, f"{found} printed in:\n{text}"


MALFORMED = "postgresql//u:DbSecret12@db.example/gw"
REFUSED = "postgresql+psycopg://u:DbSecret12@127.0.0.1:{port}/gw?token=TokSecret34"
CLI_CASES = [
    pytest.param(["--db", MALFORMED], {}, id="malformed-url"),
    pytest.param([], {"GRADWATCH_DB": MALFORMED}, id="malformed-url-from-env"),
    pytest.param(["--db", REFUSED], {}, id="refused"),
    pytest.param(["--db", REFUSED], {"GRADWATCH_DEBUG": "1"}, id="refused-debug-traceback"),
    pytest.param(["--db", "postgresql+psycopg://u:DbSecret12@[::1:5432/gw"], {}, id="malformed-ipv6"),
    pytest.param(["--db", "postgresql+psycopg://u@127.0.0.1:{port}/gw?password=DbSecret12"], {},
                 id="password-in-query"),
]


@pytest.mark.parametrize(("args", "env"), CLI_CASES)
def test_a_store_url_secret_never_appears_in_cli_output(args: list[str], env: dict[str, str],
                                                        tmp_path: Path) -> None:
    port = str(_closed_port())
    args = [a.replace("{port}", port) for a in args]
    env = {k: v.replace("{port}", port) for k, v in env.items()}
    for command in (["runs"], ["show", "x"], ["diagnose", "x"]):
        done = run_cli(*command, "--home", str(tmp_path / "home"), *args, env=env)
        assert done.returncode != 0
        _assert_no_secret(done.stdout + done.stderr)


SERVE_CASES = [
    pytest.param(["--db", REFUSED], {}, "exits", id="store-refused"),
    pytest.param(["--db", REFUSED], {"GRADWATCH_DEBUG": "1"}, "exits", id="store-refused-debug"),
    pytest.param(["--pushgateway", "ftp://admin:PushSecret3@gw:9091"], {}, "exits", id="bad-pushgateway"),
    pytest.param(["--pushgateway", "http://admin:PushSecret3@127.0.0.1:{port}/?token=PushTok56",
                  "--push-interval", "0.2"], {}, "runs", id="pushgateway-unreachable"),
    pytest.param(["--pushgateway", "http://admin:PushSecret3@127.0.0.1:{port}/?token=PushTok56",
                  "--push-interval", "0.2"], {"GRADWATCH_DEBUG": "1"}, "runs", id="pushgateway-unreachable-debug"),
    pytest.param(["--db", "{pg}"], {"GRADWATCH_DEBUG": "1"}, "runs", id="store-password-accepted"),
]


@pytest.mark.parametrize(("args", "env", "fate"), SERVE_CASES)
def test_a_secret_never_appears_in_what_serve_prints(args: list[str], env: dict[str, str], fate: str,
                                                     tmp_path: Path, serve_factory: Any) -> None:  # noqa: F811
    port = str(_closed_port())
    if "{pg}" in args:  # a real server that accepts the password (trust) and a token-like option
        url = make_url(pg_database_url()).set(password="DbSecret12", query={"sslpassword": "TokSecret34"})
        args = [a.replace("{pg}", url.render_as_string(hide_password=False)) for a in args]
    args = [a.replace("{port}", port) for a in args]
    base = ["--home", str(tmp_path / "home"), "--port", "0"] + ([] if "--db" in args else
                                                                ["--db", f"sqlite:///{tmp_path / 's.db'}"])
    service = serve_factory([*base, *args], env=env)
    if fate == "exits":
        assert service.process.wait(120) != 0
    else:
        service.started()
        if "--pushgateway" in args:
            service.wait_event("push_failed")
        assert service.stop() == 0
    _assert_no_secret(service.log_path.read_text())
