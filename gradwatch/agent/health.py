"""The watcher's optimizer-health, spike and noise-scale measurements: when each runs on the step
path and where its values go. The maths is in `optimizer_health`, `spikes` and `noise_scale`;
the spike guard's actions in `guards.SpikeGuard`; the columns in `health_layout`.

The watcher calls `before_update` (after its gradient norms, guards and clipping, before the
optimizer applies the update), `after_step`, `logged` (after `log()`), `window_events` (on the
writer thread) and `close`. Every call catches its own failures (counted, never raised), except
a spike guard set to `raise`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from gradwatch.agent import runlog
from gradwatch.agent.buffer import HostRows, Layout
from gradwatch.agent.guards import CountError, GradientGuardError, SpikeGuard, Submit
from gradwatch.agent.health_layout import (COUNT, FLAG, LOSS_Z, NOISE_METRICS, NORM_Z, RATE, SKIP, SPIKE_METRICS,
                                           SPIKE_WIDTH, HealthColumns, host_arrays)
from gradwatch.agent.layers import Param
from gradwatch.agent.noise_scale import NoiseScale
from gradwatch.agent.optimizer_health import AdamState, describe, is_adam_family, optimizer_table, weight_decays
from gradwatch.agent.sharding import is_sharded
from gradwatch.agent.spikes import LOSS, SpikeDetector, spike_flag

if TYPE_CHECKING:
    from gradwatch.agent.config import AgentConfig

log = logging.getLogger("gradwatch.agent")


def health_columns(config: AgentConfig, optimizer: torch.optim.Optimizer, model: nn.Module,
                   params: list[Param]) -> HealthColumns:
    """Which families this run measures: Adam-family state (when the optimizer has it and
    `measure.optimizer_every` is not 0), spikes (`guards.spike.enabled`), the noise scale
    (`measure.noise_scale_every`). Sharded params get neither the Adam statistics nor the noise
    scale (their state and gradients are shards)."""
    sharded = any(is_sharded(p.tensor) for p in params)
    adam = bool(config.measure.optimizer_cadence) and is_adam_family(optimizer) and not sharded
    noise = bool(config.measure.noise_scale_every) and not sharded
    return HealthColumns(optimizer_table(optimizer, model, params), adam=adam, spikes=config.guards.spike.enabled,
                         noise=noise, n_groups=len(optimizer.param_groups))


def health_info(optimizer: torch.optim.Optimizer, columns: HealthColumns | None) -> dict[str, Any]:
    """The run header's optimizer details (see `optimizer_health.describe`)."""
    return describe(optimizer, columns.table) if columns is not None else {}


class Health:
    """Runs the health measurements of one watcher on its step path (see the module docstring)."""

    def __init__(self, config: AgentConfig, layout: Layout, optimizer: torch.optim.Optimizer, params: list[Param],
                 buf: torch.Tensor, buf_host: np.ndarray | None, host: HostRows, scalar_names: list[str], *,
                 run_name: str, scaler: Any, replicated: bool, submit: Submit, count_error: CountError) -> None:
        assert layout.health is not None
        self._h = layout.health
        self._layout = layout
        self._config = config
        self._optimizer = optimizer
        self._tensors = [p.tensor for p in params]
        self._buf = buf
        self._buf_host = buf_host
        self._host = host
        self._rows = buf.shape[0]
        self._scalar_names = scalar_names
        self._scaler = scaler
        self._submit = submit
        self._count_error = count_error
        self._finished = -1  # the last step whose update was applied (or skipped)
        self._loss_done = -1  # the last step whose loss entered the spike detector
        self._told: set[str] = set()
        host.health.update(host_arrays(self._rows, self._h.n_params, self._h.n_groups))
        device = buf.device
        self._every = config.measure.optimizer_cadence
        self._adam = AdamState(optimizer, self._tensors, device) if self._h.adam else None
        spike = config.guards.spike
        self._detector = SpikeDetector(spike.window, spike.warmup, device) if self._h.spikes else None
        self._guard = SpikeGuard(spike, layout, optimizer, run_name, scalar_names, submit, count_error)
        self._count = torch.zeros((), device=device)
        self._zero, self._zero2 = torch.zeros((), device=device), torch.zeros(2, device=device)
        self._nan2 = torch.full((2,), float("nan"), device=device)
        guards = config.guards
        self._can_skip = "skip" in (spike.action, guards.nonfinite) or (
            guards.max_total_norm is not None and guards.max_total_norm_action == "skip")
        self._skips = torch.zeros(spike.window, device=device)  # the last `window` steps' skips (0/1)
        self._skip_pos = self._skip_fed = 0
        s = self._h.spike_start
        self._spike_cols = [buf[r, s:s + SPIKE_WIDTH] for r in range(self._rows)]
        dist = torch.distributed
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self._replica = replicated and world > 1 and dist.get_rank() != 0
        self._noise = None
        if self._h.noise and not self._replica:
            self._noise = NoiseScale(self._tensors, config.measure.noise_scale_every, world if replicated else 1,
                                     device)
            self._noise.arm(0)

    # ------------------------------------------------------------------ the step path

    def before_update(self, step: int, first: bool) -> None:
        """Before the optimizer applies the step: the second-moment lag, the spike z-scores and the
        spike guard (which may skip the update or raise), the noise scale."""
        if not first:
            return
        row = step % self._rows
        if self._adam is not None and step % self._every == 0 and self._host.measured[row]:
            self._safely("optimizer_state", self._measure_lag, step, row)
        if self._noise is not None:
            self._safely("noise_scale", self._measure_noise, step, row)
        if self._detector is not None:
            try:
                self._spike_step(step, row)
            except GradientGuardError:
                raise
            except Exception as exc:
                self._count_error("spike", exc)

    def after_step(self, step: int) -> None:
        """After the optimizer step: put back what the spike guard armed, the Adam update
        statistics, the weight decay the bands are derived from, the noise hooks for the next step."""
        self._finished = step
        self._safely("spike", self._guard.disarm)
        row = step % self._rows
        host = self._host
        if self._adam is not None and step % self._every == 0 and host.measured[row] and not host.skipped[row]:
            self._safely("optimizer_state", self._measure_update, step, row)
        if host.update_due[row] or host.param_due[row]:
            self._safely("optimizer_state", self._record_weight_decay, step, row)
        if self._noise is not None:
            self._safely("noise_scale", self._noise.arm, step + 1)

    def logged(self, step: int) -> None:
        """After `log()` filed scalars under `step`: a loss logged after that step's update is
        z-scored now (one logged before it was scored by `before_update`)."""
        if self._detector is None or step > self._finished or step == self._loss_done:
            return
        try:
            self._score_late_loss(step)
        except Exception as exc:
            self._count_error("spike", exc)

    def window_events(self, values: np.ndarray, host: HostRows) -> list[bytes]:
        """The window's spike events (writer thread)."""
        return self._guard.window_events(values, host) if self._detector is not None else []

    def snapshot(self, value: Callable[[str], float | None]) -> dict[str, Any]:
        """The latest spike and noise-scale values for `Watcher.snapshot()` (None: not measured)."""
        out: dict[str, Any] = {}
        if self._detector is not None:
            out["spikes"] = {name: value(name) for name in SPIKE_METRICS}
        if self._h.noise:
            out["noise_scale"] = {name: value(name) for name in NOISE_METRICS}
        return out

    def close(self) -> None:
        """Remove the noise hooks and whatever the spike guard set on the optimizer."""
        self._guard.disarm()
        if self._noise is not None:
            self._noise.disarm()

    # ------------------------------------------------------------------ internals

    def _safely(self, where: str, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # the agent never breaks the training loop
            self._count_error(where, exc)

    def _record_weight_decay(self, step: int, row: int) -> None:
        weight_decays(self._optimizer, self._host.health["wd"][row])
        self._host.health["band_step"][row] = step

    def _measure_lag(self, step: int, row: int) -> None:
        assert self._adam is not None
        got = self._adam.measure_lag(getattr(self._optimizer, "grad_scale", None))
        if got is None:
            return
        lag, present = got
        p, start = self._h.n_params, self._h.adam_start
        self._buf[row, start + 2 * p:start + 3 * p].copy_(lag)
        mask = self._host.health["lag_present"][row]
        mask[:] = False
        mask[present] = True
        self._host.health["lag_step"][row] = step

    def _measure_update(self, step: int, row: int) -> None:
        assert self._adam is not None
        got = self._adam.measure_update()
        if got is None:
            return
        rms, frac, present = got
        p, start = self._h.n_params, self._h.adam_start
        self._buf[row, start:start + 2 * p].copy_(torch.cat((rms, frac)))
        mask = self._host.health["opt_present"][row]
        mask[:] = False
        mask[present] = True
        self._host.health["opt_step"][row] = step

    def _measure_noise(self, step: int, row: int) -> None:
        assert self._noise is not None
        if not self._noise.due(step):
            self._noise.disarm()  # armed for a step the AMP scaler skipped: nothing to measure
            return
        total = self._buf[row, self._layout.run]
        scale = getattr(self._scaler, "_scale", None)
        got = self._noise.measure(total, scale if isinstance(scale, torch.Tensor) else None)
        if got is None or not self._host.measured[row]:
            if got is None and "noise_scale" not in self._told:
                self._told.add("noise_scale")
                self._event("noise_scale_unavailable", step, {
                    "batches": self._noise.batches,
                    "reason": "one batch size: one backward pass per optimizer step and no data parallelism"})
            return
        start = self._h.noise_start
        self._buf[row, start:start + 3].copy_(got)
        self._host.health["noise_step"][row] = step

    def _spike_step(self, step: int, row: int) -> None:
        """Score this step's total norm (and its loss, when logged before the step), count the spike,
        act on it, and record the skip rate: about 20 small device ops, no host read."""
        assert self._detector is not None
        host, arrays, cols = self._host, self._host.health, self._spike_cols[row]
        norm = self._buf[row, self._layout.run] if host.measured[row] else None
        loss = self._loss(step, row)
        if loss is not None:
            self._loss_done = step
        z, warm = self._detector.score(loss, norm)
        cfg = self._config.guards.spike
        flag = spike_flag(z, warm, cfg.on, cfg.z_threshold) if z is not None else None
        flag = self._zero if flag is None else flag
        self._count.add_(flag)
        # [z of the loss, z of the norm, flag, count, skipped on the device, skip rate] in one write
        cols.copy_(torch.cat((self._nan2 if z is None else z, flag.reshape(1), self._count.reshape(1), self._zero2)))
        for k, stamp in enumerate(("loss_z_step", "norm_z_step")):
            if warm[k]:
                arrays[stamp][row] = step
        arrays["spike_step"][row] = step
        if self._guard.acts:
            decided = self._guard.agree(flag)
            if self._guard.on_device:
                self._guard.arm(decided)
                cols[SKIP].copy_(decided)
            elif self._fired(decided, row, agreed=decided is not flag):
                arrays["spike_sync"][row] = step
                data = self._guard.describe(self._row_values(row), host, row)
                if self._guard.config.action == "skip":
                    host.skipped[row] = 1.0
                    for t in self._tensors:
                        t.grad = None
                self._record_skip(row)
                self._guard.fire(step, data)
                return
        self._record_skip(row)

    def _record_skip(self, row: int) -> None:
        """This step's skip (the device's, or the host's: a guard's synchronous skip) into the rate's
        ring; nothing to do when no guard can skip (the rate stays 0)."""
        if not self._can_skip:
            return
        slot, cols = self._skips[self._skip_pos], self._spike_cols[row]
        if self._host.skipped[row]:
            slot.fill_(1.0)
        else:
            slot.copy_(cols[SKIP])
        self._skip_pos = (self._skip_pos + 1) % self._skips.numel()
        self._skip_fed = min(self._skip_fed + 1, self._skips.numel())
        torch.div(self._skips.sum(), self._skip_fed, out=cols[RATE])

    def _score_late_loss(self, step: int) -> None:
        """The loss of a finished step, logged after its update: score it and update the spike flag."""
        assert self._detector is not None
        row = step % self._rows
        arrays, cols = self._host.health, self._spike_cols[row]
        loss = self._loss(step, row)
        if loss is None or arrays["spike_step"][row] != step:
            return
        self._loss_done = step
        cfg = self._config.guards.spike
        if self._guard.acts and cfg.on in ("loss", "both") and "late_loss" not in self._told:
            self._told.add("late_loss")
            log.warning("gradwatch: the spike guard's %r acts on the loss only when watcher.log(%s=...) comes before "
                        "optimizer.step(); step %d's came after it, so it is z-scored and recorded, not acted on",
                        cfg.action, cfg.loss, step)
        z, warm = self._detector.score(loss, None)
        if z is None:
            return
        arrays["loss_z_step"][row] = step
        norm_warm = bool(arrays["norm_z_step"][row] == step)
        z = torch.stack((z[LOSS], cols[NORM_Z]))
        flag = spike_flag(z, (True, norm_warm), cfg.on, cfg.z_threshold)
        if flag is None:
            cols[LOSS_Z].copy_(z[LOSS])
            return
        self._count.add_(flag - cols[FLAG])
        cols[LOSS_Z:COUNT + 1].copy_(torch.cat((z, flag.reshape(1), self._count.reshape(1))))

    def _loss(self, step: int, row: int) -> torch.Tensor | None:
        """The mean of the loss values logged for `step` so far, None when there is none."""
        name = self._config.guards.spike.loss
        if name not in self._scalar_names:
            return None
        slot = self._scalar_names.index(name)
        count = int(self._host.scalar_count[row, slot])
        cell = self._buf[row, self._layout.scalars + slot]
        return None if not count else cell if count == 1 else cell / count

    def _fired(self, flag: torch.Tensor, row: int, agreed: bool) -> bool:
        """The flag on the host: read from the buffer row on the CPU (no sync; an all-reduced flag is
        written there first), `.item()` elsewhere (one sync)."""
        if self._buf_host is not None:
            if agreed:
                self._spike_cols[row][FLAG].copy_(flag)
            return bool(self._buf_host[row, self._h.spike_start + FLAG] > 0)
        return bool(flag.item() > 0)

    def _row_values(self, row: int) -> np.ndarray:
        """A buffer row on the host (a copy; on a GPU it waits for the device, as `raise`/`skip` already did)."""
        if self._buf_host is not None:
            return np.array(self._buf_host[row])
        return self._buf[row].cpu().numpy()

    def _event(self, kind: str, step: int, data: dict[str, Any]) -> None:
        encoded = [runlog.encode_event(runlog.Event(kind, step, time.time(), data))]
        self._submit(lambda: encoded)
