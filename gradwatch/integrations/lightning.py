"""Lightning: `GradwatchCallback` attaches gradwatch at fit start and closes it at fit end.

```python
trainer = lightning.Trainer(callbacks=[GradwatchCallback()], gradient_clip_val=1.0)
```

Lightning steps every optimizer with a closure and clips inside it, before the closure
returns to the optimizer, which is where gradwatch measures: left to Lightning, the clipped
norm would be recorded as the one "before clipping". So the callback takes the clipping
over: it turns `Trainer(gradient_clip_val=...)` off for the fit and has the agent clip
the same way (`norm`: exactly `clip_grad_norm_`, `value`: exactly `clip_grad_value_`)
right after it has measured, before the update. docs/integrations.md has the details.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import nn

from gradwatch.integrations import launch
from gradwatch.integrations._clip import with_framework_clip

if TYPE_CHECKING:
    from gradwatch.agent.config import AgentConfig
    from gradwatch.agent.watcher import Watcher

__all__ = ["GradwatchCallback"]

log = logging.getLogger("gradwatch.integrations")


class GradwatchCallback(pl.Callback):
    """Watches the LightningModule and its optimizer(s) from fit start to fit end.

    `run` names the run (default: the logger's `name/version`, such as
    `lightning_logs/version_3`, else the module's class name); `config` is the agent's
    config (an `AgentConfig`, a dict or a TOML path). With several optimizers, each is
    watched with the smallest submodule that holds its parameters, as a run of its own
    named `<run>.<submodule>`. `watchers` holds the watchers of the last fit.
    """

    def __init__(self, run: str | None = None, config: AgentConfig | dict[str, Any] | str | Path | None = None) -> None:
        self.run = run
        self.config = config
        self.watchers: list[Watcher] = []
        self._clip_restore: tuple[pl.Trainer, float] | None = None
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self._stepped = False

    # ------------------------------------------------------------------ Lightning hooks

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import gradwatch

        self.watchers = []
        self._reset_loss()
        config = self._take_over_clipping(trainer, pl_module)
        name = self.run or _logger_run_name(trainer)
        if trainer.world_size > 1:
            name = trainer.strategy.broadcast(name)  # a logger's version is chosen on rank 0
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # AMP's GradScaler, when there is one
        try:
            for module, suffix, optimizer in _targets(pl_module, trainer.optimizers):
                run = f"{name}{suffix}" if name else (f"{type(pl_module).__name__}{suffix}" if suffix else None)
                watcher = gradwatch.watch(module, optimizer, run=run, config=config, scaler=scaler,
                                          replicated=_data_parallel(trainer))
                self.watchers.append(watcher)
                launch.announce(watcher, module, optimizer, "at fit start (Lightning callback)")
        except BaseException:
            self._close()
            raise

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self._stepped = True  # this batch ends with an optimizer step (every optimizer, AMP or not)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            value = loss.detach().reshape(()).float()
            if pl_module.automatic_optimization:
                # Lightning divides the loss it returns by `accumulate_grad_batches`.
                value = value * trainer.accumulate_grad_batches
            self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
            self._loss_count += 1
        if not self._stepped:
            return  # a micro-batch of an accumulated step: its loss joins the step's mean
        scalars = {"loss": self._loss_sum / self._loss_count} if self._loss_sum is not None else {}
        for watcher in self.watchers:
            watcher.log(**scalars)  # device tensors: no host sync
        self._reset_loss()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    # ------------------------------------------------------------------ internals

    def _take_over_clipping(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> AgentConfig:
        """The agent's config, clipping as `Trainer(gradient_clip_val=...)` asked, which is turned off for the fit."""
        from gradwatch.agent.config import load_config

        value = trainer.gradient_clip_val
        if not value or not pl_module.automatic_optimization:
            return load_config(self.config)
        if type(pl_module).configure_gradient_clipping is not pl.LightningModule.configure_gradient_clipping:
            log.warning("gradwatch: %s overrides configure_gradient_clipping, so Lightning keeps clipping and "
                        "gradwatch records the gradients after it", type(pl_module).__name__)
            return load_config(self.config)
        algorithm = getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm) or "norm"
        config = with_framework_clip(self.config, str(algorithm), float(value), f"Trainer(gradient_clip_val={value})")
        self._clip_restore = (trainer, value)
        trainer.gradient_clip_val = None
        return config

    def _close(self) -> None:
        for watcher in self.watchers:
            watcher.close()
        if self._clip_restore is not None:
            trainer, value = self._clip_restore
            trainer.gradient_clip_val = value
            self._clip_restore = None
        self._reset_loss()

    def _reset_loss(self) -> None:
        self._loss_sum, self._loss_count, self._stepped = None, 0, False


class _Launched(GradwatchCallback):
    """The callback `gradwatch run` adds through Lightning's entry point; it stands aside for a
    `GradwatchCallback` the script gives the Trainer itself."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if any(isinstance(cb, GradwatchCallback) and not isinstance(cb, _Launched) for cb in trainer.callbacks):
            return
        super().on_fit_start(trainer, pl_module)


def _logger_run_name(trainer: pl.Trainer) -> str | None:
    """`name/version` of the trainer's first logger (`lightning_logs/version_3`), None without one."""
    logger = trainer.logger
    if logger is None:
        return None
    version = logger.version
    parts = [str(logger.name or ""), f"version_{version}" if isinstance(version, int) else str(version or "")]
    return "/".join(p for p in parts if p) or None


def _targets(pl_module: nn.Module, optimizers: list[torch.optim.Optimizer]
             ) -> list[tuple[nn.Module, str, torch.optim.Optimizer]]:
    """(module, run name suffix, optimizer) to watch: the whole LightningModule with its one
    optimizer; with several, each optimizer with the smallest submodule holding its parameters."""
    if len(optimizers) == 1:
        return [(pl_module, "", optimizers[0])]
    targets: list[tuple[nn.Module, str, torch.optim.Optimizer]] = []
    taken: set[int] = set()
    for optimizer in optimizers:
        wanted = {id(p) for group in optimizer.param_groups for p in group["params"]}
        holders = [(sum(1 for _ in module.parameters()), name, module) for name, module in pl_module.named_modules()
                   if name and wanted <= {id(p) for p in module.parameters()}]
        size, name, module = min(holders, key=lambda h: h[0], default=(0, "", pl_module))
        if id(module) in taken or module is pl_module:
            log.warning("gradwatch: the parameters of %s are not in a submodule of their own; it is not watched",
                        type(optimizer).__name__)
            continue
        taken.add(id(module))
        targets.append((module, f".{name}", optimizer))
    return targets


def _data_parallel(trainer: pl.Trainer) -> bool:
    """Whether every rank holds the same gradients (DDP and its variants): rank 0 records their norms."""
    return trainer.world_size > 1 and type(trainer.strategy).__name__.startswith("DDP")
