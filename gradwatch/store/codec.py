"""Packing of what the store keeps: chunks of a series, a series' last value, JSON fields.

Chunk values are float32 blobs, so NaN and ±Inf are kept bit for bit. They are byte-shuffled
(all first bytes, then all second bytes, ...) before zlib, which groups the slowly varying
sign/exponent bytes and lets them compress. Steps are stored as
an empty blob when they are the contiguous range `first..first+n-1` (the common case: a
metric measured every step), otherwise as zlib-compressed int64 deltas.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from typing import Any

import numpy as np

ZLIB_LEVEL = 1
NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}  # gw_series.last_nonfinite -> value
_JSON_FLOAT = "$float"  # {"$float": "nan"}: a non-finite float in a JSON field
TEXT_ESCAPE = "\u2400"  # ␀ (SYMBOL FOR NULL): starts an escape in a text column, see `encode_text`
_UNSTORABLE = re.compile("[\x00\u2400\ud800-\udfff]")
_ESCAPED = re.compile("\u2400(\u2400|0|u[0-9a-f]{4})")


def encode_steps(steps: np.ndarray) -> bytes:
    """Blob for int64 steps; empty when they are contiguous (first_step and n say it all)."""
    n = steps.shape[0]
    if n == 0 or int(steps[-1]) - int(steps[0]) == n - 1 and (n < 2 or bool(np.all(np.diff(steps) > 0))):
        return b""
    deltas = np.diff(steps.astype("<i8"), prepend=steps[:1].astype("<i8"))
    deltas[0] = 0
    return zlib.compress(deltas.tobytes(), ZLIB_LEVEL)


def decode_steps(blob: bytes, first_step: int, n: int) -> np.ndarray:
    """Inverse of `encode_steps`."""
    if not blob:
        return np.arange(first_step, first_step + n, dtype=np.int64)
    deltas = np.frombuffer(zlib.decompress(blob), dtype="<i8")
    return np.cumsum(deltas) + first_step


def encode_values(values: np.ndarray) -> bytes:
    """Blob for float32 values: byte-shuffled, then zlib."""
    raw = np.ascontiguousarray(values, dtype="<f4").view(np.uint8).reshape(-1, 4)
    return zlib.compress(np.ascontiguousarray(raw.T).tobytes(), ZLIB_LEVEL)


def decode_values(blob: bytes, n: int) -> np.ndarray:
    """Inverse of `encode_values`."""
    planes = np.frombuffer(zlib.decompress(blob), dtype=np.uint8).reshape(4, n)
    return np.ascontiguousarray(planes.T).view("<f4").reshape(n)


def encode_last(value: float) -> tuple[float | None, str | None]:
    """(`last_value`, `last_nonfinite`) columns for a series' last value.

    A SQL float cannot hold NaN on SQLite (it becomes NULL), so a non-finite value is
    stored as its name ("nan", "inf", "-inf") with a NULL `last_value`, on every backend.
    """
    if math.isfinite(value):
        return value, None
    return None, "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"


def decode_last(value: float | None, nonfinite: str | None) -> float:
    """Inverse of `encode_last` (a NULL value without a name is a NaN that SQLite nulled in schema v1)."""
    if nonfinite is not None:
        return NONFINITE[nonfinite]
    return math.nan if value is None else float(value)


def encode_json(obj: Any) -> str:
    """JSON text for a JSON column; non-finite floats become `{"$float": "nan" | "inf" | "-inf"}`
    (PostgreSQL's json type refuses the NaN and Infinity tokens)."""
    return json.dumps(_tag(obj), allow_nan=False)


def decode_json(text: str) -> Any:
    """Inverse of `encode_json`; also reads NaN / Infinity tokens (SQLite stores of schema v1)."""
    return json.loads(text, object_hook=_untag)


def _tag(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return {_JSON_FLOAT: encode_last(obj)[1]}
    if isinstance(obj, dict):
        return {k: _tag(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_tag(v) for v in obj]
    return obj


def _untag(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and obj.get(_JSON_FLOAT) in NONFINITE:
        return NONFINITE[obj[_JSON_FLOAT]]
    return obj


def encode_text(text: str) -> str:
    """`text` as stored in a free-text column, the same on every backend.

    PostgreSQL text cannot hold NUL, and neither backend's driver can send a lone surrogate
    (a name decoded from bytes that are not UTF-8), so those are escaped reversibly with
    ␀ (U+2400): ␀ itself becomes ␀␀, NUL ␀0, a lone surrogate ␀u and four hex digits.
    Any other text is stored as it is.
    """
    if text.isascii() and "\x00" not in text:
        return text
    return _UNSTORABLE.sub(_escape, text)


def decode_text(stored: str) -> str:
    """Inverse of `encode_text`; a ␀ that starts no escape is kept as it is."""
    if TEXT_ESCAPE not in stored:
        return stored
    return _ESCAPED.sub(_unescape, stored)


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    return TEXT_ESCAPE + ("0" if c == "\x00" else TEXT_ESCAPE if c == TEXT_ESCAPE else f"u{ord(c):04x}")


def _unescape(m: re.Match[str]) -> str:
    code = m.group(1)
    return "\x00" if code == "0" else TEXT_ESCAPE if code == TEXT_ESCAPE else chr(int(code[1:], 16))
