"""A home the agent cannot write (read-only, or not creatable) costs the records, never the
training: the errors are counted, training goes on, nothing raises. A missing home is
created. Read commands on a home without a store say so and create nothing."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import gradwatch
from gradwatch.ingest import Ingester
from gradwatch.store import Store
from tests.reliability.checks import LogContents
from tests.reliability.procs import run_cli
from tests.reliability.trainer import mlp

pytestmark = pytest.mark.reliability

STEPS = 30


def _train(home: Path) -> tuple[dict[str, Any], Path]:
    """Train STEPS steps under the agent into `home`; the writer's view (snapshot) before close, and the log path."""
    torch.manual_seed(0)
    model = mlp(3, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, run="home", config={"home": str(home), "measure": {"flush_every": 5}}) as w:
        for step in range(STEPS):
            loss = model(torch.randn(8, 16)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss.detach())
        w.snapshot()
        snap = w.snapshot()  # after the writer handled every frame before it
    return snap, w.path


def _assert_not_recorded(snap: dict[str, Any], caplog: pytest.LogCaptureFixture, errno_keys: set[str]) -> None:
    assert snap["steps"] == STEPS  # training went on, every step measured
    opened = {k for k in snap["errors"] if k.startswith("writer:open:")}
    assert opened and opened <= errno_keys
    assert snap["errors"]["writer:unwritten_frames"] >= STEPS // 5
    warnings = [r.getMessage() for r in caplog.records if "cannot open the run log" in r.getMessage()]
    assert len(warnings) == 1  # said once, not once per flush


@pytest.fixture
def readonly_home(tmp_path: Path) -> Iterator[Path]:
    """An empty home the agent cannot write: a read-only tmpfs as root (who ignores modes), else mode 0555."""
    home = tmp_path / "ro-home"
    home.mkdir()
    if os.geteuid() != 0:
        home.chmod(0o555)
        yield home
        home.chmod(0o755)
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(home)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield home
    finally:
        subprocess.run(["umount", "-l", str(home)], capture_output=True, check=False)


def test_a_read_only_home_counts_errors_and_training_goes_on(
        readonly_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "gradwatch.agent")
    snap, path = _train(readonly_home)
    _assert_not_recorded(snap, caplog, {"writer:open:13", "writer:open:30"})  # EACCES, EROFS
    assert not path.exists() and list(readonly_home.iterdir()) == []


def test_a_home_that_cannot_be_created_counts_errors_and_training_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "gradwatch.agent")
    (tmp_path / "a-file").write_text("not a folder")
    snap, path = _train(tmp_path / "a-file" / "home")
    _assert_not_recorded(snap, caplog, {"writer:open:20"})  # ENOTDIR
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_a_missing_home_is_created_and_the_run_recorded_whole(tmp_path: Path) -> None:
    home = tmp_path / "not" / "yet" / "home"
    snap, path = _train(home)
    assert not any(k.startswith("writer:") for k in snap["errors"])
    log = LogContents(path)
    assert log.corrupt == [] and log.steps() == list(range(STEPS))
    with Store.open(f"sqlite:///{tmp_path / 'store.db'}") as store:
        Ingester(store, home).poll_once()
        assert [r.status for r in store.list_runs()] == ["finished"]


def test_read_commands_on_a_missing_home_say_so_and_create_nothing(tmp_path: Path) -> None:
    home = tmp_path / "missing" / "home"
    done = run_cli("runs", "--home", str(home))
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("Error: ")
    assert not (tmp_path / "missing").exists()


def test_read_commands_on_a_read_only_home_without_a_store_say_so_in_one_line(readonly_home: Path) -> None:
    done = run_cli("runs", "--home", str(readonly_home))
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("Error: ")
