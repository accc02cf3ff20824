"""The gradient noise scale B_simple under gradient accumulation equals McCandlish's estimators
computed from each micro-batch's gradient (taken with plain autograd on a copy of the model), and
a job with one batch size says that it has none."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.agent.noise_scale import EMA_DECAY, noise_estimates
from tests.test_spikes import events, regression, series

MICRO = 4
STEPS = 9


def test_noise_estimates_match_mccandlish():
    small, big, k = torch.tensor(5.0), torch.tensor(2.0), 4
    g2, trace = noise_estimates(small, big, k)
    # |G|² = (B_big |G_big|² - B_small |G_small|²) / (B_big - B_small), batches 1 and k
    assert float(g2) == pytest.approx((k * 2.0 - 5.0) / (k - 1))
    # tr(Σ) = (|G_small|² - |G_big|²) / (1/B_small - 1/B_big)
    assert float(trace) == pytest.approx((5.0 - 2.0) / (1 - 1 / k))


def test_noise_scale_under_gradient_accumulation_equals_the_reference():
    net = regression()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    config = {"measure": {"flush_every": 4, "noise_scale_every": 2, "activation_every": 0}}
    g = torch.Generator().manual_seed(5)
    expected: dict[int, tuple[float, float]] = {}
    with gradwatch.watch(net, opt, config=config) as watcher:
        for step in range(STEPS):
            ref = regression()  # the same weights, none of gradwatch's hooks
            ref.load_state_dict(net.state_dict())
            micro = []
            for _ in range(MICRO):
                x = torch.randn(8, 4, generator=g)
                y = x[:, :1] + 0.5 * torch.randn(8, 1, generator=g)
                grads = torch.autograd.grad(nn.functional.mse_loss(ref(x), y) / MICRO, list(ref.parameters()))
                micro.append(torch.cat([gr.flatten() for gr in grads]).double())
                (nn.functional.mse_loss(net(x), y) / MICRO).backward()
            small = sum(float(m.square().sum()) for m in micro) / MICRO
            big = float(sum(micro).square().sum()) / MICRO ** 2
            expected[step] = ((MICRO * big - small) / (MICRO - 1), MICRO * (small - big) / (MICRO - 1))
            opt.step()
            opt.zero_grad()
    assert watcher.errors == {}
    g2, trace, scale = (series(watcher.path, n) for n in ("gns_grad_sq", "gns_trace", "noise_scale"))
    assert sorted(g2) == sorted(trace) == sorted(scale) == list(range(0, STEPS, 2))
    averages = [0.0, 0.0]
    for step in sorted(g2):
        assert g2[step] == pytest.approx(expected[step][0], rel=1e-4)
        assert trace[step] == pytest.approx(expected[step][1], rel=1e-4)
        averages = [EMA_DECAY * a + (1 - EMA_DECAY) * e for a, e in zip(averages, expected[step])]
        assert scale[step] == pytest.approx(averages[1] / averages[0], rel=1e-4)
    assert not events(watcher.path, "noise_scale_unavailable")


def test_one_batch_size_is_recorded_as_unavailable():
    net = regression()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with gradwatch.watch(net, opt, config={"measure": {"noise_scale_every": 1}}) as watcher:
        for _ in range(3):
            nn.functional.mse_loss(net(torch.randn(8, 4)), torch.randn(8, 1)).backward()
            opt.step()
            opt.zero_grad()
    (event,) = events(watcher.path, "noise_scale_unavailable")
    assert event.step == 0 and event.data["batches"] == 1 and "one batch size" in event.data["reason"]
    assert not series(watcher.path, "noise_scale")


def test_noise_hooks_are_removed_on_close():
    net = regression()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    watcher = gradwatch.watch(net, opt, config={"measure": {"noise_scale_every": 1}})
    assert all(p._backward_hooks for p in net.parameters())
    watcher.close()
    assert not any(p._backward_hooks for p in net.parameters())
