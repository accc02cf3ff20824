"""Errors of the store: each carries a one-line message meant for the user."""

from __future__ import annotations


class StoreError(Exception):
    """Base class: the store cannot answer; the message says why in one line."""


class BadStoreURL(StoreError):
    """The store URL is malformed (a bad port, an unknown option value)."""


class NotAStoreError(StoreError):
    """The database exists but is not a gradwatch store (or is not a database at all)."""


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
