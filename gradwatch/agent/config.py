"""The agent's configuration: one typed pydantic model, loadable from a dict or a TOML file."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_serializer, field_validator,
                      model_validator)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

ClipMode = Literal["none", "norm", "value", "param_norm", "agc", "auto_percentile", "zscore"]
GuardAction = Literal["warn", "skip", "raise", "ignore"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """`max_norm = true` is a mistake, not 1.0: booleans are refused where a number is due."""
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            options = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
            if bool not in options and any(o in (int, float) for o in options):
                raise ValueError("must be a number, not a boolean")
        return value


class ClipConfig(_Section):
    """Gradient clipping, applied in the optimizer's step pre-hook before the update.

    norm: global L2 norm to `max_norm` (as `clip_grad_norm_`); value: every element to
    [-max_value, max_value] (as `clip_grad_value_`); param_norm: each parameter to its own
    `max_norm`; agc: unit-wise adaptive clipping (Brock et al. 2021) with `clip_factor` and
    `eps`; auto_percentile: AutoClip (Seetharaman et al. 2020), the `percentile`-th percentile
    of the last `history` total norms; zscore: ZClip (Kumar et al. 2025), EMA mean/variance of
    the total norm with `alpha`, clipping when z > `z_threshold` after `warmup` steps.
    """

    mode: ClipMode = "none"
    max_norm: float | None = Field(default=None, gt=0)
    max_value: float | None = Field(default=None, gt=0)
    clip_factor: float = Field(default=0.01, gt=0)
    eps: float = Field(default=1e-3, gt=0)
    agc_exclude_last_layer: bool = True
    percentile: float = Field(default=10.0, gt=0, le=100)
    history: int = Field(default=1000, ge=1, le=100_000)
    alpha: float = Field(default=0.97, gt=0, lt=1)
    z_threshold: float = Field(default=2.5, gt=0)
    warmup: int = Field(default=25, ge=2, le=1_000_000)

    @model_validator(mode="after")
    def _needs_threshold(self) -> ClipConfig:
        if self.mode in ("norm", "param_norm") and self.max_norm is None:
            raise ValueError(f"clip mode {self.mode!r} needs max_norm")
        if self.mode == "value" and self.max_value is None:
            raise ValueError("clip mode 'value' needs max_value")
        return self


GuardCallback = Callable[[dict[str, Any]], None]
SpikeOn = Literal["loss", "grad_norm", "either", "both"]


class SpikeConfig(_Section):
    """The spike guard: a step whose loss or total gradient norm is an outlier of its recent past.

    Every step the robust z-score (x - median) / (1.4826 MAD) of the loss and of the total norm
    (before clipping) over their last `window` values is computed on the device, once `warmup`
    values were seen. A step is a spike when `on` says so: `loss` or `grad_norm` above
    `z_threshold`, `either`, or `both` at once. `action`: `warn` (an event and a warning, no
    sync), `skip` (the update is not applied and the optimizer state stays as it was: no sync
    for fused optimizers and on the CPU, one host sync per step otherwise), `raise`, `ignore`
    (z-scores recorded, nothing done) or a callable (called with the event, no sync). The loss
    is the scalar `loss` given to `watcher.log()`; `skip` and `raise` act on it only when it
    was logged before `optimizer.step()`.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    enabled: bool = True
    action: GuardAction | GuardCallback = "warn"
    on: SpikeOn = "either"
    z_threshold: float = Field(default=6.0, gt=0, le=1e6)
    window: int = Field(default=128, ge=8, le=4096)
    warmup: int = Field(default=32, ge=2, le=4096)
    loss: str = Field(default="loss", min_length=1, max_length=200)

    @model_validator(mode="after")
    def _warmup_fits(self) -> SpikeConfig:
        if self.warmup > self.window:
            raise ValueError(f"warmup ({self.warmup}) must not exceed window ({self.window})")
        return self

    @field_serializer("action")
    def _action_name(self, action: GuardAction | GuardCallback) -> str:
        """A callable is written to the run header as "callback"."""
        return action if isinstance(action, str) else "callback"


class GuardConfig(_Section):
    """Guards that act on the training job.

    `warn` logs and records an event when the step's statistics reach the host (no sync);
    `skip` (the step is not applied) and `raise` decide on the step itself, which costs one
    host synchronisation per step; a callable is called with the event dict, without a sync,
    when the statistics reach the host.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    nonfinite: GuardAction | GuardCallback = "warn"
    max_total_norm: float | None = Field(default=None, gt=0)
    max_total_norm_action: GuardAction | GuardCallback = "warn"
    spike: SpikeConfig = SpikeConfig()

    @property
    def synchronous(self) -> bool:
        """True when a guard must decide on the step itself (needs a host sync)."""
        actions = [self.nonfinite] + ([self.max_total_norm_action] if self.max_total_norm else [])
        return any(a in ("skip", "raise") for a in actions)


class MeasureConfig(_Section):
    """How often each measurement is taken. 0 turns a measurement off.

    Gradient norms, clipping and guards run at every optimizer step; the costlier
    measurements every few steps. Statistics reach the host every `flush_every` steps, and
    at most `max_flush_interval` seconds after their step whatever the step rate, so a crash
    loses at most that much. `optimizer_every` (the Adam-family state statistics; None: the
    `param_every` cadence) and `noise_scale_every` (opt-in: it costs one norm per param per
    micro-batch on its steps) follow the same rule.
    """

    flush_every: int = Field(default=20, ge=1, le=10_000)
    max_flush_interval: float = Field(default=1.0, ge=0.01, le=3600)
    param_every: int = Field(default=10, ge=0, le=1_000_000)
    update_ratio_every: int = Field(default=10, ge=0, le=1_000_000)
    activation_every: int = Field(default=10, ge=0, le=1_000_000)
    saturation_eps: float = Field(default=0.01, gt=0, lt=0.5)
    optimizer_every: int | None = Field(default=None, ge=0, le=1_000_000)
    noise_scale_every: int = Field(default=0, ge=0, le=1_000_000)

    @property
    def optimizer_cadence(self) -> int:
        """Steps between optimizer-state measurements: `optimizer_every`, by default `param_every`."""
        return self.param_every if self.optimizer_every is None else self.optimizer_every


class ForwardConfig(_Section):
    """Attention, output logits and activation scale, measured in the forward pass on the steps that
    measure activations (`measure.activation_every`); docs/agent.md, "Attention, logits and scale".

    `attention`: the max attention logit and mean attention entropy of each attention layer, over
    `attention_rows` query rows and `attention_heads` heads per call (evenly spaced: the max is
    then a lower bound, the entropy an estimate); `attention_layers` names them (module names or
    fnmatch patterns) instead of detecting them. `logits`: the max logit and mean log-partition of
    the output layer, `logits_layer` naming it (None: detected in a model with attention layers).
    `blocks` names the containers whose children are the residual blocks (empty: detected).
    `scale`: RMS and max |x| of each block's output, max/RMS of every layer's output.
    """

    attention: bool = True
    attention_rows: int = Field(default=64, ge=1, le=1_000_000)
    attention_heads: int = Field(default=16, ge=1, le=100_000)
    attention_layers: tuple[str, ...] = ()
    logits: bool = True
    logits_layer: str | None = Field(default=None, min_length=1)
    blocks: tuple[str, ...] = ()
    scale: bool = True


class AgentConfig(_Section):
    """Everything the agent can be told. Defaults: no clipping, `warn` guards."""

    project: str = "default"
    home: Path | None = None
    clip: ClipConfig = ClipConfig()
    guards: GuardConfig = GuardConfig()
    measure: MeasureConfig = MeasureConfig()
    forward: ForwardConfig = ForwardConfig()
    queue_size: int = Field(default=64, ge=1, le=10_000)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the bad value."""


def load_config(config: AgentConfig | dict[str, Any] | str | Path | None) -> AgentConfig:
    """Build an AgentConfig from a model, a dict, a TOML file path, or None (defaults)."""
    if config is None:
        return AgentConfig()
    if isinstance(config, AgentConfig):
        return config
    if isinstance(config, (str, Path)):
        path = Path(config)
        source = f"gradwatch config {path}"
        try:
            data: Any = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read {source}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{source} is not valid TOML: not UTF-8 text") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source} is not valid TOML: {exc}") from None
        data = data.get("gradwatch", data)
    elif isinstance(config, dict):
        source, data = "gradwatch config", config
    else:
        raise ConfigError(f"config must be an AgentConfig, a dict or a TOML path. Got {type(config).__name__}")
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) if str(p).isprintable() else repr(p) for p in first["loc"]) or "config"
        raise ConfigError(f"invalid {source} at {where}: {first['msg']} (got {first.get('input')!r})") from None
