"""accelerate: a model and optimizer from `Accelerator.prepare`, gradient accumulation through
`accelerator.accumulate`, and gradwatch's clip in place of `accelerator.clip_grad_norm_`
(docs/integrations.md), against the same loop clipped by accelerate itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.agent import runlog

accelerate = pytest.importorskip("accelerate")

MAX_NORM = 0.2


def loop(watched: bool) -> tuple[list[float], list[float], nn.Module, gradwatch.Watcher | None]:
    """Train 8 batches accumulated by 2; (pre-clip norms, losses, model, watcher).

    Unwatched, accelerate clips (`accelerator.clip_grad_norm_` returns the norm before
    clipping); watched, gradwatch clips and `accelerator.clip_grad_norm_` is not called.
    """
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g))
    model, optimizer, loader = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1),
                                                   torch.utils.data.DataLoader(data, batch_size=4))
    watcher = gradwatch.watch(model, optimizer, config={"clip": {"mode": "norm", "max_norm": MAX_NORM}},
                              scaler=accelerator.scaler) if watched else None
    norms, losses = [], []
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = nn.functional.mse_loss(model(x), y) * 10
            accelerator.backward(loss)
            losses.append(loss.item())
            if watcher is not None:
                watcher.log(loss=loss.detach())  # per micro-batch: the step records their mean
            elif accelerator.sync_gradients:
                norms.append(float(accelerator.clip_grad_norm_(model.parameters(), MAX_NORM)))
            optimizer.step()
            optimizer.zero_grad()
    if watcher is not None:
        watcher.close()
    return norms, losses, accelerator.unwrap_model(model), watcher


def series(watcher: gradwatch.Watcher, metric: str) -> tuple[np.ndarray, np.ndarray]:
    blocks = [b for r in runlog.read_log(watcher.path) if isinstance(r, runlog.Frame) for b in r.blocks
              if b.metric.name == metric]
    return np.concatenate([b.steps for b in blocks]), np.concatenate([b.values[:, 0] for b in blocks])


def test_prepared_model_and_optimizer_with_accumulation_and_gradwatchs_clip_equal_accelerates_own():
    reference_norms, reference_losses, reference, _ = loop(watched=False)
    _, losses, model, watcher = loop(watched=True)
    assert watcher is not None
    steps, norms = series(watcher, "grad_norm_total")
    assert steps.tolist() == [0, 1, 2, 3]  # 8 micro-batches, one measurement per optimizer step
    np.testing.assert_allclose(norms, reference_norms, rtol=1e-5)
    np.testing.assert_allclose(series(watcher, "grad_norm_total_clipped")[1], MAX_NORM, rtol=1e-4)
    np.testing.assert_allclose(series(watcher, "loss")[1], np.reshape(reference_losses, (4, 2)).mean(axis=1),
                               rtol=1e-5)
    for p, q in zip(model.parameters(), reference.parameters()):  # the same clip, the same updates
        torch.testing.assert_close(p, q)
    info = runlog.read_log(watcher.path)[0].info
    assert info["optimizer"] == {"class": "SGD", "wrappers": ["AcceleratedOptimizer"]}
    assert [p["name"] for p in info["params"]] == ["0.weight", "0.bias", "2.weight", "2.bias"]
