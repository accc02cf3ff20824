"""The Prometheus collector: the latest stored values of every live run, built at scrape time.

`GradwatchCollector.collect()` asks its source for one `Snapshot` (one store read per
scrape) and turns it into metric families. Runs that ended more than `grace` seconds ago
are left out, so a finished run's series disappear and cardinality stays bounded. The
metrics themselves are declared in `catalog` and documented in docs/metrics.md; which layer
and param series are emitted, and with which labels, is the label tiers' (`tiers.Tiers`:
blocks reduced across ranks by default). A NaN or ±Inf value is exported as such (the
exposition formats spell them NaN, +Inf, -Inf), so alert rules see a non-finite loss or norm
for what it is.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
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
    RUN_AGENT_COUNTERS,
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
from gradwatch.service.tiers import (
    ATTRIBUTED,
    LAYER_MAX_RANK,
    TIER_METRICS,
    Placement,
    Tiers,
    aggregate,
    exported,
    param_aggregates,
    placements,
    rank_max,
)
from gradwatch.store.models import LatestValue

# Layer-scope run-log metric -> exported layer gauge (grad_norm: the store's L2 of the layer's params).
LAYER_SCOPE: dict[str, MetricSpec] = {"grad_norm": LAYER_GRAD_NORM, **LAYER_GAUGES}
# Run-scope run-log metric -> its own series (other run-scope metrics but `skipped` are user scalars).
RUN_SCOPE: dict[str, MetricSpec] = {**RUN_GAUGES, **RUN_AGENT_COUNTERS}
Measured = dict[str, tuple[int, float]]  # entity -> (step, value)


@dataclass
class RunLatest:
    """One run as the exporter needs it: metadata, its layers and params, and latest values.

    `values` are the store's latest values (entity = param / layer name, group index or "");
    `param_layers` maps a param name to its layer's name; `layer_depths` maps a layer's name to
    its index in model order (the run's layer table); `counts` maps (rank, counter) to a
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
    layer_depths: dict[str, int] = field(default_factory=dict)
    values: list[LatestValue] = field(default_factory=list)
    counts: dict[tuple[int, str], float] = field(default_factory=dict)


Snapshot = list[RunLatest]


def visible(status: str, ended_at: float | None, now: float, grace: float) -> bool:
    """Whether a run's series are still exported: running, or ended less than `grace` ago."""
    if status == "running" or ended_at is None:
        return True
    return now - ended_at < grace


class _Families:
    """Metric families built lazily in `METRICS` order (then the tiers' own), with the labels
    each has at `tiers`, so output is stable."""

    def __init__(self, tiers: Tiers) -> None:
        self.tiers = tiers
        self._specs = {spec.name: exported(spec, tiers) for spec in (*METRICS, *TIER_METRICS)}
        self._by_name: dict[str, Metric] = {}

    def add(self, spec: MetricSpec, labels: Mapping[str, str], value: float) -> None:
        exported_spec = self._specs[spec.name]
        self._family(exported_spec).add_metric([labels[name] for name in exported_spec.labels], value)

    def add_info(self, spec: MetricSpec, labels: Mapping[str, str]) -> None:
        family = self._family(self._specs[spec.name])
        assert isinstance(family, InfoMetricFamily)
        family.add_metric([], dict(labels))

    def _family(self, spec: MetricSpec) -> Metric:
        family = self._by_name.get(spec.name)
        if family is None:
            family = _new_family(spec)
            self._by_name[spec.name] = family
        return family

    def ordered(self) -> Iterator[Metric]:
        for name in self._specs:
            family = self._by_name.get(name)
            if family is not None:
                yield family


def _new_family(spec: MetricSpec) -> Metric:
    if spec.type == "info":  # OpenMetrics info type; a gauge named ..._info in the text format
        return InfoMetricFamily(spec.name.removesuffix("_info"), spec.help, labels=[])
    if spec.type == "counter":
        return CounterMetricFamily(spec.name, spec.help, labels=list(spec.labels))
    return GaugeMetricFamily(spec.name, spec.help, labels=list(spec.labels))


def families_for(runs: Snapshot, tiers: Tiers = Tiers()) -> Iterator[Metric]:
    """Metric families for runs (all of them: filter with `visible` first)."""
    out = _Families(tiers)
    for run in runs:
        _add_run(out, run)
    return out.ordered()


def _add_run(out: _Families, run: RunLatest) -> None:
    ident = {"run": run.id, "run_name": run.name, "project": run.project}
    out.add_info(RUN_INFO, {"run": run.id, "name": run.name, "project": run.project, "host": run.host or "",
                            "world_size": str(run.world_size), "device": run.device or "",
                            "torch_version": run.torch_version or "",
                            "gradwatch_version": run.gradwatch_version or ""})
    for status in STATUSES:
        out.add(RUN_STATUS, {**ident, "status": status}, 1.0 if run.status == status else 0.0)
    if run.started_at is not None:
        out.add(RUN_START, ident, run.started_at)
    if run.ended_at is not None and run.status != "running":
        out.add(RUN_END, ident, run.ended_at)

    steps: dict[int, int] = {}
    layer_values: dict[int, dict[str, Measured]] = defaultdict(lambda: defaultdict(dict))  # rank -> metric -> layer
    param_values: dict[int, dict[str, Measured]] = defaultdict(lambda: defaultdict(dict))  # rank -> metric -> param
    for v in run.values:
        steps[v.rank] = max(steps.get(v.rank, v.step), v.step)
        labels = {**ident, "rank": str(v.rank)}
        if v.scope == "run":
            spec = RUN_SCOPE.get(v.metric)
            if spec is not None:
                out.add(spec, labels, v.value)
            elif v.metric != "skipped":
                out.add(SCALAR, {**labels, "scalar": v.metric}, v.value)
        elif v.scope == "group" and v.metric == "lr":
            out.add(LEARNING_RATE, {**labels, "group": v.entity}, v.value)
        elif v.scope == "layer" and v.metric in LAYER_SCOPE:
            layer_values[v.rank][v.metric][v.entity] = (v.step, v.value)
        elif v.scope == "param" and v.metric in PARAM_GAUGES:
            param_values[v.rank][v.metric][v.entity] = (v.step, v.value)

    seen = {layer for by_metric in layer_values.values() for by_layer in by_metric.values() for layer in by_layer}
    seen |= {run.param_layers[p] for by_metric in param_values.values() for by_param in by_metric.values()
             for p in by_param if run.param_layers.get(p)}
    place = placements(run.layer_depths, seen, out.tiers)
    _add_layers(out, ident, {rank: _unit_values(layer_values[rank], param_values[rank], run.param_layers, place)
                             for rank in sorted(set(layer_values) | set(param_values))}, place)
    if out.tiers.per_param:
        _add_params(out, ident, param_values, run.param_layers, place)
    for rank, step in sorted(steps.items()):
        out.add(STEP, {**ident, "rank": str(rank)}, float(step))
    for (rank, counter), count in sorted(run.counts.items()):
        spec = RUN_COUNTERS.get(counter)
        if spec is not None:
            out.add(spec, {**ident, "rank": str(rank)}, count)


def _unit_values(layer_values: dict[str, Measured], param_values: dict[str, Measured], param_layers: dict[str, str],
                 place: dict[str, Placement]) -> dict[tuple[str, str], float]:
    """One rank's {(unit, exported metric name): value}: each unit's layers folded (`aggregate`),
    its parameter norm and update ratio from its params (`param_aggregates`)."""
    out: dict[tuple[str, str], float] = {}
    for metric, by_layer in layer_values.items():
        grouped: dict[str, dict[int, tuple[int, float]]] = defaultdict(dict)
        for layer, measured in by_layer.items():
            grouped[place[layer].unit][place[layer].order] = measured
        for unit, values in grouped.items():
            value = aggregate(metric, values)
            if value is not None:
                out[(unit, LAYER_SCOPE[metric].name)] = value
    by_unit: dict[str, dict[str, Measured]] = defaultdict(lambda: defaultdict(dict))
    for metric in ("param_norm", "update_ratio"):
        for param, measured in param_values.get(metric, {}).items():
            layer = param_layers.get(param)
            if layer:
                by_unit[place[layer].unit][metric][param] = measured
    for unit, metrics in by_unit.items():
        norm, ratio = param_aggregates(metrics.get("param_norm", {}), metrics.get("update_ratio", {}))
        if norm is not None:
            out[(unit, LAYER_PARAM_NORM.name)] = norm
        if ratio is not None:
            out[(unit, LAYER_UPDATE_RATIO.name)] = ratio
    return out


_LAYER_SPECS = {spec.name: spec for spec in (*LAYER_SCOPE.values(), LAYER_PARAM_NORM, LAYER_UPDATE_RATIO)}
_ATTRIBUTED = {LAYER_SCOPE[metric].name for metric in ATTRIBUTED}


def _add_layers(out: _Families, ident: dict[str, str], by_rank: dict[int, dict[tuple[str, str], float]],
                place: dict[str, Placement]) -> None:
    """Each unit's layer series: per rank, or the largest over the ranks (and, for the activation
    statistics, the rank that has it)."""
    depth = {p.unit: p.depth for p in place.values()}
    keys = sorted({key for values in by_rank.values() for key in values},
                  key=lambda k: (depth[k[0]], list(_LAYER_SPECS).index(k[1])))
    for unit, name in keys:
        spec = _LAYER_SPECS[name]
        labels = {**ident, "layer": unit, "depth": depth[unit]}
        ranks = {rank: values[(unit, name)] for rank, values in by_rank.items() if (unit, name) in values}
        if out.tiers.per_rank:
            for rank, value in ranks.items():
                out.add(spec, {**labels, "rank": str(rank)}, value)
        else:
            value, rank = rank_max(ranks)
            out.add(spec, labels, value)
            if name in _ATTRIBUTED:
                out.add(LAYER_MAX_RANK, {**labels, "stat": name.removeprefix("gradwatch_layer_")}, float(rank))


def _add_params(out: _Families, ident: dict[str, str], param_values: dict[int, dict[str, Measured]],
                param_layers: dict[str, str], place: dict[str, Placement]) -> None:
    """Per-param series (opt-in): per rank, or the largest over the ranks."""
    series: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)  # (metric, param) -> rank -> value
    for rank, by_metric in sorted(param_values.items()):
        for metric, by_param in by_metric.items():
            for param, (_, value) in by_param.items():
                series[(metric, param)][rank] = value
    for (metric, param), ranks in series.items():
        layer = param_layers.get(param, "")
        labels = {**ident, "layer": place[layer].unit if layer else "", "param": param}
        if out.tiers.per_rank:
            for rank, value in ranks.items():
                out.add(PARAM_GAUGES[metric], {**labels, "rank": str(rank)}, value)
        else:
            out.add(PARAM_GAUGES[metric], labels, rank_max(ranks)[0])


class GradwatchCollector(Collector):
    """Yields the latest stored values of live runs at scrape time.

    `source` returns a `Snapshot` (one store read); `clock` is injected for the grace
    period. `per_param`, `per_layer`, `per_rank` and `block_levels` choose the label tiers
    (`tiers.Tiers`; by default blocks, reduced across ranks). A failing source is logged and
    reported as ``gradwatch_exporter_store_up 0`` instead of failing the scrape.
    """

    def __init__(self, source: Callable[[], Snapshot], grace: float = 300.0, per_param: bool = False,
                 per_layer: bool = False, per_rank: bool = False, block_levels: int | None = None,
                 clock: Callable[[], float] = time.time, logger: logging.Logger | None = None,
                 errors: tuple[type[Exception], ...] = (Exception,)) -> None:
        self.source = source
        self.grace = grace
        self.tiers = Tiers(per_layer=per_layer, per_param=per_param, per_rank=per_rank, block_levels=block_levels)
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
        yield from families_for(live, self.tiers)
        yield _single(RUNS_EXPORTED, float(len(live)))
        yield _single(STORE_UP, 1.0)


def _single(spec: MetricSpec, value: float) -> Metric:
    family = _new_family(spec)
    family.add_metric([], value)
    return family
