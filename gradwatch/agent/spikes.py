"""Spikes: robust z-scores of the loss and of the total gradient norm against their recent past,
kept on the device.

Each series has a ring of its last `window` finite values (NaN where empty or where a value was
not finite). A new value x is scored against the ring *before* it enters:

    z = (x - median) / max(1.4826 · MAD, 0.01 · |median|, 1e-12)

with median and MAD (the median of |ring - median|) over the ring's non-NaN values, torch's
`nanmedian` (of an even count, the lower of the two middle values). 1.4826 · MAD is the
standard deviation of normal data; the floors keep a series that barely moves from calling a
rounding-sized change a spike. Every finite value enters the ring, spikes too: the median
shrugs them off, and a lasting change of level becomes the new normal after window/2 steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: 1.4826 · MAD estimates the standard deviation of normally distributed values.
MAD_SCALE = 1.4826
#: The z-score's scale is at least this fraction of |median| ...
REL_FLOOR = 0.01
#: ... and at least this.
ABS_FLOOR = 1e-12
LOSS, NORM = 0, 1


def robust_z(history: Tensor, x: Tensor) -> Tensor:
    """Per row of `history` (rows, window): the robust z-score of `x[row]` against the row's non-NaN
    values (NaN where a row has none). No host synchronisation."""
    med = history.nanmedian(dim=-1).values
    mad = (history - med.unsqueeze(-1)).abs_().nanmedian(dim=-1).values
    scale = torch.maximum(mad.mul_(MAD_SCALE), med.abs().mul_(REL_FLOOR)).clamp_min_(ABS_FLOOR)
    return (x - med).div_(scale)


def spike_flag(z_loss: Tensor | None, z_norm: Tensor | None, on: str, threshold: float) -> Tensor | None:
    """1.0 where the step is a spike, else 0.0 (0-d float tensors); None when `on` needs a z-score
    that is missing. `either`: the loss or the norm above `threshold`; `both`: both at once."""
    loss = None if z_loss is None else z_loss > threshold
    norm = None if z_norm is None else z_norm > threshold
    if on == "loss":
        fired = loss
    elif on == "grad_norm":
        fired = norm
    elif on == "both":
        fired = None if loss is None or norm is None else loss & norm
    else:
        fired = loss if norm is None else norm if loss is None else loss | norm
    return None if fired is None else fired.to(torch.float32)


class SpikeDetector:
    """The rings of the loss (row 0) and of the total norm (row 1) on the device, and how many
    values each has taken (on the host: the warm-up needs no device read)."""

    def __init__(self, window: int, warmup: int, device: torch.device) -> None:
        self.warmup = warmup
        self.rings = torch.full((2, window), float("nan"), device=device)
        self.fed = [0, 0]
        self._pos = [0, 0]

    def score(self, loss: Tensor | None, norm: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """z-scores of the given values (None for a series not given or still warming up), then
        the values enter their rings."""
        given = [k for k, x in ((LOSS, loss), (NORM, norm)) if x is not None]
        if not given:
            return None, None
        values = [loss, norm]
        if len(given) == 2:
            x = torch.stack((loss, norm))  # type: ignore[arg-type]
            z = robust_z(self.rings, x)
            zs: list[Tensor | None] = [z[0], z[1]]
        else:
            k = given[0]
            x = values[k].reshape(1)  # type: ignore[union-attr]
            z = robust_z(self.rings[k:k + 1], x)
            zs = [None, None]
            zs[k] = z[0]
        finite = x.nan_to_num(nan=float("nan"), posinf=float("nan"), neginf=float("nan"))
        for j, k in enumerate(given):
            self.rings[k, self._pos[k]].copy_(finite[j])
            self._pos[k] = (self._pos[k] + 1) % self.rings.shape[1]
        out = [zs[k] if self.fed[k] >= self.warmup else None for k in (LOSS, NORM)]
        for k in given:
            self.fed[k] += 1
        return out[LOSS], out[NORM]
