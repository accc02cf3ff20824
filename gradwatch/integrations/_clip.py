"""Clipping a framework asked for, handed to the agent so that it measures before it clips."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradwatch.agent.config import AgentConfig


def with_framework_clip(config: AgentConfig | dict[str, Any] | str | Path | None, algorithm: str, threshold: float,
                        source: str) -> AgentConfig:
    """`config` with the agent clipping as the framework would have: `norm` (exactly
    `clip_grad_norm_`) or `value` (exactly `clip_grad_value_`) at `threshold`.

    The framework clips inside its step before gradwatch measures, so its norm would read as
    the one "before clipping"; the agent clips instead, right after measuring. A config that
    clips too is refused: the gradients would be clipped twice.
    """
    from gradwatch.agent.config import ClipConfig, load_config

    loaded = load_config(config)
    if loaded.clip.mode != "none":
        raise ValueError(f"gradwatch: clip.mode {loaded.clip.mode!r} and {source} would clip twice; "
                         "set only one of them")
    if algorithm == "value":
        clip = ClipConfig(mode="value", max_value=threshold)
    elif algorithm == "norm":
        clip = ClipConfig(mode="norm", max_norm=threshold)
    else:
        raise ValueError(f"gradwatch: {source}: unknown clipping algorithm {algorithm!r}")
    return loaded.model_copy(update={"clip": clip})
