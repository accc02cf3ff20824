"""Pictures of a run's gradients, drawn headless with matplotlib's object API (no pyplot state).

Each panel function draws arrays onto an Axes; `run_figure` stacks the panels that fit the run
(`PANELS`) on one shared step axis; a per-layer statistic over steps is a line per layer, coloured
by depth, or a layers x steps heatmap for a deep model. Steps where anything recorded was NaN or
±Inf (loss, total norm, gradient elements, an overflowed norm, activation outputs, attention,
logit and scale statistics, a learning rate) get the same hatched band in every panel, and
non-finite cells of a heatmap are drawn in red; unmeasured cells stay blank. Tick labels are
plain numbers or 1e-5 style, never mathtext powers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps, ticker
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap, LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from gradwatch.diagnose.nonfinite import runs_of
from gradwatch.diagnose.rundata import RunData, Series
from gradwatch.diagnose.thresholds import DEAD_RATIO, SATURATION_RATIO

#: How a non-finite step is marked in every panel over steps (an `axvspan`), and its legend label.
BAND = {"facecolor": "tab:red", "alpha": 0.18, "hatch": "//", "edgecolor": "tab:red", "lw": 0}
BAND_LABEL = "NaN/Inf step"
#: Colour of a non-finite heatmap cell, and of a cell whose value is exactly 0 on a log colour scale.
NONFINITE_COLOUR = "tab:red"
ZERO_COLOUR = "black"
#: Above this many rows a heatmap labels every k-th layer only, so the names stay readable.
MAX_ROW_LABELS = 40
#: A per-layer statistic is drawn as lines up to this many layers, as a layers x steps heatmap above.
MAX_LINES = 6
#: The outlier panel shows the layers with the highest max/RMS, this many of them.
OUTLIER_LAYERS = 4
#: Height in inches of a panel of lines.
LINES_HEIGHT = 1.9


# ------------------------------------------------------------------ ticks


def tick_text(value: float) -> str:
    """A tick value as people write it: 0.6, 300, 1e-5, 2.5e21 (no x10 powers, no mathtext)."""
    v = float(value)
    if v == 0 or 1e-3 <= abs(v) < 1e4:
        return f"{v:.4g}"
    mantissa, exponent = f"{v:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


class PlainLogFormatter(ticker.LogFormatter):
    """Labels the ticks matplotlib's log formatter would label (decades, and the minor ticks of a
    short range), written by `tick_text` instead of as 6x10^-1."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return tick_text(x) if super().__call__(x, pos) else ""


def readable_log_ticks(axis: Any) -> None:
    """Give a log-scaled `axis` (ax.xaxis, ax.yaxis, a colorbar's long axis) plain tick labels."""
    axis.set_major_formatter(PlainLogFormatter())
    axis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))


# ------------------------------------------------------------------ panel primitives


def mark_nonfinite_steps(ax: Axes, steps: np.ndarray) -> None:
    """Shade each run of consecutive non-finite `steps` (half a step either side) and label it once."""
    for i, (lo, hi) in enumerate(runs_of(np.asarray(steps))):
        ax.axvspan(lo - 0.5, hi + 0.5, label=BAND_LABEL if i == 0 else None, zorder=2, **BAND)


def _legend(ax: Axes, handles: Sequence[Any] | None = None) -> None:
    """The panel's legend in one row above its right corner, off the data."""
    if handles is None:
        handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles=list(handles), loc="lower right", bbox_to_anchor=(1, 1), ncols=len(handles),
                  fontsize=7, frameon=False, borderaxespad=0.2)


def _title(ax: Axes, text: str) -> None:
    ax.set_title(text, loc="left", fontsize=10)


def _edges(centres: np.ndarray, extent: tuple[float, float] | None = None) -> np.ndarray:
    """Cell edges around sorted centres: midpoints between them, half a gap beyond the ends; an
    outer edge short of `extent` (the run's step range) by at most one cell is moved onto it, so a
    run measured every N steps has no blank strip at either end."""
    c = np.asarray(centres, dtype=np.float64)
    if len(c) == 1:
        edges = np.array([c[0] - 0.5, c[0] + 0.5])
    else:
        mid = (c[1:] + c[:-1]) / 2
        edges = np.concatenate([[2 * c[0] - mid[0]], mid, [2 * c[-1] - mid[-1]]])
    if extent is not None:
        lo, hi = extent
        gaps = np.diff(edges)
        if lo < edges[0] <= lo + gaps[0]:
            edges[0] = lo
        if hi - gaps[-1] <= edges[-1] < hi:
            edges[-1] = hi
    return edges


def _row_labels(ax: Axes, labels: Sequence[str]) -> None:
    """Layer names on the rows, every k-th one when there are more than MAX_ROW_LABELS."""
    every = -(-len(labels) // MAX_ROW_LABELS)
    rows = range(0, len(labels), every)
    ax.set_yticks(list(rows), labels=[labels[i] for i in rows], fontsize=7)


def layer_heatmap(ax: Axes, steps: np.ndarray, values: np.ndarray, labels: Sequence[str],
                  present: np.ndarray | None = None, nonfinite_steps: np.ndarray | None = None, *,
                  title: str, colour_label: str, log: bool = True, cmap: str = "viridis",
                  limits: Sequence[float] = (), nonfinite: np.ndarray | None = None,
                  nonfinite_label: str = "NaN/Inf value", extent: tuple[float, float] | None = None,
                  span: tuple[float, float] | None = (0.0, 1.0)) -> None:
    """Layers (rows, input at the top) x steps (each column centred on its step, edges in steps).

    On a `log` colour scale over the positive values (cells exactly 0 drawn in ZERO_COLOUR),
    else on `span` (None: 0 to the largest value); NaN/Inf cells, and cells flagged in
    `nonfinite` (same shape), are red (named `nonfinite_label`); cells not measured (`present`
    False) stay blank. `limits` are drawn and labelled on the colourbar and named in the legend;
    `nonfinite_steps` are banded. The outer columns reach `extent` (the run's step range) when it
    lies within a column of them.
    """
    v = np.asarray(values, dtype=np.float64)
    measured = np.ones(v.shape, dtype=bool) if present is None else np.asarray(present, dtype=bool)
    bad = measured & ~np.isfinite(v)
    if nonfinite is not None:
        bad |= np.asarray(nonfinite, dtype=bool)
    zero = measured & (v == 0) & ~bad if log else np.zeros(v.shape, dtype=bool)
    shown = np.ma.masked_where(~measured | bad | zero | (v <= 0 if log else False), v)
    _title(ax, title)
    x, y = _edges(np.asarray(steps), extent), np.arange(len(labels) + 1) - 0.5
    handles: list[Any] = []
    if shown.count():
        lo, hi = float(shown.min()), float(shown.max())
        if log:
            norm: Normalize = LogNorm(vmin=lo, vmax=max(hi, lo * 1.0001))
        else:
            norm = Normalize(*span) if span is not None else Normalize(min(lo, 0.0), max(hi, 1e-12))
        mesh = ax.pcolormesh(x, y, shown, norm=norm, cmap=cmap)
        bar = ax.figure.colorbar(mesh, ax=ax, label=colour_label, pad=0.01, fraction=0.03)
        if log:
            readable_log_ticks(bar.ax.yaxis)
        for limit in sorted(set(limits)):
            bar.ax.axhline(limit, color="black", ls="--", lw=2)
            handles.append(Line2D([], [], color="black", ls="--", lw=1.5, label=f"diagnosis limit {limit:g}"))
        if limits:
            ticks = sorted({0.0, 0.25, 0.75, 1.0} | set(limits))
            bar.set_ticks(ticks, labels=[f"{t:g} limit" if t in limits else f"{t:g}" for t in ticks])
    for cells, colour, label in ((zero, ZERO_COLOUR, "exactly 0"), (bad, NONFINITE_COLOUR, nonfinite_label)):
        if cells.any():
            ax.pcolormesh(x, y, np.ma.masked_where(~cells, np.ones(v.shape)), cmap=ListedColormap([colour]))
            handles.append(Patch(color=colour, label=label))
    if nonfinite_steps is not None and len(nonfinite_steps):
        mark_nonfinite_steps(ax, nonfinite_steps)
        handles.append(Patch(label=BAND_LABEL, **BAND))
    ax.set_xlim(x[0], x[-1])
    ax.set_ylim(y[-1], y[0])  # input layer at the top
    _row_labels(ax, labels)
    _legend(ax, handles)


def gradient_flow_heatmap(ax: Axes, steps: np.ndarray, values: np.ndarray, layer_names: Sequence[str],
                          present: np.ndarray | None = None, nonfinite_steps: np.ndarray | None = None,
                          title: str = "gradient flow |dL/d(layer output)|",
                          extent: tuple[float, float] | None = None) -> None:
    """The gradient norm reaching each layer (rows) at each step, on a log colour scale."""
    layer_heatmap(ax, steps, values, layer_names, present, nonfinite_steps, title=title,
                  colour_label="L2 norm (log)", extent=extent)


def activation_ratio_heatmap(ax: Axes, steps: np.ndarray, values: np.ndarray, labels: Sequence[str],
                             present: np.ndarray | None = None, nonfinite_steps: np.ndarray | None = None,
                             nonfinite_outputs: np.ndarray | None = None,
                             limits: Sequence[float] = (SATURATION_RATIO, DEAD_RATIO),
                             extent: tuple[float, float] | None = None) -> None:
    """Per activation layer (rows) and step, its saturation ratio (sigmoid/tanh) or dead ratio
    (ReLU family) on 0..1, the diagnosis limits dashed on the colourbar; cells where the layer's
    outputs held NaN/Inf (`nonfinite_outputs`) red."""
    layer_heatmap(ax, steps, values, labels, present, nonfinite_steps, log=False, cmap="cividis",
                  title="saturated (sigmoid/tanh) and dead (ReLU) units", colour_label="fraction of units",
                  limits=limits, nonfinite=nonfinite_outputs, nonfinite_label="NaN/Inf outputs", extent=extent)


def total_norm_plot(ax: Axes, steps: np.ndarray, before: np.ndarray, after: np.ndarray | None = None,
                    threshold: np.ndarray | float | None = None, clipped: np.ndarray | None = None,
                    nonfinite_steps: np.ndarray | None = None) -> None:
    """The total gradient norm over steps, before and after clipping, on a log scale.

    `threshold` (a value or one per step) is drawn as a dashed line, `clipped` (a boolean
    mask) marks the steps clipping changed, and `nonfinite_steps` (default: the steps whose
    norm is NaN/Inf) are banded.
    """
    before = np.asarray(before, dtype=np.float64)
    ax.plot(steps, before, lw=1, color="tab:blue", label="total norm" if after is None else "before clipping")
    if after is not None:
        ax.plot(steps, after, lw=1, color="tab:green", label="after clipping")
    if threshold is not None:
        ax.plot(steps, np.broadcast_to(np.asarray(threshold, dtype=np.float64), np.shape(steps)),
                ls="--", color="tab:red", lw=1, label="threshold")
    mark = np.asarray(clipped, dtype=bool) & np.isfinite(before) if clipped is not None else None
    if mark is not None and np.any(mark):
        ax.scatter(np.asarray(steps)[mark], before[mark], s=8, color="tab:red", zorder=3, label="clipped step")
    mark_nonfinite_steps(ax, np.asarray(steps)[~np.isfinite(before)] if nonfinite_steps is None else nonfinite_steps)
    if np.any(np.isfinite(before) & (before > 0)):
        ax.set_yscale("log")
        readable_log_ticks(ax.yaxis)
    ax.set_ylabel("L2 norm")
    _title(ax, "total gradient norm")
    _legend(ax)


def _log_if_wide(ax: Axes, values: np.ndarray, factor: float) -> None:
    """A log y axis (with plain ticks) when the positive finite `values` span over `factor`x."""
    finite = values[np.isfinite(values)]
    if len(finite) and finite.min() > 0 and finite.max() > factor * finite.min():
        ax.set_yscale("log")
        readable_log_ticks(ax.yaxis)


def loss_plot(ax: Axes, steps: np.ndarray, loss: np.ndarray, nonfinite_steps: np.ndarray | None = None) -> None:
    """The logged loss over steps (log scale when positive and spanning over 100x), with
    `nonfinite_steps` (default: the steps whose loss is NaN/Inf) banded."""
    loss = np.asarray(loss, dtype=np.float64)
    ax.plot(steps, loss, lw=1, color="tab:blue", label="loss")
    mark_nonfinite_steps(ax, np.asarray(steps)[~np.isfinite(loss)] if nonfinite_steps is None else nonfinite_steps)
    _log_if_wide(ax, loss, 100.0)
    ax.set_ylabel("loss")
    _title(ax, "loss")
    _legend(ax)


def lr_plot(ax: Axes, steps: np.ndarray, lr: np.ndarray, present: np.ndarray | None = None,
            labels: Sequence[str] | None = None, nonfinite_steps: np.ndarray | None = None) -> None:
    """The learning rate of each param group (rows of `lr`) over steps, only where it was
    measured; a log scale when it spans over 10x, else linear from 0. A group whose
    rate never changed is named with its value."""
    lr = np.atleast_2d(np.asarray(lr, dtype=np.float64))
    measured = np.ones(lr.shape, dtype=bool) if present is None else np.atleast_2d(present)
    if labels is None:
        labels = ["lr"] if len(lr) == 1 else [f"group {g}" for g in range(len(lr))]
    steps = np.asarray(steps)
    for row, label, m in zip(lr, labels, measured):
        constant = m.any() and len(np.unique(row[m])) == 1
        ax.plot(steps[m], row[m], lw=1.2, label=f"{label} {tick_text(row[m][0])} (constant)" if constant else label)
    bad = (measured & ~np.isfinite(lr)).any(axis=0)
    mark_nonfinite_steps(ax, steps[bad] if nonfinite_steps is None else nonfinite_steps)
    _log_if_wide(ax, lr[measured], 10.0)
    if ax.get_yscale() == "linear":
        top = np.nanmax(np.where(measured & np.isfinite(lr), lr, np.nan), initial=0.0)
        ax.set_ylim(0, 1.2 * top if top > 0 else None)
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: tick_text(v)))
    ax.set_ylabel("learning rate")
    _title(ax, "learning rate")
    _legend(ax)


def _depth_colours(n: int) -> list[Any]:
    """One colour per layer, dark (input side) to light green (output side), so depth reads at a glance."""
    return [colormaps["viridis"](x) for x in np.linspace(0.0, 0.8, n)] if n > 1 else ["tab:blue"]


def _log_if_positive(ax: Axes, values: np.ndarray) -> None:
    """A log y axis with plain ticks when every finite value is positive (and there is one)."""
    finite = values[np.isfinite(values)]
    if len(finite) and finite.min() > 0:
        ax.set_yscale("log")
        readable_log_ticks(ax.yaxis)


def _plain_linear_ticks(ax: Axes) -> None:
    if ax.get_yscale() == "linear":
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: tick_text(v)))


def layer_lines(ax: Axes, steps: np.ndarray, values: np.ndarray, labels: Sequence[str],
                present: np.ndarray | None = None, nonfinite_steps: np.ndarray | None = None, *,
                title: str, ylabel: str, log: bool = False, from_zero: bool = False,
                dashed: np.ndarray | None = None, dashed_label: str = "") -> None:
    """One line per layer (rows of `values`, coloured by depth) over the steps where it was
    measured, on a log scale when `log` and every finite value is positive, else linear (from 0
    when `from_zero`); `dashed` (same shape)
    adds a dotted line per layer in the same colour, named once as `dashed_label`. NaN/Inf values
    are gaps, their steps banded (default: the steps where a measured value is NaN/Inf)."""
    v = np.atleast_2d(np.asarray(values, dtype=np.float64))
    measured = np.ones(v.shape, dtype=bool) if present is None else np.atleast_2d(np.asarray(present, dtype=bool))
    steps = np.asarray(steps)
    extra = None if dashed is None else np.atleast_2d(np.asarray(dashed, dtype=np.float64))
    for row, (label, colour) in enumerate(zip(labels, _depth_colours(len(v)))):
        m = measured[row]
        ax.plot(steps[m], v[row, m], lw=1.2, color=colour, label=label)
        if extra is not None:
            ax.plot(steps[m], extra[row, m], lw=1, ls=":", color=colour)
    bad = (measured & ~np.isfinite(v)).any(axis=0)
    mark_nonfinite_steps(ax, steps[bad] if nonfinite_steps is None else nonfinite_steps)
    handles, _ = ax.get_legend_handles_labels()
    if extra is not None:
        handles.insert(len(labels), Line2D([], [], color="grey", lw=1, ls=":", label=dashed_label))
    if log:
        shown = v[measured] if extra is None else np.concatenate([v[measured], extra[measured]])
        _log_if_positive(ax, shown)
    if from_zero and ax.get_yscale() == "linear":
        ax.set_ylim(bottom=0)
    _plain_linear_ticks(ax)
    ax.set_ylabel(ylabel)
    _title(ax, title)
    _legend(ax, handles)


def output_logits_plot(ax: Axes, steps: np.ndarray, logz: np.ndarray, logit_max: np.ndarray | None = None,
                       present: np.ndarray | None = None, nonfinite_steps: np.ndarray | None = None) -> None:
    """The output layer's mean log Z (logsumexp over the vocabulary) over its measured steps, with
    the line log Z = 0 that z-loss pulls it to, and its max logit; linear, in logit units."""
    logz = np.asarray(logz, dtype=np.float64)
    m = np.ones(logz.shape, dtype=bool) if present is None else np.asarray(present, dtype=bool)
    steps = np.asarray(steps)
    ax.axhline(0.0, color="black", lw=0.8, ls="--", label="log Z = 0 (z-loss target)")
    ax.plot(steps[m], logz[m], lw=1.2, color="tab:blue", label="mean log Z")
    bad = ~np.isfinite(logz[m])
    if logit_max is not None:
        top = np.asarray(logit_max, dtype=np.float64)
        ax.plot(steps[m], top[m], lw=1.2, color="tab:orange", label="max logit")
        bad |= ~np.isfinite(top[m])
    mark_nonfinite_steps(ax, steps[m][bad] if nonfinite_steps is None else nonfinite_steps)
    _plain_linear_ticks(ax)
    ax.set_ylabel("logit")
    _title(ax, "output logits")
    _legend(ax)


# ------------------------------------------------------------------ one run


def nonfinite_steps(data: RunData) -> np.ndarray:
    """Every step where something recorded was NaN/Inf: a run-level value (loss, total norm, ...),
    a count of non-finite or overflowed params, a layer's gradient flow or its outputs, a
    learning rate."""
    found = [np.array([], dtype=np.int64)]
    for metric, s in data.run.items():
        v = s.values.astype(np.float64)
        bad = np.nan_to_num(v, nan=1.0) > 0 if metric in ("nonfinite_params", "overflow_params") else ~np.isfinite(v)
        found.append(s.steps[bad])
    for metric, s in [*data.layer.items(), *data.group.items()]:
        v = s.values.astype(np.float64)
        bad = ~(v <= 0) if metric == "act_nonfinite" else ~np.isfinite(v)
        found.append(s.steps[(bad & s.measured).any(axis=0)])
    return np.unique(np.concatenate(found)).astype(np.int64)


def _layer_label(data: RunData, row: int) -> str:
    return f"{data.layers[row].name} ({data.layers[row].type})"


def _heatmap_height(rows: int) -> float:
    return float(np.clip(0.9 + 0.17 * rows, 1.5, 6.0))


@dataclass(frozen=True)
class Drawing:
    """A panel ready to draw: its height in inches, and how to draw it on an Axes given the
    run's non-finite steps."""

    height: float
    draw: Callable[[Axes, np.ndarray], None]


@dataclass(frozen=True)
class Panel:
    """One panel of a run's figure: `plan(data)` is its Drawing, or None when the run has nothing
    for it (the panel is left out). A family of statistics with its own picture (attention logits
    and entropy, activation scale) adds a Panel to `PANELS`; it is drawn on the shared step axis."""

    name: str
    plan: Callable[[RunData], Drawing | None]


def _flow_panel(data: RunData) -> Drawing | None:
    """Gradient flow per layer: act_grad_norm, else each layer's grad_norm (L2 over its params)."""
    flow = data.layer.get("act_grad_norm") or data.layer.get("grad_norm")
    if flow is None or not flow.values.size or not flow.measured.any():
        return None
    rows = np.flatnonzero(flow.measured.any(axis=1))
    labels = [_layer_label(data, r) for r in rows]
    return Drawing(_heatmap_height(len(rows)), lambda ax, bad: gradient_flow_heatmap(
        ax, flow.steps, flow.values[rows], labels, flow.measured[rows], bad, extent=_step_range(data)))


def _run_series(data: RunData, metric: str) -> Series | None:
    s = data.run.get(metric)
    return s if s is not None and s.values.size else None


def _total_norm_panel(data: RunData) -> Drawing | None:
    total = _run_series(data, "grad_norm_total")
    if total is None:
        return None
    steps = total.steps
    clipping = data.clip_config["mode"] != "none"
    after, thr, coef = (data.run.get(m) if clipping else None
                        for m in ("grad_norm_total_clipped", "clip_threshold", "clip_coef"))
    clipped = np.nan_to_num(coef.at(steps), nan=1.0) < 1.0 - 1e-6 if coef is not None else None
    return Drawing(2.4, lambda ax, bad: total_norm_plot(
        ax, steps, total.values, after.at(steps) if after is not None else None,
        thr.at(steps) if thr is not None else None, clipped, bad))


def _loss_panel(data: RunData) -> Drawing | None:
    loss = _run_series(data, "loss")
    if loss is None:
        return None
    return Drawing(2.0, lambda ax, bad: loss_plot(ax, loss.steps, loss.values, bad))


def _lr_panel(data: RunData) -> Drawing | None:
    """Each param group's learning rate; a short panel when none of them changed."""
    lr = data.group.get("lr")
    if lr is None or not lr.values.size or not lr.measured.any():
        return None
    groups = np.flatnonzero(lr.measured.any(axis=1))
    labels = ["lr"] if lr.values.shape[0] == 1 else [f"group {g}" for g in groups]
    changes = any(len(np.unique(lr.values[g][lr.measured[g]])) > 1 for g in groups)
    return Drawing(1.8 if changes else 1.2, lambda ax, bad: lr_plot(
        ax, lr.steps, lr.values[groups], lr.measured[groups], labels, bad))


def _activation_panel(data: RunData) -> Drawing | None:
    """Saturation (bounded layers) and dead (ReLU-family) ratios on one matrix over their steps,
    a row per layer where either was measured, with the steps where its outputs were NaN/Inf."""
    parts = {m: data.layer[m] for m in ("saturation_ratio", "dead_ratio") if m in data.layer}
    if not parts:
        return None
    steps = np.unique(np.concatenate([s.steps for s in parts.values()]))
    values = np.full((len(data.layers), len(steps)), np.nan)
    present = np.zeros(values.shape, dtype=bool)
    what: dict[int, str] = {}
    for metric, s in parts.items():
        cols = np.searchsorted(steps, s.steps)
        for row in np.flatnonzero(s.measured.any(axis=1)):
            m = s.measured[row]
            values[row, cols[m]], present[row, cols[m]] = s.values[row, m], True
            what[int(row)] = "saturated" if metric == "saturation_ratio" else "dead"
    if not what:
        return None
    rows = np.array(sorted(what), dtype=np.intp)
    labels = [f"{_layer_label(data, r)} {what[r]}" for r in rows]
    outputs = _nonfinite_outputs(data, rows, steps)
    return Drawing(_heatmap_height(len(rows)), lambda ax, bad: activation_ratio_heatmap(
        ax, steps, values[rows], labels, present[rows], bad, outputs, extent=_step_range(data)))


def _nonfinite_outputs(data: RunData, rows: np.ndarray, steps: np.ndarray) -> np.ndarray | None:
    """Per layer of `rows` and step of `steps`: True where act_nonfinite counted NaN/Inf outputs."""
    counts = data.layer.get("act_nonfinite")
    if counts is None or not len(counts.steps):
        return None
    at = np.searchsorted(counts.steps, steps).clip(max=len(counts.steps) - 1)
    bad = counts.measured & ~(counts.values <= 0)
    return bad[rows][:, at] & (counts.steps[at] == steps)


def _rows_of(s: Series | None) -> np.ndarray:
    """The layers (rows) a layer series measured at least once."""
    return np.array([], dtype=np.intp) if s is None or not s.values.size else np.flatnonzero(s.measured.any(axis=1))


def _on_steps(s: Series | None, rows: np.ndarray, steps: np.ndarray) -> np.ndarray | None:
    """The values of layer series `s` for `rows` at `steps`, NaN where it measured nothing then."""
    if s is None or not len(s.steps):
        return None
    at = np.searchsorted(s.steps, steps).clip(max=len(s.steps) - 1)
    hit = s.measured[rows][:, at] & (s.steps[at] == steps)
    return np.where(hit, s.values[rows][:, at], np.nan)


def _per_layer(data: RunData, metric: str, *, title: str, ylabel: str, colour_label: str, log: bool,
               dashed: str | None = None, dashed_label: str = "", heatmap_title: str = "") -> Drawing | None:
    """`metric` of each layer that measured it: a line per layer (and, if named, the `dashed`
    metric dotted) up to MAX_LINES layers, else a layers x steps heatmap of `metric` alone (titled
    `heatmap_title`, default `title`); on a log scale when `log`, else from 0."""
    s = data.layer.get(metric)
    rows = _rows_of(s)
    if s is None or not len(rows):
        return None
    if len(rows) > MAX_LINES:
        labels = [_layer_label(data, r) for r in rows]
        return Drawing(_heatmap_height(len(rows)), lambda ax, bad: layer_heatmap(
            ax, s.steps, s.values[rows], labels, s.measured[rows], bad, title=heatmap_title or title,
            colour_label=colour_label,
            log=log, span=None, extent=_step_range(data)))
    other = _on_steps(data.layer.get(dashed), rows, s.steps) if dashed else None
    names = [data.layers[r].name for r in rows]
    return Drawing(LINES_HEIGHT, lambda ax, bad: layer_lines(
        ax, s.steps, s.values[rows], names, s.measured[rows], bad, title=title, ylabel=ylabel, log=log,
        from_zero=not log, dashed=other, dashed_label=dashed_label))


def _attention_logit_panel(data: RunData) -> Drawing | None:
    return _per_layer(data, "attn_logit_max", title="max attention logit q·k/√d per attention layer",
                      ylabel="logit", colour_label="max logit (log)", log=True)


def _attention_entropy_panel(data: RunData) -> Drawing | None:
    return _per_layer(data, "attn_entropy", title="mean attention entropy per attention layer (0: one-hot)",
                      ylabel="nats", colour_label="entropy (nats)", log=False)


def _logits_panel(data: RunData) -> Drawing | None:
    """log Z and max logit of the output layer (the first one, should a model have several)."""
    logz = data.layer.get("logit_logz")
    rows = _rows_of(logz)
    if logz is None or not len(rows):
        return None
    row = rows[:1]
    top = _on_steps(data.layer.get("logit_max"), row, logz.steps)
    most = None if top is None else top[0]
    return Drawing(LINES_HEIGHT, lambda ax, bad: output_logits_plot(
        ax, logz.steps, logz.values[row[0]], most, logz.measured[row[0]], bad))


def _scale_panel(data: RunData) -> Drawing | None:
    return _per_layer(data, "act_rms", title="residual stream per block: RMS (solid), max |x| (dotted)",
                      ylabel="activation", colour_label="RMS (log)", log=True, dashed="act_absmax",
                      dashed_label="max |x|", heatmap_title="residual stream RMS per block")


def _outlier_panel(data: RunData) -> Drawing | None:
    """max/RMS of the OUTLIER_LAYERS layers whose largest finite value is highest, on a log scale
    when they span over 10x; for a model with residual blocks or attention only (every hooked
    layer has the ratio: an MLP's alone is noise)."""
    s = data.layer.get("act_outlier")
    rows = _rows_of(s)
    if s is None or not len(rows) or not any(len(_rows_of(data.layer.get(m))) for m in ("act_rms", "attn_logit_max")):
        return None
    peak = np.where(s.measured[rows] & np.isfinite(s.values[rows]), s.values[rows], -np.inf).max(axis=1)
    worst = np.sort(rows[np.argsort(-peak, kind="stable")[:OUTLIER_LAYERS]])
    names = [data.layers[r].name for r in worst]
    title = f"outliers max|x|/RMS: top {len(worst)} of {len(rows)} layers"
    shown = s.values[worst][s.measured[worst] & np.isfinite(s.values[worst])]
    wide = bool(len(shown)) and shown.min() > 0 and shown.max() > 10 * shown.min()
    return Drawing(LINES_HEIGHT, lambda ax, bad: layer_lines(
        ax, s.steps, s.values[worst], names, s.measured[worst], bad, title=title, ylabel="max / RMS", log=wide))


#: The panels of `run_figure`, top to bottom.
PANELS: tuple[Panel, ...] = (
    Panel("gradient_flow", _flow_panel),
    Panel("total_norm", _total_norm_panel),
    Panel("loss", _loss_panel),
    Panel("lr", _lr_panel),
    Panel("activations", _activation_panel),
    Panel("attention_logits", _attention_logit_panel),
    Panel("attention_entropy", _attention_entropy_panel),
    Panel("output_logits", _logits_panel),
    Panel("activation_scale", _scale_panel),
    Panel("activation_outliers", _outlier_panel),
)


def _step_range(data: RunData) -> tuple[float, float] | None:
    """The first and last step of everything recorded, half a step out: the shared x limits."""
    steps = [s.steps for group in (data.run, data.layer, data.group) for s in group.values() if len(s.steps)]
    if not steps:
        return None
    return float(min(s[0] for s in steps)) - 0.5, float(max(s[-1] for s in steps)) + 0.5


def run_figure(data: RunData, panels: Sequence[Panel] = PANELS) -> Figure:
    """The `panels` that have something to show for one run, stacked on one step axis. Each
    panel's Axes carries the panel's name as its label (`ax.get_label()`)."""
    shown = [(p.name, d) for p in panels if (d := p.plan(data)) is not None]
    heights = [d.height for _, d in shown] or [1.0]
    fig = Figure(figsize=(11, sum(heights) + 0.8), layout="constrained")
    fig.suptitle(f"gradwatch: {data.name} ({data.run_id[:12]})")
    axes = fig.subplots(len(heights), 1, sharex=True, squeeze=False, height_ratios=heights)[:, 0]
    if not shown:
        axes[0].text(0.5, 0.5, "nothing measured", ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
        return fig
    bad_steps = nonfinite_steps(data)
    for ax, (name, drawing) in zip(axes, shown):
        ax.set_label(name)
        drawing.draw(ax, bad_steps)
        ax.tick_params(labelbottom=True)  # step numbers under every panel, not only the last
    limits = _step_range(data)
    if limits is not None:
        axes[0].set_xlim(*limits)
    axes[-1].set_xlabel("step")
    return fig


def save_run_plot(data: RunData, out: str | Path) -> Path:
    """Draw `run_figure(data)` into `out` (format from the suffix: .png, .svg, .pdf)."""
    path = Path(out)
    run_figure(data).savefig(path, dpi=110)
    return path
