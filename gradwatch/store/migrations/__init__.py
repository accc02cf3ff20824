"""Schema migrations of the store: Alembic scripts run from code, on the caller's connection.

Revision `v<N>` (in `versions/`) brings a store to schema version N and sets
`gw_meta.schema_version` to N. Schema v1 (gradwatch 0.1.0) predates Alembic: it is the base
(no revision). Alembic records the revision in `gw_alembic_version`; no alembic.ini is read,
so the scripts work from an installed wheel. Every function runs inside the transaction of
the connection it is given, so a failed migration leaves the store as it was.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection

VERSION_TABLE = "gw_alembic_version"
_HERE = Path(__file__).resolve().parent


def revision(version: int) -> str:
    """The Alembic revision of a schema version ("base" for v1, which predates Alembic)."""
    return "base" if version == 1 else f"v{version}"


def _config(conn: Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_HERE))
    cfg.attributes["connection"] = conn  # read by env.py
    return cfg


def upgrade(conn: Connection, version: int) -> None:
    """Migrate the store on `conn` up to schema `version`."""
    command.upgrade(_config(conn), revision(version))


def downgrade(conn: Connection, version: int) -> None:
    """Migrate the store on `conn` down to schema `version`."""
    command.downgrade(_config(conn), revision(version))


def stamp(conn: Connection, version: int) -> None:
    """Record that the store on `conn` is at schema `version` (a store just created at it)."""
    command.stamp(_config(conn), revision(version))
