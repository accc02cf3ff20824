"""Round trip, torn tail and corruption handling of the run log format."""

from __future__ import annotations

import numpy as np
import pytest

from gradwatch.agent import runlog
from gradwatch.agent.runlog import Close, Corrupt, Event, Frame, Header, LogReader, MetricDef
from gradwatch.agent.writer import LogWriter

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
