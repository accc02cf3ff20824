"""`Store`: the query API over a gradwatch database; the CLI and the exporter are thin shells over it."""

from __future__ import annotations

import fnmatch
import math
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine, and_, delete, func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError

from gradwatch.agent.runlog import logs_dir
from gradwatch.store import codec
from gradwatch.store import schema as s
from gradwatch.redact import redact
from gradwatch.store.engine import create_store_engine, default_url, prepare_schema, where, writing
from gradwatch.store.errors import AmbiguousRun, RunNotFound, StoreError, UnknownEntity, UnknownMetric
from gradwatch.store.models import (
    AlertInfo,
    EventInfo,
    IngestErrorInfo,
    LatestValue,
    LayerInfo,
    LayerTable,
    LogInfo,
    ParamInfo,
    RunInfo,
    RunSummary,
    Series,
)
from gradwatch.store.series import l2_combine, read_many, read_series, value_at

TimeLike = datetime | float | int


def _ts(t: TimeLike) -> float:
    return t.timestamp() if isinstance(t, datetime) else float(t)


class Store:
    """A gradwatch store: open with `Store.open()`, close with `close()` (or use `with`)."""

    def __init__(self, engine: Engine, home: Path | None = None) -> None:
        self.engine = engine
        self.home = home  # the gradwatch home on this host, whose logs/ `delete_run` may remove from

    @classmethod
    def open(cls, url: str | None = None, home: Path | None = None, create: bool = True) -> Store:
        """Open the store at `url`, default `sqlite:///<home>/gradwatch.db`; an older store is upgraded.

        `create=True` (the service, ingestion) creates the store when the database is empty or,
        on SQLite, does not exist yet (parent folders included). `create=False` (what reads)
        creates nothing, no folder, file or table: no SQLite file or an empty database raises
        StoreNotFound. Raises NotAStoreError / SchemaVersionError / StoreError with a one-line
        message, credentials masked.
        """
        engine = create_store_engine(url or default_url(home), create=create)
        try:
            prepare_schema(engine, create=create)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, home)

    @property
    def url(self) -> str:
        """The store's URL for messages and logs: password and other credentials masked."""
        return where(self.engine.url)

    def close(self) -> None:
        """Release every connection."""
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A read connection; database failures become a one-line StoreError."""
        try:
            with self.engine.connect() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot read {self.url}: {_first_line(exc)}") from None

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One write transaction; database failures become a one-line StoreError."""
        try:
            with writing(self.engine) as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot write {self.url}: {_first_line(exc)}") from None

    # ------------------------------------------------------------------ runs

    def list_runs(self, project: str | None = None, name: str | None = None, status: str | None = None,
                  since: TimeLike | None = None, until: TimeLike | None = None) -> list[RunInfo]:
        """Runs, newest first. `name` is a glob (`bert-*`); `since`/`until` bound the start time."""
        q = select(*_RUN_COLS)
        if project is not None:
            q = q.where(s.runs.c.project == project)
        if status is not None:
            q = q.where(s.runs.c.status == status)
        if since is not None:
            q = q.where(s.runs.c.started_at >= _ts(since))
        if until is not None:
            q = q.where(s.runs.c.started_at <= _ts(until))
        with self._read() as conn:
            rows = conn.execute(q.order_by(s.runs.c.started_at.desc(), s.runs.c.id)).all()
        runs = [_run_info(r) for r in rows]
        return [r for r in runs if name is None or fnmatch.fnmatchcase(r.name, name)]

    def resolve_run(self, ref: str) -> str:
        """Run id for a run id, a unique id prefix, or a run name (the newest run of that name).

        A reference that is both a run's name and a prefix of another run's id is ambiguous:
        guessing could make `delete` remove the wrong run.
        """
        with self._read() as conn:
            ids = []
            if _can_be_id(ref):
                if conn.execute(select(s.runs.c.id).where(s.runs.c.id == ref)).first():
                    return ref
                ids = [r[0] for r in conn.execute(
                    select(s.runs.c.id).where(s.runs.c.id.startswith(ref, autoescape=True)).limit(20))]
            named = conn.execute(select(s.runs.c.id).where(s.runs.c.name == ref)
                                 .order_by(s.runs.c.started_at.desc()).limit(1)).first()
        if named and any(i != named[0] for i in ids):
            others = [i for i in ids if i != named[0]]
            raise AmbiguousRun(f"{ref!r} names run {named[0]} and is a prefix of run id {', '.join(others[:5])}: "
                               "give the full run id", [str(named[0]), *others])
        if named:
            return str(named[0])
        if len(ids) == 1:
            return ids[0]
        if len(ids) > 1:
            raise AmbiguousRun(f"run id prefix {ref!r} matches {len(ids)} runs: {', '.join(ids[:5])}", ids)
        raise RunNotFound(f"no run with id, id prefix or name {ref!r}")

    def run(self, run_id: str) -> RunInfo:
        """One run's row."""
        with self._read() as conn:
            return _run_info(self._run_row(conn, run_id))

    def _run_row(self, conn: Connection, run_id: str) -> Any:
        row = conn.execute(select(*_RUN_COLS, *_RUN_DETAIL).where(s.runs.c.id == run_id)).first()
        if row is None:
            raise RunNotFound(f"no run {run_id!r}")
        return row

    def run_summary(self, run_id: str) -> RunSummary:
        """A run's metadata, model, metric names, rank-0 latest run-level values, counts and logs."""
        with self._read() as conn:
            row = self._run_row(conn, run_id)
            num_params = conn.execute(select(func.count()).where(s.params.c.run_id == run_id)).scalar_one()
            num_layers = conn.execute(select(func.count()).where(s.layers.c.run_id == run_id)).scalar_one()
            metrics = dict(conn.execute(select(s.series.c.metric, s.series.c.scope).distinct()
                                        .where(s.series.c.run_id == run_id)).all())
            latest = {m: (int(st), codec.decode_last(v, nf)) for m, st, v, nf in conn.execute(
                select(s.series.c.metric, s.series.c.last_step, s.series.c.last_value, s.series.c.last_nonfinite)
                .where(s.series.c.run_id == run_id, s.series.c.rank == 0, s.series.c.scope == "run"))}
            events = dict(conn.execute(select(s.events.c.kind, func.count()).where(s.events.c.run_id == run_id)
                                       .group_by(s.events.c.kind)).all())
            active = conn.execute(select(func.count()).where(
                s.alerts.c.run_id == run_id, s.alerts.c.ended_at.is_(None))).scalar_one()
            logs = [_log_info(r) for r in conn.execute(
                select(*_LOG_COLS).where(s.logs.c.run_id == run_id).order_by(s.logs.c.rank))]
        return RunSummary(
            run=_run_info(row), torch_version=row.torch_version, gradwatch_version=row.gradwatch_version,
            python_version=row.python_version, device=row.device, config=row.config or {},
            model=row.model or {}, optimizer=row.optimizer or {}, groups=row.groups or [],
            init_check=row.init_check or [],
            num_params=num_params, num_layers=num_layers, metrics=metrics, latest=latest,
            event_counts={k: int(v) for k, v in events.items()}, active_alerts=int(active), logs=logs)

    def params(self, run_id: str) -> list[ParamInfo]:
        """The run's params in `model.named_parameters()` order."""
        with self._read() as conn:
            self._run_row(conn, run_id)
            return _params(conn, run_id)

    def layers(self, run_id: str) -> list[LayerInfo]:
        """The run's layers in model order (the index is depth)."""
        with self._read() as conn:
            self._run_row(conn, run_id)
            return _layers(conn, run_id)

    def metric_names(self, run_id: str) -> dict[str, str]:
        """Every stored metric of the run and its scope (run, group, param, layer)."""
        with self._read() as conn:
            self._run_row(conn, run_id)
            return dict(conn.execute(select(s.series.c.metric, s.series.c.scope).distinct()
                                     .where(s.series.c.run_id == run_id)).all())

    def rank_metric_names(self, run_id: str) -> dict[int, dict[str, str]]:
        """Every rank that stored measurements of the run, with its metrics and their scopes (under
        DDP rank 0 alone records the gradient norms, every rank its activations)."""
        ser = s.series.c
        with self._read() as conn:
            self._run_row(conn, run_id)
            out: dict[int, dict[str, str]] = {}
            for rank, metric, scope in conn.execute(select(ser.rank, ser.metric, ser.scope).distinct()
                                                    .where(ser.run_id == run_id)):
                out.setdefault(int(rank), {})[metric] = scope
        return dict(sorted(out.items()))

    def logs(self, run_id: str | None = None) -> list[LogInfo]:
        """Ingest state of every run log (of one run when given)."""
        q = select(*_LOG_COLS).order_by(s.logs.c.name)
        if run_id is not None:
            q = q.where(s.logs.c.run_id == run_id)
        with self._read() as conn:
            return [_log_info(r) for r in conn.execute(q)]

    def ingest_errors(self, log: str | None = None) -> list[IngestErrorInfo]:
        """Records that could not be ingested, with the log and byte offset where they start."""
        e = s.ingest_errors
        q = select(e.c.id, e.c.log, e.c.path, e.c.offset, e.c.reason, e.c.at).order_by(e.c.id)
        if log is not None:
            q = q.where(e.c.log == log)
        with self._read() as conn:
            return [IngestErrorInfo(*r) for r in conn.execute(q)]

    # --------------------------------------------------------------- series

    def run_series(self, run_id: str, metric: str, start: int | None = None, end: int | None = None,
                   rank: int = 0, group: int = 0) -> Series:
        """A run-level metric (loss, grad_norm_total, clip_coef, ...) or, for `lr`, one group's."""
        with self._read() as conn:
            sid = self._series_id(conn, run_id, rank, metric, ("run", "group"), group)
            return read_series(conn, sid, start, end)

    def param_history(self, run_id: str, param: str | int, metric: str, start: int | None = None,
                      end: int | None = None, rank: int = 0) -> Series:
        """One param's history of a param metric (grad_norm, param_norm, update_ratio)."""
        with self._read() as conn:
            idx = _param_index(conn, run_id, param)
            sid = self._series_id(conn, run_id, rank, metric, ("param",), idx)
            return read_series(conn, sid, start, end)

    def layer_history(self, run_id: str, layer: str | int, metric: str, start: int | None = None,
                      end: int | None = None, rank: int = 0) -> Series:
        """One layer's history of a layer metric; `grad_norm` is the L2 norm of its params'."""
        with self._read() as conn:
            info = _layer_info(conn, run_id, layer)
            if metric == "grad_norm":
                ids = _series_ids(conn, run_id, rank, "grad_norm", "param", info.params)
                if not ids and not info.params:
                    raise UnknownMetric(f"layer {info.name!r} has no params, so no grad_norm")
                return l2_combine(list(read_many(conn, ids.values(), start, end).values()))
            sid = self._series_id(conn, run_id, rank, metric, ("layer",), info.index)
            return read_series(conn, sid, start, end)

    def histories(self, run_id: str, metrics: Sequence[str], start: int | None = None, end: int | None = None,
                  rank: int = 0) -> dict[str, dict[int, Series]]:
        """Several metrics' histories in one read: metric -> {entity: Series} (entity: the param,
        layer or group index, 0 for a run-level metric), restricted to `start <= step <= end`
        when given. Series with no rows there are left out unread, so a reader polling for new
        rows pays only for the series that moved."""
        ser = s.series
        q = select(ser.c.id, ser.c.metric, ser.c.entity).where(
            ser.c.run_id == run_id, ser.c.rank == rank, ser.c.metric.in_(list(metrics)))
        if start is not None:
            q = q.where(ser.c.last_step >= start)
        if end is not None:
            q = q.where(ser.c.first_step <= end)
        out: dict[str, dict[int, Series]] = {}
        with self._read() as conn:
            ids = {int(r.id): (r.metric, int(r.entity)) for r in conn.execute(q)}
            for sid, got in read_many(conn, ids, start, end).items():
                metric, entity = ids[sid]
                out.setdefault(metric, {})[entity] = got
        return out

    def layers_at_step(self, run_id: str, step: int | None = None, metrics: Sequence[str] | None = None,
                       rank: int = 0) -> LayerTable:
        """Every layer's values at one step (default: the last step with layer measurements).

        `metrics` defaults to every layer metric plus `grad_norm`; a layer not measured at
        that step (or not of the right family) gets NaN in `values` and False in `measured`
        (a measured NaN is True there).
        """
        ser = s.series
        with self._read() as conn:
            self._run_row(conn, run_id)
            layer_list = _layers(conn, run_id)
            have = dict(conn.execute(select(ser.c.metric, ser.c.scope).distinct().where(
                ser.c.run_id == run_id, ser.c.rank == rank, ser.c.scope.in_(("layer", "param")))).all())
            layer_metrics = sorted(m for m, sc in have.items() if sc == "layer")
            if metrics is None:
                metrics = layer_metrics + (["grad_norm"] if have.get("grad_norm") == "param" else [])
            for m in metrics:
                if m not in layer_metrics and not (m == "grad_norm" and have.get(m) == "param"):
                    raise UnknownMetric(f"run {run_id} has no layer metric {m!r}")
            if step is None:
                step = conn.execute(select(func.max(ser.c.last_step)).where(
                    ser.c.run_id == run_id, ser.c.rank == rank, ser.c.scope == "layer")).scalar()
                if step is None and "grad_norm" in metrics:
                    step = conn.execute(select(func.max(ser.c.last_step)).where(
                        ser.c.run_id == run_id, ser.c.rank == rank, ser.c.metric == "grad_norm")).scalar()
            values: dict[str, dict[int, float]] = {}
            if step is not None:
                for m in metrics:
                    values[m] = self._layer_column(conn, run_id, rank, m, int(step), layer_list)
        return LayerTable(None if step is None else int(step), layer_list,
                          {m: np.array([at.get(la.index, math.nan) for la in layer_list], dtype=np.float64)
                           for m, at in values.items()},
                          {m: np.array([la.index in at for la in layer_list], dtype=bool) for m, at in values.items()})

    def _layer_column(self, conn: Connection, run_id: str, rank: int, metric: str, step: int,
                      layer_list: list[LayerInfo]) -> dict[int, float]:
        """layer index -> value at `step`, for the layers measured there."""
        scope = "param" if metric == "grad_norm" else "layer"
        at = _values_at(conn, run_id, rank, metric, scope, step)
        if metric != "grad_norm":
            return at
        out = {}
        for layer in layer_list:
            vals = [at[p] for p in layer.params if p in at]
            if vals:
                out[layer.index] = math.sqrt(sum(v * v for v in vals))
        return out

    def _series_id(self, conn: Connection, run_id: str, rank: int, metric: str,
                   scopes: tuple[str, ...], entity: int) -> int:
        ser = s.series
        row = conn.execute(select(ser.c.id).where(
            ser.c.run_id == run_id, ser.c.rank == rank, ser.c.metric == metric, ser.c.scope.in_(scopes),
            ser.c.entity == entity)).first()
        if row is not None:
            return int(row.id)
        self._run_row(conn, run_id)
        known = set(conn.execute(select(ser.c.scope).distinct().where(
            ser.c.run_id == run_id, ser.c.metric == metric)).scalars())
        if not known:
            raise UnknownMetric(f"run {run_id} has no metric {metric!r}")
        if not known & set(scopes):
            raise UnknownMetric(f"metric {metric!r} is a {'/'.join(sorted(known))}-level metric, "
                                f"not {'/'.join(scopes)}-level")
        raise UnknownEntity(f"run {run_id} has no {metric!r} values for {scopes[0]} {entity} on rank {rank}")

    # ---------------------------------------------------------------- latest

    def latest(self, run_ids: Sequence[str] | None = None) -> list[LatestValue]:
        """The latest value of every series (of the given runs), plus each param-owning layer's
        `grad_norm` (L2 of its params' latest grad_norm at their common latest step)."""
        ser = s.series
        q = select(ser.c.run_id, ser.c.rank, ser.c.metric, ser.c.scope, ser.c.entity,
                   ser.c.last_step, ser.c.last_value, ser.c.last_nonfinite)
        pq, lq = select(s.params.c.run_id, s.params.c.idx, s.params.c.name, s.params.c.layer), \
            select(s.layers.c.run_id, s.layers.c.idx, s.layers.c.name)
        if run_ids is not None:
            ids = list(run_ids)
            q, pq, lq = (q.where(ser.c.run_id.in_(ids)), pq.where(s.params.c.run_id.in_(ids)),
                         lq.where(s.layers.c.run_id.in_(ids)))
        with self._read() as conn:
            rows = conn.execute(q).all()
            pnames = {(r[0], r[1]): (r[2], r[3]) for r in conn.execute(pq)}
            lnames = {(r[0], r[1]): r[2] for r in conn.execute(lq)}
        out: list[LatestValue] = []
        layer_grads: dict[tuple[str, int, int], list[tuple[int, float]]] = defaultdict(list)
        for run_id, rank, metric, scope, entity, step, stored, nonfinite in rows:
            value = codec.decode_last(stored, nonfinite)
            if scope == "param":
                name, layer = pnames.get((run_id, entity), (str(entity), None))
                if metric == "grad_norm" and layer is not None:
                    layer_grads[(run_id, rank, layer)].append((int(step), value))
            elif scope == "layer":
                name = lnames.get((run_id, entity), str(entity))
            else:
                name = str(entity) if scope == "group" else ""
            out.append(LatestValue(run_id, int(rank), metric, scope, name, int(step), value))
        for (run_id, rank, layer), vals in layer_grads.items():
            last = max(st for st, _ in vals)
            norm = math.sqrt(sum(v * v for st, v in vals if st == last))
            out.append(LatestValue(run_id, rank, "grad_norm", "layer",
                                   lnames.get((run_id, layer), str(layer)), last, norm))
        return out

    # ---------------------------------------------------------------- events

    def events(self, run_id: str, kind: str | None = None, after_id: int | None = None) -> list[EventInfo]:
        """Events of the run log (nonfinite, norm_limit, agent_error, dropped), by step; with
        `after_id`, only those stored after the event of that id (what a live reader polls)."""
        e = s.events
        q = select(e.c.id, e.c.run_id, e.c.rank, e.c.step, e.c.time, e.c.kind, e.c.data).where(
            e.c.run_id == run_id).order_by(e.c.step, e.c.id)
        if kind is not None:
            q = q.where(e.c.kind == kind)
        if after_id is not None:
            q = q.where(e.c.id > after_id)
        with self._read() as conn:
            self._run_row(conn, run_id)
            return [EventInfo(r.id, r.run_id, r.rank, int(r.step), r.time, r.kind, r.data or {})
                    for r in conn.execute(q)]

    # ---------------------------------------------------------------- alerts

    def alerts(self, run_id: str | None = None, active: bool | None = None) -> list[AlertInfo]:
        """Alerts, oldest first; `active=True` only unresolved ones, `False` only resolved."""
        a = s.alerts
        q = select(*_ALERT_COLS).order_by(a.c.started_at, a.c.id)
        if run_id is not None:
            q = q.where(a.c.run_id == run_id)
        if active is not None:
            q = q.where(a.c.ended_at.is_(None) if active else a.c.ended_at.is_not(None))
        with self._read() as conn:
            return [_alert_info(r) for r in conn.execute(q)]

    def add_alert(self, rule: str, severity: str, message: str, run_id: str | None = None,
                  step: int | None = None, labels: dict[str, str] | None = None,
                  started_at: TimeLike | None = None, layer: str | None = None, value: float | None = None,
                  threshold: float | None = None, cause: str | None = None, remedy: str | None = None) -> int:
        """Record a firing alert (with what the rules engine found: layer, value and threshold,
        first cause and remedy); returns its id."""
        stored, nonfinite = (None, None) if value is None else codec.encode_last(value)
        with self._write() as conn:
            if run_id is not None:
                self._run_row(conn, run_id)
            return int(conn.execute(s.alerts.insert().returning(s.alerts.c.id), {
                "run_id": run_id, "rule": rule, "severity": severity, "step": step, "message": message,
                "labels": labels or {}, "started_at": time.time() if started_at is None else _ts(started_at),
                "ended_at": None, "layer": layer, "value": stored, "value_nonfinite": nonfinite,
                "threshold": threshold, "cause": cause, "remedy": remedy}).scalar_one())

    def resolve_alert(self, alert_id: int, ended_at: TimeLike | None = None) -> None:
        """Mark an alert resolved (idempotent for an already resolved one)."""
        a = s.alerts
        with self._write() as conn:
            if conn.execute(select(a.c.id).where(a.c.id == alert_id)).first() is None:
                raise StoreError(f"no alert {alert_id}")
            conn.execute(update(a).where(a.c.id == alert_id, a.c.ended_at.is_(None)).values(
                ended_at=time.time() if ended_at is None else _ts(ended_at)))

    # ---------------------------------------------------------------- export

    def export_records(self, run_id: str) -> Iterator[dict[str, Any]]:
        """Every stored record of a run as plain dicts, streamed; key `record` names the kind: one `run`, then
        `param`, `layer`, `event` and `alert` records, then one `value` record per measurement
        (`rank`, `metric`, `scope`, `entity` name, `step`, `value`), series by series."""
        summary = self.run_summary(run_id)
        run = summary.run
        yield {"record": "run", **run.__dict__, "torch_version": summary.torch_version,
               "gradwatch_version": summary.gradwatch_version, "config": summary.config,
               "model": summary.model, "optimizer": summary.optimizer, "groups": summary.groups,
               "init_check": summary.init_check}
        params, layers = self.params(run_id), self.layers(run_id)
        for p in params:
            yield {"record": "param", **p.__dict__, "shape": list(p.shape)}
        for layer in layers:
            yield {"record": "layer", **layer.__dict__, "params": list(layer.params)}
        for ev in self.events(run_id):
            yield {"record": "event", "rank": ev.rank, "step": ev.step, "time": ev.time, "kind": ev.kind,
                   "data": ev.data}
        for al in self.alerts(run_id):
            yield {"record": "alert", **{k: v for k, v in al.__dict__.items() if k != "run_id"}}
        pnames = {p.index: p.name for p in params}
        lnames = {la.index: la.name for la in layers}
        ser = s.series
        with self._read() as conn:
            keys = conn.execute(select(ser.c.id, ser.c.rank, ser.c.metric, ser.c.scope, ser.c.entity)
                                .where(ser.c.run_id == run_id)
                                .order_by(ser.c.rank, ser.c.scope, ser.c.metric, ser.c.entity)).all()
        for sid, rank, metric, scope, entity in keys:
            name = (pnames.get(entity, str(entity)) if scope == "param" else
                    lnames.get(entity, str(entity)) if scope == "layer" else
                    str(entity) if scope == "group" else "")
            with self._read() as conn:
                steps, values = read_series(conn, sid)
            for st, v in zip(steps.tolist(), values.tolist()):
                yield {"record": "value", "rank": rank, "metric": metric, "scope": scope, "entity": name,
                       "step": st, "value": v}

    # ------------------------------------------------------------ deletion

    def delete_run(self, run_id: str, remove_logs: bool = False) -> None:
        """Delete a run and everything stored about it.

        Its run logs are kept as `deleted` so they are not ingested again, unless
        `remove_logs` is true: then the log files go too, from this store's home's `logs/`
        (by file name: never a path recorded on another host or in another copy of the home),
        before their rows, so a file that cannot be removed leaves the run whole.
        """
        with self._read() as conn:
            self._run_row(conn, run_id)
            names = [r[0] for r in conn.execute(select(s.logs.c.name).where(s.logs.c.run_id == run_id))]
        if remove_logs:
            folder = logs_dir(self.home)
            for name in names:
                (folder / name).unlink(missing_ok=True)
        with self._write() as conn:
            _delete_run_rows(conn, run_id)
            if remove_logs:
                conn.execute(delete(s.logs).where(s.logs.c.run_id == run_id))
            else:
                conn.execute(update(s.logs).where(s.logs.c.run_id == run_id).values(
                    state="deleted", state_at=time.time()))

    def gc(self, older_than: timedelta, remove_logs: bool = False, now: float | None = None) -> list[str]:
        """Delete every run that is no longer running and ended (or was declared crashed)
        more than `older_than` ago; returns their ids."""
        cutoff = (time.time() if now is None else now) - older_than.total_seconds()
        r = s.runs.c
        with self._read() as conn:
            ids = [row[0] for row in conn.execute(select(r.id).where(
                r.status != "running", or_(and_(r.ended_at.is_not(None), r.ended_at < cutoff),
                                           and_(r.ended_at.is_(None), r.status_at < cutoff))))]
        for run_id in ids:
            self.delete_run(run_id, remove_logs=remove_logs)
        return ids


def _first_line(exc: BaseException) -> str:
    return redact((str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0])


def _can_be_id(ref: str) -> bool:
    """Whether `ref` may be (a prefix of) a run id: ids hold no NUL and no lone surrogate, which
    no backend's id column (plain text, unlike names) could even be asked about."""
    return "\x00" not in ref and not any(0xD800 <= ord(c) <= 0xDFFF for c in ref)


def _delete_run_rows(conn: Connection, run_id: str) -> None:
    sids = select(s.series.c.id).where(s.series.c.run_id == run_id).scalar_subquery()
    conn.execute(delete(s.chunks).where(s.chunks.c.series_id.in_(sids)))
    for table in (s.series, s.events, s.alerts, s.params, s.layers):
        conn.execute(delete(table).where(table.c.run_id == run_id))
    conn.execute(delete(s.runs).where(s.runs.c.id == run_id))


# -------------------------------------------------------------------- helpers

_RUN_COLS = (s.runs.c.id, s.runs.c.name, s.runs.c.project, s.runs.c.status, s.runs.c.status_at,
             s.runs.c.started_at, s.runs.c.ended_at, s.runs.c.last_step, s.runs.c.host, s.runs.c.pid,
             s.runs.c.world_size)
_RUN_DETAIL = (s.runs.c.torch_version, s.runs.c.gradwatch_version, s.runs.c.python_version, s.runs.c.device,
               s.runs.c.config, s.runs.c.model, s.runs.c.optimizer, s.runs.c.groups, s.runs.c.init_check)
_LOG_COLS = (s.logs.c.name, s.logs.c.path, s.logs.c.run_id, s.logs.c.rank, s.logs.c.offset, s.logs.c.state,
             s.logs.c.state_at, s.logs.c.last_step, s.logs.c.close_stats)
_ALERT_COLS = (s.alerts.c.id, s.alerts.c.run_id, s.alerts.c.rule, s.alerts.c.severity, s.alerts.c.step,
               s.alerts.c.message, s.alerts.c.labels, s.alerts.c.started_at, s.alerts.c.ended_at,
               s.alerts.c.layer, s.alerts.c.value, s.alerts.c.value_nonfinite, s.alerts.c.threshold,
               s.alerts.c.cause, s.alerts.c.remedy)


def _run_info(r: Any) -> RunInfo:
    return RunInfo(r.id, r.name, r.project, r.status, r.status_at, r.started_at, r.ended_at,
                   None if r.last_step is None else int(r.last_step), r.host, r.pid, int(r.world_size))


def _log_info(r: Any) -> LogInfo:
    return LogInfo(r.name, r.path, r.run_id, r.rank, int(r.offset), r.state, r.state_at,
                   None if r.last_step is None else int(r.last_step), r.close_stats)


def _alert_info(r: Any) -> AlertInfo:
    value = None if r.value is None and r.value_nonfinite is None else codec.decode_last(r.value, r.value_nonfinite)
    return AlertInfo(r.id, r.run_id, r.rule, r.severity, r.step, r.message, r.labels or {},
                     r.started_at, r.ended_at, r.layer, value, r.threshold, r.cause, r.remedy)


def _params(conn: Connection, run_id: str) -> list[ParamInfo]:
    p = s.params.c
    return [ParamInfo(r.idx, r.name, r.layer, tuple(r.shape or ()), int(r.numel or 0), bool(r.requires_grad),
                      r.group) for r in conn.execute(
        select(p.idx, p.name, p.layer, p.shape, p.numel, p.requires_grad, p.group)
        .where(p.run_id == run_id).order_by(p.idx))]


def _layers(conn: Connection, run_id: str) -> list[LayerInfo]:
    c = s.layers.c
    return [LayerInfo(r.idx, r.name, r.type or "", r.kind or "", r.family, tuple(r.params or ()))
            for r in conn.execute(select(c.idx, c.name, c.type, c.kind, c.family, c.params)
                                  .where(c.run_id == run_id).order_by(c.idx))]


def _param_index(conn: Connection, run_id: str, param: str | int) -> int:
    p = s.params.c
    cond = p.idx == param if isinstance(param, int) else p.name == param
    idx = conn.execute(select(p.idx).where(p.run_id == run_id, cond)).scalar()
    if idx is None:
        if conn.execute(select(s.runs.c.id).where(s.runs.c.id == run_id)).first() is None:
            raise RunNotFound(f"no run {run_id!r}")
        raise UnknownEntity(f"run {run_id} has no param {param!r}")
    return int(idx)


def _layer_info(conn: Connection, run_id: str, layer: str | int) -> LayerInfo:
    c = s.layers.c
    cond = c.idx == layer if isinstance(layer, int) else c.name == layer
    r = conn.execute(select(c.idx, c.name, c.type, c.kind, c.family, c.params)
                     .where(c.run_id == run_id, cond)).first()
    if r is None:
        if conn.execute(select(s.runs.c.id).where(s.runs.c.id == run_id)).first() is None:
            raise RunNotFound(f"no run {run_id!r}")
        raise UnknownEntity(f"run {run_id} has no layer {layer!r}")
    return LayerInfo(r.idx, r.name, r.type or "", r.kind or "", r.family, tuple(r.params or ()))


def _values_at(conn: Connection, run_id: str, rank: int, metric: str, scope: str, step: int) -> dict[int, float]:
    """entity -> value at exactly `step`, for the entities measured there (NaN and ±Inf included);
    the latest value comes from the series row, older ones from the chunk that covers the step."""
    ser = s.series.c
    rows = conn.execute(select(ser.entity, ser.id, ser.last_step, ser.last_value, ser.last_nonfinite).where(
        ser.run_id == run_id, ser.rank == rank, ser.metric == metric, ser.scope == scope)).all()
    out = {int(r.entity): codec.decode_last(r.last_value, r.last_nonfinite) for r in rows if r.last_step == step}
    older = {int(r.id): int(r.entity) for r in rows if r.last_step > step}
    for sid, got in read_many(conn, older, step, step).items():
        value = value_at(got, step)
        if value is not None:
            out[older[sid]] = value
    return out


def _series_ids(conn: Connection, run_id: str, rank: int, metric: str, scope: str,
                entities: Sequence[int] | None) -> dict[int, int]:
    ser = s.series.c
    q = select(ser.entity, ser.id).where(ser.run_id == run_id, ser.rank == rank, ser.metric == metric,
                                          ser.scope == scope)
    if entities is not None:
        q = q.where(ser.entity.in_(list(entities)))
    return {int(e): int(i) for e, i in conn.execute(q)}
