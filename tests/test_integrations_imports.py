"""The frameworks stay optional: gradwatch, its agent, the launcher and `gradwatch run` import
none of them; only each framework's own adapter module does."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gradwatch"
FRAMEWORKS = frozenset({"lightning", "pytorch_lightning", "lightning_fabric", "transformers", "accelerate"})
ADAPTERS = {"lightning": PACKAGE / "integrations" / "lightning.py", "transformers": PACKAGE / "integrations" / "hf.py"}

IMPORTS = """
import json, os, sys
os.environ.pop("GRADWATCH_LAUNCH", None)
import gradwatch, gradwatch.agent, gradwatch.agent.watcher, gradwatch.integrations
import gradwatch.integrations.launch as launch, gradwatch.cli.run
assert launch.lightning_callbacks() == []  # Lightning's entry point, outside `gradwatch run`
launch.install()
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {frameworks!r})))
"""


def test_gradwatch_the_agent_and_the_launcher_import_no_framework():
    code = IMPORTS.format(frameworks=set(FRAMEWORKS))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout.splitlines()[-1]) == []


def test_only_each_adapter_imports_its_framework():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for name in names:
                top = name.split(".")[0]
                if top in FRAMEWORKS and ADAPTERS.get(top) != path:
                    bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {name}")
    assert bad == []
