"""NaN and Inf are values: every command shows them as what they are, counts them exactly and tells
them from "not measured".

Real runs (tests/fixtures/cli_runs.py): `nan-batch` has a NaN in its batch on steps 53-69, so its
loss, gradients and ReLU outputs are NaN on exactly those 17 steps; `nan-at-end` is the same run
stopped at step 59, its loss still NaN; `overflow` has a last-layer gradient of finite elements
whose norm overflows float32 at step 41, and NaN/Inf elements in the other layers from step 42.
Expected values come from plain torch, computed alongside the agent.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from gradwatch.diagnose.load import load_run_data
from gradwatch.plots import run_figure
from gradwatch.store import Store
from tests.fixtures.cli_runs import NAN_BATCH, OVERFLOW_STEP, nonfinite_home, ok

NAN_STEPS = list(NAN_BATCH)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return nonfinite_home(tmp_path_factory)


@pytest.fixture(scope="module")
def home(trained):
    return str(trained[0])


@pytest.fixture(scope="module")
def runs(trained):
    return trained[1]


@pytest.fixture(scope="module")
def store(home):
    ok("runs", "--home", home)  # ingest
    with Store.open(home=Path(home)) as s:
        yield s


def _no_bare_constant(token: str) -> None:
    raise AssertionError(f"bare {token} in JSON output: JSON has no such number")


def _json(*args):
    """A command's --json output, parsed strictly (a bare NaN or Infinity token fails)."""
    return json.loads(ok(*args, "--json"), parse_constant=_no_bare_constant)


def _expected_losses(losses):
    return ["nan" if math.isnan(v) else v for v in losses]


# ---------------------------------------------------------------- history

def test_history_keeps_every_nan_loss_step(home, runs):
    d = _json("history", "nan-batch", "--home", home, "--metric", "loss")
    assert d["steps"] == list(range(100))  # NaN steps kept, none dropped
    assert [v == "nan" for v in d["values"]] == [s in NAN_BATCH for s in range(100)]
    finite = [v for v in d["values"] if v != "nan"]
    np.testing.assert_allclose(finite, [v for v in runs["nan-batch"].losses if not math.isnan(v)], rtol=1e-6)


def test_history_text_marks_and_counts_the_nan_steps(home, runs):
    lines = ok("history", "nan-batch", "--home", home, "--metric", "loss", "--width", "100").splitlines()
    assert [i for i, c in enumerate(lines[1]) if c == "!"] == NAN_STEPS  # one character per step
    finite = [v for v in runs["nan-batch"].losses if math.isfinite(v)]
    assert lines[3] == (f"100 values, steps 0..99; min {min(finite):.3g}, median {np.median(finite):.3g}, "
                        f"max {max(finite):.3g} (NaN left out), last {runs['nan-batch'].losses[-1]:.3g}")
    assert lines[4] == "non-finite values (! above): NaN on 17 steps (53-69)"


def test_history_of_a_loss_that_ends_nan(home):
    d = _json("history", "nan-at-end", "--home", home, "--metric", "loss")
    assert d["steps"][-1] == 59 and d["values"][-1] == "nan"
    lines = ok("history", "nan-at-end", "--home", home, "--metric", "loss").splitlines()
    assert lines[1].endswith("!") and "last nan" in lines[3]
    assert lines[4] == "non-finite values (! above): NaN on 7 steps (53-59)"


# ---------------------------------------------------------------- runs, show, compare

def test_runs_count_the_nonfinite_steps(home):
    rows = {r["name"]: r for r in _json("runs", "--home", home)}
    assert rows["nan-batch"]["nonfinite_steps"] == 17 and rows["nan-at-end"]["nonfinite_steps"] == 7
    assert rows["overflow"]["nonfinite_steps"] == 50 - OVERFLOW_STEP  # total norm +Inf at 41, NaN after


def test_show_counts_nonfinite_values_exactly(home, runs):
    d = _json("show", "nan-batch", "--home", home)
    by_metric = {e["metric"]: e for e in d["nonfinite"]}
    assert by_metric["loss"] == {"metric": "loss", "steps": 17, "nan": 17, "inf": 0, "-inf": 0,
                                 "first_step": 53, "ranges": [[53, 69]]}
    reference = sorted(runs["nan-batch"].nonfinite_params)
    assert by_metric["nonfinite_params"]["steps"] == len(reference) == 17
    assert by_metric["nonfinite_params"]["ranges"] == [[reference[0], reference[-1]]]
    assert d["event_counts"] == {"nonfinite": 17}
    text = ok("show", "nan-batch", "--home", home)
    assert "  loss              NaN on 17 steps: 53-69" in text.splitlines()


def test_show_a_run_whose_loss_is_nan_now(home):
    d = _json("show", "nan-at-end", "--home", home)
    assert d["latest"]["loss"] == {"step": 59, "value": "nan"}
    assert "loss nan" in ok("show", "nan-at-end", "--home", home)


def test_show_tells_overflow_from_nonfinite_elements(home, runs):
    d = _json("show", "overflow", "--home", home)
    by_metric = {e["metric"]: e for e in d["nonfinite"]}
    assert by_metric["overflow_params"]["ranges"] == [[OVERFLOW_STEP, OVERFLOW_STEP]]
    assert by_metric["nonfinite_params"]["first_step"] == OVERFLOW_STEP + 1
    assert by_metric["grad_norm_total"]["inf"] == 1 and by_metric["grad_norm_total"]["first_step"] == OVERFLOW_STEP
    kinds = [(e["kind"], e["step"], e["data"]["params"]) for e in d["events"]]
    ref = runs["overflow"]
    assert kinds[0] == ("overflow", OVERFLOW_STEP, ref.overflow_params[OVERFLOW_STEP])
    assert kinds[1] == ("nonfinite", OVERFLOW_STEP + 1, ref.nonfinite_params[OVERFLOW_STEP + 1])


def test_compare_counts_nonfinite_steps_and_leaves_nan_out_of_the_median(home, store):
    d = _json("compare", "nan-batch", "nan-at-end", "--home", home)
    assert (d["a"]["nonfinite_loss_steps"], d["b"]["nonfinite_loss_steps"]) == (17, 7)
    assert (d["a"]["nonfinite_grad_norm_steps"], d["b"]["nonfinite_grad_norm_steps"]) == (17, 7)
    norms = store.run_series(store.resolve_run("nan-batch"), "grad_norm_total").values
    assert d["a"]["median_grad_norm_total"] == pytest.approx(np.median(norms[~np.isnan(norms)]))
    assert "nonfinite_loss_steps       17" in ok("compare", "nan-batch", "nan-at-end", "--home", home)


# ---------------------------------------------------------------- layers

def test_layers_tell_nan_from_not_measured(home, runs):
    d = _json("layers", "nan-batch", "--home", home, "--step", "60")
    rows = {r["layer"]: r for r in d["layers"]}
    assert [rows[name]["act_grad_norm"] for name in ("0", "1", "2")] == ["nan"] * 3
    assert rows["0"]["grad_norm"] == rows["2"]["grad_norm"] == "nan"
    assert rows["1"]["act_nonfinite"] == runs["nan-batch"].nonfinite_outputs[60] == 8
    assert rows["0"]["dead_ratio"] is None and rows["1"]["grad_norm"] is None  # not of that family: not measured
    line = next(line for line in ok("layers", "nan-batch", "--home", home, "--step", "60").splitlines()
                if line.split()[:3] == ["1", "1", "ReLU"])
    assert line.split()[4:6] == ["-", "nan"] and line.split()[8] == "8"  # GRAD_NORM, ACT_GRAD_NORM, ACT_NONFINITE
    clean = {r["layer"]: r for r in _json("layers", "nan-batch", "--home", home, "--step", "52")["layers"]}
    assert clean["1"]["act_nonfinite"] == 0 and isinstance(clean["1"]["act_grad_norm"], float)


def test_layers_over_a_range_say_which_nan_values_they_left_out(home, store):
    d = _json("layers", "nan-batch", "--home", home, "--steps", "50:75")
    rows = {r["layer"]: r for r in d["layers"]}
    assert rows["1"]["nan_steps"]["act_grad_norm"] == 17
    values = store.layer_history(store.resolve_run("nan-batch"), "1", "act_grad_norm", 50, 75).values
    assert rows["1"]["act_grad_norm"] == pytest.approx(np.median(values[~np.isnan(values)]))
    assert "NaN values left out of the median: 0 grad_norm on 17 steps" in \
        ok("layers", "nan-batch", "--home", home, "--steps", "50:75")


# ---------------------------------------------------------------- export

def test_export_csv_writes_nan_cells_that_read_back(home, runs, tmp_path):
    out = tmp_path / "nan.csv"
    ok("export", "nan-batch", "--home", home, "--out", out)
    rows = [r for r in csv.DictReader(io.StringIO(out.read_text())) if r["record"] == "value" and r["metric"] == "loss"]
    assert [int(r["step"]) for r in rows] == list(range(100))
    assert [r["value"] for r in rows if int(r["step"]) in NAN_BATCH] == ["nan"] * 17
    np.testing.assert_allclose([float(r["value"]) for r in rows], runs["nan-batch"].losses, rtol=1e-6)


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_export_json_writes_nan_strings(home, runs, fmt):
    text = ok("export", "overflow", "--home", home, "--format", fmt)
    records = (json.loads(text, parse_constant=_no_bare_constant) if fmt == "json" else
               [json.loads(line, parse_constant=_no_bare_constant) for line in text.splitlines()])
    loss = [r["value"] for r in records if r["record"] == "value" and r["metric"] == "loss"]
    assert loss[OVERFLOW_STEP + 1] == "inf" and loss[-1] == "nan"
    assert [v for v in loss if isinstance(v, float)] == pytest.approx(
        [v for v in runs["overflow"].losses if math.isfinite(v)], rel=1e-6)
    norms = {r["step"]: r["value"] for r in records if r["record"] == "value" and r["metric"] == "grad_norm_total"}
    assert norms[OVERFLOW_STEP] == "inf" and norms[OVERFLOW_STEP + 1] == "nan"


def test_every_command_spells_nonfinite_values_the_same_way(home):
    """One representation in every --json output: the strings "nan" / "inf" / "-inf"; null means not measured."""
    outputs = {args[0]: _json(*args, "--home", home) for args in (
        ("runs",), ("show", "nan-at-end"), ("layers", "nan-at-end", "--step", "55"),
        ("history", "nan-at-end", "-m", "loss"), ("compare", "nan-at-end", "overflow"), ("diagnose", "nan-at-end"))}
    assert outputs["show"]["latest"]["loss"]["value"] == "nan"
    assert outputs["history"]["values"][-1] == "nan"
    assert outputs["layers"]["layers"][0]["act_grad_norm"] == "nan"
    assert outputs["compare"]["a"]["final_loss"] == "nan" and outputs["compare"]["b"]["final_loss"] == "nan"
    assert any(f["id"] == "nonfinite_loss" for f in outputs["diagnose"]["findings"])


# ---------------------------------------------------------------- diagnose

def _findings(home, name):
    return {f["id"]: f for f in _json("diagnose", name, "--home", home)["findings"]}


def test_diagnose_a_nan_batch(home, runs):
    found = _findings(home, "nan-batch")
    loss = found["nonfinite_loss"]["evidence"]
    assert loss["summary"] == ["first non-finite loss at step 53", "loss NaN on 17 steps: 53-69",
                               "finite again from step 70"]
    assert loss["values"]["nan_steps"] == 17 and loss["values"]["nonfinite_steps"] == 17
    grads = found["nonfinite_gradients"]["evidence"]
    assert grads["values"]["first_nonfinite_step"] == 53 and grads["values"]["nonfinite_steps"] == 17
    assert "first_overflow_step" not in grads["values"]
    assert found["nonfinite_gradients"]["title"] == "Non-finite gradients (NaN/Inf)"
    acts = found["nonfinite_activations"]["evidence"]
    outputs = runs["nan-batch"].nonfinite_outputs
    assert acts["summary"][0] == \
        f"NaN/Inf activation outputs from step 53, first in layer 1 (ReLU, {outputs[53]} outputs)"
    assert acts["values"]["nonfinite_steps"] == sum(n > 0 for n in outputs.values()) == 17
    assert acts["layers"] == ["1"]


def test_diagnose_tells_an_overflowed_norm_from_nan_elements(home, runs):
    ref = runs["overflow"]
    grads = _findings(home, "overflow")["nonfinite_gradients"]["evidence"]
    first_nan = min(ref.nonfinite_params)
    assert (min(ref.overflow_params), first_nan) == (OVERFLOW_STEP, OVERFLOW_STEP + 1)
    layers_over = sorted({p.rsplit(".", 1)[0] for p in ref.overflow_params[OVERFLOW_STEP]})
    layers_nan = sorted({p.rsplit(".", 1)[0] for p in ref.nonfinite_params[first_nan]})
    assert grads["summary"][:3] == [
        f"first failure at step {OVERFLOW_STEP}",
        f"norm overflowed float32 at step {OVERFLOW_STEP} in layer{'s' * (len(layers_over) != 1)} "
        f"{', '.join(layers_over)} (elements still finite), "
        f"on 1 step: {OVERFLOW_STEP}",
        f"NaN/Inf gradient elements from step {first_nan} in layer{'s' * (len(layers_nan) != 1)} {', '.join(layers_nan)}, "
        f"on {len(ref.nonfinite_params)} steps: {first_nan}-49"]
    assert grads["values"]["first_overflow_step"] == OVERFLOW_STEP
    assert grads["values"]["first_nonfinite_step"] == first_nan
    assert grads["layers"] == layers_over + layers_nan
    text = ok("diagnose", "overflow", "--home", home, "--brief")
    assert "norm overflowed float32 at step 41 in layer 4 (elements still finite)" in text


# ---------------------------------------------------------------- plot

def _bands(ax):
    return sorted((p.get_x(), p.get_x() + p.get_width()) for p in ax.patches if p.get_hatch() == "//")


def test_plot_bands_the_nan_steps_in_every_panel_and_keeps_them_in_the_heatmap(home, store, tmp_path):
    data = load_run_data(store, store.resolve_run("nan-batch"))
    panels = {ax.get_label(): ax for ax in run_figure(data).axes}
    for name in ("gradient_flow", "total_norm", "loss", "lr", "activations"):
        assert _bands(panels[name]) == [(52.5, 69.5)], name
    red = panels["gradient_flow"].collections[1].get_array()  # NaN cells drawn red, one column per step
    assert (~red.mask).reshape(3, -1).sum(axis=1).tolist() == [17, 17, 17]
    outputs = panels["activations"].collections[1].get_array()  # the ReLU's NaN outputs, red on 53-69
    assert np.flatnonzero(~outputs.mask).tolist() == list(range(53, 70))
    ok("plot", "nan-batch", "--home", home, "--out", tmp_path / "nan.png")
