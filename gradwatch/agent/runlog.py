"""The run log: the only interface between the agent and the service (DESIGN.md).

One append-only file per run and rank, a sequence of records, each framed by
`gradwatch.agent.framing`: a self-checksummed prefix (magic, length, crc32 of the body) and a
body = kind (1 byte) | payload. A torn tail (a record cut short by a crash, or still being
written) is left unread until it is complete; a damaged record in the middle is reported
with its offset and skipped, and loses nothing else. Payloads are JSON for the rare records
(header, metric definitions, events, close) and packed little-endian arrays for frames, which
carry the measurements. The header and every metric definition are written twice, back to
back, so a damaged copy loses nothing; readers keep the first intact copy and drop the other.

A frame is a list of blocks; a block is one metric's rows: ``steps`` (int64, n),
``values`` (float32, n x width), where width is the metric's number of columns (1 for a
run-level value, one per param group, per param or per applicable layer), and ``present``
(bool, n x width), False where a column was not measured at that step. NaN, +Inf and -Inf
are values like any other (format v2; in v1 logs NaN meant "not measured"). Every block
carries its length, so a block that cannot be decoded (its metric undefined) is skipped
alone. This module imports only the standard library and numpy. docs/runlog.md has the
byte layout.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

from gradwatch.agent import framing

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MAGIC = framing.MAGIC
MAGIC_V1 = framing.MAGIC_V1
LOG_SUFFIX = ".gwlog"
MAX_RECORD_BYTES = framing.MAX_RECORD_BYTES
COPIES = framing.COPIES  # the header and every metric definition are written this many times, back to back

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
    """A damaged stretch of the log (failed framing or checksum), or a record that could not
    be decoded in whole or in part; `offset` is where it starts."""

    offset: int
    reason: str


Record = Header | MetricDef | Frame | Event | Close | Corrupt


# ---------------------------------------------------------------- encoding


def _record(kind: int, payload: bytes) -> bytes:
    return framing.frame(bytes((kind,)) + payload)


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=True, default=str).encode()


def encode_header(header: Header) -> bytes:
    """The header record, `COPIES` times: a reader keeps the first intact copy."""
    payload = {"format_version": FORMAT_VERSION, "info": header.info,
               "metrics": [m.to_json() for m in header.metrics]}
    return _record(KIND_HEADER, _json_bytes(payload)) * COPIES


def encode_metric(metric: MetricDef) -> bytes:
    """A metric definition record, `COPIES` times: a reader keeps the first intact copy."""
    return _record(KIND_METRIC, _json_bytes(metric.to_json())) * COPIES


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
    return _record(KIND_FRAME, b"".join(parts))


def encode_event(event: Event) -> bytes:
    return _record(KIND_EVENT, _json_bytes(
        {"kind": event.kind, "step": event.step, "time": event.time, "data": event.data}))


def encode_close(close: Close) -> bytes:
    return _record(KIND_CLOSE, _json_bytes(
        {"time": close.time, "step": close.step, "stats": close.stats}))


# ---------------------------------------------------------------- decoding


def _decode_frame_v1(payload: bytes | memoryview, metrics: dict[int, MetricDef]) -> Frame:
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


def _decode_frame(payload: bytes | memoryview, metrics: dict[int, MetricDef]) -> tuple[Frame, dict[int, str]]:
    """A v2 frame, and {metric id: why} for the blocks skipped: every block carries its
    length, so one that cannot be decoded (its metric undefined, or a size that does not
    match its definition) does not hide the others."""
    (count,) = struct.unpack_from("<I", payload, 0)
    pos = 4
    blocks = []
    skipped: dict[int, str] = {}
    for _ in range(count):
        block_len, metric_id, rows, flags = _BLOCK_HEAD.unpack_from(payload, pos)
        start, end = pos + 4, pos + 4 + block_len
        pos += _BLOCK_HEAD.size
        if end > len(payload) or block_len < 12:
            raise ValueError(f"block of metric {metric_id} runs past the frame")
        metric = metrics.get(metric_id)
        if metric is None:
            skipped[metric_id] = "is not defined"
            pos = end
            continue
        width = metric.width
        mask_len = (rows * width + 7) // 8 if flags & _HAS_MASK else 0
        if end - start != 12 + 8 * rows + mask_len + 4 * rows * width:
            skipped[metric_id] = f"has a block of {block_len} bytes, which does not fit {rows} rows of {width}"
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
    return Frame(blocks), skipped


def _header_of(obj: Any) -> Header:
    if obj.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"unsupported run log format version {obj.get('format_version')!r}")
    return Header(obj["info"], [MetricDef.from_json(m) for m in obj["metrics"]])


_DECODE_ERRORS = (ValueError, KeyError, TypeError, AttributeError, struct.error)


class LogReader:
    """Reads a run log incrementally from a byte offset.

    `read()` returns every complete record after `offset` as ``(end_offset, record)``
    pairs and advances `offset` past them; a torn tail stays unread (and `torn_tail` is
    set) until it is completed. A damaged stretch yields one `Corrupt` and reading goes on
    at the next intact record. Copies of the header and of metric definitions are read
    once: `header` and `metrics` come from the first intact copy, the others are dropped
    (a copy that differs yields a `Corrupt`). A frame block of an undefined metric is
    skipped and reported once per metric id. Resuming at a nonzero offset first re-reads
    the header and definitions before it, whichever copies of them are intact.
    """

    def __init__(self, path: str | os.PathLike[str], offset: int = 0) -> None:
        self.path = Path(path)
        self.offset = offset
        self.header: Header | None = None
        self.metrics: dict[int, MetricDef] = {}
        self.torn_tail = False
        self.version = FORMAT_VERSION  # of the log, from its first magic
        self._header_payload: bytes | None = None
        self._reported: set[int] = set()  # metric ids whose skipped blocks were reported
        if offset > 0:
            self._load_definitions(offset)

    def _load_definitions(self, until: int) -> None:
        with open(self.path, "rb") as f:
            data = f.read(until)
        self.version = framing.version_of(data)
        for _ in self._records(data, 0, kinds={KIND_HEADER, KIND_METRIC}):
            pass

    def read(self, max_bytes: int | None = None) -> list[tuple[int, Record]]:
        """Every complete record from `offset` on (at most `max_bytes` read), as (end offset, record)."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read() if max_bytes is None else f.read(max_bytes)
        if self.offset == 0:
            self.version = framing.version_of(data)
        out: list[tuple[int, Record]] = []
        consumed = 0
        for end, record in self._records(data, self.offset):
            consumed = end
            if record is not None:
                out.append((self.offset + end, record))
        self.torn_tail = consumed < len(data)
        self.offset += consumed
        return out

    def _records(self, data: bytes, base: int, kinds: set[int] | None = None) -> Iterator[tuple[int, Record | None]]:
        """(end in data, record) for each piece of data read from offset `base`; None for a
        piece that holds nothing new (a copy, or a kind not in `kinds`)."""
        for piece in framing.scan(data, self.version):
            if piece.reason is not None:
                yield piece.end, Corrupt(base + piece.start, piece.reason)
            if piece.body is None:
                continue
            kind = piece.body[0]
            if kinds is not None and kind not in kinds:
                yield piece.end, None
                continue
            try:
                records = self._decode(kind, piece.body[1:], base + piece.start)
            except _DECODE_ERRORS as exc:
                records = [Corrupt(base + piece.start, f"undecodable record: {exc}")]
            for record in records or [None]:
                yield piece.end, record

    def _decode(self, kind: int, payload: bytes | memoryview, offset: int) -> list[Record]:
        """The records of one intact record body: none for a copy already read; a frame
        with a `Corrupt` after it when some of its blocks were skipped."""
        if kind == KIND_FRAME:
            if self.version == 1:
                return [_decode_frame_v1(payload, self.metrics)]
            frame, skipped = _decode_frame(payload, self.metrics)
            new = {mid: why for mid, why in skipped.items() if mid not in self._reported}
            self._reported.update(new)
            notes = "; ".join(f"metric id {mid} {why}" for mid, why in sorted(new.items()))
            return [frame, Corrupt(offset, f"frame blocks skipped: {notes}")] if new else [frame]
        if kind == KIND_HEADER:
            raw = bytes(payload)
            if self._header_payload is not None:
                return [] if raw == self._header_payload else [Corrupt(offset, "a second header, unlike the first")]
            header = _header_of(json.loads(raw))
            self.header, self._header_payload = header, raw
            for metric in header.metrics:
                self.metrics.setdefault(metric.id, metric)
            return [header]
        obj = json.loads(bytes(payload))
        if kind == KIND_METRIC:
            metric = MetricDef.from_json(obj)
            known = self.metrics.setdefault(metric.id, metric)
            if known is metric:
                return [metric]
            return [] if known == metric else [Corrupt(offset, f"metric id {metric.id} defined again, differently")]
        if kind == KIND_EVENT:
            return [Event(obj["kind"], int(obj["step"]), float(obj["time"]), obj.get("data", {}))]
        if kind == KIND_CLOSE:
            return [Close(float(obj["time"]), int(obj["step"]), obj.get("stats", {}))]
        raise ValueError(f"unknown record kind {kind}")


def read_log(path: str | os.PathLike[str]) -> list[Record]:
    """Every complete record of a log, in order (torn tail skipped)."""
    return [record for _, record in LogReader(Path(path)).read()]


def append_records(f: BinaryIO, chunks: list[bytes]) -> None:
    """Write encoded records to an open log in one call."""
    f.write(b"".join(chunks))
