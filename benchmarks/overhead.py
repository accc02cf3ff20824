"""Overhead of gradwatch on training steps, against bare training and other monitoring methods.

Run from the repository root (docs/benchmarks.md explains the method and keeps the results):

    python -m benchmarks.overhead                      # every model, the default methods
    python -m benchmarks.overhead --quick --models mlp # a smoke run
    python -m benchmarks.overhead --write-docs         # also update docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from time import perf_counter_ns
from typing import Any

if __package__ in (None, ""):  # run as a script: python benchmarks/overhead.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from benchmarks.methods import DEFAULT_METHODS, METHODS, Method
from benchmarks.models import MODELS, Workload, build

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
IMPORT_STATEMENT = "from gradwatch.agent import watch"
_MB = 1024 * 1024

# Step-time ratio limits per method and model, the own-time limit against clip_grad_norm_,
# and the import and memory limits (issue 6).
RATIO_TARGETS: dict[str, dict[str, float]] = {
    "gradwatch": {"mlp": 1.05, "cnn": 1.02, "lstm": 1.02, "gpt": 1.02},
    "gradwatch-all": {"mlp": 1.20, "cnn": 1.08, "lstm": 1.05, "gpt": 1.05},  # issue 19: the floor plus a margin
}
OWN_VS_CLIP_TARGET = 1.5
CLIPPING_VS_CLIP_TARGET = 1.2  # the default config with norm clipping, against clip_grad_norm_ alone
BURST_TARGET = 3.0  # no step's own time above this many times the median step's (issue 19)
COMPILED_TARGET = 1.05  # the default config against the compiled bare step (issue 14)
MIN_ROUNDS = 10
CYCLE = 10
"""Budgeted runs measure a multiple of this many rounds: the default config's measurement period
(parameter, update and activation statistics every 10 steps), so each sample holds whole cycles."""
IMPORT_TARGET_MS = 100.0
RSS_TARGET_MB = 30.0


@dataclass(frozen=True)
class Settings:
    """What to run and how long: parsed from the command line."""

    models: tuple[str, ...]
    methods: tuple[str, ...]
    rss_methods: tuple[str, ...]
    rounds: int | None
    budget_s: float
    warmup: int
    device: str
    batch_scale: int
    seed: int
    bootstrap: int
    rss_steps: int
    rss_reps: int
    import_reps: int
    compile: str | None = None  # a torch.compile backend every method's model is compiled with


@dataclass
class MethodResult:
    """One method on one model: per-round samples and one-off costs."""

    step_ns: list[int] = field(default_factory=list)
    cpu_ns: list[int] = field(default_factory=list)
    own_ns: list[int] = field(default_factory=list)
    setup_ns: int = 0
    rss_samples: list[int] = field(default_factory=list)  # peak RSS of each fresh process
    peak_rss_bytes: int | None = None  # their median
    peak_device_bytes: int | None = None


@dataclass
class ModelResult:
    """All methods on one model."""

    name: str
    params: int
    batch: int
    rounds: int
    methods: dict[str, MethodResult]


@dataclass
class Report:
    """Everything one run measured, with where and when."""

    settings: Settings
    machine: dict[str, str]
    models: list[ModelResult]
    skipped: dict[str, str]
    import_ms: list[float] | None
    torch_import_ms: list[float] | None
    wall_s: float = 0.0


def configure_torch(device: str) -> torch.device:
    """Pin torch to one thread (the other core is left to background writers and the OS)."""
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already started in this process
        pass
    torch.set_flush_denormal(True)  # a copy drifting into denormals would be slow for its own reasons
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(device)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer every method uses: AdamW, lr 1e-4."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4)


def train_step(
    workload: Workload, model: torch.nn.Module, optimizer: torch.optim.Optimizer, method: Method, device: torch.device
) -> None:
    """One training step with `method`'s monitoring; on CUDA, waits for the device to finish.

    On CUDA a sync-free method's step runs under `torch.cuda.set_sync_debug_mode("error")`, so
    any host synchronisation inside it raises.
    """
    check_sync = device.type == "cuda" and method.sync_free
    if check_sync:
        torch.cuda.set_sync_debug_mode("error")
    try:
        optimizer.zero_grad(set_to_none=True)
        loss = workload.loss(model)
        loss.backward()
        method.before_step()
        optimizer.step()
        method.after_step(loss)
    finally:
        if check_sync:
            torch.cuda.set_sync_debug_mode(0)
    if device.type == "cuda":
        torch.cuda.synchronize()


def _attach(name: str, model_name: str, workload: Workload, workdir: Path,
            backend: str | None = None) -> tuple[Method, torch.nn.Module, Any, int]:
    model = copy.deepcopy(workload.model)
    optimizer = make_optimizer(model)
    if backend is not None:
        model = torch.compile(model, backend=backend)
    method = METHODS[name]()
    start = perf_counter_ns()
    method.attach(model, optimizer, workdir, run=f"bench-{model_name}-{name}")
    return method, model, optimizer, perf_counter_ns() - start


def _done(measured: int, started: float, settings: Settings) -> bool:
    if settings.rounds is not None:
        return measured >= settings.rounds
    return measured >= MIN_ROUNDS and measured % CYCLE == 0 and time.monotonic() - started >= settings.budget_s


def time_model(model_name: str, settings: Settings, workdir: Path) -> ModelResult:
    """Train one copy of the model per method, one step of each method per round in shuffled order.

    After `warmup` rounds, measured rounds run until there are `rounds` of them or, without
    `rounds`, until `budget_s` seconds have passed (at least `MIN_ROUNDS`, a multiple of `CYCLE`).
    """
    device = torch.device(settings.device)
    workload = build(model_name, device, settings.batch_scale, settings.seed)
    runs = {name: _attach(name, model_name, workload, workdir, settings.compile) for name in settings.methods}
    results = {name: MethodResult(setup_ns=run[3]) for name, run in runs.items()}
    order = list(runs)
    rng = random.Random(f"{settings.seed}-{model_name}")
    measured, round_index, started = 0, 0, time.monotonic()
    try:
        while not _done(measured, started, settings):
            if round_index == settings.warmup:
                started = time.monotonic()
            rng.shuffle(order)
            for name in order:
                method, model, optimizer, _ = runs[name]
                own_before = method.own_time_ns()
                cpu_start = time.thread_time_ns()
                start = perf_counter_ns()
                train_step(workload, model, optimizer, method, device)
                elapsed = perf_counter_ns() - start
                cpu = time.thread_time_ns() - cpu_start
                own = method.own_time_ns() - own_before
                method.untimed()
                if round_index >= settings.warmup:
                    results[name].step_ns.append(elapsed)
                    results[name].cpu_ns.append(cpu)
                    results[name].own_ns.append(own)
            measured += round_index >= settings.warmup
            round_index += 1
    finally:
        for method, *_ in runs.values():
            method.close()
    params = sum(p.numel() for p in workload.model.parameters())
    return ModelResult(model_name, params, workload.inputs.shape[0], measured, results)


def rss_child(model_name: str, method_name: str, settings: Settings) -> dict[str, int | None]:
    """In a fresh process: attach one method, train `rss_steps` steps, return the peak memory."""
    device = configure_torch(settings.device)
    workload = build(model_name, device, settings.batch_scale, settings.seed)
    with tempfile.TemporaryDirectory(prefix="gradwatch-bench-") as tmp:
        method, model, optimizer, _ = _attach(method_name, model_name, workload, Path(tmp), settings.compile)
        for _ in range(settings.rss_steps):
            train_step(workload, model, optimizer, method, device)
        method.close()
    peak_device = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"peak_rss_bytes": peak_rss_bytes(), "peak_device_bytes": peak_device}


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    On Linux `VmHWM` from /proc/self/status: `ru_maxrss` would not do, since Linux carries it
    over `fork` and `exec`, so a child reports at least its parent's peak.
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        status = ""
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    if found:
        return int(found.group(1)) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def measure_rss(result: ModelResult, settings: Settings) -> None:
    """Peak RSS (and device memory) of each of `rss_methods` in `result`: the median of
    `rss_reps` fresh processes each, the methods taking turns, since one process's peak
    varies by several MB from run to run (the allocator, the writer thread's timing)."""
    for _ in range(settings.rss_reps):
        for name in settings.rss_methods:
            argv = [sys.executable, "-m", "benchmarks.overhead", "--rss-child", f"{result.name}:{name}",
                    "--device", settings.device, "--batch-scale", str(settings.batch_scale),
                    "--seed", str(settings.seed), "--rss-steps", str(settings.rss_steps)]
            argv += ["--compile", settings.compile] if settings.compile else []
            proc = subprocess.run(argv, cwd=REPO, env=_child_env(), capture_output=True, text=True, check=False)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"memory run {result.name}:{name} failed:\n{proc.stderr[-2000:]}")
            peaks = json.loads(lines[-1])
            method = result.methods[name]
            method.rss_samples.append(peaks["peak_rss_bytes"])
            method.peak_rss_bytes = int(np.median(method.rss_samples))
            method.peak_device_bytes = peaks["peak_device_bytes"]


def measure_import(reps: int) -> tuple[list[float], list[float]]:
    """Time `import torch`, then the agent import, in `reps` fresh interpreters (after one warm-up)."""
    code = ("import time, json; t0 = time.perf_counter(); import torch; t1 = time.perf_counter(); "
            f"{IMPORT_STATEMENT}; t2 = time.perf_counter(); print(json.dumps([t1 - t0, t2 - t1]))")
    torch_ms: list[float] = []
    agent_ms: list[float] = []
    for rep in range(reps + 1):
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_child_env(),
                             capture_output=True, text=True, check=True).stdout
        t_torch, t_agent = json.loads(out.strip().splitlines()[-1])
        if rep:
            torch_ms.append(t_torch * 1e3)
            agent_ms.append(t_agent * 1e3)
    return agent_ms, torch_ms


def ratio_interval(method_ns: Sequence[int], bare_ns: Sequence[int], resamples: int, seed: int,
                   statistic: str = "median") -> tuple[float, float, float]:
    """Ratio of the step times' `statistic` (median or mean) to bare's, with a paired bootstrap
    95% interval over rounds.

    Rounds are resampled together for both methods, since a round's steps share the
    machine's state at that moment.
    """
    method = np.asarray(method_ns, dtype=np.float64)
    bare = np.asarray(bare_ns, dtype=np.float64)
    if statistic not in ("median", "mean"):
        raise ValueError(f"statistic must be 'median' or 'mean'. Got {statistic!r}")
    reduce = np.median if statistic == "median" else np.mean
    ratio = float(reduce(method) / reduce(bare))
    idx = np.random.default_rng(seed).integers(0, len(bare), size=(resamples, len(bare)))
    boot = reduce(method[idx], axis=1) / reduce(bare[idx], axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return ratio, float(low), float(high)


def _git_commit() -> str:
    """The checkout's commit, with `-dirty` when its files differ from it."""
    proc = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True,
                          check=False)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return found.group(1).strip() if found else platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe_machine(device: str) -> dict[str, str]:
    """CPU (or GPU), OS, versions, date and load: the context the table needs."""
    versions = [f"Python {platform.python_version()}", f"torch {torch.__version__}", f"numpy {np.__version__}"]
    versions += [f"{pkg} {v}" for pkg in ("wandb", "tensorboard") if (v := _version(pkg))]
    gradwatch_version = "unknown"
    if (REPO / "gradwatch" / "__init__.py").exists():
        found = re.search(r'__version__ = "([^"]+)"', (REPO / "gradwatch" / "__init__.py").read_text())
        gradwatch_version = found.group(1) if found else gradwatch_version
    versions.append(f"gradwatch {gradwatch_version} (commit {_git_commit()})")
    machine = {
        "cpu": f"{_cpu_model()}, {os.cpu_count()} cores",
        "os": platform.platform(),
        "versions": ", ".join(versions),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_start": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    if device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
    return machine


def run(settings: Settings, log: Any = sys.stderr) -> Report:
    """Run every part of the benchmark that `settings` selects."""
    started = time.monotonic()
    configure_torch(settings.device)
    machine = describe_machine(settings.device)
    skipped = {name: why for name in settings.methods if (why := METHODS[name]().missing())}
    for name in settings.methods:
        if name not in skipped:
            METHODS[name]().preload()
    settings = Settings(**{**asdict(settings),
                           "methods": tuple(m for m in settings.methods if m not in skipped),
                           "rss_methods": tuple(m for m in settings.rss_methods
                                                if m in settings.methods and m not in skipped)})
    report = Report(settings, machine, [], skipped, None, None)
    with tempfile.TemporaryDirectory(prefix="gradwatch-bench-") as tmp:
        for name in settings.models:
            length = f"{settings.rounds} rounds" if settings.rounds else f"{settings.budget_s:.0f} s of rounds"
            print(f"[overhead] {name}: {settings.warmup} warm-up rounds, then {length} of {', '.join(settings.methods)}",
                  file=log, flush=True)
            report.models.append(time_model(name, settings, Path(tmp)))
    for result in report.models:
        if settings.rss_methods:
            print(f"[overhead] {result.name}: peak memory of {', '.join(settings.rss_methods)}", file=log, flush=True)
            measure_rss(result, settings)
    if settings.import_reps and "gradwatch" not in skipped:
        print(f"[overhead] import time, {settings.import_reps} interpreters", file=log, flush=True)
        report.import_ms, report.torch_import_ms = measure_import(settings.import_reps)
    report.machine["load_end"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    report.wall_s = time.monotonic() - started
    return report


def _fmt_ms(ns: float) -> str:
    ms = ns / 1e6
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def _fmt_ratio(interval: tuple[float, float, float]) -> str:
    return f"{interval[0]:.3f} [{interval[1]:.3f}, {interval[2]:.3f}]"


def _verdict(value: float, limit: float, interval: tuple[float, float] | None = None) -> str:
    if interval is None:
        return "met" if value <= limit else "**missed**"
    low, high = interval
    if high <= limit:
        return "met"
    if value <= limit:
        return "met (interval crosses the limit)"
    return "**missed**" if low > limit else "**missed** (interval crosses the limit)"


def _rss_delta_mb(result: ModelResult, name: str) -> float | None:
    bare, this = result.methods["bare"], result.methods[name]
    if bare.peak_rss_bytes is None or this.peak_rss_bytes is None:
        return None
    return (this.peak_rss_bytes - bare.peak_rss_bytes) / _MB


@dataclass(frozen=True)
class _Row:
    """One method's summary on one model, as the tables show it."""

    wall: tuple[float, float, float] | None  # ratio of medians to bare, 95% interval
    cpu: tuple[float, float, float] | None
    own_ms: float
    own_share: float  # own time / bare median step
    own_clip: float | None
    burst: float | None  # the largest step's own time / the median step's
    rss_mb: float | None


def _summarise(result: ModelResult, name: str, settings: Settings) -> _Row:
    bare, res, clip = result.methods["bare"], result.methods[name], result.methods.get("clip")
    own = float(np.mean(res.own_ns))
    clip_own = float(np.mean(clip.own_ns)) if clip is not None else 0.0
    paired = name != "bare"
    return _Row(
        wall=ratio_interval(res.step_ns, bare.step_ns, settings.bootstrap, settings.seed) if paired else None,
        cpu=ratio_interval(res.cpu_ns, bare.cpu_ns, settings.bootstrap, settings.seed, "mean") if paired else None,
        own_ms=own / 1e6, own_share=own / float(np.median(bare.step_ns)),
        own_clip=own / clip_own if clip_own > 0 and name not in ("bare", "clip") else None,
        burst=float(np.max(res.own_ns) / np.median(res.own_ns)) if paired and np.median(res.own_ns) > 0 else None,
        rss_mb=_rss_delta_mb(result, name))


def render(report: Report) -> str:
    """The markdown block docs/benchmarks.md keeps: context, results table, targets."""
    s, m = report.settings, report.machine
    lines = [
        f"- Machine: {m['cpu']}" + (f", {m['gpu']}" if "gpu" in m else "") + f"; {m['os']}",
        f"- Versions: {m['versions']}",
        f"- Run: {m['date']}, device {s.device}, 1 torch thread, "
        + (f"every model `torch.compile(backend={s.compile!r})`d, " if s.compile else "")
        + f"{s.warmup} warm-up rounds, then "
        + (f"{s.rounds} measured rounds" if s.rounds else f"{s.budget_s:.0f} s of measured rounds")
        + f" per model; batch scale {s.batch_scale}, seed {s.seed}, {s.bootstrap} bootstrap resamples, "
        f"peak memory after {s.rss_steps} steps (median of {s.rss_reps} processes), "
        f"{report.wall_s / 60:.1f} min in all",
        f"- Load average (1/5/15 min): {m['load_start']} at start, {m.get('load_end', '?')} at the end",
    ]
    if report.skipped:
        lines.append("- Not run: " + "; ".join(f"{k} ({v})" for k, v in report.skipped.items()))
    gpu = s.device == "cuda"
    lines += ["", "| model | method | median step (ms) | ratio to bare [95% CI] | CPU-time ratio, mean [95% CI] "
              "| own time (ms/step) | own / bare step | own / clip | own max / median | setup (ms) "
              "| peak RSS over bare (MB) |" + (" peak GPU memory over bare (MB) |" if gpu else ""),
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "")]
    targets: list[tuple[str, str, str, str]] = []
    for result in report.models:
        bare = result.methods["bare"]
        label = f"{result.name} ({result.params / 1e6:.2f} M params, batch {result.batch}, {result.rounds} rounds)"
        for name, res in result.methods.items():
            row = _summarise(result, name, s)
            cells = [label, name, _fmt_ms(float(np.median(res.step_ns)))]
            if row.wall is None or row.cpu is None:
                cells += ["1", "1", "–", "–", "–", "–", "–"]
            else:
                cells += [_fmt_ratio(row.wall), _fmt_ratio(row.cpu), f"{row.own_ms:.3f}",
                          f"{100 * row.own_share:.1f}%", f"{row.own_clip:.2f}" if row.own_clip else "–",
                          f"{row.burst:.1f}" if row.burst is not None else "–", f"{res.setup_ns / 1e6:.1f}"]
            if name == "bare":
                cells.append(f"0 (bare: {bare.peak_rss_bytes / _MB:.0f})" if bare.peak_rss_bytes else "–")
            else:
                cells.append(f"{row.rss_mb:+.1f}" if row.rss_mb is not None else "–")
            if gpu:
                dev = (res.peak_device_bytes - bare.peak_device_bytes) / _MB if (
                    res.peak_device_bytes is not None and bare.peak_device_bytes is not None) else None
                cells.append(f"{dev:+.1f}" if dev is not None else "–")
            lines.append("| " + " | ".join(cells) + " |")
            label = ""
            targets += _targets(result, name, row, s)
    if report.import_ms:
        agent, base = float(np.median(report.import_ms)), float(np.median(report.torch_import_ms or [0.0]))
        lines += ["", (f"Import: `{IMPORT_STATEMENT}` after `import torch` takes {agent:.1f} ms (median of "
                       f"{len(report.import_ms)} fresh interpreters; `import torch` itself {base:.0f} ms).")]
        targets.append((f"`{IMPORT_STATEMENT}` ≤ {IMPORT_TARGET_MS:.0f} ms over `import torch`", "–",
                        f"{agent:.1f} ms", _verdict(agent, IMPORT_TARGET_MS)))
    if targets:
        lines += ["", "| target | model | measured | verdict |", "|---|---|---|---|"]
        lines += [f"| {t} | {mdl} | {val} | {verdict} |" for t, mdl, val, verdict in targets]
    return "\n".join(lines) + "\n"


def _targets(result: ModelResult, name: str, row: _Row, settings: Settings) -> list[tuple[str, str, str, str]]:
    """The issue's targets that apply to method `name` on this model, with their verdicts.

    A step-time limit is judged on the ratio of mean CPU times (the training thread's CPU time,
    which a shared machine's other jobs barely move, averaged so that the work done every few
    steps counts); the wall-clock ratio of medians and the estimate from own time,
    1 + own / bare step, are shown next to it. On CUDA, where the step's work is on the device
    and not in the thread's CPU time, it is judged on the wall-clock ratio. Compiled, only the
    default config's ratio to the compiled bare step is a target.
    """
    rows: list[tuple[str, str, str, str]] = []
    device = settings.device
    if settings.compile:
        limit = COMPILED_TARGET if name == "gradwatch" else None
    else:
        limit = RATIO_TARGETS.get(name, {}).get(result.name)
    if limit is not None and row.wall is not None and row.cpu is not None:
        measured = f"CPU {_fmt_ratio(row.cpu)}; wall {_fmt_ratio(row.wall)}; 1 + own / bare {1 + row.own_share:.3f}"
        judged = row.wall if device == "cuda" else row.cpu
        rows.append((f"{name}: step-time ratio ≤ {limit:.2f}", result.name, measured,
                     _verdict(judged[0], limit, judged[1:])))
    if name == "gradwatch" and row.own_clip is not None and not settings.compile:
        rows.append((f"gradwatch: mean own time ≤ {OWN_VS_CLIP_TARGET}× clip_grad_norm_'s", result.name,
                     f"{row.own_clip:.2f}×", _verdict(row.own_clip, OWN_VS_CLIP_TARGET)))
    if name == "gradwatch-clip" and row.own_clip is not None and not settings.compile:
        rows.append((f"gradwatch-clip: mean own time ≤ {CLIPPING_VS_CLIP_TARGET}× clip_grad_norm_'s", result.name,
                     f"{row.own_clip:.2f}×", _verdict(row.own_clip, CLIPPING_VS_CLIP_TARGET)))
    if name == "gradwatch" and row.burst is not None and not settings.compile:
        rows.append((f"gradwatch: largest step's own time ≤ {BURST_TARGET:.0f}× the median step's", result.name,
                     f"{row.burst:.1f}×", _verdict(row.burst, BURST_TARGET)))
    if name == "gradwatch-all":
        mine = float(np.mean(result.methods[name].cpu_ns))
        for other in ("wandb", "tensorboard"):
            if other in result.methods:
                theirs = float(np.mean(result.methods[other].cpu_ns))
                rows.append((f"gradwatch-all: faster than {other} (mean CPU time)", result.name,
                             f"{_fmt_ms(mine)} vs {_fmt_ms(theirs)} ms", "met" if mine < theirs else "**missed**"))
    if name.startswith("gradwatch") and row.rss_mb is not None:
        rows.append((f"{name}: peak RSS ≤ {RSS_TARGET_MB:.0f} MB over bare", result.name, f"{row.rss_mb:+.1f} MB",
                     _verdict(row.rss_mb, RSS_TARGET_MB)))
    return rows


def write_docs(path: Path, device: str, block: str) -> None:
    """Replace the text between this device's markers in `path` by `block`."""
    begin, end = f"<!-- overhead:{device}:begin -->", f"<!-- overhead:{device}:end -->"
    try:
        text = path.read_text()
    except OSError as exc:
        raise SystemExit(f"cannot read {path}: {exc.strerror}") from None
    if begin not in text or end not in text:
        raise SystemExit(f"{path} has no {begin} ... {end} markers")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{block}{end}{tail}")


def _names(value: str, known: Sequence[str], what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or value!r}; choose from "
                                         f"{', '.join(known)}")
    return names


def parse_args(argv: Sequence[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    """Parse the command line into Settings (defaults depend on --quick and --device)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, from {', '.join(METHODS)}; bare is always added")
    parser.add_argument("--rss-methods", default="bare,gradwatch,gradwatch-all",
                        help="methods whose peak memory is measured (one subprocess each); '' for none")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few rounds, few resamples")
    parser.add_argument("--rounds", type=int, help="measured rounds per model (default: as many as --budget allows, "
                        f"at least {MIN_ROUNDS}; quick 4)")
    parser.add_argument("--budget", type=float, default=30.0, help="seconds of measured rounds per model (default 30)")
    parser.add_argument("--warmup", type=int, help="unmeasured rounds first (default 3, quick 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-scale", type=int, help="multiply every batch (default 1 on cpu, 8 on cuda)")
    parser.add_argument("--compile", metavar="BACKEND", help="torch.compile every method's model with this "
                        "backend (inductor, aot_eager, ...); its table has its own markers in the docs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, help="bootstrap resamples (default 2000, quick 200)")
    parser.add_argument("--rss-steps", type=int, help="steps of each memory run (default 21, quick 2)")
    parser.add_argument("--rss-reps", type=int, help="memory runs per method, median taken (default 3, quick 1)")
    parser.add_argument("--import-reps", type=int, help="interpreters timing the import (default 7, quick 1); 0: off")
    parser.add_argument("--write-docs", nargs="?", const=str(DOCS), metavar="PATH",
                        help="write the table between this device's markers in PATH (default docs/benchmarks.md)")
    parser.add_argument("--json", metavar="PATH", help="also write every sample as JSON")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick

    def pick(value: int | None, default: int, quick_default: int) -> int:
        return value if value is not None else quick_default if quick else default

    try:
        methods = _names(args.methods, list(METHODS), "method")
        rss_methods = _names(args.rss_methods, list(METHODS), "method") if args.rss_methods else ()
        models = _names(args.models, MODELS, "model")
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    settings = Settings(
        models=models,
        methods=("bare", *[m for m in methods if m != "bare"]),
        rss_methods=rss_methods,
        rounds=args.rounds if args.rounds is not None else 4 if quick else None,
        budget_s=args.budget,
        warmup=pick(args.warmup, 3, 1),
        device=args.device,
        batch_scale=args.batch_scale or (8 if args.device == "cuda" else 1),
        seed=args.seed,
        bootstrap=pick(args.bootstrap, 2000, 200),
        rss_steps=pick(args.rss_steps, 21, 2),
        rss_reps=pick(args.rss_reps, 3, 1),
        import_reps=pick(args.import_reps, 7, 1),
        compile=args.compile,
    )
    if (settings.rounds is not None and settings.rounds < 2) or settings.budget_s <= 0 or settings.warmup < 0 \
            or settings.rss_steps < 1 or settings.rss_reps < 1 or settings.import_reps < 0:
        parser.error("need --rounds >= 2, --budget > 0, --warmup >= 0, --rss-steps >= 1, --rss-reps >= 1 "
                     "and --import-reps >= 0")
    return settings, args


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    settings, args = parse_args(argv)
    if args.rss_child:
        model_name, method_name = args.rss_child.split(":")
        print(json.dumps(rss_child(model_name, method_name, settings)))
        return
    report = run(settings)
    block = render(report)
    print(block)
    if args.write_docs:
        write_docs(Path(args.write_docs), settings.device + ("-compiled" if settings.compile else ""), block)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=1))


if __name__ == "__main__":
    main()
