"""Reading series back from their chunks (pure reads on a connection)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from sqlalchemy import Connection, and_, select

from gradwatch.store import codec
from gradwatch.store.models import Series
from gradwatch.store.schema import chunks

EMPTY = Series(np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64))


def read_series(conn: Connection, series_id: int, start: int | None = None, end: int | None = None) -> Series:
    """Steps and values of one series, restricted to `start <= step <= end` when given."""
    cond = [chunks.c.series_id == series_id]
    if start is not None:
        cond.append(chunks.c.last_step >= start)
    if end is not None:
        cond.append(chunks.c.first_step <= end)
    rows = conn.execute(
        select(chunks.c.first_step, chunks.c.n, chunks.c.steps, chunks.c.vals)
        .where(and_(*cond)).order_by(chunks.c.seq)).all()
    return _window(_concat(rows), start, end)


def read_many(conn: Connection, series_ids: Iterable[int], start: int | None = None,
              end: int | None = None, min_seq: int | None = None) -> dict[int, Series]:
    """Like `read_series` for several series in one query (only chunks from `min_seq` on when given)."""
    ids = list(series_ids)
    if not ids:
        return {}
    cond = [chunks.c.series_id.in_(ids)]
    if start is not None:
        cond.append(chunks.c.last_step >= start)
    if end is not None:
        cond.append(chunks.c.first_step <= end)
    if min_seq is not None:
        cond.append(chunks.c.seq >= min_seq)
    rows = conn.execute(
        select(chunks.c.series_id, chunks.c.first_step, chunks.c.n, chunks.c.steps, chunks.c.vals)
        .where(and_(*cond)).order_by(chunks.c.series_id, chunks.c.seq)).all()
    grouped: dict[int, list] = {i: [] for i in ids}
    for row in rows:
        grouped[row[0]].append(row[1:])
    return {i: _window(_concat(parts), start, end) for i, parts in grouped.items()}


def _concat(rows: list) -> Series:
    if not rows:
        return EMPTY
    steps = np.concatenate([codec.decode_steps(s, first, n) for first, n, s, _ in rows])
    values = np.concatenate([codec.decode_values(v, n) for _, n, _, v in rows]).astype(np.float64)
    if steps.shape[0] > 1 and not bool(np.all(steps[1:] >= steps[:-1])):
        order = np.argsort(steps, kind="stable")
        steps, values = steps[order], values[order]
    return Series(steps, values)


def _window(s: Series, start: int | None, end: int | None) -> Series:
    if start is None and end is None:
        return s
    lo = 0 if start is None else int(np.searchsorted(s.steps, start, side="left"))
    hi = s.steps.shape[0] if end is None else int(np.searchsorted(s.steps, end, side="right"))
    return Series(s.steps[lo:hi], s.values[lo:hi])


def value_at(s: Series, step: int) -> float | None:
    """The value at exactly `step` (NaN and ±Inf are values), None when not measured there."""
    i = int(np.searchsorted(s.steps, step))
    return float(s.values[i]) if i < s.steps.shape[0] and s.steps[i] == step else None


def l2_combine(parts: list[Series]) -> Series:
    """Per step, the L2 norm over the parts that have a value there (a layer's grad_norm
    from its params' grad_norm); a NaN or Inf part makes that step's norm NaN or Inf."""
    parts = [p for p in parts if p.steps.shape[0]]
    if not parts:
        return EMPTY
    steps = np.unique(np.concatenate([p.steps for p in parts]))
    total = np.zeros(steps.shape[0], dtype=np.float64)
    for p in parts:
        total[np.searchsorted(steps, p.steps)] += p.values * p.values
    return Series(steps, np.sqrt(total))
