"""Packing of one chunk of a series: steps and float32 values as compact blobs.

Values are byte-shuffled (all first bytes, then all second bytes, ...) before zlib, which
groups the slowly varying sign/exponent bytes and lets them compress. Steps are stored as
an empty blob when they are the contiguous range `first..first+n-1` (the common case: a
metric measured every step), otherwise as zlib-compressed int64 deltas.
"""

from __future__ import annotations

import zlib

import numpy as np

ZLIB_LEVEL = 1


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
