"""Where the optimizer-health, spike and noise-scale measurements live in the statistics buffer,
and how a window of them becomes run log blocks on the host.

The device holds per-param Adam statistics, the spike detector's columns and the noise-scale
estimates; the host knows which rows hold what (step stamps in `HostRows.health`) and derives,
at no cost to the training thread, the per-layer aggregates and the weight-decay equilibria
each layer's ratios are judged against. Pure numpy: the writer thread runs it, tests call it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: Per param, every `measure.optimizer_every` steps (docs/runlog.md defines each).
ADAM_METRICS = ("adam_update_rms", "adam_eps_frac", "adam_v_lag")
#: The same per layer, over all the layer's measured elements.
LAYER_ADAM_METRICS = ("layer_adam_update_rms", "layer_adam_eps_frac", "layer_adam_v_lag")
SPIKE_METRICS = ("loss_z", "grad_norm_z", "spike_count", "skip_rate")
NOISE_METRICS = ("gns_grad_sq", "gns_trace", "noise_scale")
#: Spike columns, in order: z of the loss, z of the total norm, spike (0/1), spikes so far,
#: update skipped on the device (0/1), skip rate.
LOSS_Z, NORM_Z, FLAG, COUNT, SKIP, RATE = range(6)
SPIKE_WIDTH = 6
#: Host stamps: the step each row's values of a kind belong to (-1: none), so a row reused by a
#: later step, or never reached by the hooks (an iteration the AMP scaler skipped), is never
#: read as measured.
STAMPS = ("opt_step", "lag_step", "spike_step", "loss_z_step", "norm_z_step", "spike_sync", "noise_step",
          "band_step")


@dataclass
class OptimizerTable:
    """Per param: its layer, element count, param group (-1: none) and whether it is a
    scale-invariant weight (a Linear/Conv weight directly followed by a normalisation layer);
    per group, whether the update-ratio equilibrium √(2·lr·wd) (decoupled weight decay, or plain
    SGD) and the grad-ratio equilibrium √(2·wd/lr) (plain SGD, Defazio 2025) apply."""

    param_layer: list[int]
    numel: list[int]
    param_group: list[int]
    normalized: list[bool]
    update_equilibrium: list[bool]
    grad_equilibrium: list[bool]


@dataclass
class HealthColumns:
    """Which of the families a run measures, and their column offsets (set by `place`)."""

    table: OptimizerTable
    adam: bool
    spikes: bool
    noise: bool
    n_groups: int = 0
    adam_start: int = 0  # 3 x P columns: update RMS, ε fraction, lag
    spike_start: int = 0  # SPIKE_WIDTH columns
    noise_start: int = 0  # 3 columns: |G|² estimate, tr(Σ) estimate, noise scale
    end: int = 0

    @property
    def n_params(self) -> int:
        return len(self.table.numel)

    def place(self, col: int) -> int:
        """Give every measured family its columns from `col` on; the first column after them."""
        p = self.n_params
        self.adam_start = col
        col += 3 * p if self.adam else 0
        self.spike_start = col
        col += SPIKE_WIDTH if self.spikes else 0
        self.noise_start = col
        col += 3 if self.noise else 0
        self.end = col
        return col

    def adam_layers(self) -> tuple[int, ...]:
        """Layers with a param in the optimizer: those the Adam statistics and update ratios cover."""
        t = self.table
        return tuple(sorted({t.param_layer[i] for i in range(self.n_params) if t.param_group[i] >= 0}))

    def normalized_layers(self) -> tuple[int, ...]:
        t = self.table
        return tuple(sorted({t.param_layer[i] for i in range(self.n_params) if t.normalized[i]
                             and t.param_group[i] >= 0}))

    def metrics(self, measure_params: bool, measure_updates: bool) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, scope, indices) of every metric these columns give, in a fixed order."""
        params = tuple(range(self.n_params))
        out: list[tuple[str, str, tuple[int, ...]]] = []
        if self.adam:
            out += [(name, "param", params) for name in ADAM_METRICS]
            out += [(name, "layer", self.adam_layers()) for name in LAYER_ADAM_METRICS]
        normalized = self.normalized_layers()
        if measure_updates and self.adam_layers():
            out.append(("update_to_weight", "layer", self.adam_layers()))
            if normalized and any(self.table.update_equilibrium):
                out.append(("update_to_weight_equilibrium", "layer", normalized))
        if measure_params and normalized:
            out.append(("grad_to_weight", "layer", normalized))
            if any(self.table.grad_equilibrium):
                out.append(("grad_to_weight_equilibrium", "layer", normalized))
        if self.spikes:
            out += [(name, "run", ()) for name in SPIKE_METRICS]
        if self.noise:
            out += [(name, "run", ()) for name in NOISE_METRICS]
        return out


def host_arrays(rows: int, n_params: int, n_groups: int) -> dict[str, np.ndarray]:
    """The host-side arrays of a window (`HostRows.health`): step stamps, per-param presence of
    the Adam statistics, and each group's weight decay at the rows whose bands are derived."""
    out = {name: np.full(rows, -1, np.int64) for name in STAMPS}
    out["opt_present"] = np.zeros((rows, n_params), bool)
    out["lag_present"] = np.zeros((rows, n_params), bool)
    out["wd"] = np.full((rows, n_groups), np.nan)
    return out


@dataclass
class WindowView:
    """What `health_blocks` reads of a window: device values and the host's rows."""

    values: np.ndarray
    steps: np.ndarray
    arrays: dict[str, np.ndarray]
    measured: np.ndarray
    param_due: np.ndarray
    update_due: np.ndarray
    lr: np.ndarray
    grad_norm: np.ndarray  # (rows, P), NO_GRAD (-1) where a param had no gradient
    param_norm: np.ndarray | None = None
    update_ratio: np.ndarray | None = None

    def at(self, stamp: str) -> np.ndarray:
        """Rows whose `stamp` is their own step."""
        return self.arrays[stamp] == self.steps


def device_skips(h: HealthColumns | None, values: np.ndarray, steps: np.ndarray,
                 arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Rows whose update the spike guard skipped on the device (a fused optimizer's 0/1 factor)."""
    if h is None or not h.spikes:
        return np.zeros(steps.size, bool)
    return (arrays["spike_step"] == steps) & (values[:, h.spike_start + SKIP] > 0)


Add = Callable[..., None]


def _put(add: Add, name: str, rows: np.ndarray, values: np.ndarray, present: np.ndarray | None = None) -> None:
    """`add` the rows of `rows` (a mask over the window) that have a measured column."""
    if present is not None:
        keep = present.any(axis=1)
        if not keep.all():
            rows = rows.copy()
            rows[rows] = keep
            values, present = values[keep], present[keep]
    add(name, rows, values, present)


def health_blocks(h: HealthColumns, w: WindowView, add: Add) -> None:
    """Add the blocks of every optimizer-health, spike and noise-scale metric of a window."""
    p = h.n_params
    if h.adam:
        rms, frac, lag = (w.values[:, h.adam_start + k * p:h.adam_start + (k + 1) * p] for k in range(3))
        opt, lagged = w.at("opt_step"), w.at("lag_step")
        present, lag_present = w.arrays["opt_present"], w.arrays["lag_present"]
        _put(add, "adam_update_rms", opt, rms[opt], present[opt])
        _put(add, "adam_eps_frac", opt, frac[opt], present[opt])
        _put(add, "adam_v_lag", lagged, lag[lagged], lag_present[lagged])
        layers = h.adam_layers()
        onehot = _layer_matrix(h, layers)
        _layer_mean(add, "layer_adam_update_rms", opt, np.square(rms[opt]), present[opt], h, onehot, root=True)
        _layer_mean(add, "layer_adam_eps_frac", opt, frac[opt], present[opt], h, onehot)
        _layer_mean(add, "layer_adam_v_lag", lagged, lag[lagged], lag_present[lagged], h, onehot)
    _band_blocks(h, w, add)
    if h.spikes:
        s = h.spike_start
        add("loss_z", w.at("loss_z_step"), w.values[w.at("loss_z_step"), s + LOSS_Z])
        add("grad_norm_z", w.at("norm_z_step"), w.values[w.at("norm_z_step"), s + NORM_Z])
        ran = w.at("spike_step")
        add("spike_count", ran, w.values[ran, s + COUNT])
        add("skip_rate", ran, w.values[ran, s + RATE])
    if h.noise:
        rows = w.at("noise_step")
        for k, name in enumerate(NOISE_METRICS):
            add(name, rows, w.values[rows, h.noise_start + k])


def _layer_matrix(h: HealthColumns, layers: tuple[int, ...]) -> np.ndarray:
    """(P, len(layers)) 0/1: which param belongs to which of `layers`."""
    m = np.zeros((h.n_params, len(layers)))
    col = {layer: j for j, layer in enumerate(layers)}
    for i, layer in enumerate(h.table.param_layer):
        if layer in col:
            m[i, col[layer]] = 1.0
    return m


def _layer_mean(add: Add, name: str, rows: np.ndarray, values: np.ndarray, present: np.ndarray, h: HealthColumns,
                onehot: np.ndarray, root: bool = False) -> None:
    """Per layer, the element-weighted mean of its measured params' values (√ of it with `root`)."""
    if not rows.any() or not onehot.size:
        return
    weights = np.where(present, np.asarray(h.table.numel, np.float64), 0.0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        total = np.where(present, values.astype(np.float64), 0.0) * weights
        mean = (total @ onehot) / (weights @ onehot)
    _put(add, name, rows, np.sqrt(mean) if root else mean, (weights @ onehot) > 0)


def _band_blocks(h: HealthColumns, w: WindowView, add: Add) -> None:
    """Per layer: the update ratio ‖Δθ‖/‖θ‖ from its params', and for scale-invariant weights the
    grad ratio ‖g‖/‖θ‖ and the equilibria √(2·lr·wd) and √(2·wd/lr) of their group."""
    t = h.table
    layers, normalized = h.adam_layers(), h.normalized_layers()
    in_opt = np.array([g >= 0 for g in t.param_group], bool)
    if w.update_ratio is not None and w.param_norm is not None and layers:
        rows = w.update_due
        pn = w.param_norm[rows].astype(np.float64)
        delta = w.update_ratio[rows].astype(np.float64) * np.maximum(pn, 1e-12)
        onehot = _layer_matrix(h, layers) * in_opt[:, None]
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            add("update_to_weight", rows, np.sqrt(np.square(delta) @ onehot) / np.sqrt(np.square(pn) @ onehot))
    if not normalized:
        return
    mask = np.array(t.normalized, bool) & in_opt
    onehot = _layer_matrix(h, normalized) * mask[:, None]
    group = [t.param_group[int(np.flatnonzero(onehot[:, j])[0])] for j in range(len(normalized))]
    banded = w.at("band_step")
    if w.param_norm is not None:
        rows = w.param_due & w.measured
        g = w.grad_norm[rows].astype(np.float64)
        has = g >= 0
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            num = np.square(np.where(has, g, 0.0)) @ onehot
            den = np.square(w.param_norm[rows].astype(np.float64)) @ onehot
            _put(add, "grad_to_weight", rows, np.sqrt(num) / np.sqrt(den), (has.astype(float) @ onehot) > 0)
        _equilibrium(add, "grad_to_weight_equilibrium", rows & banded, w, group, t.grad_equilibrium,
                     lambda lr, wd: np.sqrt(2.0 * wd / lr))
    if w.update_ratio is not None:
        _equilibrium(add, "update_to_weight_equilibrium", w.update_due & banded, w, group, t.update_equilibrium,
                     lambda lr, wd: np.sqrt(2.0 * lr * wd))


def _equilibrium(add: Add, name: str, rows: np.ndarray, w: WindowView, group: list[int], applies: list[bool],
                 formula: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
    """Each scale-invariant layer's equilibrium from its group's lr and weight decay, where the
    group has both (> 0) and the formula applies to its optimizer."""
    if not rows.any():
        return
    lr = w.lr[rows][:, group].astype(np.float64)
    wd = w.arrays["wd"][rows][:, group]
    ok = np.array([applies[g] for g in group], bool)[None, :] & (lr > 0) & (wd > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        _put(add, name, rows, np.where(ok, formula(lr, wd), np.nan), ok)
