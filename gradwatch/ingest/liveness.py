"""Deciding whether the writer of an unclosed run log is gone (pure functions)."""

from __future__ import annotations

import os
import socket

DEFAULT_STALE_AFTER_S = 300.0


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def writer_gone(host: str | None, pid: int | None, last_growth_at: float, now: float,
                stale_after: float = DEFAULT_STALE_AFTER_S, this_host: str | None = None) -> bool:
    """True when the log's writer is dead: its process is gone (same host), or the log has
    not grown for `stale_after` seconds (any host)."""
    if host is not None and pid is not None and host == (this_host or socket.gethostname()):
        if not pid_alive(pid):
            return True
    return now - last_growth_at > stale_after
