"""The measured data of one run, as plain arrays: what diagnosis and plots work on."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


@dataclass(frozen=True)
class LayerInfo:
    """A layer of the model, in model order (so `index` is depth)."""

    index: int
    name: str
    type: str
    kind: str
    family: str | None = None

    @property
    def is_recurrent(self) -> bool:
        """True for RNN, LSTM and GRU modules (and their cells)."""
        return self.type.removesuffix("Cell") in ("RNN", "LSTM", "GRU")

    @property
    def is_norm(self) -> bool:
        """True for normalisation layers (BatchNorm, LayerNorm, GroupNorm, ...)."""
        return "Norm" in self.type


@dataclass(frozen=True)
class _Rolling:
    """What `Series.rolling` computed: position j of the series holds `arrays[j + shift]`, for
    lo <= j < hi (the others must be computed)."""

    lookback: int
    arrays: tuple[np.ndarray, ...]
    shift: int
    lo: int
    hi: int


@dataclass(frozen=True)
class Series:
    """A metric over steps: `values` is (n,) for a run-level metric, (layers, n) per layer.

    `present` (same shape, bool) is False where nothing was measured (a layer not measured at
    that step, or not of the metric's family); None means every value was measured. NaN, +Inf
    and -Inf in `values` are measured values wherever `present` is True. A series is never
    changed in place (a window makes a new one as it moves: `then`, `since`), so what rules
    derive from it is kept with it (`derived`, `rolling`).
    """

    steps: np.ndarray
    values: np.ndarray
    present: np.ndarray | None = None
    _derived: dict[Hashable, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    _rolling: dict[Hashable, _Rolling] = field(default_factory=dict, init=False, repr=False, compare=False)

    def derived(self, key: Hashable, compute: Callable[[Series], T]) -> T:
        """`compute(self)`, computed once per `key`: rules that need the same medians or spikes
        of a series share them, and a live window's series that did not move keeps them from one
        evaluation to the next. The key names the computation and every threshold it reads."""
        if key not in self._derived:
            self._derived[key] = compute(self)
        return self._derived[key]  # type: ignore[no-any-return]

    def rolling(self, key: Hashable, lookback: int, compute: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, ...]],
                first: int = 0) -> tuple[np.ndarray, ...]:
        """`compute(values, positions)` at every position of a run-level series from `first` on
        (the others hold NaN, or 0 for an integer array), for a computation whose result at a
        position depends on the `lookback` values before it and nothing else (the rolling medians
        that spikes are judged against). Kept with the series and carried to the series a
        window makes from it (`then`, `since`), where only the positions whose history changed
        are computed again: the same arrays, for a fraction of the work. The key names the
        computation and everything it depends on but the values."""
        n = self.steps.shape[0]
        first = min(first, n)
        held = self._rolling.get(key)
        if held is not None and (held.shift, held.lo, held.hi) == (0, first, n):
            return held.arrays
        lo, hi = (first, first) if held is None else (max(held.lo, first), held.hi)  # what `held` still holds
        todo = np.concatenate([np.arange(first, lo), np.arange(max(hi, lo), n)])
        arrays = []
        for j, fresh in enumerate(compute(self.values, todo)):
            out = np.full(n, np.nan) if fresh.dtype.kind == "f" else np.zeros(n, dtype=fresh.dtype)
            out[todo] = fresh
            if held is not None and lo < hi:
                out[lo:hi] = held.arrays[j][lo + held.shift:hi + held.shift]
            out.flags.writeable = False  # shared with the series made from this one
            arrays.append(out)
        self._rolling[key] = _Rolling(lookback, tuple(arrays), 0, first, n)
        return tuple(arrays)

    def then(self, new: Series) -> Series:
        """`new` (later steps) after this series; a matrix keeps its presence mask. What `rolling`
        computed here holds for the steps kept."""
        if not len(self.steps):
            return new
        if not len(new.steps):
            return self
        present = None if self.present is None else np.concatenate([self.present, new.present], axis=-1)
        out = Series(np.concatenate([self.steps, new.steps]), np.concatenate([self.values, new.values], axis=-1),
                     present)
        out._rolling.update(self._rolling)
        return out

    def since(self, first: int) -> Series:
        """The part of this series from step `first` on. What `rolling` computed here holds where
        the whole history is still in it."""
        k = int(np.searchsorted(self.steps, first))
        if k == 0:
            return self
        present = None if self.present is None else self.present[..., k:]
        out = Series(self.steps[k:], self.values[..., k:], present)
        for key, r in self._rolling.items():
            lo, hi = max(r.lo - k, r.lookback), r.hi - k
            if lo < hi:
                out._rolling[key] = _Rolling(r.lookback, r.arrays, r.shift + k, lo, hi)
        return out

    def row_medians(self, fraction: float) -> np.ndarray:
        """Each row's median of its measured values over the last `fraction` of the steps (NaN for a
        row with none there): what the rules over a steady state judge."""
        def medians(s: Series) -> np.ndarray:
            window = s.window(fraction)
            med = np.asarray(nanmedian(np.where(window.measured, window.values, np.nan), axis=1))
            med.flags.writeable = False  # shared by every rule that reads it
            return med
        return self.derived(("row_medians", fraction), medians)

    @property
    def measured(self) -> np.ndarray:
        """The presence mask, all True when `present` is None."""
        return np.ones(self.values.shape, dtype=bool) if self.present is None else self.present

    def window(self, fraction: float = 0.5) -> Series:
        """The last `fraction` of the steps (at least one): the steady part of a run."""
        n = self.steps.shape[0]
        k = max(1, int(np.ceil(n * fraction)))
        present = None if self.present is None else self.present[..., n - k :]
        return Series(self.steps[n - k :], self.values[..., n - k :], present)

    def at(self, steps: np.ndarray) -> np.ndarray:
        """A run-level series' values at `steps` (NaN where it has none), to line up two series."""
        out = np.full(len(steps), np.nan)
        idx = np.searchsorted(self.steps, steps)
        ok = idx < len(self.steps)
        ok[ok] = self.steps[idx[ok]] == np.asarray(steps)[ok]
        out[ok] = self.values[idx[ok]]
        return out


@dataclass
class RunData:
    """Everything recorded about one run that diagnosis and plots need.

    `run` holds run-level series by metric name (grad_norm_total, grad_norm_total_clipped,
    clip_coef, clip_threshold, loss, nonfinite_params, overflow_params, ..., and
    `param_norm_total`: the L2 norm over every param's `param_norm`, at the steps where they
    were measured), one value per measured step; `layer` holds per-layer series with one row
    per entry of `layers` (act_grad_norm, grad_norm, saturation_ratio, dead_ratio,
    act_nonfinite, ...) and a presence mask; `group` holds per-param-group series (`lr`), one
    row per group, with a presence mask. `events` are the run's guard events (kind, step,
    data), by step; `init_check` and `config` come from the run log header.

    It may hold only a window of recent steps (the live rules engine): no rule assumes that
    the steps start at 0 or cover the whole run. `starts_run` is False for a window that has
    left out the run's first steps: a rule that judges a value against the ones before it then
    judges only the values whose whole look-back is in the window. Each of them was judged so
    when it arrived; judged again on the shorter history left near the window's start, it
    would only add false alarms.
    """

    run_id: str
    name: str
    layers: tuple[LayerInfo, ...]
    run: dict[str, Series] = field(default_factory=dict)
    layer: dict[str, Series] = field(default_factory=dict)
    group: dict[str, Series] = field(default_factory=dict)
    events: tuple[dict[str, Any], ...] = ()
    init_check: tuple[dict[str, Any], ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    starts_run: bool = True

    def judged_from(self, lookback: int) -> int:
        """The first position of a run-level series whose value a rule with this look-back judges."""
        return 0 if self.starts_run else lookback

    def layer_names(self, rows: np.ndarray | list[int]) -> tuple[str, ...]:
        """Names of the layers at the given row indices."""
        return tuple(self.layers[int(i)].name for i in rows)

    @property
    def clip_config(self) -> dict[str, Any]:
        """The clipping section of the agent config (mode "none" when absent)."""
        clip = self.config.get("clip") or {}
        return {"mode": "none", **clip}


def nanmedian(values: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """`np.nanmedian` without the warning on all-NaN slices (they give NaN), bit for bit, by sorting.

    NumPy takes a masked-array path for slices under 600 values, where 80% of the rules' time
    went; sorting (NaN sorts last) and averaging the middle of each slice's non-NaN values is
    4 times faster. Like NumPy: an odd count takes the middle value, except that along an axis
    of fewer than 600 values it is (x + x) / 2 (which differs only when x + x overflows)."""
    a = np.asarray(values)
    if a.dtype.kind != "f":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmedian(a, axis=axis)
    pairwise = axis is not None and a.ndim > 1 and a.shape[axis] < 600
    s = np.sort(a, axis=None if axis is None else axis)
    if axis is not None and axis % a.ndim != a.ndim - 1:
        s = np.moveaxis(s, axis, -1)
    k = s.shape[-1]
    if k == 0:
        return np.full(s.shape[:-1], np.nan, dtype=a.dtype)[()]
    rows = s.reshape(-1, k)
    n = k - np.isnan(rows).sum(axis=1)  # a row of n values: its middle is at (n - 1) // 2 and n // 2
    r = np.arange(rows.shape[0])
    low, high = rows[r, (n - 1) // 2], rows[r, n // 2]  # no value at all: both NaN (NaN sorts last)
    with np.errstate(over="ignore", invalid="ignore"):  # -Inf + Inf is NaN, as in NumPy
        med = (low + high) / 2
    if not pairwise:
        med = np.where(n % 2 == 1, low, med)
    med = med.reshape(s.shape[:-1])
    return med[()] if med.ndim == 0 else med


def in_sorted(values: np.ndarray, members: np.ndarray) -> np.ndarray:
    """`np.isin(values, members)` for sorted `members` (steps), by binary search: NumPy's `isin`
    costs tens of microseconds even on a handful of values, and the rules call it every
    evaluation."""
    members = np.asarray(members)
    values = np.asarray(values)
    if not members.size:
        return np.zeros(values.shape, dtype=bool)
    idx = np.minimum(np.searchsorted(members, values), members.size - 1)
    return np.asarray(members[idx] == values)
