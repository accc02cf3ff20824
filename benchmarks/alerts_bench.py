"""Rules engine benchmark: CPU time of its evaluation passes over 1, 10 and 50 live runs.

Each run is a model of `--params` params (Linear layers of a weight and a bias, a ReLU or a
Tanh after every second one) logged as the agent does by default: run-level metrics and each
param's grad_norm every step, param norms, update ratios and every layer metric every 10 steps,
with noisy float32 values of a healthy run. The service is simulated with its defaults: an
ingest pass every 0.5 s, each followed by `AlertEngine.evaluate()`, the ingester handing the
engine the batches it commits (`--read`: it does not, and every window reads the store); every
run trains `--steps-per-s` steps a second and flushes them once a second (the agent's
max_flush_interval). Each run starts with a full window stored; the ingestion is not timed,
the evaluations' process CPU time is. Prints JSON lines and Markdown tables (docs/alerts.md
records them), with each rule's own cost on one full window.

    python -m benchmarks.alerts_bench [--runs 1,10,50] [--params 600] [--seconds 60] [--steps-per-s 2] [--read]
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import IO

import numpy as np

from gradwatch.agent import runlog
from gradwatch.agent.runlog import Header, MetricDef
from gradwatch.alerts import AlertEngine, AlertsConfig
from gradwatch.diagnose import RULES
from gradwatch.diagnose.load import RunWindow
from gradwatch.ingest import Ingester
from gradwatch.store import Store

RUN = ["grad_norm_total", "grad_norm_total_clipped", "clip_coef", "skipped", "nonfinite_params",
       "overflow_params", "loss"]
EVERY = 10  # param norms, update ratios and layer metrics
TARGET_SHARE = 0.10  # of one core, for 50 runs (issue 13)


class LiveRun:
    """One run log being written frame by frame, as a training process would."""

    def __init__(self, home: Path, run_id: str, n_params: int, seed: int) -> None:
        n_linear = n_params // 2
        params, layers = [], []
        for i in range(n_linear):
            lidx = len(layers)
            params += [{"index": 2 * i + k, "name": f"l{i}.{n}", "layer": lidx, "shape": [64], "numel": 64,
                        "requires_grad": True, "group": 0} for k, n in enumerate(("weight", "bias"))]
            layers.append({"index": lidx, "name": f"l{i}", "type": "Linear", "kind": "param", "family": None,
                           "params": [2 * i, 2 * i + 1]})
            if i % 2 == 1:
                act = ("ReLU", "relu") if i % 4 == 1 else ("Tanh", "bounded")
                layers.append({"index": len(layers), "name": f"act{i}", "type": act[0], "kind": "activation",
                               "family": act[1], "params": []})
        every_layer = tuple(la["index"] for la in layers)
        relu = tuple(la["index"] for la in layers if la["family"] == "relu")
        bounded = tuple(la["index"] for la in layers if la["family"] == "bounded")
        acts = relu + bounded
        defs = [MetricDef(i, m, "run") for i, m in enumerate(RUN)]
        defs.append(MetricDef(len(defs), "lr", "group", (0,)))
        for m in ("grad_norm", "param_norm", "update_ratio"):
            defs.append(MetricDef(len(defs), m, "param", tuple(range(len(params)))))
        for m, cols in (("act_grad_norm", every_layer), ("act_mean", every_layer), ("act_std", every_layer),
                        ("saturation_ratio", bounded), ("dead_ratio", relu), ("zero_ratio", relu),
                        ("act_nonfinite", acts)):
            defs.append(MetricDef(len(defs), m, "layer", cols))
        self.defs = defs
        self.rng = np.random.default_rng(seed)
        self.step = 0
        info = {"run_id": run_id, "name": run_id, "project": "bench", "host": "bench-host", "pid": 1, "rank": 0,
                "world_size": 1, "started_at": time.time(), "params": params, "layers": layers,
                "groups": [{"index": 0, "lr": 0.1, "params": list(range(len(params)))}],
                "config": {"measure": {"flush_every": 20}}, "model": {}}
        path = runlog.log_path(run_id, 0, home)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file: IO[bytes] = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.file.write(runlog.encode_header(Header(info, defs)))
        self.file.flush()

    def write(self, steps: int) -> None:
        """One frame of `steps` healthy steps: noisy values around a slow decay."""
        s = np.arange(self.step, self.step + steps, dtype=np.int64)
        self.step += steps
        blocks = []
        for d in self.defs:
            ss = s[s % EVERY == 0] if d.scope == "layer" or d.name in ("param_norm", "update_ratio") else s
            if not len(ss):
                continue
            if d.name in ("skipped", "nonfinite_params", "overflow_params", "act_nonfinite"):
                vals = np.zeros((len(ss), d.width), dtype=np.float32)
            elif d.name in ("clip_coef",):
                vals = np.ones((len(ss), d.width), dtype=np.float32)
            elif d.name.endswith("_ratio") and d.scope == "layer":
                vals = self.rng.uniform(0.0, 0.2, (len(ss), d.width)).astype(np.float32)
            else:
                decay = (1.0 / np.sqrt(1.0 + ss / 100))[:, None]
                vals = (decay * self.rng.lognormal(0.0, 0.2, (len(ss), d.width))).astype(np.float32)
            blocks.append((d.id, ss, vals))
        self.file.write(runlog.encode_frame(blocks))
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def measure(n_runs: int, n_params: int, seconds: float, steps_per_s: int, window: int,
            poll_interval: float = 0.5, fed: bool = True) -> dict:
    """CPU time of `AlertEngine.evaluate()` over `seconds` of simulated service time: a pass every
    `poll_interval`, each run flushing `steps_per_s` steps once a second (the agent's default
    max_flush_interval); each run starts with a full window already stored. `fed`: the ingester
    hands the engine its batches, as in `gradwatch serve` (else every window reads the store)."""
    home = Path(tempfile.mkdtemp(prefix="gw-alerts-bench-"))
    now = [time.time()]
    try:
        runs = [LiveRun(home, f"run{i:03d}", n_params, i) for i in range(n_runs)]
        for run in runs:
            for _ in range(window // 20 + 1):
                run.write(20)
        store = Store.open(home=home)
        engine = AlertEngine(store, AlertsConfig(window_steps=window), rules=RULES, clock=lambda: now[0])
        ingester = Ingester(store, home, stale_after=1e9, on_batch=engine.feed if fed else None)
        ingester.poll_once()
        engine.start()
        engine.evaluate()  # the first pass reads every run's window: a one-off
        cpu, alerts, passes = [], 0, round(seconds / poll_interval)
        per_flush = max(1, round(1.0 / poll_interval))
        for i in range(passes):
            now[0] += poll_interval
            if i % per_flush == 0:
                for run in runs:
                    run.write(steps_per_s)
                ingester.poll_once()
            c = time.process_time()
            alerts += len(engine.evaluate())
            cpu.append(time.process_time() - c)
        for run in runs:
            run.close()
        store.close()
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return {"runs": n_runs, "params": n_params, "window_steps": window, "steps_per_s": steps_per_s, "fed": fed,
            "seconds": seconds, "passes": passes, "cpu_ms_per_pass_mean": round(1000 * statistics.mean(cpu), 2),
            "cpu_ms_per_pass_max": round(1000 * max(cpu), 1), "core_share": round(sum(cpu) / seconds, 4),
            "alerts": alerts}


def rule_costs(n_params: int, window: int, repeat: int = 20) -> dict[str, float]:
    """Milliseconds of CPU each rule takes on one full window of one run read afresh: each repeat
    on a copy that nothing was derived from yet (a live window keeps what it derived, and pays
    about that only for the steps it appends)."""
    home = Path(tempfile.mkdtemp(prefix="gw-alerts-bench-"))
    try:
        run = LiveRun(home, "run", n_params, 0)
        for _ in range(window // 20 + 1):
            run.write(20)
        run.close()
        with Store.open(home=home) as store:
            Ingester(store, home, stale_after=1e9).poll_once()
            w = RunWindow(store, "run", window)
            w.refresh()
            data = w.data
        out = {}
        for rule in RULES:
            fresh = [copy.deepcopy(data) for _ in range(repeat)]
            c = time.process_time()
            for d in fresh:
                rule(d)
            out[rule.__name__] = round(1000 * (time.process_time() - c) / repeat, 2)
        return out
    finally:
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="1,10,50", help="comma-separated numbers of live runs")
    ap.add_argument("--params", type=int, default=600)
    ap.add_argument("--seconds", type=float, default=60.0, help="simulated service time measured")
    ap.add_argument("--steps-per-s", type=int, default=2, help="training steps of every run per second")
    ap.add_argument("--window", type=int, default=AlertsConfig().window_steps)
    ap.add_argument("--read", action="store_true", help="no batches handed over: every window reads the store")
    args = ap.parse_args()
    rows = [measure(int(n), args.params, args.seconds, args.steps_per_s, args.window, fed=not args.read)
            for n in args.runs.split(",")]
    for row in rows:
        print(json.dumps(row))
    costs = rule_costs(args.params, args.window)
    print(json.dumps({"rule_ms_on_one_window": costs}))
    print(f"\n{args.params} params per run, {args.steps_per_s} steps/s per run, window {args.window} steps, "
          f"service defaults (a pass every 0.5 s), windows {'reading the store' if args.read else 'fed'}\n")
    print("| live runs | CPU per pass (mean) | CPU per pass (max) | share of one core |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['runs']} | {r['cpu_ms_per_pass_mean']:.1f} ms | {r['cpu_ms_per_pass_max']:.0f} ms | "
              f"{100 * r['core_share']:.1f}% |")
    fifty = next((r for r in rows if r["runs"] == 50), None)
    if fifty is not None:
        verdict = "met" if fifty["core_share"] < TARGET_SHARE else "**missed**"
        print(f"\ntarget: 50 runs under {100 * TARGET_SHARE:.0f}% of one core: {verdict}")
    print("\n| rule | CPU on one window |\n|---|---|")
    for name, ms in costs.items():
        print(f"| `{name}` | {ms:.2f} ms |")


if __name__ == "__main__":
    main()
