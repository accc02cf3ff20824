"""Plots drawn from arrays: the artists carry the data given, and a run figure saves as PNG."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from gradwatch.diagnose import LayerInfo, RunData, Series
from gradwatch.diagnose.load import layer_matrix
from gradwatch.plots import (
    BAND_LABEL,
    activation_health_plot,
    gradient_flow_heatmap,
    loss_plot,
    nonfinite_steps,
    run_figure,
    save_run_plot,
    total_norm_plot,
)


def _bands(ax) -> list[tuple[float, float]]:
    """(x0, x1) of the hatched non-finite bands of a panel over steps."""
    return sorted((p.get_x(), p.get_x() + p.get_width()) for p in ax.patches if p.get_hatch() == "//")


def test_heatmap_masks_unmeasured_and_uses_log_colours():
    ax = Figure().subplots()
    values = np.array([[1e-6, np.nan, 1e-5], [1e-2, 0.0, 1.0]])
    present = np.array([[True, False, True], [True, True, True]])
    gradient_flow_heatmap(ax, np.array([0, 10, 20]), values, ["a", "b"], present)
    mesh = ax.collections[0]
    data = mesh.get_array()
    assert data.mask.reshape(2, 3).tolist() == [[False, True, False], [False, True, False]]
    assert mesh.norm.vmin == pytest.approx(1e-6) and mesh.norm.vmax == pytest.approx(1.0)
    assert type(mesh.norm).__name__ == "LogNorm"
    assert len(ax.collections) == 1  # no NaN/Inf cell: nothing drawn in red
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
    assert ax.get_ylim() == (1.5, -0.5)  # the first layer (input) at the top


def test_heatmap_draws_nonfinite_cells_red_and_keeps_their_steps():
    ax = Figure().subplots()
    steps = np.array([0, 10, 20, 30])
    values = np.array([[1e-3, np.nan, np.inf, 1e-3], [1e-2, np.nan, 1e-2, np.nan]])
    present = np.array([[True, True, True, True], [True, True, True, False]])  # b not measured at 30
    gradient_flow_heatmap(ax, steps, values, ["a", "b"], present, nonfinite_steps=np.array([10, 20]))
    colours, red = ax.collections
    assert colours.get_array().mask.reshape(2, 4).tolist() == [[False, True, True, False], [False, True, False, True]]
    # NaN and Inf cells drawn red; the unmeasured cell (b, 30) stays blank
    assert (~red.get_array().mask.reshape(2, 4)).tolist() == [[False, True, True, False], [False, True, False, False]]
    np.testing.assert_allclose(colours.get_coordinates()[0, :, 0], [-5, 5, 15, 25, 35])  # columns centred on steps
    assert _bands(ax) == [(9.5, 10.5), (19.5, 20.5)]  # one band per run of consecutive steps
    assert BAND_LABEL in [t.get_text() for t in ax.get_legend().get_texts()]


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
    assert _bands(ax) == [(3.5, 4.5)]  # by default the steps whose norm is NaN/Inf
    assert BAND_LABEL in [t.get_text() for t in ax.get_legend().get_texts()]


def test_loss_panel_bands_the_given_steps():
    ax = Figure().subplots()
    loss = np.array([2.0, 1.5, np.nan, np.nan, 1.2, np.inf, 1.0])
    loss_plot(ax, np.arange(7), loss)
    assert _bands(ax) == [(1.5, 3.5), (4.5, 5.5)]
    np.testing.assert_array_equal(ax.get_lines()[0].get_ydata(), loss)  # NaN kept in the data: a gap


def test_activation_health_bars():
    ax = Figure().subplots()
    activation_health_plot(ax, ["s1", "r1"], np.array([0.7, np.nan]), np.array([np.nan, 0.2]))
    widths = [p.get_width() for p in ax.patches]
    assert widths == [0.7, 0.0, 0.0, 0.2]


def test_activation_health_marks_layers_with_nonfinite_outputs():
    ax = Figure().subplots()
    activation_health_plot(ax, ["s1", "r1"], np.array([0.7, np.nan]), np.array([np.nan, 0.2]),
                           nonfinite_from=[None, 53])
    bands = [p for p in ax.patches if p.get_hatch() == "//"]
    assert len(bands) == 1 and bands[0].get_y() == pytest.approx(0.5) and bands[0].get_height() == pytest.approx(1)
    assert "NaN/Inf outputs from step 53" in [t.get_text() for t in ax.texts]


def _nan_batch_run() -> RunData:
    """Every metric NaN on steps 53-69 (a batch holding NaN), activations measured every 5 steps."""
    steps, act = np.arange(100), np.arange(0, 100, 5)
    bad, act_bad = (steps >= 53) & (steps <= 69), (act >= 53) & (act <= 69)
    loss = np.where(bad, np.nan, np.linspace(2, 1, 100))
    layers = (LayerInfo(0, "fc", "Linear", "param"), LayerInfo(1, "act", "ReLU", "activation", "relu"))
    flow = layer_matrix({0: (act, np.where(act_bad, np.nan, 0.1)), 1: (act, np.where(act_bad, np.nan, 0.2))}, 2)
    outputs = layer_matrix({1: (act, np.where(act_bad, 16.0, 0.0))}, 2)
    dead = layer_matrix({1: (act, np.full(len(act), 0.1))}, 2)
    return RunData("abcdef123456", "nan-batch", layers,
                   run={"loss": Series(steps, loss), "grad_norm_total": Series(steps, np.where(bad, np.nan, 1.0)),
                        "nonfinite_params": Series(steps, bad * 2.0)},
                   layer={"act_grad_norm": flow, "act_nonfinite": outputs, "dead_ratio": dead})


def test_run_figure_bands_every_panel_at_the_nonfinite_steps():
    data = _nan_batch_run()
    np.testing.assert_array_equal(nonfinite_steps(data), np.arange(53, 70))
    heat, norm, loss, act = run_figure(data).axes[:4]
    for ax in (heat, norm, loss):
        assert _bands(ax) == [(52.5, 69.5)], ax.get_title()
    red = heat.collections[1].get_array()  # the NaN columns 55, 60, 65 are kept, drawn red
    assert (~red.mask).reshape(2, -1).sum(axis=1).tolist() == [3, 3]
    assert "NaN/Inf outputs from step 55" in [t.get_text() for t in act.texts]


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
