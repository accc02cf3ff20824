"""Exactly once under SIGKILL, repeated: a real ingesting process (the ingester alone, with
small batches, and `gradwatch serve`) is killed again and again in the middle of a large
ingest, started again each time, and the store ends with every record once, on SQLite and
PostgreSQL. A reliability promise of docs/reliability.md."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from gradwatch.agent.runlog import Event
from gradwatch.store import Store
from gradwatch.store import schema
from tests.fixtures.pg import pg_database_url
from tests.fixtures.runlogs import SyntheticRun
from tests.fixtures.service import serve_factory  # noqa: F401 - a fixture
from tests.reliability.checks import REPEAT, LogContents, compare, count, record_figure, stored_values

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

DEADLINE_S = 300.0
#: Kills per test: 3 in CI, more for the figures (GRADWATCH_RELIABILITY_REPEAT), with as much more to ingest.
KILLS = 3 * REPEAT
STEPS = 10_000 * KILLS
LOGS = 4 * KILLS
INGEST = """
import sys
from pathlib import Path
from gradwatch.ingest import Ingester
from gradwatch.store import Store
store = Store.open(sys.argv[1])
Ingester(store, Path(sys.argv[2]), max_batch_bytes=200_000).poll_once()
"""


def _url(tmp_path: Path, backend: str) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}" if backend == "sqlite" else pg_database_url()


def _committed(url: str) -> int:
    """Bytes of every log committed so far."""
    with Store.open(url) as st:
        return sum(log.offset for log in st.logs())


def _kill_repeatedly(url: str, start: Callable[[], subprocess.Popen], total: int, kills: int, seed: str) -> int:
    """Start the ingesting process, SIGKILL it a random moment after its next commit, `kills`
    times (fewer when it finishes first); returns how many kills landed mid-ingest."""
    rng = random.Random(seed)
    landed = 0
    for _ in range(kills):
        before = _committed(url)
        proc = start()
        try:
            deadline = time.monotonic() + DEADLINE_S
            while _committed(url) == before:
                assert proc.poll() is None or _committed(url) > before, "the ingester ended without committing"
                assert time.monotonic() < deadline, "no batch committed in time"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.2))  # into the next transaction, or between two
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if _committed(url) >= total:
            break
        landed += 1
    return landed


def _ingester_env() -> dict[str, str]:
    root = Path(__file__).resolve().parents[1]
    return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_repeated_sigkill_mid_ingest_then_restart_stores_everything_once(tmp_path: Path, backend: str) -> None:
    url = _url(tmp_path, backend)
    run = SyntheticRun(run_id="big")
    events = [Event("nonfinite", s, float(s), {"params": []}) for s in range(0, STEPS, 1000)]
    path = run.write(tmp_path, STEPS, events=events)
    size = path.stat().st_size
    cmd = [sys.executable, "-c", INGEST, url, str(tmp_path)]
    landed = _kill_repeatedly(url, lambda: subprocess.Popen(cmd, env=_ingester_env()), size, KILLS, backend)
    assert landed == KILLS, "the ingest finished before every kill landed"
    subprocess.run(cmd, env=_ingester_env(), check=True)
    with Store.open(url) as st:
        assert st.logs()[0].offset == size and st.run("big").status == "finished"
        assert len(st.events("big")) == len(events)
        with st.engine.connect() as conn:
            stored = conn.execute(select(func.sum(schema.chunks.c.n))).scalar()
            counted = conn.execute(select(func.sum(schema.series.c.n))).scalar()
        expected = sum(int(np.count_nonzero(~np.isnan(run.value(m.name, np.arange(STEPS), e))))
                       for m in run.metrics.values() for e in ((0,) if m.scope == "run" else m.indices))
        assert stored == counted == expected
        lost, wrong = compare(LogContents(path).values, stored_values(st, "big"))
    assert (lost, wrong) == (0, 0)
    record_figure("ingester_sigkill", backend=backend, kills=landed, values=expected, lost=lost, duplicated=wrong)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_repeated_sigkill_of_the_service_mid_ingest_stores_everything_once(
        tmp_path: Path, backend: str, serve_factory) -> None:  # noqa: F811 - the fixture
    url = _url(tmp_path, backend)
    home = tmp_path / "home"
    runs = [SyntheticRun(run_id=f"run{i:03d}", name=f"r{i}") for i in range(LOGS)]
    events = [Event("nonfinite", s, float(s), {"params": []}) for s in range(0, 3000, 500)]
    paths = [r.write(home, 3000, events=events) for r in runs]
    total = sum(p.stat().st_size for p in paths)
    args = ["--home", str(home), "--db", url, "--port", "0", "--poll-interval", "0.05", "--no-alerts"]
    landed = _kill_repeatedly(url, lambda: serve_factory(args).process, total, KILLS, backend)
    assert landed == KILLS, "the ingest finished before every kill landed"
    last = serve_factory(args)
    last.started()
    deadline = time.monotonic() + DEADLINE_S
    while _committed(url) < total:
        assert time.monotonic() < deadline, "the service did not catch up"
        time.sleep(0.05)
    assert last.stop() == 0
    lost = duplicated = values = 0
    with Store.open(url) as st:
        assert {r.id: r.status for r in st.list_runs()} == {r.run_id: "finished" for r in runs}
        for run, path in zip(runs, paths):
            assert len(st.events(run.run_id)) == len(events)
            log = LogContents(path)
            missing, extra = compare(log.values, stored_values(st, run.run_id))
            lost, duplicated, values = lost + missing, duplicated + extra, values + count(log.values)
        assert st.ingest_errors() == []
    assert (lost, duplicated) == (0, 0)
    record_figure("service_sigkill", backend=backend, kills=landed, values=values, lost=lost, duplicated=duplicated)
