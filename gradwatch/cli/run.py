"""`gradwatch run`: start a training command with gradwatch attached, without changing the script."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import click

from gradwatch.cli._errors import BadInput, CliError, one_line
from gradwatch.cli._options import CONTEXT


@click.command(context_settings={**CONTEXT, "allow_interspersed_args": False}, epilog="""\b
Example:
    gradwatch run -- python train.py --lr 3e-4
    gradwatch run --run bert-ft --config gradwatch.toml -- torchrun --nproc_per_node 2 train.py""")
@click.option("--run", "run_name", metavar="NAME", help="Name of the run.  [default: the Lightning logger's "
              "name/version, TrainingArguments.run_name, else the model's class name]")
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Agent config, a TOML file (as for gradwatch.watch(config=...)).")
@click.argument("command", nargs=-1, required=False, type=click.UNPROCESSED, metavar="-- COMMAND [ARGS]")
def run(run_name: str | None, config: Path | None, command: tuple[str, ...]) -> None:
    """Run COMMAND with gradwatch attached to its model and optimizer.

    Every Python process COMMAND starts (torchrun's workers too) loads gradwatch at start-up
    and attaches when it sees the job's model and optimizer: a Lightning Trainer or a
    Hugging Face Trainer through their callbacks, any other loop at its first optimizer step,
    to the module called at the top level that holds most of that optimizer's parameters. One
    line on stderr says where it attached. COMMAND replaces this process, so its exit status
    is gradwatch run's. docs/integrations.md says what it finds and what it cannot.
    """
    from gradwatch.integrations.launch import launch_env

    if not command:
        raise BadInput("give the command to run after --, e.g. gradwatch run -- python train.py")
    if run_name is not None and not run_name.strip():
        raise BadInput("--run must not be empty")
    if config is not None:
        _check_config(config)
    env = launch_env(os.environ, run_name, config)
    executable = shutil.which(command[0], path=env.get("PATH"))
    if executable is None:
        raise BadInput(f"command not found or not executable: {command[0]}")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(executable, list(command), env)
    except OSError as exc:
        raise CliError(f"cannot run {command[0]}: {one_line(exc.strerror or str(exc))}") from None


def _check_config(path: Path) -> None:
    """Refuse a config file the agent would refuse, before the job starts."""
    from gradwatch.agent.config import ConfigError, load_config

    try:
        load_config(path)
    except ConfigError as exc:
        raise BadInput(one_line(str(exc))) from None
