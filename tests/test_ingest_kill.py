"""Exactly once under SIGKILL: a real ingesting process is killed in the middle of a large
ingest, started again, and the store ends with every record once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from tests.fixtures.pg import pg_database_url
from tests.fixtures.runlogs import SyntheticRun
from gradwatch.agent.runlog import Event
from gradwatch.store import Store
from gradwatch.store import schema

DEADLINE_S = 300.0
STEPS = 30_000
INGEST = """
import sys
from pathlib import Path
from gradwatch.ingest import Ingester
from gradwatch.store import Store
store = Store.open(sys.argv[1])
Ingester(store, Path(sys.argv[2]), max_batch_bytes=200_000).poll_once()
"""


def _committed_offset(url: str) -> int:
    with Store.open(url) as st:
        logs = st.logs()
    return logs[0].offset if logs else 0


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sigkill_mid_ingest_then_restart_stores_everything_once(tmp_path: Path, backend: str) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}" if backend == "sqlite" else pg_database_url()
    run = SyntheticRun(run_id="big")
    events = [Event("nonfinite", s, float(s), {"params": []}) for s in range(0, STEPS, 1000)]
    path = run.write(tmp_path, STEPS, events=events)
    size = path.stat().st_size
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", INGEST, url, str(tmp_path)], env=env)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while _committed_offset(url) == 0:
            assert proc.poll() is None, "the ingester ended before it could be killed"
            assert time.monotonic() < deadline, "no batch committed in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert 0 < _committed_offset(url) < size, "the kill did not land mid-ingest"
    subprocess.run([sys.executable, "-c", INGEST, url, str(tmp_path)], env=env, check=True)
    with Store.open(url) as st:
        assert st.logs()[0].offset == size and st.run("big").status == "finished"
        assert len(st.events("big")) == len(events)
        with st.engine.connect() as conn:
            stored = conn.execute(select(func.sum(schema.chunks.c.n))).scalar()
            counted = conn.execute(select(func.sum(schema.series.c.n))).scalar()
        expected = sum(int(np.count_nonzero(~np.isnan(run.value(m.name, np.arange(STEPS), e))))
                       for m in run.metrics.values() for e in ((0,) if m.scope == "run" else m.indices))
        assert stored == counted == expected
        steps, values = st.param_history("big", "net.2.weight", "grad_norm")
        np.testing.assert_array_equal(steps, np.arange(STEPS))
        np.testing.assert_array_equal(values, run.value("grad_norm", steps, 2))
        steps, _ = st.layer_history("big", "net.1", "dead_ratio")
        np.testing.assert_array_equal(steps, np.arange(0, STEPS, 10))
