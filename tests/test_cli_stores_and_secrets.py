"""Read commands never create a store; no credential reaches the terminal; hostile run names
are printed escaped. The CLI runs for real: in-process (CliRunner) and as a subprocess for
the GRADWATCH_DEBUG traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import gradwatch
from tests.fixtures.cli_runs import fails, invoke, ok, run_cli

SECRET = "DbSecret12"


def test_a_read_command_on_a_missing_home_creates_nothing(tmp_path: Path):
    home = tmp_path / "nonexistent" / "x" / "y"
    line = fails(1, "runs", "--home", str(home))
    assert "no gradwatch store" in line and "gradwatch demo" in line
    assert not (tmp_path / "nonexistent").exists()


def test_a_read_command_on_a_mistyped_sqlite_url_creates_nothing(tmp_path: Path):
    home = tmp_path / "home"
    _train(home, "real-run")  # logs in the home: they must not be copied into the mistyped store
    url = f"sqlite:///{tmp_path}/typo/dir/x.db"
    line = fails(1, "runs", "--db", url, "--home", str(home))
    assert "no gradwatch store" in line
    assert not (tmp_path / "typo").exists()


def test_the_first_read_after_training_creates_the_default_store(tmp_path: Path):
    home = tmp_path / "home"
    _train(home, "first-run")
    assert "first-run" in ok("runs", "--home", str(home))
    assert (home / "gradwatch.db").exists()


@pytest.mark.parametrize("url", [
    f"postgresql//u:{SECRET}@db.example/gw",
    f"postgresql://u:{SECRET}@[::1:5432/gw",
    f"postgresql+psycopg://u:{SECRET}@127.0.0.1:1/gw?connect_timeout=1",
    f"postgresql+psycopg://u@127.0.0.1:1/gw?password={SECRET}&connect_timeout=1",
], ids=["no-colon", "bad-ipv6", "unreachable-userinfo", "unreachable-query"])
def test_no_store_error_shows_a_password(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for args in (["runs", "--db", url], ["runs"]):
        if args == ["runs"]:
            monkeypatch.setenv("GRADWATCH_DB", url)
        result = invoke(*args, "--home", str(tmp_path))
        assert result.exit_code in (1, 2) and SECRET not in result.output, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("Error: ")
        monkeypatch.delenv("GRADWATCH_DB", raising=False)


def test_a_malformed_postgresql_url_is_bad_input():
    line = fails(2, "runs", "--db", "postgresql://u:pw@[::1:5432/gw")
    assert "unexpected" not in line and "pw" not in line.split("@")[0].split(":")[-1]


def test_the_debug_traceback_masks_credentials(tmp_path: Path):
    url = f"postgresql+psycopg://u:{SECRET}@127.0.0.1:1/gw?connect_timeout=1"
    result = run_cli("runs", "--db", url, "--home", str(tmp_path), env={"GRADWATCH_DEBUG": "1"})
    assert result.returncode != 0 and SECRET not in result.stdout + result.stderr


@pytest.mark.parametrize("command", [["runs"], ["show", "{id}"], ["layers", "{id}"], ["history", "{id}", "-m", "loss"],
                                     ["compare", "{id}", "{id}"], ["diagnose", "{id}"], ["show", "evil"]],
                         ids=["runs", "show", "layers", "history", "compare", "diagnose", "unknown-run"])
def test_hostile_run_names_are_printed_escaped(tmp_path: Path, command: list[str]):
    home = tmp_path / "home"
    _train(home, "evil\nname\x1b[31m\udc80")
    run_id = ok("runs", "--home", str(home), "--json").split('"id": "')[1][:12]
    result = invoke(*[a.format(id=run_id) for a in command], "--home", str(home))
    text = result.stdout + result.stderr
    assert "evil\\nname\\x1b[31m\\udc80" in text and "\x1b" not in text and "name\n" not in text.replace("\\n", "")


def _train(home: Path, name: str) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, run=name, config={"home": str(home)}) as watcher:
        for _ in range(3):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            watcher.log(loss=loss)
