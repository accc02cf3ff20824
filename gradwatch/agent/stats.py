"""Activation statistics as pure tensor functions: no host sync, results stay on the device.

Each makes one or two passes over the output with no bool masks: on one CPU thread
`torch.std_mean` and mask-and-sum were several times slower on conv-sized outputs.
"""

from __future__ import annotations

import torch


def mean_std(y: torch.Tensor) -> torch.Tensor:
    """[mean, std] of all elements (population std), float32, in two passes."""
    n = max(y.numel(), 1)
    mean = y.sum(dtype=torch.float32) / n
    std = (y.float() - mean).square_().sum().div_(n).sqrt_()
    return torch.stack((mean, std))


def saturation_ratio(y: torch.Tensor, low: float, high: float, eps: float) -> torch.Tensor:
    """Fraction of outputs within `eps` of the asymptotes: y < low + eps or y > high - eps."""
    center, reach = (low + high) / 2, (high - low) / 2 - eps
    return torch.sub(y, center).abs_().gt_(reach).sum(dtype=torch.float32) / max(y.numel(), 1)


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
    dims = unit_dims(y.dim())
    if dims:  # a unit is dead when its largest and smallest outputs are both zero
        dead = ((y.amax(dim=dims) == 0) & (y.amin(dim=dims) == 0)).float().mean()
    else:
        dead = (y == 0).float().mean()
    nonzero = torch.sign(y).abs_().sum(dtype=torch.float32)
    return torch.stack((dead, 1.0 - nonzero / max(y.numel(), 1)))
