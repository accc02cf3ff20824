"""Plots: the panel functions draw the data they are given, and a run's figure shows the panels that
fit the run on one step axis, marks its NaN/Inf steps in every panel and writes readable ticks.

Panel functions are checked on arrays; figures on runs trained with the real agent (a ReLU MLP
with a NaN batch, a pre-LN transformer with GELU, a GELU MLP with two param groups on a cosine
schedule), read back from a real SQLite store, and on synthetic `RunData`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imread

from gradwatch.diagnose import LayerInfo, RunData, Series
from gradwatch.diagnose.load import layer_matrix, load_run_data
from gradwatch.plots import (
    BAND_LABEL,
    PANELS,
    Drawing,
    Panel,
    activation_ratio_heatmap,
    gradient_flow_heatmap,
    loss_plot,
    lr_plot,
    nonfinite_steps,
    run_figure,
    save_run_plot,
    tick_text,
    total_norm_plot,
)
from gradwatch.store import Store
from tests.fixtures import training
from tests.fixtures.cli_runs import NAN_BATCH, nonfinite_home, ok

ALL_PANELS = [p.name for p in PANELS]


def _bands(ax) -> list[tuple[float, float]]:
    """(x0, x1) of the hatched non-finite bands of a panel over steps."""
    return sorted((p.get_x(), p.get_x() + p.get_width()) for p in ax.patches if p.get_hatch() == "//")


def _legend_texts(ax) -> list[str]:
    legend = ax.get_legend()
    return [] if legend is None else [t.get_text() for t in legend.get_texts()]


def _panels(fig: Figure) -> dict[str, object]:
    """The figure's panels by name (colourbars are left out)."""
    return {ax.get_label(): ax for ax in fig.axes if ax.get_label() in ALL_PANELS}


def _tick_texts(fig: Figure) -> list[str]:
    """Every tick label and offset text of every Axes (colourbars included), as drawn."""
    FigureCanvasAgg(fig).draw()
    texts = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            texts += [t.get_text() for t in axis.get_majorticklabels() + axis.get_minorticklabels()]
            texts.append(axis.get_offset_text().get_text())
    return [t for t in texts if t]


def _assert_plain_ticks(fig: Figure) -> None:
    texts = _tick_texts(fig)
    assert texts
    for bad in ("×", "\\times", "^{", "$"):
        assert not [t for t in texts if bad in t], (bad, texts)


# ------------------------------------------------------------------ panel functions on arrays


def test_heatmap_masks_unmeasured_and_uses_log_colours():
    ax = Figure().subplots()
    values = np.array([[1e-6, np.nan, 1e-5], [1e-2, 0.0, 1.0]])
    present = np.array([[True, False, True], [True, True, True]])
    gradient_flow_heatmap(ax, np.array([0, 10, 20]), values, ["a", "b"], present)
    colours, zeros = ax.collections
    assert colours.get_array().mask.reshape(2, 3).tolist() == [[False, True, False], [False, True, False]]
    assert colours.norm.vmin == pytest.approx(1e-6) and colours.norm.vmax == pytest.approx(1.0)
    assert type(colours.norm).__name__ == "LogNorm"
    # the measured 0 is drawn (black, "exactly 0"); the unmeasured cell stays blank
    assert (~zeros.get_array().mask.reshape(2, 3)).tolist() == [[False, False, False], [False, True, False]]
    assert _legend_texts(ax) == ["exactly 0"]
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
    assert _legend_texts(ax) == ["NaN/Inf value", BAND_LABEL]  # the band named once


def test_heatmap_labels_every_kth_layer_of_a_deep_model():
    ax = Figure().subplots()
    names = [f"layer{i}" for i in range(100)]
    gradient_flow_heatmap(ax, np.arange(3), np.ones((100, 3)), names)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == names[::3] and len(labels) <= 40


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
    assert _legend_texts(ax).count(BAND_LABEL) == 1


def test_loss_panel_bands_the_given_steps():
    ax = Figure().subplots()
    loss = np.array([2.0, 1.5, np.nan, np.nan, 1.2, np.inf, 1.0])
    loss_plot(ax, np.arange(7), loss)
    assert _bands(ax) == [(1.5, 3.5), (4.5, 5.5)]
    assert _legend_texts(ax) == ["loss", BAND_LABEL]  # two bands, one legend entry
    np.testing.assert_array_equal(ax.get_lines()[0].get_ydata(), loss)  # NaN kept in the data: a gap


def test_lr_panel_draws_each_group_where_measured_on_a_log_scale_across_decades():
    ax = Figure().subplots()
    steps = np.arange(5)
    lr = np.array([[1e-2, 5e-3, 1e-3, 5e-4, 1e-4], [1e-3, 1e-3, np.nan, 1e-3, 1e-3]])
    present = np.array([[True] * 5, [True, True, False, True, True]])  # group 1 not measured at step 2
    lr_plot(ax, steps, lr, present)
    first, second = ax.get_lines()
    np.testing.assert_array_equal(first.get_xdata(), steps)
    np.testing.assert_array_equal(second.get_xdata(), [0, 1, 3, 4])
    assert ax.get_yscale() == "log"
    assert _legend_texts(ax) == ["group 0", "group 1 0.001 (constant)"]
    assert _bands(ax) == []  # not measured is not NaN


def test_lr_panel_is_linear_from_zero_within_a_decade_and_bands_a_nan_rate():
    ax = Figure().subplots()
    lr_plot(ax, np.arange(4), np.array([0.1, 0.2, np.nan, 0.3]))
    assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0
    assert _bands(ax) == [(1.5, 2.5)]


def test_activation_ratios_on_a_fixed_scale_with_the_limit_and_nan_outputs():
    ax = Figure().subplots()
    values = np.array([[0.1, 0.7, 0.9], [0.0, 0.2, 0.3]])
    outputs = np.array([[False, False, True], [False, False, False]])
    activation_ratio_heatmap(ax, np.array([0, 5, 10]), values, ["s (Sigmoid) saturated", "r (ReLU) dead"],
                             nonfinite_outputs=outputs, limits=(0.5,))
    colours, red = ax.collections
    assert (colours.norm.vmin, colours.norm.vmax) == (0.0, 1.0)
    assert (~red.get_array().mask.reshape(2, 3)).tolist() == outputs.tolist()
    assert _legend_texts(ax) == ["diagnosis limit 0.5", "NaN/Inf outputs"]
    colourbar = next(a for a in ax.figure.axes if a is not ax)
    assert "0.5 limit" in [t.get_text() for t in colourbar.get_yticklabels()]


@pytest.mark.parametrize("value, text", [
    (0.6, "0.6"), (300, "300"), (2000, "2000"), (0.001, "0.001"), (1e-5, "1e-5"), (2.5e21, "2.5e21"),
    (1e4, "1e4"), (0.0, "0"),
], ids=["fraction", "hundreds", "thousands", "thousandth", "small", "huge", "1e4", "zero"])
def test_tick_text_is_plain(value, text):
    assert tick_text(value) == text


def test_log_ticks_within_a_decade_are_plain_numbers():
    fig = Figure()
    ax = fig.subplots()
    total_norm_plot(ax, np.arange(4), np.array([0.35, 0.5, 0.42, 0.6]))
    _assert_plain_ticks(fig)
    assert {"0.4", "0.5", "0.6"} <= set(_tick_texts(fig))


# ------------------------------------------------------------------ synthetic runs


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
                   layer={"act_grad_norm": flow, "act_nonfinite": outputs, "dead_ratio": dead},
                   group={"lr": Series(steps, np.full((1, 100), 0.1), np.ones((1, 100), bool))})


def test_run_figure_bands_every_panel_at_the_nonfinite_steps():
    data = _nan_batch_run()
    np.testing.assert_array_equal(nonfinite_steps(data), np.arange(53, 70))
    panels = _panels(run_figure(data))
    assert list(panels) == ALL_PANELS
    for name, ax in panels.items():
        assert _bands(ax) == [(52.5, 69.5)], name
        assert _legend_texts(ax).count(BAND_LABEL) == 1, name
    red = panels["gradient_flow"].collections[1].get_array()  # the NaN columns 55, 60, 65 are kept, drawn red
    assert (~red.mask).reshape(2, -1).sum(axis=1).tolist() == [3, 3]
    outputs = panels["activations"].collections[1].get_array()  # the ReLU's NaN outputs, red at 55, 60, 65
    assert (~outputs.mask).reshape(1, -1)[0].nonzero()[0].tolist() == [11, 12, 13]


def test_panels_share_one_step_axis():
    data = _nan_batch_run()
    panels = _panels(run_figure(data))
    for name, ax in panels.items():
        assert ax.get_xlim() == (-0.5, 99.5), name
    # columns centred on the steps measured (every 5), the last one reaching the run's last step
    edges = panels["gradient_flow"].collections[0].get_coordinates()[0, :, 0]
    np.testing.assert_allclose(edges, [*np.arange(-2.5, 95, 5), 99.5])


def test_a_panel_added_to_the_list_is_drawn_on_the_shared_axis():
    def scale(data: RunData) -> Drawing:
        return Drawing(1.5, lambda ax, bad: ax.plot(np.arange(0, 100, 10), np.ones(10), label="rms"))

    fig = run_figure(_nan_batch_run(), PANELS + (Panel("activation_scale", scale),))
    extra = next(ax for ax in fig.axes if ax.get_label() == "activation_scale")
    assert extra.get_xlim() == (-0.5, 99.5)
    assert [ax.get_label() for ax in fig.axes][:6] == ALL_PANELS + ["activation_scale"]


def test_panels_with_nothing_to_show_are_left_out():
    data = _nan_batch_run()
    bare = dataclasses.replace(data, run={"grad_norm_total": data.run["grad_norm_total"]},
                               layer={"act_grad_norm": data.layer["act_grad_norm"]}, group={})
    assert list(_panels(run_figure(bare))) == ["gradient_flow", "total_norm"]
    fig = run_figure(dataclasses.replace(data, run={}, layer={}, group={}))
    assert [t.get_text() for ax in fig.axes for t in ax.texts] == ["nothing measured"]


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


# ------------------------------------------------------------------ runs trained with the agent


SHORT = {"pre-ln-transformer": 60, "normalised-cosine": 100}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, RunData]:
    """`nan-batch` (tests/fixtures/cli_runs.py) and two jobs of tests/fixtures/training.py, shortened:
    a pre-LN transformer with GELU (no bounded or ReLU-family layer) and a GELU MLP with two
    param groups (lr 0.03 and 0.003) on a cosine schedule; read from a real SQLite store."""
    nan_home, _ = nonfinite_home(tmp_path_factory)
    home = tmp_path_factory.mktemp("plots") / "home"
    for job in training.HEALTHY:
        if job.name in SHORT:
            training.train(dataclasses.replace(job, steps=SHORT[job.name]), home)
    runs = {}
    for h, names in ((nan_home, ["nan-batch"]), (home, list(SHORT))):
        ok("runs", "--home", h)  # ingest
        with Store.open(home=Path(h)) as store:
            runs.update({n: load_run_data(store, store.resolve_run(n)) for n in names})
    return runs


@pytest.mark.parametrize("run, names", [
    ("nan-batch", ALL_PANELS),
    ("pre-ln-transformer", ["gradient_flow", "total_norm", "loss", "lr"]),
    ("normalised-cosine", ["gradient_flow", "total_norm", "loss", "lr"]),
], ids=["relu-mlp", "transformer", "gelu-mlp"])
def test_the_panels_fit_the_model(trained, run, names, tmp_path):
    data = trained[run]
    fig = run_figure(data)
    panels = _panels(fig)
    assert list(panels) == names
    first = min(s.steps[0] for s in data.run.values())
    last = max(s.steps[-1] for s in data.run.values())
    assert {ax.get_xlim() for ax in panels.values()} == {(first - 0.5, last + 0.5)}
    edges = panels["gradient_flow"].collections[0].get_coordinates()[0, :, 0]
    assert edges[0] <= first - 0.5 and edges[-1] == last + 0.5  # no blank strip at the ends
    assert not [t.get_text() for ax in fig.axes for t in ax.texts]  # no "nothing measured" placeholder
    _assert_plain_ticks(fig)
    save_run_plot(data, tmp_path / f"{run}.png")


def test_nan_batch_is_marked_in_every_panel(trained):
    panels = _panels(run_figure(trained["nan-batch"]))
    for name, ax in panels.items():
        assert _bands(ax) == [(NAN_BATCH.start - 0.5, NAN_BATCH.stop - 0.5)], name
        assert _legend_texts(ax).count(BAND_LABEL) == 1, name
    red = panels["gradient_flow"].collections[1].get_array()  # measured every step: 17 red columns per layer
    assert (~red.mask).reshape(3, -1).sum(axis=1).tolist() == [len(NAN_BATCH)] * 3
    outputs = panels["activations"].collections[1].get_array()  # the ReLU's NaN outputs on the same steps
    assert (~outputs.mask).sum() == len(NAN_BATCH)


def test_lr_panel_shows_each_group_of_the_schedule(trained):
    data = trained["normalised-cosine"]
    ax = _panels(run_figure(data))["lr"]
    steps = SHORT["normalised-cosine"]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines) == ["group 0", "group 1"]
    for label, base in (("group 0", 0.03), ("group 1", 0.003)):  # tests/fixtures/training.py head_apart
        x = lines[label].get_xdata()
        np.testing.assert_array_equal(x, np.arange(steps))
        np.testing.assert_allclose(lines[label].get_ydata(), [base * training.cosine(s, steps) for s in x], rtol=1e-6)
    assert ax.get_yscale() == "log"
