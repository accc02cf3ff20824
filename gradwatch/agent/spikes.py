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


def spike_flag(z: Tensor, warm: tuple[bool, bool], on: str, threshold: float) -> Tensor | None:
    """1.0 where the step is a spike, else 0.0 (a 0-d float tensor), from the z-scores [loss, norm]
    of which `warm` says which exist; None when `on` needs one that does not. `either`: the loss or
    the norm above `threshold`; `both`: both at once. An infinite z (a NaN/Inf loss or norm) is no
    spike: the non-finite guard and rules report those."""
    need = {"loss": (LOSS,), "grad_norm": (NORM,), "both": (LOSS, NORM)}.get(on)
    have = tuple(k for k in (LOSS, NORM) if warm[k])
    if need is None:  # either
        need = have
    if not need or any(not warm[k] for k in need):
        return None
    over = z.nan_to_num(nan=0.0, posinf=-1.0, neginf=-1.0) > threshold  # a non-finite value is the guards' business
    fired = over[need[0]] if len(need) == 1 else (over.all() if on == "both" else over.any())
    return fired.to(torch.float32)


class SpikeDetector:
    """The rings of the loss (row 0) and of the total norm (row 1) on the device, and how many
    values each has taken (on the host: the warm-up needs no device read)."""

    def __init__(self, window: int, warmup: int, device: torch.device) -> None:
        self.warmup = warmup
        self.rings = torch.full((2, window), float("nan"), device=device)
        self.fed = [0, 0]
        self._pos = [0, 0]

    def score(self, loss: Tensor | None, norm: Tensor | None) -> tuple[Tensor | None, tuple[bool, bool]]:
        """The z-scores [loss, norm] of the given values (a (2,) tensor, None when neither is past
        its warm-up) and which of them are (`warm`); then the values enter their rings."""
        given = [k for k, x in ((LOSS, loss), (NORM, norm)) if x is not None]
        if not given:
            return None, (False, False)
        warm = (loss is not None and self.fed[LOSS] >= self.warmup, norm is not None and self.fed[NORM] >= self.warmup)
        if len(given) == 2:
            x = torch.stack((loss, norm))  # type: ignore[arg-type]
        else:
            x = (loss if loss is not None else norm).reshape(1).expand(2)  # type: ignore[union-attr]
        z = robust_z(self.rings, x) if any(warm) else None
        finite = x.nan_to_num(nan=float("nan"), posinf=float("nan"), neginf=float("nan"))
        for k in given:
            self.rings[k, self._pos[k]].copy_(finite[k])
            self._pos[k] = (self._pos[k] + 1) % self.rings.shape[1]
            self.fed[k] += 1
        return z, warm
