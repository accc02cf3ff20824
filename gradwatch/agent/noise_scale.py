"""The gradient noise scale B_simple (McCandlish et al. 2018) from two batch sizes a job already has.

Under gradient accumulation (k micro-batches per step) and data parallelism (R ranks whose
gradients DDP averages), each micro-batch's gradient g_i and the step's gradient are estimates
of the true gradient G from batches of 1 and K = k·R micro-batches. With |G_small|² the mean of
rank 0's |g_i|² and |G_big|² = |grad at the step|² / k² (the mean of the K micro-gradients):

    |G|² ≈ (K·|G_big|² - |G_small|²) / (K - 1)      tr(Σ) ≈ K·(|G_small|² - |G_big|²) / (K - 1)

(tr(Σ) per micro-batch), and B_simple = tr(Σ) / |G|² in micro-batches: multiply by the samples
(or tokens) of one micro-batch on one rank for McCandlish's units. Both estimates are noisy,
so B_simple is the ratio of their exponential moving averages (as McCandlish advise).

Not free: on a measured step a tensor hook on every param norms each micro-batch's gradient
(one reduction per param per micro-batch), so it is opt-in (`measure.noise_scale_every`).
With one micro-batch per step and one rank (K = 1) there is only one batch size and nothing
is measured; sharded (FSDP) params are not supported.
"""

from __future__ import annotations

from collections.abc import Callable
import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

#: Weight of the past in the moving averages of |G|² and tr(Σ), per measured step.
EMA_DECAY = 0.9


def noise_estimates(small_sq: Tensor, big_sq: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(|G|², tr(Σ) per micro-batch) from the mean squared norm of single micro-batch gradients,
    the squared norm of the mean of `k` of them, and k >= 2."""
    return (k * big_sq - small_sq) / (k - 1), k * (small_sq - big_sq) / (k - 1)


class NoiseScale:
    """Per-param tensor hooks on measured steps, and the device state of the moving averages."""

    def __init__(self, params: list[Tensor], every: int, ranks: int, device: torch.device) -> None:
        self._params = [p for p in params if p.requires_grad]
        self._every = every
        self._ranks = ranks
        self._device = device
        self._handles: list[RemovableHandle] = []
        self._norms: list[Tensor] = []
        self._calls = [0] * len(self._params)
        self._averages = torch.zeros(2, device=device)  # EMA of |G|² and of tr(Σ)

    def due(self, step: int) -> bool:
        return step % self._every == 0

    def arm(self, step: int) -> None:
        """Hook every param for the backward passes of `step` when it is measured."""
        self.disarm()
        if not self.due(step):
            return
        self._norms.clear()
        self._calls = [0] * len(self._params)
        self._handles = [p.register_hook(self._hook(i)) for i, p in enumerate(self._params)]

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, i: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            g = grad.coalesce().values() if grad.is_sparse else grad
            self._norms.append(torch.linalg.vector_norm(g, dtype=torch.float32).to(self._device))
            self._calls[i] += 1
        return hook

    def measure(self, total: Tensor, scale: Tensor | None) -> Tensor | None:
        """[|G|², tr(Σ), B_simple] for the step just hooked, from the total norm of its gradient
        (before clipping, unscaled) and the AMP loss scale its backward passes ran under; None
        when the step had one batch size (`batches` says how many micro-batches it had)."""
        self.disarm()
        k = self.calls
        if k * self._ranks < 2 or not self._norms:
            self._norms.clear()
            return None
        small = torch.stack(self._norms).square().sum() / k
        if scale is not None:
            small = small / scale.to(self._device, torch.float32).square()
        self._norms.clear()
        estimates = torch.stack(noise_estimates(small, total.square() / (k * k), k * self._ranks))
        self._averages.mul_(EMA_DECAY).add_(estimates, alpha=1.0 - EMA_DECAY)
        return torch.cat((estimates, self._averages[1:] / self._averages[:1]))

    @property
    def calls(self) -> int:
        """Backward passes seen on the hooked step (0 when none reached a param)."""
        return max(self._calls, default=0)

    @property
    def batches(self) -> int:
        """Micro-batch gradients the hooked step averaged: backward passes times ranks."""
        return self.calls * self._ranks
