"""What the reliability tests compare: every value of a run log against every value stored,
bit for bit, and the figures they measure (written out for docs/reliability.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from gradwatch.agent.runlog import Close, Corrupt, Event, Frame, LogReader
from gradwatch.store import Store
from gradwatch.store import schema
from gradwatch.store.series import read_series

Key = tuple[str, str, int]  # metric, scope, entity
Values = dict[Key, tuple[np.ndarray, np.ndarray]]  # steps, float32 values

#: Repetitions of the randomised tests; CI runs few, the figures in docs/reliability.md more.
REPEAT = int(os.environ.get("GRADWATCH_RELIABILITY_REPEAT", "1"))


def record_figure(test: str, **values: Any) -> None:
    """Append one measurement to the JSON-lines file named by `GRADWATCH_RELIABILITY_FIGURES`."""
    path = os.environ.get("GRADWATCH_RELIABILITY_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, **values}) + "\n")


class LogContents:
    """Everything a run log holds, read as the service would read it."""

    def __init__(self, path: Path) -> None:
        self.records = [r for _, r in LogReader(path).read()]
        self.corrupt = [r for r in self.records if isinstance(r, Corrupt)]
        self.events = [r for r in self.records if isinstance(r, Event)]
        self.closes = [r for r in self.records if isinstance(r, Close)]
        parts: dict[Key, list[tuple[np.ndarray, np.ndarray]]] = {}
        for frame in (r for r in self.records if isinstance(r, Frame)):
            for block in frame.blocks:
                entities = (0,) if block.metric.scope == "run" else block.metric.indices
                for j, entity in enumerate(entities):
                    keep = block.present[:, j]
                    parts.setdefault((block.metric.name, block.metric.scope, int(entity)), []).append(
                        (block.steps[keep], block.values[keep, j]))
        self.values: Values = {k: (np.concatenate([s for s, _ in v]), np.concatenate([x for _, x in v]))
                               for k, v in parts.items()}

    def steps(self, metric: str = "grad_norm_total") -> list[int]:
        """The steps of a run-level metric."""
        return self.values[(metric, "run", 0)][0].tolist() if (metric, "run", 0) in self.values else []


def stored_values(store: Store, run_id: str, rank: int = 0) -> Values:
    """Every stored series of a run and rank; each series' steps must strictly increase (no duplicate)."""
    ser = schema.series
    out: Values = {}
    with store.engine.connect() as conn:
        keys = conn.execute(select(ser.c.id, ser.c.metric, ser.c.scope, ser.c.entity)
                            .where(ser.c.run_id == run_id, ser.c.rank == rank)).all()
        for sid, metric, scope, entity in keys:
            steps, values = read_series(conn, sid)
            assert np.all(np.diff(steps) > 0), f"{metric}/{scope}/{entity}: a step stored twice"
            out[(metric, scope, int(entity))] = (steps, values.astype(np.float32))
    return out


def count(values: Values) -> int:
    return sum(s.shape[0] for s, _ in values.values())


def compare(expected: Values, got: Values) -> tuple[int, int]:
    """(values missing from `got`, values in `got` not in `expected` or different), NaN bit for bit."""
    lost = extra = 0
    for key in expected.keys() | got.keys():
        es, ev = expected.get(key, (np.empty(0, np.int64), np.empty(0, np.float32)))
        gs, gv = got.get(key, (np.empty(0, np.int64), np.empty(0, np.float32)))
        want = dict(zip(es.tolist(), ev.view(np.uint32).tolist()))
        have = dict(zip(gs.tolist(), gv.view(np.uint32).tolist()))
        lost += sum(1 for s in want if s not in have)
        extra += sum(1 for s, v in have.items() if want.get(s) != v) + (gs.shape[0] - len(have))
    return lost, extra
