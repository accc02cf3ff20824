"""The service and the trainers around it: a run recorded while no service runs is ingested
whole when one starts; 16 trainers writing into one home at once lose nothing; a second
service on the same store is refused, takes over when the first is killed, and the CLI may
ingest the same home at the same time; every value is stored exactly once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gradwatch.store import Store
from tests.fixtures.prometheus import wait_until
from tests.fixtures.runlogs import SyntheticRun
from tests.fixtures.service import serve_factory  # noqa: F401 - a fixture
from tests.reliability.checks import REPEAT, LogContents, compare, count, record_figure, stored_values
from tests.reliability.procs import REPO, TrainerProcess, child_env, run_cli

pytestmark = pytest.mark.reliability

FLEET = 16
FLEET_STEPS = 100 * REPEAT


def _serve_args(home: Path, db: str) -> list[str]:
    return ["--home", str(home), "--db", db, "--port", "0", "--poll-interval", "0.1", "--no-alerts"]


def _all_finished(db: str, run_ids: set[str]) -> bool | None:
    with Store.open(db) as st:
        done = {r.id for r in st.list_runs() if r.status == "finished"}
    return True if run_ids <= done else None


def _stored_as_logged(db: str, paths: dict[str, Path]) -> tuple[int, int, int]:
    """(values logged, lost, stored wrongly or twice) over the runs of `paths`, by run id."""
    values = lost = wrong = 0
    with Store.open(db) as st:
        assert st.ingest_errors() == []
        for run_id, path in paths.items():
            log = LogContents(path)
            assert log.corrupt == []
            missing, extra = compare(log.values, stored_values(st, run_id))
            values, lost, wrong = values + count(log.values), lost + missing, wrong + extra
    return values, lost, wrong


def test_a_run_recorded_while_no_service_runs_is_ingested_whole_when_it_starts(
        tmp_path: Path, gradwatch_home: Path, serve_factory) -> None:  # noqa: F811 - the fixture
    trainer = TrainerProcess({"run": "offline", "config": {"home": str(gradwatch_home)}}, tmp_path / "t.err")
    started = trainer.send("watch")
    trainer.send("train 150")
    trainer.send("close")
    assert trainer.wait() == 0
    db = f"sqlite:///{tmp_path / 'store.db'}"
    service = serve_factory(_serve_args(gradwatch_home, db))
    service.started()
    wait_until(lambda: _all_finished(db, {started["run_id"]}), "the run to be ingested")
    assert service.stop() == 0
    values, lost, wrong = _stored_as_logged(db, {started["run_id"]: Path(started["path"])})
    assert LogContents(Path(started["path"])).steps() == list(range(150))
    assert (lost, wrong) == (0, 0) and values > 0
    record_figure("service_down_for_a_run", values=values, lost=lost, duplicated=wrong)


def test_sixteen_trainers_into_one_home_at_once_lose_nothing(
        tmp_path: Path, gradwatch_home: Path, serve_factory) -> None:  # noqa: F811 - the fixture
    db = f"sqlite:///{tmp_path / 'store.db'}"
    service = serve_factory(_serve_args(gradwatch_home, db))
    service.started()
    spec = {"config": {"home": str(gradwatch_home), "measure": {"flush_every": 10}}}
    done = subprocess.run([sys.executable, "-m", "tests.reliability.trainer", "fleet", str(FLEET), str(FLEET_STEPS),
                           json.dumps(spec)], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          check=False, timeout=600)
    assert done.returncode == 0, done.stderr
    members = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(members) == FLEET and all(m["exit"] == 0 for m in members)
    run_ids = {m["run_id"] for m in members}
    wait_until(lambda: _all_finished(db, run_ids), "every run to be ingested")
    assert service.stop() == 0
    logs = gradwatch_home / "logs"
    paths = {m["run_id"]: logs / f"{m['run_id']}.rank0.gwlog" for m in members}
    assert all(LogContents(p).steps() == list(range(FLEET_STEPS)) for p in paths.values())
    values, lost, wrong = _stored_as_logged(db, paths)
    assert (lost, wrong) == (0, 0)
    record_figure("concurrent_trainers", trainers=FLEET, values=values, lost=lost, duplicated=wrong)


def test_a_second_service_on_the_same_store_is_refused_and_takes_over_when_the_first_is_killed(
        tmp_path: Path, gradwatch_home: Path, serve_factory) -> None:  # noqa: F811 - the fixture
    db = f"sqlite:///{tmp_path / 'store.db'}"
    runs = [SyntheticRun(run_id=f"two{i}") for i in range(4)]
    paths = {r.run_id: r.write(gradwatch_home, 2000) for r in runs[:2]}
    first = serve_factory(_serve_args(gradwatch_home, db))
    first.started()
    second = serve_factory(_serve_args(gradwatch_home, db))
    assert second.process.wait(120) == 1
    (line,) = second.lines()
    assert f"another gradwatch serve (pid {first.pid})" in line and "Traceback" not in line
    wait_until(lambda: _all_finished(db, set(paths)), "the first service to ingest")
    first.stop(signal.SIGKILL)
    paths.update({r.run_id: r.write(gradwatch_home, 2000) for r in runs[2:]})  # written while no service runs
    third = serve_factory(_serve_args(gradwatch_home, db))
    third.started()
    assert run_cli("runs", "--home", str(gradwatch_home), "--db", db).returncode == 0  # the CLI ingests too
    wait_until(lambda: _all_finished(db, set(paths)), "the new service to ingest")
    assert third.stop() == 0
    values, lost, wrong = _stored_as_logged(db, paths)
    assert (lost, wrong) == (0, 0)
    record_figure("two_services", values=values, lost=lost, duplicated=wrong)
