"""Distributed jobs on the CPU (gloo, 2 processes): FSDP2-sharded parameters have global norms
and clipping equal to the same model trained unsharded; under DDP rank 0 records the
(identical) gradient norms once and every rank its activations; layer names lose `module.`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradwatch
from gradwatch.agent import runlog
from tests.fixtures.prometheus import free_port

WORLD = 2
STEPS = 4
MAX_NORM = 0.05

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(6, 8, generator=gen) * 3, torch.randn(6, 3, generator=gen)


def _worker(rank: int, kind: str, port: int, home: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GRADWATCH_HOME=home)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        reference = _net()  # trained on both ranks' batches at once, unsharded, clipped by torch
        ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
        model = _net()
        if kind == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer)
            fully_shard(model)
        else:
            model = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        ref_norms = []
        with gradwatch.watch(model, opt, run=kind, config={"clip": {"mode": "norm", "max_norm": MAX_NORM}}) as w:
            for step in range(STEPS):
                x, y = _batch(step, rank)
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                opt.zero_grad()
                both = [_batch(step, r) for r in range(WORLD)]
                loss = sum(nn.functional.mse_loss(reference(bx), by) for bx, by in both) / WORLD
                loss.backward()
                ref_norms.append({n: p.grad.norm().item() for n, p in reference.named_parameters()})
                torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM)
                ref_opt.step()
                ref_opt.zero_grad()
        final = {n: (p.full_tensor() if kind == "fsdp" else p).detach().tolist()
                 for n, p in (model.named_parameters() if kind == "fsdp" else model.module.named_parameters())}
        result = {"log": str(w.path), "ref_norms": ref_norms, "final": final,
                  "ref_final": {n: p.detach().tolist() for n, p in reference.named_parameters()}}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _run(kind: str, tmp_path: Path) -> list[dict]:
    home, out = tmp_path / "home", tmp_path / "out"
    out.mkdir()
    mp.start_processes(_worker, args=(kind, free_port(), str(home), str(out)), nprocs=WORLD, start_method="spawn")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _column(path: str, metric: str) -> tuple[list[str], dict[str, list[float]]]:
    """(param or layer names, name -> values per step where measured) of one metric in a log."""
    records = runlog.read_log(path)
    header = records[0]
    assert isinstance(header, runlog.Header)
    table = header.info["params"] if metric == "grad_norm" else header.info["layers"]
    names = {e["index"]: e["name"] for e in table}
    out: dict[str, list[float]] = {}
    for r in records:
        if isinstance(r, runlog.Frame):
            for b in r.blocks:
                if b.metric.name == metric:
                    for j, index in enumerate(b.metric.indices):
                        out.setdefault(names[index], []).extend(
                            float(v) for v, p in zip(b.values[:, j], b.present[:, j]) if p)
    return [e["name"] for e in table], out


def test_fsdp2_norms_and_clipping_are_global_and_equal_an_unsharded_run(tmp_path):
    results = _run("fsdp", tmp_path)
    for rank, result in enumerate(results):
        names, norms = _column(result["log"], "grad_norm")
        assert names == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
        for name in names:  # every rank records the norm of the whole parameter, not of its shard
            expected = [step[name] for step in result["ref_norms"]]
            np.testing.assert_allclose(norms[name], expected, rtol=1e-4, err_msg=f"rank {rank} {name}")
        for name, values in result["final"].items():  # clipped exactly as clip_grad_norm_ on the whole model
            np.testing.assert_allclose(values, result["ref_final"][name], rtol=1e-4, atol=1e-6)
        header = runlog.read_log(result["log"])[0]
        assert header.info["model"]["sharded"] is True and header.info["rank"] == rank


def test_ddp_rank0_records_grad_norms_once_and_names_layers_without_module(tmp_path):
    results = _run("ddp", tmp_path)
    names, norms = _column(results[0]["log"], "grad_norm")
    assert names[0] == "0.weight" and not any(n.startswith("module.") for n in names)
    for name in names:
        np.testing.assert_allclose(norms[name], [s[name] for s in results[0]["ref_norms"]], rtol=1e-4)
    _, replica_norms = _column(results[1]["log"], "grad_norm")
    assert replica_norms == {}  # identical on every rank after the all-reduce: recorded by rank 0 only
    _, acts = _column(results[1]["log"], "act_grad_norm")
    assert acts  # activation statistics are every rank's own
    for result in results:
        np.testing.assert_allclose(result["final"]["4.weight"], result["ref_final"]["4.weight"], rtol=1e-4, atol=1e-6)
        header = runlog.read_log(result["log"])[0]
        assert header.info["model"]["wrappers"] == ["DistributedDataParallel"]
