"""Opening a store: the engine with its pragmas, and the schema version check."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)

from gradwatch.agent.runlog import default_home
from gradwatch.store import schema
from gradwatch.store.errors import (
    BadStoreURL,
    NotAStoreError,
    SchemaVersionError,
    StoreError,
)

DB_FILE = "gradwatch.db"
BUSY_TIMEOUT_S = 30.0


def default_url(home: Path | None = None) -> str:
    """`sqlite:///$GRADWATCH_HOME/gradwatch.db`."""
    return f"sqlite:///{(home if home is not None else default_home()) / DB_FILE}"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Autocommit at the driver level; SQLAlchemy's `begin` event issues BEGIN itself, so a
    # transaction that will write takes the write lock up front (no deadlock on upgrade).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    cur.execute("PRAGMA journal_mode = WAL")
    cur.execute("PRAGMA synchronous = NORMAL")
    cur.execute("PRAGMA foreign_keys = ON")
    cur.execute("PRAGMA cache_size = -65536")
    cur.close()


def _sqlite_begin(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("write") else "BEGIN")


def create_store_engine(url: str) -> Engine:
    """An engine for a store URL, with WAL, a busy timeout and foreign keys on SQLite."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise BadStoreURL(f"not a database URL: {url!r}") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = create_engine(parsed)
    except (NoSuchModuleError, ImportError) as exc:
        raise StoreError(f"no database driver for {parsed.render_as_string(hide_password=True)}: {exc}") from None
    except (ArgumentError, ValueError, TypeError) as exc:  # e.g. a query option with a value of the wrong type
        raise BadStoreURL(f"bad database URL {parsed.render_as_string(hide_password=True)}: {exc}") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
    return engine


@contextmanager
def writing(engine: Engine) -> Iterator[Connection]:
    """A connection inside one write transaction (BEGIN IMMEDIATE on SQLite), committed on exit."""
    with engine.connect() as conn:
        conn.info["write"] = True
        try:
            with conn.begin():
                yield conn
        finally:
            conn.info["write"] = False


def _create(engine: Engine) -> None:
    with writing(engine) as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(7347001)"))  # serialise concurrent creators
        if schema.meta.name in inspect(conn).get_table_names():
            return
        schema.metadata.create_all(conn)
        conn.execute(schema.meta.insert(), [
            {"key": "application", "value": schema.APPLICATION},
            {"key": "schema_version", "value": str(schema.SCHEMA_VERSION)},
            {"key": "created_at", "value": repr(time.time())},
        ])


def prepare_schema(engine: Engine) -> None:
    """Create the tables in an empty database, or check the version of an existing store.

    Raises NotAStoreError for a database that holds other tables or is not a database,
    and SchemaVersionError for a store written with another schema version.
    """
    where = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            names = set(inspect(conn).get_table_names())
            if not names:
                conn.rollback()
                _create(engine)
                return
            if schema.meta.name not in names:
                raise NotAStoreError(f"{where} is not a gradwatch store (it holds other tables)")
            values = dict(conn.execute(select(schema.meta.c.key, schema.meta.c.value)).all())
    except OperationalError as exc:  # unreachable, not openable (read-only, a directory): say so, not "not a store"
        raise StoreError(f"cannot open the store {where}: {_first_line(exc.orig)}") from None
    except DBAPIError as exc:
        raise NotAStoreError(f"{where} is not a gradwatch store: {_first_line(exc.orig)}") from None
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot open {where}: {_first_line(exc)}") from None
    if values.get("application") != schema.APPLICATION:
        raise NotAStoreError(f"{where} is not a gradwatch store (no gradwatch marker)")
    _check_version(where, values.get("schema_version"))
    missing = set(schema.metadata.tables) - names
    if missing:
        raise NotAStoreError(f"{where} is a damaged gradwatch store: missing tables {', '.join(sorted(missing))}")


def _check_version(where: str, raw: str | None) -> None:
    try:
        version = int(raw or "")
    except ValueError:
        raise NotAStoreError(f"{where} has an unreadable schema version {raw!r}") from None
    if version > schema.SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{where} has schema version {version}, newer than this gradwatch supports "
            f"({schema.SCHEMA_VERSION}): upgrade gradwatch")
    if version < schema.SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{where} has schema version {version}, older than {schema.SCHEMA_VERSION}, and cannot be "
            "migrated: export what you need with the older gradwatch, then move the file away")


def _first_line(exc: BaseException | None) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
