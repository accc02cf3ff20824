"""Read a run from the store into a `RunData`: the bridge between the query API and the rules.

`RunWindow` keeps the last `steps` steps of one run up to date incrementally, two ways that
give the same data: `refresh()` reads, in one store read, only the rows stored since the
previous one (bounded by the step rank 0's log had reached, so a batch committed in between
is never read in part; series that did not move are not read at all); `feed()` appends the
batches the ingester has just committed from rank 0's log, as that read would have found them
(`gradwatch.diagnose.frames`), with no read at all. Both drop what fell out of the window.
`load_run_data` is the same reader with no bound, for a whole run: the service's live rules
and `gradwatch diagnose` see data built by one code path.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from gradwatch.agent.runlog import Event, Frame
from gradwatch.diagnose import frames as fr
from gradwatch.diagnose.rundata import LayerInfo, RunData, Series

if TYPE_CHECKING:
    from gradwatch.ingest import Batch
    from gradwatch.store import LogInfo, Store

#: Run-level metrics the rules and plots read, when the run has them.
RUN_METRICS = ("grad_norm_total", "grad_norm_total_clipped", "clip_coef", "clip_threshold", "loss",
               "nonfinite_params", "overflow_params", "skipped", "loss_z", "skip_rate")
#: Layer-level metrics the rules and plots read, when the run has them.
LAYER_METRICS = ("act_grad_norm", "saturation_ratio", "dead_ratio", "act_nonfinite", "layer_adam_v_lag",
                 "layer_adam_eps_frac", "layer_adam_update_rms", "update_to_weight", "update_to_weight_equilibrium",
                 "attn_logit_max", "attn_entropy", "logit_logz", "logit_max", "act_rms", "act_absmax", "act_outlier")
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
    return new if old is None else old.then(new)


class RunWindow:
    """One run's measurements over its last `steps` steps (all of them when None), as a `RunData`
    kept up to date from the store (`refresh`) or from the ingester's batches (`feed`), of one
    rank (rank 0 unless told: the live alerts read rank 0)."""

    def __init__(self, store: Store, run_id: str, steps: int | None = None, rank: int = 0) -> None:
        if steps is not None and steps < 1:
            raise ValueError(f"a window holds at least 1 step, got {steps}")
        self.store = store
        self.run_id = run_id
        self.steps = steps
        self.rank = rank
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
        self.offset: int | None = None  # the rank's log is held up to this byte, all of it: `feed` goes on from here
        self._layouts: dict[str, tuple[tuple[int, ...], np.ndarray, np.ndarray]] = {}  # see `_layout`
        self._data: RunData | None = None

    def refresh(self, layers: bool = True) -> bool:
        """Read what was stored after the last read, up to the step the rank's log stands at; True
        when something new was read. Run-level and group metrics are read every time; layer
        and param metrics (hundreds of series in a large model) and events only with `layers`,
        from where they were last read, so a caller can read them less often."""
        log = self._rank_log()
        until = None if log is None else log.last_step
        read = self._read_events() if layers else False
        if until is not None and (self.last_step is None or until > self.last_step):
            self._read(self._start(self.last_step, until), until, FAST_METRICS)
            self.last_step, read = until, True
        if until is not None and layers and (self.layer_step is None or until > self.layer_step):
            self._read(self._start(self.layer_step, until), until, self._slow_metrics())
            self.layer_step, read = until, True
        self.offset = log.offset if layers and log is not None else None
        if read:
            self._trim()
        return read

    def feed(self, batches: Iterable[Batch]) -> bool:
        """Append the batches the ingester committed from the rank's log, as `refresh` would read
        them; True when every batch was appended or already held. False, with the batches before
        it appended, at the first batch that does not follow on from what the window holds (its
        `offset`: rows that another process ingested, or a window last read with `layers=False`),
        or when the rows do not all come after the window's last step: then only a read of the
        store gives the same data (`refresh`, or a new window for rows out of order)."""
        chain: list[Batch] = []
        end = self.offset
        complete = True
        for batch in batches:
            if end is not None and batch.end <= end:
                continue  # a read already found it
            if batch.start != end or batch.rank != self.rank or batch.run_id != self.run_id:
                complete = False
                break
            chain.append(batch)
            end = batch.end
        if not chain:
            return complete
        records = [r for batch in chain for r in batch.records]
        wanted = FAST_METRICS + LAYER_METRICS + (PARAM_NORM,) + (() if self._has_flow else (PARAM_GRAD,))
        got = fr.metric_columns((r for r in records if isinstance(r, Frame)), wanted)
        if got is None:
            return False
        columns, steps = got
        if steps is not None and self.last_step is not None and steps[0] <= self.last_step:
            return False
        self._append_columns(columns)
        if steps is not None:
            self.last_step = self.layer_step = steps[1]
        if any(isinstance(r, Event) for r in records):  # read by id, as `refresh` reads them
            self._read_events()
        self._trim()
        self.offset = end
        return complete

    def _start(self, read_to: int | None, until: int) -> int | None:
        """Where to read from: after what was read, and never before the window."""
        start = None if read_to is None else read_to + 1
        if self.steps is not None and (start is None or until - start >= self.steps):
            start = max(0, until - self.steps + 1)
        return start

    @property
    def data(self) -> RunData:
        """The window as a `RunData` for the rules (rebuilt only after something new was read);
        a metric with no value in the window is left out."""
        if self._data is None:
            self._data = RunData(self.run_id, self.name, self.layers,
                                 run={m: s for m, s in self._run.items() if len(s.steps)},
                                 layer={m: s for m, s in self._layer.items() if len(s.steps)},
                                 group={m: s for m, s in self._group.items() if len(s.steps)},
                                 events=tuple(self._events), init_check=self._init_check, config=self._config,
                                 starts_run=self.steps is None or self.last_step is None
                                 or self.last_step - self.steps + 1 <= 0)
        return self._data

    # ------------------------------------------------------------------ reading

    def _rank_log(self) -> LogInfo | None:
        """The rank's log as the store has it (its offset and last step come from one row), or None."""
        logs = [log for log in self.store.logs(self.run_id) if log.rank == self.rank]
        return max(logs, key=lambda log: -1 if log.last_step is None else log.last_step) if logs else None

    def _read_events(self) -> bool:
        new = [e for e in self.store.events(self.run_id, after_id=self._last_event_id) if e.rank == self.rank]
        if not new:
            return False
        self._last_event_id = max(e.id for e in new)
        self._events = sorted(self._events + [{"kind": e.kind, "step": e.step, "data": e.data} for e in new],
                              key=lambda e: int(e["step"]))
        self._data = None
        return True

    def _slow_metrics(self) -> tuple[str, ...]:
        """Layer and param metrics; per-param grad_norm only for a run without gradient flow."""
        if not self._has_flow and self.store.metric_names(self.run_id).get(FLOW) == "layer":
            self._flow_found()
        return LAYER_METRICS + (PARAM_NORM,) + (() if self._has_flow else (PARAM_GRAD,))

    def _flow_found(self) -> None:
        """The run has gradient flow after all: the layers' grad_norm stand-in is not read, nor kept."""
        self._has_flow = True
        self._layer.pop(PARAM_GRAD, None)

    def _read(self, start: int | None, end: int | None, metrics: tuple[str, ...]) -> None:
        """Append the rows in [start, end] (unbounded where None) of `metrics`."""
        got = self.store.histories(self.run_id, metrics, start, end, rank=self.rank)  # series that did not move: unread
        for metric in RUN_METRICS:
            series = got.get(metric, {}).get(0)
            if series is not None:
                self._run[metric] = _append(self._run.get(metric), Series(series.steps, series.values))
        if got.get(PARAM_NORM):  # entity after entity: the sum of squares is the same however it was read
            steps, values = l2((s.steps, s.values) for _, s in sorted(got[PARAM_NORM].items()))
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

    def _append_columns(self, columns: dict[str, fr.Columns]) -> None:
        """Append a batch's rows of every metric the window holds, as `_read` appends the store's."""
        for metric in RUN_METRICS:
            got = columns.get(metric)
            rows = None if got is None else fr.entity_rows(got, 0)
            if rows is not None and len(rows[0]):
                self._run[metric] = _append(self._run.get(metric), Series(*rows))
        if PARAM_NORM in columns:  # entity after entity, as `_read` adds them
            c = columns[PARAM_NORM]
            steps, values = fr.l2_columns(c, self._layout(PARAM_NORM, c.entities, None)[0])
            if len(steps):
                self._run["param_norm_total"] = _append(self._run.get("param_norm_total"), Series(steps, values))
        for metric in LAYER_METRICS:
            if metric == FLOW and not self._has_flow and metric in columns and columns[metric].measured:
                self._flow_found()
            self._extend(self._layer, metric, columns.get(metric), self._row_of, len(self.layers))
        if PARAM_GRAD in columns and not self._has_flow and PARAM_GRAD in self._slow_metrics():
            c = columns[PARAM_GRAD]
            rows = {}
            for row, ps in self._params_of.items():
                cols = [j for j in (c.column(p) for p in ps) if j is not None]
                if cols:
                    rows[row] = fr.l2_columns(c, cols)
            self._add(self._layer, PARAM_GRAD, rows, len(self.layers))
        for metric in GROUP_METRICS:
            self._extend(self._group, metric, columns.get(metric), {g: g for g in range(self._groups)}, self._groups)
        self._data = None

    def _layout(self, metric: str, entities: tuple[int, ...],
                row_of: dict[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
        """`frames.layout` of a metric's entities (with no `row_of`: every column, by entity),
        kept while its definition stays the same object, as it does from frame to frame."""
        cached = self._layouts.get(metric)
        if cached is None or cached[0] is not entities:
            if row_of is None:
                got = (np.argsort(np.asarray(entities, dtype=np.int64), kind="stable"), np.zeros(0, dtype=np.intp))
            else:
                got = fr.layout(entities, row_of)
            cached = self._layouts[metric] = (entities, *got)
        return cached[1], cached[2]

    def _extend(self, into: dict[str, Series], metric: str, c: fr.Columns | None, row_of: dict[int, int],
                n_rows: int) -> None:
        if c is None:
            return
        got = fr.matrix_rows(c, *self._layout(metric, c.entities, row_of), n_rows)
        if got is not None:
            into[metric] = _append(into.get(metric), Series(*got))

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
        self._run = {m: s.since(first) for m, s in self._run.items()}
        self._layer = {m: s.since(first) for m, s in self._layer.items()}
        self._group = {m: s.since(first) for m, s in self._group.items()}
        self._events = [e for e in self._events if int(e["step"]) >= first]


def load_run_data(store: Store, run_id: str, rank: int = 0) -> RunData:
    """Everything the rules and plots need about one rank of a run, read through the query API."""
    window = RunWindow(store, run_id, rank=rank)
    window._read_events()
    window._read(None, None, FAST_METRICS + window._slow_metrics())
    return window.data
