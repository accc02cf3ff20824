"""The in-process agent: hooks, measurements, clipping, guards and the run log writer.

It imports only torch, numpy, pydantic and the standard library. `gradwatch.agent.runlog`
(the log format, read by the service) needs neither torch nor pydantic, so the public
names below load lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["AgentConfig", "AlreadyWatched", "GradientGuardError", "Watcher", "watch"]

if TYPE_CHECKING:
    from gradwatch.agent.config import AgentConfig
    from gradwatch.agent.guards import GradientGuardError
    from gradwatch.agent.watcher import AlreadyWatched, Watcher, watch


def __getattr__(name: str) -> Any:
    if name == "AgentConfig":
        from gradwatch.agent.config import AgentConfig

        return AgentConfig
    if name == "GradientGuardError":
        from gradwatch.agent.guards import GradientGuardError

        return GradientGuardError
    if name in ("AlreadyWatched", "Watcher", "watch"):
        from gradwatch.agent import watcher

        return getattr(watcher, name)
    raise AttributeError(f"module 'gradwatch.agent' has no attribute {name!r}")
