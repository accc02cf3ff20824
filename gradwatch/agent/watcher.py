"""`gradwatch.watch()`: attach to a model and optimizer, measure, clip and guard each step.

The step path makes no host synchronisation: statistics are written into a preallocated
device buffer (see `buffer.py`) and reach the host once every `flush_every` steps through
one copy to pinned memory, which the writer thread turns into a run log frame. Every
failure inside the agent is caught, counted and reported; only a guard set to `raise`
raises into the training loop, by the user's choice.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import platform
import re
import socket
import threading
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradwatch.agent import graphop, runlog
from gradwatch.agent.buffer import MAX_SCALARS, NO_GRAD, HostRows, Layout, window_blocks, standard_metrics
from gradwatch.agent.clipping import make_clipper, norm_kwargs, wide_norm_kwargs
from gradwatch.agent.forward import ForwardStats
from gradwatch.agent.guards import GradientGuardError, Guards
from gradwatch.agent.health import Health, health_columns, health_info
from gradwatch.agent.initcheck import check_init
from gradwatch.agent.layers import (NONNEGATIVE, Layer, build_tables, channels_first, last_linear_params,
                                    saturation_bounds)
from gradwatch.agent.sharding import global_norms, is_sharded, local, process_group
from gradwatch.agent.stats import cancels, moments, nonzero_per_unit, norm32, saturated_count, shift_of, shifted_moments
from gradwatch.agent.writer import LogWriter

if TYPE_CHECKING:  # pydantic loads when a watcher is made, not when the agent is imported
    from gradwatch.agent.config import AgentConfig

log = logging.getLogger("gradwatch.agent")

_attached: weakref.WeakSet[Any] = weakref.WeakSet()  # models and optimizers being watched
_open: weakref.WeakSet[Watcher] = weakref.WeakSet()  # closed at interpreter exit if the user did not
_PINNED_BUFFERS = 3
_UNDECIDED, _NO_SHIFT = object(), object()  # a layer's shift before its first call of a step; plain sums


class AlreadyWatched(RuntimeError):
    """`watch()` on a model or optimizer that another open watcher already watches."""


def watch(model: nn.Module, optimizer: torch.optim.Optimizer, run: str | None = None,
          config: AgentConfig | dict[str, Any] | str | Path | None = None, *,
          scaler: Any = None, replicated: bool | None = None) -> Watcher:
    """Attach gradwatch to a training job; see `Watcher`.

    `run` names the run (default: the model's class name); `config` is an `AgentConfig`,
    a dict or a TOML file path; pass the AMP `GradScaler` as `scaler` so that the steps it
    skips are recorded as skipped. `replicated` says the gradients are the same on every rank
    (data parallel: only rank 0 records their norms); None detects a DDP wrapper around `model`.
    """
    return Watcher(model, optimizer, run=run, config=config, scaler=scaler, replicated=replicated)


class Watcher:
    """Measures one model and optimizer through hooks; writes one run log per rank.

    Call `log(loss=...)` once per iteration after `optimizer.step()` for scalars, `close()`
    at the end (or use it as a context manager), `snapshot()` for the latest values.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, run: str | None = None,
                 config: AgentConfig | dict[str, Any] | str | Path | None = None, scaler: Any = None,
                 replicated: bool | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module. Got {type(model).__name__}")
        optimizer, wrappers = unwrap_optimizer(optimizer)
        replicated = _is_ddp(model) if replicated is None else replicated
        outer, (model, model_wrappers) = model, unwrap_model(model)
        _refuse_meta(model)
        for obj, what in ((model, "model"), (optimizer, "optimizer")):
            if obj in _attached:
                raise AlreadyWatched(f"gradwatch is already watching this {what}; close() the first watcher before "
                                     "attaching another")
        from gradwatch.agent.config import load_config

        self.config = load_config(config)
        _refuse_sparse_clipping(model, self.config.clip.mode)
        self.errors: Counter[str] = Counter()
        self._model_ref = weakref.ref(model)
        self._optimizer = optimizer
        self._scaler = scaler
        self._handles: list[RemovableHandle] = []
        self._closed = False
        self._lock = threading.Lock()  # the writer thread's `_latest`, and `close()`
        # Finished rows leave from the training thread's hooks and from the idle flusher thread.
        self._send_lock = threading.Lock()

        self.layers, self.params = build_tables(model, optimizer, self.config.forward)
        self._param_tensors: list[torch.Tensor] = [p.tensor for p in self.params]
        self._index_of = {id(t): i for i, t in enumerate(self._param_tensors)}
        first = next(iter(model.parameters()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        sharded = next((t for t in self._param_tensors if is_sharded(t)), None)
        self._shard_group = process_group(sharded) if sharded is not None else None
        _refuse_local_clipping(sharded, self.config.clip.mode)
        self._uniform = self._shard_group is None and all(
            t.device == self.device and t.dtype == torch.float32 for t in self._param_tensors)
        self._norm_kwargs = norm_kwargs(self._param_tensors)
        # Off the CPU, norms accumulate in float64 (one pass, memory-bound): a norm that is not
        # finite then means non-finite elements, and one above the float32 range an overflow.
        # Sharded norms are summed across ranks in float64 too, from float64 shard norms.
        self._wide_norms = (self.device.type == "cuda" or self._shard_group is not None) and \
            wide_norm_kwargs() is not None
        if self._wide_norms:
            self._norm_kwargs = wide_norm_kwargs() or {}
            self._uniform = False  # float64 norms are converted on their way into the float32 buffer

        measure = self.config.measure
        self._flush_every = measure.flush_every
        act_layers = [layer.index for layer in self.layers] if measure.activation_every else []
        self._forward = ForwardStats(self.layers, act_layers, self.config.forward)  # attention, logits, scale
        self.layout = Layout(len(self.params), len(optimizer.param_groups), act_layers,
                             [i for i in act_layers if self.layers[i].family is not None],
                             [i for i in act_layers if self.layers[i].family == "bounded"],
                             [i for i in act_layers if self.layers[i].family == "relu"], self.config.clip.mode,
                             health=health_columns(self.config, optimizer, model, self.params),
                             forward=self._forward.columns)
        self._act_slot = {layer: j for j, layer in enumerate(act_layers)}
        metric_defs = standard_metrics(self.layout, bool(measure.param_every), bool(measure.update_ratio_every),
                                       bool(measure.activation_every))
        self.metrics = {m.name: m for m in metric_defs}
        self._scalar_names: list[str] = []
        self._scalar_ids: list[int] = []
        self._pending_defs: list[runlog.MetricDef] = []

        self._clipper = make_clipper(self.config.clip, exclude=last_linear_params(self.layers, self.params)
                                     if self.config.clip.agc_exclude_last_layer else ())
        self._buf = torch.full((self._flush_every, self.layout.width), float("nan"), device=self.device)
        self._buf[:, self.layout.grad_bad:self.layout.grad_bad + self.layout.n_params] = 0.0
        # On the CPU the buffer is host memory: reading it is no synchronisation.
        self._buf_host = self._buf.numpy() if self.device.type == "cpu" else None
        scratch = torch.zeros(1) if self.device.type == "cpu" else None
        self._scratch = (scratch, scratch.numpy()) if scratch is not None else None
        self._host = HostRows.empty(self._flush_every, self.layout.n_groups, len(act_layers))
        pin = self.device.type == "cuda"
        staging = [torch.empty(self._buf.shape, pin_memory=pin) for _ in range(_PINNED_BUFFERS)]
        self._staging = [(t, t.numpy()) for t in staging]  # numpy views taken once, here
        self._free_staging = list(range(_PINNED_BUFFERS))
        self._present_index: dict[tuple[int, ...], torch.Tensor] = {}
        self._rows = [_RowViews(self._buf[r], self.layout) for r in range(self._flush_every)]
        self._reported_errors: dict[str, int] = {}

        self.step = 0  # index of the optimizer step in progress (0-based)
        self._unsent = 0  # first step not yet sent to the writer
        self._flushed_at = time.monotonic()
        self._step_ended_at = time.monotonic()
        self._step_stream: Any = None  # CUDA stream of the training thread at its last step
        self._stop_flusher = threading.Event()
        self._act_row = -1  # step whose activation columns are initialised
        self._staged = _StagedValues()
        self._update_prev: list[torch.Tensor] | None = None
        self._stepped_since_update = False  # an optimizer step since the AMP scaler's last update
        self._scaler_states = getattr(scaler, "_per_optimizer_states", None)
        self._forward_since_step = False  # a forward of the step in progress ran: log() files under it
        self._shifts: dict[int, Any] = {}  # activation layer -> its shift for this step, or a marker
        self._shift_step = -1
        self._latest: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}
        # Under torch.compile the hooks' work reaches the watcher through an op in the graph.
        self._graph_measures: dict[int, tuple[Callable[[torch.Tensor], None], Callable[[torch.Tensor], None]]] = {}
        self._graph_key = graphop.register(self._on_graph_tensor)
        self._graph_token = torch.zeros(1, device=self.device)

        self.run_id, rank, world = _run_identity()
        # Under DDP every rank holds the same all-reduced gradients: rank 0 records their norms.
        self._replica = replicated and rank != 0
        home = self.config.home or runlog.default_home()
        self.name = run or type(model).__name__
        self.init_check = check_init(self.layers, self.params)
        info = self._header_info(model, rank, world)
        info["optimizer"] = {"class": type(optimizer).__name__, "wrappers": wrappers}
        info["optimizer_health"] = health_info(optimizer, self.layout.health)
        info["model"]["wrappers"] = model_wrappers
        info["model"]["sharded"] = self._shard_group is not None
        header = runlog.Header(info, metric_defs)
        self.path = runlog.log_path(self.run_id, rank, home)
        self._writer = LogWriter(self.path, runlog.encode_header(header), self.config.queue_size)
        self._guards = Guards(self.config.guards, self.layout, self.params, self.layers, self.name,
                              self._writer.submit, self._count_error)
        try:
            self._health = Health(self.config, self.layout, optimizer, self.params, self._buf, self._buf_host,
                                  self._host, self._scalar_names, run_name=self.name, scaler=scaler,
                                  replicated=replicated, submit=self._writer.submit, count_error=self._count_error)
            self._attach(model, optimizer, outer)
        except Exception:
            for handle in self._handles:
                handle.remove()
            self._writer.close()
            self.path.unlink(missing_ok=True)  # a watch() that refuses its arguments leaves no run
            raise
        self._flusher = threading.Thread(target=self._flush_when_idle, name="gradwatch-flusher", daemon=True)
        self._flusher.start()
        if wrappers:
            log.info("gradwatch: watching %s inside %s", type(optimizer).__name__, " > ".join(wrappers))
        _attached.add(model)
        _attached.add(optimizer)
        if not _open:
            atexit.unregister(_close_open_watchers)
            atexit.register(_close_open_watchers)
        _open.add(self)

    # ------------------------------------------------------------------ lifecycle

    def _attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, outer: nn.Module) -> None:
        # On the module the job calls (a torch.compile or DDP wrapper runs its own hooks eagerly).
        self._handles.append(outer.register_forward_pre_hook(self._on_forward))
        self._handles.append(optimizer.register_step_pre_hook(self._on_step_pre))
        self._handles.append(optimizer.register_step_post_hook(self._on_step_post))
        for layer in self.layers:
            if layer.index in self._act_slot:
                self._handles.append(layer.module.register_forward_hook(self._forward_hook(layer)))
        self._handles += self._forward.attach(self)

    def close(self) -> None:
        """Remove every hook, send what is left to the run log and close it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._health.close()
        graphop.unregister(self._graph_key)
        model = self._model_ref()
        if model is not None:
            _attached.discard(model)
        _attached.discard(self._optimizer)
        _open.discard(self)
        self._update_prev = None
        self._stop_flusher.set()
        self._flusher.join(timeout=30)
        self._flush()
        errors = dict(self.errors)
        stats: dict[str, Any] = {"steps": self.step, "dropped_frames": self._writer.dropped, "errors": errors}

        def final() -> list[bytes]:
            errors.update({f"writer:{k}": v for k, v in self._writer.errors.items()})
            stats["bytes_written"] = self._writer.bytes_written
            return [runlog.encode_close(runlog.Close(time.time(), self.step, stats))]

        self._writer.close(final)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ user API

    def log(self, **scalars: float | torch.Tensor) -> None:
        """Record scalars (loss, accuracy, ...) with no host sync.

        A call after `optimizer.step()` files them under that step; a call between a forward
        pass and the step (once per micro-batch under gradient accumulation) files them under
        the step in progress. Several calls for one step record the mean of their values. With
        an AMP scaler given to `watch`, an iteration whose step the scaler skipped is recorded
        as skipped when the next `log()` call sees the scaler's update. A call for a step
        already sent to the run log (after a `snapshot()`) is refused and counted.
        """
        if self._closed:
            return
        try:
            self._notice_scaler_update()
            step = self.step if self._forward_since_step else self.step - 1
            if step < 0:
                return
            with self._send_lock:  # the idle flusher may be sending this step's row
                self._log_scalars(step, scalars)
        except Exception as exc:  # the agent never breaks the training loop
            self._count_error("log", exc)

    def _log_scalars(self, step: int, scalars: dict[str, float | torch.Tensor]) -> None:
        """Add `scalars` into `step`'s row, or count them late if that row was already sent."""
        if step < self._unsent:
            if "late_scalar" not in self.errors:
                log.warning("gradwatch: log() for step %d came after that step's records were sent to the run log "
                        "(at the next forward pass, or max_flush_interval/2 after its optimizer step): counted "
                        "as late_scalar and dropped; call log() right after optimizer.step()", step)
            self.errors["late_scalar"] += 1
            return
        row = step % self._flush_every
        for name, value in scalars.items():
            slot = self._scalar_slot(name)
            if slot is None:
                continue
            cell = self._buf[row, self.layout.scalars + slot]
            first = self._host.scalar_count[row, slot] == 0
            if isinstance(value, torch.Tensor):
                v = value.detach().reshape(()).to(self.device, torch.float32, non_blocking=True)
                cell.copy_(v) if first else cell.add_(v)
            else:
                cell.fill_(float(value)) if first else cell.add_(float(value))
            self._host.scalar_count[row, slot] += 1
        self._health.logged(step)

    def _notice_scaler_update(self) -> None:
        """Record the iteration the AMP scaler skipped: `scaler.update()` replaces its per-optimizer
        state, and an update with no optimizer step since the previous one is a skipped step."""
        if self._scaler is None:
            return
        states = getattr(self._scaler, "_per_optimizer_states", None)
        if states is self._scaler_states:
            return
        self._scaler_states = states
        if not self._stepped_since_update:
            self._record_skipped_step()
        self._stepped_since_update = False

    def snapshot(self) -> dict[str, Any]:
        """The latest measurements as plain Python values (forces one transfer and waits for it)."""
        if not self._closed:
            done = threading.Event()
            self._flush(on_done=done.set)
            done.wait(timeout=30)
        with self._lock:
            latest = dict(self._latest)
        return self._snapshot_dict(latest)

    # ------------------------------------------------------------------ hooks

    def _on_forward(self, module: nn.Module, inputs: Any) -> None:
        """A forward pass: the last step's `log()` calls are done, so its records may go (at most
        `max_flush_interval` after it); a training forward also starts the next step's scalars."""
        training = torch.is_grad_enabled() and module.training  # evaluation: its scalars belong to the last step
        if _compiling():  # inside the graph (`model.compile()`): the same, at run time, through the op
            if graphop.AVAILABLE:
                graphop.observe(self._graph_token, self._graph_token, self._graph_key, int(training), graphop.FORWARD)
            return
        self._forward_started(training)

    def _forward_started(self, training: bool) -> None:
        try:
            self._notice_scaler_update()
            self._maybe_flush()
        except Exception as exc:
            self._count_error("flush", exc)
        if training:
            self._forward_since_step = True

    def _on_step_pre(self, optimizer: torch.optim.Optimizer, args: Any,
                     kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
        # `args` starts with the optimizer itself: `step(closure)` gives args == (optimizer, closure).
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._before_update(first=True)
            return None
        # The gradients this step applies are computed inside the closure, after this hook:
        # measure, guard and clip them there instead.
        wrapped = self._measured_closure(closure)
        if "closure" in kwargs:
            return args, {**kwargs, "closure": wrapped}
        return (args[0], wrapped, *args[2:]), kwargs

    def _measured_closure(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        """`closure`, then the step's measurement, guards and clipping of the gradients it made.

        An optimizer that evaluates the closure several times in one step (LBFGS) has every
        evaluation's gradients guarded and clipped; the step's row keeps the last one's norms.
        """
        evaluations = 0

        def measured() -> Any:
            nonlocal evaluations
            loss = closure()
            self._before_update(first=evaluations == 0)
            evaluations += 1
            return loss

        return measured

    def _before_update(self, first: bool) -> None:
        try:
            self._commit_staged()
            self._unscale_act_grads()
            self._maybe_flush()
            self._measure_step(first)
            self._health.before_update(self.step, first)
        except GradientGuardError:
            raise
        except Exception as exc:
            self._count_error("step", exc)
            self._blank_step_row()

    def _on_step_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        try:
            self._measure_after_step()
        except Exception as exc:
            self._count_error("step_post", exc)
        self._health.after_step(self.step)
        self._stepped_since_update = True
        self._forward_since_step = False
        self._end_step()

    def _end_step(self) -> None:
        """Move on to the next step; the idle flusher may send the finished one from now on."""
        if self.device.type == "cuda":
            self._step_stream = torch.cuda.current_stream(self.device)
        self._step_ended_at = time.monotonic()  # before the step count the flusher reads first
        self.step += 1

    def _measure_step(self, first: bool = True) -> None:
        """Grad norms, guards and clipping at the optimizer step: a handful of device ops."""
        step, row = self.step, self.step % self._flush_every
        views = self._rows[row]
        host = self._host
        host.steps[row] = step
        host.skipped[row] = 0.0
        host.measured[row] = False
        host.param_due[row] = False
        host.update_due[row] = False
        if self._act_row != step:
            host.act_count[row] = 0
            host.act_grad_count[row] = 0
            host.act_elems[row] = 0
            host.act_units[row] = 0
        self._record_lr(row)

        maybe_grads = [t.grad for t in self._param_tensors]
        present = [i for i, g in enumerate(maybe_grads) if g is not None]
        grads = [g for g in maybe_grads if g is not None]
        params = self._param_tensors if len(grads) == len(maybe_grads) else [self._param_tensors[i] for i in present]
        if not grads or (self._replica and self._clipper is None and not self._guards.synchronous):
            views.blank()
            return
        host.measured[row] = not self._replica
        if self._shard_group is not None:
            grads, params = [local(g) for g in grads], [local(t) for t in params]
        norms_list = self._grad_norms(grads)
        index = None if len(present) == self.layout.n_params else self._index_tensor(tuple(present))
        wide = torch.stack(norms_list) if self._wide_norms else None
        if wide is not None and self._shard_group is not None:
            wide = global_norms(wide, self._shard_group)
        if wide is None and index is None and self._uniform:
            norms = torch.stack(norms_list, out=views.grad)
        else:
            norms = (wide if wide is not None else torch.stack(norms_list)).to(self.device, torch.float32)
            if index is None:
                views.grad.copy_(norms)
            else:
                views.grad.fill_(NO_GRAD)
                views.grad.index_copy_(0, index, norms)
        views.bad.zero_()
        if wide is not None:
            total = views.total.copy_(torch.linalg.vector_norm(wide))
            bad = (~torch.isfinite(wide)).to(torch.float32)
            views.bad.copy_(bad) if index is None else views.bad.index_copy_(0, index, bad)
        else:
            total = torch.linalg.vector_norm(norms, out=views.total)
            if self._buf_host is not None and not np.isfinite(self._buf_host[row, self.layout.run]):
                self._resolve_nonfinite(row, present, grads, norms)
            elif self._buf_host is None:  # no float64 norms here (MPS, torch < 2.3): NaN/Inf, whatever the cause
                bad = (~torch.isfinite(norms)).to(torch.float32)
                views.bad.copy_(bad) if index is None else views.bad.index_copy_(0, index, bad)

        if self._guards.synchronous and self._guards.blocks_step(step, norms, total, present, views.bad):
            host.skipped[row] = 1.0
            for t in self._param_tensors:
                t.grad = None
            return
        if self._clipper is not None:
            if self.config.clip.mode == "value" and any(g.is_sparse for g in grads):
                grads = self._sparse_values(present, grads)
            result = self._clipper.clip_(params, grads, norms, total)
            if result.threshold is not None:
                torch.stack((result.total_after, result.coef, result.threshold), out=views.clip)
            else:
                torch.stack((result.total_after, result.coef), out=views.clip[:2])
        # Without a clipper (or threshold), the host fills those columns: see window_blocks.

        every = self.config.measure.update_ratio_every
        if first and every and step % every == 0 and not self._replica:
            with torch.no_grad():
                self._update_prev = list(torch._foreach_mul(self._local_params(), 1.0))

    def _sparse_values(self, present: list[int], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """For clipping by value: each sparse gradient coalesced (made the param's gradient) and
        given as its values, which clamping in place clips."""
        out = []
        for i, g in zip(present, grads):
            if g.is_sparse:
                g = self._param_tensors[i].grad = g.coalesce()
                g = g._values()
            out.append(g)
        return out

    def _local_params(self) -> list[torch.Tensor]:
        """The parameters, or this rank's shards of them when they are sharded."""
        if self._shard_group is None:
            return self._param_tensors
        return [local(t) for t in self._param_tensors]

    def _grad_norms(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each gradient's L2 norm: `_foreach_norm` for dense ones, the coalesced values' norm
        for sparse ones (`nn.Embedding(sparse=True)`)."""
        sparse = [k for k, g in enumerate(grads) if g.is_sparse]
        if not sparse:
            return list(torch._foreach_norm(grads, 2.0, **self._norm_kwargs))
        norms: list[torch.Tensor] = [torch.empty(0)] * len(grads)
        dense = [k for k in range(len(grads)) if not grads[k].is_sparse]
        if dense:
            for k, n in zip(dense, torch._foreach_norm([grads[k] for k in dense], 2.0, **self._norm_kwargs)):
                norms[k] = n
        dtype = torch.float64 if self._wide_norms else torch.float32
        for k in sparse:
            norms[k] = torch.linalg.vector_norm(grads[k].coalesce().values(), dtype=dtype)
        return norms

    def _resolve_nonfinite(self, row: int, present: list[int], grads: list[torch.Tensor],
                           norms: torch.Tensor) -> None:
        """CPU only, on a step whose total norm is not finite: recompute each non-finite norm in
        float64, so that a norm that overflowed float32 (every element finite) is told from
        NaN/Inf elements, and the total is exact. Reading CPU values costs no synchronisation."""
        host, layout = self._buf_host, self.layout
        assert host is not None
        wide = []
        for k, i in enumerate(present):
            value = float(host[row, layout.grad_norm + i])
            if not np.isfinite(value):
                g = grads[k].coalesce().values() if grads[k].is_sparse else grads[k]
                value = torch.linalg.vector_norm(g, dtype=torch.float64).item()
                with np.errstate(over="ignore"):
                    narrow = float(np.float32(value))  # +inf beyond float32: an overflow
                norms[k] = host[row, layout.grad_norm + i] = narrow
                host[row, layout.grad_bad + i] = 0.0 if np.isfinite(value) else 1.0
            wide.append(value)
        with np.errstate(over="ignore", invalid="ignore"):
            host[row, layout.run] = np.float32(np.sqrt(np.sum(np.square(np.asarray(wide, dtype=np.float64)))))

    @torch.no_grad()
    def _measure_after_step(self) -> None:
        step, row = self.step, self.step % self._flush_every
        buf = self._buf[row]
        measure = self.config.measure
        p = self.layout.n_params
        needs_norms = (measure.param_every and step % measure.param_every == 0) or self._update_prev is not None
        if not needs_norms or self._replica:
            return
        prev, self._update_prev = self._update_prev, None
        params = self._local_params()
        kwargs = self._norm_kwargs
        if prev is None:
            param_norms, deltas = torch._foreach_norm(params, 2.0, **kwargs), None
        elif self.device.type == "cpu":
            # One param at a time, so that both norms read the difference and the param from cache.
            pairs = [torch._foreach_norm([d.sub_(q), q], 2.0, **kwargs) for d, q in zip(prev, params)]
            deltas, param_norms = [pair[0] for pair in pairs], [pair[1] for pair in pairs]
        else:
            torch._foreach_sub_(prev, params)
            deltas, param_norms = torch._foreach_norm(prev, 2.0, **kwargs), torch._foreach_norm(params, 2.0, **kwargs)
        if self._shard_group is not None:  # one all-reduce for both: norms of whole params and updates
            both = global_norms(torch.stack([*param_norms, *(deltas or [])]), self._shard_group).to(torch.float32)
            param_norms, deltas = list(both[:p]), (list(both[p:]) if deltas is not None else None)
        if self._uniform:
            pn = buf[self.layout.param_norm:self.layout.param_norm + p]
            torch.stack(param_norms, out=pn)
        else:
            pn = torch.stack([n.to(self.device, torch.float32, non_blocking=True) for n in param_norms])
            buf[self.layout.param_norm:self.layout.param_norm + p].copy_(pn)
        if measure.param_every and step % measure.param_every == 0:
            self._host.param_due[row] = True
        if deltas is not None:
            delta = torch.stack([d.to(self.device, torch.float32, non_blocking=True) for d in deltas])
            torch.div(delta, pn.clamp_min(1e-12), out=buf[self.layout.update_ratio:self.layout.update_ratio + p])
            self._host.update_due[row] = True
        if self._buf_host is not None and self._shard_group is None:  # sharded norms are float64 already
            self._widen_param_norms(row, params, prev if deltas is not None else None)

    def _widen_param_norms(self, row: int, params: list[torch.Tensor], deltas: list[torch.Tensor] | None) -> None:
        """CPU only: recompute in float64 the param norms (and update ratios) that float32 could
        not hold (weights of 1e20 have a finite norm whose float32 sum of squares overflows)."""
        host, layout, p = self._buf_host, self.layout, self.layout.n_params
        assert host is not None
        bad = ~np.isfinite(host[row, layout.param_norm:layout.param_norm + p])
        if deltas is not None:
            bad |= ~np.isfinite(host[row, layout.update_ratio:layout.update_ratio + p])
        for i in np.flatnonzero(bad):
            norm = torch.linalg.vector_norm(params[i], dtype=torch.float64).item()
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                host[row, layout.param_norm + i] = np.float32(norm)  # +inf only beyond float32
                if deltas is not None:
                    delta = torch.linalg.vector_norm(deltas[i], dtype=torch.float64).item()
                    host[row, layout.update_ratio + i] = np.float32(delta / max(norm, 1e-12))

    def _forward_hook(self, layer: Layer) -> Callable[..., None]:
        """A forward hook for one layer: statistics of an activation's output, and a tensor
        hook for the gradient w.r.t. any layer's output, on the steps that measure them."""
        index = layer.index
        slot = self._act_slot[index]
        has_stats = index in self.layout.act
        bounded = index in self.layout.bounded
        relu = index in self.layout.relu
        nonnegative = isinstance(layer.module, NONNEGATIVE)
        channels = channels_first(self.layers, index)
        low, high = saturation_bounds(layer.module) if bounded else (0.0, 0.0)
        eps = self.config.measure.saturation_eps
        every = self.config.measure.activation_every

        grad_col = self.layout.act_grad[index]
        stat_col = self.layout.act.get(index, -1)

        def grad_hook(grad: torch.Tensor) -> None:
            try:
                self._stage(grad_col, norm32(grad), "norm")
                self._host.act_grad_count[self.step % self._flush_every, slot] += 1
            except Exception as exc:
                self._count_error("activation_grad", exc)

        def measure(y: torch.Tensor) -> None:
            """The statistics of a layer's output at a step that measures activations."""
            self._init_act_row()
            row = self.step % self._flush_every
            if has_stats:
                with torch.no_grad():
                    d = y.detach()
                    finite = self._stage_moments(index, stat_col, d)
                    extra = stat_col + 4
                    if bounded:
                        self._stage(extra, saturated_count(d, low, high, eps))
                        extra += 1
                    if relu:
                        per_unit = nonzero_per_unit(d, nonnegative, channels, finite)
                        self._stage(extra + 1, per_unit.sum())
                        if self._stage(extra, per_unit, "units"):
                            self._host.act_units[row, slot] += per_unit.numel()
            self._host.act_count[row, slot] += 1
            self._host.act_elems[row, slot] += y.numel()
            self._forward.measure(index, y)  # output scale and logits (forward.py)

        def traced_grad_hook(grad: torch.Tensor) -> None:  # traced into the compiled backward
            graphop.observe(grad, self._graph_token, self._graph_key, index, graphop.GRADIENT)

        def trace(output: Any) -> None:  # every step in the graph; the watcher picks the steps at run time
            tensors = [t for t in _output_tensors(output) if t.is_floating_point()]
            if graphop.AVAILABLE and tensors and torch.is_grad_enabled():
                graphop.observe(tensors[0].detach(), self._graph_token, self._graph_key, index, graphop.OUTPUT)
                for t in tensors:
                    if t.requires_grad:
                        t.register_hook(traced_grad_hook)

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if _compiling():
                trace(output)
                return
            if self.step % every or not torch.is_grad_enabled():
                return
            try:
                tensors = [t for t in _output_tensors(output) if t.is_floating_point()]
                if not tensors:
                    return
                measure(tensors[0])  # the statistics are of the first output (an RNN's sequence output)
                for t in tensors:  # the gradient w.r.t. the output is that of all its tensors (LSTM: h_n, c_n too)
                    if t.requires_grad:
                        t.register_hook(grad_hook)
            except Exception as exc:
                self._count_error("activation", exc)

        self._graph_measures[index] = (measure, grad_hook)
        return hook

    def _on_graph_tensor(self, layer: int, kind: int, y: torch.Tensor) -> None:
        """A compiled graph's `gradwatch::observe` op at run time: a forward pass starts (`layer`
        1 in training), or measure `y` (a layer's output, or the gradient w.r.t. it) as the eager
        hooks do, at the steps that measure activations."""
        if self._closed:
            return
        if kind == graphop.FORWARD:
            self._forward_started(bool(layer))
            return
        if self.step % self.config.measure.activation_every:
            return
        try:
            measure, grad_hook = self._graph_measures[layer]
            if kind == graphop.OUTPUT:
                measure(y)
            elif self._act_row == self.step:  # as in eager mode: only after a measured forward
                grad_hook(y)
        except Exception as exc:
            self._count_error("activation", exc)

    # ------------------------------------------------------------------ internals

    def _stage(self, col: int, value: torch.Tensor, kind: str = "sum") -> bool:
        """Hold a hook's value for buffer column `col` of this step's row (see `_StagedValues.add`)."""
        if self._staged.step != self.step:
            self._commit_staged()
            self._staged.step = self.step
        if value.device != self.device:
            value = value.to(self.device, non_blocking=True)
        return self._staged.add(col, value, kind)

    def _stage_moments(self, layer: int, col: int, y: torch.Tensor) -> bool:
        """Stage a layer's [shift, sum, sum of squares, non-finite count] columns for this call;
        True when its outputs are known to be finite (only the CPU path knows it).

        The shift is decided by the layer's first call of the step and shared by its later
        calls (micro-batches), so their sums add up. Off the CPU every call takes the exact
        path: y - c, its sums and its non-finite count, with no host read. On the CPU, where
        reading a value costs no synchronisation, the plain sums come first; the exact path
        runs only where they hold NaN/Inf or would cancel (a saturated sigmoid).
        """
        if self._shift_step != self.step:
            self._shifts.clear()
            self._shift_step = self.step
        shift = self._shifts.get(layer, _UNDECIDED)
        if self._buf_host is not None and shift is not _NO_SHIFT:
            total, norm = moments(y)
            t, n = self._read(total), self._read(norm)
            if np.isfinite(t) and np.isfinite(n):
                if shift is _UNDECIDED and not cancels(t, n, y.numel()):
                    self._shifts[layer] = shift = _NO_SHIFT
                if shift is _NO_SHIFT:
                    self._stage(col + 1, total)
                    self._stage(col + 2, norm, "norm")
                    return True
        if shift is _UNDECIDED or shift is _NO_SHIFT:
            new = shift is _UNDECIDED
            shift = shift_of(y) if new else torch.zeros((), device=y.device)
            if new:
                self._shifts[layer] = shift
                self._stage(col, shift)
        total, norm, nonfinite = shifted_moments(y, shift)
        self._stage(col + 1, total)
        self._stage(col + 2, norm, "norm")
        self._stage(col + 3, nonfinite)
        return False

    def _read(self, value: torch.Tensor) -> float:
        """The value of a 0-d CPU tensor, through a numpy view made at attach (CPU only: no sync)."""
        assert self._scratch is not None
        self._scratch[0].copy_(value)
        return float(self._scratch[1][0])

    def _commit_staged(self) -> None:
        """Add the staged values into their step's row in one `index_add_`."""
        try:
            taken = self._staged.take()
            if taken is not None:
                step, cols, values = taken
                self._buf[step % self._flush_every].index_add_(0, self._index_tensor(cols), values)
        except Exception as exc:
            self._count_error("activation", exc)

    def _blank_step_row(self) -> None:
        """After a failed measurement: the step's row says "not measured", not stale values."""
        try:
            self._host.measured[self.step % self._flush_every] = False
            self._rows[self.step % self._flush_every].blank()
        except Exception as exc:
            self._count_error("step_blank", exc)

    def _unscale_act_grads(self) -> None:
        """Under AMP the output gradients carry the loss scale: divide their sums of squares by its
        square, on the device (the scaler's scale tensor, not `get_scale()`, which syncs)."""
        scale = getattr(self._scaler, "_scale", None)
        if not isinstance(scale, torch.Tensor) or self._act_row != self.step or not self.layout.act_layers:
            return
        start = self.layout.act_start
        columns = self._buf[self.step % self._flush_every, start:start + len(self.layout.act_layers)]
        columns.div_(scale.to(self.device, torch.float32, non_blocking=True).square())

    def _init_act_row(self) -> None:
        """Zero the activation columns the first time a step's forward is measured."""
        if self._act_row == self.step:
            return
        self._maybe_flush()
        self._act_row = self.step
        row = self.step % self._flush_every
        self._buf[row, self.layout.act_start:].zero_()
        self._host.act_count[row] = 0
        self._host.act_grad_count[row] = 0
        self._host.act_elems[row] = 0
        self._host.act_units[row] = 0

    def _index_tensor(self, present: tuple[int, ...]) -> torch.Tensor:
        index = self._present_index.get(present)
        if index is None:
            if len(self._present_index) > 64:
                self._present_index.clear()
            # Built on the host and copied without a stream sync (a blocking copy would sync).
            index = torch.tensor(present).to(self.device, non_blocking=True)
            self._present_index[present] = index
        return index

    def _scalar_slot(self, name: str) -> int | None:
        if name in self._scalar_names:
            return self._scalar_names.index(name)
        if name in self.metrics:
            self.errors["scalar_name_taken"] += 1
            return None
        if len(self._scalar_names) >= MAX_SCALARS:
            self.errors["too_many_scalars"] += 1
            return None
        metric = runlog.MetricDef(len(self.metrics) + len(self._scalar_names), name, "run")
        self._scalar_names.append(name)
        self._scalar_ids.append(metric.id)
        self._pending_defs.append(metric)
        return len(self._scalar_names) - 1

    def _record_skipped_step(self) -> None:
        """An iteration with no optimizer step: AMP's scaler found inf/NaN and skipped it."""
        row = self.step % self._flush_every
        self._host.steps[row] = self.step
        self._host.skipped[row] = 1.0
        self._host.measured[row] = False
        self._host.param_due[row] = False
        self._host.update_due[row] = False
        self._host.act_count[row] = 0
        self._host.act_grad_count[row] = 0
        self._host.act_elems[row] = 0
        self._host.act_units[row] = 0
        self._record_lr(row)
        self._rows[row].blank()
        self._forward_since_step = False
        self._end_step()

    def _record_lr(self, row: int) -> None:
        """Each param group's learning rate (a group added after attach is not measured; neither is
        an `lr` that is not a number, such as Adafactor's None)."""
        for g, group in enumerate(self._optimizer.param_groups[:self.layout.n_groups]):
            lr = _lr_of(group)
            self._host.lr[row, g] = float("nan") if lr is None else lr
            self._host.lr_present[row, g] = lr is not None

    def _maybe_flush(self) -> None:
        """Flush a full window before its first row is reused (after `log()` had its chance), and
        finished steps once `max_flush_interval` has passed since the last flush, so that slow
        steps reach the log at once and fast ones at least that often."""
        pending = self.step - self._unsent
        if pending >= self._flush_every or (
                pending and time.monotonic() - self._flushed_at >= self.config.measure.max_flush_interval):
            self._flush()

    def _flush_when_idle(self) -> None:
        """Flusher thread: send the finished steps once the training loop has run no step for
        half of `max_flush_interval`, so a slow step's records reach the log without waiting for
        the next step's hooks, and `log()` calls right after `optimizer.step()` still file under it."""
        grace = self.config.measure.max_flush_interval / 2
        wait = grace
        while not self._stop_flusher.wait(wait):
            try:
                pending = self.step > self._unsent
                idle = time.monotonic() - self._step_ended_at
                wait = grace - idle if pending and idle < grace else grace
                if pending and idle >= grace:
                    stream = self._step_stream  # order the copy after the step's writes on its stream
                    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                        self._send_finished()
            except Exception as exc:
                self._count_error("flush", exc)

    def _flush(self, on_done: Callable[[], None] | None = None) -> None:
        """Add a finished step's staged values into its row, then send the finished rows (training
        thread only). The step in progress keeps its stage: committing it between two micro-batches
        would count each one's dead units apart."""
        if self._staged.step is not None and self._staged.step < self.step:
            self._commit_staged()
        self._send_finished(on_done)

    def _send_finished(self, on_done: Callable[[], None] | None = None) -> None:
        """Copy the finished rows to pinned host memory and hand them to the writer thread."""
        with self._send_lock:
            self._send_rows(on_done)

    def _send_rows(self, on_done: Callable[[], None] | None) -> None:
        first, last = self._unsent, self.step  # steps [first, last) are complete
        if last <= first:
            # Nothing new: still wait behind the queued frames, so `latest` is complete.
            if on_done is not None and not self._writer.submit(lambda: _after(on_done)):
                on_done()
            return
        self._unsent = last
        self._flushed_at = time.monotonic()
        try:
            if not self._free_staging:
                self._writer.dropped += 1
                if on_done is not None:
                    on_done()
                return
            slot = self._free_staging.pop()
            staging, array = self._staging[slot]
            staging.copy_(self._buf, non_blocking=True)
            ready = torch.cuda.Event() if self.device.type == "cuda" else None
            if ready is not None:
                ready.record()
            rows = np.array([s % self._flush_every for s in range(first, last)])
            host = self._host.take(rows)
            self._host.scalar_count[rows] = 0
            defs, self._pending_defs = self._pending_defs, []
            scalar_ids = list(self._scalar_ids)
            errors = dict(self.errors)

            def job() -> list[bytes]:
                try:
                    if ready is not None:
                        ready.synchronize()
                    values = array[rows].copy()
                finally:
                    self._free_staging.append(slot)
                result = window_blocks(self.layout, self._all_metrics(), values, host, scalar_ids)
                chunks = [runlog.encode_metric(d) for d in defs]
                chunks.append(runlog.encode_frame(result.blocks))
                chunks += self._guards.window_events(values, host.steps)
                chunks += self._health.window_events(values, host)
                if errors and errors != self._reported_errors:
                    self._reported_errors = errors
                    chunks.append(runlog.encode_event(runlog.Event("agent_error", int(host.steps[-1]), time.time(),
                                                                   {"errors": errors})))
                with self._lock:
                    for name, entry in result.latest.items():
                        if name not in self._latest or self._latest[name][0] <= entry[0]:
                            self._latest[name] = entry
                if on_done is not None:
                    on_done()
                return chunks

            if not self._writer.submit(job):
                self._free_staging.append(slot)
                self._pending_defs = defs + self._pending_defs
                if on_done is not None:
                    on_done()
        except Exception as exc:
            self._count_error("flush", exc)
            if on_done is not None:
                on_done()

    def _all_metrics(self) -> dict[str, runlog.MetricDef]:
        metrics = dict(self.metrics)
        for name, metric_id in zip(self._scalar_names, self._scalar_ids):
            metrics[name] = runlog.MetricDef(metric_id, name, "run")
        return metrics

    def _count_error(self, where: str, exc: BaseException) -> None:
        key = f"{where}:{type(exc).__name__}"
        if key not in self.errors:
            log.warning("gradwatch: error in %s, counted and ignored: %r", where, exc)
        self.errors[key] += 1

    def _header_info(self, model: nn.Module, rank: int, world: int) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "name": self.name, "project": self.config.project,
            "host": socket.gethostname(), "pid": os.getpid(), "rank": rank, "world_size": world,
            "torch_version": torch.__version__, "gradwatch_version": _version(),
            "python_version": platform.python_version(), "device": str(self.device), "started_at": time.time(),
            "config": _config_json(self.config),
            "model": {"class": type(model).__name__, "num_params": sum(p.numel() for p in model.parameters()),
                      "num_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)},
            "groups": [{"index": g, "lr": _float_or_none(group.get("lr")),
                        "params": [self._index_of[id(p)] for p in group["params"] if id(p) in self._index_of]}
                       for g, group in enumerate(self._optimizer.param_groups)],
            "params": [p.to_json() for p in self.params],
            "layers": [layer.to_json() for layer in self.layers],
            "init_check": self.init_check,
        }

    def _snapshot_dict(self, latest: dict[str, tuple[int, np.ndarray, np.ndarray]]) -> dict[str, Any]:
        def value(name: str, col: int = 0) -> float | None:
            """The latest value (NaN and Inf as they are), None when it was not measured."""
            entry = latest.get(name)
            return float(entry[1][col]) if entry is not None and entry[2][col] else None

        def per(scope: str, names: list[str]) -> dict[str, dict[str, float | None]]:
            out: dict[str, dict[str, float | None]] = {n: {} for n in names}
            for name, metric in self._all_metrics().items():
                if metric.scope != scope or name not in latest:
                    continue
                for col, index in enumerate(metric.indices):
                    out[names[index]][name] = value(name, col)
            return out

        params = per("param", [p.name for p in self.params])
        flags = latest["<nonfinite>"][1] if "<nonfinite>" in latest else np.zeros(len(self.params), bool)
        for param, flag in zip(self.params, flags):
            params[param.name]["nonfinite"] = bool(flag)  # a param without a gradient is not non-finite
        layers = per("layer", [layer.name or "<model>" for layer in self.layers])
        for layer in self.layers:
            norms = [params[self.params[i].name].get("grad_norm") for i in layer.params]
            measured = [n for n in norms if n is not None]
            if measured:
                layers[layer.name or "<model>"]["grad_norm"] = float(np.sqrt(np.sum(np.square(measured))))
        step = latest.get("grad_norm_total", (None,))[0]
        n_groups = len(latest["lr"][1]) if "lr" in latest else 0
        return {
            "run_id": self.run_id, "name": self.name, "step": step, "steps": self.step,
            "grad_norm_total": {"before_clip": value("grad_norm_total"),
                                "after_clip": value("grad_norm_total_clipped")},
            "clip_coef": value("clip_coef"), "clip_threshold": value("clip_threshold"),
            "clip_mode": self.config.clip.mode, "skipped": value("skipped"),
            "nonfinite_params": value("nonfinite_params"), "overflow_params": value("overflow_params"),
            "lr": [value("lr", g) for g in range(n_groups)],
            "scalars": {n: value(n) for n in self._scalar_names},
            "params": params, "layers": layers, "init_check": self.init_check,
            "optimizer": {"class": type(self._optimizer).__name__}, **self._health.snapshot(value),
            "errors": {**self.errors, **{f"writer:{k}": v for k, v in self._writer.errors.items()}},
            "dropped_frames": self._writer.dropped, "log_path": str(self.path),
        }


class _StagedValues:
    """What the hooks computed for one step, waiting to be added to its buffer row.

    Adding each value where it is computed cost an `add_` (and a `cat`) per layer, a kernel
    launch each on a GPU; taken together, a step's values cost one `stack`, one `square_`
    and the watcher's one `index_add_`, plus two ops per ReLU-family layer for its dead units.
    """

    def __init__(self) -> None:
        self.step: int | None = None
        self._clear()

    def _clear(self) -> None:
        self._cols: list[int] = []
        self._values: list[torch.Tensor] = []
        self._norm_cols: list[int] = []
        self._norms: list[torch.Tensor] = []
        self._units: dict[tuple[int, int], torch.Tensor] = {}

    def add(self, col: int, value: torch.Tensor, kind: str) -> bool:
        """Stage `value` for `col` as a "sum" (0-d, added), a "norm" (0-d, added as its square,
        so micro-batches give the norm of the whole step) or "units" (non-zero counts per unit,
        summed over the step's micro-batches, then the units still at zero are counted).
        True when "units" opens a new entry: the first call of the step with that many units.
        """
        if kind == "units":
            key = (col, value.numel())
            if key in self._units:
                self._units[key].add_(value)
                return False
            self._units[key] = value
            return True
        cols, values = (self._norm_cols, self._norms) if kind == "norm" else (self._cols, self._values)
        cols.append(col)
        values.append(value)
        return False

    def take(self) -> tuple[int, tuple[int, ...], torch.Tensor] | None:
        """(step, columns, values to add to them), or None when nothing is staged; empties the stage."""
        step, norms = self.step, len(self._norms)
        cols = self._norm_cols + self._cols + [col for col, _ in self._units]
        values = self._norms + self._values + [u.eq(0).sum(dtype=torch.float32) for u in self._units.values()]
        self.step = None
        self._clear()
        if step is None or not values:
            return None
        stacked = torch.stack(values)
        if norms:
            stacked[:norms].square_()
        return step, tuple(cols), stacked


class _RowViews:
    """Views of one buffer row, made once so the step path slices nothing."""

    def __init__(self, row: torch.Tensor, layout: Layout) -> None:
        self.grad = row[layout.grad_norm:layout.grad_norm + layout.n_params]
        self.bad = row[layout.grad_bad:layout.grad_bad + layout.n_params]
        self.total = row[layout.run]
        self.clip = row[layout.run + 1:layout.run + 4]

    def blank(self) -> None:
        """A step with no gradient measured: every param "no gradient" (the host marks the row unmeasured)."""
        self.grad.fill_(NO_GRAD)
        self.bad.zero_()


def unwrap_optimizer(optimizer: Any) -> tuple[torch.optim.Optimizer, list[str]]:
    """The torch optimizer inside `optimizer` and the names of the wrappers around it, outermost
    first: accelerate's `AcceleratedOptimizer`, Lightning's `LightningOptimizer` (a subclass of
    the real optimizer's class that keeps it as `._optimizer`), or anything that keeps the real
    one as `.optimizer`. The hooks go on the real one, which every wrapper's `step()` calls."""
    wrappers: list[str] = []
    current = optimizer
    while len(wrappers) < 8:
        inner = next((getattr(current, a) for a in ("optimizer", "_optimizer")
                      if isinstance(getattr(current, a, None), torch.optim.Optimizer)
                      and getattr(current, a) is not current), None)
        if inner is None:
            break
        wrappers.append(type(current).__name__)
        current = inner
    if not (isinstance(current, torch.optim.Optimizer) and hasattr(current, "_optimizer_step_pre_hooks")):
        raise TypeError("`optimizer` must be a torch.optim.Optimizer or a wrapper with one as `.optimizer`. "
                        f"Got {type(optimizer).__name__}")
    return current, wrappers


def unwrap_model(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The module inside DDP (`.module`) and `torch.compile` (`._orig_mod`) wrappers, and their
    names, outermost first: its layers are named without `module.` / `_orig_mod.` prefixes."""
    wrappers: list[str] = []
    while True:
        if _is_ddp(model):
            inner = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            inner = model._orig_mod
        else:
            return model, wrappers
        wrappers.append(type(model).__name__)
        model = inner  # type: ignore[assignment]


def _compiling() -> bool:
    """Whether torch.compile is tracing: the hooks then branch on nothing that changes between
    steps (a branch on the step would put a guard on it), so they add no graph, graph break or
    recompile."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    if is_compiling is None:  # torch < 2.3
        from torch._dynamo import is_compiling
    return bool(is_compiling())


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel))


def _refuse_local_clipping(sharded: torch.Tensor | None, mode: str) -> None:
    """Clipping by value or per unit reports a shard-local norm after clipping: refuse it for sharded params."""
    if sharded is not None and mode in ("value", "agc"):
        raise ValueError(f"gradwatch: clip mode {mode!r} is not supported with sharded (FSDP2/DTensor) parameters; "
                         "use 'norm', 'param_norm', 'auto_percentile' or 'zscore'")


def _refuse_meta(model: nn.Module) -> None:
    """A model on the meta device has no values to measure yet: say when to attach instead."""
    meta = next((name for name, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise ValueError(f"gradwatch: parameter {meta!r} is on the meta device; call watch() after the model is "
                         "materialised (to_empty() and initialised, or loaded)")


def _refuse_sparse_clipping(model: nn.Module, mode: str) -> None:
    """Clipping per unit (AGC) cannot clip sparse gradients: refuse them up front."""
    if mode != "agc":
        return
    for name, module in model.named_modules():
        if getattr(module, "sparse", False) is True and isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            raise ValueError(f"gradwatch: clip mode {mode!r} cannot clip the sparse gradient of "
                             f"{(name + '.') if name else ''}weight; use mode 'norm' or sparse=False")


def _output_tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor of a module's output, in order (a PackedSequence as its data)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, torch.nn.utils.rnn.PackedSequence):
        return [output.data]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _output_tensors(item)]
    return []


def _after(callback: Callable[[], None]) -> list[bytes]:
    """A writer job that writes nothing and calls back once the jobs before it are done."""
    callback()
    return []


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _run_identity() -> tuple[str, int, int]:
    """(run id, rank, world size); ranks of a distributed job share rank 0's run id.

    `GRADWATCH_RUN_ID` becomes a file name: anything but 1-64 letters, digits, `.`, `_` and
    `-` (starting with a letter or digit) is refused rather than written somewhere else.
    """
    run_id = os.environ.get("GRADWATCH_RUN_ID") or uuid.uuid4().hex[:12]
    if not RUN_ID.fullmatch(run_id):
        raise ValueError(f"gradwatch: GRADWATCH_RUN_ID must be 1-64 letters, digits, '.', '_' or '-', starting with a "
                         f"letter or digit. Got {run_id[:80]!r}")
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [run_id]
        dist.broadcast_object_list(box, src=0)
        return str(box[0]), dist.get_rank(), dist.get_world_size()
    return run_id, 0, 1


def _config_json(config: AgentConfig) -> dict[str, Any]:
    data = config.model_dump(mode="python")
    for key in ("nonfinite", "max_total_norm_action"):
        if callable(data["guards"][key]):
            data["guards"][key] = "callback"
    data["home"] = str(data["home"]) if data["home"] is not None else None
    return data


def _lr_of(group: dict[str, Any]) -> float | None:
    """A param group's learning rate as a float (NaN and Inf as they are), or None when it has
    none that is a number. A tensor lr is read on the host (on a GPU that is a copy per step)."""
    lr = group.get("lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float, torch.Tensor)):
        return None
    return float(lr)


def _float_or_none(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def _version() -> str:
    from gradwatch import __version__

    return __version__


def _close_open_watchers() -> None:
    for watcher in list(_open):
        watcher.close()


__all__ = ["AlreadyWatched", "GradientGuardError", "Watcher", "watch"]
