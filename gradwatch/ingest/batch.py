"""One ingest transaction: the records read from one log become rows, and the log's byte
offset moves past them in the same transaction (exactly once)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Connection, insert, select, update

from gradwatch.agent.runlog import Close, Corrupt, Event, Frame, Header, LogReader, MetricDef, Record
from gradwatch.ingest.chunker import SeriesKey, SeriesState, append_rows, load_series
from gradwatch.ingest.report import IngestReport
from gradwatch.store import schema as s

LIVE_STATES = ("running", "finished", "crashed")


class OffsetConflict(Exception):
    """Another ingester moved this log's offset first; the transaction must roll back."""


@dataclass
class LogState:
    """What an ingester keeps about one log between transactions (dropped on any failure)."""

    name: str
    path: Path
    reader: LogReader | None = None
    run_id: str | None = None
    rank: int = 0
    series: dict[SeriesKey, SeriesState] | None = None

    def reset(self) -> None:
        self.reader, self.series = None, None


class DuplicateLog(ValueError):
    """A second log for a run and rank that another log already stores."""


def log_row(conn: Connection, name: str) -> Any:
    """The ingest row of one log, or None."""
    c = s.logs.c
    return conn.execute(select(c.name, c.offset, c.state, c.run_id, c.rank, c.host, c.pid, c.last_growth_at)
                        .where(c.name == name)).first()


def apply_batch(conn: Connection, st: LogState, start: int, records: list[tuple[int, Record]], end: int,
                now: float, grew_at: float | None = None, tail: bool = False) -> IngestReport:
    """Store `records` (read from `start` to `end`) and move the log's offset to `end`.

    `grew_at` is when the log last grew (its mtime), default `now`: a log first read days
    after its writer stopped must not look as if it had been written just now. `tail` says
    that bytes after `end` are not a whole record yet (they may be a header copy still being
    written). A log is broken when a frame, event or close comes before any intact header,
    or when it holds nothing but damage and no tail.
    """
    grew_at = now if grew_at is None else grew_at
    report = IngestReport(logs=1, bytes=end - start, records=len(records))
    row = log_row(conn, st.name)
    if row is None:
        if start != 0:
            raise OffsetConflict(st.name)
        conn.execute(insert(s.logs).values(name=st.name, path=str(st.path), offset=0, state="running",
                                           state_at=now, last_growth_at=grew_at))
        row = log_row(conn, st.name)
    if row.offset != start:
        raise OffsetConflict(st.name)
    if row.run_id is not None and st.run_id is None:
        st.run_id, st.rank = row.run_id, int(row.rank)
    state = row.state
    closed: Close | None = None
    frames: list[Frame] = []
    events: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for _, rec in records:
        if isinstance(rec, Header):
            if st.run_id is None:
                _register(conn, st, rec, now)
        elif isinstance(rec, Corrupt):  # before the header too: an intact copy of it may follow
            errors.append(_error(st, rec.offset, rec.reason, now))
        elif isinstance(rec, MetricDef):
            pass  # the reader keeps the definitions; series appear with their first values
        elif st.run_id is None:
            errors = [_no_header(st, errors, start, f"first record is a {type(rec).__name__}", now)]
            state = "broken"
            break
        elif isinstance(rec, Frame):
            frames.append(rec)
        elif isinstance(rec, Event):
            events.append({"run_id": st.run_id, "rank": st.rank, "step": rec.step, "time": rec.time,
                           "kind": rec.kind, "data": _of_type(rec.data, dict)})
        elif isinstance(rec, Close):
            closed = rec
    if st.run_id is None and state != "broken" and not tail:
        errors = [_no_header(st, errors, start, "no intact copy of it", now)]
        state = "broken"
    last_step = None
    if frames and st.run_id is not None:
        if st.series is None:
            st.series = load_series(conn, st.run_id, st.rank)
        report.values, last_step = _store_frames(conn, st, frames)
    if events:
        conn.execute(insert(s.events), events)
    if errors:
        conn.execute(insert(s.ingest_errors), errors)
        report.errors = len(errors)
    values: dict[str, Any] = {"offset": end, "last_growth_at": grew_at}
    if closed is not None:
        state = "finished"
        values["close_stats"] = {"time": closed.time, "step": closed.step, "stats": closed.stats}
    elif state == "crashed" and records:
        state = "running"  # the writer came back
    if state != row.state:
        values.update(state=state, state_at=now)
    if last_step is not None:
        values["last_step"] = last_step
    c = s.logs.c
    done = conn.execute(update(s.logs).where(c.name == st.name, c.offset == start).values(**values))
    if done.rowcount != 1:
        raise OffsetConflict(st.name)
    if st.run_id is not None:
        if last_step is not None:
            conn.execute(update(s.runs).where(s.runs.c.id == st.run_id,
                                               (s.runs.c.last_step.is_(None)) | (s.runs.c.last_step < last_step))
                         .values(last_step=last_step))
        status = refresh_run_status(conn, st.run_id, now)
        if status == "finished":
            report.finished.append(st.run_id)
    return report


def _error(st: LogState, offset: int, reason: str, now: float) -> dict[str, Any]:
    return {"log": st.name, "path": str(st.path), "offset": offset, "reason": reason, "at": now}


def _no_header(st: LogState, errors: list[dict[str, Any]], start: int, why: str, now: float) -> dict[str, Any]:
    """The one error of a log broken for want of a header: at its first damage if any."""
    if errors:
        return _error(st, errors[0]["offset"], f"no valid header: {errors[0]['reason']}", now)
    return _error(st, start, f"no valid header: {why}", now)


def _store_frames(conn: Connection, st: LogState, frames: list[Frame]) -> tuple[int, int | None]:
    """Append every block's columns to their series; returns (values stored, last step)."""
    assert st.series is not None and st.run_id is not None
    by_metric: dict[int, list] = defaultdict(list)
    metrics: dict[int, MetricDef] = {}
    for frame in frames:
        for block in frame.blocks:
            if block.steps.shape[0]:
                by_metric[block.metric.id].append(block)
                metrics[block.metric.id] = block.metric
    new: list[tuple[SeriesState, np.ndarray, np.ndarray]] = []
    stored = 0
    last_step: int | None = None
    for mid, blocks in by_metric.items():
        metric = metrics[mid]
        steps = np.concatenate([b.steps for b in blocks]).astype(np.int64)
        values = np.concatenate([b.values for b in blocks]).astype(np.float32, copy=False)
        present = np.concatenate([b.present for b in blocks])
        entities = (0,) if metric.scope == "run" else metric.indices
        columns = np.ascontiguousarray(values.T)
        gaps = ~np.ascontiguousarray(present.T)
        any_gap = bool(gaps.any())
        for j, entity in enumerate(entities):
            col, col_steps = columns[j], steps
            if any_gap and gaps[j].any():  # not measured at those steps: no row (NaN is a value, kept)
                keep = ~gaps[j]
                col, col_steps = col[keep], steps[keep]
                if not col.shape[0]:
                    continue
            key = (metric.name, metric.scope, int(entity))
            state = st.series.get(key)
            if state is None:
                state = SeriesState(None, metric.name, metric.scope, int(entity))
            new.append((state, col_steps, col))
            stored += col.shape[0]
            last_step = int(col_steps[-1]) if last_step is None else max(last_step, int(col_steps[-1]))
    if new:
        append_rows(conn, st.run_id, st.rank, st.series, new)
    return stored, last_step


def _register(conn: Connection, st: LogState, header: Header, now: float) -> None:
    """Create the run (params, layers) from a log header, or join an existing run as another rank.

    Free-text fields (name, project, host, versions, device, param and layer names) are stored
    whatever their length and content (`schema.UserText`); a run id must be 1-64 printable
    characters (what `watch()` accepts and more), else the log is broken on every backend alike.
    """
    info = header.info
    run_id, rank = header.run_id, header.rank
    if not (1 <= len(run_id) <= 64 and run_id.isprintable()):
        raise ValueError(f"run id {run_id[:80]!r} is not 1-64 printable characters")
    other = conn.execute(select(s.logs.c.name).where(s.logs.c.run_id == run_id, s.logs.c.rank == rank,
                                                      s.logs.c.name != st.name)).first()
    if other is not None:  # a copy of a log: storing it too would double every series
        raise DuplicateLog(f"run {run_id} rank {rank} is already stored from log {other.name}")
    st.run_id, st.rank = run_id, rank
    exists = conn.execute(select(s.runs.c.id, s.runs.c.world_size).where(s.runs.c.id == run_id)).first()
    pid, started = info.get("pid"), info.get("started_at")
    fields = {"name": str(info.get("name") or run_id), "project": str(info.get("project") or "default"),
              "host": _str_or_none(info.get("host")), "pid": pid if type(pid) is int else None,
              "world_size": int(info.get("world_size") or 1),
              "started_at": float(started) if type(started) in (int, float) else None,
              "torch_version": _str_or_none(info.get("torch_version")),
              "gradwatch_version": _str_or_none(info.get("gradwatch_version")),
              "python_version": _str_or_none(info.get("python_version")), "device": _str_or_none(info.get("device")),
              "config": _of_type(info.get("config"), dict), "model": _of_type(info.get("model"), dict),
              "optimizer": _of_type(info.get("optimizer"), dict),
              "groups": _dicts(info.get("groups")), "init_check": _dicts(info.get("init_check"))}
    if exists is None:
        conn.execute(insert(s.runs).values(id=run_id, status="running", status_at=now, **fields))
        params = [{"run_id": run_id, "idx": int(p["index"]), "name": str(p["name"]), "layer": p.get("layer"),
                   "shape": list(p.get("shape") or ()), "numel": p.get("numel"),
                   "requires_grad": bool(p.get("requires_grad", True)), "group": p.get("group")}
                  for p in info.get("params") or ()]
        layers = [{"run_id": run_id, "idx": int(la["index"]), "name": str(la["name"]),
                   "type": _str_or_none(la.get("type")), "kind": _str_or_none(la.get("kind")),
                   "family": _str_or_none(la.get("family")), "params": list(la.get("params") or ())}
                  for la in info.get("layers") or ()]
        if params:
            conn.execute(insert(s.params), params)
        if layers:
            conn.execute(insert(s.layers), layers)
    elif rank == 0:
        conn.execute(update(s.runs).where(s.runs.c.id == run_id).values(**fields))
    conn.execute(update(s.logs).where(s.logs.c.name == st.name).values(
        run_id=run_id, rank=rank, host=fields["host"], pid=fields["pid"]))


def _of_type(value: Any, kind: type) -> Any:
    """`value` when it has the JSON shape readers expect, else an empty one (a malformed field
    from a damaged or foreign log must not break every later `show` or `diagnose`)."""
    return value if isinstance(value, kind) else kind()


def _dicts(value: Any) -> list[dict[str, Any]]:
    """The dicts of a JSON list field (see `_of_type`)."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def refresh_run_status(conn: Connection, run_id: str, now: float) -> str | None:
    """Derive the run's status from its logs' states; returns the new status if it changed.

    crashed when any rank crashed, finished when every rank closed, running otherwise.
    """
    c = s.logs.c
    logs = conn.execute(select(c.state, c.last_growth_at, c.close_stats).where(
        c.run_id == run_id, c.state.in_(LIVE_STATES))).all()
    current = conn.execute(select(s.runs.c.status).where(s.runs.c.id == run_id)).scalar()
    if not logs or current is None:
        return None
    states = {r.state for r in logs}
    ended: float | None = None
    if "crashed" in states:
        status = "crashed"
        ended = max(r.last_growth_at for r in logs if r.state == "crashed")
    elif states == {"finished"}:
        status = "finished"
        ended = max(float((r.close_stats or {}).get("time") or now) for r in logs)
    else:
        status = "running"
    if status == current:
        return None
    conn.execute(update(s.runs).where(s.runs.c.id == run_id).values(status=status, status_at=now, ended_at=ended))
    return status
