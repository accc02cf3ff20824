"""Diagnosis rules on arrays made by plain numpy computations (no agent, no store)."""

from __future__ import annotations

import numpy as np
import pytest

from gradwatch.diagnose import LayerInfo, RunData, Series, diagnose, find_spikes, suggest_clip_threshold
from gradwatch.diagnose import thresholds as th


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
