"""Property-based tests (hypothesis) of what reads untrusted input: the run log reader on
arbitrary bytes and on damaged logs never raises and never yields a record whose checksum did
not hold (every record it yields is one that was written); the agent's config loader on
arbitrary dicts and TOML answers with a valid config or a `ConfigError`, nothing else."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gradwatch.agent.config import AgentConfig, ConfigError, load_config
from gradwatch.agent import runlog
from gradwatch.agent.runlog import Close, Corrupt, Event, Frame, Header, LogReader, MetricDef
from tests.fixtures.runlogs import SyntheticRun, v1_log
from tests.reliability.checks import REPEAT

pytestmark = pytest.mark.reliability

# No example database written into the repository; no timing limit (a machine may be loaded); the
# same examples on every CI run (derandomized), new ones when repeated for the figures.
PROPERTY = settings(max_examples=150 * REPEAT, deadline=None, database=None, derandomize=REPEAT == 1,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------- the run log reader

def _v2_log() -> bytes:
    """A header, frames with masks and NaN/Inf, a metric defined mid-run, events and a close."""
    run = SyntheticRun(run_id="prop")
    acc = MetricDef(len(run.metrics), "acc", "run")
    odd = runlog.encode_frame([(acc.id, np.array([5, 6]), np.array([[np.nan], [np.inf]], np.float32)),
                               (0, np.array([5, 6]), np.array([[1.0], [-np.inf]], np.float32),
                                np.array([[True], [False]]))])
    return b"".join([runlog.encode_header(run.header()), run.frame(0, 5), runlog.encode_metric(acc), odd,
                     run.frame(7, 3), runlog.encode_event(Event("nonfinite", 6, 1.0, {"params": ["net.0.weight"]})),
                     runlog.encode_close(Close(2.0, 9, {"steps": 10}))])


def _v1_log() -> bytes:
    run = SyntheticRun(run_id="prop1")
    steps = np.arange(4)
    blocks = [(m.id, steps, np.stack([run.value(m.name, steps, e) for e in ((0,) if m.scope == "run" else m.indices)],
                                     axis=1)) for m in run.metrics.values()]
    return v1_log(run.header(), [blocks], 3)


def _keys(record: Any) -> list[Any]:
    """What identifies a record's content: one key per frame block, so a frame that lost blocks
    to a damaged definition still matches the blocks it kept."""
    if isinstance(record, Frame):
        return [("block", b.metric.id, b.metric.name, b.steps.tobytes(), b.values.tobytes(),
                 b.present.tobytes()) for b in record.blocks]
    if isinstance(record, Header):
        return [("header", json.dumps(record.info, sort_keys=True), tuple(record.metrics))]
    if isinstance(record, MetricDef):
        return [("metric", record)]
    if isinstance(record, Event):
        return [("event", record.kind, record.step, record.time, json.dumps(record.data, sort_keys=True))]
    if isinstance(record, Close):
        return [("close", record.time, record.step, json.dumps(record.stats, sort_keys=True))]
    raise AssertionError(f"unexpected record {record!r}")


def _read(data: bytes, offset: int = 0, pieces: list[int] | None = None) -> list[Any]:
    """Every record read from `data` in a file, from `offset`, the file growing at `pieces`
    (cut points) with a read after each growth, as the service tails a log being written."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.gwlog"
        cuts = sorted({c for c in pieces or () if 0 < c < len(data)}) + [len(data)]
        path.write_bytes(data[:cuts[0]])
        reader = LogReader(path, offset=min(offset, cuts[0]))
        out = [r for _, r in reader.read()]
        for cut in cuts[1:]:
            path.write_bytes(data[:cut])
            out += [r for _, r in reader.read()]
        return out


BASES = {"v2": _v2_log(), "v1": _v1_log()}
WRITTEN = {name: {k for r in _read(data) for k in _keys(r)} for name, data in BASES.items()}


def _check(records: list[Any], written: set[Any]) -> None:
    for record in records:
        if not isinstance(record, Corrupt):
            assert set(_keys(record)) <= written, f"a record that was never written: {record!r}"


def test_the_bases_read_back_whole() -> None:
    for name, data in BASES.items():
        records = _read(data)
        assert not any(isinstance(r, Corrupt) for r in records), name
        assert sum(isinstance(r, Frame) for r in records) == (3 if name == "v2" else 1)


@PROPERTY
@given(data=st.binary(max_size=2048), offset=st.integers(0, 2048), pieces=st.lists(st.integers(0, 2048), max_size=4))
def test_the_reader_on_arbitrary_bytes_never_raises_nor_yields_a_record(data: bytes, offset: int,
                                                                        pieces: list[int]) -> None:
    assert all(isinstance(r, Corrupt) for r in _read(data, offset, pieces))


def _damage(base: bytes, ops: list[tuple[str, int, int, bytes]]) -> bytes:
    data = bytearray(base)
    for op, at, n, junk in ops:
        at = at % (len(data) + 1)
        if op == "flip" and data:
            data[at % len(data)] ^= 1 << (n % 8)
        elif op == "cut":
            del data[at:]
        elif op == "delete":
            del data[at:at + n]
        elif op == "insert":
            data[at:at] = junk
        elif op == "duplicate":
            data[at:at] = data[at:at + n * 16]
        elif op == "splice":  # bytes of a record start (magic and a prefix) where they do not belong
            data[at:at] = base[:n % 40]
    return bytes(data)


OPS = st.lists(st.tuples(st.sampled_from(["flip", "cut", "delete", "insert", "duplicate", "splice"]),
                         st.integers(0, 1 << 20), st.integers(0, 400), st.binary(max_size=64)), min_size=1, max_size=8)


@PROPERTY
@given(base=st.sampled_from(sorted(BASES)), ops=OPS, offset=st.integers(0, 1 << 16),
       pieces=st.lists(st.integers(0, 1 << 16), max_size=4))
def test_the_reader_on_damaged_logs_never_raises_and_yields_only_records_that_were_written(
        base: str, ops: list[tuple[str, int, int, bytes]], offset: int, pieces: list[int]) -> None:
    data = _damage(BASES[base], ops)
    records = _read(data, 0, pieces)
    _check(records, WRITTEN[base])
    _check(_read(data, offset % (len(data) + 1)), WRITTEN[base])
    kept = sum(isinstance(r, Frame) for r in records)
    event(f"frames kept: {min(kept, 3)}{'+' if kept >= 3 else ''}")


@PROPERTY
@given(base=st.sampled_from(sorted(BASES)), pieces=st.lists(st.integers(0, 1 << 16), max_size=6))
def test_an_intact_log_read_as_it_grows_gives_what_a_whole_read_gives(base: str, pieces: list[int]) -> None:
    data = BASES[base]
    whole = [k for r in _read(data) for k in _keys(r)]
    grown = [k for r in _read(data, 0, [p % (len(data) + 1) for p in pieces]) for k in _keys(r)]
    assert grown == whole


# ---------------------------------------------------------------- the agent's config

def _fields(model: type) -> list[str]:
    return list(model.model_fields)


SECTIONS = {name: f.annotation for name, f in AgentConfig.model_fields.items()
            if isinstance(f.annotation, type) and hasattr(f.annotation, "model_fields")}
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-10, 10), st.floats(), st.floats(0, 10),
    st.sampled_from([0, 1, -1, 2**63, 10**12, math.inf, -math.inf, math.nan, 1e-300]),
    st.text(max_size=20), st.sampled_from(["none", "norm", "value", "agc", "auto_percentile", "zscore", "warn",
                                           "skip", "raise", "ignore", "", "1.0", "true"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8),
                                                                                         inner, max_size=3),
                      max_leaves=6)


def _section(model: type) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts of the section's own keys (most examples), or of any keys."""
    return (st.dictionaries(st.sampled_from(_fields(model)), SCALARS, max_size=4)
            | st.dictionaries(st.sampled_from(_fields(model)) | st.text(max_size=10), VALUES, max_size=6))


CONFIGS = st.fixed_dictionaries({}, optional={
    **{name: _section(model) | VALUES for name, model in SECTIONS.items()},
    **{name: VALUES for name in _fields(AgentConfig) if name not in SECTIONS and name != "home"},
}) | st.dictionaries(st.text(max_size=10), VALUES, max_size=4)


def _valid(config: Any) -> None:
    assert isinstance(config, AgentConfig)
    again = AgentConfig.model_validate(config.model_dump())  # what was accepted is a config that validates
    assert again == config


@PROPERTY
@given(data=CONFIGS)
def test_load_config_on_arbitrary_dicts_gives_a_valid_config_or_a_config_error(data: dict[str, Any]) -> None:
    try:
        config = load_config(data)
    except ConfigError:
        event("ConfigError")
        return
    event("a valid config")
    _valid(config)


def test_a_config_error_is_one_line_whatever_the_key_holds() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"measure": {"flush\nevery": 1}})
    assert "\n" not in str(info.value)


TOML_VALUES = st.sampled_from(["1", "0", "-1", "1e999", "-1e999", "nan", "inf", "true", "false", '"norm"', '"warn"',
                               '""', "[1, 2]", "{a = 1}", "99999999999999999999", "0.5", "1979-05-27", "'x'"])
TOML_LINES = st.one_of(
    st.sampled_from(["[measure]", "[clip]", "[guards]", "[gradwatch]", "[gradwatch.measure]", "[[clip]]", "="]),
    st.builds(lambda k, v: f"{k} = {v}", st.sampled_from(sorted({f for m in [AgentConfig, *SECTIONS.values()]
                                                                  for f in _fields(m)})) | st.text(max_size=6),
              TOML_VALUES),
    st.text(max_size=30))


@PROPERTY
@given(lines=st.lists(TOML_LINES, max_size=10), raw=st.binary(max_size=64), use_raw=st.booleans())
def test_load_config_on_arbitrary_toml_files_gives_a_valid_config_or_a_config_error(
        lines: list[str], raw: bytes, use_raw: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gradwatch.toml"
        path.write_bytes(raw if use_raw else "\n".join(lines).encode("utf-8", "surrogatepass"))
        try:
            config = load_config(path)
        except ConfigError as exc:
            assert str(path) in str(exc)
            event("ConfigError")
            return
    event("a valid config")
    _valid(config)

