"""What the collector reads at scrape time, from the store: runs, latest values, counters.

`StoreSource()` makes one `list_runs` and one `latest` call per scrape. What never changes
for a run (its versions, device, which layer each param belongs to) is read once and
cached. The step counters (clipped, skipped, non-finite and overflowed gradients, non-finite
loss) are kept incrementally: a
scrape reads only the rows stored since the previous one, and nothing for a run whose
latest step did not move (finished runs in their grace period cost no extra query).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gradwatch.service.exporter import RunLatest, Snapshot, visible
from gradwatch.store import LatestValue, RunInfo, Store, UnknownEntity, UnknownMetric

# counter name -> (stored run-level metric, how many of its rows count); every stored row is a
# measured step, and a NaN value counts only where the counter is about NaN (the loss)
COUNTERS: dict[str, tuple[str, Callable[[np.ndarray], int]]] = {
    "clipped_steps": ("clip_coef", lambda v: int(np.count_nonzero(v < 1.0))),
    "skipped_steps": ("skipped", lambda v: int(np.count_nonzero(v >= 0.5))),
    "nonfinite_steps": ("nonfinite_params", lambda v: int(np.count_nonzero(v > 0))),
    "overflow_steps": ("overflow_params", lambda v: int(np.count_nonzero(v > 0))),
    "nonfinite_loss_steps": ("loss", lambda v: int(np.count_nonzero(~np.isfinite(v)))),
}

_BY_METRIC = {metric: (counter, count) for counter, (metric, count) in COUNTERS.items()}


@dataclass(frozen=True)
class _Static:
    device: str | None
    torch_version: str | None
    gradwatch_version: str | None
    param_layers: dict[str, str]
    layer_depths: dict[str, int]


class StoreSource:
    """Callable returning the `Snapshot` of runs still within their grace period."""

    def __init__(self, store: Store, grace: float = 300.0, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.grace = grace
        self.clock = clock
        self._static: dict[str, _Static] = {}
        self._counts: dict[tuple[str, int, str], tuple[int, int]] = {}  # -> (last step, count)
        self._lock = threading.Lock()

    def __call__(self) -> Snapshot:
        with self._lock:
            now = self.clock()
            runs = [r for r in self.store.list_runs() if visible(r.status, _end_time(r), now, self.grace)]
            ids = {r.id for r in runs}
            self._forget(ids)
            values = self.store.latest(run_ids=sorted(ids)) if ids else []
            by_run: dict[str, list[LatestValue]] = {run_id: [] for run_id in ids}
            for v in values:
                by_run[v.run_id].append(v)
            out = []
            for run in runs:
                static = self._static_of(run.id)
                out.append(RunLatest(
                    id=run.id, name=run.name, project=run.project, status=run.status,
                    started_at=run.started_at, ended_at=_end_time(run), host=run.host,
                    world_size=run.world_size, device=static.device, torch_version=static.torch_version,
                    gradwatch_version=static.gradwatch_version, param_layers=static.param_layers,
                    layer_depths=static.layer_depths,
                    values=by_run[run.id], counts=self._counters(run.id, by_run[run.id])))
            return out

    def _static_of(self, run_id: str) -> _Static:
        static = self._static.get(run_id)
        if static is None:
            summary = self.store.run_summary(run_id)
            layers = self.store.layers(run_id)
            layer_names = {layer.index: layer.name for layer in layers}
            param_layers = {p.name: layer_names.get(p.layer, "") for p in self.store.params(run_id)
                            if p.layer is not None}
            static = _Static(summary.device, summary.torch_version, summary.gradwatch_version, param_layers,
                             {layer.name: layer.index for layer in layers})
            self._static[run_id] = static
        return static

    def _counters(self, run_id: str, values: list[LatestValue]) -> dict[tuple[int, str], float]:
        """Cumulative step counts per rank; a series is read only when its latest step moved."""
        latest_step = {(v.rank, v.metric): v.step for v in values if v.scope == "run"}
        out: dict[tuple[int, str], float] = {}
        for (rank, metric), step in sorted(latest_step.items()):
            if metric not in _BY_METRIC:
                continue
            counter, count = _BY_METRIC[metric]
            key = (run_id, rank, metric)
            last, total = self._counts.get(key, (-1, 0))
            if step > last:
                try:
                    series = self.store.run_series(run_id, metric, start=last + 1, rank=rank)
                except (UnknownMetric, UnknownEntity):
                    continue  # removed between the two reads
                if series.steps.size:
                    total += count(series.values)
                    last = int(series.steps[-1])
                self._counts[key] = (last, total)
            out[(rank, counter)] = float(total)
        return out

    def _forget(self, ids: set[str]) -> None:
        for run_id in [r for r in self._static if r not in ids]:
            del self._static[run_id]
        for key in [k for k in self._counts if k[0] not in ids]:
            del self._counts[key]


def _end_time(run: RunInfo) -> float | None:
    if run.status == "running":
        return None
    return run.ended_at if run.ended_at is not None and math.isfinite(run.ended_at) else run.status_at
