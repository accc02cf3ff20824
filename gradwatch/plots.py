"""Pictures of a run's gradients, drawn headless with matplotlib's object API (no pyplot state).

Each panel function draws arrays onto an Axes; `run_figure` puts them together for one run.
Steps where anything recorded was NaN or ±Inf (loss, total norm, gradient elements, an
overflowed norm, activation outputs) get the same hatched band in every panel over steps, and
non-finite cells of the heatmap are drawn in red; unmeasured cells stay blank.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap, LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from gradwatch.diagnose.nonfinite import runs_of
from gradwatch.diagnose.rundata import RunData, Series, nanmedian

#: How a non-finite step is marked in every panel over steps (an `axvspan`), and its legend label.
BAND = {"facecolor": "tab:red", "alpha": 0.18, "hatch": "//", "edgecolor": "tab:red", "lw": 0}
BAND_LABEL = "NaN/Inf step"
#: Colour of a non-finite heatmap cell (and of a layer with non-finite outputs).
NONFINITE_COLOUR = "tab:red"


def mark_nonfinite_steps(ax: Axes, steps: np.ndarray) -> None:
    """Shade each run of consecutive non-finite `steps` (half a step either side) and label it once."""
    spans = runs_of(np.asarray(steps))
    for i, (lo, hi) in enumerate(spans):
        ax.axvspan(lo - 0.5, hi + 0.5, label=BAND_LABEL if i == 0 else None, **BAND)


def _edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges around sorted centres: midpoints between them, half a gap beyond the ends."""
    c = np.asarray(centres, dtype=np.float64)
    if len(c) == 1:
        return np.array([c[0] - 0.5, c[0] + 0.5])
    mid = (c[1:] + c[:-1]) / 2
    return np.concatenate([[2 * c[0] - mid[0]], mid, [2 * c[-1] - mid[-1]]])


def gradient_flow_heatmap(ax: Axes, steps: np.ndarray, values: np.ndarray, layer_names: Sequence[str],
                          present: np.ndarray | None = None, nonfinite_steps: np.ndarray | None = None,
                          title: str = "gradient flow |dL/d(layer output)|") -> None:
    """Layers (rows, input at the top) x steps (each column centred on its step), coloured on a
    log scale; NaN/Inf cells red, cells not measured (`present` False) or zero blank."""
    v = np.asarray(values, dtype=np.float64)
    measured = np.ones(v.shape, dtype=bool) if present is None else np.asarray(present, dtype=bool)
    shown = np.ma.masked_where(~measured | ~np.isfinite(v) | (v <= 0), v)
    bad = measured & ~np.isfinite(v)
    ax.set_title(title)
    if shown.count() == 0 and not bad.any():
        ax.text(0.5, 0.5, "no gradient flow measured", ha="center", va="center", transform=ax.transAxes)
        return
    x, y = _edges(np.asarray(steps)), np.arange(len(layer_names) + 1) - 0.5
    if shown.count():
        lo, hi = float(shown.min()), float(shown.max())
        mesh = ax.pcolormesh(x, y, shown, norm=LogNorm(vmin=lo, vmax=max(hi, lo * 1.0001)), cmap="viridis")
        ax.figure.colorbar(mesh, ax=ax, label="L2 norm (log)")
    handles = []
    if bad.any():
        ax.pcolormesh(x, y, np.ma.masked_where(~bad, np.ones(v.shape)), cmap=ListedColormap([NONFINITE_COLOUR]))
        handles.append(Patch(color=NONFINITE_COLOUR, label="NaN/Inf value"))
    if nonfinite_steps is not None and len(nonfinite_steps):
        mark_nonfinite_steps(ax, nonfinite_steps)
        handles.append(Patch(label=BAND_LABEL, **BAND))
    ax.set_xlim(x[0], x[-1])
    ax.set_ylim(y[-1], y[0])  # input layer at the top
    ax.set_yticks(range(len(layer_names)), labels=list(layer_names), fontsize=7)
    ax.set_xlabel("step")
    if handles:
        ax.legend(handles=handles, loc="upper right", fontsize=7)


def total_norm_plot(ax: Axes, steps: np.ndarray, before: np.ndarray, after: np.ndarray | None = None,
                    threshold: np.ndarray | float | None = None, clipped: np.ndarray | None = None,
                    nonfinite_steps: np.ndarray | None = None) -> None:
    """The total gradient norm over steps, before and after clipping, on a log scale.

    `threshold` (a value or one per step) is drawn as a dashed line, `clipped` (a boolean
    mask) marks the steps clipping changed, and `nonfinite_steps` (default: the steps whose
    norm is NaN/Inf) are banded.
    """
    before = np.asarray(before, dtype=np.float64)
    ax.plot(steps, before, lw=1, color="tab:blue", label="before clipping")
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
    ax.set_xlabel("step")
    ax.set_ylabel("total gradient norm")
    ax.set_title("total gradient norm")
    ax.legend(loc="best", fontsize=7)


def loss_plot(ax: Axes, steps: np.ndarray, loss: np.ndarray, nonfinite_steps: np.ndarray | None = None) -> None:
    """The logged loss over steps (log scale when positive and spanning over 100x), with
    `nonfinite_steps` (default: the steps whose loss is NaN/Inf) banded."""
    loss = np.asarray(loss, dtype=np.float64)
    ax.plot(steps, loss, lw=1, color="tab:blue", label="loss")
    mark_nonfinite_steps(ax, np.asarray(steps)[~np.isfinite(loss)] if nonfinite_steps is None else nonfinite_steps)
    finite = loss[np.isfinite(loss)]
    if len(finite) and finite.min() > 0 and finite.max() > 100 * finite.min():
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    ax.legend(loc="best", fontsize=7)


def activation_health_plot(ax: Axes, layer_names: Sequence[str], saturation: np.ndarray, dead: np.ndarray,
                           limit: float = 0.5, nonfinite_from: Sequence[int | None] | None = None) -> None:
    """Per layer, the saturation ratio (bounded activations) and dead ratio (ReLU family), 0..1;
    layers whose outputs were NaN/Inf (`nonfinite_from`: per layer, the first such step or None)
    banded in red and labelled with that step."""
    y = np.arange(len(layer_names))
    ax.barh(y - 0.2, np.nan_to_num(saturation), height=0.4, color="tab:orange", label="saturation ratio")
    ax.barh(y + 0.2, np.nan_to_num(dead), height=0.4, color="tab:purple", label="dead ratio")
    for offset, values in ((-0.2, saturation), (0.2, dead)):
        for yi, v in zip(y + offset, values):
            if np.isfinite(v):
                ax.text(min(float(v), 0.9) + 0.01, yi, f"{v:.0%}", va="center", fontsize=6)
    rows = [(row, step) for row, step in enumerate(nonfinite_from or ()) if step is not None]
    for i, (row, step) in enumerate(rows):
        ax.axhspan(row - 0.5, row + 0.5, label="NaN/Inf outputs" if i == 0 else None, **BAND)
        ax.text(0.99, row, f"NaN/Inf outputs from step {step}", ha="right", va="center", fontsize=7,
                color=NONFINITE_COLOUR)
    ax.axvline(limit, color="tab:red", ls="--", lw=1, label=f"diagnosis limit {limit:g}")
    ax.set_yticks(y, labels=list(layer_names), fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("ratio (median over the last half of the run)")
    ax.set_title("activation saturation and dead units")
    ax.legend(loc="best", fontsize=7)


def nonfinite_steps(data: RunData) -> np.ndarray:
    """Every step where something recorded was NaN/Inf: a run-level value (loss, total norm, ...),
    a count of non-finite or overflowed params, a layer's gradient flow or its outputs."""
    found = [np.array([], dtype=np.int64)]
    for metric, s in data.run.items():
        v = s.values.astype(np.float64)
        bad = np.nan_to_num(v, nan=1.0) > 0 if metric in ("nonfinite_params", "overflow_params") else ~np.isfinite(v)
        found.append(s.steps[bad])
    for metric, s in data.layer.items():
        v = s.values.astype(np.float64)
        bad = ~(v <= 0) if metric == "act_nonfinite" else ~np.isfinite(v)
        found.append(s.steps[(bad & s.measured).any(axis=0)])
    return np.unique(np.concatenate(found)).astype(np.int64)


def _rows(series: Series | None, count: int) -> np.ndarray:
    if series is None:
        return np.full(count, np.nan)
    return np.asarray(nanmedian(series.window().values, axis=1))


def _first_nonfinite_output(counts: Series | None, count: int) -> list[int | None]:
    """Per layer, the first step whose `act_nonfinite` count is above zero (None: never)."""
    if counts is None:
        return [None] * count
    bad = counts.measured & ~(counts.values <= 0)
    return [int(counts.steps[np.argmax(row)]) if row.any() else None for row in bad]


def run_figure(data: RunData) -> Figure:
    """The panels for one run: gradient-flow heatmap, total norm, loss (when logged), activation health."""
    loss = data.run.get("loss")
    has_loss = loss is not None and loss.values.size > 0
    ratios = [3, 2] + ([1.5] if has_loss else []) + [2]
    fig = Figure(figsize=(11, 12 + 2 * has_loss), layout="constrained")
    axes = list(fig.subplots(len(ratios), 1, height_ratios=ratios))
    heat_ax, norm_ax, act_ax = axes[0], axes[1], axes[-1]
    fig.suptitle(f"gradwatch: {data.name} ({data.run_id[:12]})")
    bad_steps = nonfinite_steps(data)
    flow = data.layer.get("act_grad_norm") or data.layer.get("grad_norm")
    if flow is not None and flow.values.size:
        shown = np.flatnonzero(flow.measured.any(axis=1))
        labels = [f"{data.layers[i].name} ({data.layers[i].type})" for i in shown]
        gradient_flow_heatmap(heat_ax, flow.steps, flow.values[shown], labels, flow.measured[shown], bad_steps)
    else:
        gradient_flow_heatmap(heat_ax, np.array([0]), np.full((1, 1), np.nan), ["-"], np.zeros((1, 1), bool))
    total = data.run.get("grad_norm_total")
    if total is not None and total.values.size:
        clipping = data.clip_config["mode"] != "none"
        after, thr, coef = (data.run.get(m) if clipping else None
                            for m in ("grad_norm_total_clipped", "clip_threshold", "clip_coef"))
        steps = total.steps
        total_norm_plot(norm_ax, steps, total.values,
                        after.at(steps) if after is not None else None,
                        thr.at(steps) if thr is not None else None,
                        np.nan_to_num(coef.at(steps), nan=1.0) < 1.0 - 1e-6 if coef is not None else None,
                        bad_steps)
    if has_loss:
        loss_plot(axes[2], loss.steps, loss.values, bad_steps)
    sat, dead = data.layer.get("saturation_ratio"), data.layer.get("dead_ratio")
    s_rows, d_rows = _rows(sat, len(data.layers)), _rows(dead, len(data.layers))
    bad_from = _first_nonfinite_output(data.layer.get("act_nonfinite"), len(data.layers))
    shown = np.flatnonzero(np.isfinite(s_rows) | np.isfinite(d_rows) | np.array([b is not None for b in bad_from]))
    if len(shown):
        activation_health_plot(act_ax, data.layer_names(shown), s_rows[shown], d_rows[shown],
                               nonfinite_from=[bad_from[i] for i in shown])
    else:
        act_ax.text(0.5, 0.5, "no bounded or ReLU-family activations measured", ha="center", va="center")
        act_ax.set_axis_off()
    return fig


def save_run_plot(data: RunData, out: str | Path) -> Path:
    """Draw `run_figure(data)` into `out` (format from the suffix: .png, .svg, .pdf)."""
    path = Path(out)
    run_figure(data).savefig(path, dpi=110)
    return path
