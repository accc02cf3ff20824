"""Round trip, torn tail and corruption handling of the run log format."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from gradwatch.agent import framing, runlog
from gradwatch.agent.runlog import Close, Corrupt, Event, Frame, Header, LogReader, MetricDef
from gradwatch.agent.writer import LogWriter
from tests.fixtures.runlogs import v1_log

METRICS = [MetricDef(0, "grad_norm_total", "run"), MetricDef(1, "grad_norm", "param", (0, 1, 2))]


def _header() -> Header:
    return Header({"run_id": "abc", "rank": 0, "name": "t"}, METRICS)


def _frame(first: int, n: int) -> bytes:
    steps = np.arange(first, first + n)
    return runlog.encode_frame([
        (0, steps, np.arange(n, dtype=np.float32).reshape(n, 1)),
        (1, steps, np.full((n, 3), 0.5, dtype=np.float32)),
    ])


def _write(path, chunks) -> None:
    with open(path, "ab") as f:
        f.write(b"".join(chunks))


def test_round_trip_keeps_every_record(tmp_path):
    path = tmp_path / "r.gwlog"
    extra = MetricDef(2, "loss", "run")
    _write(path, [runlog.encode_header(_header()), _frame(0, 4), runlog.encode_metric(extra),
                  runlog.encode_event(Event("nonfinite", 3, 1.0, {"params": ["w"]})),
                  runlog.encode_frame([(2, np.array([4]), np.array([[2.5]], dtype=np.float32))]),
                  runlog.encode_close(Close(2.0, 4, {"dropped": 0}))])
    records = runlog.read_log(path)
    assert [type(r) for r in records] == [Header, Frame, MetricDef, Event, Frame, Close]
    header, frame = records[0], records[1]
    assert header.run_id == "abc" and header.metrics == METRICS
    np.testing.assert_array_equal(frame.blocks[0].steps, [0, 1, 2, 3])
    np.testing.assert_array_equal(frame.blocks[0].values[:, 0], [0, 1, 2, 3])
    assert frame.blocks[1].values.shape == (4, 3)
    assert records[4].blocks[0].metric.name == "loss"
    assert records[3].data == {"params": ["w"]}


def test_torn_tail_is_left_unread_until_complete(tmp_path):
    path = tmp_path / "r.gwlog"
    whole = _frame(0, 2)
    _write(path, [runlog.encode_header(_header()), whole[:-7]])
    reader = LogReader(path)
    assert [type(r) for _, r in reader.read()] == [Header]
    assert reader.torn_tail
    _write(path, [whole[-7:]])
    records = reader.read()
    assert [type(r) for _, r in records] == [Frame] and not reader.torn_tail
    assert records[-1][0] == path.stat().st_size


def test_resume_from_offset_rereads_definitions(tmp_path):
    path = tmp_path / "r.gwlog"
    _write(path, [runlog.encode_header(_header()), _frame(0, 2)])
    offset = path.stat().st_size
    _write(path, [_frame(2, 2)])
    reader = LogReader(path, offset=offset)
    (end, frame), = reader.read()
    assert reader.header is not None and reader.header.run_id == "abc"
    np.testing.assert_array_equal(frame.blocks[0].steps, [2, 3])


@pytest.mark.parametrize("damage", ["flip_payload", "cut_middle", "garbage"])
def test_corrupt_record_is_reported_and_skipped(tmp_path, damage):
    path = tmp_path / "r.gwlog"
    head, bad, good = runlog.encode_header(_header()), bytearray(_frame(0, 3)), _frame(3, 3)
    if damage == "flip_payload":
        bad[-5] ^= 0xFF
    elif damage == "cut_middle":
        bad = bad[: len(bad) // 2]
    else:
        bad = bytearray(b"\x00garbage-bytes\x00" * 4)
    _write(path, [head, bytes(bad), good])
    records = runlog.read_log(path)
    assert [type(r) for r in records] == [Header, Corrupt, Frame]
    assert records[1].offset == len(head)
    np.testing.assert_array_equal(records[2].blocks[0].steps, [3, 4, 5])


def test_writer_appends_in_background_and_drops_when_full(tmp_path):
    path = tmp_path / "w.gwlog"
    writer = LogWriter(path, runlog.encode_header(_header()), queue_size=2)
    import threading
    gate = threading.Event()
    assert writer.submit(lambda: (gate.wait(10), [_frame(0, 1)])[1])
    accepted = sum(writer.submit(lambda: [_frame(1, 1)]) for _ in range(10))
    gate.set()
    writer.close(final=lambda: [runlog.encode_close(Close(1.0, 1, {}))])
    records = runlog.read_log(path)
    assert writer.dropped == 10 - accepted and accepted <= 2
    assert isinstance(records[-1], Close)
    assert sum(isinstance(r, Frame) for r in records) == 1 + accepted


def test_writer_failure_is_counted_not_raised(tmp_path):
    path = tmp_path / "w.gwlog"
    writer = LogWriter(path, runlog.encode_header(_header()))

    def failing_job() -> list[bytes]:
        raise RuntimeError("boom")

    writer.submit(failing_job)
    writer.submit(lambda: [_frame(0, 1)])
    writer.close()
    assert writer.errors["job:RuntimeError"] == 1
    assert [type(r) for r in runlog.read_log(path)] == [Header, Frame]


# ---------------------------------------------------------------- v2 robustness

LOSS = MetricDef(2, "loss", "run")
KINDS = {runlog.KIND_HEADER: "header", runlog.KIND_METRIC: "definition"}
AT = {"magic": 0, "length": 4, "prefix checksum": 12, "kind": framing.PREFIX.size, "payload": framing.PREFIX.size + 9}


def _log() -> bytes:
    """Header, a frame, the `loss` definition, two frames with a loss block, a close."""
    loss = np.array([[0.5], [np.nan]], dtype=np.float32)
    with_loss = runlog.encode_frame([(0, np.array([2, 3]), np.ones((2, 1), np.float32)), (2, np.array([2, 3]), loss)])
    return b"".join([runlog.encode_header(_header()), _frame(0, 2), runlog.encode_metric(LOSS), with_loss,
                     _frame(4, 2), runlog.encode_close(Close(2.0, 5, {}))])


def _copies(data: bytes, kind: int) -> list[tuple[int, int]]:
    return [(p.start, p.end) for p in framing.scan(data, 2) if p.body is not None and p.body[0] == kind]


def _flip(data: bytes, *offsets: int) -> bytes:
    buf = bytearray(data)
    for off in offsets:
        buf[off] ^= 0x10
    return bytes(buf)


def _decoded(records) -> dict:
    """Every decoded (metric, step) -> bit pattern of its value, over the frames among `records`."""
    return {(b.metric.name, int(s)): int(v) for r in records if isinstance(r, Frame)
            for b in r.blocks for s, v in zip(b.steps, b.values[:, 0].view(np.uint32))}


def _read(tmp_path, data: bytes) -> list:
    path = tmp_path / "r.gwlog"
    path.write_bytes(data)
    return runlog.read_log(path)


@pytest.mark.parametrize("where", list(AT))
@pytest.mark.parametrize("copy", range(runlog.COPIES))
@pytest.mark.parametrize("kind", list(KINDS), ids=list(KINDS.values()))
def test_one_damaged_copy_of_the_header_or_a_definition_loses_nothing(tmp_path, kind, copy, where):
    data = _log()
    start, _ = _copies(data, kind)[copy]
    records = _read(tmp_path, _flip(data, start + AT[where]))
    assert [type(r) for r in records if not isinstance(r, Corrupt)] == [Header, Frame, MetricDef, Frame, Frame, Close]
    assert [r.offset for r in records if isinstance(r, Corrupt)] == [start]
    assert next(r for r in records if isinstance(r, Header)).metrics == METRICS
    assert _decoded(records) == _decoded(_read(tmp_path, data))
    assert ("loss", 3) in _decoded(records)


def test_every_copy_damaged_is_rebuilt_by_majority(tmp_path):
    data = _log()
    (h0, h1), (h2, _), (h3, _) = _copies(data, runlog.KIND_HEADER)
    size = h1 - h0
    path = tmp_path / "r.gwlog"
    path.write_bytes(_flip(data, h0 + 40, h2 + 4, h3 + size - 1))  # a body, a length, a last byte
    records = runlog.read_log(path)
    assert isinstance(records[0], Corrupt) and "rebuilt" in records[0].reason
    assert isinstance(records[1], Header) and records[1].metrics == METRICS
    assert sum(isinstance(r, Frame) for r in records) == 3


def test_the_same_byte_damaged_in_two_copies_is_not_guessed(tmp_path):
    data = _log()
    (h0, h1), (h2, _), (h3, _) = _copies(data, runlog.KIND_HEADER)
    path = tmp_path / "r.gwlog"
    path.write_bytes(_flip(data, h0 + 40, h2 + 40, h3 + 41))
    records = runlog.read_log(path)
    assert not any(isinstance(r, Header) for r in records)


def test_resuming_after_damaged_copies_recovers_the_definitions(tmp_path):
    data = _log()
    header_copy, loss_copy = _copies(data, runlog.KIND_HEADER)[0], _copies(data, runlog.KIND_METRIC)[1]
    path = tmp_path / "r.gwlog"
    path.write_bytes(_flip(data, header_copy[0] + 30, loss_copy[0] + 30))
    offset = _copies(data, runlog.KIND_METRIC)[-1][1]  # just after the definitions
    reader = LogReader(path, offset=offset)
    assert reader.header is not None and reader.header.metrics == METRICS
    assert reader.metrics[2] == LOSS
    frame = next(r for _, r in reader.read() if isinstance(r, Frame))
    assert [b.metric.name for b in frame.blocks] == ["grad_norm_total", "loss"]


def test_a_block_of_an_undefined_metric_is_skipped_alone_and_reported_once(tmp_path):
    path = tmp_path / "r.gwlog"
    steps = np.array([0])
    frames = [runlog.encode_frame([(7, steps + i, np.ones((1, 1), np.float32)),
                                   (0, steps + i, np.full((1, 1), float(i), np.float32))]) for i in range(2)]
    _write(path, [runlog.encode_header(_header()), *frames])
    records = runlog.read_log(path)
    assert [type(r) for r in records] == [Header, Frame, Corrupt, Frame]
    assert records[2].reason == "frame blocks skipped: metric id 7 is not defined"
    assert [(b.metric.name, b.values.tolist()) for r in records if isinstance(r, Frame) for b in r.blocks] == [
        ("grad_norm_total", [[0.0]]), ("grad_norm_total", [[1.0]])]


def test_presence_mask_and_nonfinite_values_round_trip(tmp_path):
    path = tmp_path / "r.gwlog"
    values = np.array([[np.nan, np.inf, -np.inf], [1.0, np.nan, 2.0]], dtype=np.float32)
    present = np.array([[True, True, True], [True, False, True]])
    _write(path, [runlog.encode_header(_header()), runlog.encode_frame([(1, np.array([0, 1]), values, present)])])
    (block,) = runlog.read_log(path)[1].blocks
    np.testing.assert_array_equal(block.present, present)
    assert np.array_equal(block.values[present].view(np.uint32), values[present].view(np.uint32))


def test_a_v1_log_is_read_with_nan_as_not_measured(tmp_path):
    path = tmp_path / "r.gwlog"
    values = np.array([[0.5, np.nan, 1.5], [np.nan, 2.0, 3.0]], dtype=np.float32)
    path.write_bytes(v1_log(_header(), [[(0, np.array([0, 1]), np.array([[1.0], [2.0]])),
                                         (1, np.array([0, 1]), values)]], last_step=1))
    records = runlog.read_log(path)
    assert [type(r) for r in records] == [Header, Frame, Close]
    block = records[1].blocks[1]
    np.testing.assert_array_equal(block.present, ~np.isnan(values))
    np.testing.assert_array_equal(block.values[block.present], values[~np.isnan(values)])


def test_the_first_bytes_of_a_record_are_left_unread_until_whole(tmp_path):
    path = tmp_path / "r.gwlog"
    whole = _frame(0, 2)
    for cut in (2, 9, framing.PREFIX.size + 3):
        path.write_bytes(runlog.encode_header(_header()) + whole[:cut])
        reader = LogReader(path)
        assert [type(r) for _, r in reader.read()] == [Header] and reader.torn_tail
        _write(path, [whole[cut:]])
        assert [type(r) for _, r in reader.read()] == [Frame]


def test_a_record_cut_short_by_a_crash_then_whole_records_is_skipped_alone(tmp_path):
    path = tmp_path / "r.gwlog"
    head, cut = runlog.encode_header(_header()), _frame(0, 3)[:40]
    _write(path, [head, cut, _frame(3, 3), _frame(6, 1)[:30]])
    reader = LogReader(path)
    records = [r for _, r in reader.read()]
    assert [type(r) for r in records] == [Header, Corrupt, Frame] and reader.torn_tail
    assert (records[1].offset, records[1].reason) == (len(head), "truncated record")
    assert reader.offset == len(head) + 40 + len(_frame(3, 3))


def _crafted(size: int) -> bytes:
    """Every kind of bait for a resynchronising reader, in runs: magics back to back,
    magics with lengths that fit, that run past the end or that exceed the maximum (bad
    prefix checksums), forged prefixes whose checksums hold, nested (each claiming the rest
    of the log) or back to back over bodies whose checksums fail."""
    rng = np.random.default_rng(0)

    def forged(length: int) -> bytes:
        head = framing.PREFIX_V1.pack(framing.MAGIC, length, 0)
        return head + struct.pack("<I", zlib.crc32(head)) + b"\0"

    units = [framing.MAGIC, framing.MAGIC + struct.pack("<III", 100, 1, 2),
             framing.MAGIC + struct.pack("<I", size * 2), framing.MAGIC + struct.pack("<I", 0x7FFFFFFF),
             forged(size), forged(1)]
    runs = [units[int(i)] * int(rng.integers(1, 200)) for i in rng.integers(0, len(units), 400)]
    return b"".join(runs)[:size]


def test_resynchronising_over_crafted_bytes_is_linear(tmp_path, monkeypatch):
    """Count the work instead of timing it: bytes checksummed, and offsets examined for a
    record start, stay within a small constant times the log size."""
    checksummed, examined = [0], [0]

    def counting_crc32(data, *rest):
        checksummed[0] += len(data)
        return zlib.crc32(data, *rest)

    def counting_starts(arr, lo, hi):
        examined[0] += hi - lo
        return valid_starts(arr, lo, hi)

    valid_starts = framing.valid_starts
    monkeypatch.setattr(framing, "crc32", counting_crc32)
    monkeypatch.setattr(framing, "valid_starts", counting_starts)
    head, tail = runlog.encode_header(_header()), _frame(0, 3)
    path = tmp_path / "r.gwlog"
    for size in (1 << 16, 1 << 20):
        checksummed[0] = examined[0] = 0
        path.write_bytes(head + _crafted(size) + tail)
        records = runlog.read_log(path)
        assert [type(r) for r in records] == [Header, Corrupt, Frame]
        total = len(head) + size + len(tail)
        assert checksummed[0] <= 3 * total, (size, checksummed[0])
        assert examined[0] <= 2 * total, (size, examined[0])
