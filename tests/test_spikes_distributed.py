"""The spike guard and the noise scale under DDP (gloo, 2 CPU processes): a loss spike on one
rank only makes every rank skip the step (the flag is all-reduced), so the replicas stay equal;
the per-rank gradients give the noise scale with K = 2, equal to McCandlish's estimators from
rank 0's own gradient and the averaged one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradwatch
from tests.fixtures.prometheus import free_port
from tests.test_spikes import events, series

WORLD = 2
STEPS = 24
SPIKE = 18

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(16, 4, generator=g)
    y = x[:, :1] - 0.5 * x[:, 1:2] + 0.1 * torch.randn(16, 1, generator=g)
    return x, y * (100.0 if step == SPIKE and rank == 1 else 1.0)  # rank 1's loss spikes alone


def _worker(rank: int, port: int, home: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GRADWATCH_HOME=home)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = nn.parallel.DistributedDataParallel(_net())
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        config = {"measure": {"flush_every": 5, "noise_scale_every": 3},
                  "guards": {"spike": {"action": "skip", "on": "loss", "window": 16, "warmup": 8}}}
        expected = {}
        with gradwatch.watch(model, opt, config=config) as watcher:
            for step in range(STEPS):
                x, y = _batch(step, rank)
                ref = _net()
                ref.load_state_dict(model.module.state_dict())
                local = torch.autograd.grad(nn.functional.mse_loss(ref(x), y), list(ref.parameters()))
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                small = float(sum(g.double().square().sum() for g in local))
                big = float(sum(p.grad.double().square().sum() for p in model.parameters()))
                expected[step] = ((2 * big - small), 2 * (small - big))  # K = 2: (K|G_big|² - |G_small|²)/(K-1)
                watcher.log(loss=loss)
                opt.step()
                opt.zero_grad()
        final = {n: p.detach().tolist() for n, p in model.module.named_parameters()}
        Path(out, f"rank{rank}.json").write_text(json.dumps({"log": str(watcher.path), "final": final,
                                                             "expected": expected}))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    home, out = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("out")
    mp.start_processes(_worker, args=(free_port(), str(home), str(out)), nprocs=WORLD, start_method="spawn")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_a_spike_on_one_rank_is_skipped_on_every_rank(ranks):
    for rank in ranks:
        skipped = series(rank["log"], "skipped")
        assert [s for s, v in skipped.items() if v] == [SPIKE]
        (event,) = events(rank["log"])
        assert event.step == SPIKE and event.data["skipped"] is True
    assert ranks[0]["final"] == ranks[1]["final"]  # the replicas did the same thing


def test_the_noise_scale_from_per_rank_gradients(ranks):
    expected = {int(s): v for s, v in ranks[0]["expected"].items()}
    g2, trace = series(ranks[0]["log"], "gns_grad_sq"), series(ranks[0]["log"], "gns_trace")
    assert sorted(g2) == list(range(0, STEPS, 3))
    for step in g2:
        assert g2[step] == pytest.approx(expected[step][0], rel=1e-4)
        assert trace[step] == pytest.approx(expected[step][1], rel=1e-4)
    assert not series(ranks[1]["log"], "gns_grad_sq")  # rank 0 records it, as it does the norms
