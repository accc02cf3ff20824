"""Read a run from the store into a `RunData`: the bridge between the query API and the rules.

`RunWindow` keeps the last `steps` steps of one run up to date incrementally: each
`refresh()` reads, in one store read, only the rows stored since the previous one (bounded
by the step rank 0's log had reached, so a batch committed in between is never read in part;
series that did not move are not read at all) and drops what fell out of the window.
`load_run_data` is the same reader with no bound, for a whole run: the service's live rules
and `gradwatch diagnose` see data built by one code path.
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
#: Per-param-group metrics the rules read.
GROUP_METRICS = ("lr",)
#: Per-param metrics, read into the run-level `param_norm_total` (L2 over the params) and, for a
#: run without gradient-flow measurements, the per-layer `grad_norm` (L2 over the layer's params).
PARAM_NORM, PARAM_GRAD = "param_norm", "grad_norm"
FLOW = "act_grad_norm"
#: What every refresh reads: a handful of series.
FAST_METRICS = RUN_METRICS + GROUP_METRICS

_EMPTY_STEPS = np.array([], dtype=np.int64)
Histories = dict[int, tuple[np.ndarray, np.ndarray]]


def layer_matrix(histories: Histories, n_layers: int) -> Series:
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


def l2(parts: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Per step, the L2 norm over the parts that have a value there (a layer's grad_norm from its
    params', the total param norm from every param's); a NaN or Inf part makes that step's NaN or Inf."""
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return _EMPTY_STEPS, np.array([], dtype=np.float64)
    steps = np.unique(np.concatenate([p[0] for p in parts]))
    total = np.zeros(len(steps), dtype=np.float64)
    for s, v in parts:
        total[np.searchsorted(steps, s)] += v * v
    return steps, np.sqrt(total)


def _append(old: Series | None, new: Series) -> Series:
    """`new` (later steps) after `old`; a matrix keeps its presence mask."""
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
        stored = store.layers(run_id)
        self.name = summary.run.name
        self.layers = tuple(LayerInfo(ly.index, ly.name, ly.type, ly.kind, ly.family) for ly in stored)
        self._row_of = {ly.index: row for row, ly in enumerate(stored)}
        self._params_of = {row: ly.params for row, ly in enumerate(stored) if ly.params}
        self._groups = 1 + max([int(g.get("index", i)) for i, g in enumerate(summary.groups)], default=0)
        self._init_check = tuple(summary.init_check)
        self._config = dict(summary.config)
        self._has_flow = summary.metrics.get(FLOW) == "layer"
        self._run: dict[str, Series] = {}
        self._layer: dict[str, Series] = {}
        self._group: dict[str, Series] = {}
        self._events: list[dict[str, Any]] = []
        self._last_event_id = 0  # events are read by id: one stored late for an earlier step is still read
        self.last_step: int | None = None  # every run-level row up to this step has been read
        self.layer_step: int | None = None  # and every layer and param row up to this one
        self._data: RunData | None = None

    def refresh(self, until: int | None = None, layers: bool = True) -> bool:
        """Read what was stored after the last read, up to step `until` (default: where rank 0's
        log stands); True when something new was read. Run-level and group metrics are read
        every time; layer and param metrics (hundreds of series in a large model) and events
        only with `layers`, from where they were last read, so a caller can read them less often."""
        if until is None:
            until = self._rank0_step()
        read = self._read_events() if layers else False
        if until is not None and (self.last_step is None or until > self.last_step):
            self._read(self._start(self.last_step, until), until, FAST_METRICS)
            self.last_step, read = until, True
        if until is not None and layers and (self.layer_step is None or until > self.layer_step):
            self._read(self._start(self.layer_step, until), until, self._slow_metrics())
            self.layer_step, read = until, True
        if read:
            self._trim()
        return read

    def _start(self, read_to: int | None, until: int) -> int | None:
        """Where to read from: after what was read, and never before the window."""
        start = None if read_to is None else read_to + 1
        if self.steps is not None and (start is None or until - start >= self.steps):
            start = max(0, until - self.steps + 1)
        return start

    @property
    def data(self) -> RunData:
        """The window as a `RunData` for the rules (rebuilt only after a refresh read something)."""
        if self._data is None:
            self._data = RunData(self.run_id, self.name, self.layers, run=dict(self._run),
                                 layer={m: s for m, s in self._layer.items() if len(s.steps)},
                                 group={m: s for m, s in self._group.items() if len(s.steps)},
                                 events=tuple(self._events), init_check=self._init_check, config=self._config)
        return self._data

    # ------------------------------------------------------------------ reading

    def _rank0_step(self) -> int | None:
        steps = [log.last_step for log in self.store.logs(self.run_id) if log.rank == 0 and log.last_step is not None]
        return max(steps) if steps else None

    def _read_events(self) -> bool:
        new = [e for e in self.store.events(self.run_id, after_id=self._last_event_id) if e.rank == 0]
        if not new:
            return False
        self._last_event_id = max(e.id for e in new)
        self._events = sorted(self._events + [{"kind": e.kind, "step": e.step, "data": e.data} for e in new],
                              key=lambda e: int(e["step"]))
        self._data = None
        return True

    def _slow_metrics(self) -> tuple[str, ...]:
        """Layer and param metrics; per-param grad_norm only for a run without gradient flow."""
        if not self._has_flow:
            self._has_flow = self.store.metric_names(self.run_id).get(FLOW) == "layer"
        return LAYER_METRICS + (PARAM_NORM,) + (() if self._has_flow else (PARAM_GRAD,))

    def _read(self, start: int | None, end: int | None, metrics: tuple[str, ...]) -> None:
        """Append the rows in [start, end] (unbounded where None) of `metrics`."""
        got = self.store.histories(self.run_id, metrics, start, end)  # series that did not move: unread
        for metric in RUN_METRICS:
            series = got.get(metric, {}).get(0)
            if series is not None:
                self._run[metric] = _append(self._run.get(metric), Series(series.steps, series.values))
        if got.get(PARAM_NORM):
            steps, values = l2((s.steps, s.values) for s in got[PARAM_NORM].values())
            self._run["param_norm_total"] = _append(self._run.get("param_norm_total"), Series(steps, values))
        for metric in LAYER_METRICS:
            rows = {self._row_of[e]: (s.steps, s.values) for e, s in got.get(metric, {}).items()
                    if e in self._row_of and len(s.steps)}
            self._add(self._layer, metric, rows, len(self.layers))
        if got.get(PARAM_GRAD):
            grads = {p: (s.steps, s.values) for p, s in got[PARAM_GRAD].items()}
            rows = {row: l2(grads[p] for p in ps if p in grads) for row, ps in self._params_of.items()
                    if any(p in grads for p in ps)}
            self._add(self._layer, PARAM_GRAD, rows, len(self.layers))
        for metric in GROUP_METRICS:
            rows = {e: (s.steps, s.values) for e, s in got.get(metric, {}).items() if 0 <= e < self._groups}
            self._add(self._group, metric, rows, self._groups)
        self._data = None

    @staticmethod
    def _add(into: dict[str, Series], metric: str, rows: Histories, n_rows: int) -> None:
        if rows:
            into[metric] = _append(into.get(metric), layer_matrix(rows, n_rows))

    def _trim(self) -> None:
        """Drop what fell out of the window; the next `data` is rebuilt."""
        self._data = None
        if self.steps is None or self.last_step is None:
            return
        first = self.last_step - self.steps + 1
        self._run = {m: _after(s, first) for m, s in self._run.items()}
        self._layer = {m: _after(s, first) for m, s in self._layer.items()}
        self._group = {m: _after(s, first) for m, s in self._group.items()}
        self._events = [e for e in self._events if int(e["step"]) >= first]


def load_run_data(store: Store, run_id: str) -> RunData:
    """Everything the rules and plots need about one run (rank 0), read through the query API."""
    window = RunWindow(store, run_id)
    window._read_events()
    window._read(None, None, FAST_METRICS + window._slow_metrics())
    return window.data
