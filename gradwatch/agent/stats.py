"""Activation statistics as pure tensor functions: no host sync, results stay on the device."""

from __future__ import annotations

import torch


def mean_std(y: torch.Tensor) -> torch.Tensor:
    """[mean, std] of all elements (population std), float32."""
    std, mean = torch.std_mean(y, dim=None, correction=0)
    return torch.stack((mean, std)).float()


def saturation_ratio(y: torch.Tensor, low: float, high: float, eps: float) -> torch.Tensor:
    """Fraction of outputs within `eps` of the asymptotes: y < low + eps or y > high - eps."""
    return ((y < low + eps) | (y > high - eps)).float().mean()


def unit_dims(ndim: int) -> tuple[int, ...]:
    """Dims reduced to find a unit's activity: all but the unit (feature / channel) dim.

    2-D (batch, features) and 3-D (batch, sequence, features) outputs have their units
    last; 4-D and 5-D convolution outputs have channels at dim 1.
    """
    if ndim <= 1:
        return ()
    if ndim in (4, 5):
        return (0,) + tuple(range(2, ndim))
    return tuple(range(ndim - 1))


def dead_zero_ratios(y: torch.Tensor) -> torch.Tensor:
    """[dead_ratio, zero_ratio]: units that are zero for every sample, and zero outputs."""
    nonzero = y != 0
    dims = unit_dims(y.dim())
    per_unit = nonzero.sum(dim=dims) if dims else nonzero.long()
    dead = (per_unit == 0).float().mean()
    zero = 1.0 - per_unit.sum().float() / max(y.numel(), 1)
    return torch.stack((dead, zero))
