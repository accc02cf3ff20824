"""The rules engine's windows fed the batches the ingester commits hold exactly what a read of the
store gives, on SQLite and PostgreSQL: every series bit for bit (NaN, ±Inf and steps not
measured included), the events and the rules' findings, as a run moves, when another process
ingests part of its log, and when rows come out of order; and a fed engine fires, escalates and
resolves the same alerts as one that reads the store at every evaluation."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from gradwatch.agent import runlog
from gradwatch.agent.runlog import Close, Event, Header, MetricDef
from gradwatch.alerts import AlertEngine, AlertsConfig
from gradwatch.alerts import engine as engine_module
from gradwatch.diagnose import RULES, RunData, diagnose
from gradwatch.diagnose.load import RunWindow
from gradwatch.ingest import Batch, Ingester
from gradwatch.store import Store
from tests.fixtures.pg import pg_database_url, store_url  # noqa: F401 - fixture

RUN_ID = "fedrun01"
#: fc1 -> tanh -> fc2 -> relu -> fc3 (params 0-5); index 9 is a layer the table does not have
LAYERS = [{"index": 0, "name": "fc1", "type": "Linear", "kind": "param", "family": None, "params": [0, 1]},
          {"index": 1, "name": "tanh", "type": "Tanh", "kind": "activation", "family": "bounded", "params": []},
          {"index": 2, "name": "fc2", "type": "Linear", "kind": "param", "family": None, "params": [2, 3]},
          {"index": 3, "name": "relu", "type": "ReLU", "kind": "activation", "family": "relu", "params": []},
          {"index": 4, "name": "fc3", "type": "Linear", "kind": "param", "family": None, "params": [4, 5]}]
PARAMS = [{"index": i, "name": f"p{i}", "layer": 2 * (i // 2), "shape": [4], "numel": 4, "requires_grad": True,
           "group": i % 2} for i in range(6)]
RUN = ("grad_norm_total", "grad_norm_total_clipped", "clip_coef", "clip_threshold", "loss", "nonfinite_params",
       "overflow_params", "skipped")
#: columns in an order that is not the entities' (the param norm adds its squares entity after entity)
REVERSED = (5, 4, 3, 2, 1, 0)


class RichLog:
    """A rank-0 run log with every metric the rules read, written frame by frame with random
    healthy values, NaN and ±Inf here and there, columns not measured at some steps, layer and
    param norms every third step, events, and bursts that fire rules (NaN loss, loss spike,
    dead units) when asked."""

    def __init__(self, home: Path, seed: int = 0, flow: bool = True) -> None:
        defs = [MetricDef(i, m, "run") for i, m in enumerate(RUN)]
        defs.append(MetricDef(len(defs), "lr", "group", (0, 1)))
        for m in ("grad_norm", "param_norm", "update_ratio"):
            defs.append(MetricDef(len(defs), m, "param", REVERSED))
        layer_metrics = [("act_grad_norm", (0, 1, 2, 3, 4, 9)), ("saturation_ratio", (1,)),
                         ("dead_ratio", (3,)), ("act_nonfinite", (1, 3)), ("act_mean", (0, 1, 2, 3, 4))]
        for m, cols in layer_metrics if flow else layer_metrics[1:]:
            defs.append(MetricDef(len(defs), m, "layer", cols))
        self.defs = defs
        self.rng = np.random.default_rng(seed)
        self.step = 0
        info = {"run_id": RUN_ID, "name": "fed", "project": "alerts", "host": socket.gethostname(),
                "pid": os.getpid(), "rank": 0, "world_size": 1, "started_at": time.time(), "params": PARAMS,
                "layers": LAYERS, "groups": [{"index": 0, "params": [0, 2, 4]}, {"index": 1, "params": [1, 3, 5]}],
                "config": {"clip": {"mode": "norm", "max_norm": 5.0}}, "model": {}, "init_check": []}
        self.path = runlog.log_path(RUN_ID, 0, home)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(runlog.encode_header(Header(info, defs)))

    def write(self, steps: int, nan_loss: bool = False, spike: bool = False, dead: float | None = None,
              event: bool = False, first: int | None = None) -> None:
        """One frame of `steps` steps (from `first`, default where the last one ended); `spike` puts a
        large loss and gradient norm at its last step."""
        start = self.step if first is None else first
        s = np.arange(start, start + steps, dtype=np.int64)
        self.step = max(self.step, start + steps)
        blocks = []
        for d in self.defs:
            width = 1 if d.scope == "run" else len(d.indices)
            values = self.rng.lognormal(0.0, 0.3, (steps, width)).astype(np.float32)
            present = np.ones(values.shape, dtype=bool)
            if d.scope in ("param", "layer"):
                present[s % 3 != 0] = False
                present &= self.rng.random(values.shape) > 0.1
            if d.name in ("nonfinite_params", "overflow_params", "skipped", "act_nonfinite"):
                values[:] = 0.0
            elif d.name in ("saturation_ratio", "dead_ratio"):
                values = (values / 10).astype(np.float32)
                if dead is not None and d.name == "dead_ratio":
                    values[:] = dead
            elif d.name == "loss":
                if spike:
                    values[-1] = 100.0
                if nan_loss:
                    values[steps // 2:] = np.nan
            elif d.name in ("grad_norm_total", "grad_norm"):
                if spike and d.name == "grad_norm_total":
                    values[-1] = 1e4
                odd = self.rng.random(values.shape)
                values[odd < 0.03] = np.nan
                values[(odd >= 0.03) & (odd < 0.05)] = np.inf
            elif d.name == "param_norm":  # magnitudes far apart: the order of the squares' sum shows
                values = (values * 10.0 ** self.rng.uniform(-4, 4, values.shape)).astype(np.float32)
            elif d.name == "act_mean":
                values[self.rng.random(values.shape) < 0.05] = -np.inf
            blocks.append((d.id, s, values, present))
        records = runlog.encode_frame(blocks)
        if event:
            records += runlog.encode_event(Event("nonfinite", int(s[-1]), time.time(),
                                                 {"params": ["p1"], "layers": ["fc1"], "count": 1}))
            records += runlog.encode_event(Event("overflow", int(s[0]) - 5, time.time(),  # stored late
                                                 {"params": ["p4"], "layers": ["fc3"], "count": 1}))
        with open(self.path, "ab") as f:
            f.write(records)

    def close(self) -> None:
        with open(self.path, "ab") as f:
            f.write(runlog.encode_close(Close(time.time(), self.step - 1, {"steps": self.step})))


@pytest.fixture
def store(store_url: str, tmp_path: Path):  # noqa: F811 - the fixture imported above
    with Store.open(store_url, home=tmp_path) as st:
        yield st


def read(store: Store, steps: int | None) -> RunData:
    """The window as a new one reads it from the store."""
    window = RunWindow(store, RUN_ID, steps)
    window.refresh()
    return window.data


def assert_same(fed: RunData, stored: RunData) -> None:
    for part in ("run", "layer", "group"):
        got, want = getattr(fed, part), getattr(stored, part)
        assert sorted(got) == sorted(want), part
        for metric, series in want.items():
            for field in ("steps", "values", "present"):
                a, b = getattr(got[metric], field), getattr(series, field)
                assert (a is None) == (b is None), (part, metric, field)
                if b is not None:
                    assert a.dtype == b.dtype, (part, metric, field)
                    np.testing.assert_array_equal(a, b, f"{part} {metric} {field}", strict=True)
    assert fed.events == stored.events
    assert repr(diagnose(fed)) == repr(diagnose(stored))  # floats by repr: NaN equals NaN, and every bit counts


@pytest.mark.parametrize("steps", [150, None], ids=["window", "whole-run"])
def test_a_fed_window_holds_what_a_read_of_the_store_gives(store: Store, tmp_path: Path, steps: int | None) -> None:
    log = RichLog(tmp_path)
    batches: list[Batch] = []
    ingester = Ingester(store, tmp_path, on_batch=batches.append)
    log.write(7)
    ingester.poll_once()
    window = RunWindow(store, RUN_ID, steps)
    window.refresh()
    rng = np.random.default_rng(1)
    found: set[str] = set()
    for k in range(50):
        for _ in range(int(rng.integers(1, 3))):  # one or two frames per batch
            log.write(int(rng.integers(1, 9)), nan_loss=k == 12, spike=k in (20, 42), event=k % 7 == 3,
                      dead=0.95 if 15 <= k < 22 else None)
        ingester.poll_once()
        if k % 4 == 1:  # batches that wait for a later evaluation
            continue
        assert batches and window.feed(batches)
        batches.clear()
        assert window.last_step == log.step - 1
        assert_same(window.data, read(store, steps))
        found |= {f.id for f in diagnose(window.data)}
    assert found >= {"nonfinite_loss", "nonfinite_gradients", "loss_spike", "dying_units", "exploding_gradients"}


def test_a_run_without_gradient_flow_gets_its_layers_norms_from_their_params(store: Store, tmp_path: Path) -> None:
    log = RichLog(tmp_path, flow=False)
    batches: list[Batch] = []
    ingester = Ingester(store, tmp_path, on_batch=batches.append)
    log.write(5)
    ingester.poll_once()
    window = RunWindow(store, RUN_ID, 30)
    window.refresh()
    for _ in range(8):
        log.write(6)
        ingester.poll_once()
        assert window.feed(batches)
        batches.clear()
        assert "grad_norm" in window.data.layer
        assert_same(window.data, read(store, 30))


def test_batches_another_process_ingested_are_a_gap_and_a_read_closes_it(store: Store, tmp_path: Path) -> None:
    log = RichLog(tmp_path)
    batches: list[Batch] = []
    ingester = Ingester(store, tmp_path, on_batch=batches.append)
    log.write(10)
    ingester.poll_once()
    window = RunWindow(store, RUN_ID, 40)
    window.refresh()
    batches.clear()
    log.write(6, event=True)
    ingester.poll_once()
    log.write(6, event=True)
    Ingester(store, tmp_path).poll_once()  # `gradwatch show` ingesting while the service runs
    log.write(6)
    ingester.poll_once()
    assert len(batches) == 2 and not window.feed(batches)  # the first appended, the second is past a gap
    assert window.last_step == 15
    assert window.refresh()
    assert_same(window.data, read(store, 40))
    batches.clear()
    log.write(6, event=True)
    ingester.poll_once()
    assert window.feed(batches)  # after the read, the next batch follows on
    assert_same(window.data, read(store, 40))


def test_a_window_read_without_its_layers_is_not_fed(store: Store, tmp_path: Path) -> None:
    log = RichLog(tmp_path)
    batches: list[Batch] = []
    ingester = Ingester(store, tmp_path, on_batch=batches.append)
    log.write(10)
    ingester.poll_once()
    window = RunWindow(store, RUN_ID, 40)
    window.refresh(layers=False)
    batches.clear()
    log.write(6)
    ingester.poll_once()
    assert window.offset is None and not window.feed(batches)


def test_rows_that_go_back_are_not_fed(store: Store, tmp_path: Path) -> None:
    log = RichLog(tmp_path)
    batches: list[Batch] = []
    ingester = Ingester(store, tmp_path, on_batch=batches.append)
    log.write(10)
    ingester.poll_once()
    window = RunWindow(store, RUN_ID, 40)
    window.refresh()
    log.write(4, first=8)  # steps 8-11: a fresh read sorts them in, a feed cannot
    ingester.poll_once()
    assert not window.feed(batches)
    assert window.last_step == 9


class Twin:
    """One engine on its own home and store: fed by its ingester, or reading the store at every
    evaluation (`layers_every` 0), with a clock the test moves."""

    def __init__(self, home: Path, url: str, fed: bool) -> None:
        self.now = 1_000.0
        self.store = Store.open(url, home=home)
        config = AlertsConfig.model_validate({"layers_every": 0, "window_steps": 150,
                                              "rules": {"dying_units": {"for_steps": 0}}})
        self.engine = AlertEngine(self.store, config, clock=lambda: self.now, rules=RULES, home=home)
        self.ingester = Ingester(self.store, home, clock=lambda: self.now, on_batch=self.engine.feed if fed else None)
        self.engine.start()
        self.log = RichLog(home, seed=3)

    def tick(self) -> list[tuple]:
        self.now += 5.0
        report = self.ingester.poll_once()
        return [(t.kind, t.alert.rule, t.alert.severity, t.alert.step, repr(t.alert.value), repr(t.alert.threshold),
                 t.alert.layer, t.alert.title, t.alert.cause, t.alert.remedy, t.alert.summary)
                for t in self.engine.evaluate(report.finished + report.crashed)]


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_a_fed_engine_fires_and_resolves_what_an_engine_reading_the_store_does(tmp_path: Path, db: str) -> None:
    if db == "sqlite":
        urls = [f"sqlite:///{tmp_path / name / 'gw.db'}" for name in ("fed", "read")]
    else:
        urls = [pg_database_url(), pg_database_url()]
    twins = [Twin(tmp_path / name, url, fed) for name, url, fed in zip(("fed", "read"), urls, (True, False))]
    script = [dict(steps=30), dict(steps=10, dead=0.6), dict(steps=30, dead=0.97), dict(steps=10, spike=True),
              dict(steps=10), dict(steps=10, nan_loss=True, event=True), dict(steps=60), dict(steps=30),
              dict(steps=20, spike=True), dict(steps=100), dict(steps=100), dict(steps=10)]
    seen = []
    try:
        for frame in script:
            for twin in twins:
                twin.log.write(**frame)
            fed, read_ = (twin.tick() for twin in twins)
            assert fed == read_
            seen += fed
        for twin in twins:
            twin.log.close()
        fed, read_ = (twin.tick() for twin in twins)
        assert fed == read_
        seen += fed
    finally:
        for twin in twins:
            twin.store.close()
    kinds = {(kind, rule) for kind, rule, *_ in seen}
    assert {("firing", "nonfinite_loss"), ("resolved", "nonfinite_loss"), ("escalated", "dying_units"),
            ("firing", "loss_spike")} <= kinds


def test_batches_past_the_bound_are_dropped_and_the_window_reads_the_store_instead(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "MAX_WAITING_BYTES", 1)  # keep only the last batch of each run
    twin = Twin(tmp_path, f"sqlite:///{tmp_path / 'gw.db'}", fed=True)
    try:
        twin.log.write(30)
        twin.tick()  # the run's window is made: from now on its batches wait for it
        made = twin.engine._watched[RUN_ID].window
        for _ in range(3):
            twin.log.write(10, event=True)
            twin.ingester.poll_once()  # no evaluation in between: the first two are dropped
        twin.tick()
        window = twin.engine._watched[RUN_ID].window
        assert window is not made and window.last_step == 59  # read anew, past the gap
        assert_same(window.data, read(twin.store, 150))
    finally:
        twin.store.close()
