"""Alembic environment: migrate on the connection gradwatch passes in `config.attributes`,
inside its transaction (Alembic then neither begins nor commits one)."""

from __future__ import annotations

from alembic import context

from gradwatch.store.migrations import VERSION_TABLE

context.configure(connection=context.config.attributes["connection"], version_table=VERSION_TABLE)
with context.begin_transaction():
    context.run_migrations()
