"""The collector on a real SQLite store fed by the real ingester: counters, names, depth, grace."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from gradwatch.ingest import Ingester
from gradwatch.service.exporter import GradwatchCollector
from gradwatch.service.runner import STORE_ERRORS
from gradwatch.service.source import StoreSource
from gradwatch.store import Store
from tests.fixtures.runlogs import SyntheticRun


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(home=tmp_path) as s:
        yield s


def _registry(source: StoreSource, **kwargs: object) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(GradwatchCollector(source, **kwargs))  # type: ignore[arg-type]
    return registry


def _value(registry: CollectorRegistry, sample: str, **labels: str) -> float | None:
    """The value of the one `sample` whose labels include `labels` (None when there is none)."""
    found = [s.value for family in registry.collect() for s in family.samples
             if s.name == sample and labels.items() <= s.labels.items()]
    assert len(found) <= 1, f"{sample}{labels}: {len(found)} samples"
    return found[0] if found else None


def _expected_counts(run: SyntheticRun, steps: int) -> dict[str, int]:
    s = np.arange(steps)
    return {
        "gradwatch_clipped_steps_total": int(np.count_nonzero(run.value("clip_coef", s, 0) < 1)),
        "gradwatch_skipped_steps_total": int(np.count_nonzero(run.value("skipped", s, 0) >= 0.5)),
        "gradwatch_nonfinite_steps_total": int(np.count_nonzero(run.value("nonfinite_params", s, 0) > 0)),
    }


def test_counters_follow_new_rows_incrementally(tmp_path: Path, store: Store) -> None:
    run = SyntheticRun(run_id="cnt1")
    run.write(tmp_path, steps=100, close=False)
    ingester = Ingester(store, tmp_path)
    ingester.poll_once()
    reg = _registry(StoreSource(store))
    labels = {"run": "cnt1", "rank": "0"}
    for name, count in _expected_counts(run, 100).items():
        assert _value(reg, name, **labels) == count, name
    assert _value(reg, "gradwatch_step", **labels) == 99

    run.write(tmp_path, steps=150, start=100, header=False, close=False)
    ingester.poll_once()
    expected = _expected_counts(run, 250)
    assert expected["gradwatch_clipped_steps_total"] > _expected_counts(run, 100)["gradwatch_clipped_steps_total"]
    for name, count in expected.items():
        assert _value(reg, name, **labels) == count, name
    assert _value(reg, "gradwatch_step", **labels) == 249


def test_names_and_layer_values_from_the_store(tmp_path: Path, store: Store) -> None:
    run = SyntheticRun(run_id="names1", param_every=10, act_every=10)
    run.write(tmp_path, steps=25, close=False)
    Ingester(store, tmp_path).poll_once()
    reg = _registry(StoreSource(store), per_param=True)
    layer = {"run": "names1", "run_name": "tiny", "project": "proj", "layer": "net.0", "depth": "0"}
    step = np.array([24])
    weight, bias = (run.value("grad_norm", step, i)[0] for i in (0, 1))
    assert _value(reg, "gradwatch_layer_grad_norm", **layer) == pytest.approx(np.hypot(weight, bias), rel=1e-6)
    assert _value(reg, "gradwatch_param_grad_norm", run="names1", layer="net.0", param="net.0.bias") == \
        pytest.approx(bias, rel=1e-6)
    at20 = np.array([20])  # param_norm / update_ratio measured every 10 steps
    pn = [run.value("param_norm", at20, i)[0] for i in (0, 1)]
    ur = [run.value("update_ratio", at20, i)[0] for i in (0, 1)]
    expected = np.hypot(ur[0] * pn[0], ur[1] * pn[1]) / np.hypot(*pn)
    assert _value(reg, "gradwatch_layer_update_ratio", **layer) == pytest.approx(expected, rel=1e-6)
    relu = {"run": "names1", "layer": "net.1", "depth": "1"}
    assert _value(reg, "gradwatch_layer_dead_ratio", **relu) == \
        pytest.approx(run.value("dead_ratio", at20, 1)[0], rel=1e-6)
    info = {"run": "names1", "name": "tiny", "project": "proj", "host": run.header().info["host"],
            "world_size": "1", "device": "cpu", "torch_version": "2.13.0", "gradwatch_version": "0.1.0"}
    assert _value(reg, "gradwatch_run_info", **info) == 1


def test_depth_comes_from_the_layer_table(tmp_path: Path, store: Store) -> None:
    """12 layers: depth labels are their model order, zero-padded (net.10 after net.9, not after net.1)."""
    run = SyntheticRun(run_id="deep1", n_linear=6, param_every=1, act_every=1)
    run.write(tmp_path, steps=3, close=False)
    Ingester(store, tmp_path).poll_once()
    reg = _registry(StoreSource(store))
    depths = {s.labels["layer"]: s.labels["depth"] for family in reg.collect() for s in family.samples
              if s.name == "gradwatch_layer_act_grad_norm"}
    assert depths == {f"net.{i}": str(i).zfill(2) for i in range(12)}
    assert [layer for layer, _ in sorted(depths.items(), key=lambda kv: kv[1])][9:] == ["net.9", "net.10", "net.11"]


def test_finished_run_leaves_after_grace(tmp_path: Path, store: Store) -> None:
    SyntheticRun(run_id="done1").write(tmp_path, steps=10, close=True)
    SyntheticRun(run_id="live1").write(tmp_path, steps=10, close=False)
    Ingester(store, tmp_path).poll_once()
    ended = store.run("done1").ended_at
    assert store.run("done1").status == "finished" and ended is not None
    now = [ended + 5.0]
    source = StoreSource(store, grace=60.0, clock=lambda: now[0])
    reg = _registry(source, grace=60.0, clock=lambda: now[0])
    assert _value(reg, "gradwatch_run_status", **{"run": "done1", "status": "finished"}) == 1
    assert _value(reg, "gradwatch_step", **{"run": "done1", "rank": "0"}) == 9
    now[0] = ended + 61.0
    assert _value(reg, "gradwatch_step", **{"run": "done1", "rank": "0"}) is None
    assert _value(reg, "gradwatch_step", **{"run": "live1", "rank": "0"}) == 9
    assert reg.get_sample_value("gradwatch_exporter_runs") == 1


def test_unreadable_store_reports_down(tmp_path: Path) -> None:
    store = Store.open(home=tmp_path)
    source = StoreSource(store)
    reg = _registry(source, errors=STORE_ERRORS)
    assert reg.get_sample_value("gradwatch_exporter_store_up") == 1
    (tmp_path / "gradwatch.db").unlink()  # pull the database away under the open store
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"gradwatch.db{suffix}").unlink(missing_ok=True)
    store.close()
    (tmp_path / "gradwatch.db").mkdir()  # now a directory: nothing can be read
    assert reg.get_sample_value("gradwatch_exporter_store_up") == 0


def test_a_nan_loss_is_served_as_nan_and_counted_exactly(tmp_path: Path, store: Store) -> None:
    """A real run whose loss is NaN from step 53 to its last step 59 (a batch holding NaN)."""
    from tests.fixtures.cli_runs import train_nan_batch

    trained = train_nan_batch(tmp_path, steps=60)
    Ingester(store, tmp_path).poll_once()
    reg = _registry(StoreSource(store, grace=1e9), grace=1e9)
    labels = {"run": trained.run_id, "rank": "0"}
    assert np.isnan(_value(reg, "gradwatch_loss", **labels))  # not the last finite loss
    assert np.isnan(_value(reg, "gradwatch_global_grad_norm", **labels))
    assert _value(reg, "gradwatch_nonfinite_loss_steps_total", **labels) == 7
    assert _value(reg, "gradwatch_nonfinite_steps_total", **labels) == 7
    assert _value(reg, "gradwatch_overflow_steps_total", **labels) == 0
    assert _value(reg, "gradwatch_overflow_params", **labels) == 0
    relu = {"run": trained.run_id, "layer": "1"}
    assert _value(reg, "gradwatch_layer_activation_nonfinite", **relu) == trained.nonfinite_outputs[59] == 8
    assert np.isnan(_value(reg, "gradwatch_layer_act_grad_norm", **relu))
    assert np.isnan(_value(reg, "gradwatch_layer_grad_norm", run=trained.run_id, layer="0"))


def test_nonfinite_loss_steps_are_counted_across_scrapes(tmp_path: Path, store: Store) -> None:
    """NaN on steps 53-69, written in two flushes that split the range: every NaN step counted once."""
    from gradwatch.agent import runlog

    run = SyntheticRun(run_id="nanloss1")
    loss_id = run.metrics["loss"].id
    path = run.path(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def frame(first: int, last: int) -> bytes:
        steps = np.arange(first, last + 1)
        loss = np.where((steps >= 53) & (steps <= 69), np.nan, 1.0 / (1 + steps)).reshape(-1, 1)
        return runlog.encode_frame([(loss_id, steps, loss, np.ones(loss.shape, bool))])

    path.write_bytes(runlog.encode_header(run.header()) + frame(0, 59))
    ingester = Ingester(store, tmp_path)
    ingester.poll_once()
    reg = _registry(StoreSource(store))
    labels = {"run": "nanloss1", "rank": "0"}
    assert _value(reg, "gradwatch_nonfinite_loss_steps_total", **labels) == 7
    assert np.isnan(_value(reg, "gradwatch_loss", **labels))
    with path.open("ab") as f:
        f.write(frame(60, 99))
    ingester.poll_once()
    assert _value(reg, "gradwatch_nonfinite_loss_steps_total", **labels) == 17
    assert _value(reg, "gradwatch_loss", **labels) == pytest.approx(1.0 / 100)
