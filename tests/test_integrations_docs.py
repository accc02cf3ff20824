"""Every example of docs/integrations.md runs as written: the Lightning, Hugging Face and
accelerate ones in this process, the DDP one under torchrun with two processes."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from gradwatch.agent import runlog

DOC = (Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text()


def example(section: str) -> str:
    """The one Python example of a `## section` of docs/integrations.md."""
    match = re.search(rf"^## {re.escape(section)}$(.*?)(?=^## |\Z)", DOC, re.S | re.M)
    assert match, f"docs/integrations.md has no section {section!r}"
    [code] = re.findall(r"```python\n(.*?)```", match.group(1), re.S)
    return code


def runs(home: Path) -> list[dict]:
    headers = [runlog.read_log(p)[0] for p in sorted((home / "logs").glob("*.gwlog"))]
    return [h.info for h in headers if isinstance(h, runlog.Header)]


@pytest.mark.parametrize("section, framework, name", [
    ("Lightning", "lightning", "lightning_logs/version_0"),
    ("Hugging Face Transformers", "transformers", "gpt2-tiny"),
    ("accelerate", "accelerate", "accelerate-demo"),
], ids=["lightning", "hf", "accelerate"])
def test_example_runs_and_records_one_run(section, framework, name, tmp_path, monkeypatch, gradwatch_home):
    pytest.importorskip(framework)
    script = tmp_path / "example.py"
    script.write_text(example(section))
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(script), run_name="__main__")
    [info] = runs(gradwatch_home)
    assert info["name"] == name


def test_ddp_example_runs_under_torchrun_as_one_run_with_a_log_per_rank(tmp_path, gradwatch_home):
    script = tmp_path / "train_ddp.py"
    script.write_text(example("DDP and torchrun"))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    infos = runs(gradwatch_home)
    assert sorted(i["rank"] for i in infos) == [0, 1] and len({i["run_id"] for i in infos}) == 1
    assert all(i["name"] == "ddp-demo" and i["model"]["wrappers"] == ["DistributedDataParallel"] for i in infos)
