"""CLI errors: one line on stderr and a non-zero exit, never a traceback.

Errors from the store and SQLAlchemy are translated here without importing either module
(they are looked up in `sys.modules`), so that light commands stay light.
"""

from __future__ import annotations

import json
import sys
import zlib

import click

from gradwatch.cli._format import printable
from gradwatch.redact import redact


class _OneLineError(click.ClickException):
    """An error printed as one line: credentials masked, names with control characters escaped."""

    def __init__(self, message: str) -> None:
        super().__init__(printable(redact(str(message))))


class CliError(_OneLineError):
    """A request that cannot be answered (exit 1): an unreadable store, a file that cannot be written."""

    exit_code = 1


class BadInput(_OneLineError):
    """What the user asked for does not exist or makes no sense (exit 2): unknown or ambiguous run,
    metric or layer, a bad step range."""

    exit_code = 2


def one_line(text: str) -> str:
    """`text` on one line, whitespace collapsed, credentials masked (`gradwatch.redact`)."""
    return redact(" ".join(str(text).split())) or "unknown error"


def translate(exc: BaseException) -> click.ClickException | None:
    """The one-line CLI error for an exception from the store, the database or the OS; None if unknown."""
    store_errors = sys.modules.get("gradwatch.store.errors")
    if store_errors is not None and isinstance(exc, store_errors.StoreError):
        bad_input = (store_errors.RunNotFound, store_errors.AmbiguousRun, store_errors.UnknownMetric,
                     store_errors.UnknownEntity, store_errors.BadStoreURL)
        return (BadInput if isinstance(exc, bad_input) else CliError)(one_line(str(exc)))
    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is not None and isinstance(exc, sa_exc.SQLAlchemyError):
        orig = getattr(exc, "orig", None)
        return CliError(f"the store cannot be read: {one_line(str(orig or exc).splitlines()[0])}")
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return CliError(f"{exc.strerror or one_line(str(exc))}{where}")
    if isinstance(exc, OverflowError):  # a number too large for the store, from an argument or a record
        return BadInput(f"number out of range: {one_line(str(exc))}")
    if isinstance(exc, (zlib.error, UnicodeDecodeError, json.JSONDecodeError)):
        return CliError(f"damaged data, cannot be decoded ({type(exc).__name__}): {one_line(str(exc))}")
    return None


def unexpected(exc: BaseException) -> CliError:
    """The one-line error for an exception nobody translated: a bug, still without a traceback
    (GRADWATCH_DEBUG=1 lets it through instead)."""
    return CliError(f"unexpected {type(exc).__name__}: {one_line(str(exc))} (GRADWATCH_DEBUG=1 shows the traceback)")
