"""The statistics buffer: where each measurement lives on the device, and how a window of
rows becomes a run log frame on the host.

One row per optimizer step in a window of `flush_every` steps, one float32 column per
measured value. The training thread only writes device columns; host-known values (step,
learning rate, flags, counts) live in small numpy arrays beside it. Every `flush_every`
steps the rows go to pinned host memory in one copy and the writer thread turns them into
blocks with `window_blocks`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from gradwatch.agent.forward_layout import ForwardColumns
from gradwatch.agent.health_layout import HealthColumns, WindowView, device_skips, health_blocks
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
    health: HealthColumns | None = None  # optimizer state, spikes, noise scale (health_layout.py)
    forward: ForwardColumns | None = None  # attention, logits, activation scale (forward_layout.py)
    width: int = 0
    grad_norm: int = 0  # P columns, then the four RUN_VALUES
    run: int = 0
    grad_bad: int = 0  # P columns: 1 where a gradient's elements hold NaN/Inf (its norm did not overflow)
    param_norm: int = 0
    update_ratio: int = 0
    scalars: int = 0
    act_start: int = 0  # first activation column: zeroed when a step's activations are measured
    act_grad: dict[int, int] = field(default_factory=dict)  # layer -> sum of squares column
    # stat layer -> [shift, sum of y - shift, its sum of squares, non-finite, saturated, dead, non-zero]
    act: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        col = 0
        self.grad_norm = col
        col += self.n_params
        self.run = col
        col += len(RUN_VALUES)
        self.grad_bad = col
        col += self.n_params
        self.param_norm = col
        col += self.n_params
        self.update_ratio = col
        col += self.n_params
        self.scalars = col
        col += MAX_SCALARS
        if self.health is not None:  # before the activation columns, which a measured forward zeroes
            col = self.health.place(col)
        self.act_start = col
        for layer in self.act_layers:
            self.act_grad[layer] = col
            col += 1
        for layer in self.stat_layers:
            self.act[layer] = col
            col += self.act_width(layer)
        if self.forward is not None:  # after the activation columns: a measured forward zeroes them too
            col = self.forward.place(col)
        self.width = col

    def act_width(self, layer: int) -> int:
        return 4 + (1 if layer in self.bounded else 0) + (2 if layer in self.relu else 0)


def standard_metrics(layout: Layout, measure_params: bool, measure_updates: bool,
                     measure_acts: bool) -> list[MetricDef]:
    """The metric table of a run, in a fixed order; user scalars are appended later."""
    defs: list[tuple[str, str, tuple[int, ...]]] = [(name, "run", ()) for name in RUN_VALUES]
    defs += [("skipped", "run", ()), ("nonfinite_params", "run", ()), ("overflow_params", "run", ()),
             ("lr", "group", tuple(range(layout.n_groups))), ("grad_norm", "param", tuple(range(layout.n_params)))]
    if measure_params:
        defs.append(("param_norm", "param", tuple(range(layout.n_params))))
    if measure_updates:
        defs.append(("update_ratio", "param", tuple(range(layout.n_params))))
    if measure_acts:
        stats = tuple(layout.stat_layers)
        defs.append(("act_grad_norm", "layer", tuple(layout.act_layers)))
        if stats:
            defs += [("act_mean", "layer", stats), ("act_std", "layer", stats), ("act_nonfinite", "layer", stats)]
        if layout.bounded:
            defs.append(("saturation_ratio", "layer", tuple(layout.bounded)))
        if layout.relu:
            defs += [("dead_ratio", "layer", tuple(layout.relu)), ("zero_ratio", "layer", tuple(layout.relu))]
        if layout.forward is not None:
            defs += layout.forward.metrics()
    if layout.health is not None:
        defs += layout.health.metrics(measure_params, measure_updates)
    return [MetricDef(i, name, scope, idx) for i, (name, scope, idx) in enumerate(defs)]  # type: ignore[arg-type]


@dataclass
class HostRows:
    """Host-side values of each row of a window, written by the training thread."""

    steps: np.ndarray
    measured: np.ndarray  # bool: the step's gradients were measured (some param had one)
    skipped: np.ndarray
    lr: np.ndarray
    lr_present: np.ndarray  # bool (rows, groups): the group's lr was a number
    scalar_count: np.ndarray  # int (rows, MAX_SCALARS): times a scalar was logged for that step (summed on the device)
    param_due: np.ndarray
    update_due: np.ndarray
    act_count: np.ndarray  # forward passes measured per act layer (rows, n_act)
    act_grad_count: np.ndarray  # output gradients measured per act layer
    act_elems: np.ndarray  # output elements summed over those passes
    act_units: np.ndarray  # output units (features / channels) summed over those passes
    # health_layout.host_arrays, installed by the health measurements when a run has them
    health: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def empty(cls, rows: int, n_groups: int, n_act: int) -> HostRows:
        return cls(np.zeros(rows, np.int64), np.zeros(rows, bool), np.zeros(rows, np.float32),
                   np.full((rows, n_groups), np.nan, np.float32), np.zeros((rows, n_groups), bool),
                   np.zeros((rows, MAX_SCALARS), np.int64),
                   np.zeros(rows, bool), np.zeros(rows, bool),
                   np.zeros((rows, n_act), np.int64), np.zeros((rows, n_act), np.int64),
                   np.zeros((rows, n_act), np.int64), np.zeros((rows, n_act), np.int64))

    def take(self, rows: np.ndarray) -> HostRows:
        """A copy of the given rows, safe to hand to another thread."""
        return HostRows(*(getattr(self, f)[rows].copy() for f in self.__dataclass_fields__ if f != "health"),
                        health={k: v[rows].copy() for k, v in self.health.items()})


@dataclass
class WindowResult:
    """What a window of rows turns into: run log blocks and the latest values per metric."""

    blocks: list[tuple[int, np.ndarray, np.ndarray, np.ndarray | None]]  # id, steps, values, present
    latest: dict[str, tuple[int, np.ndarray, np.ndarray]]  # metric -> (step, values of its columns, measured)


def window_blocks(layout: Layout, metrics: dict[str, MetricDef], values: np.ndarray, host: HostRows,
                  scalar_ids: list[int]) -> WindowResult:
    """Turn device rows (already on the host, `values[i]` for `host.steps[i]`) into blocks.

    Every block says which of its values were measured (`present`); NaN and Inf in a
    measured value are kept as they are. Pure function: the writer thread calls it, tests
    call it directly.
    """
    blocks: list[tuple[int, np.ndarray, np.ndarray, np.ndarray | None]] = []
    latest: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}

    def add(name: str, rows: np.ndarray, cols: np.ndarray, present: np.ndarray | None = None) -> None:
        """Rows `rows` (a bool mask over the window) of metric `name`; `present` masks those rows' columns."""
        metric = metrics.get(name)
        if metric is None or not rows.any():
            return
        steps = host.steps[rows]
        cols = cols.astype(np.float32, copy=False).reshape(steps.size, metric.width)
        if present is not None:
            present = present.reshape(steps.size, metric.width)
            if present.all():
                present = None
        blocks.append((metric.id, steps, cols, present))
        latest[name] = (int(steps[-1]), cols[-1], np.ones(metric.width, bool) if present is None else present[-1])

    p, r = layout.n_params, layout.run
    measured = host.measured
    skipped = np.where(device_skips(layout.health, values, host.steps, host.health), np.float32(1), host.skipped)
    applied = measured & (skipped == 0)
    if layout.clip_mode == "none":
        values[applied, r + 1] = values[applied, r]
        values[applied, r + 2] = 1.0
    grad = values[:, layout.grad_norm:layout.grad_norm + p]
    has_grad = grad != NO_GRAD
    elements_bad = values[:, layout.grad_bad:layout.grad_bad + p] > 0
    overflowed = np.isinf(grad) & ~elements_bad
    # Per param, for snapshot(); not a metric, and no scalar passed to log(**kw) can have this name.
    latest["<nonfinite>"] = (int(host.steps[-1]), elements_bad[-1] | overflowed[-1], has_grad[-1])
    add("grad_norm", measured, grad[measured], has_grad[measured])
    add("grad_norm_total", measured, values[measured, r])
    add("grad_norm_total_clipped", applied, values[applied, r + 1])
    add("clip_coef", applied, values[applied, r + 2])
    if layout.clip_mode not in ("none", "value", "agc"):
        add("clip_threshold", applied, values[applied, r + 3])
    every = np.ones(host.steps.size, bool)
    add("skipped", every, skipped)
    add("nonfinite_params", measured, elements_bad[measured].sum(axis=1))
    add("overflow_params", measured, overflowed[measured].sum(axis=1))
    add("lr", every, host.lr, host.lr_present)
    add("param_norm", host.param_due, values[host.param_due, layout.param_norm:layout.param_norm + p])
    add("update_ratio", host.update_due, values[host.update_due, layout.update_ratio:layout.update_ratio + p])
    _activation_blocks(layout, values, host, add)
    if layout.health is not None:
        view = WindowView(values, host.steps, host.health, measured, host.param_due, host.update_due, host.lr, grad,
                          values[:, layout.param_norm:layout.param_norm + p] if "param_norm" in metrics else None,
                          values[:, layout.update_ratio:layout.update_ratio + p] if "update_ratio" in metrics else None)
        health_blocks(layout.health, view, add)
    for slot, metric_id in enumerate(scalar_ids):
        counts = host.scalar_count[:, slot]
        logged = counts > 0
        name = next((n for n, m in metrics.items() if m.id == metric_id), None)
        if name is not None and logged.any():
            add(name, logged, values[logged, layout.scalars + slot] / counts[logged])  # the mean of a step's calls
    return WindowResult(blocks, latest)


def _activation_blocks(layout: Layout, values: np.ndarray, host: HostRows,
                       add: Callable[[str, np.ndarray, np.ndarray, np.ndarray], None]) -> None:
    """The activation statistics of the rows whose forward pass was measured."""
    rows = host.act_count.sum(axis=1) > 0
    if not layout.act_layers or not rows.any():
        return
    v = values[rows]
    counts, grad_counts = host.act_count[rows], host.act_grad_count[rows]
    elems, units = host.act_elems[rows].astype(np.float64), host.act_units[rows].astype(np.float64)
    slot = {layer: j for j, layer in enumerate(layout.act_layers)}
    stats = [layer for layer in layout.act_layers if layer in layout.act]

    def per(layers: list[int], column: Callable[[int, int], np.ndarray], seen: np.ndarray) -> tuple[np.ndarray, ...]:
        idx = [slot[layer] for layer in layers]
        cols = np.stack([column(layer, slot[layer]) for layer in layers], axis=1)
        return cols, seen[:, idx]

    with np.errstate(divide="ignore", invalid="ignore"):
        add("act_grad_norm", rows, *per(layout.act_layers, lambda la, j: np.sqrt(v[:, layout.act_grad[la]]),
                                        grad_counts > 0))
        if stats:
            measured = counts > 0
            shift = lambda la: v[:, layout.act[la]].astype(np.float64)  # noqa: E731
            mean_d = lambda la, j: v[:, layout.act[la] + 1] / elems[:, j]  # noqa: E731
            add("act_mean", rows, *per(stats, lambda la, j: shift(la) + mean_d(la, j), measured))
            add("act_std", rows, *per(stats, lambda la, j: np.sqrt(np.maximum(
                v[:, layout.act[la] + 2].astype(np.float64) / elems[:, j] - mean_d(la, j) ** 2, 0.0)), measured))
            add("act_nonfinite", rows, *per(stats, lambda la, j: v[:, layout.act[la] + 3], measured))
        if layout.bounded:
            add("saturation_ratio", rows, *per(layout.bounded, lambda la, j: v[:, layout.act[la] + 4] / elems[:, j],
                                               counts > 0))
        if layout.relu:
            extra = {la: layout.act[la] + 4 + (1 if la in layout.bounded else 0) for la in layout.relu}
            add("dead_ratio", rows, *per(layout.relu, lambda la, j: v[:, extra[la]] / units[:, j], counts > 0))
            # the column counts non-zeros
            add("zero_ratio", rows, *per(layout.relu, lambda la, j: 1.0 - v[:, extra[la] + 1] / elems[:, j],
                                         counts > 0))
    if layout.forward is not None:
        layout.forward.add_blocks(layout.act, v, counts, elems, slot, rows, add)
