"""The run log: the only interface between the agent and the service (DESIGN.md).

One append-only file per run and rank. Every record is framed as::

    MAGIC (3 bytes, b"GW\\x01") | length (u32) | crc32 of the body (u32) | body (length bytes)
    body = kind (1 byte) | payload

so a torn tail (a record cut short by a crash) is detected and left unread until it is
complete, and a corrupt record in the middle is reported with its offset and skipped by
resynchronising on the next magic whose checksum holds. Payloads are JSON for the rare
records (header, metric definitions, events, close) and packed little-endian arrays for
frames, which carry the measurements.

A frame is a list of blocks; a block is one metric's rows: ``steps`` (int64, n),
``values`` (float32, n x width), where width is the metric's number of columns (1 for a
run-level value, one per param group, per param or per applicable layer), and ``present``
(bool, n x width), False where a column was not measured at that step. NaN, +Inf and -Inf
are values like any other (format v2; in v1 logs NaN meant "not measured"). This module
imports only the standard library and numpy.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MAGIC = b"GW\x02"
MAGIC_V1 = b"GW\x01"
LOG_SUFFIX = ".gwlog"
MAX_RECORD_BYTES = 256 * 1024 * 1024

_PREFIX = struct.Struct("<3sII")  # magic, body length, crc32(body)
_BLOCK_HEAD_V1 = struct.Struct("<II")  # metric id, row count
_BLOCK_HEAD = struct.Struct("<IIII")  # block length (after this field), metric id, row count, flags
_HAS_MASK = 1  # block flag: a presence bitmask follows the steps

Scope = Literal["run", "group", "param", "layer"]

KIND_HEADER = 1
KIND_METRIC = 2
KIND_FRAME = 3
KIND_EVENT = 4
KIND_CLOSE = 5


def default_home() -> Path:
    """`$GRADWATCH_HOME`, or `~/.gradwatch` when unset."""
    env = os.environ.get("GRADWATCH_HOME")
    return Path(env).expanduser() if env else Path.home() / ".gradwatch"


def logs_dir(home: Path | None = None) -> Path:
    """Folder that holds every run log of a gradwatch home."""
    return (home if home is not None else default_home()) / "logs"


def log_path(run_id: str, rank: int, home: Path | None = None) -> Path:
    """Path of the run log of one run and rank."""
    return logs_dir(home) / f"{run_id}.rank{rank}{LOG_SUFFIX}"


@dataclass(frozen=True)
class MetricDef:
    """One metric of a run: its id in frames, name, scope, and the columns it covers.

    `indices` are the param / layer / group indices of the columns (empty for `run` scope,
    which has a single column).
    """

    id: int
    name: str
    scope: Scope
    indices: tuple[int, ...] = ()

    @property
    def width(self) -> int:
        return 1 if self.scope == "run" else len(self.indices)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "scope": self.scope, "indices": list(self.indices)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MetricDef:
        return cls(int(d["id"]), str(d["name"]), d["scope"], tuple(int(i) for i in d.get("indices", ())))


@dataclass
class Header:
    """Run metadata written once at the start of a log.

    `info` holds run_id, name, project, host, pid, rank, world_size, torch_version,
    gradwatch_version, started_at (unix seconds), config, params, layers, groups and
    init_check (see docs/runlog.md for every key).
    """

    info: dict[str, Any]
    metrics: list[MetricDef] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return str(self.info["run_id"])

    @property
    def rank(self) -> int:
        return int(self.info.get("rank", 0))


@dataclass
class Block:
    """One metric's rows inside a frame.

    `present[i, j]` is False where column j was not measured at `steps[i]`; its `values`
    entry is then meaningless. Every other value, NaN and ±Inf included, was measured.
    """

    metric: MetricDef
    steps: np.ndarray  # int64, shape (n,)
    values: np.ndarray  # float32, shape (n, width)
    present: np.ndarray  # bool, shape (n, width)


@dataclass
class Frame:
    blocks: list[Block]


@dataclass
class Event:
    """Something that happened at a step: a guard firing, agent errors, dropped frames."""

    kind: str
    step: int
    time: float
    data: dict[str, Any]


@dataclass
class Close:
    """Written when the run is closed cleanly."""

    time: float
    step: int
    stats: dict[str, Any]


@dataclass
class Corrupt:
    """A record that failed its checksum or framing; `offset` is where it starts."""

    offset: int
    reason: str


Record = Header | MetricDef | Frame | Event | Close | Corrupt


# ---------------------------------------------------------------- encoding


def _frame_bytes(kind: int, payload: bytes) -> bytes:
    body = bytes((kind,)) + payload
    return _PREFIX.pack(MAGIC, len(body), zlib.crc32(body)) + body


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=True, default=str).encode()


def encode_header(header: Header) -> bytes:
    payload = {"format_version": FORMAT_VERSION, "info": header.info,
               "metrics": [m.to_json() for m in header.metrics]}
    return _frame_bytes(KIND_HEADER, _json_bytes(payload))


def encode_metric(metric: MetricDef) -> bytes:
    return _frame_bytes(KIND_METRIC, _json_bytes(metric.to_json()))


def encode_frame(blocks: Sequence[tuple[Any, ...]]) -> bytes:
    """Encode (metric id, steps, values[, present]) blocks.

    values has shape (len(steps), width); present is a bool array of that shape (False: not
    measured), or None or left out when every value was measured (then no mask is written).
    """
    parts = [struct.pack("<I", len(blocks))]
    for metric_id, steps, values, *rest in blocks:
        present = rest[0] if rest else None
        steps = np.ascontiguousarray(steps, dtype="<i8")
        values = np.ascontiguousarray(values, dtype="<f4")
        if values.shape[0] != steps.shape[0]:
            raise ValueError(f"block {metric_id}: {steps.shape[0]} steps but {values.shape[0]} rows")
        mask = b""
        if present is not None and not bool(np.all(present)):
            if present.shape != values.shape:
                raise ValueError(f"block {metric_id}: mask shape {present.shape} != values shape {values.shape}")
            mask = np.packbits(present.astype(bool).ravel(), bitorder="little").tobytes()
        body = steps.tobytes() + mask + values.tobytes()
        parts.append(_BLOCK_HEAD.pack(len(body) + 12, metric_id, steps.shape[0], _HAS_MASK if mask else 0))
        parts.append(body)
    return _frame_bytes(KIND_FRAME, b"".join(parts))


def encode_event(event: Event) -> bytes:
    return _frame_bytes(KIND_EVENT, _json_bytes(
        {"kind": event.kind, "step": event.step, "time": event.time, "data": event.data}))


def encode_close(close: Close) -> bytes:
    return _frame_bytes(KIND_CLOSE, _json_bytes(
        {"time": close.time, "step": close.step, "stats": close.stats}))


# ---------------------------------------------------------------- decoding


def _decode_frame_v1(payload: memoryview, metrics: dict[int, MetricDef]) -> Frame:
    """A v1 frame: no block lengths, and NaN stands for "not measured"."""
    (count,) = struct.unpack_from("<I", payload, 0)
    pos = 4
    blocks = []
    for _ in range(count):
        metric_id, rows = _BLOCK_HEAD_V1.unpack_from(payload, pos)
        pos += _BLOCK_HEAD_V1.size
        metric = metrics.get(metric_id)
        if metric is None:
            raise ValueError(f"frame refers to undefined metric id {metric_id}")
        steps = np.frombuffer(payload, dtype="<i8", count=rows, offset=pos)
        pos += 8 * rows
        values = np.frombuffer(payload, dtype="<f4", count=rows * metric.width, offset=pos).reshape(rows, metric.width)
        pos += 4 * rows * metric.width
        blocks.append(Block(metric, steps, values, ~np.isnan(values)))
    if pos != len(payload):
        raise ValueError(f"frame has {len(payload) - pos} trailing bytes")
    return Frame(blocks)


def _decode_frame(payload: memoryview, metrics: dict[int, MetricDef]) -> Frame:
    """A v2 frame: every block carries its length, so one block that cannot be decoded
    (its metric undefined, or a width that does not match) does not hide the others."""
    (count,) = struct.unpack_from("<I", payload, 0)
    pos = 4
    blocks = []
    for _ in range(count):
        block_len, metric_id, rows, flags = _BLOCK_HEAD.unpack_from(payload, pos)
        start, end = pos + 4, pos + 4 + block_len
        pos += _BLOCK_HEAD.size
        if end > len(payload) or block_len < 12:
            raise ValueError(f"block of metric {metric_id} runs past the frame")
        metric = metrics.get(metric_id)
        if metric is None:
            pos = end
            continue
        width = metric.width
        mask_len = (rows * width + 7) // 8 if flags & _HAS_MASK else 0
        if end - start != 12 + 8 * rows + mask_len + 4 * rows * width:
            pos = end
            continue
        steps = np.frombuffer(payload, dtype="<i8", count=rows, offset=pos)
        pos += 8 * rows
        if mask_len:
            bits = np.frombuffer(payload, dtype=np.uint8, count=mask_len, offset=pos)
            present = np.unpackbits(bits, count=rows * width, bitorder="little").astype(bool).reshape(rows, width)
        else:
            present = np.ones((rows, width), dtype=bool)
        pos += mask_len
        values = np.frombuffer(payload, dtype="<f4", count=rows * width, offset=pos).reshape(rows, width)
        pos = end
        blocks.append(Block(metric, steps, values, present))
    if pos != len(payload):
        raise ValueError(f"frame has {len(payload) - pos} trailing bytes")
    return Frame(blocks)


def _decode(kind: int, payload: memoryview, metrics: dict[int, MetricDef], version: int) -> Record:
    if kind == KIND_FRAME:
        return _decode_frame(payload, metrics) if version >= 2 else _decode_frame_v1(payload, metrics)
    obj = json.loads(bytes(payload))
    if kind == KIND_HEADER:
        if obj.get("format_version") not in READABLE_VERSIONS:
            raise ValueError(f"unsupported run log format version {obj.get('format_version')!r}")
        header = Header(obj["info"], [MetricDef.from_json(m) for m in obj["metrics"]])
        metrics.update({m.id: m for m in header.metrics})
        return header
    if kind == KIND_METRIC:
        metric = MetricDef.from_json(obj)
        metrics[metric.id] = metric
        return metric
    if kind == KIND_EVENT:
        return Event(obj["kind"], int(obj["step"]), float(obj["time"]), obj.get("data", {}))
    if kind == KIND_CLOSE:
        return Close(float(obj["time"]), int(obj["step"]), obj.get("stats", {}))
    raise ValueError(f"unknown record kind {kind}")


@dataclass
class LogReader:
    """Reads a run log incrementally from a byte offset.

    `read()` returns every complete record after `offset` as ``(end_offset, record)``
    pairs and advances `offset` past them; a torn tail stays unread (and `torn_tail` is
    set) until it is completed. A corrupt record yields a `Corrupt` and reading goes on
    at the next valid record. Resuming at a nonzero offset first re-reads the header and
    metric definitions before it, which is cheap: frames are skipped by their length.
    """

    path: Path
    offset: int = 0
    header: Header | None = None
    metrics: dict[int, MetricDef] = field(default_factory=dict)
    torn_tail: bool = False
    version: int = FORMAT_VERSION  # of the log, from its first record's magic

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.offset > 0:
            self._load_definitions(self.offset)

    def _load_definitions(self, until: int) -> None:
        with open(self.path, "rb") as f:
            data = f.read(until)
        self.version = _version_of(data)
        for _, record in _scan(data, 0, self.metrics, self.version, kinds={KIND_HEADER, KIND_METRIC}):
            if isinstance(record, Header):
                self.header = record

    def read(self, max_bytes: int | None = None) -> list[tuple[int, Record]]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read() if max_bytes is None else f.read(max_bytes)
        if self.offset == 0:
            self.version = _version_of(data)
        out: list[tuple[int, Record]] = []
        consumed = 0
        for end, record in _scan(data, 0, self.metrics, self.version):
            if isinstance(record, Header):
                self.header = record
            out.append((self.offset + end, record))
            consumed = end
        self.torn_tail = consumed < len(data)
        self.offset += consumed
        return out


def _version_of(data: bytes) -> int:
    """The format version of a log from its first bytes (v2 until they say v1)."""
    return 1 if data[:len(MAGIC_V1)] == MAGIC_V1 else FORMAT_VERSION


def _scan(data: bytes, pos: int, metrics: dict[int, MetricDef], version: int,
          kinds: set[int] | None = None) -> Iterator[tuple[int, Record]]:
    """Yield (end offset, record) for each complete record in data from pos on.

    Stops at an incomplete tail. With `kinds`, records of other kinds are skipped undecoded.
    """
    view = memoryview(data)
    size = len(data)
    expected = MAGIC_V1 if version == 1 else MAGIC
    while pos + _PREFIX.size <= size:
        magic, length, crc = _PREFIX.unpack_from(data, pos)
        end = pos + _PREFIX.size + length
        if magic != expected or length == 0 or length > MAX_RECORD_BYTES:
            reason = "bad record framing"
        elif end > size:
            # Incomplete: a tail still being written, unless a whole record follows the cut.
            nxt = _find_magic(data, pos + 1, expected, complete_only=True)
            if nxt >= size:
                return
            yield (nxt, Corrupt(pos, "truncated record"))
            pos = nxt
            continue
        elif zlib.crc32(view[pos + _PREFIX.size:end]) != crc:
            if end == size:
                return  # the tail may still be in the middle of its write: wait for it
            reason = "checksum mismatch"
        else:
            kind = data[pos + _PREFIX.size]
            if kinds is None or kind in kinds:
                try:
                    record: Record = _decode(kind, view[pos + _PREFIX.size + 1:end], metrics, version)
                except (ValueError, KeyError, TypeError, struct.error) as exc:
                    record = Corrupt(pos, f"undecodable record: {exc}")
                yield (end, record)
            pos = end
            continue
        nxt = _find_magic(data, pos + 1, expected, complete_only=False)
        yield (nxt, Corrupt(pos, reason))
        pos = nxt


def _find_magic(data: bytes, start: int, magic: bytes, complete_only: bool) -> int:
    """Offset of the next plausible record start at or after start, or len(data).

    Plausible: the magic, a sane length, and a matching checksum, or (unless
    `complete_only`) a record that runs past the end and so cannot be checked yet.
    """
    size = len(data)
    while True:
        i = data.find(magic, start)
        if i < 0 or i + _PREFIX.size > size:
            return size
        _, length, crc = _PREFIX.unpack_from(data, i)
        end = i + _PREFIX.size + length
        if 0 < length <= MAX_RECORD_BYTES:
            if end > size and not complete_only:
                return i
            if end <= size and zlib.crc32(memoryview(data)[i + _PREFIX.size:end]) == crc:
                return i
        start = i + 1


def read_log(path: str | os.PathLike[str]) -> list[Record]:
    """Every complete record of a log, in order (torn tail skipped)."""
    return [record for _, record in LogReader(Path(path)).read()]


def append_records(f: BinaryIO, chunks: list[bytes]) -> None:
    """Write encoded records to an open log in one call."""
    f.write(b"".join(chunks))
