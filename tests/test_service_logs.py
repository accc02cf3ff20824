"""The structured service log: exactly one line per event, in JSON or key=value text."""

from __future__ import annotations

import io
import json
import logging

import pytest

from gradwatch.service.logs import log_event, setup_logging


def test_json_one_object_per_line() -> None:
    stream = io.StringIO()
    logger = setup_logging("json", stream)
    log_event(logger, "started", port=9464, url="http://127.0.0.1:9464/metrics")
    log_event(logger, "ingest_failed", logging.ERROR, error="line one\nline two")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "started" and first["level"] == "info" and first["port"] == 9464
    assert first["ts"].endswith("Z")
    assert second == {**second, "event": "ingest_failed", "level": "error", "error": "line one\nline two"}


def test_text_quotes_and_escapes() -> None:
    stream = io.StringIO()
    logger = setup_logging("text", stream)
    log_event(logger, "push_failed", logging.WARNING, gateway="http://gw:9091", error="boom: two\nlines")
    (line,) = stream.getvalue().splitlines()
    assert line.split(" ")[1:4] == ["warning", "push_failed", "gateway=http://gw:9091"]
    assert line.endswith('error="boom: two\\nlines"')


def test_other_gradwatch_loggers_use_the_same_format() -> None:
    stream = io.StringIO()
    setup_logging("json", stream)
    logging.getLogger("gradwatch.ingest").warning("gradwatch: ingest pass failed: %s", "disk full")
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line)["event"] == "gradwatch: ingest pass failed: disk full"


def test_exception_is_one_line() -> None:
    stream = io.StringIO()
    logger = setup_logging("text", stream)
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        logger.exception("crashed")
    assert stream.getvalue().count("\n") == 1
    assert 'error="ValueError: bad thing"' in stream.getvalue()


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_setup_twice_does_not_duplicate(fmt: str) -> None:
    stream = io.StringIO()
    setup_logging(fmt, stream)
    logger = setup_logging(fmt, stream)
    log_event(logger, "once")
    assert len(stream.getvalue().splitlines()) == 1
