"""What the store keeps for the rules engine (real SQLite and PostgreSQL): alerts with their layer,
value (NaN and ±Inf included), threshold, cause and remedy; several metrics' new rows in one read;
events stored after a given one."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from gradwatch.agent.runlog import Event
from gradwatch.ingest import Ingester
from gradwatch.store import Store
from tests.fixtures.live_log import LiveLog
from tests.fixtures.pg import store_url  # noqa: F401 - fixture


@pytest.fixture
def store(store_url: str, tmp_path: Path):  # noqa: F811 - the fixture imported above
    with Store.open(store_url, home=tmp_path) as st:
        yield st


@pytest.mark.parametrize("value", [0.75, math.nan, math.inf, -math.inf, None], ids=["finite", "nan", "inf", "-inf",
                                                                                   "none"])
def test_an_alert_keeps_what_the_engine_found(store: Store, tmp_path: Path, value: float | None) -> None:
    LiveLog(tmp_path, run_id="run1").write(10)
    Ingester(store, tmp_path).poll_once()
    aid = store.add_alert("dying_units", "warning", "Dying ReLU units", run_id="run1", step=7, started_at=5.0,
                          layer="blocks.0.act\x00", value=value, threshold=0.5, cause="a learning rate too high",
                          remedy="use LeakyReLU")
    (a,) = store.alerts(active=True)
    assert (a.id, a.rule, a.severity, a.step, a.message, a.started_at) == (aid, "dying_units", "warning", 7,
                                                                           "Dying ReLU units", 5.0)
    assert (a.layer, a.threshold, a.cause, a.remedy) == ("blocks.0.act\x00", 0.5, "a learning rate too high",
                                                         "use LeakyReLU")
    if value is None or math.isnan(value):
        assert a.value is None if value is None else math.isnan(a.value)
    else:
        assert a.value == value
    store.resolve_alert(aid, 9.0)
    assert store.alerts(active=True) == [] and store.alerts(run_id="run1")[0].ended_at == 9.0


def test_histories_reads_only_what_moved(store: Store, tmp_path: Path) -> None:
    log = LiveLog(tmp_path, run_id="run1")
    log.write(10, loss=lambda s: s * 1.0)
    ingester = Ingester(store, tmp_path)
    ingester.poll_once()
    got = store.histories("run1", ["loss", "act_grad_norm", "lr", "nope"])
    assert set(got) == {"loss", "act_grad_norm", "lr"} and set(got["act_grad_norm"]) == {0, 1, 2}
    np.testing.assert_array_equal(got["loss"][0].values, np.arange(10.0))
    assert store.histories("run1", ["loss"], start=10) == {}  # nothing after step 9: not even read
    log.write(5, loss=lambda s: s * 1.0)
    ingester.poll_once()
    new = store.histories("run1", ["loss", "dead_ratio"], start=10, end=12)
    np.testing.assert_array_equal(new["loss"][0].steps, [10, 11, 12])
    assert list(new["dead_ratio"]) == [1]


def test_events_after_an_id(store: Store, tmp_path: Path) -> None:
    from gradwatch.agent import runlog

    log = LiveLog(tmp_path, run_id="run1")
    log.write(10)
    with open(log.path, "ab") as f:
        for step in (3, 8):
            f.write(runlog.encode_event(Event("nonfinite", step, 1.0, {"params": ["fc1.weight"]})))
    Ingester(store, tmp_path).poll_once()
    first, second = store.events("run1")
    assert [e.step for e in store.events("run1", after_id=first.id)] == [8]
    assert store.events("run1", after_id=second.id) == []
