"""Guards: what the agent does about non-finite gradients and a total norm above a hard limit.

`skip` and `raise` decide on the step itself, which costs one host synchronisation per step
(opt-in). `warn` and callbacks decide when a window of statistics reaches the host, with no
sync: the writer thread calls `window_events`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from typing import TYPE_CHECKING

import numpy as np
import torch

from gradwatch.agent import runlog
from gradwatch.agent.buffer import NO_GRAD, Layout
from gradwatch.agent.layers import Layer, Param

if TYPE_CHECKING:
    from gradwatch.agent.config import GuardConfig

log = logging.getLogger("gradwatch.agent")

Submit = Callable[[Callable[[], list[bytes]]], bool]
CountError = Callable[[str, BaseException], None]


_WHAT = {"nonfinite": "NaN/Inf gradient elements", "overflow": "gradient norm overflowed float32 (elements finite)",
         "norm_limit": "total gradient norm above the limit"}


class GradientGuardError(RuntimeError):
    """Raised by a guard whose action is `raise`; names the first params and layers affected."""


class Guards:
    """Applies one run's guard configuration, on the step (sync) or per window (async)."""

    def __init__(self, config: GuardConfig, layout: Layout, params: list[Param], layers: list[Layer],
                 run_name: str, submit: Submit, count_error: CountError) -> None:
        self.config = config
        self.synchronous = config.synchronous
        self._layout = layout
        self._params = params
        self._layers = layers
        self._run_name = run_name
        self._submit = submit
        self._count_error = count_error
        self._warned: set[str] = set()

    def blocks_step(self, step: int, norms: torch.Tensor, total: torch.Tensor, present: list[int],
                    bad: torch.Tensor) -> bool:
        """True when a `skip` guard fires; raises `GradientGuardError` for `raise`. One host sync.

        `bad` flags (per param, all of them) the gradients whose elements are NaN/Inf: a
        non-finite total without any is an `overflow` of the norm, not of the gradients.
        """
        cfg = self.config
        limit = cfg.max_total_norm if cfg.max_total_norm is not None else float("inf")
        nonfinite, over = torch.stack((~torch.isfinite(total), total > limit)).tolist()
        for fired, action, kind in ((nonfinite, cfg.nonfinite, "nonfinite"),
                                    (over and not nonfinite, cfg.max_total_norm_action, "norm_limit")):
            if not fired or action not in ("skip", "raise"):
                continue
            grad = np.full(self._layout.n_params, NO_GRAD)
            grad[present] = norms.tolist()
            flagged = np.asarray(bad.tolist()) > 0
            if kind == "nonfinite":
                if not flagged.any():
                    kind, flagged = "overflow", np.isinf(grad)
                names, layers = self._offenders(kind, grad, flagged)
            else:
                names, layers = self._offenders(kind, grad)
            total_value = float(total)
            count = int(flagged.sum()) if kind != "norm_limit" else None
            event = runlog.Event(kind, step, time.time(), {"params": names, "layers": layers, "action": action,
                                                           "limit": cfg.max_total_norm, "total": total_value,
                                                           "count": count})
            self._record(event)
            if action == "raise":
                what = (f"total gradient norm {total_value:.4g} above {limit}" if kind == "norm_limit"
                        else _WHAT[kind])
                raise GradientGuardError(f"gradwatch: {what} at step {step} in params {', '.join(names)}"
                                         + (f" (layers {', '.join(layers)})" if layers else ""))
            return True
        return False

    def _record(self, event: runlog.Event) -> None:
        encoded = [runlog.encode_event(event)]
        self._submit(lambda: encoded)

    def window_events(self, values: np.ndarray, steps: np.ndarray) -> list[bytes]:
        """`warn` and callback guards over a window of rows: the first offending step of each kind.

        `nonfinite` is a gradient with NaN/Inf elements; `overflow`, a norm that overflowed
        float32 while every element is finite. Both follow the `nonfinite` action.
        """
        cfg = self.config
        layout = self._layout
        grad = values[:, layout.grad_norm:layout.grad_norm + layout.n_params]
        bad = values[:, layout.grad_bad:layout.grad_bad + layout.n_params] > 0
        overflow = np.isinf(grad) & ~bad
        total = values[:, layout.run]
        checks = [("nonfinite", cfg.nonfinite, bad), ("overflow", cfg.nonfinite, overflow)]
        if cfg.max_total_norm is not None:
            over = (np.isfinite(total) & (total > cfg.max_total_norm))[:, None]
            checks.append(("norm_limit", cfg.max_total_norm_action, np.broadcast_to(over, grad.shape)))
        chunks = []
        for kind, action, flagged in checks:
            rows = np.flatnonzero(flagged.any(axis=1))
            if action in ("skip", "raise", "ignore") or rows.size == 0:
                continue
            r = int(rows[0])
            names, layers = self._offenders(kind, grad[r], flagged[r])
            data = {"params": names, "layers": layers, "action": action if isinstance(action, str) else "callback",
                    "steps": int(rows.size), "total": float(total[r]), "limit": cfg.max_total_norm,
                    "count": int(flagged[r].sum()) if kind != "norm_limit" else None}
            event = runlog.Event(kind, int(steps[r]), time.time(), data)
            chunks.append(runlog.encode_event(event))
            if action == "warn":
                if kind not in self._warned:
                    log.warning("gradwatch: %s at step %d (run %s): params %s", _WHAT[kind], event.step,
                                self._run_name, ", ".join(names) or "-")
                self._warned.add(kind)
            elif callable(action):
                try:
                    action({"kind": kind, "step": event.step, **data})
                except Exception as exc:  # a user's callback must not stop the writer
                    self._count_error("guard_callback", exc)
        return chunks

    def _offenders(self, kind: str, grad_norms: np.ndarray,
                   flagged: np.ndarray | None = None) -> tuple[list[str], list[str]]:
        """The first params (and their layers) to blame: the flagged ones (non-finite elements or
        an overflowed norm), or the largest norms."""
        if flagged is not None and kind != "norm_limit":
            order = np.flatnonzero(flagged)[:5]
        elif kind == "nonfinite":
            order = np.flatnonzero(~np.isfinite(grad_norms))[:5]
        else:
            order = np.argsort(-np.nan_to_num(grad_norms, nan=-1.0))[:3]
        bad = [self._params[i] for i in order]
        return [p.name for p in bad], list(dict.fromkeys(self._layers[p.layer].name or "<model>" for p in bad))
