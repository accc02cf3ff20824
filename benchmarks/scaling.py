"""Own time per parameter tensor as transformer stacks deepen: gradwatch's default config
against `clip_grad_norm_`, interleaved in one run (issue 19's scaling target).

    python -m benchmarks.scaling                 # stacks of 2, 8, 24 and 48 blocks
    python -m benchmarks.scaling --layers 2,8 --steps 40

Each stack is the benchmark's GPT (pre-LN blocks, 16 tensors each) at width 64 on a batch of
4 sequences of 32 tokens, so the per-tensor costs, not the matrix products, dominate the
monitoring's own time. Prints one markdown table: mean own time per step and per tensor (µs)
and the largest step's own time over the median step's, for each method and depth.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from benchmarks.methods import METHODS
from benchmarks.models import GPT, VOCAB, Workload, _cross_entropy_tokens
from benchmarks.overhead import _attach, configure_torch, train_step

METHOD_NAMES = ("clip", "gradwatch")


def stack(layers: int, seed: int = 0) -> Workload:
    """A GPT of `layers` blocks, width 64, on 4 sequences of 32 tokens."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (4, 33), generator=gen)
    model = GPT(layers=layers, d_model=64, heads=4, seq=32)
    return Workload(model, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), _cross_entropy_tokens)


def measure(layers: int, steps: int, warmup: int) -> dict[str, tuple[int, np.ndarray]]:
    """method -> (parameter tensors, own time of each measured step in ns), interleaved per step."""
    device = torch.device("cpu")
    workload = stack(layers)
    tensors = sum(1 for p in workload.model.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory(prefix="gradwatch-scaling-") as tmp:
        runs = {name: _attach(name, f"gpt{layers}", workload, Path(tmp)) for name in METHOD_NAMES}
        own: dict[str, list[int]] = {name: [] for name in METHOD_NAMES}
        order, rng = list(METHOD_NAMES), random.Random(layers)
        try:
            for step in range(warmup + steps):
                rng.shuffle(order)
                for name in order:
                    method, model, optimizer, _ = runs[name]
                    before = method.own_time_ns()
                    train_step(workload, model, optimizer, method, device)
                    if step >= warmup:
                        own[name].append(method.own_time_ns() - before)
                    method.untimed()
        finally:
            for method, *_ in runs.values():
                method.close()
    return {name: (tensors, np.array(values)) for name, values in own.items()}


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="2,8,24,48", help="comma-separated block counts")
    parser.add_argument("--steps", type=int, default=100, help="measured steps per depth (a multiple of 10 "
                        "keeps whole measurement periods)")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        depths = [int(x) for x in args.layers.split(",")]
    except ValueError:
        parser.error(f"--layers: not a list of integers: {args.layers!r}")
    if any(d < 1 for d in depths) or args.steps < 2 or args.warmup < 0:
        parser.error("need --layers >= 1, --steps >= 2, --warmup >= 0")
    configure_torch("cpu")
    for name in METHOD_NAMES:
        METHODS[name]().preload()
    print("| blocks | tensors | method | mean own time (ms/step) | per tensor (µs) | own max / median |")
    print("|---:|---:|---|---:|---:|---:|")
    for layers in depths:
        print(f"[scaling] {layers} blocks, {args.steps} steps", file=sys.stderr, flush=True)
        for name, (tensors, own) in measure(layers, args.steps, args.warmup).items():
            mean = float(own.mean())
            print(f"| {layers} | {tensors} | {name} | {mean / 1e6:.3f} | {mean / 1e3 / tensors:.2f} "
                  f"| {own.max() / np.median(own):.1f} |")


if __name__ == "__main__":
    main()
