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

Schema changes are Alembic migrations in `migrations/versions/` (revision `v<N>` makes schema
version N); a new store is created from these tables and stamped with the newest revision.
"""

from __future__ import annotations

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
)
from sqlalchemy.types import BigInteger

SCHEMA_VERSION = 2  # also `gw_meta.schema_version` and Alembic revision f"v{SCHEMA_VERSION}"
APPLICATION = "gradwatch"
CHUNK_ROWS = 4096  # rows of a full chunk
MAX_PENDING_CHUNKS = 32  # pending chunks of a series merged into one beyond this

metadata = MetaData()

meta = Table(
    "gw_meta", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

runs = Table(
    "gw_runs", metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("project", String(255), nullable=False),
    Column("host", String(255)),
    Column("pid", Integer),
    Column("world_size", Integer, nullable=False, default=1),
    Column("status", String(16), nullable=False),  # running | finished | crashed
    Column("status_at", Float, nullable=False),  # unix time the status was decided
    Column("started_at", Float),
    Column("ended_at", Float),
    Column("last_step", BigInteger),
    Column("torch_version", String(64)),
    Column("gradwatch_version", String(64)),
    Column("python_version", String(64)),
    Column("device", String(64)),
    Column("config", JSON),
    Column("model", JSON),
    Column("groups", JSON),
    Column("init_check", JSON),
    # schema v2 (added last, as the migration does, so new and upgraded stores are alike):
    Column("optimizer", JSON),  # {"class": ..., "wrappers": [outermost first]}
    Index("ix_gw_runs_project_started", "project", "started_at"),
    Index("ix_gw_runs_name", "name"),
)

params = Table(
    "gw_params", metadata,
    Column("run_id", String(64), ForeignKey("gw_runs.id", ondelete="CASCADE"), primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("name", String(512), nullable=False),
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
    Column("name", String(512), nullable=False),
    Column("type", String(255)),
    Column("kind", String(16)),
    Column("family", String(16)),
    Column("params", JSON),
)

series = Table(
    "gw_series", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(64), ForeignKey("gw_runs.id", ondelete="CASCADE"), nullable=False),
    Column("rank", Integer, nullable=False),
    Column("metric", String(255), nullable=False),
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
    Index("ux_gw_series_key", "run_id", "rank", "metric", "scope", "entity", unique=True),
)

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
    Column("name", String(255), primary_key=True),  # file name: <run_id>.rank<r>.gwlog
    Column("path", Text, nullable=False),
    Column("run_id", String(64)),
    Column("rank", Integer),
    Column("host", String(255)),
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
    Column("kind", String(64), nullable=False),
    Column("data", JSON),
    Index("ix_gw_events_run", "run_id", "step"),
)

alerts = Table(
    "gw_alerts", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(64), ForeignKey("gw_runs.id", ondelete="CASCADE")),
    Column("rule", String(255), nullable=False),
    Column("severity", String(32), nullable=False),
    Column("step", BigInteger),
    Column("message", Text, nullable=False),
    Column("labels", JSON),
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float),
    Index("ix_gw_alerts_run", "run_id", "started_at"),
)

ingest_errors = Table(
    "gw_ingest_errors", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("log", String(255), nullable=False),
    Column("path", Text, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("reason", Text, nullable=False),
    Column("at", Float, nullable=False),
)
