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
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import struct
import tempfile
import time
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
    for start, end, reason in framing.scan(data, 2):
        assert reason is None, f"the log is damaged at {start}: {reason}"
        out.append((start, end, data[start + framing.PREFIX.size]))
    return out


def _series_number(series: dict[tuple[str, str, int], int], key: tuple[str, str, int]) -> int:
    return series.setdefault(key, len(series))


def reference(path: Path, workdir: Path) -> Reference:
    """Ingest the intact log and list the values of each of its frames."""
    data = path.read_bytes()
    ref = Reference(path.name, data, np.empty(0, np.int64), np.empty(0, np.uint32), [])
    ref.keys, ref.bits, dups, _ = ingest(ref, data, workdir)
    assert dups == 0
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


def ingest(ref: Reference, data: bytes, workdir: Path) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Ingest `data` as the log into a fresh SQLite store; returns the sorted keys and bit
    patterns of the stored values, how many (series, step) were stored more than once, and
    the number of ingest errors."""
    home = Path(tempfile.mkdtemp(dir=workdir))
    try:
        path = runlog.logs_dir(home) / ref.name
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        with Store.open(home=home) as store:
            ingest_pending(store, home)
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
    k, b = k[order], b[order]
    return k, b, int(k.shape[0] - np.unique(k).shape[0]), errors


def damaged_copies(data: bytes, n_random: int, seed: int) -> list[Damaged]:
    """`n_random` copies with random bit flips, truncations or both (a third each), and
    five targeted hits (magic, length, prefix checksum, kind, payload) on every copy of the
    header and of each metric definition."""
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
        payload = framing.PREFIX.size + 1
        for at in (0, 4, 12, framing.PREFIX.size, int(rng.integers(payload, end - start))):
            out.append(_flipped(f"targeted {what} copy", data, np.array([start + at]), rng, len(data)))
    return out


def _flipped(kind: str, data: bytes, offsets: np.ndarray, rng: np.random.Generator, kept: int) -> Damaged:
    buf = bytearray(data)
    for off in offsets:
        buf[int(off)] ^= 1 << int(rng.integers(0, 8))
    return Damaged(kind, bytes(buf[:kept]), np.unique(offsets.astype(np.int64)), kept)


def score(ref: Reference, copy: Damaged, workdir: Path) -> Tally:
    """Ingest one damaged copy and tally what it gave back."""
    keys, bits, dups, errors = ingest(ref, copy.data, workdir)
    idx = np.minimum(np.searchsorted(ref.keys, keys), ref.keys.shape[0] - 1)
    right = (ref.keys[idx] == keys) & (ref.bits[idx] == bits)
    t = Tally(copies=1, wrong=int((~right).sum()) + dups, ingest_errors=errors)
    good = keys[right]
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


def crafted(n_bytes: int, seed: int) -> bytes:
    """Bytes made to defeat resynchronisation: magics every 15, 7 or 3 bytes followed by
    lengths that fit in the log, lengths past its end and lengths over the maximum, with
    checksums that do not hold."""
    rng = np.random.default_rng(seed)
    units = []
    size = 0
    while size < n_bytes:
        pattern = int(rng.integers(0, 3))
        if pattern == 0:
            unit = framing.MAGIC + struct.pack("<III", int(rng.integers(1, 1 << 16)), int(rng.integers(0, 1 << 32)),
                                               int(rng.integers(0, 1 << 32)))
        elif pattern == 1:
            unit = framing.MAGIC + struct.pack("<I", int(rng.integers(n_bytes, framing.MAX_RECORD_BYTES)))
        else:
            unit = framing.MAGIC * 64
        units.append(unit * 64)
        size += len(unit) * 64
    return b"".join(units)[:n_bytes]


def resync_times(ref: Reference, n_bytes: int, workdir: Path, seed: int, repeats: int = 5) -> dict[str, float]:
    """Median ingest seconds of the log's header and definitions followed by `n_bytes` of
    crafted bytes, of random bytes, and (for scale) of the whole intact log."""
    first_frame = min(start for start, _, _ in ref.frames)
    head = ref.data[:first_frame]
    rng = np.random.default_rng(seed)
    logs = {"crafted": head + crafted(n_bytes, seed), "random": head + rng.bytes(n_bytes), "intact": ref.data}
    out = {}
    for name, data in logs.items():
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            ingest(ref, data, workdir)
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--random", type=int, default=100, help="randomly damaged copies (plus the targeted ones)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mb", type=float, default=4.0, help="size of the crafted and random logs")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="gwrecovery-"))
    try:
        path = write_real_log(workdir / "agent", args.steps, args.seed)
        ref = reference(path, workdir)
        kinds = [k for _, _, k in spans(ref.data)]
        print(f"log: {len(ref.data)} bytes, {len(kinds)} records ({kinds.count(runlog.KIND_FRAME)} frames, "
              f"{kinds.count(runlog.KIND_METRIC)} definition copies, {kinds.count(runlog.KIND_HEADER)} header "
              f"copies), {ref.keys.shape[0]} values")
        copies = damaged_copies(ref.data, args.random, args.seed)
        print("| damage | copies | values of intact frames | recovered | share | wrong values stored "
              "| ingest errors |")
        print("|---|---|---|---|---|---|---|")
        for kind, t in recovery(ref, copies, workdir).items():
            share = t.recovered / t.expected if t.expected else 1.0
            print(f"| {kind} | {t.copies} | {t.expected} | {t.recovered} | {100 * share:.2f}% | {t.wrong} "
                  f"| {t.ingest_errors} |")
        times = resync_times(ref, int(args.mb * 1e6), workdir, args.seed)
        print(f"ingest of the header + {args.mb:g} MB: crafted {times['crafted'] * 1e3:.1f} ms, random "
              f"{times['random'] * 1e3:.1f} ms, ratio {times['crafted'] / times['random']:.2f} "
              f"(the intact {len(ref.data) / 1e6:.2f} MB log: {times['intact'] * 1e3:.1f} ms)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
