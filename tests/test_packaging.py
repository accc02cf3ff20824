"""Packaging: the wheel installs and works from outside the repository; imports stay light.

The wheel is built from a copy of the source tree (so nothing is written into the checkout)
with `python -m build --wheel --no-isolation`, which needs no network. It is installed with
`--no-deps --no-index` into a fresh virtual environment that sees this interpreter's
site-packages through a `.pth` file (torch, pydantic, click ... come from there, so the test is
fast and offline). `venv --system-site-packages` is not enough: when the tests run inside a
virtual environment it would expose the *base* interpreter's packages, not the test
environment's. Directories named in a `.pth` file are added to `sys.path` without their own
`.pth` files being processed, so the editable install of gradwatch stays invisible there.

Import weight is checked in fresh subprocesses through `sys.modules`.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "gradwatch"

#: Top-level modules the agent must never import (DESIGN.md): the service's libraries and
#: third-party HTTP clients. (The standard library's `http.client` and `urllib.request` are
#: imported by torch itself, so the static check below covers those for our own code.)
AGENT_FORBIDDEN = frozenset({
    "sqlalchemy", "prometheus_client", "click", "matplotlib", "psycopg", "psycopg2",
    "requests", "httpx", "urllib3", "aiohttp", "pycurl",
})
#: Standard-library network modules the agent's own source must not import.
AGENT_FORBIDDEN_STDLIB = frozenset({"http", "urllib.request", "ssl", "smtplib", "ftplib", "xmlrpc"})
#: `import gradwatch` alone loads none of these: the agent, torch and the service load lazily.
PARENT_FORBIDDEN = AGENT_FORBIDDEN | {"torch", "numpy", "pydantic", "pydantic_settings"}

#: What the wheel is built from: the checkout less its tests, tools and caches.
_TOP_LEVEL_SKIP = frozenset({".git", ".venv", "venv", "build", "dist", "out", "tests", "benchmarks", "docs",
                             "deploy", "dashboards", ".ci", ".pytest_cache", ".mypy_cache", ".ruff_cache"})
_ANYWHERE_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


def _ignore(directory: str, names: list[str]) -> set[str]:
    skipped = set(_ANYWHERE_SKIP(directory, names))
    if Path(directory) == REPO:
        skipped |= _TOP_LEVEL_SKIP.intersection(names)
    return skipped


def _clean_env() -> dict[str, str]:
    """The environment for child interpreters: nothing that would put the checkout on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited with {proc.returncode}\n"
        f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    )
    return proc


_STAGES_SCRIPT = """
import importlib, json, pkgutil, sys
stages = {}
import gradwatch
stages["import gradwatch"] = sorted(sys.modules)
import gradwatch.agent
stages["import gradwatch.agent"] = sorted(sys.modules)
import gradwatch.agent.runlog
stages["import gradwatch.agent.runlog"] = sorted(sys.modules)
watch = gradwatch.watch
stages["gradwatch.watch"] = sorted(sys.modules)
import gradwatch.agent.watcher as w
assert watch is gradwatch.agent.watch is w.watch, "gradwatch.watch is not gradwatch.agent.watcher.watch"
assert gradwatch.Watcher is w.Watcher and gradwatch.AgentConfig is gradwatch.agent.AgentConfig
assert "watch" in gradwatch.__all__ and callable(watch)
for m in pkgutil.walk_packages(gradwatch.agent.__path__, "gradwatch.agent."):
    importlib.import_module(m.name)
stages["every gradwatch.agent module"] = sorted(sys.modules)
print(json.dumps(stages))
"""


@pytest.fixture(scope="module")
def import_stages() -> dict[str, set[str]]:
    """`sys.modules` of one fresh interpreter after each step of importing gradwatch and its agent.

    One interpreter for all steps: each import of torch costs seconds on a busy 2-core machine.
    """
    proc = _run([sys.executable, "-c", _STAGES_SCRIPT], cwd=REPO)
    return {stage: set(mods) for stage, mods in json.loads(proc.stdout.splitlines()[-1]).items()}


def _offending(modules: set[str], forbidden: frozenset[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in forbidden)


# ---------------------------------------------------------------- import weight


def test_import_gradwatch_is_light(import_stages: dict[str, set[str]]) -> None:
    assert _offending(import_stages["import gradwatch"], PARENT_FORBIDDEN) == []


def test_runlog_needs_no_torch(import_stages: dict[str, set[str]]) -> None:
    """The service reads run logs through gradwatch.agent.runlog without loading torch."""
    modules = import_stages["import gradwatch.agent.runlog"]
    assert _offending(modules, AGENT_FORBIDDEN | {"torch", "pydantic"}) == []


def test_watch_loads_the_agent_and_torch(import_stages: dict[str, set[str]]) -> None:
    modules = import_stages["gradwatch.watch"]
    assert "torch" in modules and "gradwatch.agent.watcher" in modules


@pytest.mark.parametrize("stage", ["import gradwatch.agent", "gradwatch.watch", "every gradwatch.agent module"])
def test_agent_imports_no_service_library(import_stages: dict[str, set[str]], stage: str) -> None:
    modules = import_stages[stage]
    assert _offending(modules, AGENT_FORBIDDEN) == []
    # nor anything from the service side of gradwatch itself
    assert sorted(m for m in modules if _service_side(m)) == []


def _service_side(name: str) -> bool:
    """`gradwatch.<anything but agent>`; the parent's dunders (`__version__`) are fine."""
    parts = name.split(".")
    return parts[0] == "gradwatch" and len(parts) > 1 and parts[1] != "agent" and not parts[1].startswith("__")


def _imported_names(path: Path) -> Iterator[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def test_agent_source_imports_no_network_or_service_module() -> None:
    """Static check, so lazy imports inside functions are covered too."""
    bad = []
    for path in sorted((PACKAGE / "agent").rglob("*.py")):
        for lineno, name in _imported_names(path):
            top = name.split(".")[0]
            if (top in AGENT_FORBIDDEN or top == "http"
                    or any(name == m or name.startswith(m + ".") for m in AGENT_FORBIDDEN_STDLIB)
                    or _service_side(name)):
                bad.append(f"{path.relative_to(REPO)}:{lineno}: {name}")
    assert bad == []


# ---------------------------------------------------------------- the wheel


def _require_build_tools() -> None:
    """`build --no-isolation` needs `build` and the build backend in this environment."""
    missing = []
    for dist, minimum in (("build", (1, 0)), ("setuptools", (68,))):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            missing.append(f"{dist} is not installed")
            continue
        parts = tuple(int(p) for p in version.split(".")[: len(minimum)] if p.isdigit())
        if parts < minimum:
            missing.append(f"{dist} {version} is older than {'.'.join(map(str, minimum))}")
    if missing:
        message = "cannot build the wheel offline: " + "; ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require_build_tools()
    src = tmp_path_factory.mktemp("src") / "gradwatch-src"
    shutil.copytree(REPO, src, ignore=_ignore)
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)], cwd=src)
    wheels = sorted(out.glob("gradwatch-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel installed and this environment's packages visible."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=root.parent)
    python = root / "bin" / "python"
    child_site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                           cwd=root).stdout.strip())
    parent_dirs = dict.fromkeys([*site.getsitepackages(), sysconfig.get_path("purelib"),
                                 sysconfig.get_path("platlib")])
    (child_site / "zz_parent_env.pth").write_text("".join(f"{d}\n" for d in parent_dirs if Path(d).is_dir()))
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
          "--no-cache-dir", "--disable-pip-version-check", str(wheel)], cwd=root)
    return root


def test_wheel_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
        metadata = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    for required in ("gradwatch/__init__.py", "gradwatch/py.typed", "gradwatch/agent/__init__.py",
                     "gradwatch/agent/runlog.py", "gradwatch/cli/__init__.py"):
        assert required in names
    # every module, the typing marker and the packaged dashboards of the source tree
    wanted = [*PACKAGE.rglob("*.py"), PACKAGE / "py.typed", *PACKAGE.glob("dashboards/*.json")]
    missing = sorted(str(p.relative_to(REPO)) for p in wanted
                     if "__pycache__" not in p.parts and str(p.relative_to(REPO)) not in names)
    assert missing == []
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "agent/"))]
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert "gradwatch = gradwatch.cli:main" in entry_points
    assert "Requires-Dist: torch>=2.2" in metadata


def test_installed_wheel_imports_from_the_venv(venv: Path, tmp_path: Path) -> None:
    code = ("import gradwatch.agent, gradwatch, gradwatch.agent.runlog\n"
            "assert callable(gradwatch.watch)\n"
            "print(gradwatch.__file__)")
    proc = _run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path)
    location = Path(proc.stdout.strip().splitlines()[-1]).resolve()
    assert location.is_relative_to(venv.resolve()), location
    assert not location.is_relative_to(REPO), location


def test_installed_console_script_help(venv: Path, tmp_path: Path) -> None:
    script = venv / "bin" / "gradwatch"
    assert script.exists()
    proc = _run([str(script), "--help"], cwd=tmp_path)
    assert proc.stdout.startswith("Usage: gradwatch")
    for command in ("runs", "diagnose", "serve"):
        assert f"\n  {command} " in proc.stdout
    version = _run([str(script), "--version"], cwd=tmp_path)
    assert importlib.metadata.version("gradwatch") in version.stdout
