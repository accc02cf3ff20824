"""Schema v2: non-finite last values kept by name, and the run's optimizer.

- `gw_series.last_nonfinite` ("nan", "inf", "-inf" or NULL): a series' last value when it is
  not finite, with `last_value` NULL. Schema v1 kept it in the float `last_value`, where SQLite
  turns NaN into NULL: a v1 row with a NULL last value held a NaN (a series row always has a
  value, it is written with its first rows), so it becomes "nan"; ±Inf and PostgreSQL's NaN
  move to `last_nonfinite` too.
- `gw_runs.optimizer` (JSON): the optimizer's class and the wrappers around it, from the run
  header; NULL for runs stored before.

Columns are added and dropped in place (ALTER TABLE, native on SQLite since 3.35), never
with batch mode's copy-and-move: dropping the old `gw_series` with foreign keys on would
cascade-delete every chunk. Chunks are float32 blobs and need no change.

Revision ID: v2
Revises: base (schema v1)
"""

from __future__ import annotations

import math

import sqlalchemy as sa
from alembic import op

revision = "v2"
down_revision = None
branch_labels = None
depends_on = None

_series = sa.table("gw_series", sa.column("last_value", sa.Float), sa.column("last_nonfinite", sa.String))
_meta = sa.table("gw_meta", sa.column("key", sa.String), sa.column("value", sa.Text))


def upgrade() -> None:
    op.add_column("gw_runs", sa.Column("optimizer", sa.JSON))
    op.add_column("gw_series", sa.Column("last_nonfinite", sa.String(4)))
    last = _series.c.last_value
    for name, where in (("nan", sa.or_(last.is_(None), last == math.nan)),  # NaN = NaN holds on PostgreSQL
                        ("inf", last == math.inf), ("-inf", last == -math.inf)):
        op.execute(_series.update().where(where).values(last_nonfinite=name, last_value=None))
    _set_version(2)


def downgrade() -> None:
    for name, value in (("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf)):  # NaN: NULL on SQLite, as v1
        op.execute(_series.update().where(_series.c.last_nonfinite == name).values(last_value=value))
    op.drop_column("gw_series", "last_nonfinite")
    op.drop_column("gw_runs", "optimizer")
    _set_version(1)


def _set_version(version: int) -> None:
    op.execute(_meta.update().where(_meta.c.key == "schema_version").values(value=str(version)))
