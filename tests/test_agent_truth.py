"""What the agent records at the moments that matter: non-finite values kept as values, an
overflowed norm told from NaN elements, closure steps, optimizer wrappers, micro-batch
scalars, sparse, meta, float64 and complex models, and a stable `act_std`. Each reference is
plain torch on the same tensors."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.agent import runlog

EVERY_STEP = {"measure": {"flush_every": 4, "param_every": 1, "update_ratio_every": 1, "activation_every": 1}}


def records(watcher: gradwatch.Watcher) -> list[runlog.Record]:
    return runlog.read_log(watcher.path)


def series(watcher: gradwatch.Watcher, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, values, present) of one metric, every frame of the log together."""
    blocks = [b for r in records(watcher) if isinstance(r, runlog.Frame) for b in r.blocks if b.metric.name == metric]
    assert blocks, f"{metric} not in the run log"
    return (np.concatenate([b.steps for b in blocks]), np.concatenate([b.values for b in blocks]),
            np.concatenate([b.present for b in blocks]))


def events(watcher: gradwatch.Watcher, kind: str) -> list[runlog.Event]:
    return [r for r in records(watcher) if isinstance(r, runlog.Event) and r.kind == kind]


def column(watcher: gradwatch.Watcher, metric: str, name: str) -> dict[int, float]:
    """step -> value of the column of `metric` for the param or layer called `name`, where measured."""
    header = records(watcher)[0]
    assert isinstance(header, runlog.Header)
    table = header.info["params"] if metric in ("grad_norm", "param_norm", "update_ratio") else header.info["layers"]
    index = next(e["index"] for e in table if e["name"] == name)
    steps, values, present = series(watcher, metric)
    j = list(next(b.metric for r in records(watcher) if isinstance(r, runlog.Frame) for b in r.blocks
                  if b.metric.name == metric).indices).index(index)
    return {int(s): float(v) for s, v, p in zip(steps, values[:, j], present[:, j]) if p}


# ------------------------------------------------------------------------ non-finite values


class Scaled(nn.Module):
    """A Linear whose gradient the test sets directly, to make it huge, overflowing or NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(10, 100, bias=False)
        self.small = nn.Linear(100, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.small(torch.relu(self.big(x)))


@pytest.mark.parametrize("element, kind", [(3.4e19, "finite"), (1e38, "overflow"), (math.nan, "nan"),
                                           (math.inf, "inf")], ids=["huge", "overflow", "nan", "inf"])
def test_a_norm_that_overflows_float32_is_told_from_nonfinite_elements(element, kind):
    model = Scaled()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradwatch.watch(model, opt, config={"measure": {"flush_every": 2}}) as watcher:
        for step in range(4):
            model(torch.randn(8, 10)).sum().backward()
            if step == 2:
                model.big.weight.grad.fill_(element)
                reference = torch.linalg.vector_norm(model.big.weight.grad, dtype=torch.float64).item()
            opt.step()
            opt.zero_grad()
    recorded = column(watcher, "grad_norm", "big.weight")[2]
    nonfinite = dict(zip(*series(watcher, "nonfinite_params")[:2]))
    overflow = dict(zip(*series(watcher, "overflow_params")[:2]))
    if kind == "finite":  # 3.4e19 squared overflows float32, the norm itself does not: recorded exactly
        assert recorded == pytest.approx(reference, rel=1e-6) and math.isfinite(recorded)
        assert (nonfinite[2], overflow[2]) == (0, 0)
        assert not events(watcher, "nonfinite") and not events(watcher, "overflow")
    elif kind == "overflow":  # elements finite, the norm beyond float32: +inf, counted as an overflow
        assert recorded == math.inf and math.isfinite(reference)
        assert (nonfinite[2], overflow[2]) == (0, 1)
        [event] = events(watcher, "overflow")
        assert event.step == 2 and event.data["params"] == ["big.weight"] and event.data["layers"] == ["big"]
        assert not events(watcher, "nonfinite")
    else:  # NaN or Inf elements: the norm is that value, stored as a value
        assert (math.isnan(recorded) if kind == "nan" else recorded == math.inf)
        assert (nonfinite[2], overflow[2]) == (1, 0)
        [event] = events(watcher, "nonfinite")
        assert event.step == 2 and event.data["params"] == ["big.weight"] and event.data["count"] == 1
        assert not events(watcher, "overflow")
    steps, totals, present = series(watcher, "grad_norm_total")
    assert present.all() and list(steps) == [0, 1, 2, 3]
    assert (math.isnan(totals[2, 0]) if kind == "nan" else totals[2, 0] >= recorded)


def test_nan_loss_is_recorded_as_nan_on_every_step():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt) as watcher:
        for step in range(30):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            if 10 <= step < 25:  # the loss goes NaN (its gradient does not: the weights stay finite)
                loss = loss + math.nan
            if step == 27:
                loss = loss + math.inf
            watcher.log(loss=loss)
        snap = watcher.snapshot()
    steps, values, present = series(watcher, "loss")
    assert list(steps) == list(range(30)) and present.all()
    assert [int(s) for s in steps[np.isnan(values[:, 0])]] == list(range(10, 25))
    assert [int(s) for s in steps[np.isinf(values[:, 0])]] == [27]
    assert math.isfinite(snap["scalars"]["loss"]) and snap["errors"] == {}


def test_snapshot_gives_nan_for_nan_and_none_for_not_measured():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt) as watcher:
        (model(torch.randn(8, 4)).sum() * math.nan).backward()
        opt.step()
        watcher.log(loss=math.nan)
        snap = watcher.snapshot()
    assert math.isnan(snap["grad_norm_total"]["before_clip"]) and math.isnan(snap["scalars"]["loss"])
    assert snap["params"]["0.weight"]["nonfinite"] is True
    assert snap["params"]["0.weight"]["param_norm"] is not None  # step 0 measures param norms
    assert snap["clip_threshold"] is None  # no threshold without norm clipping: not measured


# ------------------------------------------------------------------------------- activations


class NanAfterReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 1)
        self.poison = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.poison:
            h = h * math.nan
        return self.head(self.act(h))


def test_nan_activations_are_counted_as_nonfinite_never_as_dead_or_zero():
    model = NanAfterReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradwatch.watch(model, opt, config=EVERY_STEP) as watcher:
        for step in range(4):
            model.poison = step == 2
            model(torch.randn(5, 6)).sum().backward()
            opt.step()
            opt.zero_grad()
    assert column(watcher, "act_nonfinite", "act")[2] == 5 * 8
    assert column(watcher, "act_nonfinite", "act")[1] == 0
    assert column(watcher, "dead_ratio", "act")[2] == 0.0
    assert column(watcher, "zero_ratio", "act")[2] == 0.0
    assert math.isnan(column(watcher, "act_mean", "act")[2])


def test_act_std_is_exact_on_a_saturated_sigmoid():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 256), nn.Sigmoid(), nn.Linear(256, 1))
    with torch.no_grad():
        model[0].weight.mul_(0.01)
        model[0].bias.fill_(3.0)  # sigmoid(3 + small) ~ 0.95, spread ~1e-3
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    outputs: list[torch.Tensor] = []
    model[1].register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
    with gradwatch.watch(model, opt, config=EVERY_STEP) as watcher:
        for _ in range(3):
            model(torch.randn(64, 16)).sum().backward()
            opt.step()
            opt.zero_grad()
    std, mean = column(watcher, "act_std", "1"), column(watcher, "act_mean", "1")
    for step, y in enumerate(outputs):
        assert 0.9 < y.mean() < 0.99
        assert std[step] == pytest.approx(torch.std(y.double(), correction=0).item(), rel=1e-3)
        assert mean[step] == pytest.approx(y.double().mean().item(), rel=1e-6)


def test_act_std_over_micro_batches_is_that_of_the_whole_step():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    outputs: list[torch.Tensor] = []
    model[1].register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
    with gradwatch.watch(model, opt, config=EVERY_STEP) as watcher:
        for shift in (0.0, 2.0, -1.0):  # micro-batches whose outputs differ in mean
            model(torch.randn(16, 8) + shift).sum().backward()
        opt.step()
    whole = torch.cat(outputs).double()
    assert column(watcher, "act_std", "1")[0] == pytest.approx(torch.std(whole, correction=0).item(), rel=1e-4)
    assert column(watcher, "act_mean", "1")[0] == pytest.approx(whole.mean().item(), rel=1e-5)


# ----------------------------------------------------------------------------------- closures


def _closure_for(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                 seen: list[float]):
    """A Lightning-style closure: zero_grad, forward, backward; records the pre-clip total norm."""
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        return loss
    return closure


def test_closure_steps_measure_and_clip_the_gradients_the_step_applies():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    seen: list[float] = []
    config = {"clip": {"mode": "norm", "max_norm": 1e-4}}
    with gradwatch.watch(model, opt, config=config) as watcher:
        for _ in range(6):
            before = [p.detach().clone() for p in model.parameters()]
            opt.step(_closure_for(model, opt, torch.randn(32, 6), torch.randn(32, 1) * 10, seen))
            moved = torch.linalg.vector_norm(torch.stack([(p - b).norm() for p, b in zip(model.parameters(), before)]))
            assert moved.item() <= 1e-4 * 1.0001  # lr 1 times the clipped total norm
    steps, totals, _ = series(watcher, "grad_norm_total")
    assert list(steps) == list(range(6))
    np.testing.assert_allclose(totals[:, 0], seen, rtol=1e-5)  # this step's gradients, not the last step's
    _, clipped, _ = series(watcher, "grad_norm_total_clipped")
    np.testing.assert_allclose(clipped[:, 0], 1e-4, rtol=1e-3)


def test_closure_passed_by_keyword_is_measured_too():
    model = nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    seen: list[float] = []
    with gradwatch.watch(model, opt) as watcher:
        for _ in range(3):
            opt.step(closure=_closure_for(model, opt, torch.randn(8, 3), torch.randn(8, 1), seen))
    np.testing.assert_allclose(series(watcher, "grad_norm_total")[1][:, 0], seen, rtol=1e-5)


def test_lbfgs_clips_every_evaluation_and_records_the_last():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    seen: list[float] = []
    closure = _closure_for(model, opt, x, y, seen)
    with gradwatch.watch(model, opt, config={"clip": {"mode": "norm", "max_norm": 0.01}}) as watcher:
        for step in range(3):
            evaluated = len(seen)
            opt.step(closure)
            assert len(seen) > evaluated + 1  # LBFGS evaluated the closure several times
            after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
            assert after.item() <= 0.01 * 1.0001  # the gradients LBFGS used were clipped
    totals = dict(zip(*series(watcher, "grad_norm_total")[:2]))
    assert sorted(totals) == [0, 1, 2] and totals[2][0] == pytest.approx(seen[-1], rel=1e-5)


# ----------------------------------------------------------------------------------- wrappers


class AcceleratedLikeOptimizer(torch.optim.Optimizer):
    """Shaped like accelerate's AcceleratedOptimizer: an Optimizer subclass that never calls
    Optimizer.__init__ and steps the real optimizer it keeps as `.optimizer`."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:  # noqa: D107 - no super().__init__, on purpose
        self.optimizer = optimizer

    @property
    def param_groups(self):  # type: ignore[override]
        return self.optimizer.param_groups

    def step(self, closure=None):  # type: ignore[override]
        return self.optimizer.step(closure)


class LightningLikeOptimizer:
    """Shaped like Lightning's LightningOptimizer: not an Optimizer, the real one as `.optimizer`."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = optimizer

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    def step(self, closure=None):
        return self._optimizer.step(closure)


def test_optimizer_wrappers_are_unwrapped_and_named_in_the_header():
    model = nn.Linear(4, 2)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = LightningLikeOptimizer(AcceleratedLikeOptimizer(inner))
    with gradwatch.watch(model, wrapped) as watcher:  # type: ignore[arg-type]
        for _ in range(3):
            model(torch.randn(8, 4)).sum().backward()
            wrapped.step()
            inner.zero_grad()
    header = records(watcher)[0]
    assert isinstance(header, runlog.Header)
    assert header.info["optimizer"] == {"class": "SGD",
                                        "wrappers": ["LightningLikeOptimizer", "AcceleratedLikeOptimizer"]}
    assert list(series(watcher, "grad_norm_total")[0]) == [0, 1, 2]


def test_a_refused_watch_writes_no_run(gradwatch_home: Path):
    model = nn.Linear(4, 2)
    with pytest.raises(TypeError, match="`optimizer` must be a torch.optim.Optimizer.*Got object"):
        gradwatch.watch(model, object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invalid gradwatch config"):
        gradwatch.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), config={"clip": {"mode": "bogus"}})
    assert not list((gradwatch_home / "logs").glob("*")) if (gradwatch_home / "logs").exists() else True


# ----------------------------------------------------------------------------- micro-batches


def test_scalars_logged_per_micro_batch_are_averaged_under_their_step():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    expected = []
    with gradwatch.watch(model, opt, config={"measure": {"flush_every": 3}}) as watcher:
        for step in range(7):
            losses = []
            for _ in range(4):
                loss = model(torch.randn(8, 4)).pow(2).mean()
                (loss / 4).backward()
                watcher.log(loss=loss)  # before the step: the step in progress
                losses.append(loss.item())
            opt.step()
            opt.zero_grad()
            watcher.log(lr=0.01)  # after the step: the step just done
            expected.append(float(np.mean(losses)))
    steps, values, _ = series(watcher, "loss")
    assert list(steps) == list(range(7))
    np.testing.assert_allclose(values[:, 0], expected, rtol=1e-6)
    steps, lr, _ = series(watcher, "lr")
    assert list(steps) == list(range(7))


# --------------------------------------------------------------------- sparse, meta, dtypes


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 8, sparse=True)
        self.head = nn.Linear(8, 1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(idx).mean(dim=1))


def test_sparse_gradients_are_measured_and_clipped():
    torch.manual_seed(0)
    model = Bag()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    refs: list[float] = []
    with gradwatch.watch(model, opt, config={"clip": {"mode": "norm", "max_norm": 1e-3}}) as watcher:
        for _ in range(4):
            (model(torch.randint(0, 100, (16, 5))).sum() * 100).backward()
            refs.append(torch.linalg.vector_norm(model.embed.weight.grad.coalesce().values()).item())
            before = model.embed.weight.detach().clone()
            opt.step()
            assert (model.embed.weight - before).norm().item() <= 1e-3 * 1.0001
            opt.zero_grad()
        assert watcher.snapshot()["errors"] == {}
    norms = column(watcher, "grad_norm", "embed.weight")
    np.testing.assert_allclose([norms[s] for s in range(4)], refs, rtol=1e-5)


def test_sparse_gradients_are_clipped_by_value_too():
    torch.manual_seed(0)
    model = Bag()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with gradwatch.watch(model, opt, config={"clip": {"mode": "value", "max_value": 1e-4}}) as watcher:
        (model(torch.randint(0, 100, (16, 5))).sum() * 100).backward()
        before = model.embed.weight.detach().clone()
        opt.step()
        assert (model.embed.weight - before).abs().max().item() <= 1e-4 + 1e-6  # float32 rounding of the weights
        assert watcher.snapshot()["errors"] == {}


def test_sparse_gradients_are_refused_by_agc_which_cannot_clip_them():
    with pytest.raises(ValueError, match=r"clip mode 'agc' cannot clip the sparse gradient of embed\.weight"):
        gradwatch.watch(Bag(), torch.optim.SGD(Bag().parameters(), lr=0.1), config={"clip": {"mode": "agc"}})


def test_meta_device_models_are_refused_in_one_line(gradwatch_home: Path):
    with torch.device("meta"):
        model = nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"parameter 'weight' is on the meta device; call watch\(\) after"):
        gradwatch.watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert not (gradwatch_home / "logs").exists() or not list((gradwatch_home / "logs").iterdir())


@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64], ids=["float64", "complex64"])
def test_float64_and_complex_models_run_without_errors(dtype, caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh() if dtype.is_floating_point else nn.Identity(),
                          nn.Linear(8, 1)).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    refs = []
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        with gradwatch.watch(model, opt, config=EVERY_STEP) as watcher:
            for _ in range(5):
                model(torch.randn(4, 6, dtype=dtype)).abs().sum().backward()
                refs.append(model[0].weight.grad.norm().item())
                opt.step()
                opt.zero_grad()
            snap = watcher.snapshot()
    assert snap["errors"] == {} and not [r for r in caplog.records if r.name == "gradwatch.agent"]
    norms = column(watcher, "grad_norm", "0.weight")
    np.testing.assert_allclose([norms[s] for s in range(5)], refs, rtol=1e-5)
    if dtype == torch.float64:
        assert len(column(watcher, "act_std", "1")) == 5


def test_raise_guard_names_an_overflowed_norm_as_such():
    model = Scaled()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradwatch.watch(model, opt, config={"guards": {"nonfinite": "raise"}}) as watcher:
        model(torch.randn(8, 10)).sum().backward()
        model.big.weight.grad.fill_(1e38)
        with pytest.raises(gradwatch.GradientGuardError,
                           match=r"gradient norm overflowed float32 \(elements finite\) at step 0 in params big\.weight"):
            opt.step()
    [event] = events(watcher, "overflow")
    assert event.data["params"] == ["big.weight"] and event.data["count"] == 1


def test_accelerate_prepared_optimizer_is_watched_through_its_wrapper():
    import accelerate  # a test dependency: the real AcceleratedOptimizer, as Hugging Face's Trainer makes it

    accelerator = accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    model, opt = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
    refs = []
    with gradwatch.watch(model, opt, config={"clip": {"mode": "norm", "max_norm": 1e-3}}) as watcher:
        for _ in range(3):
            accelerator.backward(model(torch.randn(8, 4)).pow(2).mean() * 100)
            refs.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())
            opt.step()
            opt.zero_grad()
        assert watcher.snapshot()["errors"] == {}
    header = records(watcher)[0]
    assert isinstance(header, runlog.Header)
    assert header.info["optimizer"] == {"class": "SGD", "wrappers": ["AcceleratedOptimizer"]}
    np.testing.assert_allclose(series(watcher, "grad_norm_total")[1][:, 0], refs, rtol=1e-5)
    np.testing.assert_allclose(series(watcher, "grad_norm_total_clipped")[1][:, 0], 1e-3, rtol=1e-3)


# ------------------------------------------------------------------------------ torch.compile


LAYER_METRICS = ("act_grad_norm", "act_mean", "act_std", "act_nonfinite", "saturation_ratio", "dead_ratio",
                 "zero_ratio")


def _compiled_run(backend: str | None, watched: bool) -> tuple[dict[str, int], int, gradwatch.Watcher | None]:
    """12 steps of 2 micro-batches each of an MLP with ReLU and tanh, compiled with `backend`
    (None: eager); returns dynamo's stats, its graph breaks and the (closed) watcher."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled = torch.compile(model, backend=backend) if backend else model
    watcher = gradwatch.watch(compiled, opt, config={"measure": {"activation_every": 2}}) if watched else None
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):
        for _ in range(2):
            loss = compiled(torch.randn(8, 16, generator=gen)).sum()
            loss.backward()
            if watcher is not None:
                watcher.log(loss=loss)
        with torch.no_grad():
            compiled(torch.randn(4, 16, generator=gen))  # an evaluation pass: not measured, no recompile
        opt.step()
        opt.zero_grad()
    if watcher is not None:
        watcher.close()
    return dict(counters["stats"]), sum(counters["graph_break"].values()), watcher


# "eager" captures the graph only; "aot_eager" traces the backward too, as inductor does (which
# would compile C++ here for minutes on a 2-core machine and adds nothing to what is tested).
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_compiled_model_gets_no_extra_graph_and_the_eager_measurements(backend):
    bare_stats, bare_breaks, _ = _compiled_run(backend, watched=False)
    stats, breaks, watcher = _compiled_run(backend, watched=True)
    assert (stats.get("unique_graphs"), breaks) == (bare_stats.get("unique_graphs"), bare_breaks)
    assert watcher is not None and watcher.errors == {}
    header = records(watcher)[0]
    assert isinstance(header, runlog.Header) and header.info["model"]["wrappers"] == ["OptimizedModule"]
    assert [p["name"] for p in header.info["params"]][0] == "0.weight"  # no `_orig_mod.` prefix
    _, _, eager = _compiled_run(None, watched=True)
    assert eager is not None
    for metric in ("grad_norm", "grad_norm_total", "loss") + LAYER_METRICS:
        e_steps, e_values, e_present = series(eager, metric)
        c_steps, c_values, c_present = series(watcher, metric)
        assert list(c_steps) == list(e_steps) and (c_present == e_present).all(), metric
        np.testing.assert_allclose(c_values[c_present], e_values[e_present], rtol=1e-5, atol=1e-7, err_msg=metric)
    assert list(series(watcher, "act_mean")[0]) == list(range(0, 12, 2))  # activation_every: 2


def test_a_model_compiled_in_place_files_log_calls_and_activations_under_their_step():
    """`model.compile()` traces the watcher's root pre-hook too: the start of each forward pass
    reaches the watcher through the graph's op, so a `log()` before `optimizer.step()` files under
    the step in progress, as in eager mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.compile(backend="eager")
    with gradwatch.watch(model, opt, config={"measure": {"activation_every": 1}}) as watcher:
        for step in range(4):
            model(torch.randn(8, 16)).sum().backward()
            watcher.log(loss=float(step))
            opt.step()
            opt.zero_grad()
    assert watcher.errors == {}
    steps, values, _ = series(watcher, "loss")
    assert list(steps) == [0, 1, 2, 3] and list(values[:, 0]) == [0.0, 1.0, 2.0, 3.0]
    assert list(series(watcher, "dead_ratio")[0]) == [0, 1, 2, 3]
    assert list(series(watcher, "act_grad_norm")[0]) == [0, 1, 2, 3]


def test_hugging_face_conv1d_is_a_weighted_layer_of_the_init_check():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    activations = pytest.importorskip("transformers.activations")
    torch.manual_seed(0)
    model = nn.Sequential(pytorch_utils.Conv1D(48, 16), activations.NewGELUActivation(), pytorch_utils.Conv1D(16, 48))
    with torch.no_grad():
        model[0].weight.normal_(0.0, 0.02)  # GPT-2's init
    with gradwatch.watch(model, torch.optim.SGD(model.parameters(), lr=0.1)) as watcher:
        checks = {c["layer"]: c for c in watcher.init_check}
    assert set(checks) == {"0", "2"}
    assert (checks["0"]["fan_in"], checks["0"]["fan_out"]) == (16, 48)  # weight (in, out) = (16, 48)
    assert checks["0"]["std"] == pytest.approx(model[0].weight.std().item())
    assert checks["0"]["activation"] == "NewGELUActivation" and checks["0"]["recommended"] == "he"
    assert [layer.family for layer in watcher.layers] == [None, "smooth", None]  # HF's GELU is measured


def test_param_norms_and_update_ratios_of_huge_weights_are_exact():
    """Weights of 1e21 have a finite norm (their float32 sum of squares overflows): recorded as it is."""
    model = nn.Linear(10, 10)
    with torch.no_grad():
        model.weight.fill_(1e21)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with gradwatch.watch(model, opt, config=EVERY_STEP) as watcher:
        model(torch.randn(4, 10)).sum().backward()
        before = model.weight.detach().double().clone()
        model.weight.grad.fill_(1e19)
        opt.step()
    norm = torch.linalg.vector_norm(model.weight.detach().double()).item()
    update = torch.linalg.vector_norm(model.weight.detach().double() - before).item()
    assert column(watcher, "param_norm", "weight")[0] == pytest.approx(norm, rel=1e-6)
    assert column(watcher, "update_ratio", "weight")[0] == pytest.approx(update / norm, rel=1e-5)



# ------------------------------------------------------------------------------ review fixes


def test_a_flush_between_micro_batches_leaves_the_step_in_progress_whole():
    """Unit 0 fires only in the first micro-batch and unit 1 only in the second: no unit is dead
    over the step, even when a flush (here a snapshot(); a time-based flush at the second forward
    pass does the same) comes between the two micro-batches."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gradwatch.watch(model, opt, config={"measure": {"activation_every": 1}}) as watcher:
        for step in range(3):
            for x in ([[1.0, -1.0]], [[-1.0, 1.0]]):
                model(torch.tensor(x)).sum().backward()
                watcher.snapshot()
            opt.step()
            opt.zero_grad()
    steps, values, present = series(watcher, "dead_ratio")
    assert list(steps) == [0, 1, 2] and present.all()
    assert list(values[:, 0]) == [0.0, 0.0, 0.0]
    assert list(series(watcher, "zero_ratio")[1][:, 0]) == [0.5, 0.5, 0.5]


def test_a_second_log_for_a_step_is_filed_under_that_step():
    """Two `log()` calls for one step, 20 ms apart: both within max_flush_interval/2 of the step,
    so neither a hook nor the idle flusher sends the step between them."""
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    config = {"measure": {"flush_every": 4, "max_flush_interval": 2.0}}
    with gradwatch.watch(model, opt, config=config) as watcher:
        for step in range(9):
            model(torch.randn(8, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
            watcher.log(loss=float(step))
            time.sleep(0.02)
            watcher.log(acc=100.0 + step)
        assert watcher.errors == {}
    for name, offset in (("loss", 0.0), ("acc", 100.0)):
        steps, values, _ = series(watcher, name)
        assert list(steps) == list(range(9)) and list(values[:, 0]) == [offset + s for s in range(9)]


class AmpLike:
    """The parts of torch.amp.GradScaler the agent reads: `update()` replaces the per-optimizer
    state, and `step()` skips the optimizer when told to (as on inf/NaN gradients)."""

    def __init__(self) -> None:
        self._per_optimizer_states: dict = {}
        self._scale = torch.tensor(1.0)

    def step(self, optimizer: torch.optim.Optimizer, skip: bool) -> None:
        if not skip:
            optimizer.step()

    def update(self) -> None:
        self._per_optimizer_states = {}


def test_amp_skips_are_told_apart_from_micro_batch_logs():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = AmpLike()
    with gradwatch.watch(model, opt, scaler=scaler) as watcher:
        for iteration in range(4):
            for _ in range(3):
                loss = model(torch.randn(8, 4)).pow(2).mean()
                loss.backward()
                watcher.log(loss=loss)  # per micro-batch, before the step
            scaler.step(opt, skip=iteration == 1)
            scaler.update()
            opt.zero_grad()
    assert watcher.step == 4
    steps, skipped, _ = series(watcher, "skipped")
    assert list(steps) == [0, 1, 2, 3] and list(skipped[:, 0]) == [0, 1, 0, 0]
    assert list(series(watcher, "loss")[0]) == [0, 1, 2, 3]


def test_micro_batch_logs_under_torch_compile_are_filed_under_their_step():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(compiled, opt) as watcher:
        for step in range(3):
            for micro in range(2):
                compiled(torch.randn(8, 4)).sum().backward()
                watcher.log(loss=10.0 * step + micro)
            opt.step()
            opt.zero_grad()
    steps, values, _ = series(watcher, "loss")
    assert list(steps) == [0, 1, 2] and list(values[:, 0]) == [0.5, 10.5, 20.5]


def test_a_failed_step_is_not_measured_rather_than_stale():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, config={"clip": {"mode": "norm", "max_norm": 0.01}}) as watcher:
        for step in range(4):
            model(torch.randn(8, 4)).sum().backward()
            if step >= 2:
                watcher._clipper = None  # noqa: SLF001 - then make the measurement itself fail
                watcher._norm_kwargs = {"dtype": "not a dtype"}  # noqa: SLF001
            opt.step()
            opt.zero_grad()
    steps, _, _ = series(watcher, "clip_coef")
    assert list(steps) == [0, 1]  # steps 2 and 3 failed: not measured, not step 0's and 1's values


def test_a_learning_rate_that_is_nan_is_a_value_and_none_is_not_measured():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias]}], lr=0.01)
    with gradwatch.watch(model, opt) as watcher:
        for step in range(3):
            opt.param_groups[0]["lr"] = math.nan if step == 1 else 0.01
            model(torch.randn(8, 4)).sum().backward()
            opt.param_groups[1]["lr"] = None if step == 2 else 0.01  # as Adafactor's relative step
            opt.step() if step != 2 else watcher._on_step_pre(opt, (opt,), {})  # noqa: SLF001
            opt.zero_grad()
            if step == 2:
                watcher._on_step_post(opt, (opt,), {})  # noqa: SLF001
        assert watcher.errors == {}
    steps, lr, present = series(watcher, "lr")
    assert math.isnan(lr[1, 0]) and present[1, 0]
    assert not present[2, 1] and present[2, 0]
    assert list(series(watcher, "grad_norm_total")[0]) == [0, 1, 2]  # measured although lr is None


def test_lightning_style_optimizer_subclass_is_unwrapped():
    model = nn.Linear(4, 1)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)

    class LightningOptimizer:  # as lightning's: a dynamic subclass of the real class, sharing its state
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self.__dict__ = {k: v for k, v in optimizer.__dict__.items() if k not in ("step", "__del__")}
            self.__class__ = type("Lightning" + type(optimizer).__name__, (type(self), type(optimizer)), {})
            self._optimizer = optimizer

    wrapped = LightningOptimizer(inner)
    with gradwatch.watch(model, wrapped) as watcher:  # type: ignore[arg-type]
        with pytest.raises(gradwatch.AlreadyWatched):
            gradwatch.watch(nn.Linear(1, 1), inner)
    header = records(watcher)[0]
    assert isinstance(header, runlog.Header) and header.info["optimizer"]["class"] == "SGD"
    assert header.info["optimizer"]["wrappers"] == ["LightningSGD"]
