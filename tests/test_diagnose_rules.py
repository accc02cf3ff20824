"""Diagnosis rules on arrays made by plain numpy computations (no agent, no store).

Every finding made here is also checked for how it reads (tests/fixtures/findings_text.py).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from gradwatch.diagnose import LayerInfo, RunData, Series, find_loss_spikes, find_spikes, suggest_clip_threshold
from gradwatch.diagnose import diagnose as _diagnose
from gradwatch.diagnose import thresholds as th
from gradwatch.diagnose.load import layer_matrix
from gradwatch.diagnose.loss import loss_spike
from gradwatch.diagnose.rundata import in_sorted, nanmedian
from gradwatch.diagnose.spikes import loss_stats, rolling_stats
from gradwatch.diagnose.nonfinite import (
    nonfinite_activations,
    nonfinite_gradients,
    nonfinite_loss,
    ranges_text,
    step_ranges,
)
from tests.fixtures.findings_text import check_text


def diagnose(data: RunData):
    """Every rule over `data`, each finding checked for how it reads."""
    findings = _diagnose(data)
    for f in findings:
        check_text(f)
    return findings


def _mlp_stats(depth: int, width: int, weight_std: float, steps: int = 20, seed: int = 0):
    """Forward/backward a deep sigmoid MLP in numpy: per layer |dL/d(pre-activation)| and saturation."""
    rng = np.random.default_rng(seed)
    weights = [rng.normal(0, weight_std, (width, width)) for _ in range(depth)]
    flow = np.zeros((depth, steps))
    sat = np.zeros((depth, steps))
    for t in range(steps):
        h = rng.normal(0, 1, (32, width))
        outs = []
        for w in weights:
            h = 1 / (1 + np.exp(-(h @ w)))
            outs.append(h)
        g = np.ones_like(h)  # dL/d(last output)
        for i in reversed(range(depth)):
            y = outs[i]
            g_pre = g * y * (1 - y)
            flow[i, t] = np.linalg.norm(g_pre)
            sat[i, t] = np.mean((y < 0.01) | (y > 0.99))
            g = g_pre @ weights[i].T
    return flow, sat


def _sigmoid_run(weight_std: float, depth: int = 8, width: int = 64) -> RunData:
    flow, sat = _mlp_stats(depth, width, weight_std)
    steps = np.arange(flow.shape[1]) * 10
    layers = tuple(LayerInfo(i, f"layers.{i}", "Sigmoid", "activation", "bounded") for i in range(depth))
    return RunData("r1", "sigmoid", layers, layer={"act_grad_norm": Series(steps, flow),
                                                   "saturation_ratio": Series(steps, sat)})


def _norm_run(norms: np.ndarray, clip: dict | None = None, clipped: np.ndarray | None = None) -> RunData:
    steps = np.arange(len(norms))
    run = {"grad_norm_total": Series(steps, norms)}
    if clipped is not None:
        run["grad_norm_total_clipped"] = Series(steps, clipped)
        run["clip_coef"] = Series(steps, clipped / norms)
    return RunData("r2", "norms", (LayerInfo(0, "fc", "Linear", "param"),), run=run,
                   config={"clip": clip} if clip else {})


def _ids(findings) -> list[str]:
    return [f.id for f in findings]


def test_small_init_sigmoid_chain_vanishes():
    data = _sigmoid_run(weight_std=1 / np.sqrt(3 * 64))  # PyTorch's default Linear init scale
    findings = diagnose(data)
    assert _ids(findings) == ["vanishing_gradients"]
    f = findings[0]
    flow = np.median(data.layer["act_grad_norm"].window().values, axis=1)
    assert f.evidence.values["flow_ratio"] == pytest.approx(flow[0] / flow[-1])
    assert f.evidence.values["flow_ratio"] < th.VANISHING_RATIO
    assert "layers.0" in f.evidence.layers
    assert any("Glorot" in r for r in f.remedies) and any("residual" in r for r in f.remedies)


def test_large_init_sigmoid_chain_saturates():
    data = _sigmoid_run(weight_std=1.0, width=256)
    findings = {f.id: f for f in diagnose(data)}
    assert "saturation" in findings
    sat = np.median(data.layer["saturation_ratio"].window().values, axis=1)
    f = findings["saturation"]
    assert f.evidence.values["worst_ratio"] == pytest.approx(sat.max())
    assert set(f.evidence.layers) == {f"layers.{i}" for i in np.flatnonzero(sat > th.SATURATION_RATIO)}


def test_glorot_sigmoid_chain_is_healthy():
    data = _sigmoid_run(weight_std=np.sqrt(2 / (64 + 64)), depth=3)
    assert diagnose(data) == []


def _noisy_norms(n: int, seed: int = 0) -> np.ndarray:
    return np.exp(np.random.default_rng(seed).normal(0.0, 0.3, n))


def test_spikes_found_against_the_local_median():
    norms = _noisy_norms(200)
    norms[[50, 120]] *= 40
    idx, factors = find_spikes(norms)
    assert idx.tolist() == [50, 120]
    assert factors[0] == pytest.approx(norms[50] / np.median(norms[25:50]))


def test_steadily_decreasing_norms_are_not_spikes():
    norms = np.geomspace(50, 0.5, 300) * _noisy_norms(300)
    assert diagnose(_norm_run(norms)) == []


def test_growing_norms_with_nan_are_exploding_and_nonfinite():
    norms = np.concatenate([_noisy_norms(40), np.geomspace(2, 1e12, 20), [np.inf, np.nan, np.nan]])
    findings = {f.id: f for f in diagnose(_norm_run(norms))}
    assert findings["exploding_gradients"].severity == "error"
    assert findings["exploding_gradients"].evidence.values["growth"] > th.GROWTH_FACTOR
    assert findings["nonfinite_gradients"].evidence.steps == (60,)
    suggested = findings["exploding_gradients"].evidence.values["suggested_clip"]
    assert suggested == pytest.approx(np.percentile(norms[:40], th.CLIP_PERCENTILE), rel=0.3)


def test_spikes_bounded_by_clipping_are_info():
    norms = _noisy_norms(200)
    norms[[80, 150]] *= 30
    clipped = np.minimum(norms, 3.0)
    findings = diagnose(_norm_run(norms, {"mode": "norm", "max_norm": 3.0}, clipped))
    assert [(f.id, f.severity) for f in findings] == [("exploding_gradients", "info")]


def test_tight_clipping_suggests_a_threshold_from_the_norms():
    norms = _noisy_norms(200) * 5
    clipped = np.minimum(norms, 1.0)
    findings = diagnose(_norm_run(norms, {"mode": "norm", "max_norm": 1.0}, clipped))
    assert _ids(findings) == ["clipping_rate"]
    values = findings[0].evidence.values
    assert values["clip_rate"] == pytest.approx(np.mean(norms > 1.0))
    assert values["suggested_clip"] == pytest.approx(np.percentile(norms, th.CLIP_PERCENTILE))


def test_suggestion_needs_enough_norms():
    assert suggest_clip_threshold(np.array([1.0, 2.0, np.nan])) is None


def test_dead_relu_layers():
    steps = np.arange(10)
    dead = np.vstack([np.full(10, 0.02), np.linspace(0.1, 0.9, 10)])
    layers = (LayerInfo(0, "relu1", "ReLU", "activation", "relu"), LayerInfo(1, "relu2", "ReLU", "activation", "relu"))
    findings = diagnose(RunData("r", "dead", layers, layer={"dead_ratio": Series(steps, dead)}))
    assert _ids(findings) == ["dying_units"]
    assert findings[0].evidence.layers == ("relu2",)
    assert findings[0].evidence.values["worst_ratio"] == pytest.approx(np.median(dead[1, 5:]))


def test_init_verdicts_from_the_header():
    layers = (LayerInfo(0, "fc1", "Linear", "param"), LayerInfo(1, "act", "Sigmoid", "activation", "bounded"))
    check = ({"layer": 0, "param": "fc1.weight", "std": 1.0, "activation": "Sigmoid", "recommended": "glorot",
              "expected": {"glorot": 0.125, "he": 0.177, "lecun": 0.125}, "ratio": 8.0, "verdict": "too_large"},)
    findings = diagnose(RunData("r", "init", layers, init_check=check))
    assert [(f.id, f.severity) for f in findings] == [("initialisation", "info")]  # on its own: information
    assert findings[0].evidence.layers == ("fc1",)
    assert findings[0].evidence.values["value"] == 8.0 and findings[0].evidence.values["threshold"] == 1.5
    assert "xavier_normal_" in findings[0].remedies[0]


def test_findings_serialise_with_stable_keys():
    finding = diagnose(_sigmoid_run(weight_std=1 / np.sqrt(3 * 64)))[0]
    out = finding.to_json()
    assert set(out) == {"id", "severity", "title", "evidence", "causes", "remedies"}
    assert set(out["evidence"]) == {"summary", "values", "layers", "steps"}


def test_series_at_lines_up_steps_with_gaps():
    s = Series(np.array([0, 1, 3, 4]), np.array([10.0, 11.0, 13.0, 14.0]))
    np.testing.assert_array_equal(s.at(np.array([1, 2, 4, 9])), [11.0, np.nan, 14.0, np.nan])


def test_clipped_spikes_judged_on_matching_steps_when_a_step_is_missing():
    norms = _noisy_norms(200)
    norms[[80, 150]] *= 30
    data = _norm_run(norms, {"mode": "norm", "max_norm": 3.0}, np.minimum(norms, 3.0))
    post = data.run["grad_norm_total_clipped"]
    keep = post.steps != 40  # a step the clipped series lacks (NaN is not stored)
    data.run["grad_norm_total_clipped"] = Series(post.steps[keep], post.values[keep])
    assert [(f.id, f.severity) for f in diagnose(data)] == [("exploding_gradients", "info")]


# ---------------------------------------------------------------- NaN and Inf

def test_step_ranges_group_consecutive_rows():
    steps = np.array([0, 10, 20, 30, 40, 50, 60])
    bad = np.array([False, True, True, False, True, False, True])
    assert step_ranges(steps, bad) == [(10, 20), (40, 40), (60, 60)]
    assert ranges_text(step_ranges(steps, bad)) == "10-20, 40, 60"
    assert ranges_text([(i, i) for i in range(0, 20, 2)], shown=3) == "0, 2, 4, and 7 more"


def _explosion(steps: int = 100) -> RunData:
    """The explosion of the issue: at step 41 fc3's norm overflows float32 with every element
    finite; from step 42 fc1 and fc2 hold NaN elements (17 steps, then skipped back to health)."""
    s = np.arange(steps)
    overflow = (s == 41).astype(float)
    elements = ((s >= 42) & (s <= 58)) * 2.0
    norms = np.where(s == 41, np.inf, np.where(elements > 0, np.nan, 1.0))
    layers = tuple(LayerInfo(i, f"fc{i + 1}", "Linear", "param") for i in range(3))
    events = ({"kind": "overflow", "step": 41, "data": {"params": ["fc3.weight"], "layers": ["fc3"], "count": 1}},
              {"kind": "nonfinite", "step": 42, "data": {"params": ["fc1.weight", "fc2.weight"],
                                                         "layers": ["fc1", "fc2"], "count": 2}},
              {"kind": "nonfinite", "step": 50, "data": {"params": ["fc3.weight"], "layers": ["fc3"], "count": 1}})
    return RunData("r", "explosion", layers, events=events,
                   run={"grad_norm_total": Series(s, norms), "nonfinite_params": Series(s, elements),
                        "overflow_params": Series(s, overflow)})


def test_an_overflowed_norm_is_told_from_nan_elements():
    (f,) = nonfinite_gradients(_explosion())
    check_text(f)
    assert f.evidence.summary == (
        "first failure at step 41",
        "norm overflowed float32 at step 41 in layer fc3 (elements still finite), on 1 step: 41",
        "NaN/Inf gradient elements from step 42 in layers fc1, fc2, on 17 steps: 42-58",
        "total gradient norm NaN on 17 steps, +Inf on 1 step")
    assert f.evidence.values == {"value": 18.0, "first_overflow_step": 41.0, "overflow_steps": 1.0,
                                 "first_nonfinite_step": 42.0, "nonfinite_steps": 17.0, "first_step": 41.0,
                                 "events": 3.0}
    assert f.evidence.layers == ("fc3", "fc1", "fc2") and f.evidence.steps == (41, 42)
    assert "float32's range" in f.causes[0]  # the overflow came first: named as the first cause


def test_an_overflow_alone_has_its_own_title():
    data = _explosion()
    data.run["nonfinite_params"] = Series(data.run["nonfinite_params"].steps, np.zeros(100))
    data.run["grad_norm_total"] = Series(np.arange(100), np.where(np.arange(100) == 41, np.inf, 1.0))
    data.events = data.events[:1]
    (f,) = nonfinite_gradients(data)
    check_text(f)
    assert f.title == "Gradient norm overflowed float32 (elements finite)"
    assert "first_nonfinite_step" not in f.evidence.values and f.evidence.values["overflow_steps"] == 1


def test_a_total_norm_that_overflows_alone_counts_as_overflow():
    """Runs without `overflow_params`: a +Inf total where no param held a NaN/Inf element."""
    s = np.arange(10)
    data = RunData("r", "total", (LayerInfo(0, "fc", "Linear", "param"),),
                   run={"grad_norm_total": Series(s, np.where(s == 4, np.inf, 1.0)),
                        "nonfinite_params": Series(s, np.zeros(10))})
    (f,) = nonfinite_gradients(data)
    check_text(f)
    assert f.evidence.values["first_overflow_step"] == 4 and f.evidence.values["overflow_steps"] == 1


def test_nonfinite_loss_counts_every_kind_with_its_ranges():
    s = np.arange(0, 200, 2)  # logged every other step
    loss = np.linspace(3, 1, 100)
    loss[[10, 11, 12]] = np.inf
    loss[30:47] = np.nan
    loss[60] = -np.inf
    (f,) = nonfinite_loss(RunData("r", "loss", (), run={"loss": Series(s, loss)}))
    check_text(f)
    assert f.evidence.summary == ("first non-finite loss at step 20", "loss NaN on 17 steps: 60-92",
                                  "loss +Inf on 3 steps: 20-24", "loss -Inf on 1 step: 120",
                                  "finite again from step 122")
    assert f.evidence.values == {"value": 21.0, "first_step": 20.0, "nonfinite_steps": 21.0, "logged_steps": 100.0,
                                 "nan_steps": 17.0, "posinf_steps": 3.0, "neginf_steps": 1.0}


def test_a_loss_still_nan_at_the_end():
    loss = np.r_[np.ones(53), np.full(7, np.nan)]
    (f,) = nonfinite_loss(RunData("r", "loss", (), run={"loss": Series(np.arange(60), loss)}))
    check_text(f)
    assert f.evidence.summary[-1] == "still non-finite at the last logged step 59"


def test_nonfinite_activations_name_the_first_layer_and_step():
    steps = np.arange(0, 100, 10)
    layers = (LayerInfo(0, "fc", "Linear", "param"), LayerInfo(1, "act1", "ReLU", "activation", "relu"),
              LayerInfo(2, "act2", "Tanh", "activation", "bounded"))
    counts = layer_matrix({1: (steps, np.where(steps >= 60, 16.0, 0.0)),
                           2: (steps, np.where((steps >= 50) & (steps < 80), 4.0, 0.0))}, 3)
    (f,) = nonfinite_activations(RunData("r", "acts", layers, layer={"act_nonfinite": counts}))
    check_text(f)
    assert f.evidence.summary == ("NaN/Inf activation outputs from step 50, first in layer act2 (Tanh, 4 outputs)",
                                  "2 layers with NaN/Inf outputs on 5 measured steps: 50-90",
                                  "by layer: act2 from step 50, act1 from step 60")
    assert f.evidence.layers == ("act2", "act1") and f.evidence.values["max_outputs"] == 16


def test_clean_runs_have_no_nonfinite_findings():
    s = np.arange(10)
    layers = (LayerInfo(0, "act", "ReLU", "activation", "relu"),)
    data = RunData("r", "clean", layers, run={"loss": Series(s, np.ones(10)), "grad_norm_total": Series(s, np.ones(10)),
                                              "nonfinite_params": Series(s, np.zeros(10)),
                                              "overflow_params": Series(s, np.zeros(10))},
                   layer={"act_nonfinite": layer_matrix({0: (s, np.zeros(10))}, 1)})
    assert nonfinite_gradients(data) == nonfinite_loss(data) == nonfinite_activations(data) == []


def test_layer_matrix_keeps_nan_values_apart_from_gaps():
    m = layer_matrix({0: (np.array([0, 2]), np.array([np.nan, 1.0])), 1: (np.array([1]), np.array([2.0]))}, 3)
    assert m.steps.tolist() == [0, 1, 2]
    assert m.present.tolist() == [[True, False, True], [False, True, False], [False, False, False]]
    assert np.isnan(m.values[0, 0]) and m.present[0, 0]  # a measured NaN
    assert m.window(0.5).present.tolist() == [[False, True], [True, False], [False, False]]


# ---------------------------------------------------------------- how findings read

def test_counts_and_ranges_are_spelled_by_one_helper():
    from gradwatch.diagnose.text import listing, plural, span

    assert [plural(n, "spike") for n in (0, 1, 2)] == ["0 spikes", "1 spike", "2 spikes"]
    assert span(10, 10) == "step 10" and span(10, 20) == "steps 10-20"
    assert listing(list("abcdefg")) == "a, b, c, d, e and 2 more" and listing(["a"]) == "a"


def test_a_window_of_one_step_reads_as_one_step():
    """Old main: 'median over steps 10-10'."""
    flow, _ = _mlp_stats(8, 64, 1 / np.sqrt(3 * 64), steps=1)
    layers = tuple(LayerInfo(i, f"layers.{i}", "Sigmoid", "activation", "bounded") for i in range(8))
    (f,) = diagnose(RunData("r", "one", layers, layer={"act_grad_norm": Series(np.array([10]), flow)}))
    assert f.evidence.summary[0].endswith("median over step 10")


def test_one_spike_is_one_spike():
    """Old main: '1 spikes above 10 x the median'."""
    norms = _noisy_norms(100)
    norms[60] *= 40
    (f,) = diagnose(_norm_run(norms))
    assert "1 spike above 10 x the median of the previous 25 steps" in f.evidence.summary[1]
    assert f.evidence.summary[1].endswith("at step 60")


def test_seven_saturated_layers_are_all_counted():
    """Old main: '7 bounded layers' and a list of 6."""
    steps = np.arange(10)
    layers = tuple(LayerInfo(i, f"act{i}", "Tanh", "activation", "bounded") for i in range(7))
    (f,) = diagnose(RunData("r", "sat", layers, layer={"saturation_ratio": Series(steps, np.full((7, 10), 0.7))}))
    assert f.evidence.summary[0].startswith("7 bounded layers")
    assert f.evidence.summary[1] == "saturated: act0 70%, act1 70%, act2 70%, act3 70%, act4 70% and 2 more"


# ---------------------------------------------------------------- initialisation

def _init_entry(layer: str, activation: str | None, std: float, fan_in: int, fan_out: int) -> dict:
    expected = {"glorot": np.sqrt(2 / (fan_in + fan_out)), "he": np.sqrt(2 / fan_in), "lecun": np.sqrt(1 / fan_in)}
    scheme = "he" if activation == "ReLU" else "glorot"
    ratio = std / expected[scheme]
    verdict = "too_small" if ratio < 1 / 1.5 else "too_large" if ratio > 1.5 else "ok"
    return {"layer": layer, "param": f"{layer}.weight", "fan_in": fan_in, "fan_out": fan_out, "std": std,
            "activation": activation, "recommended": scheme, "expected": expected, "ratio": ratio, "verdict": verdict}


def test_pytorch_default_init_on_its_own_is_information():
    """Old main: a warning for every model left on PyTorch's default init, so --strict failed CI."""
    layers = tuple(LayerInfo(i, f"fc{i}", "Linear", "param") for i in range(3))
    check = tuple(_init_entry(f"fc{i}", "ReLU", 1 / np.sqrt(3 * 64), 64, 64) for i in range(3))
    (f,) = diagnose(RunData("r", "default", layers, init_check=check))
    assert (f.id, f.severity) == ("initialisation", "info")
    assert f.evidence.summary[0].endswith("(all on PyTorch's default init)")
    assert f.evidence.summary[1] == "fc0.weight: std 0.0722 before ReLU; He expects 0.177 (x0.408, PyTorch's default)"


def test_a_consequence_names_the_init_with_its_numbers():
    data = _sigmoid_run(weight_std=1 / np.sqrt(3 * 64))
    data.init_check = tuple(_init_entry(f"layers.{i}", "Sigmoid", 1 / np.sqrt(3 * 64), 64, 64) for i in range(8))
    found = {f.id: f for f in diagnose(data)}
    assert found["initialisation"].severity == "info"
    cause = found["vanishing_gradients"].causes[0]
    assert cause.startswith("weights initialised too small for the activation that follows")
    assert "layers.0.weight: std 0.0722 before Sigmoid; Glorot expects 0.125 (x0.577, PyTorch's default)" in cause
    assert cause.endswith("and 6 more weights")


# ---------------------------------------------------------------- exploding, from the first step

def _with_params(data: RunData, param_norm: float) -> RunData:
    """The run with a total parameter norm measured every 10 steps."""
    steps = data.run["grad_norm_total"].steps
    data.run["param_norm_total"] = Series(steps[::10], np.full(len(steps[::10]), param_norm))
    return data


def test_an_early_spike_is_found():
    """Old main: no spike was considered before step 10 (SPIKE_MIN_HISTORY)."""
    norms = _noisy_norms(60)
    norms[4] *= 50
    idx, _ = find_spikes(norms)
    assert idx.tolist() == [4]
    (f,) = diagnose(_norm_run(norms))
    assert f.id == "exploding_gradients" and f.evidence.steps == (4,)


def test_norms_far_above_the_parameters_explode_from_the_first_step():
    """Old main: a norm at 1e5 from step 0 neither grows nor spikes, so nothing was found."""
    norms = 1e5 * _noisy_norms(6)
    (f,) = diagnose(_with_params(_norm_run(norms), 10.0))
    assert (f.id, f.severity, f.title) == ("exploding_gradients", "error", "Exploding gradients")
    assert f.evidence.values["value"] == pytest.approx(norms.max() / 10.0)
    assert f.evidence.values["threshold"] == th.GRAD_PARAM_RATIO
    assert f.evidence.steps[0] == 0 and "on 6 steps: 0-5" in f.evidence.summary[1]
    assert "'max_norm': 1.0" in f.remedies[0]  # not a threshold made of exploded norms


def test_healthy_norms_against_their_parameters_are_not_exploding():
    assert diagnose(_with_params(_norm_run(_noisy_norms(200)), 10.0)) == []


def test_a_run_clipped_by_orders_of_magnitude_is_an_explosion():
    """Old main: only 'clipping on most steps', remedy 'raise the threshold to about 4.28e+05'."""
    norms = 10 ** np.random.default_rng(0).uniform(5, 6, 100)
    clipped = np.ones(100)
    layers = (LayerInfo(0, "rnn", "RNN", "param", "bounded"), LayerInfo(1, "head", "Linear", "param"))
    data = RunData("r", "rnn", layers, config={"clip": {"mode": "norm", "max_norm": 1.0}},
                   run={"grad_norm_total": Series(np.arange(100), norms),
                        "grad_norm_total_clipped": Series(np.arange(100), clipped),
                        "clip_coef": Series(np.arange(100), clipped / norms)})
    (f,) = diagnose(data)
    assert (f.id, f.severity, f.title) == ("exploding_gradients", "error", "Exploding gradients, held down by clipping")
    assert f.evidence.values["value"] == pytest.approx(np.median(norms))
    assert f.evidence.values["threshold"] == th.CLIP_EXPLOSION_FACTOR
    assert f.remedies[0].startswith("keep the clipping at 1: ")
    assert not any("raise" in r for r in f.remedies) and "suggested_clip" not in f.evidence.values
    assert any("LSTM or GRU" in r for r in f.remedies)


def test_growth_that_the_lr_schedule_explains_is_not_an_explosion():
    """Normalised layers with weight decay settle at |g|/|w| ~ sqrt(2 wd / lr) (Defazio 2025): as the
    schedule takes the LR down by 1e6, the norm rises ~1000x. Old main called it exploding."""
    n = 400
    steps = np.arange(n)
    lr = np.geomspace(1e-3, 1e-9, n)
    norms = 0.5 * np.sqrt(lr[0] / lr) * _noisy_norms(n)
    data = _norm_run(norms)
    assert np.median(norms[-100:]) / np.median(norms[:100]) > th.GROWTH_FACTOR
    data.group["lr"] = Series(steps, lr[None, :], np.ones((1, n), dtype=bool))
    assert diagnose(data) == []
    data.group["lr"] = Series(steps, np.full((1, n), 1e-3), np.ones((1, n), dtype=bool))
    (f,) = diagnose(data)  # the same growth under a constant LR
    assert (f.id, f.severity) == ("exploding_gradients", "error")
    assert f.evidence.values["value"] == pytest.approx(f.evidence.values["growth"])
    assert f.evidence.values["value"] > th.GROWTH_FACTOR


def test_growth_beyond_what_the_lr_explains_is_still_an_explosion():
    n = 400
    steps = np.arange(n)
    lr = np.geomspace(1e-3, 1e-5, n)  # explains at most sqrt(100) = 10x
    data = _norm_run(np.geomspace(1, 1e5, n) * _noisy_norms(n))
    data.group["lr"] = Series(steps, lr[None, :], np.ones((1, n), dtype=bool))
    (f,) = diagnose(data)
    q = n // 4
    assert f.evidence.values["lr_explained_growth"] == pytest.approx(np.sqrt(np.median(lr[:q]) / np.median(lr[-q:])))
    assert "beyond the x5.65 that the learning-rate decay explains" in f.evidence.summary[1]


# ---------------------------------------------------------------- loss spikes

def _loss_run(loss: np.ndarray, norms: np.ndarray | None = None) -> RunData:
    steps = np.arange(len(loss))
    run = {"loss": Series(steps, loss)}
    if norms is not None:
        run["grad_norm_total"] = Series(steps, norms)
    return RunData("r", "loss", (LayerInfo(0, "fc", "Linear", "param"),), run=run)


def _falling_loss(n: int = 120, seed: int = 1) -> np.ndarray:
    return np.geomspace(2.0, 0.5, n) * np.exp(np.random.default_rng(seed).normal(0, 0.05, n))


def test_a_corrupt_batch_is_a_loss_spike_not_an_explosion():
    """Old main: 'Exploding gradients' with 'learning rate too high' as the only cause."""
    loss, norms = _falling_loss(), _noisy_norms(120)
    loss[70] *= 25
    norms[70] *= 80
    (f,) = diagnose(_loss_run(loss, norms))
    assert (f.id, f.severity) == ("loss_spike", "warning")
    assert f.evidence.summary[0].startswith(f"loss spike at step 70: {loss[70]:.3g}, x")
    assert "with a gradient spike at step 70" in f.evidence.summary[0]
    assert f.evidence.summary[1].startswith("back under the limit from before the spike (")
    assert f.evidence.summary[1].endswith(") at the next logged step, 71")
    assert f.causes[0].startswith("a bad batch") and f.remedies[0].startswith("look at the batch of step 70")
    assert f.evidence.values["value"] == loss[70] > f.evidence.values["threshold"]


def test_a_loss_spike_without_a_gradient_spike():
    loss = _falling_loss()
    loss[50] *= 10
    (f,) = diagnose(_loss_run(loss, _noisy_norms(120)))
    assert "without a gradient spike at step 50" in f.evidence.summary[0]


def test_a_loss_that_jumps_and_stays_up_is_an_overshoot():
    loss = _falling_loss()
    loss[80:] *= 8
    (f,) = diagnose(_loss_run(loss))
    assert f.severity == "error"  # still above its limit to the last step
    assert f.evidence.summary[0].startswith("loss spike at steps 80-")
    assert f.evidence.summary[1].endswith("at the last logged step 119")
    assert f.evidence.summary[1].startswith("still above the limit from before the spike")
    assert f.causes[0].startswith("the update overshot")


def test_noisy_and_falling_losses_have_no_spike():
    assert diagnose(_loss_run(_falling_loss())) == []
    noisy = 0.3 * np.exp(np.random.default_rng(2).normal(0, 0.15, 300))  # batch-to-batch noise of +-15%
    assert diagnose(_loss_run(noisy)) == []


# ---------------------------------------------------------------- windows

def test_rules_read_a_window_that_does_not_start_at_step_0():
    norms = _noisy_norms(60)
    norms[30] *= 40
    loss = _falling_loss(60)
    loss[45] *= 20
    late = RunData("r", "late", (LayerInfo(0, "fc", "Linear", "param"),),
                   run={"grad_norm_total": Series(np.arange(60) + 10_000, norms),
                        "loss": Series(np.arange(60) + 10_000, loss)})
    found = {f.id: f for f in diagnose(late)}
    assert found["exploding_gradients"].evidence.steps == (10_030,)
    assert found["loss_spike"].evidence.steps == (10_045,)


# ---------------------------------------------------------------- the contract with the alerts engine

def test_every_finding_has_its_value_and_threshold():
    norms = _noisy_norms(100)
    norms[60] *= 40
    cases = [_sigmoid_run(1 / np.sqrt(3 * 64)), _sigmoid_run(1.0, width=256), _norm_run(norms), _explosion(),
             _norm_run(_noisy_norms(200) * 5, {"mode": "norm", "max_norm": 1.0}, np.minimum(_noisy_norms(200) * 5, 1))]
    loss = _falling_loss()
    loss[70] *= 25
    cases.append(_loss_run(loss))
    cases.append(RunData("r", "dead", (LayerInfo(0, "relu", "ReLU", "activation", "relu"),),
                         layer={"dead_ratio": Series(np.arange(10), np.full((1, 10), 0.8))}))
    findings = {f.id: f for data in cases for f in diagnose(data)}
    assert set(findings) >= {"vanishing_gradients", "saturation", "exploding_gradients", "nonfinite_gradients",
                             "clipping_rate", "loss_spike", "dying_units"}
    no_threshold = {"nonfinite_gradients", "nonfinite_loss", "nonfinite_activations"}
    for f in findings.values():
        assert np.isfinite(f.evidence.values["value"]), f.id
        assert ("threshold" in f.evidence.values) == (f.id not in no_threshold), f.id


# ---------------------------------------------------------------- what the live engine relies on

def _nan_equal(a, b) -> bool:
    return type(a) is type(b) and np.asarray(a).dtype == np.asarray(b).dtype and np.array_equal(a, b, equal_nan=True)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_nanmedian_gives_numpys_numbers(dtype):
    """The sort-based median the rules use: NumPy's `nanmedian`, value for value, NaN and ±Inf
    included, along every axis (NumPy's own warnings on all-NaN slices left out)."""
    rng = np.random.default_rng(0)
    for _ in range(400):
        shape = tuple(int(k) for k in rng.integers(0, 7, size=rng.integers(1, 4)))
        a = (rng.normal(size=shape) * rng.choice([1.0, 1e30])).astype(dtype)
        if rng.random() < 0.3:
            a = np.round(a)  # ties
        u = rng.random(shape)
        a[u < 0.3], a[u > 0.9], a[u > 0.95] = np.nan, np.inf, -np.inf
        for axis in (None, *range(len(shape))):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                want = np.nanmedian(a, axis=axis)
            assert _nan_equal(nanmedian(a, axis=axis), want), (shape, axis)
    big = np.full((2, 3), np.finfo(dtype).max, dtype=dtype)  # NumPy's (x + x) / 2 along a short axis overflows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert _nan_equal(nanmedian(big, axis=1), np.nanmedian(big, axis=1))
        assert _nan_equal(nanmedian(big[0]), np.nanmedian(big[0]))


def test_in_sorted_is_isin():
    rng = np.random.default_rng(1)
    for _ in range(500):
        values = rng.integers(0, 30, rng.integers(0, 20))
        members = np.unique(rng.integers(0, 30, rng.integers(0, 10)))
        np.testing.assert_array_equal(in_sorted(values, members), np.isin(values, members))


def test_rolling_results_carried_through_a_moving_window_are_the_ones_computed_afresh():
    """What `Series.rolling` keeps as a window appends and drops steps equals computing it on the
    window from scratch, from the first position or from a later one."""
    rng = np.random.default_rng(2)
    values = rng.lognormal(0, 0.3, 400)
    values[rng.random(400) < 0.05] = np.nan
    calls = []

    def stats(v, positions):
        calls.append(len(positions))
        return rolling_stats(v, 25, positions, noise=True)

    for first in (0, 25):
        window = Series(np.arange(0), np.zeros(0))
        end = 0
        while end < 400:
            step = int(rng.integers(1, 9))
            window = window.then(Series(np.arange(end, min(end + step, 400)), values[end:end + step]))
            end = min(end + step, 400)
            window = window.since(end - 120)
            calls.clear()
            kept = window.rolling(("stats", first), 25, stats, first)
            fresh = Series(window.steps, window.values).rolling(("stats", first), 25, stats, first)
            for a, b in zip(kept, fresh):
                np.testing.assert_array_equal(a, b)
            if end > 200:
                assert calls[0] <= step + 25 - first  # only the appended steps, and the start's when judged
    loss = _falling_loss(120)
    loss[70] *= 25
    s = Series(np.arange(120), loss)
    assert [sp.first for sp in find_loss_spikes(s.steps, s.values, loss_stats(s))] == [70]


def test_a_noisy_healthy_loss_has_no_spike_whole_or_in_live_windows():
    """Old main: a loss with +-30% lognormal batch noise spiked about once in 10,000 steps judged
    once, and the live engine, judging each value again on the shrinking history at the start of
    its window, saw one about every 600 steps."""
    steps = np.arange(20_000)
    loss = (1 / np.sqrt(1 + steps / 100)) * np.exp(np.random.default_rng(3).normal(0, 0.3, len(steps)))
    assert find_loss_spikes(steps, loss) == []
    layers = (LayerInfo(0, "fc", "Linear", "param"),)
    for end in range(500, 3_000, 4):
        window = RunData("r", "live", layers, run={"loss": Series(steps[end - 500:end], loss[end - 500:end])},
                         starts_run=False)
        assert loss_spike(window) == [], end


def test_a_window_that_cut_into_the_run_judges_only_values_with_their_whole_look_back():
    loss = _falling_loss(200)
    loss[40] *= 30  # 40 logged values before it in this window; the run had more
    run = {"loss": Series(np.arange(200) + 1_000, loss)}
    layers = (LayerInfo(0, "fc", "Linear", "param"),)
    assert [f.id for f in diagnose(RunData("r", "whole", layers, run=run))] == ["loss_spike"]
    assert diagnose(RunData("r", "live", layers, run=run, starts_run=False)) == []
    later = loss.copy()  # a series is never changed in place: what rules derived from it is kept with it
    later[150] *= 30
    run = {"loss": Series(np.arange(200) + 1_000, later)}
    (f,) = diagnose(RunData("r", "live", layers, run=run, starts_run=False))
    assert f.evidence.steps == (1_150,)
