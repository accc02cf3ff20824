"""Activation statistics as pure tensor functions: raw sums and counts that stay on the device.

The device only sums (one reduction per statistic, no bool masks: on one CPU thread
`torch.var_mean`, `isfinite`-and-sum and `ne(0)`-and-sum were 5 to 20 times slower on
conv-sized outputs); the host divides by the element and unit counts it knows, when a
window is flushed. Sums over
the micro-batches of a step then give the exact statistics of the whole step. Every value
is a 0-d float32 tensor, so the watcher can stack a step's values into one device op.
"""

from __future__ import annotations

import torch


# Sums are shifted when mean^2 exceeds this many variances: E[y^2] - mean^2 from float32 sums then
# loses about 6e-8 x this of the variance, so below it the plain sums are exact to ~1e-5.
CANCELLATION = 100.0


def norm32(t: torch.Tensor) -> torch.Tensor:
    """L2 norm as a 0-d float32 tensor: accumulated in float32 for 16-bit floats, in their own
    precision for float64 (which `dtype=float32` would refuse as narrowing)."""
    if t.dtype == torch.float64:
        return torch.linalg.vector_norm(t).to(torch.float32)
    return torch.linalg.vector_norm(t, dtype=torch.float32)


def moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, L2 norm) of all elements as 0-d float32: the unshifted sums, two passes, no copy."""
    return y.sum(dtype=torch.float32), norm32(y)


def cancels(total: float, norm: float, count: int) -> bool:
    """Whether the variance from these unshifted sums would suffer cancellation (see CANCELLATION)."""
    mean = total / count
    return mean * mean > CANCELLATION * max(norm * norm / count - mean * mean, 0.0)


def shift_of(y: torch.Tensor) -> torch.Tensor:
    """A 0-d float32 estimate of the mean of `y` from about 1024 evenly spaced elements, or 0
    where that sample is not finite.

    Subtracting it before the sums keeps E[(y-c)^2] - E[y-c]^2 free of cancellation when the
    mean is large against the spread (a saturated sigmoid: mean 0.95, std 3e-4).
    """
    flat = y.reshape(-1)
    sample = flat[::max(1, flat.numel() // 1024)]
    return torch.nan_to_num(sample.mean(dtype=torch.float32), nan=0.0, posinf=0.0, neginf=0.0)


def shifted_moments(y: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of y - shift, L2 norm of y - shift, count of non-finite elements), all 0-d float32.

    The host makes mean = shift + sum/n and var = norm^2/n - (sum/n)^2 (exact across the
    micro-batches of a step, which share the shift). A NaN or Inf output makes the sums
    non-finite, as it should, and is counted on its own: y * 0 is NaN exactly there.
    """
    d = torch.sub(y.to(torch.float32), shift)
    total = d.sum(dtype=torch.float32)
    norm = torch.linalg.vector_norm(d, dtype=torch.float32)
    nonfinite = d.mul_(0.0).nan_to_num_(nan=1.0).sum(dtype=torch.float32)
    return total, norm, nonfinite


def saturated_count(y: torch.Tensor, low: float, high: float, eps: float) -> torch.Tensor:
    """Outputs within `eps` of the asymptotes: y < low + eps or y > high - eps.

    16-bit outputs (autocast) are compared in float32: |y - center| rounded to bfloat16 would
    move the threshold by more than `eps`.
    """
    if y.dtype in (torch.float16, torch.bfloat16):
        y = y.float()
    center, reach = (low + high) / 2, (high - low) / 2 - eps
    return torch.sub(y, center).abs_().gt_(reach).sum(dtype=torch.float32)


def unit_dims(ndim: int, channels_first: bool = False) -> tuple[int, ...]:
    """Dims reduced to find a unit's activity: all but the unit (feature / channel) dim.

    2-D (batch, features) and 3-D (batch, sequence, features) outputs have their units
    last; 4-D and 5-D convolution outputs, and 3-D ones when `channels_first` (after a
    Conv1d: batch, channels, length), have channels at dim 1.
    """
    if ndim <= 1:
        return ()
    if ndim in (4, 5) or (ndim == 3 and channels_first):
        return (0,) + tuple(range(2, ndim))
    return tuple(range(ndim - 1))


def nonzero_per_unit(y: torch.Tensor, nonnegative: bool, channels_first: bool = False,
                     finite: bool = False) -> torch.Tensor:
    """Each unit's count of non-zero outputs (float32, one entry per unit): a unit with none is dead.

    |sign(y)| is 1 where an output is non-zero (-0.0 counts as zero), summed over the unit
    dims; NaN becomes 1 first (`torch.sign(nan)` is 0), so a NaN output is never a zero or a
    dead unit's (with `finite`, the caller knows there is none and that copy is skipped).
    `nonnegative` (ReLU, ReLU6) skips the `abs_`, which only negative outputs need. The watcher adds the counts of a step's micro-batches before it counts the dead
    units, so a unit is dead only if it is zero for every sample of the step.
    """
    nonzero = torch.sign(y) if finite else torch.nan_to_num(y, nan=1.0).sign_()
    if not nonnegative:
        nonzero.abs_()
    dims = unit_dims(y.dim(), channels_first)
    return nonzero.sum(dim=dims, dtype=torch.float32) if dims else nonzero.to(torch.float32)
