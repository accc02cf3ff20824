"""gradwatch: gradient diagnostics and monitoring for PyTorch training jobs.

`import gradwatch` is light: `watch` and the agent (and so torch) load on first use, and
the service, store and CLI modules only when they are used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["AgentConfig", "AlreadyWatched", "GradientGuardError", "Watcher", "watch", "__version__"]

if TYPE_CHECKING:
    from gradwatch.agent import AgentConfig, AlreadyWatched, GradientGuardError, Watcher, watch


def __getattr__(name: str) -> Any:
    if name in ("AgentConfig", "AlreadyWatched", "GradientGuardError", "Watcher", "watch"):
        import gradwatch.agent

        return getattr(gradwatch.agent, name)
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
