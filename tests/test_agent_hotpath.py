"""The step path: no host synchronisation, no memory growth, every hook removed on close,
and failures inside the agent counted rather than raised."""

from __future__ import annotations

import contextlib
import gc
import os

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.agent import runlog
from tests.agent_models import MODELS, batch_for, mlp, train

SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")

EVERYTHING_EVERY_STEP = {"measure": {"flush_every": 5, "param_every": 1, "update_ratio_every": 1,
                                     "activation_every": 1}}


class HostSync(AssertionError):
    pass


@pytest.fixture
def forbid_host_sync(monkeypatch):
    """Make every syncing Tensor method raise while the returned context is active."""
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING}
    active = {"on": False}

    def guard(name):
        def method(self, *args, **kwargs):
            if active["on"]:
                raise HostSync(f"Tensor.{name} called on the step path")
            return originals[name](self, *args, **kwargs)
        return method

    for name in SYNCING:
        monkeypatch.setattr(torch.Tensor, name, guard(name))

    class Switch:
        def __enter__(self):
            active["on"] = True

        def __exit__(self, *exc):
            active["on"] = False

    return Switch()


CASES = [(name, "norm") for name in ("cnn", "lstm", "transformer", "shared")] + [
    ("mlp", clip) for clip in ("none", "norm", "value", "param_norm", "agc", "auto_percentile", "zscore")]


@pytest.mark.parametrize("name, clip", CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_monitored_steps_make_no_host_sync(name, clip, forbid_host_sync):
    torch.manual_seed(0)
    model = MODELS[name]()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    config = {**EVERYTHING_EVERY_STEP, "clip": {"mode": clip, "max_norm": 0.1, "max_value": 0.01}}
    gen = torch.Generator().manual_seed(0)
    batches = [batch_for(name, gen) for _ in range(12)]
    with gradwatch.watch(model, opt, config=config) as watcher:
        for x, y in batches:
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            with forbid_host_sync:  # the agent's work: step hooks, log(), and the periodic flush
                opt.step()
                watcher.log(loss=loss)
            opt.zero_grad()
        snap = watcher.snapshot()
    assert snap["errors"] == {}, snap["errors"]
    assert snap["steps"] == 12 and snap["grad_norm_total"]["before_clip"] is not None


def test_forward_and_backward_hooks_make_no_host_sync(forbid_host_sync):
    model = MODELS["lstm"]()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    with gradwatch.watch(model, opt, config=EVERYTHING_EVERY_STEP) as watcher:
        for _ in range(6):
            x, y = batch_for("lstm", gen)
            out = model(x)  # warm-up forward outside, so torch's own lazy init is not counted
            loss = nn.functional.cross_entropy(out, y)
            with forbid_host_sync:
                loss.backward()
            opt.step()
            opt.zero_grad()
        snap = watcher.snapshot()
    assert snap["errors"] == {}
    assert all(v.get("act_grad_norm") is not None for v in snap["layers"].values())


def _hook_count(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    count = len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)
    for module in model.modules():
        count += len(module._forward_hooks) + len(module._forward_pre_hooks) + len(module._backward_hooks)
    return count


@pytest.mark.parametrize("name", sorted(MODELS))
def test_close_removes_every_hook_and_flushes_everything(name):
    model = MODELS[name]()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watcher = gradwatch.watch(model, opt, config={"measure": {"flush_every": 100}})
    assert _hook_count(model, opt) > 0
    train(model, opt, name, steps=7, watcher=watcher)
    watcher.close()
    assert _hook_count(model, opt) == 0
    records = runlog.read_log(watcher.path)
    steps = sorted({int(s) for r in records if isinstance(r, runlog.Frame) for b in r.blocks
                    if b.metric.name == "grad_norm_total" for s in b.steps})
    assert steps == list(range(7))
    assert isinstance(records[-1], runlog.Close)
    watcher.close()  # idempotent


def test_no_memory_growth_over_ten_thousand_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(4, 8), torch.randint(0, 2, (4,))
    # Flushes by step count only, so both censuses see the same phase of the window (a time-based
    # flush at a machine-dependent step may leave a different, bounded, set of cached index tensors).
    config = {"measure": {"flush_every": 50, "max_flush_interval": 3600, "activation_every": 5, "param_every": 5,
                          "update_ratio_every": 5}, "clip": {"mode": "norm", "max_norm": 1.0}}

    def steps(n: int) -> None:
        for _ in range(n):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            watcher.log(loss=loss)

    def census() -> tuple[int, int, int]:
        gc.collect()
        objects = gc.get_objects()
        tensors = sum(1 for o in objects if issubclass(type(o), torch.Tensor))
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return len(objects), tensors, rss

    with gradwatch.watch(model, opt, config=config) as watcher:
        steps(1000)
        watcher.snapshot()
        objects, tensors, rss = census()
        steps(9000)
        watcher.snapshot()
        objects_after, tensors_after, rss_after = census()
        assert tensors_after == tensors, "tensors are kept alive across steps"
        assert objects_after - objects < 200
        assert rss_after - rss < 16 * 1024 * 1024, f"RSS grew by {rss_after - rss} bytes over 9000 steps"
        assert watcher.snapshot()["errors"] == {}


def test_unwritable_log_is_counted_and_training_goes_on(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full to simulate a full disk")
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watcher = gradwatch.watch(model, opt, config={"home": tmp_path, "measure": {"flush_every": 2}})
    watcher.close()
    # a second run whose log is a full disk: every write fails with ENOSPC
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    os.environ["GRADWATCH_RUN_ID"] = "fulldisk"
    try:
        path = runlog.log_path("fulldisk", 0, tmp_path)
        path.symlink_to("/dev/full")
        watcher = gradwatch.watch(model, opt, config={"home": tmp_path, "measure": {"flush_every": 2}})
    finally:
        del os.environ["GRADWATCH_RUN_ID"]
    losses = train(model, opt, "mlp", steps=8, watcher=watcher)
    snap = watcher.snapshot()
    watcher.close()
    assert len(losses) == 8 and snap["steps"] == 8
    assert any(key.startswith("writer:write:") for key in snap["errors"]), snap["errors"]


def test_failure_inside_a_hook_is_counted_not_raised():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.watch(model, opt) as watcher:
        watcher._rows = watcher._buf = None  # break the agent's own state: every hook now fails inside
        losses = train(model, opt, "mlp", steps=3, watcher=watcher)
        assert len(losses) == 3
        assert watcher.errors["step:TypeError"] == 3


def _run_on(device: str, name: str, clip: str, during_steps=None) -> dict:
    """Train `name` for 12 steps on `device` with every metric every step; return the final snapshot."""
    torch.manual_seed(0)
    model = MODELS[name]().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    config = {**EVERYTHING_EVERY_STEP, "clip": {"mode": clip, "max_norm": 0.1, "max_value": 0.01}}
    gen = torch.Generator().manual_seed(0)
    batches = [tuple(t.to(device) for t in batch_for(name, gen)) for _ in range(12)]
    with gradwatch.watch(model, opt, config=config) as watcher:
        for step, (x, y) in enumerate(batches):
            context = during_steps() if during_steps is not None and step > 0 else contextlib.nullcontext()
            with context:  # the first step is left out: torch's own lazy initialisation may sync
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                watcher.log(loss=loss)
                opt.zero_grad()
        return watcher.snapshot()


class _sync_is_an_error:
    """`torch.cuda.set_sync_debug_mode("error")` for the duration: any host synchronisation raises."""

    def __enter__(self):
        self.previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(self.previous)
        return False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name, clip", CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_cuda_steps_make_no_host_sync_and_match_cpu(name, clip):
    on_gpu = _run_on("cuda", name, clip, during_steps=_sync_is_an_error)
    on_cpu = _run_on("cpu", name, clip)
    assert on_gpu["errors"] == {}, on_gpu["errors"]
    assert on_gpu["steps"] == on_cpu["steps"] == 12
    for key in ("before_clip", "after_clip"):
        assert on_gpu["grad_norm_total"][key] == pytest.approx(on_cpu["grad_norm_total"][key], rel=1e-3)
    for param, metrics in on_cpu["params"].items():
        for metric, value in metrics.items():
            if isinstance(value, float):
                assert on_gpu["params"][param][metric] == pytest.approx(value, rel=1e-3, abs=1e-6), (param, metric)
    for layer, metrics in on_cpu["layers"].items():
        for metric, value in metrics.items():
            if isinstance(value, float):
                assert on_gpu["layers"][layer][metric] == pytest.approx(value, rel=1e-3, abs=1e-5), (layer, metric)
