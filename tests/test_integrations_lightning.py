"""The Lightning callback on a real `lightning.Trainer` (CPU, tiny model, a few steps), against
a plain-torch loop over the same batches: norms, the clipping it takes over, accumulation,
the loss, the run name, multiple optimizers, and closing on failures."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradwatch.agent import runlog

L = pytest.importorskip("lightning")
from gradwatch.integrations.lightning import GradwatchCallback  # noqa: E402

EVERY_STEP = {"measure": {"flush_every": 4, "param_every": 1, "update_ratio_every": 1, "activation_every": 1}}
BATCH, BATCHES = 4, 8


def series(path: Path, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a run-scope metric in a run log."""
    blocks = [b for r in runlog.read_log(path) if isinstance(r, runlog.Frame) for b in r.blocks
              if b.metric.name == metric]
    assert blocks, f"{metric} not in {path}"
    return np.concatenate([b.steps for b in blocks]), np.concatenate([b.values[:, 0] for b in blocks])


def header(path: Path) -> dict:
    first = runlog.read_log(path)[0]
    assert isinstance(first, runlog.Header)
    return first.info


class Regressor(L.LightningModule):
    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        self.fail_at = fail_at

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if batch_idx == self.fail_at:
            raise RuntimeError("boom")
        x, y = batch
        return (self.net(x) - y).pow(2).mean() * 10

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(BATCH * BATCHES, 4, generator=g), torch.randn(BATCH * BATCHES, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


def trainer(tmp_path: Path, callback: L.Callback, **kwargs) -> L.Trainer:
    return L.Trainer(callbacks=[callback], accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1, **kwargs)


def plain_reference(module: Regressor, accumulate: int, clip: str | None, threshold: float
                    ) -> tuple[list[float], list[float], nn.Module]:
    """The same training as plain torch: (pre-clip total norm, mean micro-batch loss) per step, final net."""
    net = copy.deepcopy(module.net)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    norms, losses, micro = [], [], []
    for i, (x, y) in enumerate(data()):
        loss = (net(x) - y).pow(2).mean() * 10
        (loss / accumulate).backward()
        micro.append(loss.item())
        if (i + 1) % accumulate:
            continue
        grads = [p.grad for p in net.parameters()]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        losses.append(float(np.mean(micro)))
        micro = []
        if clip == "norm":
            torch.nn.utils.clip_grad_norm_(net.parameters(), threshold)
        elif clip == "value":
            torch.nn.utils.clip_grad_value_(net.parameters(), threshold)
        opt.step()
        opt.zero_grad()
    return norms, losses, net


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_norms_equal_a_plain_reference_and_the_clip_bounds_the_update(tmp_path, algorithm):
    module = Regressor()
    reference_norms, reference_losses, reference_net = plain_reference(module, 2, algorithm, 0.5)
    callback = GradwatchCallback(config=EVERY_STEP)
    fit = trainer(tmp_path, callback, max_epochs=1, accumulate_grad_batches=2, gradient_clip_val=0.5,
                  gradient_clip_algorithm=algorithm)
    fit.fit(module, data())

    [watcher] = callback.watchers
    steps, norms = series(watcher.path, "grad_norm_total")
    assert steps.tolist() == [0, 1, 2, 3]  # 8 batches accumulated by 2: one measurement per optimizer step
    np.testing.assert_allclose(norms, reference_norms, rtol=1e-5)
    np.testing.assert_allclose(series(watcher.path, "loss")[1], reference_losses, rtol=1e-5)
    for p, q in zip(module.net.parameters(), reference_net.parameters()):  # the update is the clipped one
        torch.testing.assert_close(p, q)
    clipped = series(watcher.path, "grad_norm_total_clipped")[1]
    if algorithm == "norm":
        np.testing.assert_allclose(clipped, 0.5, rtol=1e-5)
    else:
        assert (clipped < norms).all()
    info = header(watcher.path)
    assert info["config"]["clip"]["mode"] == algorithm and info["name"] == "lightning_logs/version_0"
    assert [p["name"] for p in info["params"]] == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    np.testing.assert_allclose(series(watcher.path, "lr")[1], 0.05)
    assert fit.gradient_clip_val == 0.5  # handed back after the fit
    assert isinstance(runlog.read_log(watcher.path)[-1], runlog.Close)


def test_without_clipping_the_norms_are_those_the_optimizer_applies(tmp_path):
    module = Regressor()
    reference_norms, _, reference_net = plain_reference(module, 1, None, 0.0)
    callback = GradwatchCallback(run="plain", config=EVERY_STEP)
    trainer(tmp_path, callback, max_steps=5, logger=False).fit(module, data())
    [watcher] = callback.watchers
    assert watcher.name == "plain" and header(watcher.path)["config"]["clip"]["mode"] == "none"
    np.testing.assert_allclose(series(watcher.path, "grad_norm_total")[1], reference_norms[:5], rtol=1e-5)
    act = [b for r in runlog.read_log(watcher.path) if isinstance(r, runlog.Frame) for b in r.blocks
           if b.metric.name == "act_grad_norm"]
    assert act and all(b.present.any() for b in act)  # the layers' hooks run inside Lightning's closure


def test_clipping_in_both_places_is_refused(tmp_path):
    callback = GradwatchCallback(config={"clip": {"mode": "norm", "max_norm": 1.0}})
    fit = trainer(tmp_path, callback, max_steps=2, gradient_clip_val=0.5)
    with pytest.raises(ValueError, match=r"clip.mode 'norm' and Trainer\(gradient_clip_val=0.5\) would clip twice"):
        fit.fit(Regressor(), data())
    assert fit.gradient_clip_val == 0.5 and callback.watchers == []


def test_a_failing_fit_closes_the_run_and_hands_the_clipping_back(tmp_path):
    callback = GradwatchCallback()
    fit = trainer(tmp_path, callback, max_steps=10, gradient_clip_val=1.0)
    with pytest.raises(RuntimeError, match="boom"):
        fit.fit(Regressor(fail_at=3), data())
    [watcher] = callback.watchers
    records = runlog.read_log(watcher.path)
    assert isinstance(records[-1], runlog.Close) and records[-1].step == 3
    assert fit.gradient_clip_val == 1.0


class TwoParts(L.LightningModule):
    """Two optimizers stepped by hand (a GAN's shape): each is watched with its own submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.head = nn.Linear(8, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        opt_encoder, opt_head = self.optimizers()
        x, y = batch
        loss = (self.head(self.encoder(x)) - y).pow(2).mean()
        self.manual_backward(loss)
        opt_encoder.step()
        opt_head.step()
        opt_encoder.zero_grad()
        opt_head.zero_grad()
        return loss

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.encoder.parameters(), lr=0.1), torch.optim.Adam(self.head.parameters())]


def test_each_optimizer_is_watched_with_the_submodule_it_trains(tmp_path):
    callback = GradwatchCallback(run="two", config={"measure": {"flush_every": 2}})
    trainer(tmp_path, callback, max_steps=6, logger=False).fit(TwoParts(), data())
    assert [w.name for w in callback.watchers] == ["two.encoder", "two.head"]
    encoder, head = (header(w.path) for w in callback.watchers)
    assert [p["name"] for p in encoder["params"]] == ["0.weight", "0.bias"]
    assert head["optimizer"]["class"] == "Adam" and [p["name"] for p in head["params"]] == ["weight", "bias"]
    for watcher in callback.watchers:  # manual steps: each optimizer's three steps, the loss beside them
        assert series(watcher.path, "grad_norm_total")[0].tolist() == [0, 1, 2]
        assert series(watcher.path, "loss")[0].tolist() == [0, 1, 2]
