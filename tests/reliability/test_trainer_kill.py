"""A trainer killed with SIGKILL loses at most `max_flush_interval` (plus one step) of records,
at 100 steps/s and at 0.2 steps/s alike: what it had written is intact, and its run ingests
as `crashed` with every value its log holds."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest

from gradwatch.ingest import Ingester
from gradwatch.store import Store
from tests.reliability.checks import REPEAT, LogContents, compare, record_figure, stored_values
from tests.reliability.procs import TrainerProcess

pytestmark = pytest.mark.reliability

MAX_FLUSH_INTERVAL = 1.0
#: What the writer thread may lag behind the flush on a loaded 2-core CI machine.
SLACK_S = 0.5


def _kill_while_pacing(home: Path, tmp_path: Path, rate: float, measure: dict[str, Any],
                       after: float) -> tuple[float, list[tuple[int, float]], str, Path]:
    """Train at `rate` steps/s and SIGKILL the trainer `after` s past its first step; returns
    (kill time, [(step, time done)] printed before the kill, run id, log path)."""
    spec = {"run": f"kill-{rate}", "config": {"home": str(home), "measure": {
        **measure, "max_flush_interval": MAX_FLUSH_INTERVAL}}}
    trainer = TrainerProcess(spec, tmp_path / f"trainer-{rate}.err")
    started = trainer.send("watch")
    trainer.send(f"pace {rate} 1000000", wait=False)
    trainer.wait_lines(2)
    first = trainer.lines[1]["t"]
    time.sleep(max(0.0, first + after - time.time()))
    killed_at = trainer.kill()
    trainer.wait()
    done = [(line["step"], line["t"]) for line in trainer.lines if "step" in line and "ok" not in line]
    return killed_at, [d for d in done if d[1] <= killed_at], started["run_id"], Path(started["path"])


@pytest.mark.parametrize(("rate", "measure"), [
    pytest.param(100.0, {"flush_every": 10_000}, id="100-steps-per-s"),  # the step count never triggers a flush
    pytest.param(0.2, {}, id="0.2-steps-per-s"),
])
def test_sigkill_of_a_trainer_loses_at_most_max_flush_interval(tmp_path: Path, rate: float,
                                                                measure: dict[str, Any]) -> None:
    period = 1.0 / rate
    rng = random.Random(f"{rate}")
    for rep in range(REPEAT):
        home = tmp_path / f"home{rep}"
        after = rng.uniform(1.5, 3.0) if rate > 1 else period * (1 + rng.random())
        killed_at, done, run_id, path = _kill_while_pacing(home, tmp_path, rate, measure, after)
        log = LogContents(path)
        assert log.corrupt == [] and log.closes == []
        kept = log.steps()
        assert kept == list(range(len(kept))), "the log has a hole"
        missing = [t for step, t in done if step >= len(kept)]
        lost_s = killed_at - min(missing) if missing else 0.0
        record_figure("trainer_sigkill", rate=rate, steps_done=len(done), steps_lost=len(missing),
                      seconds_lost=round(lost_s, 4))
        assert lost_s <= MAX_FLUSH_INTERVAL + period + SLACK_S, f"{len(missing)} steps ({lost_s:.2f} s) lost"
        store = Store.open(f"sqlite:///{tmp_path / f'store{rep}.db'}")
        try:
            Ingester(store, home).poll_once()
            assert store.run(run_id).status == "crashed"  # its writer is gone
            assert compare(log.values, stored_values(store, run_id)) == (0, 0)
        finally:
            store.close()


def test_a_slow_step_reaches_the_log_within_max_flush_interval(tmp_path: Path, gradwatch_home: Path) -> None:
    interval, period, wait = 0.2, 2.0, 1.6  # the kill lands well past the interval, before the next step
    spec = {"run": "slow", "config": {"home": str(gradwatch_home), "measure": {"max_flush_interval": interval}}}
    trainer = TrainerProcess(spec, tmp_path / "trainer.err")
    started = trainer.send("watch")
    trainer.send(f"pace {1 / period} 1000", wait=False)
    trainer.wait_lines(3)  # the answer to `watch`, then steps 0 and 1 done
    time.sleep(max(0.0, trainer.lines[2]["t"] + wait - time.time()))
    trainer.kill()
    trainer.wait()
    contents = LogContents(Path(started["path"]))
    assert contents.steps() == [0, 1]
    assert contents.steps("loss") == [0, 1]  # log() right after the step still filed under it
