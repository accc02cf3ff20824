"""Plots: the panel functions draw the data they are given, and a run's figure shows the panels that
fit the run on one step axis, marks its NaN/Inf steps in every panel and writes readable ticks.

Panel functions are checked on arrays; figures on runs trained with the real agent (a ReLU MLP
with a NaN batch, a pre-LN transformer with GELU, the same transformer with NaN batches, a GELU
MLP with two param groups on a cosine schedule), read back from a real SQLite store, and on
synthetic `RunData`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imread

import gradwatch
from gradwatch.diagnose import LayerInfo, RunData, Series
from gradwatch.diagnose.load import layer_matrix, load_run_data
from gradwatch.plots import (
    BAND_LABEL,
    PANELS,
    Drawing,
    Panel,
    activation_ratio_heatmap,
    gradient_flow_heatmap,
    layer_lines,
    loss_plot,
    lr_plot,
    nonfinite_steps,
    output_logits_plot,
    run_figure,
    save_run_plot,
    tick_text,
    total_norm_plot,
)
from gradwatch.store import Store
from tests.fixtures import training
from tests.fixtures.cli_runs import EVERY_STEP, NAN_BATCH, nonfinite_home, ok

ALL_PANELS = [p.name for p in PANELS]
#: The panels of a model without attention, output-logits or block measurements (an MLP).
MLP_PANELS = ["gradient_flow", "total_norm", "loss", "lr", "activations"]
#: The panels a transformer adds.
TRANSFORMER_PANELS = ["attention_logits", "attention_entropy", "output_logits", "activation_scale",
                      "activation_outliers"]


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


def test_layer_lines_draw_each_layer_where_measured_with_its_dotted_companion():
    ax = Figure().subplots()
    steps = np.array([0, 5, 10, 15])
    rms = np.array([[1.0, 1.2, np.nan, 1.5], [2.0, np.nan, 3.0, 4.0]])
    present = np.array([[True, True, True, True], [True, False, True, True]])  # b not measured at 5
    layer_lines(ax, steps, rms, ["a", "b"], present, title="scale", ylabel="rms", log=True,
                dashed=rms * 5, dashed_label="max |x|")
    a, a_max, b, b_max = ax.get_lines()
    np.testing.assert_array_equal(b.get_xdata(), [0, 10, 15])
    np.testing.assert_array_equal(a_max.get_ydata(), rms[0] * 5)
    assert a_max.get_color() == a.get_color() and a_max.get_linestyle() == ":"
    assert a.get_color() != b.get_color()  # coloured by depth
    assert ax.get_yscale() == "log"
    assert _bands(ax) == [(9.5, 10.5)]  # a's measured NaN; b's unmeasured step is no band
    assert _legend_texts(ax) == ["a", "b", "max |x|", BAND_LABEL]


def test_layer_lines_from_zero_on_a_linear_scale():
    ax = Figure().subplots()
    layer_lines(ax, np.arange(3), np.array([[1.5, 1.0, 0.6]]), ["attn"], title="entropy", ylabel="nats",
                from_zero=True)
    assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0
    assert _legend_texts(ax) == ["attn"]


def test_output_logits_show_log_z_against_zero_and_the_max_logit():
    ax = Figure().subplots()
    steps = np.array([0, 5, 10, 15])
    logz = np.array([2.8, 3.0, np.inf, 4.0])
    output_logits_plot(ax, steps, logz, np.array([1.0, 2.0, 9.0, 5.0]))
    zero, mean, top = ax.get_lines()
    assert tuple(zero.get_ydata()) == (0, 0) and zero.get_linestyle() == "--"
    np.testing.assert_array_equal(mean.get_ydata(), logz)
    np.testing.assert_array_equal(top.get_xdata(), steps)
    assert _bands(ax) == [(9.5, 10.5)]
    assert _legend_texts(ax) == ["log Z = 0 (z-loss target)", "mean log Z", "max logit", BAND_LABEL]


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
    assert list(panels) == MLP_PANELS
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

    fig = run_figure(_nan_batch_run(), PANELS + (Panel("extra", scale),))
    extra = next(ax for ax in fig.axes if ax.get_label() == "extra")
    assert extra.get_xlim() == (-0.5, 99.5)
    assert [ax.get_label() for ax in fig.axes][:6] == MLP_PANELS + ["extra"]


def test_panels_with_nothing_to_show_are_left_out():
    data = _nan_batch_run()
    bare = dataclasses.replace(data, run={"grad_norm_total": data.run["grad_norm_total"]},
                               layer={"act_grad_norm": data.layer["act_grad_norm"]}, group={})
    assert list(_panels(run_figure(bare))) == ["gradient_flow", "total_norm"]
    fig = run_figure(dataclasses.replace(data, run={}, layer={}, group={}))
    assert [t.get_text() for ax in fig.axes for t in ax.texts] == ["nothing measured"]


def _transformer_run(blocks: int) -> RunData:
    """`blocks` pre-LN blocks (the block, its attention) and a head, measured every 5 steps of
    100; loss, attention, logits and scale NaN on steps 53-69; layer 1 (block 0's attention) has
    the highest outlier ratio, then each deeper layer a lower one."""
    steps, act = np.arange(100), np.arange(0, 100, 5)
    bad = (act >= 53) & (act <= 69)
    layers = [LayerInfo(2 * b + k, f"blocks.{b}{'.attn' * k}", ("PreLNBlock", "MultiheadAttention")[k],
                        ("block", "param")[k]) for b in range(blocks) for k in (0, 1)]
    layers.append(LayerInfo(2 * blocks, "head", "Linear", "param"))
    n = len(layers)

    def rows(idx: range | list[int], make) -> Series:
        return layer_matrix({i: (act, np.where(bad, np.nan, make(i))) for i in idx}, n)

    attn, block = range(1, 2 * blocks, 2), range(0, 2 * blocks, 2)
    return RunData("abcdef123456", "nan-transformer", tuple(layers),
                   run={"loss": Series(steps, np.where((steps >= 53) & (steps <= 69), np.nan, 2.0))},
                   layer={"attn_logit_max": rows(attn, lambda i: np.geomspace(1, 30 + i, len(act))),
                          "attn_entropy": rows(attn, lambda i: np.linspace(2, 0.2, len(act))),
                          "logit_logz": rows([n - 1], lambda i: np.linspace(3, 5, len(act))),
                          "logit_max": rows([n - 1], lambda i: np.linspace(2, 8, len(act))),
                          "act_rms": rows(block, lambda i: np.full(len(act), 1.0 + i)),
                          "act_absmax": rows(block, lambda i: np.full(len(act), 10.0 + i)),
                          "act_outlier": rows(range(n), lambda i: np.full(len(act), 100.0 - i))})


def test_transformer_panels_band_the_nonfinite_steps_on_the_shared_axis():
    fig = run_figure(_transformer_run(2))
    panels = _panels(fig)
    assert list(panels) == ["loss", *TRANSFORMER_PANELS]
    for name, ax in panels.items():
        assert ax.get_xlim() == (-0.5, 99.5), name
        assert _bands(ax) == [(52.5, 69.5)], name
        assert _legend_texts(ax).count(BAND_LABEL) == 1, name
    assert _legend_texts(panels["attention_logits"])[:2] == ["blocks.0.attn", "blocks.1.attn"]
    assert panels["attention_logits"].get_yscale() == "log"
    assert panels["attention_entropy"].get_ylim()[0] == 0
    assert _legend_texts(panels["activation_scale"]) == ["blocks.0", "blocks.1", "max |x|", BAND_LABEL]
    _assert_plain_ticks(fig)


def test_outlier_panel_shows_the_highest_layers_in_depth_order():
    ax = _panels(run_figure(_transformer_run(3)))["activation_outliers"]
    assert _legend_texts(ax) == ["blocks.0", "blocks.0.attn", "blocks.1", "blocks.1.attn", BAND_LABEL]
    assert ax.get_title(loc="left").endswith("top 4 of 7 layers")
    assert ax.get_yscale() == "linear"  # 97..100: within 10x


def test_a_deep_transformer_gets_heatmaps_of_its_layers():
    panels = _panels(run_figure(_transformer_run(12)))
    logits, entropy, scale = (panels[n] for n in ("attention_logits", "attention_entropy", "activation_scale"))
    for ax in (logits, entropy, scale):
        assert ax.collections[0].get_array().reshape(12, -1).shape == (12, 20)
        assert _bands(ax) == [(52.5, 69.5)]
        assert ax.get_xlim() == (-0.5, 99.5)
    assert scale.get_title(loc="left") == "residual stream RMS per block"
    assert type(logits.collections[0].norm).__name__ == "LogNorm"
    assert entropy.collections[0].norm.vmin == 0 and entropy.collections[0].norm.vmax == pytest.approx(2)
    assert not logits.get_lines()


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
    ("nan-batch", MLP_PANELS),
    ("pre-ln-transformer", ["gradient_flow", "total_norm", "loss", "lr", *TRANSFORMER_PANELS]),
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


#: The steps on which the transformer below gets NaN embeddings.
NAN_EMBEDDINGS = range(20, 25)


@pytest.fixture(scope="module")
def nan_transformer(tmp_path_factory) -> RunData:
    """tests/fixtures/training.py's pre-LN transformer (nn.MultiheadAttention) trained 40 steps,
    measured every step, its embeddings NaN on the steps of NAN_EMBEDDINGS (the `skip` guard keeps
    the weights finite); read from a real SQLite store."""
    home = tmp_path_factory.mktemp("nan-transformer") / "home"
    job = next(j for j in training.HEALTHY if j.name == "pre-ln-transformer")
    torch.manual_seed(0)
    model = job.model()
    opt = job.optimizer(model)
    poison = {"on": False}
    model.blocks.register_forward_pre_hook(lambda m, args: (args[0] * math.nan,) if poison["on"] else None)
    config = {**EVERY_STEP, "home": str(home), "guards": {"nonfinite": "skip"}}
    with gradwatch.watch(model, opt, run="nan-transformer", config=config) as watcher:
        for step in range(40):
            poison["on"] = step in NAN_EMBEDDINGS
            x, y = job.batches(step)
            loss = job.loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            watcher.log(loss=loss.detach())
    ok("runs", "--home", home)
    with Store.open(home=home) as store:
        return load_run_data(store, store.resolve_run("nan-transformer"))


def test_a_transformer_with_nan_steps_bands_them_in_every_panel(nan_transformer, tmp_path):
    fig = run_figure(nan_transformer)
    panels = _panels(fig)
    assert list(panels) == ["gradient_flow", "total_norm", "loss", "lr", *TRANSFORMER_PANELS]
    band = (NAN_EMBEDDINGS.start - 0.5, NAN_EMBEDDINGS.stop - 0.5)
    for name, ax in panels.items():
        assert ax.get_xlim() == (-0.5, 39.5), name
        assert _bands(ax) == [band], name
        assert _legend_texts(ax).count(BAND_LABEL) == 1, name
    for line in panels["attention_logits"].get_lines():  # NaN logits are gaps on exactly those steps
        x, y = line.get_xdata(), line.get_ydata()
        np.testing.assert_array_equal(x[~np.isfinite(y)], list(NAN_EMBEDDINGS))
    _assert_plain_ticks(fig)
    save_run_plot(nan_transformer, tmp_path / "nan-transformer.png")
