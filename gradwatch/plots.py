"""Pictures of a run's gradients, drawn headless with matplotlib's object API (no pyplot state).

Each panel function draws arrays onto an Axes; `run_figure` puts them together for one run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from gradwatch.diagnose.rundata import RunData, Series, nanmedian


def gradient_flow_heatmap(ax: Axes, steps: np.ndarray, values: np.ndarray, layer_names: Sequence[str],
                          title: str = "gradient flow |dL/d(layer output)|") -> None:
    """Layers (rows, input at the top) x steps, coloured on a log scale; unmeasured cells blank."""
    v = np.asarray(values, dtype=np.float64)
    masked = np.ma.masked_where(~np.isfinite(v) | (v <= 0), v)
    if masked.count() == 0:
        ax.text(0.5, 0.5, "no gradient flow measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        return
    norm = LogNorm(vmin=float(masked.min()), vmax=max(float(masked.max()), float(masked.min()) * 1.0001))
    extent = (float(steps[0]), float(steps[-1]) if len(steps) > 1 else float(steps[0]) + 1, len(layer_names) - 0.5, -0.5)
    image = ax.imshow(masked, aspect="auto", interpolation="nearest", norm=norm, cmap="viridis", extent=extent)
    ax.set_yticks(range(len(layer_names)), labels=list(layer_names), fontsize=7)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.figure.colorbar(image, ax=ax, label="L2 norm (log)")


def total_norm_plot(ax: Axes, steps: np.ndarray, before: np.ndarray, after: np.ndarray | None = None,
                    threshold: np.ndarray | float | None = None, clipped: np.ndarray | None = None) -> None:
    """The total gradient norm over steps, before and after clipping, on a log scale.

    `threshold` (a value or one per step) is drawn as a dashed line and `clipped` (a boolean
    mask) marks the steps clipping changed.
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
    bad = ~np.isfinite(before)
    if np.any(bad):
        for lo, hi in _runs(np.asarray(steps)[bad]):
            ax.axvspan(lo - 0.5, hi + 0.5, color="black", alpha=0.15, lw=0)
        ax.fill_between([], [], color="black", alpha=0.15, label="non-finite")
    if np.any(np.isfinite(before) & (before > 0)):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("total gradient norm")
    ax.set_title("total gradient norm")
    ax.legend(loc="best", fontsize=7)


def _runs(steps: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive steps grouped into (first, last) ranges."""
    if not len(steps):
        return []
    breaks = np.flatnonzero(np.diff(steps) > 1)
    firsts = np.concatenate([[steps[0]], steps[breaks + 1]])
    lasts = np.concatenate([steps[breaks], [steps[-1]]])
    return [(int(a), int(b)) for a, b in zip(firsts, lasts)]


def activation_health_plot(ax: Axes, layer_names: Sequence[str], saturation: np.ndarray,
                           dead: np.ndarray, limit: float = 0.5) -> None:
    """Per layer, the saturation ratio (bounded activations) and dead ratio (ReLU family), 0..1."""
    y = np.arange(len(layer_names))
    ax.barh(y - 0.2, np.nan_to_num(saturation), height=0.4, color="tab:orange", label="saturation ratio")
    ax.barh(y + 0.2, np.nan_to_num(dead), height=0.4, color="tab:purple", label="dead ratio")
    for offset, values in ((-0.2, saturation), (0.2, dead)):
        for yi, v in zip(y + offset, values):
            if np.isfinite(v):
                ax.text(min(float(v), 0.9) + 0.01, yi, f"{v:.0%}", va="center", fontsize=6)
    ax.axvline(limit, color="tab:red", ls="--", lw=1, label=f"diagnosis limit {limit:g}")
    ax.set_yticks(y, labels=list(layer_names), fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("ratio (median over the last half of the run)")
    ax.set_title("activation saturation and dead units")
    ax.legend(loc="best", fontsize=7)


def _rows(series: Series | None, count: int) -> np.ndarray:
    if series is None:
        return np.full(count, np.nan)
    return np.asarray(nanmedian(series.window().values, axis=1))


def run_figure(data: RunData) -> Figure:
    """The three panels for one run: gradient flow heatmap, total norm, activation health."""
    fig = Figure(figsize=(11, 12), layout="constrained")
    heat_ax, norm_ax, act_ax = fig.subplots(3, 1, height_ratios=[3, 2, 2])
    fig.suptitle(f"gradwatch: {data.name} ({data.run_id[:12]})")
    flow = data.layer.get("act_grad_norm") or data.layer.get("grad_norm")
    if flow is not None and flow.values.size:
        measured = np.flatnonzero(np.any(np.isfinite(flow.values), axis=1))
        labels = [f"{data.layers[i].name} ({data.layers[i].type})" for i in measured]
        gradient_flow_heatmap(heat_ax, flow.steps, flow.values[measured], labels)
    else:
        gradient_flow_heatmap(heat_ax, np.array([0]), np.full((1, 1), np.nan), ["-"])
    total = data.run.get("grad_norm_total")
    if total is not None and total.values.size:
        clipping = data.clip_config["mode"] != "none"
        after, thr, coef = (data.run.get(m) if clipping else None
                            for m in ("grad_norm_total_clipped", "clip_threshold", "clip_coef"))
        steps = total.steps
        bad = data.run.get("nonfinite_params")
        if bad is not None:  # NaN norms are not stored: take those steps from the non-finite count
            steps = np.union1d(steps, bad.steps[np.nan_to_num(bad.values) > 0])
        total_norm_plot(norm_ax, steps, total.at(steps),
                        after.at(steps) if after is not None else None,
                        thr.at(steps) if thr is not None else None,
                        np.nan_to_num(coef.at(steps), nan=1.0) < 1.0 - 1e-6 if coef is not None else None)
    sat, dead = data.layer.get("saturation_ratio"), data.layer.get("dead_ratio")
    s_rows, d_rows = _rows(sat, len(data.layers)), _rows(dead, len(data.layers))
    shown = np.flatnonzero(np.isfinite(s_rows) | np.isfinite(d_rows))
    if len(shown):
        activation_health_plot(act_ax, data.layer_names(shown), s_rows[shown], d_rows[shown])
    else:
        act_ax.text(0.5, 0.5, "no bounded or ReLU-family activations measured", ha="center", va="center")
        act_ax.set_axis_off()
    return fig


def save_run_plot(data: RunData, out: str | Path) -> Path:
    """Draw `run_figure(data)` into `out` (format from the suffix: .png, .svg, .pdf)."""
    path = Path(out)
    run_figure(data).savefig(path, dpi=110)
    return path
