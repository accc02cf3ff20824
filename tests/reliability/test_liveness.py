"""A run that ends while an ingest pass is deciding whether its writer is gone: the records it
wrote after the pass listed it (its last frames and its close) are ingested, not taken for a
torn tail, and the run is `finished`, never `crashed` on the way."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradwatch.agent import runlog
from gradwatch.agent.runlog import Close
from gradwatch.ingest import Ingester
from gradwatch.store import Store
from tests.fixtures.runlogs import SyntheticRun

pytestmark = pytest.mark.reliability


def test_a_writer_that_closes_and_exits_between_listing_and_liveness_check_is_finished(tmp_path: Path) -> None:
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    run = SyntheticRun(run_id="racy", pid=writer.pid)
    path = run.write(tmp_path, 40, close=False)
    tail = run.frame(40, 20) + runlog.encode_close(Close(time.time(), 59, {"steps": 60}))
    staged: list[bool] = []

    def clock() -> float:
        if staged == [False]:  # the writer ends its run and exits after the pass listed the log as idle
            staged[0] = True
            with open(path, "ab") as f:
                f.write(tail)
            writer.kill()
            writer.wait()
        return time.time()

    with Store.open(f"sqlite:///{tmp_path / 'store.db'}") as store:
        ingester = Ingester(store, tmp_path, clock=clock)
        ingester.poll_once()
        assert store.run("racy").status == "running"
        staged.append(False)  # in the next pass, nothing is pending: its first clock reading is the liveness check
        report = ingester.poll_once()
        assert staged == [True]
        ingester.poll_once()
        assert report.crashed == [] and store.ingest_errors() == []
        assert store.run("racy").status == "finished"
        assert store.run_series("racy", "grad_norm_total").steps.tolist() == list(range(60))
