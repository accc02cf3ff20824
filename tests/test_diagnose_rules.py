"""Diagnosis rules on arrays made by plain numpy computations (no agent, no store)."""

from __future__ import annotations

import numpy as np
import pytest

from gradwatch.diagnose import LayerInfo, RunData, Series, diagnose, find_spikes, suggest_clip_threshold
from gradwatch.diagnose import thresholds as th
from gradwatch.diagnose.load import layer_matrix
from gradwatch.diagnose.nonfinite import (
    nonfinite_activations,
    nonfinite_gradients,
    nonfinite_loss,
    ranges_text,
    step_ranges,
)


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
    assert _ids(findings) == ["initialisation"]
    assert findings[0].evidence.layers == ("fc1",)
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
    assert f.evidence.summary == (
        "first failure at step 41",
        "norm overflowed float32 at step 41 in layers fc3 (elements still finite), on 1 step: 41",
        "NaN/Inf gradient elements from step 42 in layers fc1, fc2, on 17 steps: 42-58",
        "total gradient norm NaN on 17 steps, +Inf on 1 step")
    assert f.evidence.values == {"first_overflow_step": 41.0, "overflow_steps": 1.0, "first_nonfinite_step": 42.0,
                                 "nonfinite_steps": 17.0, "first_step": 41.0, "events": 3.0}
    assert f.evidence.layers == ("fc3", "fc1", "fc2") and f.evidence.steps == (41, 42)
    assert "float32's range" in f.causes[0]  # the overflow came first: named as the first cause


def test_an_overflow_alone_has_its_own_title():
    data = _explosion()
    data.run["nonfinite_params"] = Series(data.run["nonfinite_params"].steps, np.zeros(100))
    data.run["grad_norm_total"] = Series(np.arange(100), np.where(np.arange(100) == 41, np.inf, 1.0))
    data.events = data.events[:1]
    (f,) = nonfinite_gradients(data)
    assert f.title == "Gradient norm overflowed float32 (elements finite)"
    assert "first_nonfinite_step" not in f.evidence.values and f.evidence.values["overflow_steps"] == 1


def test_a_total_norm_that_overflows_alone_counts_as_overflow():
    """Runs without `overflow_params`: a +Inf total where no param held a NaN/Inf element."""
    s = np.arange(10)
    data = RunData("r", "total", (LayerInfo(0, "fc", "Linear", "param"),),
                   run={"grad_norm_total": Series(s, np.where(s == 4, np.inf, 1.0)),
                        "nonfinite_params": Series(s, np.zeros(10))})
    (f,) = nonfinite_gradients(data)
    assert f.evidence.values["first_overflow_step"] == 4 and f.evidence.values["overflow_steps"] == 1


def test_nonfinite_loss_counts_every_kind_with_its_ranges():
    s = np.arange(0, 200, 2)  # logged every other step
    loss = np.linspace(3, 1, 100)
    loss[[10, 11, 12]] = np.inf
    loss[30:47] = np.nan
    loss[60] = -np.inf
    (f,) = nonfinite_loss(RunData("r", "loss", (), run={"loss": Series(s, loss)}))
    assert f.evidence.summary == ("first non-finite loss at step 20", "loss NaN on 17 steps: 60-92",
                                  "loss +Inf on 3 steps: 20-24", "loss -Inf on 1 step: 120",
                                  "finite again from step 122")
    assert f.evidence.values == {"first_step": 20.0, "nonfinite_steps": 21.0, "logged_steps": 100.0,
                                 "nan_steps": 17.0, "posinf_steps": 3.0, "neginf_steps": 1.0}


def test_a_loss_still_nan_at_the_end():
    loss = np.r_[np.ones(53), np.full(7, np.nan)]
    (f,) = nonfinite_loss(RunData("r", "loss", (), run={"loss": Series(np.arange(60), loss)}))
    assert f.evidence.summary[-1] == "still non-finite at the last logged step 59"


def test_nonfinite_activations_name_the_first_layer_and_step():
    steps = np.arange(0, 100, 10)
    layers = (LayerInfo(0, "fc", "Linear", "param"), LayerInfo(1, "act1", "ReLU", "activation", "relu"),
              LayerInfo(2, "act2", "Tanh", "activation", "bounded"))
    counts = layer_matrix({1: (steps, np.where(steps >= 60, 16.0, 0.0)),
                           2: (steps, np.where((steps >= 50) & (steps < 80), 4.0, 0.0))}, 3)
    (f,) = nonfinite_activations(RunData("r", "acts", layers, layer={"act_nonfinite": counts}))
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
