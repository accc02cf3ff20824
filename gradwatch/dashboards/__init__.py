"""gradwatch's Grafana dashboards, generated from code (`builder`), and uploaded by `push`.

`dashboards/*.json` in the repository is `render()` of `DASHBOARDS`, byte for byte (a test
holds them equal): edit the modules here, then regenerate from the repository's root with
``gradwatch dashboards generate`` (``--check`` only compares). Imported only by the CLI and
tests, never by ``import gradwatch``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from gradwatch.dashboards.builder import Dashboard
from gradwatch.dashboards.layers import layers
from gradwatch.dashboards.overview import overview

__all__ = ["DASHBOARDS", "check", "render", "write"]

#: every dashboard, by uid (also its file name: dashboards/<uid>.json)
DASHBOARDS: dict[str, Callable[[], Dashboard]] = {"gradwatch-overview": overview, "gradwatch-layers": layers}


def render(uid: str) -> str:
    """The JSON text of dashboard `uid`, as the repository ships it."""
    return json.dumps(DASHBOARDS[uid]().to_json(), indent=2, ensure_ascii=False) + "\n"


def write(out_dir: Path) -> list[Path]:
    """Write every dashboard into `out_dir` (created if missing); returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for uid in DASHBOARDS:
        path = out_dir / f"{uid}.json"
        path.write_text(render(uid), encoding="utf-8")
        paths.append(path)
    return paths


def check(out_dir: Path) -> list[str]:
    """Names of the files in `out_dir` that differ from what `write` would write (missing ones
    included); empty when every one is up to date."""
    stale = []
    for uid in DASHBOARDS:
        path = out_dir / f"{uid}.json"
        if not path.is_file() or path.read_text(encoding="utf-8") != render(uid):
            stale.append(path.name)
    return stale
