"""Record framing of the run log: the prefix of every record, and a scanner that finds the
records of a byte string however it was damaged, in time linear in its size.

Format v2 (written)::

    MAGIC b"GW\\x02" | u32 length | u32 crc32(body) | u32 crc32(the 11 bytes before) | body

Format v1 (read only)::

    MAGIC b"GW\\x01" | u32 length | u32 crc32(body) | body

Integers are little-endian; crc32 is zlib's. The v2 prefix checksums itself, so whether a
record starts at an offset is decided from its 15 bytes alone: a damaged length is never
followed, and resynchronising after damage checks each candidate magic in O(1). The
candidates are found and checked vectorised, a chunk at a time, each byte once; bodies are
checksummed at most once each. So any input, crafted or not, scans in O(size). This module
imports only the standard library and numpy.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from zlib import crc32

import numpy as np

MAGIC = b"GW\x02"
MAGIC_V1 = b"GW\x01"
MAX_RECORD_BYTES = 256 * 1024 * 1024
COPIES = 3  # times the header and each metric definition are written, back to back (see `rebuild`)

PREFIX = struct.Struct("<3sIII")  # magic, body length, crc32(body), crc32(magic, length, crc32(body))
PREFIX_V1 = struct.Struct("<3sII")  # magic, body length, crc32(body)
_CHECKED = PREFIX_V1.size  # the v2 prefix checksum covers the bytes before it
_CHUNK = 1 << 20  # bytes searched for candidate record starts per vectorised pass


@dataclass(frozen=True)
class Piece:
    """A stretch of a scanned byte string: an intact record (`reason` None), a damaged
    stretch (`body` None), or a record rebuilt from its damaged copies (both set)."""

    start: int
    end: int
    reason: str | None
    body: bytes | memoryview | None


_Raw = tuple[int, int, str | None]  # (start, end, reason) of one record or damaged stretch


def frame(body: bytes) -> bytes:
    """One v2 record: its prefix, then `body`."""
    head = PREFIX_V1.pack(MAGIC, len(body), crc32(body))
    return head + struct.pack("<I", crc32(head)) + body


def version_of(data: bytes) -> int:
    """The format version of a log from its first magic (2 when there is none yet)."""
    v1, v2 = data.find(MAGIC_V1, 0, _CHUNK), data.find(MAGIC, 0, _CHUNK)
    return 1 if v1 >= 0 and (v2 < 0 or v1 < v2) else 2


def scan(data: bytes, version: int) -> Iterator[Piece]:
    """Yield the pieces of `data` in order, consecutive damaged stretches merged into one.

    Stops before a torn tail: a last record not yet complete (or whose checksum fails
    while it ends exactly at the end of `data`, so it may still be being written), which a
    later scan of the grown log reads. Everything after the last piece's end is left unread.
    """
    view = memoryview(data)
    skip = PREFIX_V1.size if version == 1 else PREFIX.size
    damaged: list[_Raw] = []
    for start, end, reason in _scan_v2(data) if version >= 2 else _scan_v1(data):
        if reason is not None and (not damaged or damaged[-1][1] == start):
            damaged.append((start, end, reason))
            continue
        if damaged:
            yield from _stretch(data, damaged, version)
            damaged = []
        if reason is None:
            yield Piece(start, end, None, view[start + skip:end])
        else:
            damaged.append((start, end, reason))
    if damaged:
        yield from _stretch(data, damaged, version)


def _stretch(data: bytes, pieces: list[_Raw], version: int) -> Iterator[Piece]:
    """One damaged stretch made of consecutive damaged pieces; when it begins with the
    damaged copies of one record, that record rebuilt first."""
    start, end = pieces[0][0], pieces[-1][1]
    body = rebuild(data, start, end, {e - s for s, e, _ in pieces[:COPIES]}) if version >= 2 else None
    if body is not None:
        cut = start + COPIES * (PREFIX.size + len(body))
        yield Piece(start, cut, f"{pieces[0][2]}: every copy of a record damaged, rebuilt from them", body)
        pieces = [(max(s, cut), e, r) for s, e, r in pieces if e > cut]
        if not pieces:
            return
        start = pieces[0][0]
    reason = pieces[0][2]
    if len(pieces) > 1:
        reason = f"{reason} (and {len(pieces) - 1} more damaged records up to offset {end})"
    yield Piece(start, end, reason, None)


def rebuild(data: bytes, start: int, end: int, sizes: set[int]) -> bytes | None:
    """The body of a record written `COPIES` times back to back from `start`, all of them
    damaged within [start, end): rebuilt byte by byte by majority vote and kept only if its
    prefix and body checksums hold. `sizes` are guesses of the record's size (the first
    pieces of the damaged stretch); its own length field is tried too. O(end - start)."""
    if start + PREFIX.size <= end:
        sizes = sizes | {PREFIX.size + PREFIX.unpack_from(data, start)[1]}
    arr = np.frombuffer(data, dtype=np.uint8)
    for size in sorted(sizes):
        if size <= PREFIX.size or start + COPIES * size > end:
            continue
        copies = arr[start:start + COPIES * size].reshape(COPIES, size)
        if _record_at(_vote(copies[:, :PREFIX.size]), 0)[0] != size:
            continue  # the voted prefix settles it in O(1) for a stretch that is no set of copies
        record = _vote(copies)
        rec_end, body_crc = _record_at(record, 0)
        if rec_end == size and crc32(record[PREFIX.size:]) == body_crc:
            return record[PREFIX.size:]
    return None


def _vote(copies: np.ndarray) -> bytes:
    """Byte by byte, the value two of three copies agree on."""
    first, second, third = copies
    return np.where(first == second, first, third).tobytes()


def _scan_v2(data: bytes) -> Iterator[_Raw]:
    size = len(data)
    view = memoryview(data)
    starts = _Starts(data)
    pos = 0
    while pos < size:
        end, body_crc = _record_at(data, pos)
        if end < 0:
            if pos + PREFIX.size > size and _may_start(data, pos):
                return  # the first bytes of a record still being written
            nxt = starts.first(pos + 1, size)
            nxt = _tail_start(data, pos + 1) if nxt is None else nxt
            yield pos, nxt, "bad record framing"
            pos = nxt
            continue
        inner = starts.first(pos + 1, min(end, size))
        if inner is not None:  # a record starts inside this one: it was cut short, and maybe that one too
            nxt = starts.uncut()
            yield pos, nxt, "truncated record"
            pos = nxt
            continue
        if end > size:
            return  # torn tail
        if crc32(view[pos + PREFIX.size:end]) != body_crc:
            if end == size:
                return  # the tail may still be in the middle of its write: wait for it
            yield pos, end, "checksum mismatch"
        else:
            yield pos, end, None
        pos = end


def _record_at(data: bytes, pos: int) -> tuple[int, int]:
    """(end, crc32 of the body) of the record whose prefix starts at pos, or (-1, 0) when
    there is no whole prefix there that checks out."""
    if pos + PREFIX.size > len(data):
        return -1, 0
    magic, length, body_crc, check = PREFIX.unpack_from(data, pos)
    if magic != MAGIC or not 0 < length <= MAX_RECORD_BYTES or crc32(data[pos:pos + _CHECKED]) != check:
        return -1, 0
    return pos + PREFIX.size + length, body_crc


def _may_start(data: bytes, pos: int) -> bool:
    """Whether the bytes from pos to the end could be the beginning of a record's prefix."""
    head = data[pos:pos + len(MAGIC)]
    return MAGIC.startswith(head)


def _tail_start(data: bytes, lo: int) -> int:
    """Where, at or after lo, a record might begin whose prefix is not whole yet (the end of
    `data` when nowhere): damage before a record still being written stops there."""
    for p in range(max(lo, len(data) - PREFIX.size + 1), len(data)):
        if _may_start(data, p):
            return p
    return len(data)


class _Starts:
    """The offsets whose 15 bytes are a v2 prefix that checks out, in increasing order.

    Found a chunk at a time with numpy: `first` is asked for ever later offsets, so each
    byte of the data is examined once however many candidates it holds.
    """

    def __init__(self, data: bytes) -> None:
        self._arr = np.frombuffer(data, dtype=np.uint8)
        self._done = 0  # every offset below this has been examined
        self._found = np.empty(0, dtype=np.int64)  # the starts of the chunk examined last
        self._uncut = np.empty(0, dtype=np.int64)  # per start: index of the first start from it on with none inside
        self._i = 0  # index of the start `first` returned last

    def first(self, lo: int, hi: int) -> int | None:
        """The first start p with lo <= p < hi, or None. `lo` never decreases between calls."""
        while True:
            self._i += int(np.searchsorted(self._found[self._i:], lo))
            if self._i < self._found.shape[0]:
                p = int(self._found[self._i])
                return p if p < hi else None
            if self._done >= min(hi, self._arr.shape[0]):
                return None
            start = max(lo, self._done)
            self._done = min(start + _CHUNK, self._arr.shape[0])
            self._found, ends = valid_starts(self._arr, start, self._done)
            self._uncut = _uncut(self._found, ends)
            self._i = 0

    def uncut(self) -> int:
        """From the start `first` returned last on, the first (among those examined) whose
        record holds no later start: every one before it was cut short. O(1), so a crafted
        run of nested records costs no Python work per record."""
        return int(self._found[self._uncut[self._i]])


def _uncut(found: np.ndarray, ends: np.ndarray) -> np.ndarray:
    n = found.shape[0]
    index = np.arange(n)
    index[:-1][found[1:] < ends[:-1]] = n  # cut short by the next start
    return np.minimum.accumulate(index[::-1])[::-1]


def valid_starts(arr: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets p in [lo, hi) of `arr` (uint8) where a whole v2 prefix checks out (the magic,
    a sane length and the prefix checksum), and where their records end. Vectorised:
    O(hi - lo) numpy work."""
    none = np.empty(0, dtype=np.int64)
    stop = min(hi, arr.shape[0] - PREFIX.size + 1)  # a start needs its whole prefix
    if stop <= lo:
        return none, none
    n = stop - lo
    hit = arr[lo:lo + n] == MAGIC[0]
    for k in (1, 2):
        hit &= arr[lo + k:lo + k + n] == MAGIC[k]
    hit &= arr[lo + 6:lo + 6 + n] <= MAX_RECORD_BYTES >> 24  # the length's high byte: a first cut of insane lengths
    p = np.flatnonzero(hit) + lo
    if not p.shape[0]:
        return none, none
    size, after_magic = arr.shape[0], p + len(MAGIC)
    fields = np.ndarray((size - 7,), dtype="<u8", buffer=arr, strides=(1,))[after_magic]  # length, crc32(body)
    check = np.ndarray((size - 3,), dtype="<u4", buffer=arr, strides=(1,))[after_magic + 8]
    base, tables = _prefix_crc_tables()
    halves = fields.view("<u2").reshape(-1, 4)
    crc = tables[0].take(halves[:, 0]) ^ np.uint32(base)
    for k in range(1, 4):
        crc ^= tables[k].take(halves[:, k])
    length = fields.view("<u4")[::2]
    ok = (crc == check) & (length > 0) & (length <= MAX_RECORD_BYTES)
    p = p[ok].astype(np.int64)
    return p, p + PREFIX.size + length[ok]


@cache
def _prefix_crc_tables() -> tuple[int, np.ndarray]:
    """crc32 of a v2 prefix's first 11 bytes as base ^ xor over k of tables[k][u16 k after the
    magic]: for messages of one length crc32 is affine over GF(2), so each byte adds a term of
    its own, and two bytes' terms make one table of 65536."""
    base = crc32(MAGIC + bytes(8))
    per_byte = np.array([[crc32(MAGIC + bytes(j) + bytes((b,)) + bytes(7 - j)) ^ base for b in range(256)]
                         for j in range(8)], dtype=np.uint32)
    v = np.arange(1 << 16)
    return base, np.stack([per_byte[2 * k][v & 0xFF] ^ per_byte[2 * k + 1][v >> 8] for k in range(4)])


def _scan_v1(data: bytes) -> Iterator[_Raw]:
    """Format v1: a damaged record is skipped by searching for the next magic whose body
    checksum holds (v1 prefixes carry no checksum of their own)."""
    view = memoryview(data)
    size = len(data)
    pos = 0
    while pos + PREFIX_V1.size <= size:
        magic, length, body_crc = PREFIX_V1.unpack_from(data, pos)
        end = pos + PREFIX_V1.size + length
        if magic != MAGIC_V1 or length == 0 or length > MAX_RECORD_BYTES:
            reason = "bad record framing"
        elif end > size:
            # Incomplete: a tail still being written, unless a whole record follows the cut.
            nxt = _find_magic_v1(data, pos + 1, complete_only=True)
            if nxt >= size:
                return
            yield pos, nxt, "truncated record"
            pos = nxt
            continue
        elif crc32(view[pos + PREFIX_V1.size:end]) != body_crc:
            if end == size:
                return  # the tail may still be in the middle of its write: wait for it
            reason = "checksum mismatch"
        else:
            yield pos, end, None
            pos = end
            continue
        nxt = _find_magic_v1(data, pos + 1, complete_only=False)
        yield pos, nxt, reason
        pos = nxt


def _find_magic_v1(data: bytes, start: int, complete_only: bool) -> int:
    """Offset of the next plausible v1 record start at or after start, or len(data).

    Plausible: the magic, a sane length, and a matching checksum, or (unless
    `complete_only`) a record that runs past the end and so cannot be checked yet.
    """
    size = len(data)
    while True:
        i = data.find(MAGIC_V1, start)
        if i < 0 or i + PREFIX_V1.size > size:
            return size
        _, length, body_crc = PREFIX_V1.unpack_from(data, i)
        end = i + PREFIX_V1.size + length
        if 0 < length <= MAX_RECORD_BYTES:
            if end > size and not complete_only:
                return i
            if end <= size and crc32(memoryview(data)[i + PREFIX_V1.size:end]) == body_crc:
                return i
        start = i + 1
