"""Structured service log: one line per event, as JSON or as ``key=value`` text.

Call sites name an event and give fields (``log_event(logger, "listening", port=9464)``);
the formatter turns each record into exactly one line, escaping newlines in values, so the
log can be tailed, grepped and shipped without a parser for multi-line records.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

ROOT_LOGGER = "gradwatch"  # every gradwatch.* logger (ingest, store) gets the same format
LOGGER_NAME = "gradwatch.service"
_FIELDS = "gw_fields"


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event with structured fields."""
    logger.log(level, event, extra={_FIELDS: fields})


class JsonFormatter(logging.Formatter):
    """``{"ts": ..., "level": ..., "event": ..., <fields>}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"ts": _iso(record.created), "level": record.levelname.lower(),
                                "event": record.getMessage()}
        line.update(getattr(record, _FIELDS, {}))
        if record.exc_info and record.exc_info[1] is not None:
            line["error"] = _one_line(record.exc_info[1])
        return json.dumps(line, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``<ts> <level> <event> key=value ...`` on one line; values with spaces are quoted."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_iso(record.created), record.levelname.lower(), record.getMessage()]
        fields = dict(getattr(record, _FIELDS, {}))
        if record.exc_info and record.exc_info[1] is not None:
            fields["error"] = _one_line(record.exc_info[1])
        parts += [f"{key}={_text_value(value)}" for key, value in fields.items()]
        return " ".join(parts)


def _iso(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text.replace("\n", " ")


def _text_value(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\r\t'):
        return json.dumps(text)
    return text


def setup_logging(fmt: str = "text", stream: IO[str] | None = None,
                  level: int = logging.INFO) -> logging.Logger:
    """Send every ``gradwatch.*`` logger to `stream` (stderr by default), one line per event,
    and return the service's logger.

    Replaces handlers installed by an earlier call, so calling it twice does not duplicate lines.
    """
    logger = logging.getLogger(ROOT_LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logging.getLogger(LOGGER_NAME)
