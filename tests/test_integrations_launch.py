"""`gradwatch run` on unmodified scripts, each in a real subprocess: a plain loop, a Lightning
script, a Hugging Face Trainer script and a 2-process torchrun DDP script. Each script prints
what plain torch (or the framework) computed; the run log must say the same. Argument errors
are checked in-process: one line, exit 2, nothing started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gradwatch.agent import runlog
from gradwatch.store import Store
from tests.fixtures.cli_runs import fails, invoke, ok

PLAIN = """
import json, sys
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
norms = []
for step in range(6):
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    nn.functional.mse_loss(model(x), y).backward()
    norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())
    opt.step()
    opt.zero_grad()
print(json.dumps({"norms": norms}))
sys.exit(int(sys.argv[1]))
"""

LIGHTNING = """
import json
import lightning as L
import torch
from torch import nn

class Regressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        self.norms = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y) * 10

    def on_before_optimizer_step(self, optimizer):
        self.norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.parameters()])).item())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

torch.manual_seed(0)
data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
module = Regressor()
trainer = L.Trainer(max_steps=4, gradient_clip_val=0.5, accelerator="cpu", enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1)
trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
print(json.dumps({"norms": module.norms}))
"""

HF = """
import json
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

class RandomIds(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(0))
    def __len__(self):
        return len(self.ids)
    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}

torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=12, n_embd=16, n_layer=1, n_head=2,
                                         bos_token_id=0, eos_token_id=0))
args = TrainingArguments(output_dir="out", per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                         max_grad_norm=0.1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=RandomIds())
trainer.train()
print(json.dumps({"grad_norm": [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h],
                  "max_grad_norm": args.max_grad_norm}))
"""

COMPILED = """
import json
import torch
from torch import nn
from torch._dynamo.utils import counters

torch.manual_seed(0)
model = torch.compile(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1)), backend="aot_eager")
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(4):
    nn.functional.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 1)).backward()
    opt.step()
    opt.zero_grad()
print(json.dumps({"graphs": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values())}))
"""

DDP = """
import json, os
import torch
import torch.distributed as dist
from torch import nn

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
norms = []
for step in range(4):
    g = torch.Generator().manual_seed(100 * step + rank)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)
    nn.functional.mse_loss(model(x), y).backward()
    norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())
    opt.step()
    opt.zero_grad()
print(json.dumps({"rank": rank, "norms": norms}))
dist.destroy_process_group()
"""


def launch(tmp_path: Path, script: str, *args: str, launcher: list[str] | None = None,
           options: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """`gradwatch run [options] -- <launcher> script.py args` from `tmp_path`, as a user would type it."""
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(script))
    command = [*(launcher or [sys.executable]), str(path), *args]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # gradwatch as installed, not the checkout
    return subprocess.run([sys.executable, "-m", "gradwatch.cli", "run", *options, "--", *command], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)


def attached_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("gradwatch:")]
    assert all("attached" in line and "not attached" not in line for line in lines), proc.stderr
    return lines


def logs(home: Path) -> list[Path]:
    return sorted((home / "logs").glob("*.gwlog"))


def header(path: Path) -> dict:
    first = runlog.read_log(path)[0]
    assert isinstance(first, runlog.Header)
    return first.info


def series(path: Path, metric: str) -> np.ndarray:
    blocks = [b for r in runlog.read_log(path) if isinstance(r, runlog.Frame) for b in r.blocks
              if b.metric.name == metric]
    assert blocks, f"{metric} not in {path}"
    return np.concatenate([b.values[:, 0] for b in blocks])


def result(proc: subprocess.CompletedProcess[str]) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_plain_loop_is_watched_from_its_first_step_and_its_exit_status_passes_through(tmp_path, gradwatch_home):
    config = tmp_path / "gw.toml"
    config.write_text('[gradwatch]\nclip = { mode = "norm", max_norm = 0.05 }\n')
    proc = launch(tmp_path, PLAIN, "3", options=("--run", "plain-loop", "--config", str(config)))
    assert proc.returncode == 3, proc.stderr
    [line] = attached_lines(proc)
    assert line.startswith("gradwatch: attached at the first optimizer step to Sequential (4 params in 3 layers) "
                           "and SGD: run 'plain-loop' id ")
    [path] = logs(gradwatch_home)
    assert str(path) in line
    info = header(path)
    assert info["name"] == "plain-loop" and info["config"]["clip"]["max_norm"] == 0.05
    assert [p["name"] for p in info["params"]] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    # measured from the very first step, before the clip the config asked for
    np.testing.assert_allclose(series(path, "grad_norm_total"), result(proc)["norms"], rtol=1e-5)
    np.testing.assert_allclose(series(path, "grad_norm_total_clipped"), 0.05, rtol=1e-4)


def test_a_compiled_model_gets_no_extra_graph_from_the_launchers_hooks(tmp_path, gradwatch_home):
    proc = launch(tmp_path, COMPILED)
    assert proc.returncode == 0, proc.stderr
    [line] = attached_lines(proc)
    assert "to Sequential inside OptimizedModule" in line
    assert result(proc) == {"graphs": 1, "breaks": 0}  # as the same script gets without gradwatch
    [path] = logs(gradwatch_home)
    assert [p["name"] for p in header(path)["params"]] == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_a_lightning_script_gets_the_callback_through_lightnings_entry_point(tmp_path, gradwatch_home):
    pytest.importorskip("lightning")
    proc = launch(tmp_path, LIGHTNING)
    assert proc.returncode == 0, proc.stderr
    [line] = attached_lines(proc)
    assert "attached at fit start (Lightning callback) to Regressor" in line
    assert "run 'lightning_logs/version_0'" in line
    [path] = logs(gradwatch_home)
    # the callback took the clipping over: the recorded norm is the one before clipping
    np.testing.assert_allclose(series(path, "grad_norm_total"), result(proc)["norms"], rtol=1e-5)
    np.testing.assert_allclose(series(path, "grad_norm_total_clipped"), 0.5, rtol=1e-4)
    assert header(path)["config"]["clip"] == {**header(path)["config"]["clip"], "mode": "norm", "max_norm": 0.5}


def test_a_hugging_face_trainer_gets_the_callback(tmp_path, gradwatch_home):
    pytest.importorskip("transformers")
    proc = launch(tmp_path, HF)
    assert proc.returncode == 0, proc.stderr
    [line] = attached_lines(proc)
    assert ("attached at the first step (Hugging Face callback) to GPT2LMHeadModel" in line
            and "and AdamW inside AcceleratedOptimizer" in line)
    [path] = logs(gradwatch_home)
    out = result(proc)
    np.testing.assert_allclose(series(path, "grad_norm_total"), out["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(series(path, "grad_norm_total_clipped"), 0.1, rtol=1e-4)
    assert out["max_grad_norm"] == 0.1  # handed back after training


def test_a_torchrun_ddp_job_is_one_run_with_one_log_per_rank(tmp_path, gradwatch_home):
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    proc = launch(tmp_path, DDP, launcher=[*launcher, "--standalone", "--nproc_per_node", "2"],
                  options=("--run", "ddp"))
    assert proc.returncode == 0, proc.stderr
    lines = attached_lines(proc)
    assert len(lines) == 2 and {line.split(" rank ")[1][0] for line in lines} == {"0", "1"}
    assert all("to Sequential inside DistributedDataParallel" in line for line in lines)
    paths = logs(gradwatch_home)
    infos = [header(p) for p in paths]
    assert len({i["run_id"] for i in infos}) == 1 and sorted(i["rank"] for i in infos) == [0, 1]
    assert all(i["world_size"] == 2 and i["name"] == "ddp" for i in infos)
    assert all([p["name"] for p in i["params"]] == ["0.weight", "0.bias", "2.weight", "2.bias"] for i in infos)
    rank0 = next(p for p, i in zip(paths, infos) if i["rank"] == 0)
    norms = next(r["norms"] for r in map(json.loads, proc.stdout.split("\n")[:-1]) if r["rank"] == 0)
    np.testing.assert_allclose(series(rank0, "grad_norm_total"), norms, rtol=1e-5)
    [run] = json.loads(ok("runs", "--json", "--home", str(gradwatch_home)))  # stored as one run, ranks apart
    assert run["name"] == "ddp" and run["world_size"] == 2
    with Store.open(home=gradwatch_home) as store:
        assert sorted(log.rank for log in store.logs(run["id"])) == [0, 1]


def test_the_environments_own_sitecustomize_and_pythonpath_still_work(tmp_path):
    own = tmp_path / "own"
    own.mkdir()
    (own / "sitecustomize.py").write_text("import os\nos.environ['OWN_SITE'] = 'ran'\n")
    (own / "helper.py").write_text("VALUE = 7\n")
    script = tmp_path / "show.py"
    script.write_text("import os, sys, helper\n"
                      "print(os.environ['OWN_SITE'], helper.VALUE, os.environ['GRADWATCH_LAUNCH'])\n"
                      "sys.exit(5)\n")
    env = {**os.environ, "PYTHONPATH": str(own)}
    proc = subprocess.run([sys.executable, "-m", "gradwatch.cli", "run", "--", sys.executable, str(script)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (5, "ran 7 1\n", "")  # no torch: nothing to say


@pytest.mark.parametrize("args, message", [
    ((), "Error: give the command to run after --, e.g. gradwatch run -- python train.py"),
    (("--", "no-such-command-gw"), "Error: command not found or not executable: no-such-command-gw"),
    (("--run", " ", "--", "python"), "Error: --run must not be empty"),
], ids=["no-command", "unknown-command", "empty-run-name"])
def test_bad_arguments_are_one_line_and_exit_2(args, message):
    assert fails(2, "run", *args) == message


def test_a_bad_config_file_is_refused_before_the_job_starts(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[clip]\nmode = 'norm'\n")
    assert fails(2, "run", "--config", str(bad), "--", "python") == (
        f"Error: invalid gradwatch config {bad} at clip: Value error, clip mode 'norm' needs max_norm "
        "(got {'mode': 'norm'})")
    assert fails(2, "run", "--config", str(tmp_path / "missing.toml"), "--", "python").startswith(
        "Error: cannot read gradwatch config")


def test_an_unknown_option_is_a_usage_error():
    result = invoke("run", "--bogus", "--", "python")
    assert result.exit_code == 2 and "No such option '--bogus'" in result.stderr
