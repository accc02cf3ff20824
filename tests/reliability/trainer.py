"""A real training process under the agent, driven line by line on stdin by a reliability test.

``python -m tests.reliability.trainer CONFIG_JSON`` builds an MLP and reads commands, one per
line, answering each with one JSON line on stdout:

- ``limit BYTES`` / ``limit +BYTES``: no file of this process may grow past BYTES (or past the
  log's size plus BYTES): `RLIMIT_FSIZE`, with SIGXFSZ ignored so writes fail with EFBIG
  as on a full disk; ``unlimit`` lifts it again.
- ``watch``: `gradwatch.watch(model, opt, run=..., config=...)`.
- ``train N``: N steps, then waits until the writer has written them (or failed to).
- ``pace RATE N``: N steps at RATE steps/s, printing ``{"step", "t"}`` after each (the
  test kills the process in between).
- ``close``: `watcher.close()`, answering with the watcher's errors.

``python -m tests.reliability.trainer fleet N STEPS CONFIG_JSON`` instead forks N trainers after
one import of torch, each training its own run of STEPS steps into the same home at once, and
prints one JSON line per trainer: its run id and exit code.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import signal
import sys
import time
from typing import Any

import torch
from torch import nn

import gradwatch


def mlp(layers: int, width: int) -> nn.Sequential:
    """`layers` Linear layers of `width`, each but the last followed by a ReLU."""
    mods: list[nn.Module] = []
    for i in range(layers):
        mods.append(nn.Linear(width, width))
        if i < layers - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


class Trainer:
    """The model, optimizer and watcher of one run, stepped on command."""

    def __init__(self, spec: dict[str, Any]) -> None:
        torch.manual_seed(spec.get("seed", 0))
        self.spec = spec
        self.width = spec.get("width", 16)
        self.model = mlp(spec.get("layers", 3), self.width)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.watcher: Any = None
        self.step = 0

    def watch(self) -> dict[str, Any]:
        self.watcher = gradwatch.watch(self.model, self.opt, run=self.spec.get("run"), config=self.spec["config"])
        return {"run_id": self.watcher.run_id, "path": str(self.watcher.path)}

    def one_step(self) -> None:
        g = torch.Generator().manual_seed(self.step)
        x = torch.randn(8, self.width, generator=g)
        loss = self.model(x).pow(2).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.watcher.log(loss=loss.detach())
        self.step += 1

    def train(self, n: int) -> dict[str, Any]:
        for _ in range(n):
            self.one_step()
        self.watcher.snapshot()  # hands every finished step to the writer...
        self.watcher.snapshot()  # ...and returns once the writer has handled them
        return {"step": self.step}

    def pace(self, rate: float, n: int) -> dict[str, Any]:
        period = 1.0 / rate
        start = time.monotonic()
        for i in range(n):
            time.sleep(max(0.0, start + i * period - time.monotonic()))
            self.one_step()
            print(json.dumps({"step": self.step - 1, "t": time.time()}), flush=True)
        return {"step": self.step}

    def close(self) -> dict[str, Any]:
        errors = self.watcher.snapshot()["errors"]
        self.watcher.close()
        return {"errors": errors}


def set_limit(arg: str, trainer: Trainer) -> dict[str, Any]:
    """`RLIMIT_FSIZE` to BYTES, or to the log's size + BYTES for ``+BYTES``."""
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    limit = int(arg)
    if arg.startswith("+"):
        path = trainer.watcher.path
        limit += path.stat().st_size if path.exists() else 0
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    return {"limit": limit}


def _fleet_member(spec: dict[str, Any], steps: int, out: Any) -> None:
    trainer = Trainer(spec)
    out.send(trainer.watch()["run_id"])
    for _ in range(steps):
        trainer.one_step()
        time.sleep(0.002)  # interleave with the other trainers and the service
    trainer.close()


def fleet(n: int, steps: int, spec: dict[str, Any]) -> None:
    """N trainers at once, forked from this process (torch is imported once)."""
    warm = Trainer(spec)  # the first model, optimizer and step import what they need once, before the forks
    warm.opt.step()
    ctx = multiprocessing.get_context("fork")
    members = []
    for i in range(n):
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_fleet_member, args=({**spec, "run": f"fleet-{i}", "seed": i}, steps, send))
        proc.start()
        members.append((proc, receive))
    for proc, receive in members:
        run_id = receive.recv()
        proc.join()
        print(json.dumps({"run_id": run_id, "exit": proc.exitcode, "pid": proc.pid}), flush=True)


def main() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    torch.set_num_threads(1)
    if sys.argv[1] == "fleet":
        fleet(int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]))
        return
    trainer = Trainer(json.loads(sys.argv[1]))
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "limit":
            answer = set_limit(args[0], trainer)
        elif cmd == "unlimit":
            _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
            answer = {}
        elif cmd == "watch":
            answer = trainer.watch()
        elif cmd == "train":
            answer = trainer.train(int(args[0]))
        elif cmd == "pace":
            answer = trainer.pace(float(args[0]), int(args[1]))
        elif cmd == "close":
            answer = trainer.close()
        else:
            raise SystemExit(f"unknown command {cmd!r}")
        print(json.dumps({"ok": cmd, **answer}), flush=True)
        if cmd == "close":
            return


if __name__ == "__main__":
    main()
