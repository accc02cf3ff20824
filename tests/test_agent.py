"""The agent against reference computations, on the training setups it must support."""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.agent import runlog
from gradwatch.agent.clipping import norm_kwargs
from gradwatch.agent.config import ConfigError
from tests.agent_models import MODELS, batch_for, mlp, train


def _reference_norms(model: nn.Module) -> dict[str, float]:
    return {name: float(p.grad.norm()) for name, p in model.named_parameters() if p.grad is not None}


def _records(watcher: gradwatch.Watcher) -> list[runlog.Record]:
    return runlog.read_log(watcher.path)


def _series(records: list[runlog.Record], metric: str) -> tuple[np.ndarray, np.ndarray]:
    blocks = [b for r in records if isinstance(r, runlog.Frame) for b in r.blocks if b.metric.name == metric]
    return np.concatenate([b.steps for b in blocks]), np.concatenate([np.where(b.present, b.values, np.nan) for b in blocks])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_grad_norms_match_reference_at_every_step(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    reference: list[dict[str, float]] = []
    with gradwatch.watch(model, opt, run=name, config={"measure": {"flush_every": 4}}) as watcher:
        train(model, opt, name, steps=10, watcher=watcher, after_backward=lambda: reference.append(_reference_norms(model)))
        snap = watcher.snapshot()
    assert snap["errors"] == {} and snap["steps"] == 10
    params = [p["name"] for p in _records(watcher)[0].info["params"]]
    steps, values = _series(_records(watcher), "grad_norm")
    np.testing.assert_array_equal(steps, np.arange(10))
    for step, ref in enumerate(reference):
        expected = [ref.get(p, math.nan) for p in params]
        np.testing.assert_allclose(values[step], expected, rtol=1e-5, atol=1e-7, equal_nan=True)
    _, totals = _series(_records(watcher), "grad_norm_total")
    expected_totals = [math.sqrt(sum(v * v for v in ref.values())) for ref in reference]
    np.testing.assert_allclose(totals[:, 0], expected_totals, rtol=1e-5)
    last = reference[-1]
    for pname, entry in snap["params"].items():
        if pname in last:
            assert entry["grad_norm"] == pytest.approx(last[pname], rel=1e-5)
        else:
            assert entry["grad_norm"] is None  # frozen or unused: no gradient


@pytest.mark.parametrize("name", ["mlp", "cnn", "lstm", "transformer"])
@pytest.mark.parametrize("clip", [{"mode": "norm", "max_norm": 0.05}, {"mode": "value", "max_value": 0.01}],
                         ids=["norm", "value"])
def test_clipping_trains_exactly_like_torch(name, clip):
    torch.manual_seed(1)
    watched = MODELS[name]()
    bare = copy.deepcopy(watched)
    opt_w = torch.optim.SGD(watched.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(bare.parameters(), lr=0.1)

    def torch_clip() -> None:
        if clip["mode"] == "norm":
            torch.nn.utils.clip_grad_norm_(bare.parameters(), clip["max_norm"])
        else:
            torch.nn.utils.clip_grad_value_(bare.parameters(), clip["max_value"])

    with gradwatch.watch(watched, opt_w, config={"clip": clip}) as watcher:
        train(watched, opt_w, name, steps=6, watcher=watcher)
        snap = watcher.snapshot()
    train(bare, opt_b, name, steps=6, after_backward=torch_clip)
    for (n, pw), pb in zip(watched.named_parameters(), bare.parameters()):
        torch.testing.assert_close(pw, pb, rtol=1e-5, atol=1e-6, msg=n)
    before, after = snap["grad_norm_total"]["before_clip"], snap["grad_norm_total"]["after_clip"]
    assert after < before
    if clip["mode"] == "norm":
        assert after == pytest.approx(clip["max_norm"], rel=1e-4)
        assert snap["clip_coef"] == pytest.approx(after / before, rel=1e-4)


def test_gradient_accumulation_is_measured_once_per_optimizer_step():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    with gradwatch.watch(model, opt, config={"measure": {"activation_every": 1}}) as watcher:
        for _ in range(3):
            for _ in range(4):  # four micro-batches per step
                x, y = batch_for("mlp", gen)
                (nn.functional.cross_entropy(model(x), y) / 4).backward()
            expected = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in model.parameters()))
            opt.step()
            opt.zero_grad()
            watcher.log(loss=1.0)
        snap = watcher.snapshot()
    assert snap["steps"] == 3
    assert snap["grad_norm_total"]["before_clip"] == pytest.approx(expected, rel=1e-5)
    steps, _ = _series(_records(watcher), "act_mean")
    np.testing.assert_array_equal(steps, [0, 1, 2])


def test_several_param_groups_record_each_learning_rate():
    model = mlp()
    opt = torch.optim.Adam([{"params": model[0].parameters(), "lr": 1e-3},
                            {"params": list(model[2].parameters()) + list(model[4].parameters()), "lr": 5e-4}])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with gradwatch.watch(model, opt) as watcher:
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            x, y = batch_for("mlp", gen)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            sched.step()
    records = _records(watcher)
    assert [g["index"] for g in records[0].info["groups"]] == [0, 1]
    _, lrs = _series(records, "lr")
    np.testing.assert_allclose(lrs, [[1e-3, 5e-4], [5e-4, 2.5e-4], [2.5e-4, 1.25e-4]], rtol=1e-6)


def _cpu_scaler(init_scale: float):
    if not hasattr(torch, "amp") or not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler needs torch >= 2.3")
    try:
        return torch.amp.GradScaler("cpu", init_scale=init_scale)
    except (TypeError, RuntimeError) as exc:
        pytest.skip(f"no CPU GradScaler in this torch: {exc}")


def test_amp_grad_scaler_norms_are_unscaled_and_skipped_steps_recorded():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = _cpu_scaler(init_scale=2.0 ** 10)
    gen = torch.Generator().manual_seed(0)
    with gradwatch.watch(model, opt, scaler=scaler, config={"measure": {"activation_every": 1}}) as watcher:
        for i in range(3):
            x, y = batch_for("mlp", gen)
            loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss * (1e38 if i == 1 else 1.0)).backward()  # step 1 overflows: the scaler skips it
            scaler.unscale_(opt)
            expected = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in model.parameters()))
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            watcher.log(loss=loss)
        snap = watcher.snapshot()
    assert snap["grad_norm_total"]["before_clip"] == pytest.approx(expected, rel=1e-5)
    assert snap["errors"] == {}
    records = _records(watcher)
    steps, skipped = _series(records, "skipped")
    np.testing.assert_array_equal(steps, [0, 1, 2])
    np.testing.assert_array_equal(skipped[:, 0], [0, 1, 0])
    # The skipped step's activations were staged but belong to no applied step: not reported.
    steps, _ = _series(records, "act_grad_norm")
    np.testing.assert_array_equal(steps, [0, 2])


def test_amp_activation_gradient_norms_are_unscaled():
    """The output gradients carry the loss scale; act_grad_norm is of the loss's own gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = _cpu_scaler(init_scale=2.0 ** 10)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    seen: list[torch.Tensor] = []
    with gradwatch.watch(model, opt, scaler=scaler, config={"measure": {"activation_every": 1}}) as watcher:
        for _ in range(2):
            logits = model(x)
            logits.register_hook(lambda g: seen.append(g.clone()))
            scaler.scale(nn.functional.cross_entropy(logits, y)).backward()
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            watcher.log()
        snap = watcher.snapshot()
    assert snap["errors"] == {}
    assert snap["layers"]["2"]["act_grad_norm"] == pytest.approx(float(seen[-1].norm()) / scale, rel=1e-5)


def test_amp_skip_of_the_first_iteration_is_recorded():
    """fp16's default scale often overflows at once: the first iterations' skips must count too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = _cpu_scaler(init_scale=2.0 ** 16)
    with gradwatch.watch(model, opt, scaler=scaler) as watcher:
        for i in range(4):
            x = torch.randn(16, 8)
            if i < 2:
                x[0, 0] = float("inf")  # iterations 0 and 1 overflow: the scaler skips their steps
            scaler.scale(model(x).pow(2).mean()).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            watcher.log(iteration=float(i))
    records = _records(watcher)
    steps, skipped = _series(records, "skipped")
    np.testing.assert_array_equal(steps, [0, 1, 2, 3])
    np.testing.assert_array_equal(skipped[:, 0], [1, 1, 0, 0])
    steps, iteration = _series(records, "iteration")
    np.testing.assert_array_equal(steps, [0, 1, 2, 3])
    np.testing.assert_array_equal(iteration[:, 0], [0, 1, 2, 3])


def test_bf16_autocast_saturation_is_judged_in_float32():
    """bfloat16 sigmoid outputs near 0.01: |y - 0.5| rounded to bfloat16 would miss the threshold."""
    model = nn.Sequential(nn.Linear(1, 64), nn.Sigmoid(), nn.Linear(64, 1))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.linspace(-5.0, -4.5, 64))  # sigmoid 0.0067 to 0.011, around eps = 0.01
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    outputs: list[torch.Tensor] = []
    model[1].register_forward_hook(lambda module, args, out: outputs.append(out.detach()))
    config = {"measure": {"activation_every": 1, "saturation_eps": 0.01}}
    with gradwatch.watch(model, opt, config=config) as watcher:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(torch.ones(4, 1)).float().pow(2).mean()
        loss.backward()
        opt.step()
        watcher.log()
        snap = watcher.snapshot()
    assert outputs[0].dtype == torch.bfloat16
    y = outputs[0].float()
    expected = ((y < 0.01) | (y > 0.99)).double().mean().item()
    assert snap["layers"]["1"]["saturation_ratio"] == pytest.approx(expected, abs=1e-6)


def test_half_precision_params_norm_in_float32():
    """A finite fp16 gradient whose norm is above fp16's range (65504) is not non-finite."""
    if not norm_kwargs([torch.zeros(1, dtype=torch.float16)]):
        pytest.skip("torch._foreach_norm takes no dtype in this torch")
    model = nn.Linear(100, 100, bias=False).half()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    with gradwatch.watch(model, opt, config={"guards": {"nonfinite": "skip"}}) as watcher:
        (model(torch.ones(1, 100, dtype=torch.float16)).float() * 1000.0).sum().backward()
        expected = model.weight.grad.double().norm().item()  # every element 1000: norm 1e5
        before = model.weight.detach().clone()
        opt.step()
        watcher.log()
        snap = watcher.snapshot()
    assert snap["params"]["weight"]["grad_norm"] == pytest.approx(expected, rel=1e-3)
    assert snap["nonfinite_params"] == 0 and snap["skipped"] == 0
    assert not torch.equal(model.weight.detach(), before)


def test_frozen_params_are_not_reported_non_finite():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.watch(model, opt) as watcher:
        model(torch.randn(16, 8)).pow(2).mean().backward()
        opt.step()
        watcher.log()
        snap = watcher.snapshot()
    assert snap["params"]["0.weight"]["grad_norm"] is None and snap["params"]["0.weight"]["nonfinite"] is False
    assert snap["params"]["2.weight"]["nonfinite"] is False and snap["nonfinite_params"] == 0


def test_param_group_added_after_attach_keeps_the_rest_measured():
    """Progressive unfreezing: the new group's params are not in the run's table, the others stay measured."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model[2].parameters(), lr=0.05)
    with gradwatch.watch(model, opt) as watcher:
        for step in range(4):
            if step == 2:
                opt.add_param_group({"params": model[0].parameters(), "lr": 0.01})
            model(torch.randn(16, 8)).pow(2).mean().backward()
            expected = float(model[2].weight.grad.norm())
            opt.step()
            opt.zero_grad()
            watcher.log()
            snap = watcher.snapshot()
            assert snap["params"]["2.weight"]["grad_norm"] == pytest.approx(expected, rel=1e-5)
            assert snap["errors"] == {} and snap["nonfinite_params"] == 0


class _LastHidden(nn.Module):
    """The usual RNN classifier: the head reads the final hidden state h_n, not the sequence output."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn, self.head = rnn, nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.rnn(x)
        h = h[0] if isinstance(h, tuple) else h
        return self.head(h[-1])


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
def test_rnn_output_gradient_includes_the_final_hidden_state(rnn):
    """act_grad_norm is the norm of the gradient w.r.t. all of a layer's outputs (out, h_n, c_n)."""
    torch.manual_seed(0)
    model = _LastHidden(rnn(5, 8, batch_first=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: list[torch.Tensor] = []

    def capture(module: nn.Module, args: tuple, out: tuple) -> None:
        for t in [out[0], *(out[1] if isinstance(out[1], tuple) else (out[1],))]:
            t.register_hook(seen.append)

    model.rnn.register_forward_hook(capture)
    with gradwatch.watch(model, opt, config={"measure": {"activation_every": 1}}) as watcher:
        model(torch.randn(4, 6, 5)).pow(2).mean().backward()
        opt.step()
        watcher.log()
        snap = watcher.snapshot()
    expected = math.sqrt(sum(float(g.norm()) ** 2 for g in seen))
    assert expected > 0 and snap["layers"]["rnn"]["act_grad_norm"] == pytest.approx(expected, rel=1e-5)

def test_run_log_header_describes_the_run(gradwatch_home):
    model = MODELS["lstm"]()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, run="tagger", config={"project": "nlp"}) as watcher:
        train(model, opt, "lstm", steps=2, watcher=watcher)
    assert watcher.path.parent == gradwatch_home / "logs"
    records = _records(watcher)
    header, close = records[0], records[-1]
    info = header.info
    assert info["name"] == "tagger" and info["project"] == "nlp" and info["rank"] == 0 and info["world_size"] == 1
    assert info["torch_version"] == torch.__version__
    assert [p["name"] for p in info["params"]] == [n for n, _ in model.named_parameters()]
    assert {l["type"] for l in info["layers"]} >= {"Embedding", "LSTM", "Linear"}
    rnn = next(l for l in info["layers"] if l["type"] == "LSTM")
    assert rnn["family"] == "bounded"  # tanh-bounded hidden states: saturation applies
    assert {c["param"] for c in info["init_check"]} >= {"rnn.weight_ih_l0", "rnn.weight_hh_l1", "head.weight"}
    assert isinstance(close, runlog.Close) and close.step == 2 and close.stats["errors"] == {}
    names = [m.name for m in header.metrics]
    assert {"grad_norm", "grad_norm_total", "grad_norm_total_clipped", "act_grad_norm", "saturation_ratio"} <= set(names)


def test_init_check_compares_std_with_glorot_he_and_lecun():
    model = nn.Sequential(nn.Linear(100, 50), nn.ReLU(), nn.Linear(50, 50), nn.Sigmoid(), nn.Linear(50, 10))
    nn.init.kaiming_normal_(model[0].weight, nonlinearity="relu")
    nn.init.normal_(model[2].weight, 0.0, 1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt) as watcher:
        check = {c["param"]: c for c in watcher.snapshot()["init_check"]}
    first, second = check["0.weight"], check["2.weight"]
    assert first["recommended"] == "he" and first["activation"] == "ReLU" and first["verdict"] == "ok"
    assert first["expected"]["he"] == pytest.approx(math.sqrt(2 / 100))
    assert second["recommended"] == "glorot" and second["verdict"] == "too_large"
    assert second["ratio"] == pytest.approx(float(model[2].weight.detach().std()) / math.sqrt(2 / 100), rel=1e-5)
    assert check["4.weight"]["activation"] is None


def test_second_attach_is_refused_with_a_clear_error():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt):
        with pytest.raises(RuntimeError, match="already watching this model"):
            gradwatch.watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    gradwatch.watch(model, opt).close()  # allowed again once closed


@pytest.mark.parametrize("config, message", [
    ({"clip": {"mode": "norm"}}, "needs max_norm"),
    ({"clip": {"mode": "nope"}}, "clip.mode"),
    ({"measure": {"flush_every": 0}}, "measure.flush_every"),
    ({"measure": {"flush_every": 10**12}}, r"measure.flush_every: Input should be less than or equal to 10000"),
    ({"measure": {"flush_every": 10**6}}, "measure.flush_every"),
    ({"measure": {"max_flush_interval": 0}}, "measure.max_flush_interval"),
    ({"clip": {"mode": "auto_percentile", "history": 10**12}}, "clip.history"),
    ({"clip": {"mode": "norm", "max_norm": True}}, r"clip.max_norm: Value error, must be a number, not a boolean"),
    ({"queue_size": 10**9}, "queue_size"),
], ids=["missing-threshold", "unknown-mode", "bad-interval", "huge-window", "large-window", "zero-flush-interval",
        "huge-history", "bool-threshold", "huge-queue"])
def test_bad_config_is_one_clear_error(config, message):
    model = mlp()
    with pytest.raises(ConfigError, match=message):
        gradwatch.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), config=config)


def test_config_from_toml_file(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text('project = "vision"\n[clip]\nmode = "norm"\nmax_norm = 2.0\n[measure]\nflush_every = 7\n')
    model = mlp()
    with gradwatch.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), config=path) as watcher:
        assert watcher.config.clip.max_norm == 2.0 and watcher.config.measure.flush_every == 7
        assert watcher.config.project == "vision"


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00binary", r"gradwatch config .*gw.toml is not valid TOML: not UTF-8 text"),
    (b"[clip]\nmode = 'norm'\nmax_norm = true\n", r"invalid gradwatch config .*gw.toml at clip.max_norm: .*boolean"),
    (b"[clip\n", r"gradwatch config .*gw.toml is not valid TOML"),
], ids=["binary", "bool", "syntax"])
def test_bad_config_file_is_one_error_naming_file_and_field(tmp_path, content, message):
    path = tmp_path / "gw.toml"
    path.write_bytes(content)
    model = mlp()
    with pytest.raises(ConfigError, match=message):
        gradwatch.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), config=path)


def test_slow_steps_reach_the_log_within_the_flush_interval():
    """At a step every 50 ms and `max_flush_interval` 10 ms, each step is in the log as soon as the
    next forward pass starts (here an evaluation), not `flush_every` (here 1000) steps later."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    config = {"measure": {"flush_every": 1000, "max_flush_interval": 0.01}}
    with gradwatch.watch(model, opt, config=config) as watcher:
        for step in range(3):
            time.sleep(0.05)  # a slow step: longer than max_flush_interval since the last flush
            train(model, opt, "mlp", steps=1, watcher=watcher)
            with torch.no_grad():
                model(torch.randn(2, 12))
            deadline = time.monotonic() + 30  # only guards against a hang; nothing is asserted on time
            while _logged_steps(watcher) != list(range(step + 1)) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _logged_steps(watcher) == list(range(step + 1))


def test_an_idle_loop_sends_its_finished_step_without_another_hook():
    """A step, its log() call, then nothing (a long evaluation off the model, a checkpoint): the idle
    flusher sends the finished step with its loss about max_flush_interval/2 later."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.watch(model, opt, config={"measure": {"flush_every": 1000, "max_flush_interval": 0.05}}) as watcher:
        train(model, opt, "mlp", steps=2, watcher=watcher)
        deadline = time.monotonic() + 30  # only guards against a hang; nothing is asserted on time
        while _logged_steps(watcher) != [0, 1] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _logged_steps(watcher) == [0, 1]
        assert watcher.errors["late_scalar"] == 0


def test_scalars_racing_the_idle_flusher_are_filed_or_counted_never_lost():
    """With a 5 ms grace, log() calls at random delays after the step race the flusher thread: each
    value is either in the log under its step, exactly, or refused and counted as late."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rng = np.random.default_rng(0)
    steps = 200
    with gradwatch.watch(model, opt, config={"measure": {"flush_every": 7, "max_flush_interval": 0.01}}) as watcher:
        for step in range(steps):
            loss = model(torch.randn(4, 12)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            time.sleep(float(rng.choice([0.0, 0.002, 0.004, 0.006, 0.008])))
            watcher.log(loss=float(step))
        late = watcher.errors["late_scalar"]
    values = {int(s): float(v) for r in runlog.read_log(watcher.path) if isinstance(r, runlog.Frame)
              for b in r.blocks if b.metric.name == "loss" for s, v, p in zip(b.steps, b.values[:, 0], b.present[:, 0])
              if p}
    assert all(v == s for s, v in values.items())
    assert len(values) + late == steps


def _logged_steps(watcher: gradwatch.Watcher) -> list[int]:
    blocks = [b for r in runlog.read_log(watcher.path) if isinstance(r, runlog.Frame) for b in r.blocks
              if b.metric.name == "loss"]
    return [int(s) for b in blocks for s in b.steps]


@pytest.mark.parametrize("run_id", ["../../escaped", "sub/dir", "x" * 300, ".hidden", "a b", "new\nline"],
                         ids=["parent", "subdir", "too-long", "dot-first", "space", "newline"])
def test_a_bad_gradwatch_run_id_is_refused_and_writes_nothing(run_id, monkeypatch, gradwatch_home):
    monkeypatch.setenv("GRADWATCH_RUN_ID", run_id)
    model = mlp()
    with pytest.raises(ValueError, match="GRADWATCH_RUN_ID must be 1-64 letters, digits"):
        gradwatch.watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert not gradwatch_home.exists() or not any(gradwatch_home.rglob("*.gwlog"))
    assert not any(gradwatch_home.parent.rglob("escaped*"))


def test_a_good_gradwatch_run_id_names_the_log(monkeypatch):
    monkeypatch.setenv("GRADWATCH_RUN_ID", "exp-7.seed_1")
    model = mlp()
    with gradwatch.watch(model, torch.optim.SGD(model.parameters(), lr=0.1)) as watcher:
        assert watcher.run_id == "exp-7.seed_1" and watcher.path.name == "exp-7.seed_1.rank0.gwlog"
