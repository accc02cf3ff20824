"""Store benchmark: ingest speed, disk footprint and query latency on a big synthetic run.

A model of `--params` params (in layers of 2) logged every step for `--steps` steps:
grad_norm, param_norm and update_ratio per param, act_grad_norm/act_mean/act_std per layer
every 10 steps, and 7 run-level series, all every step, with noisy float32 values (no
artificially compressible data). The log is written with the run log encoder, ingested
into a fresh SQLite store, then queried. Prints one JSON object.

    python benchmarks/store_bench.py [--steps 100000] [--params 300] [--dir /tmp/gwbench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from gradwatch.agent import runlog
from gradwatch.agent.runlog import Close, Header, MetricDef
from gradwatch.ingest import ingest_pending
from gradwatch.store import Store

RUN = ["grad_norm_total", "grad_norm_total_clipped", "clip_coef", "skipped", "nonfinite_params", "loss"]


def write_log(home: Path, steps: int, n_params: int, flush_every: int = 20) -> int:
    """Write the run log; returns the number of measurement values it holds."""
    n_layers = n_params // 2
    params = [{"index": i, "name": f"layer{i // 2}.{'weight' if i % 2 == 0 else 'bias'}", "layer": i // 2,
               "shape": [64], "numel": 64, "requires_grad": True, "group": 0} for i in range(n_params)]
    layers = [{"index": j, "name": f"layer{j}", "type": "Linear", "kind": "param", "family": None,
               "params": [2 * j, 2 * j + 1]} for j in range(n_layers)]
    defs = [MetricDef(i, m, "run") for i, m in enumerate(RUN)]
    defs.append(MetricDef(len(defs), "lr", "group", (0,)))
    for m in ("grad_norm", "param_norm", "update_ratio"):
        defs.append(MetricDef(len(defs), m, "param", tuple(range(n_params))))
    for m in ("act_grad_norm", "act_mean", "act_std"):
        defs.append(MetricDef(len(defs), m, "layer", tuple(range(n_layers))))
    info = {"run_id": "bench", "name": "bench", "project": "bench", "host": "bench-host", "pid": 1, "rank": 0,
            "world_size": 1, "started_at": time.time(), "params": params, "layers": layers,
            "groups": [{"index": 0, "lr": 0.1, "params": list(range(n_params))}], "config": {}, "model": {}}
    rng = np.random.default_rng(0)
    path = runlog.log_path("bench", 0, home)
    path.parent.mkdir(parents=True, exist_ok=True)
    total = 0
    with open(path, "wb") as f:
        f.write(runlog.encode_header(Header(info, defs)))
        for first in range(0, steps, flush_every):
            s = np.arange(first, min(first + flush_every, steps), dtype=np.int64)
            decay = (1.0 / np.sqrt(1.0 + s))[:, None]
            blocks = []
            for d in defs:
                width = d.width
                if d.scope == "layer":
                    keep = s % 10 == 0
                    if not keep.any():
                        continue
                    ss, dd = s[keep], decay[keep]
                else:
                    ss, dd = s, decay
                vals = (dd * rng.lognormal(0.0, 0.3, (ss.shape[0], width))).astype(np.float32)
                blocks.append((d.id, ss, vals))
                total += vals.size
            f.write(runlog.encode_frame(blocks))
        f.write(runlog.encode_close(Close(time.time(), steps, {})))
    return total


def _timed(fn, repeat: int = 5) -> float:
    """Median wall time of `fn` in milliseconds."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--params", type=int, default=300)
    ap.add_argument("--dir", type=Path, default=None, help="working directory (default: a temp dir, removed)")
    args = ap.parse_args()
    home = args.dir or Path(tempfile.mkdtemp(prefix="gwbench-"))
    try:
        values = write_log(home, args.steps, args.params)
        log_bytes = runlog.log_path("bench", 0, home).stat().st_size
        store = Store.open(home=home)
        t = time.perf_counter()
        report = ingest_pending(store, home)
        ingest_s = time.perf_counter() - t
        assert report.values == values, (report.values, values)
        db = home / "gradwatch.db"
        with sqlite3.connect(db) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db_bytes = db.stat().st_size
        store.close()
        store = Store.open(home=home)  # queries on a fresh connection
        cold_history = _timed(lambda: store.param_history("bench", "layer7.weight", "grad_norm"), repeat=1)
        history = _timed(lambda: store.param_history("bench", "layer7.weight", "grad_norm"))
        steps, _ = store.param_history("bench", "layer7.weight", "grad_norm")
        assert steps.shape[0] == args.steps
        result = {
            "steps": args.steps, "params": args.params, "values": values,
            "log_mb": round(log_bytes / 1e6, 1),
            "ingest_s": round(ingest_s, 2), "ingest_values_per_s": round(values / ingest_s),
            "raw_float32_mb": round(values * 4 / 1e6, 1), "db_mb": round(db_bytes / 1e6, 1),
            "db_over_raw": round(db_bytes / (values * 4), 3),
            "param_history_ms_cold": round(cold_history, 1), "param_history_ms": round(history, 1),
            "layer_history_grad_norm_ms": round(_timed(
                lambda: store.layer_history("bench", "layer7", "grad_norm")), 1),
            "run_summary_ms": round(_timed(lambda: store.run_summary("bench")), 1),
            "layers_at_step_ms": round(_timed(lambda: store.layers_at_step("bench")), 1),
            "latest_ms": round(_timed(lambda: store.latest(["bench"])), 1),
        }
        store.close()
        print(json.dumps(result, indent=2))
    finally:
        if args.dir is None:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
