"""Hugging Face Transformers: `GradwatchCallback` for `transformers.Trainer`.

```python
trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[GradwatchCallback()])
```

The Trainer clips (`TrainingArguments.max_grad_norm`, 1.0 by default) before it calls
`optimizer.step()`, where gradwatch measures: left to the Trainer, every "before clipping"
norm would read at most `max_grad_norm`. So the callback takes the clipping over: it sets
`max_grad_norm` to 0 for the training (the Trainer then still computes and logs the
`grad_norm` it would have clipped) and has the agent clip exactly as `clip_grad_norm_` does,
after measuring. docs/integrations.md has the details.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from gradwatch.agent.watcher import AlreadyWatched
from gradwatch.integrations import launch
from gradwatch.integrations._clip import with_framework_clip

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from gradwatch.agent.config import AgentConfig
    from gradwatch.agent.watcher import Watcher

__all__ = ["GradwatchCallback"]

log = logging.getLogger("gradwatch.integrations")


class GradwatchCallback(TrainerCallback):
    """Watches the Trainer's model and optimizer from `on_train_begin` to `on_train_end`.

    `run` names the run (default: `TrainingArguments.run_name`, else the model's class
    name); `config` is the agent's config (an `AgentConfig`, a dict or a TOML path).
    The loss recorded at each optimizer step is the one the model returns, combined over
    the step's micro-batches as the Trainer combines it for its own `loss` log.
    `watcher` is the watcher of the last training.
    """

    def __init__(self, run: str | None = None, config: AgentConfig | dict[str, Any] | str | Path | None = None) -> None:
        self.run = run
        self.config = config
        self.watcher: Watcher | None = None
        self._clip_restore: tuple[TrainingArguments, float] | None = None
        self._loss_hook: RemovableHandle | None = None
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self._loss_shares = False  # the model normalised its loss by the step's item count
        self._shares_scale = 1.0  # the processes the Trainer averages those item counts over

    # ------------------------------------------------------------------ Trainer events

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, optimizer: Any = None, **kwargs: Any) -> None:
        self._attach(args, model, optimizer)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        """After the optimizer step (or the one the AMP scaler skipped): the step's loss, as device tensors."""
        if self.watcher is None:
            return
        scalars = {}
        if self._loss_sum is not None:
            scalars["loss"] = (self._loss_sum * self._shares_scale if self._loss_shares
                               else self._loss_sum / self._loss_count)
        self.watcher.log(**scalars)
        self._loss_sum, self._loss_count = None, 0

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._close()

    # ------------------------------------------------------------------ internals

    def _attach(self, args: TrainingArguments, model: nn.Module | None, optimizer: Any,
                where: str = "at train begin (Hugging Face callback)") -> None:
        import gradwatch

        if model is None or optimizer is None:
            raise ValueError("gradwatch: the Trainer gave the callback no model or optimizer at train begin")
        self._close()
        config = self._take_over_clipping(args)
        try:
            self.watcher = gradwatch.watch(model, optimizer, run=self.run or args.run_name or None, config=config,
                                           scaler=getattr(optimizer, "scaler", None),  # accelerate's AMP scaler
                                           replicated=_data_parallel(args))
        except BaseException:
            self._close()
            raise
        self._loss_hook = model.register_forward_hook(self._capture_loss, with_kwargs=True)
        average = getattr(args, "average_tokens_across_devices", False) and args.world_size > 1
        self._shares_scale = float(args.world_size) if average else 1.0
        launch.announce(self.watcher, model, optimizer, where)

    def _capture_loss(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        """The loss of a training forward pass, kept on the device."""
        if not module.training or not torch.is_grad_enabled():
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return
        value = loss.detach().reshape(()).float()
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._loss_count += 1
        # A loss normalised by the step's item count (`num_items_in_batch`) is a share of the
        # step's loss: the Trainer adds the shares up (scaled by the processes averaged over).
        self._loss_shares = kwargs.get("num_items_in_batch") is not None

    def _take_over_clipping(self, args: TrainingArguments) -> AgentConfig:
        """The agent's config, clipping as `max_grad_norm` asked, which is set to 0 for the training."""
        from gradwatch.agent.config import load_config

        value = float(args.max_grad_norm or 0.0)
        if value <= 0:
            return load_config(self.config)
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            log.warning("gradwatch: under DeepSpeed or FSDP the Trainer keeps clipping (max_grad_norm=%s), and "
                        "gradwatch records the gradients after it", value)
            return load_config(self.config)
        config = with_framework_clip(self.config, "norm", value, f"TrainingArguments(max_grad_norm={value})")
        self._clip_restore = (args, args.max_grad_norm)
        args.max_grad_norm = 0.0
        return config

    def _close(self) -> None:
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None
        if self.watcher is not None:
            self.watcher.close()
        if self._clip_restore is not None:
            args, value = self._clip_restore
            args.max_grad_norm = value
            self._clip_restore = None
        self._loss_sum, self._loss_count = None, 0


class _Launched(GradwatchCallback):
    """The callback `gradwatch run` adds to every Trainer. It attaches at the first step rather
    than at train begin, so that a `GradwatchCallback` the script gives the Trainer itself
    attaches first; it then stands aside."""

    _pending = False

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, optimizer: Any = None, **kwargs: Any) -> None:
        self._close()
        self._pending = True

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      model: nn.Module | None = None, optimizer: Any = None, **kwargs: Any) -> None:
        if not self._pending:
            return
        self._pending = False
        try:
            self._attach(args, model, optimizer, "at the first step (Hugging Face callback)")
        except AlreadyWatched:  # the script attached gradwatch itself: stand aside
            return


def _data_parallel(args: TrainingArguments) -> bool:
    """Whether every rank holds the same gradients (plain DDP, not FSDP or DeepSpeed): rank 0 records their norms."""
    return args.world_size > 1 and not args.fsdp and not args.deepspeed
