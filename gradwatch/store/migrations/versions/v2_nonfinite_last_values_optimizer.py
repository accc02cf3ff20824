"""Schema v2: non-finite last values kept by name, the run's optimizer, and free text of any length.

- `gw_series.last_nonfinite` ("nan", "inf", "-inf" or NULL): a series' last value when it is
  not finite, with `last_value` NULL. Schema v1 kept it in the float `last_value`, where SQLite
  turns NaN into NULL: a v1 row with a NULL last value held a NaN (a series row always has a
  value, it is written with its first rows), so it becomes "nan"; ±Inf and PostgreSQL's NaN
  move to `last_nonfinite` too.
- `gw_runs.optimizer` (JSON): the optimizer's class and the wrappers around it, from the run
  header; NULL for runs stored before.
- `gw_alerts.layer`, `value` (with `value_nonfinite`, as `gw_series`), `threshold`, `cause`,
  `remedy`: what the rules engine found; NULL for alerts stored before.
- Free text (`USER_TEXT`: names, projects, hosts, versions, paths, messages) has no length
  limit and is stored escaped (`codec.encode_text`: NUL as ␀0, ␀ as ␀␀). On PostgreSQL the
  VARCHAR(n) columns become TEXT, `name` and `project` of `gw_runs` get hash indexes and the
  series key indexes `md5(metric)` (a btree cannot hold a value over about 2.7 kB). SQLite
  never enforced the lengths and gives VARCHAR(n) and TEXT the same (text) affinity and storage,
  so its columns keep their declared types: changing a declared type there means copying the
  table (see below). The project index drops `started_at` (a hash index has one column), on
  both backends. v1 rows holding ␀ (or NUL, which v1 stored raw on SQLite) are re-escaped.

Columns are added and dropped in place (ALTER TABLE, native on SQLite since 3.35), never
with batch mode's copy-and-move: dropping the old `gw_series` with foreign keys on would
cascade-delete every chunk. Chunks are float32 blobs and need no change.

Revision ID: v2
Revises: base (schema v1)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import sqlalchemy as sa
from alembic import op

from gradwatch.store.codec import TEXT_ESCAPE, encode_text

revision = "v2"
down_revision = None
branch_labels = None
depends_on = None

_series = sa.table("gw_series", sa.column("last_value", sa.Float), sa.column("last_nonfinite", sa.String))
_meta = sa.table("gw_meta", sa.column("key", sa.String), sa.column("value", sa.Text))

#: table -> (primary key, {free-text column: its v1 VARCHAR length, None for TEXT})
USER_TEXT: dict[str, tuple[tuple[str, ...], dict[str, int | None]]] = {
    "gw_runs": (("id",), {"name": 255, "project": 255, "host": 255, "torch_version": 64,
                          "gradwatch_version": 64, "python_version": 64, "device": 64}),
    "gw_params": (("run_id", "idx"), {"name": 512}),
    "gw_layers": (("run_id", "idx"), {"name": 512, "type": 255, "kind": 16, "family": 16}),
    "gw_series": (("id",), {"metric": 255}),
    "gw_logs": (("name",), {"name": 255, "path": None, "host": 255}),
    "gw_events": (("id",), {"kind": 64}),
    "gw_alerts": (("id",), {"rule": 255, "severity": 32, "message": None}),
    "gw_ingest_errors": (("id",), {"log": 255, "path": None, "reason": None}),
}
#: What the rules engine stores with an alert (layer, value and threshold, first cause and remedy).
_ALERT_COLUMNS = (("layer", sa.Text()), ("value", sa.Float()), ("value_nonfinite", sa.String(4)),
                  ("threshold", sa.Float()), ("cause", sa.Text()), ("remedy", sa.Text()))
_V1_ESCAPE = re.compile(f"{TEXT_ESCAPE}({TEXT_ESCAPE}|0)")


def upgrade() -> None:
    pg = op.get_bind().dialect.name == "postgresql"
    op.add_column("gw_runs", sa.Column("optimizer", sa.JSON))
    op.add_column("gw_series", sa.Column("last_nonfinite", sa.String(4)))
    for name, type_ in _ALERT_COLUMNS:
        op.add_column("gw_alerts", sa.Column(name, type_))
    last = _series.c.last_value
    for name, where in (("nan", sa.or_(last.is_(None), last == math.nan)),  # NaN = NaN holds on PostgreSQL
                        ("inf", last == math.inf), ("-inf", last == -math.inf)):
        op.execute(_series.update().where(where).values(last_nonfinite=name, last_value=None))
    op.drop_index("ix_gw_runs_project_started", "gw_runs")
    if pg:
        op.drop_index("ix_gw_runs_name", "gw_runs")
        op.drop_index("ux_gw_series_key", "gw_series")
        _retype(lambda _length: sa.Text())
    _recode(encode_text)
    op.create_index("ix_gw_runs_project", "gw_runs", ["project"], postgresql_using="hash")
    if pg:
        op.create_index("ix_gw_runs_name", "gw_runs", ["name"], postgresql_using="hash")
        op.create_index("ux_gw_series_key", "gw_series",
                        ["run_id", "rank", sa.text("md5(metric)"), "scope", "entity"], unique=True)
    _set_version(2)


def downgrade() -> None:
    """Back to v1; on PostgreSQL a text longer than its v1 column fails the downgrade (all or nothing)."""
    pg = op.get_bind().dialect.name == "postgresql"
    for name, value in (("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf)):  # NaN: NULL on SQLite, as v1
        op.execute(_series.update().where(_series.c.last_nonfinite == name).values(last_value=value))
    op.drop_column("gw_series", "last_nonfinite")
    op.drop_column("gw_runs", "optimizer")
    for name, _ in reversed(_ALERT_COLUMNS):
        op.drop_column("gw_alerts", name)
    op.drop_index("ix_gw_runs_project", "gw_runs")
    if pg:
        op.drop_index("ix_gw_runs_name", "gw_runs")
        op.drop_index("ux_gw_series_key", "gw_series")
    _recode(lambda text: _V1_ESCAPE.sub(lambda m: _to_v1(m, keep_nul=not pg), text))
    if pg:
        _retype(lambda length: sa.Text() if length is None else sa.String(length))
        op.create_index("ix_gw_runs_name", "gw_runs", ["name"])
        op.create_index("ux_gw_series_key", "gw_series", ["run_id", "rank", "metric", "scope", "entity"], unique=True)
    op.create_index("ix_gw_runs_project_started", "gw_runs", ["project", "started_at"])
    _set_version(1)


def _retype(type_of: Callable[[int | None], sa.types.TypeEngine]) -> None:
    """ALTER every free-text column that was a VARCHAR in v1 to `type_of(its v1 length)` (PostgreSQL)."""
    for table, (_, columns) in USER_TEXT.items():
        for column, length in columns.items():
            if length is not None:
                op.alter_column(table, column, type_=type_of(length))


def _recode(convert: Callable[[str], str]) -> None:
    """Rewrite the free-text values that hold ␀ (or NUL, on SQLite) with `convert`."""
    conn = op.get_bind()
    sqlite = conn.dialect.name == "sqlite"
    for table, (key, columns) in USER_TEXT.items():
        if sqlite:  # SQLite's text functions stop at a NUL; its blob functions do not
            marked = [f"instr(CAST({c} AS BLOB), X'00') > 0 OR instr(CAST({c} AS BLOB), :esc) > 0" for c in columns]
            esc: object = TEXT_ESCAPE.encode()
        else:
            marked = [f"strpos({c}, :esc) > 0" for c in columns]
            esc = TEXT_ESCAPE
        rows = conn.execute(sa.text(f"SELECT {', '.join((*key, *columns))} FROM {table} WHERE "
                                    + " OR ".join(f"({m})" for m in marked)), {"esc": esc}).all()
        if not rows:
            continue
        t = sa.table(table, *(sa.column(c, sa.Text if c in columns else None) for c in dict.fromkeys((*key, *columns))))
        stmt = t.update().where(*(t.c[k] == sa.bindparam(f"k_{k}") for k in key)).values(
            {c: sa.bindparam(f"v_{c}") for c in columns})
        conn.execute(stmt, [{**{f"k_{k}": row[i] for i, k in enumerate(key)},
                             **{f"v_{c}": None if v is None else convert(v)
                                for c, v in zip(columns, row[len(key):])}} for row in rows])


def _to_v1(m: re.Match[str], keep_nul: bool) -> str:
    """v1 text for an escape: ␀ for ␀␀; NUL for ␀0 where v1 could store it (SQLite), else left escaped."""
    return TEXT_ESCAPE if m.group(1) == TEXT_ESCAPE else "\x00" if keep_nul else m.group()


def _set_version(version: int) -> None:
    op.execute(_meta.update().where(_meta.c.key == "schema_version").values(value=str(version)))
