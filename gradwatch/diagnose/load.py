"""Read a run from the store into a `RunData`: the bridge between the query API and the rules.

`RunWindow` keeps the last `steps` steps of one run up to date incrementally: each
`refresh()` reads only the rows stored since the previous one (bounded by the step rank 0's
log had reached, so a batch committed in between is never read in part) and drops what fell
out of the window. `load_run_data` is the same reader with no bound, for a whole run: the
service's live rules and `gradwatch diagnose` see data built by one code path.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from gradwatch.diagnose.rundata import LayerInfo, RunData, Series

if TYPE_CHECKING:
    from gradwatch.store import Store

#: Run-level metrics the rules and plots read, when the run has them.
RUN_METRICS = ("grad_norm_total", "grad_norm_total_clipped", "clip_coef", "clip_threshold", "loss",
               "nonfinite_params", "overflow_params", "skipped")
#: Layer-level metrics the rules and plots read, when the run has them.
LAYER_METRICS = ("act_grad_norm", "saturation_ratio", "dead_ratio", "act_nonfinite")

_EMPTY_STEPS = np.array([], dtype=np.int64)


def layer_matrix(histories: dict[int, tuple[np.ndarray, np.ndarray]], n_layers: int) -> Series:
    """Stack per-layer (steps, values) histories on the union of their steps; where a layer has
    no value the mask says not present (and the value is NaN)."""
    steps = np.unique(np.concatenate([h[0] for h in histories.values()])) if histories else _EMPTY_STEPS
    values = np.full((n_layers, len(steps)), np.nan)
    present = np.zeros((n_layers, len(steps)), dtype=bool)
    for row, (s, v) in histories.items():
        cols = np.searchsorted(steps, s)
        values[row, cols] = v
        present[row, cols] = True
    return Series(steps.astype(np.int64), values, present)


def _append(old: Series | None, new: Series) -> Series:
    """`new` (later steps) after `old`; a layer matrix keeps its presence mask."""
    if old is None or not len(old.steps):
        return new
    if not len(new.steps):
        return old
    present = None if old.present is None else np.concatenate([old.present, new.present], axis=-1)
    return Series(np.concatenate([old.steps, new.steps]), np.concatenate([old.values, new.values], axis=-1),
                  present)


def _after(series: Series, first: int) -> Series:
    """The part of `series` from step `first` on."""
    k = int(np.searchsorted(series.steps, first))
    if k == 0:
        return series
    present = None if series.present is None else series.present[..., k:]
    return Series(series.steps[k:], series.values[..., k:], present)


def _l2(parts: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Per step, the L2 norm over the parts that have a value there (a layer's grad_norm from
    its params'); a NaN or Inf part makes that step's norm NaN or Inf."""
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return _EMPTY_STEPS, np.array([], dtype=np.float64)
    steps = np.unique(np.concatenate([p[0] for p in parts]))
    total = np.zeros(len(steps), dtype=np.float64)
    for s, v in parts:
        total[np.searchsorted(steps, s)] += v * v
    return steps, np.sqrt(total)


class RunWindow:
    """One run's measurements over its last `steps` steps (all of them when None), as a `RunData`
    refreshed incrementally from the store. Rank 0, as everything diagnosis reads."""

    def __init__(self, store: Store, run_id: str, steps: int | None = None) -> None:
        if steps is not None and steps < 1:
            raise ValueError(f"a window holds at least 1 step, got {steps}")
        self.store = store
        self.run_id = run_id
        self.steps = steps
        summary = store.run_summary(run_id)
        self.name = summary.run.name
        stored = store.layers(run_id)
        self.layers = tuple(LayerInfo(ly.index, ly.name, ly.type, ly.kind, ly.family) for ly in stored)
        self._params_of = {row: ly.params for row, ly in enumerate(stored)}
        self._init_check = tuple(summary.init_check)
        self._config = dict(summary.config)
        self._metrics: dict[str, str] = {}
        self._run: dict[str, Series] = {}
        self._layer: dict[str, Series] = {}
        self._events: list[dict[str, Any]] = []
        self._last_event_id = 0
        self.last_step: int | None = None  # every row up to this step has been read
        self._data: RunData | None = None

    def refresh(self, until: int | None = None) -> bool:
        """Read what was stored after `last_step`, up to step `until` (default: where rank 0's log
        stands); True when something new was read."""
        if until is None:
            until = self._rank0_step()
        new_events = self._read_events()
        if until is None or (self.last_step is not None and until <= self.last_step):
            if new_events:
                self._trim()
            return bool(new_events)
        start = None if self.last_step is None else self.last_step + 1
        if self.steps is not None and (start is None or until - start >= self.steps):
            start = max(0, until - self.steps + 1)
        self._metrics = self.store.metric_names(self.run_id)
        for metric in RUN_METRICS:
            if self._metrics.get(metric) == "run":
                got = self.store.run_series(self.run_id, metric, start=start, end=until)
                self._run[metric] = _append(self._run.get(metric), Series(got.steps, got.values))
        for metric, histories in self._layer_reads(start, until):
            self._layer[metric] = _append(self._layer.get(metric), layer_matrix(histories, len(self.layers)))
        self.last_step = until
        self._trim()
        return True

    @property
    def data(self) -> RunData:
        """The window as a `RunData` for the rules (rebuilt only after a refresh read something)."""
        if self._data is None:
            self._data = RunData(self.run_id, self.name, self.layers, run=dict(self._run),
                                 layer={m: s for m, s in self._layer.items() if len(s.steps)},
                                 events=tuple(self._events), init_check=self._init_check, config=self._config)
        return self._data

    # ------------------------------------------------------------------ reading

    def _rank0_step(self) -> int | None:
        steps = [log.last_step for log in self.store.logs(self.run_id) if log.rank == 0 and log.last_step is not None]
        return max(steps) if steps else None

    def _read_events(self) -> bool:
        new = [e for e in self.store.events(self.run_id) if e.id > self._last_event_id and e.rank == 0]
        if not new:
            return False
        self._last_event_id = max(e.id for e in new)
        self._events = sorted(self._events + [{"kind": e.kind, "step": e.step, "data": e.data} for e in new],
                              key=lambda e: int(e["step"]))
        self._data = None
        return True

    def _layer_reads(self, start: int | None, end: int) -> list[tuple[str, dict[int, tuple[np.ndarray, np.ndarray]]]]:
        from gradwatch.store import UnknownEntity, UnknownMetric

        wanted = [m for m in LAYER_METRICS if self._metrics.get(m) == "layer"]
        out = []
        for metric in wanted:
            histories = {}
            for row, ly in enumerate(self.layers):
                try:
                    got = self.store.layer_history(self.run_id, ly.index, metric, start=start, end=end)
                except (UnknownMetric, UnknownEntity):
                    continue
                if len(got.steps):
                    histories[row] = (got.steps, got.values)
            out.append((metric, histories))
        if "act_grad_norm" not in wanted and self._metrics.get("grad_norm") == "param":
            params = {int(p): (s.steps, s.values) for p, s in self._param_grad_norms(start, end).items()}
            out.append(("grad_norm", {row: _l2(params[p] for p in ps if p in params)
                                      for row, ps in self._params_of.items() if any(p in params for p in ps)}))
        return out

    def _param_grad_norms(self, start: int | None, end: int) -> dict[int, Any]:
        from gradwatch.store import UnknownEntity, UnknownMetric

        out = {}
        for ps in self._params_of.values():
            for p in ps:
                try:
                    out[p] = self.store.param_history(self.run_id, p, "grad_norm", start=start, end=end)
                except (UnknownMetric, UnknownEntity):
                    continue
        return out

    def _trim(self) -> None:
        """Drop what fell out of the window; the next `data` is rebuilt."""
        self._data = None
        if self.steps is None or self.last_step is None:
            return
        first = self.last_step - self.steps + 1
        self._run = {m: _after(s, first) for m, s in self._run.items()}
        self._layer = {m: _after(s, first) for m, s in self._layer.items()}
        self._events = [e for e in self._events if int(e["step"]) >= first]


def load_run_data(store: Store, run_id: str) -> RunData:
    """Everything the rules and plots need about one run (rank 0), read through the query API."""
    window = RunWindow(store, run_id)
    window.refresh(until=_last_stored_step(store, run_id))
    return window.data


def _last_stored_step(store: Store, run_id: str) -> int | None:
    """The last step of any stored series of rank 0 (a run read whole needs no log to bound it)."""
    steps = [v.step for v in store.latest(run_ids=[run_id]) if v.rank == 0]
    return max(steps) if steps else None
