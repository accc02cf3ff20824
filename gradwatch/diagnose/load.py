"""Read one run from the store into a `RunData`: the bridge between the query API and the rules."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from gradwatch.diagnose.rundata import LayerInfo, RunData, Series

if TYPE_CHECKING:
    from gradwatch.store import Store

#: Run-level metrics the rules and plots read, when the run has them.
RUN_METRICS = ("grad_norm_total", "grad_norm_total_clipped", "clip_coef", "clip_threshold", "loss",
               "nonfinite_params", "overflow_params", "skipped")
#: Layer-level metrics the rules and plots read, when the run has them.
LAYER_METRICS = ("act_grad_norm", "saturation_ratio", "dead_ratio", "act_nonfinite")


def layer_matrix(histories: dict[int, tuple[np.ndarray, np.ndarray]], n_layers: int) -> Series:
    """Stack per-layer (steps, values) histories on the union of their steps; where a layer has
    no value the mask says not present (and the value is NaN)."""
    steps = np.unique(np.concatenate([h[0] for h in histories.values()])) if histories else np.array([], np.int64)
    values = np.full((n_layers, len(steps)), np.nan)
    present = np.zeros((n_layers, len(steps)), dtype=bool)
    for row, (s, v) in histories.items():
        cols = np.searchsorted(steps, s)
        values[row, cols] = v
        present[row, cols] = True
    return Series(steps.astype(np.int64), values, present)


def load_run_data(store: Store, run_id: str) -> RunData:
    """Everything the rules and plots need about one run (rank 0), read through the query API."""
    from gradwatch.store import UnknownEntity, UnknownMetric

    summary = store.run_summary(run_id)
    layers = tuple(LayerInfo(ly.index, ly.name, ly.type, ly.kind, ly.family) for ly in store.layers(run_id))
    row_of = {ly.index: row for row, ly in enumerate(layers)}
    run: dict[str, Series] = {}
    for m in RUN_METRICS:
        if summary.metrics.get(m) == "run":
            got = store.run_series(run_id, m)
            run[m] = Series(got.steps, got.values)
    per_layer: dict[str, Series] = {}
    wanted = [m for m in LAYER_METRICS if summary.metrics.get(m) == "layer"]
    if "act_grad_norm" not in wanted and summary.metrics.get("grad_norm") == "param":
        wanted.append("grad_norm")
    for metric in wanted:
        histories = {}
        for ly in layers:
            try:
                got = store.layer_history(run_id, ly.index, metric)
            except (UnknownMetric, UnknownEntity):
                continue
            if len(got.steps):
                histories[row_of[ly.index]] = (got.steps, got.values)
        if histories:
            per_layer[metric] = layer_matrix(histories, len(layers))
    events = tuple({"kind": e.kind, "step": e.step, "data": e.data} for e in store.events(run_id))
    return RunData(run_id, summary.run.name, layers, run=run, layer=per_layer, events=events,
                   init_check=tuple(summary.init_check), config=dict(summary.config))
