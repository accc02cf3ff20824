"""Activation scale and output-logit statistics as pure tensor functions: 0-d float32 device
tensors that the watcher adds (sums) or takes the maximum of, across the calls and
micro-batches of a step. Nothing here reads a value back to the host.

- max |x| of a layer's output (`absmax`), which with the RMS (from its sum of squares) gives
  the outlier measure max |x| / RMS;
- on the output layer, the max logit and the sum over positions of logsumexp over the last
  (vocabulary) dim (`logit_sums`), the quantities z-loss controls.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: logsumexp runs over at most this many logits at a time, so its float32 temporaries stay
#: bounded (64 MB) whatever the batch, sequence and vocabulary.
LSE_CHUNK = 1 << 24


def absmax(y: Tensor) -> Tensor:
    """max |y| as a 0-d float32 tensor (NaN if any element is NaN): max(max y, -min y) from one
    `aminmax` pass, no copy (on one CPU thread `vector_norm(y, inf)` took 10 times as long)."""
    low, high = torch.aminmax(y)
    return torch.maximum(high, low.neg()).to(torch.float32)


def logit_sums(y: Tensor) -> tuple[Tensor, Tensor]:
    """(max logit, Σ over positions of logsumexp over the last dim) of logits `y` (..., vocab),
    both 0-d float32; the host divides the sum by the number of positions. logsumexp runs in
    float32 over chunks of positions (`LSE_CHUNK` logits each)."""
    flat = y.reshape(-1, y.shape[-1])
    per = max(1, LSE_CHUNK // max(1, flat.shape[1]))
    sums = [torch.logsumexp(part.float(), dim=-1).sum() for part in flat.split(per)]
    total = sums[0] if len(sums) == 1 else torch.stack(sums).sum()
    return flat.amax().float(), total
