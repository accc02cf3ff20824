"""Run log recovery benchmark: what survives damage, whether anything wrong is stored, and
what resynchronising costs on crafted input.

1. Writes a real run log with the agent (`gradwatch.watch` on a tiny MLP, every
   measurement every step, a `loss` scalar) and ingests it into a fresh SQLite store: the
   reference.
2. Damages copies of it (random bit flips, truncations, both, and targeted hits on every
   copy of the header and of each metric definition), ingests each into a fresh store and
   compares every stored (series, step, value) with the reference, NaN compared bit for bit:
   the share of the values of intact frames (frames no damage touched) that were stored,
   and the number of stored values that are not the reference's (the target is 0).
3. Times the ingest of a log whose middle is `--mb` MB crafted against resynchronisation
   (repeated magics with bad prefix checksums, huge or plausible lengths) against one whose
   middle is as many random bytes.

    python -m benchmarks.runlog_recovery [--steps 300] [--random 100] [--seed 0] [--mb 4]
                                         [--write-docs docs/runlog.md]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import struct
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import select

from gradwatch.agent import framing, runlog
from gradwatch.ingest import ingest_pending
from gradwatch.store import Store, codec
from gradwatch.store import schema as s

_STEP_BITS = 40  # a stored value's key: series number << _STEP_BITS | step


@dataclass
class Damaged:
    """A damaged copy of a log: its bytes, the offsets of the bytes changed, and its kind."""

    kind: str
    data: bytes
    changed: np.ndarray  # sorted offsets into the original log
    kept: int  # bytes of the original log left after truncation


@dataclass
class Tally:
    """What the damaged copies of one kind gave back."""

    copies: int = 0
    expected: int = 0  # values of intact frames
    recovered: int = 0  # of those, stored with the reference's value
    wrong: int = 0  # stored values that are not the reference's (or stored twice)
    ingest_errors: int = 0

    def add(self, other: Tally) -> None:
        """Accumulate another tally into this one."""
        self.copies += other.copies
        self.expected += other.expected
        self.recovered += other.recovered
        self.wrong += other.wrong
        self.ingest_errors += other.ingest_errors


@dataclass
class Reference:
    """The intact log and what its ingest stored."""

    name: str
    data: bytes
    keys: np.ndarray  # sorted int64 keys of every stored value
    bits: np.ndarray  # uint32 bit patterns of those values
    frames: list[tuple[int, int, np.ndarray]]  # (start, end, keys of its values) per frame
    series: dict[tuple[str, str, int], int] = field(default_factory=dict)


def write_real_log(home: Path, steps: int, seed: int = 0) -> Path:
    """Train a tiny MLP for `steps` steps under `gradwatch.watch`, every measurement every
    step, logging `loss`; returns the run log's path."""
    import torch
    from torch import nn

    import gradwatch

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    config = {"home": str(home), "project": "recovery",
              "measure": {"flush_every": 10, "param_every": 1, "update_ratio_every": 1, "activation_every": 1}}
    with gradwatch.watch(model, opt, run="recovery", config=config) as watcher:
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            watcher.log(loss=loss)
        path = watcher.path
    return Path(path)


def spans(data: bytes) -> list[tuple[int, int, int]]:
    """(start, end, kind) of every record of an intact v2 log."""
    out = []
    for piece in framing.scan(data, 2):
        assert piece.body is not None and piece.reason is None, f"the log is damaged at {piece.start}"
        out.append((piece.start, piece.end, piece.body[0]))
    return out


def _series_number(series: dict[tuple[str, str, int], int], key: tuple[str, str, int]) -> int:
    return series.setdefault(key, len(series))


def reference(path: Path, workdir: Path) -> Reference:
    """Ingest the intact log and list the values of each of its frames."""
    data = path.read_bytes()
    ref = Reference(path.name, data, np.empty(0, np.int64), np.empty(0, np.uint32), [])
    stored = ingest(ref, data, workdir)
    assert stored.duplicates == 0
    ref.keys, ref.bits = stored.keys, stored.bits
    reader = runlog.LogReader(path)
    ends = {end: start for start, end, _ in spans(data)}
    for end, record in reader.read():
        if isinstance(record, runlog.Frame):
            keys = []
            for block in record.blocks:
                entities = (0,) if block.metric.scope == "run" else block.metric.indices
                for j, entity in enumerate(entities):
                    sid = _series_number(ref.series, (block.metric.name, block.metric.scope, int(entity)))
                    keys.append((sid << _STEP_BITS) | block.steps[block.present[:, j]].astype(np.int64))
            ref.frames.append((ends[end], end, np.concatenate(keys) if keys else np.empty(0, np.int64)))
    in_frames = np.unique(np.concatenate([k for _, _, k in ref.frames]))
    assert np.array_equal(in_frames, ref.keys), "the intact ingest does not store exactly the frames' values"
    return ref


@dataclass
class Stored:
    """What one ingest stored: the sorted keys and bit patterns of its values."""

    keys: np.ndarray
    bits: np.ndarray
    duplicates: int  # (series, step) stored more than once
    errors: int  # ingest errors recorded
    seconds: float  # taken by the ingest pass alone


def ingest(ref: Reference, data: bytes, workdir: Path) -> Stored:
    """Ingest `data` as the log into a fresh SQLite store, and read back what it stored."""
    home = Path(tempfile.mkdtemp(dir=workdir))
    try:
        path = runlog.logs_dir(home) / ref.name
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        with Store.open(home=home) as store:
            t = time.perf_counter()
            ingest_pending(store, home)
            seconds = time.perf_counter() - t
            with store.engine.connect() as conn:
                names = {r.id: (r.metric, r.scope, int(r.entity)) for r in conn.execute(
                    select(s.series.c.id, s.series.c.metric, s.series.c.scope, s.series.c.entity))}
                chunks = conn.execute(select(s.chunks.c.series_id, s.chunks.c.first_step, s.chunks.c.n,
                                             s.chunks.c.steps, s.chunks.c.vals)).all()
            errors = len(store.ingest_errors())
    finally:
        shutil.rmtree(home, ignore_errors=True)
    keys, bits = [np.empty(0, np.int64)], [np.empty(0, np.uint32)]
    for sid, first, n, steps, vals in chunks:
        number = _series_number(ref.series, names[sid])
        keys.append((number << _STEP_BITS) | codec.decode_steps(steps, first, n).astype(np.int64))
        bits.append(codec.decode_values(vals, n).view(np.uint32))
    k, b = np.concatenate(keys), np.concatenate(bits)
    order = np.argsort(k, kind="stable")
    return Stored(k[order], b[order], int(k.shape[0] - np.unique(k).shape[0]), errors, seconds)


TARGETS = {"magic": 0, "length": 4, "prefix checksum": 12, "kind": framing.PREFIX.size, "payload": -1}  # -1: random


def damaged_copies(data: bytes, n_random: int, seed: int, targets: Sequence[str] = tuple(TARGETS)) -> list[Damaged]:
    """`n_random` copies with random bit flips (1 to 16), truncations or both (a third each),
    and one copy per target (a byte of the prefix, the kind, a random payload byte) hit in
    every copy of the header and of each metric definition."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_random):
        kind = ("flips", "truncation", "flips+truncation")[i % 3]
        flips = rng.integers(0, len(data), rng.integers(1, 17)) if kind != "truncation" else np.empty(0, np.int64)
        kept = int(rng.integers(0, len(data))) if kind != "flips" else len(data)
        out.append(_flipped(kind, data, flips, rng, kept))
    for start, end, kind_byte in spans(data):
        if kind_byte not in (runlog.KIND_HEADER, runlog.KIND_METRIC):
            continue
        what = "header" if kind_byte == runlog.KIND_HEADER else "definition"
        for target in targets:
            at = TARGETS[target] if TARGETS[target] >= 0 else int(rng.integers(framing.PREFIX.size + 1, end - start))
            out.append(_flipped(f"targeted {what} copy", data, np.array([start + at]), rng, len(data)))
    return out


def _flipped(kind: str, data: bytes, offsets: np.ndarray, rng: np.random.Generator, kept: int) -> Damaged:
    buf = bytearray(data)
    for off in offsets:
        buf[int(off)] ^= 1 << int(rng.integers(0, 8))
    return Damaged(kind, bytes(buf[:kept]), np.unique(offsets.astype(np.int64)), kept)


def score(ref: Reference, copy: Damaged, workdir: Path) -> Tally:
    """Ingest one damaged copy and tally what it gave back."""
    got = ingest(ref, copy.data, workdir)
    idx = np.minimum(np.searchsorted(ref.keys, got.keys), ref.keys.shape[0] - 1)
    right = (ref.keys[idx] == got.keys) & (ref.bits[idx] == got.bits)
    t = Tally(copies=1, wrong=int((~right).sum()) + got.duplicates, ingest_errors=got.errors)
    good = got.keys[right]
    for start, end, frame_keys in ref.frames:
        touched = np.searchsorted(copy.changed, start) < np.searchsorted(copy.changed, end)
        if end <= copy.kept and not touched:
            t.expected += frame_keys.shape[0]
            t.recovered += int(np.isin(frame_keys, good).sum())
    return t


def recovery(ref: Reference, copies: list[Damaged], workdir: Path) -> dict[str, Tally]:
    """Score every damaged copy; tallies by kind of damage, and of them all under "all"."""
    tallies: dict[str, Tally] = {"all": Tally()}
    for copy in copies:
        t = score(ref, copy, workdir)
        tallies.setdefault(copy.kind, Tally()).add(t)
        tallies["all"].add(t)
    return tallies


def crafted(n_bytes: int, seed: int, patterns: Sequence[int] = (0, 1, 2, 3)) -> bytes:
    """Bytes made to defeat resynchronisation, in runs of 64 alike, of these patterns:
    0: magics followed by lengths that fit in the log, 1: by lengths past its end (a magic
    every 7 bytes: the densest stream of candidates a cheap length cut lets through), 2: by
    lengths over the maximum (magics back to back), all with prefix checksums that do not
    hold; 3: forged prefixes whose checksums hold, each claiming 1 MB (so each holds the
    next) over a body whose checksum does not."""
    rng = np.random.default_rng(seed)
    forged_head = framing.PREFIX_V1.pack(framing.MAGIC, 1 << 20, 0)
    forged = forged_head + struct.pack("<I", zlib.crc32(forged_head)) + b"\x00"
    runs, size = [], 0
    while size < n_bytes:
        pattern = int(rng.choice(patterns))
        if pattern == 0:
            unit = framing.MAGIC + struct.pack("<III", int(rng.integers(1, 1 << 16)), int(rng.integers(0, 1 << 32)),
                                               int(rng.integers(0, 1 << 32)))
        elif pattern == 1:
            unit = framing.MAGIC + struct.pack("<I", int(rng.integers(n_bytes, framing.MAX_RECORD_BYTES)))
        elif pattern == 2:
            unit = framing.MAGIC
        else:
            unit = forged
        runs.append(unit * 64)
        size += len(unit) * 64
    return b"".join(runs)[:n_bytes]


def resync_times(ref: Reference, n_bytes: int, workdir: Path, seed: int, repeats: int = 9) -> dict[str, float]:
    """Median seconds (runs interleaved) to ingest the log's header and definitions followed
    by `n_bytes` crafted bytes (every pattern, or the densest alone), by `n_bytes` random
    bytes, and the intact log (for scale); and to scan the crafted and the random logs alone
    (`framing.scan`, no store)."""
    first_frame = min(start for start, _, _ in ref.frames)
    head = ref.data[:first_frame]
    rng = np.random.default_rng(seed)
    logs = {"crafted": head + crafted(n_bytes, seed), "densest": head + crafted(n_bytes, seed, patterns=(1,)),
            "random": head + rng.bytes(n_bytes), "intact": ref.data}
    times: dict[str, list[float]] = {name: [] for name in [*logs, "scan crafted", "scan random"]}
    for _ in range(repeats):
        for name, data in logs.items():
            times[name].append(ingest(ref, data, workdir).seconds)
        for name in ("crafted", "random"):
            t = time.perf_counter()
            for _ in framing.scan(logs[name], 2):
                pass
            times[f"scan {name}"].append(time.perf_counter() - t)
    return {name: statistics.median(t) for name, t in times.items()}


def report(args: argparse.Namespace, workdir: Path) -> list[str]:
    """The benchmark's results, as lines of Markdown."""
    ref = reference(write_real_log(workdir / "agent", args.steps, args.seed), workdir)
    kinds = [k for _, _, k in spans(ref.data)]
    lines = [f"Log: {len(ref.data):,} bytes, {len(kinds)} records ({kinds.count(runlog.KIND_FRAME)} frames, "
             f"{kinds.count(runlog.KIND_HEADER)} header copies, {kinds.count(runlog.KIND_METRIC)} definition "
             f"copies), {ref.keys.shape[0]:,} values.", "",
             "| damage | copies | values of intact frames | recovered | share | wrong values stored | ingest errors |",
             "|---|---|---|---|---|---|---|"]
    for kind, t in recovery(ref, damaged_copies(ref.data, args.random, args.seed), workdir).items():
        share = t.recovered / t.expected if t.expected else 1.0
        lines.append(f"| {kind} | {t.copies} | {t.expected:,} | {t.recovered:,} | {100 * share:.2f}% | {t.wrong} "
                     f"| {t.ingest_errors} |")
    ms = {k: v * 1e3 for k, v in resync_times(ref, int(args.mb * 1e6), workdir, args.seed).items()}
    lines += ["", f"Ingest of the header and definitions followed by {args.mb:g} MB (median of 9, into a fresh "
              f"SQLite store): crafted {ms['crafted']:.1f} ms, random {ms['random']:.1f} ms, ratio "
              f"{ms['crafted'] / ms['random']:.2f}; crafted with the densest pattern alone {ms['densest']:.1f} ms, "
              f"ratio {ms['densest'] / ms['random']:.2f}. Scanning alone: crafted {ms['scan crafted']:.1f} ms, "
              f"random {ms['scan random']:.1f} ms. For scale, the intact {len(ref.data) / 1e6:.2f} MB log ingests "
              f"in {ms['intact']:.1f} ms."]
    return lines


def write_docs(path: Path, lines: list[str]) -> None:
    """Replace the text between the runlog-recovery markers of `path` with `lines`."""
    text = path.read_text()
    begin, end = "<!-- runlog-recovery:begin -->", "<!-- runlog-recovery:end -->"
    head, rest = text.split(begin, 1)
    path.write_text(head + begin + "\n" + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--random", type=int, default=100, help="randomly damaged copies (plus the targeted ones)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mb", type=float, default=4.0, help="size of the crafted and random logs")
    ap.add_argument("--write-docs", type=Path, default=None, help="put the results into this file (docs/runlog.md)")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="gwrecovery-"))
    try:
        lines = report(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(lines))
    if args.write_docs is not None:
        write_docs(args.write_docs, lines)


if __name__ == "__main__":
    main()
