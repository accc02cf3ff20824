"""Alembic revisions of the store schema, `v<N>` for schema version N (see the parent package)."""
