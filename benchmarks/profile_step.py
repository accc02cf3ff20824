"""Profile one method's training steps with `torch.profiler`: where the monitoring's time goes.

    python -m benchmarks.profile_step --model cnn --method gradwatch [--device cuda] [--steps 20]

Prints the operators (and, on CUDA, the runtime calls such as `cudaLaunchKernel` or
`cudaMemcpyAsync`) sorted by their own CPU time, next to the same steps of bare training.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.methods import METHODS
from benchmarks.models import MODELS, build
from benchmarks.overhead import _attach, configure_torch, train_step


def profile_method(model_name: str, method_name: str, device: torch.device, steps: int, batch_scale: int) -> str:
    """Warm up, then profile `steps` steps of one method; return the operator table."""
    workload = build(model_name, device, batch_scale, seed=0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tempfile.TemporaryDirectory(prefix="gradwatch-profile-") as tmp:
        method, model, optimizer, _ = _attach(method_name, model_name, workload, Path(tmp))
        try:
            for _ in range(5):
                train_step(workload, model, optimizer, method, device)
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    train_step(workload, model, optimizer, method, device)
        finally:
            method.close()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="cnn")
    parser.add_argument("--method", choices=list(METHODS), default="gradwatch")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-scale", type=int, help="multiply every batch (default 1 on cpu, 8 on cuda)")
    args = parser.parse_args(argv)
    device = configure_torch(args.device)
    batch_scale = args.batch_scale or (8 if args.device == "cuda" else 1)
    for name in ("bare", args.method):
        print(f"## {args.model}: {name}, {args.steps} steps on {args.device}\n")
        print(profile_method(args.model, name, device, args.steps, batch_scale))


if __name__ == "__main__":
    main()
