"""The statistics buffer: where each measurement lives on the device, and how a window of
rows becomes a run log frame on the host.

One row per optimizer step in a window of `flush_every` steps, one float32 column per
measured value. The training thread only writes device columns; host-known values (step,
learning rate, flags, counts) live in small numpy arrays beside it. Every `flush_every`
steps the rows go to pinned host memory in one copy and the writer thread turns them into
blocks with `window_blocks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gradwatch.agent.runlog import MetricDef

# A param that had no gradient at a step: norms are >= 0, so -1 cannot be a measurement.
NO_GRAD = -1.0
RUN_VALUES = ("grad_norm_total", "grad_norm_total_clipped", "clip_coef", "clip_threshold")
MAX_SCALARS = 32


@dataclass
class Layout:
    """Column offsets of every measurement in the device buffer."""

    n_params: int
    n_groups: int
    act_layers: list[int]  # layers whose output gradient is measured (act_grad_norm): all of them
    stat_layers: list[int]  # activation layers, whose outputs are measured (mean, std, ...)
    bounded: list[int]  # of those, layers with saturation_ratio
    relu: list[int]  # of those, layers with dead_ratio and zero_ratio
    clip_mode: str = "none"  # without a clipper (or a threshold) the host fills those columns
    width: int = 0
    grad_norm: int = 0  # P columns, then the four RUN_VALUES
    run: int = 0
    param_norm: int = 0
    update_ratio: int = 0
    scalars: int = 0
    act_start: int = 0  # first activation column: zeroed when a step's activations are measured
    act_grad: dict[int, int] = field(default_factory=dict)  # layer -> sum of squares column
    act: dict[int, int] = field(default_factory=dict)  # stat layer -> [sum, sum of squares, saturated, dead, non-zero]

    def __post_init__(self) -> None:
        col = 0
        self.grad_norm = col
        col += self.n_params
        self.run = col
        col += len(RUN_VALUES)
        self.param_norm = col
        col += self.n_params
        self.update_ratio = col
        col += self.n_params
        self.scalars = col
        col += MAX_SCALARS
        self.act_start = col
        for layer in self.act_layers:
            self.act_grad[layer] = col
            col += 1
        for layer in self.stat_layers:
            self.act[layer] = col
            col += self.act_width(layer)
        self.width = col

    def act_width(self, layer: int) -> int:
        return 2 + (1 if layer in self.bounded else 0) + (2 if layer in self.relu else 0)


def standard_metrics(layout: Layout, measure_params: bool, measure_updates: bool,
                     measure_acts: bool) -> list[MetricDef]:
    """The metric table of a run, in a fixed order; user scalars are appended later."""
    defs: list[tuple[str, str, tuple[int, ...]]] = [(name, "run", ()) for name in RUN_VALUES]
    defs += [("skipped", "run", ()), ("nonfinite_params", "run", ()),
             ("lr", "group", tuple(range(layout.n_groups))), ("grad_norm", "param", tuple(range(layout.n_params)))]
    if measure_params:
        defs.append(("param_norm", "param", tuple(range(layout.n_params))))
    if measure_updates:
        defs.append(("update_ratio", "param", tuple(range(layout.n_params))))
    if measure_acts:
        stats = tuple(layout.stat_layers)
        defs.append(("act_grad_norm", "layer", tuple(layout.act_layers)))
        if stats:
            defs += [("act_mean", "layer", stats), ("act_std", "layer", stats)]
        if layout.bounded:
            defs.append(("saturation_ratio", "layer", tuple(layout.bounded)))
        if layout.relu:
            defs += [("dead_ratio", "layer", tuple(layout.relu)), ("zero_ratio", "layer", tuple(layout.relu))]
    return [MetricDef(i, name, scope, idx) for i, (name, scope, idx) in enumerate(defs)]  # type: ignore[arg-type]


@dataclass
class HostRows:
    """Host-side values of each row of a window, written by the training thread."""

    steps: np.ndarray
    skipped: np.ndarray
    lr: np.ndarray
    scalar_set: np.ndarray  # bool (rows, MAX_SCALARS): scalar logged at that step
    param_due: np.ndarray
    update_due: np.ndarray
    act_count: np.ndarray  # forward passes measured per act layer (rows, n_act)
    act_grad_count: np.ndarray  # output gradients measured per act layer
    act_elems: np.ndarray  # output elements summed over those passes
    act_units: np.ndarray  # output units (features / channels) summed over those passes

    @classmethod
    def empty(cls, rows: int, n_groups: int, n_act: int) -> HostRows:
        return cls(np.zeros(rows, np.int64), np.zeros(rows, np.float32), np.full((rows, n_groups), np.nan, np.float32),
                   np.zeros((rows, MAX_SCALARS), bool), np.zeros(rows, bool), np.zeros(rows, bool),
                   np.zeros((rows, n_act), np.int64), np.zeros((rows, n_act), np.int64),
                   np.zeros((rows, n_act), np.int64), np.zeros((rows, n_act), np.int64))

    def take(self, rows: np.ndarray) -> HostRows:
        """A copy of the given rows, safe to hand to another thread."""
        return HostRows(*(getattr(self, f)[rows].copy() for f in self.__dataclass_fields__))


@dataclass
class WindowResult:
    """What a window of rows turns into: run log blocks and the latest values per metric."""

    blocks: list[tuple[int, np.ndarray, np.ndarray]]
    latest: dict[str, tuple[int, np.ndarray]]  # metric -> (step, values of its columns)


def window_blocks(layout: Layout, metrics: dict[str, MetricDef], values: np.ndarray, host: HostRows,
                  scalar_ids: list[int]) -> WindowResult:
    """Turn device rows (already on the host, `values[i]` for `host.steps[i]`) into blocks.

    Pure function: the writer thread calls it, tests call it directly.
    """
    blocks: list[tuple[int, np.ndarray, np.ndarray]] = []
    latest: dict[str, tuple[int, np.ndarray]] = {}

    def add(name: str, mask: np.ndarray | None, cols: np.ndarray) -> None:
        metric = metrics.get(name)
        if metric is None:
            return
        steps = host.steps if mask is None else host.steps[mask]
        if steps.size == 0:
            return
        cols = cols.astype(np.float32, copy=False).reshape(steps.size, metric.width)
        blocks.append((metric.id, steps, cols))
        latest[name] = (int(steps[-1]), cols[-1])

    p, r = layout.n_params, layout.run
    applied = host.skipped == 0
    if layout.clip_mode == "none":
        values[applied, r + 1] = values[applied, r]
        values[applied, r + 2] = np.where(np.isfinite(values[applied, r]), 1.0, np.nan)
    if layout.clip_mode in ("none", "value", "agc"):
        values[:, r + 3] = np.nan
    grad = values[:, layout.grad_norm:layout.grad_norm + p]
    nonfinite = ~np.isfinite(grad)  # a missing gradient is NO_GRAD, finite
    # Per param, for snapshot(); not a metric, and no scalar passed to log(**kw) can have this name.
    latest["<nonfinite>"] = (int(host.steps[-1]), nonfinite[-1])
    add("grad_norm", None, np.where(grad == NO_GRAD, np.nan, grad))
    for i, name in enumerate(RUN_VALUES):
        add(name, None, values[:, r + i])
    add("skipped", None, host.skipped)
    add("nonfinite_params", None, nonfinite.sum(axis=1))
    add("lr", None, host.lr)
    add("param_norm", host.param_due, values[host.param_due, layout.param_norm:layout.param_norm + p])
    add("update_ratio", host.update_due, values[host.update_due, layout.update_ratio:layout.update_ratio + p])
    measured = host.act_count.sum(axis=1) > 0
    if layout.act_layers and "act_grad_norm" in metrics and measured.any():
        rows = values[measured]
        counts = host.act_count[measured]
        grad_counts = host.act_grad_count[measured]
        n = rows.shape[0]
        names = ("act_grad_norm", "act_mean", "act_std", "saturation_ratio", "dead_ratio", "zero_ratio")
        stat: dict[str, list[np.ndarray]] = {name: [] for name in names}
        elems, units = host.act_elems[measured], host.act_units[measured]
        with np.errstate(divide="ignore", invalid="ignore"):  # a layer not measured at a step: NaN
            for j, layer in enumerate(layout.act_layers):
                stat["act_grad_norm"].append(np.where(grad_counts[:, j] > 0,
                                                      np.sqrt(rows[:, layout.act_grad[layer]]), np.nan))
                if layer not in layout.act:
                    continue
                a, total = layout.act[layer], np.where(counts[:, j] > 0, elems[:, j], np.nan)
                mean = rows[:, a] / total
                stat["act_mean"].append(mean)
                stat["act_std"].append(np.sqrt(np.maximum(rows[:, a + 1] / total - mean * mean, 0.0)))
                extra = a + 2
                if layer in layout.bounded:
                    stat["saturation_ratio"].append(rows[:, extra] / total)
                    extra += 1
                if layer in layout.relu:
                    stat["dead_ratio"].append(rows[:, extra] / np.where(counts[:, j] > 0, units[:, j], np.nan))
                    stat["zero_ratio"].append(1.0 - rows[:, extra + 1] / total)  # the column counts non-zeros
        for name, cols in stat.items():
            if cols:
                add(name, measured, np.stack(cols, axis=1).reshape(n, -1))
    for slot, metric_id in enumerate(scalar_ids):
        mask = host.scalar_set[:, slot]
        steps = host.steps[mask]
        if steps.size:
            vals = values[mask, layout.scalars + slot].reshape(-1, 1)
            blocks.append((metric_id, steps, vals))
            for name, m in metrics.items():
                if m.id == metric_id:
                    latest[name] = (int(steps[-1]), vals[-1])
    return WindowResult(blocks, latest)
