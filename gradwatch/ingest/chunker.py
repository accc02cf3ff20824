"""Appending rows to series: the chunk layout of `gradwatch.store.schema`, inside one transaction.

Each series keeps full chunks of `CHUNK_ROWS` rows and, after them, a few small pending
chunks. New rows go into a new pending chunk; once the pending rows fill a full chunk (or
there are too many pending chunks) they are read back, merged with the new rows, and
rewritten as full chunks plus at most one pending chunk.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Connection, bindparam, delete, select, update

from gradwatch.store import codec
from gradwatch.store.schema import CHUNK_ROWS, MAX_PENDING_CHUNKS, chunks, series
from gradwatch.store.series import read_many


@dataclass
class SeriesState:
    """The bookkeeping columns of one series row, cached between transactions."""

    id: int | None
    metric: str
    scope: str
    entity: int
    n: int = 0
    first_step: int = 0
    last_step: int = 0
    last_value: float = 0.0  # NaN and ±Inf included (stored by `codec.encode_last`)
    next_seq: int = 0
    pending_seq: int = 0
    pending_rows: int = 0


SeriesKey = tuple[str, str, int]  # metric, scope, entity


def load_series(conn: Connection, run_id: str, rank: int) -> dict[SeriesKey, SeriesState]:
    """Every series of one run and rank, keyed by (metric, scope, entity)."""
    c = series.c
    rows = conn.execute(select(c.id, c.metric, c.scope, c.entity, c.n, c.first_step, c.last_step, c.last_value,
                               c.last_nonfinite, c.next_seq, c.pending_seq, c.pending_rows)
                        .where(c.run_id == run_id, c.rank == rank)).all()
    return {(r.metric, r.scope, r.entity): SeriesState(r.id, r.metric, r.scope, r.entity, r.n, r.first_step, r.last_step,
                                              codec.decode_last(r.last_value, r.last_nonfinite), r.next_seq,
                                              r.pending_seq, r.pending_rows)
            for r in rows}


def append_rows(conn: Connection, run_id: str, rank: int, cache: dict[SeriesKey, SeriesState],
                new: list[tuple[SeriesState, np.ndarray, np.ndarray]]) -> None:
    """Append (state, steps, float32 values) to their series and update `cache` in place.

    The caller drops `cache` when the transaction rolls back.
    """
    fresh = [st for st, _, _ in new if st.id is None]
    if fresh:
        ids = conn.execute(series.insert().returning(series.c.id, sort_by_parameter_order=True), [
            {"run_id": run_id, "rank": rank, "metric": st.metric, "scope": st.scope, "entity": st.entity,
             "n": 0, "first_step": 0, "last_step": 0, "last_value": None, "next_seq": 0, "pending_seq": 0,
             "pending_rows": 0} for st in fresh]).scalars().all()
        for st, sid in zip(fresh, ids):
            st.id = int(sid)
            cache[(st.metric, st.scope, st.entity)] = st
    merging = [(st, s, v) for st, s, v in new
               if st.pending_rows + len(s) >= CHUNK_ROWS or st.next_seq - st.pending_seq >= MAX_PENDING_CHUNKS]
    pending = _read_pending(conn, [st for st, _, _ in merging if st.pending_rows])
    if pending:
        conn.execute(delete(chunks).where(chunks.c.series_id == bindparam("sid"),
                                          chunks.c.seq >= bindparam("from_seq")),
                     [{"sid": st.id, "from_seq": st.pending_seq} for st, _, _ in merging if st.id in pending])
    rows: list[dict] = []
    for st, steps, values in new:
        if st.n == 0:
            st.first_step = int(steps[0])
        st.n += len(steps)
        st.last_step, st.last_value = int(steps[-1]), float(values[-1])
        if st.id in pending:
            old = pending[st.id]
            steps = np.concatenate([old.steps, steps])
            values = np.concatenate([old.values.astype(np.float32), values])
            st.next_seq, st.pending_rows = st.pending_seq, 0
        if st.pending_rows + len(steps) >= CHUNK_ROWS or st.next_seq - st.pending_seq >= MAX_PENDING_CHUNKS:
            full = len(steps) // CHUNK_ROWS * CHUNK_ROWS
            for lo in range(0, full, CHUNK_ROWS):
                rows.append(_chunk(st, st.next_seq, steps[lo:lo + CHUNK_ROWS], values[lo:lo + CHUNK_ROWS]))
                st.next_seq += 1
            st.pending_seq = st.next_seq
            steps, values = steps[full:], values[full:]
        if len(steps):
            rows.append(_chunk(st, st.next_seq, steps, values))
            st.next_seq += 1
            st.pending_rows += len(steps)
    if rows:
        conn.execute(chunks.insert(), rows)
    c = series.c
    conn.execute(update(series).where(c.id == bindparam("sid")).values(
        n=bindparam("n_"), first_step=bindparam("first_"), last_step=bindparam("last_"),
        last_value=bindparam("value_"), last_nonfinite=bindparam("nonfinite_"), next_seq=bindparam("next_"),
        pending_seq=bindparam("pseq_"), pending_rows=bindparam("prows_")), [_bookkeeping(st) for st, _, _ in new])


def _bookkeeping(st: SeriesState) -> dict:
    """Parameters of the series row update: the cached state, the last value by `codec.encode_last`."""
    value, nonfinite = codec.encode_last(st.last_value)
    return {"sid": st.id, "n_": st.n, "first_": st.first_step, "last_": st.last_step, "value_": value,
            "nonfinite_": nonfinite, "next_": st.next_seq, "pseq_": st.pending_seq, "prows_": st.pending_rows}


def _chunk(st: SeriesState, seq: int, steps: np.ndarray, values: np.ndarray) -> dict:
    return {"series_id": st.id, "seq": seq, "first_step": int(steps[0]), "last_step": int(steps[-1]),
            "n": int(len(steps)), "steps": codec.encode_steps(steps), "vals": codec.encode_values(values)}


def _read_pending(conn: Connection, states: list[SeriesState]) -> dict:
    """The pending rows of these series, one query per distinct pending_seq."""
    by_seq: dict[int, list[int]] = defaultdict(list)
    for st in states:
        by_seq[st.pending_seq].append(int(st.id))  # type: ignore[arg-type]
    out: dict = {}
    for seq, ids in by_seq.items():
        for lo in range(0, len(ids), 500):
            out.update(read_many(conn, ids[lo:lo + 500], min_seq=seq))
    return out
