"""The Prometheus collector: the latest stored values of every live run, built at scrape time.

`GradwatchCollector.collect()` asks its source for one `Snapshot` (one store read per
scrape) and turns it into metric families. Runs that ended more than `grace` seconds ago
are left out, so a finished run's series disappear and cardinality stays bounded. The
metrics themselves are declared in `catalog` and documented in docs/metrics.md. A NaN or ±Inf
value is exported as such (the exposition formats spell them NaN, +Inf, -Inf), so alert rules
see a non-finite loss or norm for what it is.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from gradwatch.service.catalog import (
    LAYER_GAUGES,
    LAYER_GRAD_NORM,
    LAYER_PARAM_NORM,
    LAYER_UPDATE_RATIO,
    LEARNING_RATE,
    METRICS,
    PARAM_GAUGES,
    RUN_COUNTERS,
    RUN_END,
    RUN_GAUGES,
    RUN_INFO,
    RUN_START,
    RUN_STATUS,
    RUNS_EXPORTED,
    SCALAR,
    STATUSES,
    STEP,
    STORE_UP,
    MetricSpec,
)
from gradwatch.service.logs import log_event
from gradwatch.store.models import LatestValue

@dataclass
class RunLatest:
    """One run as the exporter needs it: metadata, its params' layers, and latest values.

    `values` are the store's latest values (entity = param / layer name, group index or "");
    `param_layers` maps a param name to its layer's name; `counts` maps (rank, counter) to a
    cumulative count (see `RUN_COUNTERS`).
    """

    id: str
    name: str
    project: str
    status: str
    started_at: float | None = None
    ended_at: float | None = None
    host: str | None = None
    world_size: int = 1
    device: str | None = None
    torch_version: str | None = None
    gradwatch_version: str | None = None
    param_layers: dict[str, str] = field(default_factory=dict)
    values: list[LatestValue] = field(default_factory=list)
    counts: dict[tuple[int, str], float] = field(default_factory=dict)


Snapshot = list[RunLatest]


def visible(status: str, ended_at: float | None, now: float, grace: float) -> bool:
    """Whether a run's series are still exported: running, or ended less than `grace` ago."""
    if status == "running" or ended_at is None:
        return True
    return now - ended_at < grace


class _Families:
    """Metric families built lazily in `METRICS` order, so output is stable."""

    def __init__(self) -> None:
        self._by_name: dict[str, Metric] = {}

    def add(self, spec: MetricSpec, labels: Iterable[str], value: float) -> None:
        self._family(spec).add_metric(list(labels), value)

    def add_info(self, spec: MetricSpec, labels: Iterable[str]) -> None:
        family = self._family(spec)
        assert isinstance(family, InfoMetricFamily)
        family.add_metric([], dict(zip(spec.labels, labels)))

    def _family(self, spec: MetricSpec) -> Metric:
        family = self._by_name.get(spec.name)
        if family is None:
            family = _new_family(spec)
            self._by_name[spec.name] = family
        return family

    def ordered(self) -> Iterator[Metric]:
        for spec in METRICS:
            family = self._by_name.get(spec.name)
            if family is not None:
                yield family


def _new_family(spec: MetricSpec) -> Metric:
    if spec.type == "info":  # OpenMetrics info type; a gauge named ..._info in the text format
        return InfoMetricFamily(spec.name.removesuffix("_info"), spec.help, labels=[])
    if spec.type == "counter":
        return CounterMetricFamily(spec.name, spec.help, labels=list(spec.labels))
    return GaugeMetricFamily(spec.name, spec.help, labels=list(spec.labels))


def families_for(runs: Snapshot, per_param: bool = False) -> Iterator[Metric]:
    """Metric families for runs (all of them: filter with `visible` first)."""
    out = _Families()
    for run in runs:
        _add_run(out, run, per_param)
    return out.ordered()


def _add_run(out: _Families, run: RunLatest, per_param: bool) -> None:
    info = (run.id, run.name, run.project, run.host or "", str(run.world_size), run.device or "",
            run.torch_version or "", run.gradwatch_version or "")
    out.add_info(RUN_INFO, info)
    for status in STATUSES:
        out.add(RUN_STATUS, (run.id, status), 1.0 if run.status == status else 0.0)
    if run.started_at is not None:
        out.add(RUN_START, (run.id,), run.started_at)
    if run.ended_at is not None and run.status != "running":
        out.add(RUN_END, (run.id,), run.ended_at)

    steps: dict[int, int] = {}
    # (rank, layer) -> metric -> param -> (step, value), for the per-layer aggregates
    by_layer: dict[tuple[int, str], dict[str, dict[str, tuple[int, float]]]] = \
        defaultdict(lambda: defaultdict(dict))
    for v in run.values:
        steps[v.rank] = max(steps.get(v.rank, v.step), v.step)
        rank = str(v.rank)
        if v.scope == "run":
            spec = RUN_GAUGES.get(v.metric)
            if spec is not None:
                out.add(spec, (run.id, rank), v.value)
            elif v.metric != "skipped":
                out.add(SCALAR, (run.id, rank, v.metric), v.value)
        elif v.scope == "group" and v.metric == "lr":
            out.add(LEARNING_RATE, (run.id, rank, v.entity), v.value)
        elif v.scope == "layer" and v.metric == "grad_norm":
            out.add(LAYER_GRAD_NORM, (run.id, rank, v.entity), v.value)
        elif v.scope == "layer" and v.metric in LAYER_GAUGES:
            out.add(LAYER_GAUGES[v.metric], (run.id, rank, v.entity), v.value)
        elif v.scope == "param" and v.metric in PARAM_GAUGES:
            layer = run.param_layers.get(v.entity, "")
            if per_param:
                out.add(PARAM_GAUGES[v.metric], (run.id, rank, layer, v.entity), v.value)
            if layer:
                by_layer[(v.rank, layer)][v.metric][v.entity] = (v.step, v.value)

    _add_layer_aggregates(out, run.id, by_layer)
    for rank, step in sorted(steps.items()):
        out.add(STEP, (run.id, str(rank)), float(step))
    for (rank, counter), count in sorted(run.counts.items()):
        spec = RUN_COUNTERS.get(counter)
        if spec is not None:
            out.add(spec, (run.id, str(rank)), count)


def _add_layer_aggregates(out: _Families, run_id: str,
                          by_layer: dict[tuple[int, str], dict[str, dict[str, tuple[int, float]]]]) -> None:
    """A layer's param norm and update ratio from its params' values at their latest common step."""
    for (rank, layer), metrics in sorted(by_layer.items()):
        labels = (run_id, str(rank), layer)
        _, norms = _at_latest_step(metrics.get("param_norm", {}))
        if norms:
            out.add(LAYER_PARAM_NORM, labels, l2(norms.values()))
        step, ratios = _at_latest_step(metrics.get("update_ratio", {}))
        all_norms = metrics.get("param_norm", {})
        paired = [(r, all_norms[p][1]) for p, r in ratios.items() if all_norms.get(p, (None,))[0] == step]
        ratio = layer_update_ratio([r for r, _ in paired], [n for _, n in paired])
        if ratio is not None:
            out.add(LAYER_UPDATE_RATIO, labels, ratio)


def _at_latest_step(values: dict[str, tuple[int, float]]) -> tuple[int | None, dict[str, float]]:
    """The latest step any param has, and the params' values at it (params are measured together)."""
    if not values:
        return None, {}
    last = max(step for step, _ in values.values())
    return last, {p: value for p, (step, value) in values.items() if step == last}


def l2(values: Iterable[float]) -> float:
    """L2 norm of norms: the norm of the concatenation of the vectors they measure."""
    return math.sqrt(sum(x * x for x in values))


def layer_update_ratio(ratios: list[float], param_norms: list[float]) -> float | None:
    """||delta theta_layer|| / ||theta_layer|| from per-param ratios and norms.

    ||delta theta_p|| = ratio_p * ||theta_p||, so the layer ratio is
    sqrt(sum (ratio_p * norm_p)^2) / sqrt(sum norm_p^2). None when no norm is known or they are
    all zero; NaN when a norm or ratio is NaN (a measured value, not a gap to skip).
    """
    if not param_norms:
        return None
    denominator = l2(param_norms)
    if denominator == 0:
        return None
    return l2(r * n for r, n in zip(ratios, param_norms)) / denominator


class GradwatchCollector(Collector):
    """Yields the latest stored values of live runs at scrape time.

    `source` returns a `Snapshot` (one store read); `clock` is injected for the grace
    period. A failing source is logged and reported as ``gradwatch_exporter_store_up 0``
    instead of failing the scrape.
    """

    def __init__(self, source: Callable[[], Snapshot], grace: float = 300.0, per_param: bool = False,
                 clock: Callable[[], float] = time.time, logger: logging.Logger | None = None,
                 errors: tuple[type[Exception], ...] = (Exception,)) -> None:
        self.source = source
        self.grace = grace
        self.per_param = per_param
        self.clock = clock
        self.logger = logger
        self.errors = errors
        self._failing = False

    def collect(self) -> Iterator[Metric]:
        try:
            runs = self.source()
        except self.errors as exc:
            if not self._failing and self.logger is not None:
                log_event(self.logger, "store_read_failed", logging.ERROR, error=str(exc).splitlines()[0])
            self._failing = True
            yield _single(STORE_UP, 0.0)
            return
        if self._failing and self.logger is not None:
            log_event(self.logger, "store_read_recovered")
        self._failing = False
        now = self.clock()
        live = [run for run in runs if visible(run.status, run.ended_at, now, self.grace)]
        yield from families_for(live, self.per_param)
        yield _single(RUNS_EXPORTED, float(len(live)))
        yield _single(STORE_UP, 1.0)


def _single(spec: MetricSpec, value: float) -> Metric:
    family = _new_family(spec)
    family.add_metric([], value)
    return family
