"""Guards: what the agent does about non-finite gradients, a total norm above a hard limit, and
loss or gradient-norm spikes.

`skip` and `raise` decide on the step itself, which costs one host synchronisation per step
(opt-in), except a spike `skip` with a fused optimizer (a 0/1 factor on the device) and
anything on the CPU. `warn` and callbacks decide when a window of statistics reaches the host,
with no sync: the writer thread calls `window_events`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gradwatch.agent import runlog
from gradwatch.agent.buffer import NO_GRAD, HostRows, Layout
from gradwatch.agent.health_layout import COUNT, FLAG, LOSS_Z, NORM_Z, SKIP
from gradwatch.agent.layers import Layer, Param

if TYPE_CHECKING:
    from gradwatch.agent.config import GuardConfig, SpikeConfig

log = logging.getLogger("gradwatch.agent")

Submit = Callable[[Callable[[], list[bytes]]], bool]
CountError = Callable[[str, BaseException], None]


_WHAT = {"nonfinite": "NaN/Inf gradient elements", "overflow": "gradient norm overflowed float32 (elements finite)",
         "norm_limit": "total gradient norm above the limit"}
#: Spike events per window at most (each names its step; `spikes` counts all of the window's).
MAX_SPIKE_EVENTS = 10
_MISSING = object()


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


class SpikeGuard:
    """Applies `guards.spike` to the steps the spike detector flags.

    `skip` with a fused optimizer (one whose step takes `found_inf`, as torch's fused Adam,
    AdamW and SGD do for the AMP scaler) sets that 0/1 tensor before the step: the kernels leave
    params and state as they were and the step count is put back, with no host sync. Otherwise
    `skip` and `raise` read the flag on the host (free on the CPU, one sync per step on a GPU)
    and a skipped step gets no gradients, as the non-finite guard does. Under torch.distributed
    the flag is all-reduced (max) first, so every rank skips the same steps.
    """

    def __init__(self, config: SpikeConfig, layout: Layout, optimizer: torch.optim.Optimizer, run_name: str,
                 scalar_names: list[str], submit: Submit, count_error: CountError) -> None:
        self.config = config
        self._layout = layout
        self._optimizer = optimizer
        self._run_name = run_name
        self._scalar_names = scalar_names
        self._submit = submit
        self._count_error = count_error
        self._warned = False
        self._previous: Any = _MISSING
        self.fused = bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
            bool(g.get("fused")) for g in optimizer.param_groups)
        self.acts = config.action in ("skip", "raise")
        dist = torch.distributed
        self._distributed = self.acts and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    @property
    def on_device(self) -> bool:
        """True when a skip is a 0/1 factor the optimizer applies on the device (no host read)."""
        return self.config.action == "skip" and self.fused

    def agree(self, flag: torch.Tensor) -> torch.Tensor:
        """The flag all ranks act on: the largest over them (a copy all-reduced under torch.distributed,
        else `flag` itself)."""
        if not self._distributed:
            return flag
        agreed = flag.clone()
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
        return agreed

    def arm(self, flag: torch.Tensor) -> None:
        """Before a fused step: skip its update where `flag` is 1, on top of an AMP scaler's own."""
        opt = self._optimizer
        self._previous = getattr(opt, "found_inf", None)
        found = flag if self._previous is None else torch.maximum(
            self._previous.to(flag.device, torch.float32), flag)
        opt.found_inf = found  # type: ignore[attr-defined]

    def disarm(self) -> None:
        """After the step (and on close): put back what the optimizer had before `arm`."""
        if self._previous is _MISSING:
            return
        previous, self._previous = self._previous, _MISSING
        if previous is None:
            if hasattr(self._optimizer, "found_inf"):
                del self._optimizer.found_inf  # type: ignore[attr-defined]
        else:
            self._optimizer.found_inf = previous  # type: ignore[attr-defined]

    def fire(self, step: int, data: dict[str, Any]) -> None:
        """A spike decided on the step (`skip` or `raise`): record it; raise for `raise`."""
        action = self.config.action
        event = runlog.Event("spike", step, time.time(), {**data, "action": action, "skipped": action == "skip"})
        encoded = [runlog.encode_event(event)]
        self._submit(lambda: encoded)
        if action == "raise":
            raise GradientGuardError(f"gradwatch: spike at step {step}: {_describe(data)}")
        self._warn(step, data)

    def window_events(self, values: np.ndarray, host: HostRows) -> list[bytes]:
        """`warn`, callback and on-device `skip` spikes of a window, one event per spike step (at most
        MAX_SPIKE_EVENTS); spikes already recorded on the step are left out."""
        action = self.config.action
        h = self._layout.health
        if action == "ignore" or h is None or not h.spikes:
            return []
        arrays, steps, s = host.health, host.steps, h.spike_start
        flagged = (arrays["spike_step"] == steps) & (values[:, s + FLAG] > 0) & (arrays["spike_sync"] != steps)
        rows = np.flatnonzero(flagged)
        chunks = []
        for r in rows[:MAX_SPIKE_EVENTS]:
            data = self.describe(values[r], host, int(r))
            skipped = bool(values[r, s + SKIP] > 0) or bool(host.skipped[r])
            data.update(action=action if isinstance(action, str) else "callback", skipped=skipped,
                        spikes=int(rows.size))
            event = runlog.Event("spike", int(steps[r]), time.time(), data)
            chunks.append(runlog.encode_event(event))
            if callable(action):
                try:
                    action({"kind": "spike", "step": event.step, **data})
                except Exception as exc:  # a user's callback must not stop the writer
                    self._count_error("guard_callback", exc)
            elif action in ("warn", "skip", "raise"):
                self._warn(event.step, data)
        return chunks

    def describe(self, row: np.ndarray, host: HostRows, r: int) -> dict[str, Any]:
        """A spike's evidence from its buffer row (on the host): loss, total norm, their z-scores,
        which of them crossed the threshold, and the spikes counted so far."""
        h, layout, cfg = self._layout.health, self._layout, self.config
        assert h is not None
        arrays, step, s = host.health, int(host.steps[r]), h.spike_start
        loss = None
        if cfg.loss in self._scalar_names:
            slot = self._scalar_names.index(cfg.loss)
            count = int(host.scalar_count[r, slot])
            loss = float(row[layout.scalars + slot]) / count if count else None
        loss_z = float(row[s + LOSS_Z]) if arrays["loss_z_step"][r] == step else None
        norm = float(row[layout.run]) if host.measured[r] else None
        norm_z = float(row[s + NORM_Z]) if arrays["norm_z_step"][r] == step else None
        reasons = [name for name, z in (("loss", loss_z), ("grad_norm", norm_z))
                   if z is not None and z > cfg.z_threshold]
        return {"reasons": reasons, "loss": loss, "loss_z": loss_z, "grad_norm": norm, "grad_norm_z": norm_z,
                "threshold": cfg.z_threshold, "on": cfg.on, "count": float(row[s + COUNT])}

    def _warn(self, step: int, data: dict[str, Any]) -> None:
        if self.config.action == "ignore" or callable(self.config.action) or self._warned:
            return
        self._warned = True
        log.warning("gradwatch: spike at step %d (run %s): %s; action %s (later spikes are recorded as events)",
                    step, self._run_name, _describe(data), self.config.action)


def _describe(data: dict[str, Any]) -> str:
    parts = []
    for name, key in (("loss", "loss"), ("total gradient norm", "grad_norm")):
        z = data.get(f"{key}_z")
        if z is not None:
            value = data.get(key)
            parts.append(f"{name} {value:.4g} (z {z:.3g})" if value is not None else f"{name} z {z:.3g}")
    return ", ".join(parts) + f" above z {data.get('threshold')}"
