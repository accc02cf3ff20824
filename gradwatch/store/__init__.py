"""The gradwatch store: runs, their measurements, events and alerts in a SQL database.

SQLite in `$GRADWATCH_HOME` by default, any SQLAlchemy URL (PostgreSQL with psycopg 3)
to scale out. See docs/store.md.
"""

from __future__ import annotations

from gradwatch.store.engine import default_url
from gradwatch.store.errors import (
    AmbiguousRun,
    BadStoreURL,
    NotAStoreError,
    RunNotFound,
    SchemaVersionError,
    StoreError,
    StoreNotFound,
    UnknownEntity,
    UnknownMetric,
)
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
from gradwatch.store.schema import SCHEMA_VERSION
from gradwatch.store.store import Store

__all__ = [
    "SCHEMA_VERSION", "AlertInfo", "AmbiguousRun", "BadStoreURL", "EventInfo", "IngestErrorInfo", "LatestValue",
    "LayerInfo", "LayerTable", "LogInfo", "NotAStoreError", "ParamInfo", "RunInfo", "RunNotFound", "RunSummary",
    "SchemaVersionError", "Series", "Store", "StoreError", "StoreNotFound", "UnknownEntity", "UnknownMetric",
    "default_url",
]
