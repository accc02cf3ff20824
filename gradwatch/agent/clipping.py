"""Gradient clipping in the optimizer's step pre-hook, reusing the norms the agent computed.

No mode synchronises with the host: every decision is a tensor (a multiplication by a clamped
coefficient, `torch.where`), and adaptive state (AutoClip's history, ZClip's moments, and the
count of finite norms each has seen) lives on the norms' device. A non-finite total norm leaves
that state untouched, so the following steps behave as if the bad step had never happened.
The counts are device tensors rather than host ints for that reason: the host cannot know
whether a norm was finite without a synchronisation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from gradwatch.agent.config import ClipConfig

__all__ = ["ClipResult", "Clipper", "make_clipper"]

_EPS = 1e-6  # added to a norm before dividing by it, as torch.nn.utils.clip_grad_norm_ does
_INF = math.inf


@dataclass(frozen=True)
class ClipResult:
    """What one clipping step did; every tensor is 0-d float32 on the norms' device.

    total_after: L2 norm of all gradients after clipping. coef: total_after / total before
    (1.0 when nothing was clipped); for `norm` the exact coefficient applied. threshold: the
    norm threshold used (global for norm, auto_percentile and zscore, +inf while zscore warms
    up; max_norm for param_norm); None for value and agc. Do not modify these tensors.
    """

    total_after: Tensor
    coef: Tensor
    threshold: Tensor | None


class Clipper(Protocol):
    """Clips gradients in place given their per-gradient L2 norms and total norm."""

    def clip_(self, params: list[Tensor], grads: list[Tensor], norms: Tensor, total: Tensor) -> ClipResult:
        """Clip `grads[i]` (the gradient of `params[i]`) in place; `norms`/`total` are before clipping."""
        ...


def make_clipper(cfg: ClipConfig, exclude: Collection[Tensor] = ()) -> Clipper | None:
    """The clipper for `cfg.mode`, or None for mode 'none'.

    `exclude` lists parameters that `agc` leaves unclipped (the final linear layer); the other
    modes clip every gradient they are given.
    """
    if cfg.mode == "none":
        return None
    if cfg.mode == "norm":
        assert cfg.max_norm is not None  # ClipConfig rejects norm without max_norm
        return _NormClipper(cfg.max_norm)
    if cfg.mode == "value":
        assert cfg.max_value is not None  # ClipConfig rejects value without max_value
        return _ValueClipper(cfg.max_value)
    if cfg.mode == "param_norm":
        assert cfg.max_norm is not None  # ClipConfig rejects param_norm without max_norm
        return _ParamNormClipper(cfg.max_norm)
    if cfg.mode == "agc":
        return _AgcClipper(cfg.clip_factor, cfg.eps, exclude)
    if cfg.mode == "auto_percentile":
        return _PercentileClipper(cfg.percentile, cfg.history)
    return _ZScoreClipper(cfg.alpha, cfg.z_threshold, cfg.warmup)


def _group(tensors: Sequence[Tensor]) -> list[list[int]]:
    """Indices of `tensors` grouped by device, dtype and layout (sparse gradients apart), the
    unit one `_foreach_*` kernel takes."""
    groups: dict[tuple[torch.device, torch.dtype, torch.layout], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype, t.layout), []).append(i)
    return list(groups.values())


def _norm_coef(threshold: Tensor | float, total: Tensor) -> Tensor:
    """min(threshold / (total + 1e-6), 1): the coefficient `clip_grad_norm_` applies."""
    return torch.clamp(threshold / (total + _EPS), max=1.0)


def _scale_(grads: Sequence[Tensor], coef: Tensor) -> None:
    """Multiply every gradient by the 0-d `coef`, one `_foreach_mul_` per device and dtype.

    Multiplying unconditionally, even by 1.0, replaces `if coef < 1`, a Python branch on a
    device value that would force a host synchronisation.
    """
    for idx in _group(grads):
        group = [grads[i] for i in idx]
        torch._foreach_mul_(group, coef.to(group[0].device, non_blocking=True))


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """float32 for 16-bit floats, whose norms would lose precision or overflow; else None (as is)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else None


@functools.cache
def _foreach_norm_takes_dtype() -> bool:
    """Whether `torch._foreach_norm` accepts `dtype=` (newer torch), to norm 16-bit floats in float32."""
    try:
        torch._foreach_norm([torch.zeros(1)], 2.0, dtype=torch.float32)  # type: ignore[call-arg]
    except (TypeError, RuntimeError):
        return False
    return True


def wide_norm_kwargs() -> dict[str, torch.dtype] | None:
    """`_foreach_norm` keywords for float64 accumulation, or None where torch cannot (before 2.3)."""
    return {"dtype": torch.float64} if _foreach_norm_takes_dtype() else None


def norm_kwargs(tensors: Sequence[Tensor]) -> dict[str, torch.dtype]:
    """`_foreach_norm` keywords for these tensors: float32 accumulation when any is 16-bit."""
    if _foreach_norm_takes_dtype() and any(_accumulate_dtype(t.dtype) for t in tensors):
        return {"dtype": torch.float32}
    return {}


def _total_norm(grads: Sequence[Tensor], device: torch.device) -> Tensor:
    """The L2 norm of all `grads` as a 0-d float32 tensor on `device`: one `_foreach_norm` per group."""
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    parts = []
    for idx in _group(grads):
        group = [grads[i] for i in idx]
        dtype = _accumulate_dtype(group[0].dtype)
        kwargs = {"dtype": dtype} if dtype is not None and _foreach_norm_takes_dtype() else {}
        norms = torch._foreach_norm(group, 2.0, **kwargs)
        parts.append(torch.stack(norms).to(device, torch.float32, non_blocking=True))
    return torch.linalg.vector_norm(torch.cat(parts))


def _ratio(after: Tensor, before: Tensor) -> Tensor:
    """after / before, never above 1 (clipping only shrinks); 1.0 where before is zero or NaN."""
    return torch.where(before > 0, (after / before).clamp(max=1.0), 1.0)


def _percentile(history: Tensor, count: Tensor, q: float) -> Tensor:
    """The `q`-quantile of the first `count` sorted values of `history`, +inf when `count` is 0.

    Interpolates linearly between order statistics, as `numpy.percentile`. Unfilled slots of
    `history` hold +inf so that they sort after every recorded value.
    """
    ordered = torch.sort(history).values
    last = (count - 1).clamp(min=0)
    rank = last.to(torch.float32) * q
    low = rank.floor()
    lo = low.long()
    hi = torch.minimum(lo + 1, last)
    value = torch.lerp(ordered.index_select(0, lo.view(1)), ordered.index_select(0, hi.view(1)), rank - low)
    return torch.where(count > 0, value, _INF).view(())


@functools.cache
def _unit_dims(ndim: int) -> tuple[int, ...] | None:
    """The dims reduced to get one norm per output unit: all but the first (None: whole tensor)."""
    return tuple(range(1, ndim)) if ndim > 1 else None


class _Constant:
    """A 0-d float32 tensor of a fixed value, made once per device by a fill (a copy could sync)."""

    def __init__(self, value: float) -> None:
        self._value = value
        self._tensor: Tensor | None = None

    def on(self, device: torch.device) -> Tensor:
        """The constant on `device`."""
        if self._tensor is None or self._tensor.device != device:
            self._tensor = torch.full((), self._value, dtype=torch.float32, device=device)
        return self._tensor


class _NormClipper:
    """`norm`: scale all gradients together to a global L2 norm of at most `max_norm`."""

    def __init__(self, max_norm: float) -> None:
        self._max_norm = max_norm
        self._threshold = _Constant(max_norm)

    @torch.no_grad()
    def clip_(self, params: list[Tensor], grads: list[Tensor], norms: Tensor, total: Tensor) -> ClipResult:
        coef = _norm_coef(self._max_norm, total)
        _scale_(grads, coef)
        return ClipResult(total * coef, coef, self._threshold.on(total.device))


class _ValueClipper:
    """`value`: clamp every gradient element to [-max_value, max_value]."""

    def __init__(self, max_value: float) -> None:
        self._max_value = max_value

    @torch.no_grad()
    def clip_(self, params: list[Tensor], grads: list[Tensor], norms: Tensor, total: Tensor) -> ClipResult:
        for idx in _group(grads):
            group = [grads[i] for i in idx]
            torch._foreach_clamp_min_(group, -self._max_value)
            torch._foreach_clamp_max_(group, self._max_value)
        after = _total_norm(grads, total.device)
        return ClipResult(after, _ratio(after, total), None)


class _ParamNormClipper:
    """`param_norm`: scale each gradient to an L2 norm of at most `max_norm` on its own."""

    def __init__(self, max_norm: float) -> None:
        self._max_norm = max_norm
        self._threshold = _Constant(max_norm)

    @torch.no_grad()
    def clip_(self, params: list[Tensor], grads: list[Tensor], norms: Tensor, total: Tensor) -> ClipResult:
        coefs = _norm_coef(self._max_norm, norms)
        per_device: dict[torch.device, tuple[Tensor, ...]] = {}
        for idx in _group(grads):
            device = grads[idx[0]].device
            if device not in per_device:
                per_device[device] = coefs.to(device, non_blocking=True).unbind(0)
            local = per_device[device]
            torch._foreach_mul_([grads[i] for i in idx], [local[i] for i in idx])
        after = torch.linalg.vector_norm(norms * coefs)
        return ClipResult(after, _ratio(after, total), self._threshold.on(total.device))


class _AgcClipper:
    """`agc`: unit-wise adaptive clipping (Brock et al. 2021), as timm's `adaptive_clip_grad`.

    A unit is a row of the first dimension (an output neuron or channel) of a parameter with
    two or more dimensions, or the whole parameter otherwise. A unit's gradient G_i is scaled
    to clip_factor * max(|W_i|, eps) / |G_i| when its norm exceeds clip_factor * max(|W_i|, eps).
    """

    def __init__(self, clip_factor: float, eps: float, exclude: Collection[Tensor]) -> None:
        self._factor = clip_factor
        self._eps = eps
        self._exclude = frozenset(id(p) for p in exclude)

    @torch.no_grad()
    def clip_(self, params: list[Tensor], grads: list[Tensor], norms: Tensor, total: Tensor) -> ClipResult:
        # Only the unit norms need one call per parameter; the arithmetic runs as `_foreach_*` calls.
        clipped, scales, unit_norms = [], [], []
        for i, (p, g) in enumerate(zip(params, grads)):
            if id(p) in self._exclude:
                continue
            dims = _unit_dims(g.dim())
            clipped.append(g)
            scales.append(torch.linalg.vector_norm(p, 2, dims, True, dtype=_accumulate_dtype(p.dtype)))
            if dims is None and g.device == norms.device:
                unit_norms.append(norms[i])  # the whole tensor is the unit: its norm is already known
            else:
                unit_norms.append(torch.linalg.vector_norm(g, 2, dims, True, dtype=_accumulate_dtype(g.dtype)))
        if clipped:
            torch._foreach_clamp_min_(scales, self._eps)
            torch._foreach_mul_(scales, self._factor)  # the limit: clip_factor * max(|W_i|, eps)
            torch._foreach_div_(scales, unit_norms)
            torch._foreach_clamp_max_(scales, 1.0)  # limit / |G_i|, or 1 when below the limit
            torch._foreach_mul_(clipped, scales)
        after = _total_norm(grads, total.device)
        return ClipResult(after, _ratio(after, total), None)


class _PercentileClipper:
    """`auto_percentile`: AutoClip (Seetharaman et al. 2020).

    Each step records the total norm (before clipping) in a ring of the last `history` finite
    norms, then clips to their `percentile`-th percentile, the current norm included.
    """

    def __init__(self, percentile: float, history: int) -> None:
        self._q = percentile / 100.0
        self._size = history
        self._state: tuple[Tensor, Tensor, Tensor] | None = None

    def _state_on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """The history ring (+inf where unfilled), the next slot and the count of values held."""
        if self._state is None:
            self._state = (
                torch.full((self._size,), _INF, dtype=torch.float32, device=device),
                torch.zeros(1, dtype=torch.long, device=device),
                torch.zeros((), dtype=torch.long, device=device),
            )
        elif self._state[0].device != device:
            ring, slot, count = self._state
            self._state = (ring.to(device), slot.to(device), count.to(device))
        return self._state

    @torch.no_grad()
    def clip_(self, params: list[Tensor], grads: list[Tensor], norms: Tensor, total: Tensor) -> ClipResult:
        ring, slot, count = self._state_on(total.device)
        finite = torch.isfinite(total)
        # A non-finite norm rewrites the slot with its old value and advances nothing, so this
        # step's threshold comes from the finite history alone.
        ring.index_copy_(0, slot, torch.where(finite, total, ring.index_select(0, slot)))
        slot.add_(finite).remainder_(self._size)
        count.add_(finite).clamp_(max=self._size)
        threshold = _percentile(ring, count, self._q)
        coef = _norm_coef(threshold, total)
        _scale_(grads, coef)
        return ClipResult(total * coef, coef, threshold)


class _ZScoreClipper:
    """`zscore`: ZClip (Kumar et al. 2025).

    The first `warmup` finite norms are not clipped; their mean and population variance start
    an EMA. Afterwards a norm whose z-score exceeds `z_threshold` is clipped to
    mean + z_threshold * std, and the EMA is updated with the clipped norm: mean first, then
    the variance around the updated mean, as in the ZClip reference.
    """

    def __init__(self, alpha: float, z_threshold: float, warmup: int) -> None:
        self._alpha = alpha
        self._z = z_threshold
        self._warmup = warmup
        self._state: tuple[Tensor, Tensor, Tensor] | None = None

    def _state_on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Finite warm-up norms seen (float32, stops at `warmup`), mean and variance."""
        if self._state is None:
            zeros = [torch.zeros((), dtype=torch.float32, device=device) for _ in range(3)]
            self._state = (zeros[0], zeros[1], zeros[2])
        elif self._state[0].device != device:
            ring, slot, count = self._state
            self._state = (ring.to(device), slot.to(device), count.to(device))
        return self._state

    @torch.no_grad()
    def clip_(self, params: list[Tensor], grads: list[Tensor], norms: Tensor, total: Tensor) -> ClipResult:
        seen, mean, var = self._state_on(total.device)
        keep = ~torch.isfinite(total)
        warm = seen < self._warmup
        # z > z_threshold  <=>  total > mean + z_threshold * std: no division by a zero std.
        threshold = torch.where(warm, _INF, mean + self._z * var.sqrt())
        coef = _norm_coef(threshold, total)
        _scale_(grads, coef)
        x = torch.minimum(total, threshold)  # the clipped norm; the norm itself during warm-up
        # Warm-up: running mean and population variance of the norms so far (Welford).
        seen1 = seen + 1
        w_mean = mean + (x - mean) / seen1
        w_var = var + ((x - mean) * (x - w_mean) - var) / seen1
        # After warm-up, the EMA: lerp(a, b, 1 - alpha) = alpha * a + (1 - alpha) * b.
        e_mean = torch.lerp(mean, x, 1.0 - self._alpha)
        e_var = torch.lerp(var, (x - e_mean) ** 2, 1.0 - self._alpha)
        self._state = (
            torch.where(keep | ~warm, seen, seen1),
            torch.where(keep, mean, torch.where(warm, w_mean, e_mean)),
            torch.where(keep, var, torch.where(warm, w_var, e_var)),
        )
        return ClipResult(total * coef, coef, threshold)
