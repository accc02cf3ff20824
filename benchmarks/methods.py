"""The monitoring methods the overhead benchmark compares, and the timer of their own code.

Every method trains its own copy of the model with its own optimizer. Its *own time* is the
time the training thread spends inside the method's code: the call itself for
`clip_grad_norm_`, TensorBoard's `add_histogram` and the loggers' `log`; for hook-based
methods (gradwatch, `wandb.watch`) the time inside every hook they registered, measured by
`HookTimer` (on a `torch.compile`d model: the optimizer's hooks only, so own time is then a
lower bound; the compiled step's ratio to the compiled bare step is the figure that counts).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from time import perf_counter_ns
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

_MODULE_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
_FORWARD_HOOKS = ("_forward_pre_hooks", "_forward_hooks")
_PARAM_HOOKS = ("_backward_hooks", "_post_accumulate_grad_hooks")
_OPTIMIZER_HOOKS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks")


def _tensors(obj: Any) -> Iterator[Tensor]:
    """The tensors in a hook's arguments or result (nested tuples, lists and dicts)."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


class HookTimer:
    """Adds the time spent inside hooks registered on one model copy and its optimizer to `ns`.

    The model copy and optimizer belong to one method only, so every hook found on them is
    that method's. `wrap_new()` replaces each hook not yet wrapped, in the hook dict torch
    keeps, by a wrapper that times it; the harness calls it after `attach()` and after every
    step (outside the timed span), so hooks a method adds later are timed from the next step.
    A wrapped forward (pre-)hook that registers tensor hooks on the module's inputs or outputs
    (the gradient w.r.t. activations) has those wrapped at once, so they are timed in the same
    backward pass. Each wrapper costs two `perf_counter_ns` calls and one Python frame.
    """

    def __init__(self, model: nn.Module, optimizer: Optimizer) -> None:
        self.ns = 0
        self.calls = 0
        self._owners: list[tuple[Any, tuple[str, ...]]] = [(optimizer, _OPTIMIZER_HOOKS)]
        if not hasattr(model, "_orig_mod"):  # a torch.compile'd model's hooks are traced: a timer would break its graph
            self._owners += [(m, _MODULE_HOOKS) for m in model.modules()]
            self._owners += [(p, _PARAM_HOOKS) for p in model.parameters()]

    def wrap_new(self) -> int:
        """Wrap every hook on the model and optimizer not wrapped yet; return how many."""
        wrapped = 0
        for owner, attrs in self._owners:
            for attr in attrs:
                wrapped += self._wrap_dict(getattr(owner, attr, None), scan=attr in _FORWARD_HOOKS)
        return wrapped

    def _wrap_dict(self, hooks: dict[int, Callable[..., Any]] | None, scan: bool) -> int:
        if not hooks:
            return 0
        wrapped = 0
        for key, fn in list(hooks.items()):
            if getattr(fn, "_hook_timer", None) is not self:
                hooks[key] = self._wrap(fn, scan)
                wrapped += 1
        return wrapped

    def _wrap(self, fn: Callable[..., Any], scan: bool) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = perf_counter_ns()
            try:
                result = fn(*args, **kwargs)
            finally:
                self.ns += perf_counter_ns() - start
                self.calls += 1
            if scan:
                for tensor in _tensors((args, result)):
                    self._wrap_dict(tensor._backward_hooks, scan=False)
            return result

        timed._hook_timer = self  # type: ignore[attr-defined]
        return timed


class Method:
    """Plain training: no monitoring. Subclasses add theirs and count its time in `own_ns`."""

    name = "bare"
    description = "no monitoring"
    requires: tuple[str, ...] = ()
    """Modules the method imports: checked by `missing()`, imported by `preload()` before timing."""
    sync_free = False
    """On CUDA, run this method's steps under `torch.cuda.set_sync_debug_mode("error")`."""

    def __init__(self) -> None:
        self.own_ns = 0
        self.steps = 0

    @classmethod
    def missing(cls) -> str | None:
        """Why the method cannot run here (a module it needs is not there), or None when it can."""
        for module in cls.requires:
            try:
                found = importlib.util.find_spec(module)
            except ModuleNotFoundError:
                found = None
            if found is None:
                return f"no module {module}"
        return None

    @classmethod
    def preload(cls) -> None:
        """Import what the method needs, so that its setup time leaves the import out."""
        for module in cls.requires:
            importlib.import_module(module)

    def attach(self, model: nn.Module, optimizer: Optimizer, workdir: Path, run: str) -> None:
        """Start monitoring `model` trained by `optimizer`; write any files under `workdir`."""

    def before_step(self) -> None:
        """Called after `backward()`, before `optimizer.step()`."""

    def after_step(self, loss: Tensor) -> None:
        """Called after `optimizer.step()` with the step's loss."""
        self.steps += 1

    def own_time_ns(self) -> int:
        """Cumulative time the training thread spent inside this method's code."""
        return self.own_ns

    def untimed(self) -> None:
        """Bookkeeping between steps, outside the timed span."""

    def close(self) -> None:
        """Stop monitoring and flush whatever the method writes."""


class ClipGradNorm(Method):
    """`torch.nn.utils.clip_grad_norm_(max_norm=1.0, foreach=True)` before every step."""

    name = "clip"
    description = "`clip_grad_norm_(max_norm=1.0, foreach=True)`"
    sync_free = True

    def attach(self, model: nn.Module, optimizer: Optimizer, workdir: Path, run: str) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]

    def before_step(self) -> None:
        start = perf_counter_ns()
        torch.nn.utils.clip_grad_norm_(self.params, max_norm=1.0, foreach=True)
        self.own_ns += perf_counter_ns() - start


class _Hooked(Method):
    """A method that works through hooks: their time is counted by a `HookTimer`."""

    timer: HookTimer

    def _start_timer(self, model: nn.Module, optimizer: Optimizer) -> None:
        self.timer = HookTimer(model, optimizer)
        if not self.timer.wrap_new():
            raise RuntimeError(f"{self.name}: no hook found on the model or optimizer after attaching")

    def own_time_ns(self) -> int:
        return self.own_ns + self.timer.ns

    def untimed(self) -> None:
        self.timer.wrap_new()


class Gradwatch(_Hooked):
    """`gradwatch.watch()` with a given configuration, `watcher.log(loss=loss)` every step."""

    requires = ("gradwatch.agent.watcher",)
    sync_free = True

    def __init__(self, name: str, description: str, config: dict[str, Any]) -> None:
        super().__init__()
        self.name = name
        self.description = description
        self.config = config

    def attach(self, model: nn.Module, optimizer: Optimizer, workdir: Path, run: str) -> None:
        from gradwatch.agent import watch

        self.watcher = watch(model, optimizer, run=run, config={**self.config, "home": str(workdir / "gradwatch")})
        self._start_timer(model, optimizer)

    def after_step(self, loss: Tensor) -> None:
        start = perf_counter_ns()
        self.watcher.log(loss=loss)
        self.own_ns += perf_counter_ns() - start
        self.steps += 1

    def close(self) -> None:
        self.watcher.close()


class WandbWatch(_Hooked):
    """`wandb.watch(log="gradients", log_freq=1)` in an offline run, `run.log` of the loss."""

    name = "wandb"
    description = '`wandb.watch(log="gradients", log_freq=1)`, offline, system stats off'

    requires = ("wandb",)

    def attach(self, model: nn.Module, optimizer: Optimizer, workdir: Path, run: str) -> None:
        import wandb

        settings = wandb.Settings(mode="offline", silent=True, console="off", x_disable_stats=True)
        self.run = wandb.init(project="gradwatch-bench", name=run, dir=str(workdir), settings=settings)
        self.run.watch(model, log="gradients", log_freq=1)
        self._start_timer(model, optimizer)

    def after_step(self, loss: Tensor) -> None:
        start = perf_counter_ns()
        self.run.log({"loss": loss.item()})
        self.own_ns += perf_counter_ns() - start
        self.steps += 1

    def close(self) -> None:
        self.run.finish()


class TensorBoardHistograms(Method):
    """TensorBoard `add_histogram` of every gradient and `add_scalar` of the loss every step."""

    name = "tensorboard"
    description = "TensorBoard `add_histogram` of every gradient every step"

    requires = ("tensorboard", "torch.utils.tensorboard")

    def attach(self, model: nn.Module, optimizer: Optimizer, workdir: Path, run: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(workdir / "tensorboard" / run))
        self.params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    def before_step(self) -> None:
        start = perf_counter_ns()
        for name, param in self.params:
            if param.grad is not None:
                self.writer.add_histogram(f"grad/{name}", param.grad, self.steps)
        self.own_ns += perf_counter_ns() - start

    def after_step(self, loss: Tensor) -> None:
        start = perf_counter_ns()
        self.writer.add_scalar("loss", loss.detach(), self.steps)
        self.own_ns += perf_counter_ns() - start
        self.steps += 1

    def close(self) -> None:
        self.writer.close()


_EVERY_STEP = {"measure": {"param_every": 1, "update_ratio_every": 1, "activation_every": 1}}

METHODS: dict[str, Callable[[], Method]] = {
    "bare": Method,
    "clip": ClipGradNorm,
    "gradwatch": lambda: Gradwatch("gradwatch", "gradwatch, default config", {}),
    "gradwatch-all": lambda: Gradwatch(
        "gradwatch-all", "gradwatch, every metric every step (`param_every`, `update_ratio_every`, "
        "`activation_every` = 1)", _EVERY_STEP),
    "gradwatch-clip": lambda: Gradwatch(
        "gradwatch-clip", 'gradwatch, default config plus `clip={"mode": "norm", "max_norm": 1.0}`',
        {"clip": {"mode": "norm", "max_norm": 1.0}}),
    "wandb": WandbWatch,
    "tensorboard": TensorBoardHistograms,
}
"""Every method by name; `DEFAULT_METHODS` are those the benchmark runs unless told otherwise."""

DEFAULT_METHODS: tuple[str, ...] = ("bare", "clip", "gradwatch", "gradwatch-clip", "gradwatch-all", "wandb", "tensorboard")

