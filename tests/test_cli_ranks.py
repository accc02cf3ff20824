"""`--rank` on the commands that show per-rank data, on a real store holding 2-rank runs.

Each rank's run log is written with the run log encoder (tests/fixtures/runlogs.py) and ingested
by the CLI itself. As under DDP, rank 1 records no gradient norms (rank 0 records the all-reduced
norms, identical on every rank, once) and its own activations, loss and learning rate; its values
are rank 0's plus 1, so each test knows which rank it read. Expected values are recomputed from the
synthetic definitions, independently of the store.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from gradwatch.store import Store
from tests.fixtures.cli_runs import fails, ok
from tests.fixtures.runlogs import SyntheticRun

STEPS = 40
#: What DDP's rank 1 does not record: the gradient norms rank 0 records once for every rank.
RANK0_ONLY = ("grad_norm", "grad_norm_total", "grad_norm_total_clipped")


@dataclass
class DDPRank(SyntheticRun):
    """One rank of a data-parallel run; `scale` multiplies every value (run B against run A)."""

    scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank:
            for name in RANK0_ONLY:
                del self.metrics[name]

    def value(self, metric: str, step: np.ndarray, entity: int) -> np.ndarray:
        return (super().value(metric, step, entity) * self.scale).astype(np.float32)


RUNS = {"ddp-a": ("ddpa00000001", 1.0, 1_000.0), "ddp-b": ("ddpb00000001", 3.0, 2_000.0)}


def _ranks(name: str) -> list[DDPRank]:
    run_id, scale, started = RUNS[name]
    return [DDPRank(run_id=run_id, name=name, rank=k, world_size=2, scale=scale, started_at=started) for k in (0, 1)]


def _expected(name: str, rank: int, metric: str, entity: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) written for a series: the steps where it was measured."""
    run = _ranks(name)[rank]
    steps = np.arange(STEPS)
    values = run.value(metric, steps, entity).astype(np.float64)
    keep = ~np.isnan(values)
    return steps[keep], values[keep]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("ranks")
    for name in RUNS:
        for run in _ranks(name):
            run.write(home, STEPS)
    ok("runs", "--home", home)  # ingested by the CLI
    return str(home)


@pytest.fixture(scope="module")
def store(home):
    with Store.open(home=Path(home)) as s:
        yield s


def _json(*args):
    return json.loads(ok(*args, "--json"))


LAYER = "net.1"  # a ReLU layer: index 1
HISTORIES = {"loss": (("-m", "loss"), "loss", 0),
             "lr": (("-m", "lr"), "lr", 0),
             "act_grad_norm": (("-m", "act_grad_norm", "--layer", LAYER), "act_grad_norm", 1),
             "dead_ratio": (("-m", "dead_ratio", "--layer", LAYER, "--steps", "10:30"), "dead_ratio", 1)}


@pytest.mark.parametrize("key", sorted(HISTORIES))
def test_history_reads_rank_0_by_default_and_the_rank_asked_for(home, key):
    args, metric, entity = HISTORIES[key]
    default = _json("history", "ddp-a", "--home", home, *args)
    assert default == _json("history", "ddp-a", "--home", home, *args, "--rank", "0")
    ranked = _json("history", "ddp-a", "--home", home, *args, "--rank", "1")
    assert (default["rank"], ranked["rank"]) == (0, 1)
    for got, rank in ((default, 0), (ranked, 1)):
        steps, values = _expected("ddp-a", rank, metric, entity)
        if "--steps" in args:
            keep = (steps >= 10) & (steps <= 30)
            steps, values = steps[keep], values[keep]
        assert got["steps"] == steps.tolist()
        np.testing.assert_allclose(got["values"], values, rtol=1e-6)
        assert got["summary"]["median"] == pytest.approx(np.median(values))


def test_history_text_names_the_rank(home):
    assert ok("history", "ddp-a", "--home", home, "-m", "loss", "--rank", "1").splitlines()[0] == \
        "loss, run ddp-a (ddpa00000001), rank 1"


def test_a_metric_only_rank_0_recorded_is_a_one_line_error_naming_the_ranks_that_did(home):
    line = fails(2, "history", "ddp-a", "--home", home, "-m", "grad_norm", "--param", "net.0.weight", "--rank", "1")
    assert line == "Error: rank 1 recorded no grad_norm; ranks that did: 0"


@pytest.mark.parametrize("command", [
    ("history", "ddp-a", "-m", "loss"), ("layers", "ddp-a"), ("show", "ddp-a"), ("export", "ddp-a"),
    ("compare", "ddp-a", "ddp-b"), ("diagnose", "ddp-a"), ("plot", "ddp-a", "--out", "/tmp/never-written.png"),
], ids=lambda c: c[0])
def test_a_rank_the_run_does_not_have_is_one_line_listing_its_ranks(home, command):
    line = fails(2, *command, "--home", home, "--rank", "2")
    assert line == "Error: run ddp-a (ddpa00000001) has no rank 2; its ranks are 0, 1"


def test_layers_at_a_step_on_each_rank(home, store):
    default = _json("layers", "ddp-a", "--home", home, "--step", "20")
    assert default == _json("layers", "ddp-a", "--home", home, "--step", "20", "--rank", "0")
    ranked = _json("layers", "ddp-a", "--home", home, "--step", "20", "--rank", "1")
    assert "grad_norm" in default["metrics"] and "grad_norm" not in ranked["metrics"]  # rank 0 records norms
    for got, rank in ((default, 0), (ranked, 1)):
        assert got["rank"] == rank and got["step"] == 20
        for row in got["layers"]:
            steps, values = _expected("ddp-a", rank, "act_grad_norm", row["index"])
            assert row["act_grad_norm"] == pytest.approx(values[steps.tolist().index(20)], rel=1e-6)


def test_layers_over_a_range_on_rank_1(home):
    got = _json("layers", "ddp-a", "--home", home, "--steps", "0:39", "--aggregate", "max", "--rank", "1")
    for row in got["layers"]:
        _, values = _expected("ddp-a", 1, "act_grad_norm", row["index"])
        assert row["act_grad_norm"] == pytest.approx(values.max(), rel=1e-6)
    assert ok("layers", "ddp-a", "--home", home, "--rank", "1").splitlines()[0] == \
        "ddp-a (ddpa00000001), rank 1, step 30"


def test_show_gives_the_latest_values_and_layers_at_risk_of_the_rank(home, store):
    default = _json("show", "ddp-a", "--home", home)
    ranked = _json("show", "ddp-a", "--home", home, "--rank", "1")
    assert default == _json("show", "ddp-a", "--home", home, "--rank", "0")
    for got, rank in ((default, 0), (ranked, 1)):
        _, loss = _expected("ddp-a", rank, "loss")
        assert got["rank"] == rank
        assert got["latest"]["loss"] == {"step": STEPS - 1, "value": pytest.approx(loss[-1], rel=1e-6)}
        table = store.layers_at_step("ddpa00000001", rank=rank)
        flow = table.values["act_grad_norm"]
        assert got["at_risk"]["largest_flow"][0]["act_grad_norm"] == pytest.approx(np.nanmax(flow))
    assert "grad_norm_total" in default["latest"] and "grad_norm_total" not in ranked["latest"]
    assert "rank       1 of 2" in ok("show", "ddp-a", "--home", home, "--rank", "1")


def test_export_every_rank_by_default_and_one_with_rank(home, store):
    everything = list(csv.DictReader(io.StringIO(ok("export", "ddp-a", "--home", home))))
    one = list(csv.DictReader(io.StringIO(ok("export", "ddp-a", "--home", home, "--rank", "1"))))
    values = [r for r in one if r["record"] == "value"]
    assert {r["rank"] for r in values} == {"1"}
    assert {r["rank"] for r in everything if r["record"] == "value"} == {"0", "1"}
    stored = store.histories("ddpa00000001", list(store.metric_names("ddpa00000001")), rank=1)
    assert len(values) == sum(len(s.steps) for by_entity in stored.values() for s in by_entity.values())
    assert [r["record"] for r in one if r["record"] != "value"] == \
        [r["record"] for r in everything if r["record"] != "value"]  # the run, params, layers: every rank's
    loss = [float(r["value"]) for r in values if r["metric"] == "loss"]
    np.testing.assert_allclose(loss, _expected("ddp-a", 1, "loss")[1], rtol=1e-6)


def test_compare_reads_the_same_rank_of_both_runs(home):
    default = _json("compare", "ddp-a", "ddp-b", "--home", home)
    ranked = _json("compare", "ddp-a", "ddp-b", "--home", home, "--rank", "1")
    assert default == _json("compare", "ddp-a", "ddp-b", "--home", home, "--rank", "0")
    assert (default["metric"], ranked["metric"], ranked["rank"]) == ("act_grad_norm", "act_grad_norm", 1)
    for got, rank in ((default, 0), (ranked, 1)):
        start, end = got["a"]["steady_steps"]
        for row in got["layers"]:
            index = int(row["layer"].split(".")[1])
            steps, values = _expected("ddp-a", rank, "act_grad_norm", index)
            assert row["a"] == pytest.approx(np.median(values[(steps >= start) & (steps <= end)]), rel=1e-6)
            assert row["ratio"] == pytest.approx(3.0, rel=1e-5)
    _, loss = _expected("ddp-b", 1, "loss")
    assert ranked["b"]["final_loss"] == pytest.approx(loss[-1], rel=1e-6)
    assert ranked["a"]["median_grad_norm_total"] is None  # rank 1 records no gradient norms


def test_plot_and_diagnose_read_the_rank_asked_for(home, store, tmp_path):
    from gradwatch.diagnose.load import load_run_data

    run_id = RUNS["ddp-a"][0]
    for rank in (0, 1):
        data = load_run_data(store, run_id, rank)
        steps, values = _expected("ddp-a", rank, "loss")
        assert data.run["loss"].steps.tolist() == steps.tolist()
        np.testing.assert_allclose(data.run["loss"].values, values, rtol=1e-6)
        assert ("grad_norm_total" in data.run) == (rank == 0)  # as under DDP: rank 0 records the norms
    out = tmp_path / "rank1.png"
    assert _json("plot", "ddp-a", "--home", home, "--out", out, "--rank", "1") == {
        "run": run_id, "name": "ddp-a", "out": str(out), "rank": 1}
    assert out.stat().st_size > 0
    assert "rank" not in _json("plot", "ddp-a", "--home", home, "--out", out)
    assert _json("diagnose", "ddp-a", "--home", home, "--rank", "1")["rank"] == 1
    assert ok("diagnose", "ddp-a", "--home", home, "--rank", "1").startswith("ddp-a rank 1 (ddpa00000001)")
