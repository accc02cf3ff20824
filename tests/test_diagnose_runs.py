"""Diagnosis of real training runs (the quick demo): each pathology found, the healthy run clean.

Expected numbers are recomputed here from the store's query API, independently of the rules;
every finding is checked for how it reads (tests/fixtures/findings_text.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from gradwatch.diagnose import diagnose
from gradwatch.diagnose import thresholds as th
from gradwatch.diagnose.load import load_run_data
from gradwatch.store import Store
from tests.fixtures.cli_runs import demo_home
from tests.fixtures.findings_text import check_text


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    home, proc = demo_home(tmp_path_factory)
    assert proc.returncode == 0, proc.stderr
    with Store.open(home=home) as s:
        yield s


def _findings(store, name):
    found = diagnose(load_run_data(store, store.resolve_run(name)))
    for f in found:
        check_text(f)
    return {f.id: f for f in found}


def _steady_median(store, run_id, layer, metric):
    steps, values = store.layer_history(run_id, layer, metric)
    half = steps >= steps[len(steps) - int(np.ceil(len(steps) / 2))]
    return float(np.median(values[half]))


def test_healthy_run_has_no_findings(store):
    assert _findings(store, "demo-healthy") == {}


def test_default_init_sigmoid_mlp_vanishes(store):
    run_id = store.resolve_run("demo-sigmoid-default-init")
    f = _findings(store, "demo-sigmoid-default-init")["vanishing_gradients"]
    layers = store.layers(run_id)
    first = _steady_median(store, run_id, layers[0].name, "act_grad_norm")
    last = _steady_median(store, run_id, layers[-1].name, "act_grad_norm")
    assert f.severity == "error"
    assert f.evidence.values["flow_ratio"] == pytest.approx(first / last, rel=1e-5)
    assert f.evidence.values["flow_ratio"] < th.VANISHING_RATIO
    assert layers[0].name in f.evidence.layers and layers[-1].name not in f.evidence.layers
    check = {c["param"]: c for c in store.run_summary(run_id).init_check}
    assert f.causes[0].startswith("weights initialised too small")  # the init check, with its numbers
    assert f"std {check['2.weight']['std']:.3g} before Sigmoid; Glorot expects" in f.causes[0]


def test_normal_init_twin_saturates_and_its_init_is_flagged(store):
    run_id = store.resolve_run("demo-sigmoid-normal-init")
    found = _findings(store, "demo-sigmoid-normal-init")
    sat = found["saturation"]
    expected = {ly.name: _steady_median(store, run_id, ly.name, "saturation_ratio")
                for ly in store.layers(run_id) if ly.family == "bounded"}
    over = {name for name, v in expected.items() if v > th.SATURATION_RATIO}
    assert set(sat.evidence.layers) == over and over
    assert sat.evidence.values["worst_ratio"] == pytest.approx(max(expected.values()), rel=1e-5)
    init = found["initialisation"]
    assert init.severity == "info"  # on its own: information; the saturation names it as its cause
    assert all(c["verdict"] == "too_large" for c in store.run_summary(run_id).init_check
               if c["layer"] in init.evidence.layers)
    assert sat.causes[0].startswith("weights initialised too large") and "Glorot expects" in sat.causes[0]
    assert "vanishing_gradients" not in found


def test_high_lr_rnn_explodes_to_nonfinite(store):
    run_id = store.resolve_run("demo-rnn-high-lr")
    found = _findings(store, "demo-rnn-high-lr")
    first_event = min(e.step for e in store.events(run_id, kind="nonfinite"))
    assert found["nonfinite_gradients"].evidence.steps == (first_event,)
    assert found["nonfinite_gradients"].evidence.layers == ("rnn",)
    exploding = found["exploding_gradients"]
    assert exploding.severity == "error"
    norms = store.run_series(run_id, "grad_norm_total").values
    finite = norms[np.isfinite(norms)]
    assert exploding.evidence.values["max_norm"] == pytest.approx(finite.max())
    assert any("LSTM or GRU" in r for r in exploding.remedies)
    steps, loss = store.run_series(run_id, "loss")
    values = found["nonfinite_loss"].evidence.values  # every stored NaN/Inf step counted
    assert values["nonfinite_steps"] == np.count_nonzero(~np.isfinite(loss)) > 0
    assert values["nan_steps"] == np.count_nonzero(np.isnan(loss))
    assert values["first_step"] == steps[~np.isfinite(loss)][0]
    assert found["nonfinite_loss"].causes[0].startswith("the run diverged")  # not a bad batch


def test_clipped_rnn_reports_its_clip_rate_and_a_threshold(store):
    run_id = store.resolve_run("demo-rnn-high-lr-clipped")
    found = _findings(store, "demo-rnn-high-lr-clipped")
    coef = store.run_series(run_id, "clip_coef").values
    clip = found["clipping_rate"]
    assert clip.evidence.values["clip_rate"] == pytest.approx(np.mean(coef < 1 - 1e-6))
    norms = store.run_series(run_id, "grad_norm_total").values
    assert np.percentile(norms, 50) < clip.evidence.values["suggested_clip"] <= norms.max()
    assert "nonfinite_gradients" not in found
    if "exploding_gradients" in found:  # spikes, if any, were all bounded by the clipping
        assert found["exploding_gradients"].severity == "info"


def test_loaded_layer_matrices_follow_the_layer_table(store):
    run_id = store.resolve_run("demo-sigmoid-default-init")
    data = load_run_data(store, run_id)
    flow = data.layer["act_grad_norm"]
    assert flow.values.shape == (len(store.layers(run_id)), len(flow.steps))
    steps, values = store.layer_history(run_id, data.layers[3].name, "act_grad_norm")
    np.testing.assert_array_equal(flow.values[3, np.searchsorted(flow.steps, steps)], values)
    sat = data.layer["saturation_ratio"]
    linear_rows = [i for i, ly in enumerate(data.layers) if ly.type == "Linear"]
    assert np.isnan(sat.values[linear_rows]).all()
