"""Sharded parameters (FSDP2's `fully_shard`, DTensor): local shards and global reductions.

A sharded parameter's gradient is a DTensor whose local tensor holds this rank's shard. Norms
are global: each rank squares the norms of its shards and one all-reduce sums them, so every
rank gets the norm of the whole parameter, exactly what `clip_grad_norm_` computes on the
sharded model (and √(shards) more than a shard-local norm). The all-reduce is ordered on the
device stream (NCCL) and never waits on the host.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _dtensor_type() -> type | None:
    """The DTensor class where this torch has one (public from 2.4, private before)."""
    if not dist.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        try:
            from torch.distributed._tensor import DTensor  # torch < 2.4
        except ImportError:
            return None
    return DTensor  # type: ignore[no-any-return]


def is_sharded(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor (its values spread over ranks)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t` (itself for a plain tensor); in-place ops on it change `t`."""
    return t.to_local() if is_sharded(t) else t  # type: ignore[attr-defined,no-any-return]


def process_group(t: torch.Tensor) -> Any:
    """The process group over which a sharded tensor's shards are spread (its mesh's only dim)."""
    mesh = t.device_mesh  # type: ignore[attr-defined]
    if mesh.ndim != 1:
        raise ValueError(f"gradwatch measures parameters sharded over a 1-D device mesh. Got {mesh.ndim} dims")
    return mesh.get_group()


def global_norms(local_norms: torch.Tensor, group: Any) -> torch.Tensor:
    """Norms of whole tensors from the norms of this rank's shards: √(Σ over ranks of norm²),
    in float64 (the sum of squares of float32 norms could overflow where the norm does not)."""
    squares = local_norms.to(torch.float64).square()
    dist.all_reduce(squares, group=group)
    return squares.sqrt_()


def global_std(t: torch.Tensor) -> float:
    """Sample std of a sharded tensor's values (as `Tensor.std()`), from each rank's sums
    with no gather; run once, at attach."""
    shard = t.to_local().detach().double()  # type: ignore[attr-defined]
    sums = torch.stack((shard.sum(), shard.square().sum(), shard.new_tensor(float(shard.numel()))))
    dist.all_reduce(sums, group=process_group(t))
    total, squares, count = sums.tolist()
    if count < 2:
        return float("nan")
    return float(max((squares - total * total / count) / (count - 1), 0.0) ** 0.5)
