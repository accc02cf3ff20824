"""Activation statistics under torch.compile: an opaque op in the graph that calls back at run time.

Python hooks that branch on the step cannot go into a compiled graph (each branch is a guard,
each new step a recompile). Instead, while dynamo traces them, the watcher's hooks put one
`gradwatch::observe` op per measured tensor into the graph (and, through a tensor hook, into
its backward). The op does nothing but hand the real tensor to the watcher at run time, which
measures it exactly as in eager mode, on the steps that measure activations (and where the
model itself is compiled with its hooks, `model.compile()`, the root pre-hook's start of a
forward pass goes the same way). No graph break,
no guard, no recompile; needs `torch.library.custom_op` (torch >= 2.4), and without it
compiled models are measured without activation statistics.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable

import torch

OUTPUT, GRADIENT, FORWARD = 0, 1, 2  # a layer's output, the gradient w.r.t. it, a forward pass starting
Receiver = Callable[[int, int, torch.Tensor], None]  # (layer index, kind, tensor)

_receivers: dict[int, weakref.WeakMethod[Receiver]] = {}
_keys = itertools.count(1)
AVAILABLE = hasattr(torch.library, "custom_op")
_observe: Callable[..., None] | None = None  # the op, defined by the first `register`


def register(receiver: Receiver) -> int:
    """A key for `observe` calls that reach the bound method `receiver` (held weakly); defines the
    op on first use, so that importing the agent does not pay for it."""
    global _observe
    if AVAILABLE and _observe is None:
        _observe = _define()
    key = next(_keys)
    _receivers[key] = weakref.WeakMethod(receiver)  # type: ignore[arg-type]
    return key


def unregister(key: int) -> None:
    """Later calls with `key` do nothing (a closed watcher, in a graph that outlives it)."""
    _receivers.pop(key, None)


def observe(y: torch.Tensor, token: torch.Tensor, receiver: int, layer: int, kind: int) -> None:
    """Put a call of `receiver(layer, kind, y)` into the graph being traced (AVAILABLE only)."""
    assert _observe is not None
    _observe(y, token, receiver, layer, kind)


def _deliver(y: torch.Tensor, receiver: int, layer: int, kind: int) -> None:
    ref = _receivers.get(receiver)
    target = ref() if ref is not None else None
    if target is not None:
        target(layer, kind, y)


def _define() -> Callable[..., None]:
    # `token` is declared mutated (and never written) so that no compiler drops an op with no output.
    @torch.library.custom_op("gradwatch::observe", mutates_args=("token",))
    def observe_op(y: torch.Tensor, token: torch.Tensor, receiver: int, layer: int, kind: int) -> None:
        _deliver(y, receiver, layer, kind)

    @observe_op.register_fake
    def _(y: torch.Tensor, token: torch.Tensor, receiver: int, layer: int, kind: int) -> None:
        return None

    return observe_op
