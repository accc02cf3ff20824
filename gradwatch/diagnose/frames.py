"""A run log's frames as the rows a store read would give: what lets the rules engine's windows
follow the ingester instead of reading the store back (`RunWindow.feed`).

The store keeps one series per metric and entity (param, layer or group index; 0 for a
run-level metric), with a row at each step where the column was measured, its float32 value
read back as float64. These functions give the same rows, a metric at a time and vectorised
over its columns, and the same float64 arithmetic as the store path's `load.l2` (squares added
one entity after the other), so a window fed frames holds exactly what a read would.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

import numpy as np

from gradwatch.agent.runlog import Block, Frame


Span = tuple[int, int] | None


@dataclass(frozen=True)
class Columns:
    """One metric's rows in a batch of frames: `values` and `present` are (steps, entities), the
    entities in their columns' order; `measured`: whether a column was measured at all."""

    entities: tuple[int, ...]
    steps: np.ndarray
    values: np.ndarray
    present: np.ndarray
    measured: bool

    def column(self, entity: int) -> int | None:
        """The column of an entity, None when the metric has none for it."""
        return self.entities.index(entity) if entity in self.entities else None


def metric_columns(frames: Iterable[Frame], wanted: Collection[str]) -> tuple[dict[str, Columns], Span] | None:
    """The rows in `frames` of the `wanted` metrics, by name, and the first and last step at which
    any metric was measured (the last is what the ingester records as the log's; None when none
    was). None when the frames cannot be read as a store read would give them: a metric's steps
    that do not strictly increase, a name defined twice differently, or an entity given two
    columns."""
    blocks: dict[str, list[Block]] = {}
    for frame in frames:
        for block in frame.blocks:
            if block.steps.shape[0]:
                blocks.setdefault(block.metric.name, []).append(block)
    out = {}
    first, last = None, None
    for name, parts in blocks.items():
        metric = parts[0].metric
        if len(parts) > 1 and any(b.metric is not metric and b.metric != metric for b in parts):
            return None
        steps = parts[0].steps if len(parts) == 1 else np.concatenate([b.steps for b in parts])
        present = parts[0].present if len(parts) == 1 else np.concatenate([b.present for b in parts])
        if steps.shape[0] > 1 and (steps[1:] <= steps[:-1]).any():
            return None
        measured = present.any(1).nonzero()[0]
        if len(measured):
            a, b = int(steps[measured[0]]), int(steps[measured[-1]])
            first, last = a if first is None else min(first, a), b if last is None else max(last, b)
        if name not in wanted:
            continue
        entities = (0,) if metric.scope == "run" else metric.indices
        if len(set(entities)) != len(entities):
            return None
        values = parts[0].values if len(parts) == 1 else np.concatenate([b.values for b in parts])
        out[name] = Columns(entities, steps.astype(np.int64, copy=False),
                            values.astype(np.float32, copy=False).astype(np.float64), present, len(measured) > 0)
    return out, (None if first is None or last is None else (first, last))


def entity_rows(c: Columns, entity: int) -> tuple[np.ndarray, np.ndarray] | None:
    """One entity's (steps, values) where it was measured; None when it has no column."""
    j = c.column(entity)
    if j is None:
        return None
    keep = c.present[:, j]
    return c.steps[keep], c.values[keep, j]


def l2_columns(c: Columns, cols: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per step where one of `cols` (at least one) was measured, the L2 norm over those measured
    there, the squares added column after column as `load.l2` adds them entity after entity
    (adding 0.0 for a column not measured changes nothing)."""
    present = c.present[:, cols]
    keep = present.any(axis=1)
    values = c.values[keep][:, cols]
    squares = np.where(present[keep], values * values, 0.0)
    total = np.add.accumulate(squares, axis=1)[:, -1]
    return c.steps[keep], np.sqrt(total)


def layout(entities: tuple[int, ...], row_of: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The columns of the entities that `row_of` maps to a matrix row, and those rows."""
    cols = [j for j, e in enumerate(entities) if e in row_of]
    return np.array(cols, dtype=np.intp), np.array([row_of[entities[j]] for j in cols], dtype=np.intp)


def matrix_rows(c: Columns, cols: np.ndarray, rows: np.ndarray,
                n_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(steps, values, present) of a layer or group matrix of `n_rows` rows: the columns `cols`
    in the rows `rows` (`layout`), a column per step where one of them was measured; None when
    none was."""
    if not len(cols):
        return None
    present = c.present[:, cols]
    keep = present.any(axis=1)
    if not keep.any():
        return None
    values = np.full((n_rows, int(keep.sum())), np.nan)
    mask = np.zeros(values.shape, dtype=bool)
    values[rows] = np.where(present[keep], c.values[keep][:, cols], np.nan).T
    mask[rows] = present[keep].T
    return c.steps[keep], values, mask
