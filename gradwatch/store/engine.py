"""Opening a store: the engine with its pragmas, the schema version check, and the upgrade of
an older store (Alembic, `gradwatch.store.migrations`) in one locked write transaction.

Every message names the store by `where()`: the URL with its credentials masked
(`gradwatch.redact`), never the URL as given.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from sqlalchemy import Connection, Engine, create_engine, event, inspect, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)

from gradwatch.agent.runlog import default_home
from gradwatch.redact import redact
from gradwatch.store import codec, schema
from gradwatch.store.errors import (
    BadStoreURL,
    NotAStoreError,
    SchemaVersionError,
    StoreError,
    StoreNotFound,
)

DB_FILE = "gradwatch.db"
BUSY_TIMEOUT_S = 30.0
PG_LOCK_KEY = 7347001  # advisory lock that serialises creating and upgrading a PostgreSQL store

log = logging.getLogger(__name__)


def default_url(home: Path | None = None) -> str:
    """`sqlite:///$GRADWATCH_HOME/gradwatch.db`."""
    return f"sqlite:///{(home if home is not None else default_home()) / DB_FILE}"


def where(url: str | URL) -> str:
    """A store URL as messages show it: password and other credentials masked."""
    if isinstance(url, URL):
        url = url.render_as_string(hide_password=True)
    return redact(url)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Autocommit at the driver level; SQLAlchemy's `begin` event issues BEGIN itself, so a
    # transaction that will write takes the write lock up front (no deadlock on upgrade).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    cur.execute("PRAGMA synchronous = NORMAL")
    cur.execute("PRAGMA foreign_keys = ON")
    cur.execute("PRAGMA cache_size = -65536")
    cur.close()


def _sqlite_wal(dbapi_conn: Any, _record: Any) -> None:
    # Persistent in the file: a store is created in WAL mode, so opening an existing one needs
    # no write (and a foreign database is not converted by a read that then refuses it).
    dbapi_conn.execute("PRAGMA journal_mode = WAL")


def _sqlite_never_create(_dialect: Any, _record: Any, cargs: list[Any], cparams: dict[str, Any]) -> None:
    """Connect with SQLite's `mode=rw`: a missing file is an error, never a new empty database."""
    target = str(cargs[0])
    if target == ":memory:" or re.search(r"[?&]mode=", target):
        return
    if cparams.get("uri"):
        cargs[0] = target + ("&" if "?" in target else "?") + "mode=rw"
    else:
        cargs[0], cparams["uri"] = f"file:{quote(target)}?mode=rw", True


def _sqlite_begin(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("write") else "BEGIN")


def create_store_engine(url: str, create: bool = True) -> Engine:
    """An engine for a store URL, with WAL, a busy timeout and foreign keys on SQLite, and JSON
    fields that keep NaN and ±Inf (`codec.encode_json`).

    `create=True` makes the parent folders of a SQLite file (the database is created when
    first connected); `create=False` creates nothing: a SQLite file that does not exist is a
    StoreNotFound, and connections use SQLite's `mode=rw` so none can create it later.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise BadStoreURL(f"not a database URL: {where(url)!r}") from None
    if "@" in (parsed.host or ""):  # the driver would name this "host" in its errors: a piece of the password
        raise BadStoreURL(f"bad database URL {where(url)}: write an '@' in the user or password as %40")
    path = _sqlite_path(parsed)
    if path is not None and create:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store {where(parsed)}: {exc.strerror or exc}") from None
    try:  # the URL's options are checked here, before anything is looked for: bad input first
        engine = create_engine(parsed, json_serializer=codec.encode_json, json_deserializer=codec.decode_json)
    except (NoSuchModuleError, ImportError) as exc:
        raise StoreError(f"no database driver for {where(parsed)}: {_first_line(exc)}") from None
    except (ArgumentError, ValueError, TypeError) as exc:  # e.g. a query option with a value of the wrong type
        raise BadStoreURL(f"bad database URL {where(parsed)}: {_first_line(exc)}") from None
    if path is not None and not create and not path.is_file():
        engine.dispose()
        raise StoreNotFound(f"no gradwatch store at {path}: the file does not exist")
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        if create:
            event.listen(engine, "connect", _sqlite_wal)
        else:
            event.listen(engine, "do_connect", _sqlite_never_create)
    return engine


def _sqlite_path(url: URL) -> Path | None:
    """The file of a SQLite URL (`sqlite:///path` or, with `uri=true`, `sqlite:///file:path?...`);
    None for another backend or an in-memory database."""
    database = url.database or ""
    if url.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        return None
    if str(url.query.get("uri", "")).lower() in ("1", "true") and database.startswith("file:"):
        rest = database.removeprefix("file:").split("?")[0]
        if rest.startswith("//"):  # file://host/path: the host is empty or localhost
            rest = "/" + rest[2:].partition("/")[2]
        database = unquote(rest)
        if database in ("", ":memory:") or str(url.query.get("mode", "")) == "memory":
            return None
    return Path(database)


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


def _serialise(conn: Connection) -> None:
    """Make concurrent creators / upgraders wait for each other (SQLite: BEGIN IMMEDIATE does)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text(f"SELECT pg_advisory_xact_lock({PG_LOCK_KEY})"))


def _create(engine: Engine) -> None:
    from gradwatch.store import migrations

    with writing(engine) as conn:
        _serialise(conn)
        if schema.meta.name in inspect(conn).get_table_names():
            return
        schema.metadata.create_all(conn)
        conn.execute(schema.meta.insert(), [
            {"key": "application", "value": schema.APPLICATION},
            {"key": "schema_version", "value": str(schema.SCHEMA_VERSION)},
            {"key": "created_at", "value": repr(time.time())},
        ])
        migrations.stamp(conn, schema.SCHEMA_VERSION)


def prepare_schema(engine: Engine, create: bool = True) -> None:
    """Create the tables in an empty database (only when `create`), upgrade an older store,
    check an existing one.

    Raises StoreNotFound for an empty database when not `create`, NotAStoreError for a
    database that holds other tables or is not a database, SchemaVersionError for a store of a
    newer schema version, and StoreError when an older store cannot be upgraded (it is then
    left as it was) or the database cannot be reached.
    """
    here = where(engine.url)
    try:
        with engine.connect() as conn:
            names = set(inspect(conn).get_table_names())
            if not names:
                conn.rollback()
                if not create:
                    raise StoreNotFound(f"{here} is not a gradwatch store: it holds no tables")
                _create(engine)
                return
            if schema.meta.name not in names:
                raise NotAStoreError(f"{here} is not a gradwatch store (it holds other tables)")
            values = _meta_values(conn)
    except OperationalError as exc:  # unreachable, not openable (read-only, a directory): say so, not "not a store"
        raise StoreError(f"cannot open the store {here}: {_first_line(exc.orig)}") from None
    except DBAPIError as exc:
        raise NotAStoreError(f"{here} is not a gradwatch store: {_first_line(exc.orig)}") from None
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot open {here}: {_first_line(exc)}") from None
    if values.get("application") != schema.APPLICATION:
        raise NotAStoreError(f"{here} is not a gradwatch store (no gradwatch marker)")
    if _check_version(here, values.get("schema_version")) < schema.SCHEMA_VERSION:
        migrate(engine, schema.SCHEMA_VERSION)
        prepare_schema(engine, create)
        return
    missing = set(schema.metadata.tables) - names
    if missing:
        raise NotAStoreError(f"{here} is a damaged gradwatch store: missing tables {', '.join(sorted(missing))}")


def _meta_values(conn: Connection) -> dict[str, str]:
    return {str(k): str(v) for k, v in conn.execute(select(schema.meta.c.key, schema.meta.c.value))}


def _check_version(here: str, raw: str | None) -> int:
    try:
        version = int(raw or "")
    except ValueError:
        raise NotAStoreError(f"{here} has an unreadable schema version {raw!r}") from None
    if version > schema.SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{here} has schema version {version}, newer than this gradwatch supports "
            f"({schema.SCHEMA_VERSION}): upgrade gradwatch")
    if version < 1:
        raise NotAStoreError(f"{here} has an impossible schema version {version}")
    return version


def migrate(engine: Engine, target: int) -> int:
    """Bring the store to schema version `target`, up or down, in one write transaction; returns
    the version it was at.

    The version is read under the write lock (BEGIN IMMEDIATE on SQLite, an advisory lock on
    PostgreSQL): of several processes opening the same old store at once, the first migrates
    and the others find it done. On failure the store is left as it was.
    """
    from alembic.util import CommandError

    from gradwatch.store import migrations  # Alembic is loaded only to create or migrate a store

    here = where(engine.url)
    if not 1 <= target <= schema.SCHEMA_VERSION:
        raise StoreError(f"no schema version {target}: this gradwatch knows versions 1 to {schema.SCHEMA_VERSION}")
    now: int | None = None
    try:
        with writing(engine) as conn:
            _serialise(conn)
            if schema.meta.name not in inspect(conn).get_table_names():
                raise NotAStoreError(f"{here} is not a gradwatch store")
            now = _check_version(here, _meta_values(conn).get("schema_version"))
            if now == target:
                return now  # e.g. another process upgraded it while this one waited for the lock
            (migrations.upgrade if target > now else migrations.downgrade)(conn, target)
            done = _meta_values(conn).get("schema_version")
            if done != str(target):  # raising rolls the transaction back
                raise StoreError(f"cannot migrate the store {here}: the migrations ended at schema version {done}")
    except (SQLAlchemyError, CommandError) as exc:
        reason = _first_line(exc.orig) if isinstance(exc, DBAPIError) else _first_line(exc)
        since = "" if now is None else f" from schema version {now}"
        raise StoreError(f"cannot migrate the store {here}{since} to schema version {target}: {reason}") from None
    log.info("migrated the store %s from schema version %d to %d", here, now, target)
    return now


def _first_line(exc: BaseException | None) -> str:
    """The first line of an error's message, credentials masked (a driver may quote a DSN)."""
    text = str(exc).strip() or type(exc).__name__
    return redact(text.splitlines()[0])
