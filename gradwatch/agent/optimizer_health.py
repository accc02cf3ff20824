"""Optimizer health: Adam-family state statistics, and what each param's update is judged against.

For any optimizer whose param groups have `betas` and `eps` and whose state holds `exp_avg`,
`exp_avg_sq` and `step` (Adam, AdamW, NAdam, RAdam, ...), per param, with the optimizer's own
step count t and bias corrections bc1 = 1 - β1^t, bc2 = 1 - β2^t:

- `adam_update_rms`: RMS over the param's elements of u = m̂ / (√v̂ + ε), m̂ = m / bc1 and
  √v̂ = √v / √bc2 (v the `max_exp_avg_sq` under amsgrad): Adam's update before the learning
  rate, measured after the step from the state that made it;
- `adam_eps_frac`: fraction of the elements where ε > √v̂ (ε dominates the denominator);
- `adam_v_lag`: mean over the elements of g² / (√v̂ + ε)², g the gradient the step applies and
  v̂ the second moment *before* the step (t - 1): about 1 when v̂ tracks the squared gradients,
  far above 1 when they outgrew it (measured before the step).

The maths is in pure functions over lists of tensors (`torch._foreach_*`, bias corrections
computed on the device from the step counts wherever those live): no host synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.agent.health_layout import OptimizerTable
from gradwatch.agent.layers import Param, is_transposed_linear

#: The reference band of the per-step update-to-weight ratio ‖Δθ‖/‖θ‖ (about 1e-3 for
#: Adam-family training, an order of magnitude either way).
UPDATE_RATIO_BAND = (1e-4, 1e-2)
#: Work through the params this many elements at a time, so the temporaries stay bounded.
CHUNK_ELEMENTS = 1 << 25
NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                                      nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
                                      nn.InstanceNorm3d) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
#: Norms that remove a per-channel bias, so the layer before them is scale-invariant with its bias.
CHANNEL_MEAN_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                                                   nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
                                                   nn.InstanceNorm3d)
_LINEAR: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_adam_family(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every param group has Adam's hyperparameters (`betas` as two numbers, and `eps`)."""
    groups = optimizer.param_groups
    return bool(groups) and all(_betas(g) is not None and _number(g.get("eps")) is not None for g in groups)


def group_kind(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> str | None:
    """`adam` (Adam-family hyperparameters), `sgd` (torch's SGD) or None."""
    if _betas(group) is not None and _number(group.get("eps")) is not None:
        return "adam"
    return "sgd" if isinstance(optimizer, torch.optim.SGD) else None


def normalized_params(model: nn.Module, params: Sequence[Param]) -> list[bool]:
    """Per param: a scale-invariant weight, the weight of a Linear/Conv layer directly followed by
    a normalisation layer in an `nn.Sequential` (whose order is the order of execution), with no
    bias or a norm that removes a per-channel mean (BatchNorm, InstanceNorm)."""
    index = {id(p.tensor): p.index for p in params}
    out = [False] * len(params)
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.children())
        for layer, nxt in zip(children, children[1:]):
            weight = getattr(layer, "weight", None)
            if not (isinstance(layer, _LINEAR) or is_transposed_linear(layer)) or not isinstance(nxt, NORMS):
                continue
            if getattr(layer, "bias", None) is not None and not isinstance(nxt, CHANNEL_MEAN_NORMS):
                continue
            if isinstance(weight, Tensor) and id(weight) in index:
                out[index[id(weight)]] = True
    return out


def optimizer_table(optimizer: torch.optim.Optimizer, model: nn.Module, params: Sequence[Param]) -> OptimizerTable:
    """The host's tables for per-layer aggregates and equilibria (see `OptimizerTable`)."""
    kinds = [group_kind(optimizer, g) for g in optimizer.param_groups]
    update_eq = [k == "adam" and bool(g.get("decoupled_weight_decay", False)) or
                 (k == "sgd" and not _number(g.get("momentum"))) for k, g in zip(kinds, optimizer.param_groups)]
    grad_eq = [k == "sgd" and not _number(g.get("momentum")) for k, g in zip(kinds, optimizer.param_groups)]
    return OptimizerTable(param_layer=[p.layer for p in params], numel=[p.tensor.numel() for p in params],
                          param_group=[-1 if p.group is None else p.group for p in params],
                          normalized=normalized_params(model, params), update_equilibrium=update_eq,
                          grad_equilibrium=grad_eq)


def describe(optimizer: torch.optim.Optimizer, table: OptimizerTable) -> dict[str, Any]:
    """The run header's optimizer details: which state statistics it has, each group's
    hyperparameters, the scale-invariant params and the reference update-ratio band."""
    groups = []
    for g, group in enumerate(optimizer.param_groups):
        betas = _betas(group)
        groups.append({"index": g, "kind": group_kind(optimizer, group), "betas": list(betas) if betas else None,
                       "eps": _number(group.get("eps")), "weight_decay": _number(group.get("weight_decay")),
                       "decoupled_weight_decay": bool(group.get("decoupled_weight_decay", False)),
                       "momentum": _number(group.get("momentum")), "amsgrad": bool(group.get("amsgrad", False)),
                       "fused": bool(group.get("fused") or False)})
    return {"state": "adam" if is_adam_family(optimizer) else "none", "param_groups": groups,
            "normalized_params": [i for i, flag in enumerate(table.normalized) if flag],
            "update_ratio_band": list(UPDATE_RATIO_BAND)}


def weight_decays(optimizer: torch.optim.Optimizer, out: Any) -> None:
    """Each group's weight decay into `out` (a numpy row; NaN where a group has none)."""
    for g, group in enumerate(optimizer.param_groups[:len(out)]):
        wd = _number(group.get("weight_decay"))
        out[g] = math.nan if wd is None else wd


# ---------------------------------------------------------------------------------- maths


def bias_corrections(steps: Tensor, beta1: Tensor, beta2: Tensor) -> tuple[Tensor, Tensor]:
    """(1 - β1^t, √(1 - β2^t)) per param, from step counts and betas (same shape, same device)."""
    return 1.0 - beta1.pow(steps), (1.0 - beta2.pow(steps)).sqrt()


def adam_update_stats(exp_avg: list[Tensor], denom_sq: list[Tensor], bc1: Sequence[Tensor],
                      bc2_sqrt: Sequence[Tensor], eps: list[float]) -> tuple[list[Tensor], list[Tensor]]:
    """Per tensor: ‖m̂ / (√v̂ + ε)‖ (L2 over its elements) and the number of elements where
    ε > √v̂, with √v̂ = √v / √bc2 as torch's Adam computes it. `denom_sq` is v (exp_avg_sq, or
    max_exp_avg_sq under amsgrad). Two temporaries the size of the tensors."""
    root = torch._foreach_sqrt(denom_sq)
    torch._foreach_div_(root, list(bc2_sqrt))
    dominated = torch._foreach_sub(root, eps)  # √v̂ - ε: negative exactly where ε > √v̂
    torch._foreach_sign_(dominated)
    torch._foreach_clamp_max_(dominated, 0.0)
    counts = torch._foreach_norm(dominated, 1, **_norm_dtype(dominated))
    del dominated
    torch._foreach_add_(root, eps)
    torch._foreach_reciprocal_(root)
    torch._foreach_mul_(root, exp_avg)
    torch._foreach_div_(root, list(bc1))
    return list(torch._foreach_norm(root, 2, **_norm_dtype(root))), list(counts)


def adam_lag(grads: list[Tensor], exp_avg_sq: list[Tensor], bc2_sqrt: Sequence[Tensor],
             eps: list[float]) -> list[Tensor]:
    """Per tensor: ‖g / (√v̂ + ε)‖, whose square over the element count is the mean of
    g² / (√v̂ + ε)². One temporary the size of the tensors."""
    denom = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_div_(denom, list(bc2_sqrt))
    torch._foreach_add_(denom, eps)
    torch._foreach_reciprocal_(denom)
    torch._foreach_mul_(denom, grads)
    return list(torch._foreach_norm(denom, 2, **_norm_dtype(denom)))


# ---------------------------------------------------------------------------------- state


@dataclass
class _Entry:
    """One param with Adam state: its index, state tensors and group hyperparameters."""

    index: int
    param: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    denom_sq: Tensor  # exp_avg_sq, or max_exp_avg_sq under amsgrad
    step: Any
    beta1: float
    beta2: float
    eps: float


class AdamState:
    """Reads an Adam-family optimizer's state and measures it (see the module docstring).

    `measure_lag` before the step, `measure_update` after it; each returns per-param values
    (a float32 tensor on `device`, one per param of the run) and which params were measured.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor], device: torch.device) -> None:
        self._optimizer = optimizer
        self._params = list(params)
        self._device = device
        self._dtype = torch.float32 if device.type == "mps" else torch.float64
        self._index_of = {id(t): i for i, t in enumerate(self._params)}
        self._betas: dict[tuple[tuple[float, float], ...], tuple[Tensor, Tensor]] = {}
        self._indices: dict[tuple[int, ...], Tensor] = {}
        self._numel = torch.tensor([max(p.numel(), 1) for p in self._params], dtype=torch.float32).to(device)

    def measure_lag(self, grad_scale: Tensor | None = None) -> tuple[Tensor, list[int]] | None:
        """`adam_v_lag` per param from the gradients about to be applied and the state before them
        (`grad_scale`: the loss scale a fused optimizer will unscale them by)."""
        entries = [e for e in self._entries() if _dense(e.param.grad)]
        if not entries:
            return None
        _, bc2_sqrt = self._corrections(entries)
        norms: list[Tensor] = [bc2_sqrt[0]] * len(entries)  # every slot filled below, in entries' order
        for chunk in _chunks(entries):
            at = _positions(chunk, entries)
            got = adam_lag([e.param.grad for e in chunk], [e.exp_avg_sq for e in chunk],  # type: ignore[misc]
                           [bc2_sqrt[k] for k in at], [e.eps for e in chunk])
            for k, n in zip(at, got):
                norms[k] = n
        lag = self._per_param(entries, torch.stack([n.to(self._device, torch.float32) for n in norms]).square())
        if grad_scale is not None:
            lag = lag / grad_scale.to(self._device, torch.float32).square()
        return lag, [e.index for e in entries]

    def measure_update(self) -> tuple[Tensor, Tensor, list[int]] | None:
        """(`adam_update_rms`, `adam_eps_frac`) per param from the state after the step."""
        entries = [e for e in self._entries() if e.param.grad is not None]
        if not entries:
            return None
        bc1, bc2_sqrt = self._corrections(entries)
        norms: list[Tensor] = [bc1[0]] * len(entries)  # every slot filled below, in entries' order
        counts: list[Tensor] = [bc1[0]] * len(entries)
        for chunk in _chunks(entries):
            at = _positions(chunk, entries)
            n, c = adam_update_stats([e.exp_avg for e in chunk], [e.denom_sq for e in chunk], [bc1[k] for k in at],
                                     [bc2_sqrt[k] for k in at], [e.eps for e in chunk])
            for k, norm, count in zip(at, n, c):
                norms[k], counts[k] = norm, count
        rms = self._per_param(entries, torch.stack([n.to(self._device, torch.float32) for n in norms]).square())
        frac = self._per_param(entries, torch.stack([c.to(self._device, torch.float32) for c in counts]))
        return rms.sqrt_(), frac, [e.index for e in entries]

    def _per_param(self, entries: list[_Entry], sums: Tensor) -> Tensor:
        """Sums over each measured param's elements -> means, in a vector over all params."""
        out = torch.zeros(len(self._params), dtype=torch.float32, device=self._device)
        key = tuple(e.index for e in entries)
        index = self._indices.get(key)
        if index is None:
            if len(self._indices) > 8:
                self._indices.clear()
            index = self._indices[key] = torch.tensor(key).to(self._device, non_blocking=True)
        out.index_copy_(0, index, sums)
        return out.div_(self._numel)

    def _entries(self) -> list[_Entry]:
        """The params whose state holds exp_avg, exp_avg_sq and step (dense, real, not meta)."""
        state = self._optimizer.state
        out = []
        for group in self._optimizer.param_groups:
            betas, eps, amsgrad = _betas(group), _number(group.get("eps")), bool(group.get("amsgrad", False))
            if betas is None or eps is None:
                continue
            for p in group["params"]:
                s = state.get(p)
                if not s or "exp_avg" not in s or "exp_avg_sq" not in s or "step" not in s:
                    continue
                index = self._index_of.get(id(p))
                m, v = s["exp_avg"], s["exp_avg_sq"]
                if index is None or not _dense(m) or m.is_complex() or m.shape != v.shape:
                    continue
                vmax = s.get("max_exp_avg_sq") if amsgrad else None
                out.append(_Entry(index, p, m, v, vmax if isinstance(vmax, Tensor) else v, s["step"],
                                  betas[0], betas[1], eps))
        return out

    def _corrections(self, entries: list[_Entry]) -> tuple[list[Tensor], list[Tensor]]:
        """Bias corrections per entry as 0-d tensors on each state's device."""
        steps = _step_vector([e.step for e in entries], self._device, self._dtype)
        key = tuple((e.beta1, e.beta2) for e in entries)
        betas = self._betas.get(key)
        if betas is None:
            if len(self._betas) > 8:
                self._betas.clear()
            pair = torch.tensor(key, dtype=self._dtype).to(self._device, non_blocking=True)
            betas = self._betas[key] = (pair[:, 0], pair[:, 1])
        bc1, bc2_sqrt = bias_corrections(steps, *betas)
        state_device = entries[0].exp_avg.device
        if state_device != self._device:
            bc1, bc2_sqrt = bc1.to(state_device, non_blocking=True), bc2_sqrt.to(state_device, non_blocking=True)
        return list(bc1.unbind()), list(bc2_sqrt.unbind())


def _step_vector(steps: list[Any], device: torch.device, dtype: torch.dtype) -> Tensor:
    """The step counts as one vector on `device`, read without a host sync: tensors already there
    are stacked, CPU tensors stacked on the CPU and copied over, numbers copied from the host."""
    if all(isinstance(s, Tensor) for s in steps):
        where = {s.device for s in steps}
        if len(where) == 1:
            stacked = torch.stack([s.reshape(()).to(dtype) for s in steps])
            return stacked.to(device, non_blocking=True)
        return torch.stack([s.reshape(()).to(device, dtype, non_blocking=True) for s in steps])
    values = [s.reshape(()).to(device, dtype, non_blocking=True) if isinstance(s, Tensor)
              else torch.tensor(float(s), dtype=dtype).to(device, non_blocking=True) for s in steps]
    return torch.stack(values)


def _chunks(entries: list[_Entry]) -> Iterator[list[_Entry]]:
    """Entries grouped up to CHUNK_ELEMENTS elements, by device and dtype (one `_foreach` call each)."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[_Entry]] = {}
    for e in entries:
        by_kind.setdefault((e.exp_avg.device, e.exp_avg.dtype), []).append(e)
    for group in by_kind.values():
        chunk: list[_Entry] = []
        size = 0
        for e in group:
            if chunk and size + e.exp_avg.numel() > CHUNK_ELEMENTS:
                yield chunk
                chunk, size = [], 0
            chunk.append(e)
            size += e.exp_avg.numel()
        if chunk:
            yield chunk


def _positions(chunk: list[_Entry], entries: list[_Entry]) -> list[int]:
    at = {id(e): k for k, e in enumerate(entries)}
    return [at[id(e)] for e in chunk]


def _norm_dtype(tensors: list[Tensor]) -> dict[str, torch.dtype]:
    """Accumulate 16-bit tensors' norms in float32."""
    if tensors and tensors[0].dtype in (torch.float16, torch.bfloat16):
        return {"dtype": torch.float32}
    return {}


def _dense(t: Any) -> bool:
    return isinstance(t, Tensor) and t.layout == torch.strided and not t.is_meta


def _betas(group: dict[str, Any]) -> tuple[float, float] | None:
    betas = group.get("betas")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        return None
    b1, b2 = _number(betas[0]), _number(betas[1])
    return None if b1 is None or b2 is None else (b1, b2)


def _number(value: Any) -> float | None:
    """A hyperparameter as a float; None when it is not a number. A tensor hyperparameter is read
    on the host: a CPU tensor costs nothing, one on a device is a copy (torch keeps betas on the
    CPU unless told otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        return None
    if isinstance(value, Tensor):
        if value.numel() != 1:
            return None
        return float(value.detach().reshape(()).to("cpu", torch.float64).numpy())
    return float(value)
