"""Plots drawn from arrays: the artists carry the data given, and a run figure saves as PNG."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from gradwatch.diagnose import LayerInfo, RunData, Series
from gradwatch.plots import activation_health_plot, gradient_flow_heatmap, save_run_plot, total_norm_plot


def test_heatmap_masks_unmeasured_and_uses_log_colours():
    ax = Figure().subplots()
    values = np.array([[1e-6, np.nan, 1e-5], [1e-2, 0.0, 1.0]])
    gradient_flow_heatmap(ax, np.array([0, 10, 20]), values, ["a", "b"])
    image = ax.get_images()[0]
    data = image.get_array()
    assert data.mask.tolist() == [[False, True, False], [False, True, False]]
    assert image.norm.vmin == pytest.approx(1e-6) and image.norm.vmax == pytest.approx(1.0)
    assert type(image.norm).__name__ == "LogNorm"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]


def test_total_norm_marks_clipped_steps_and_threshold():
    ax = Figure().subplots()
    steps = np.arange(6)
    before = np.array([0.5, 2.0, 0.7, 3.0, np.inf, 0.4])
    after = np.minimum(before, 1.0)
    clipped = before > 1.0
    total_norm_plot(ax, steps, before, after, 1.0, clipped)
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_array_equal(lines["before clipping"].get_ydata(), before)
    np.testing.assert_array_equal(lines["threshold"].get_ydata(), np.ones(6))
    offsets = ax.collections[0].get_offsets()
    assert offsets[:, 0].tolist() == [1, 3]
    assert ax.get_yscale() == "log"
    assert "non-finite" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_activation_health_bars():
    ax = Figure().subplots()
    activation_health_plot(ax, ["s1", "r1"], np.array([0.7, np.nan]), np.array([np.nan, 0.2]))
    widths = [p.get_width() for p in ax.patches]
    assert widths == [0.7, 0.0, 0.0, 0.2]


def test_run_figure_saves_a_png(tmp_path):
    steps = np.arange(0, 100, 10)
    layers = tuple(LayerInfo(i, f"l{i}", "Sigmoid", "activation", "bounded") for i in range(3))
    flow = np.vstack([np.geomspace(1e-6, 1e-5, 10), np.geomspace(1e-3, 1e-2, 10), np.ones(10)])
    norms = np.linspace(1, 5, 100)
    data = RunData("abcdef123456", "demo", layers,
                   run={"grad_norm_total": Series(np.arange(100), norms),
                        "grad_norm_total_clipped": Series(np.arange(100), np.minimum(norms, 2)),
                        "clip_coef": Series(np.arange(100), np.minimum(1, 2 / norms))},
                   layer={"act_grad_norm": Series(steps, flow), "saturation_ratio": Series(steps, flow * 0.5)},
                   config={"clip": {"mode": "norm", "max_norm": 2.0}})
    out = save_run_plot(data, tmp_path / "run.png")
    image = imread(out)
    assert image.shape[0] > 500 and image.shape[1] > 500
