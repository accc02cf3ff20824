"""Shared fixtures: every test gets its own GRADWATCH_HOME, so nothing touches ~/.gradwatch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def servers_required() -> bool:
    """CI sets GRADWATCH_REQUIRE_SERVERS=1: a missing Prometheus or PostgreSQL fails instead of skipping."""
    return os.environ.get("GRADWATCH_REQUIRE_SERVERS") == "1"


@pytest.fixture(autouse=True)
def gradwatch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "gwhome"
    monkeypatch.setenv("GRADWATCH_HOME", str(home))
    return home
