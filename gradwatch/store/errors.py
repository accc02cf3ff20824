"""Errors of the store: each carries a one-line message meant for the user, credentials masked."""

from __future__ import annotations

from gradwatch.redact import redact


class StoreError(Exception):
    """Base class: the store cannot answer; the message says why in one line.

    The message is redacted when the error is made (`gradwatch.redact.redact`), so no
    printer, traceback included, can show a password a URL or a driver message held.
    """

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


class BadStoreURL(StoreError):
    """The store URL is malformed (a bad port, an unknown option value)."""


class NotAStoreError(StoreError):
    """The database exists but is not a gradwatch store (or is not a database at all)."""


class StoreNotFound(NotAStoreError):
    """There is no store to read: no such SQLite file, or an empty database (`Store.open(create=False)`)."""


class SchemaVersionError(StoreError):
    """The store was written by another gradwatch version and cannot be read safely."""


class RunNotFound(StoreError):
    """No run matches a reference."""


class AmbiguousRun(StoreError):
    """A reference matches several runs; `candidates` lists their ids."""

    def __init__(self, message: str, candidates: list[str]) -> None:
        super().__init__(message)
        self.candidates = candidates


class UnknownMetric(StoreError):
    """The run has no such metric (in that scope)."""


class UnknownEntity(StoreError):
    """The run has no such param or layer."""
