"""Tables of the store (SQLAlchemy Core) and the schema version they make up.

Measurements are stored as *series*: one row per (run, rank, metric, scope, entity), where the
entity is the param, layer or param-group index (0 for run-level metrics). A series row
also holds its latest step and value, which is what the exporter reads at scrape time: a
finite value in `last_value`, a NaN or ±Inf as its name in `last_nonfinite` (see
`codec.encode_last`). A series exists only once it has values, so there is always one.
Its values live in *chunks*: one row per run of consecutive steps, holding the steps and
float32 values as packed blobs (see `codec`). Full chunks hold `CHUNK_ROWS` rows; the
rows after the last full chunk sit in small *pending* chunks that ingestion merges once
they add up to a full one, so the disk footprint stays close to the raw float32 size.

Text that comes from a user or a model (run names, projects, hosts, versions, param, layer
and metric names, paths, messages) is `UserText`: any length, any content, on every backend
(NUL and lone surrogates escaped by `codec.encode_text`). PostgreSQL cannot put a long value
in a btree index (about 2.7 kB at most), so there such columns are indexed by hash (`name`,
`project`) or by their md5 (`metric` in the series key); SQLite indexes them as they are.

Schema changes are Alembic migrations in `migrations/versions/` (revision `v<N>` makes schema
version N); a new store is created from these tables and stamped with the newest revision.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    func,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import BigInteger, TypeDecorator

from gradwatch.store import codec

SCHEMA_VERSION = 2  # also `gw_meta.schema_version` and Alembic revision f"v{SCHEMA_VERSION}"
APPLICATION = "gradwatch"
CHUNK_ROWS = 4096  # rows of a full chunk
MAX_PENDING_CHUNKS = 32  # pending chunks of a series merged into one beyond this



class UserText(TypeDecorator[str]):
    """Free text of any length and content, stored escaped (`codec.encode_text`) on every backend."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else codec.encode_text(str(value))

    def process_result_value(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else codec.decode_text(value)


metadata = MetaData()

meta = Table(
    "gw_meta", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

runs = Table(
    "gw_runs", metadata,
    Column("id", String(64), primary_key=True),
    Column("name", UserText, nullable=False),
    Column("project", UserText, nullable=False),
    Column("host", UserText),
    Column("pid", Integer),
    Column("world_size", Integer, nullable=False, default=1),
    Column("status", String(16), nullable=False),  # running | finished | crashed
    Column("status_at", Float, nullable=False),  # unix time the status was decided
    Column("started_at", Float),
    Column("ended_at", Float),
    Column("last_step", BigInteger),
    Column("torch_version", UserText),
    Column("gradwatch_version", UserText),
    Column("python_version", UserText),
    Column("device", UserText),
    Column("config", JSON),
    Column("model", JSON),
    Column("groups", JSON),
    Column("init_check", JSON),
    # schema v2 (added last, as the migration does, so new and upgraded stores are alike):
    Column("optimizer", JSON),  # {"class": ..., "wrappers": [outermost first]}
    Index("ix_gw_runs_project", "project", postgresql_using="hash"),
    Index("ix_gw_runs_name", "name", postgresql_using="hash"),
)

params = Table(
    "gw_params", metadata,
    Column("run_id", String(64), ForeignKey("gw_runs.id", ondelete="CASCADE"), primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("name", UserText, nullable=False),
    Column("layer", Integer),
    Column("shape", JSON),
    Column("numel", BigInteger),
    Column("requires_grad", Boolean),
    Column("group", Integer),
)

layers = Table(
    "gw_layers", metadata,
    Column("run_id", String(64), ForeignKey("gw_runs.id", ondelete="CASCADE"), primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("name", UserText, nullable=False),
    Column("type", UserText),
    Column("kind", UserText),
    Column("family", UserText),
    Column("params", JSON),
)

series = Table(
    "gw_series", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(64), ForeignKey("gw_runs.id", ondelete="CASCADE"), nullable=False),
    Column("rank", Integer, nullable=False),
    Column("metric", UserText, nullable=False),
    Column("scope", String(8), nullable=False),  # run | group | param | layer
    Column("entity", Integer, nullable=False),
    Column("n", BigInteger, nullable=False),
    Column("first_step", BigInteger, nullable=False),
    Column("last_step", BigInteger, nullable=False),
    Column("last_value", Float),  # NULL when the last value is not finite
    Column("next_seq", Integer, nullable=False),
    Column("pending_seq", Integer, nullable=False),  # first chunk after the full ones
    Column("pending_rows", Integer, nullable=False),
    Column("last_nonfinite", String(4)),  # v2: nan | inf | -inf when the last value is one, else NULL
    Index("ux_gw_series_key", "run_id", "rank", "metric", "scope", "entity", unique=True)
    .ddl_if(callable_=lambda _ddl, _target, _bind, dialect, **_kw: dialect.name != "postgresql"),
)
Index("ux_gw_series_key", series.c.run_id, series.c.rank, func.md5(series.c.metric), series.c.scope,
      series.c.entity, unique=True).ddl_if(dialect="postgresql")

chunks = Table(
    "gw_chunks", metadata,
    Column("series_id", Integer, ForeignKey("gw_series.id", ondelete="CASCADE"), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("first_step", BigInteger, nullable=False),
    Column("last_step", BigInteger, nullable=False),
    Column("n", Integer, nullable=False),
    Column("steps", LargeBinary, nullable=False),
    Column("vals", LargeBinary, nullable=False),
    Index("ix_gw_chunks_last_step", "series_id", "last_step"),
)

logs = Table(
    "gw_logs", metadata,
    Column("name", UserText, primary_key=True),  # file name: <run_id>.rank<r>.gwlog
    Column("path", UserText, nullable=False),
    Column("run_id", String(64)),
    Column("rank", Integer),
    Column("host", UserText),
    Column("pid", Integer),
    Column("offset", BigInteger, nullable=False),
    Column("state", String(16), nullable=False),  # running | finished | crashed | broken | deleted
    Column("state_at", Float, nullable=False),
    Column("last_growth_at", Float, nullable=False),
    Column("last_step", BigInteger),
    Column("close_stats", JSON),
    Index("ix_gw_logs_run", "run_id"),
)

events = Table(
    "gw_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(64), ForeignKey("gw_runs.id", ondelete="CASCADE"), nullable=False),
    Column("rank", Integer, nullable=False),
    Column("step", BigInteger, nullable=False),
    Column("time", Float, nullable=False),
    Column("kind", UserText, nullable=False),
    Column("data", JSON),
    Index("ix_gw_events_run", "run_id", "step"),
)

alerts = Table(
    "gw_alerts", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(64), ForeignKey("gw_runs.id", ondelete="CASCADE")),
    Column("rule", UserText, nullable=False),
    Column("severity", UserText, nullable=False),
    Column("step", BigInteger),
    Column("message", UserText, nullable=False),
    Column("labels", JSON),
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float),
    # schema v2, what the rules engine found (added last, as the migration does):
    Column("layer", UserText),  # the first layer the finding names
    Column("value", Float),  # its main number; NULL when it has none or when it is not finite
    Column("value_nonfinite", String(4)),  # nan | inf | -inf when the value is one (as gw_series)
    Column("threshold", Float),  # the limit the value crossed
    Column("cause", UserText),  # the first likely cause
    Column("remedy", UserText),  # the first remedy
    Index("ix_gw_alerts_run", "run_id", "started_at"),
)

ingest_errors = Table(
    "gw_ingest_errors", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("log", UserText, nullable=False),
    Column("path", UserText, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("reason", UserText, nullable=False),
    Column("at", Float, nullable=False),
)
