"""`gradwatch demo`: train the demo jobs on the CPU, store them, print each diagnosis and what to run next."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from gradwatch.cli._options import CONTEXT, home_option, open_store, resolve_home


def _next_steps(home_flag: str) -> str:
    cmds = ["gradwatch runs --project demo",
            "gradwatch show demo-rnn-high-lr",
            "gradwatch diagnose demo-sigmoid-default-init",
            "gradwatch layers demo-sigmoid-normal-init --sort saturation_ratio",
            "gradwatch history demo-rnn-high-lr --metric grad_norm_total",
            "gradwatch compare demo-rnn-high-lr demo-rnn-high-lr-clipped",
            "gradwatch plot demo-sigmoid-default-init --out vanishing.png"]
    return "look further:\n" + "\n".join(f"  {c}{home_flag}" for c in cmds)


@click.command(context_settings=CONTEXT, epilog="""\b
Example:
    gradwatch demo
    gradwatch demo --home /tmp/gw-demo --quick""")
@home_option
@click.option("--quick", is_flag=True, help="Train each job for a third of its steps (same code; for tests and CI).")
def demo(home: Path | None, quick: bool) -> None:
    """Train small CPU jobs that show each gradient problem, store them and diagnose them.

    A deep sigmoid MLP with PyTorch's default init (vanishing gradients) and its twin with
    N(0, 1) weights (saturation); a vanilla RNN on long sequences with a high learning rate
    (exploding), then the same clipped; and a healthy ReLU network. About a minute on a laptop
    CPU; no server needed: runs go to the gradwatch home (--home, $GRADWATCH_HOME or ~/.gradwatch).
    """
    from gradwatch import demo as jobs
    from gradwatch.cli._progress import progress
    from gradwatch.cli.diagnosis import diagnose_run, render_findings

    home = resolve_home(home)
    home.mkdir(parents=True, exist_ok=True)
    plan = [(job, jobs.job_steps(job, quick)) for job in jobs.JOBS]
    click.echo(f"training {len(plan)} demo jobs on the CPU, recording into {home}")
    run_ids = []
    with progress(sum(n for _, n in plan), sys.stderr) as bar:  # the agent's warnings print above the bar
        for job, steps in plan:
            run_ids.append(jobs.train(job, home, steps, on_step=lambda name=job.name: bar.step(name)))
    store = open_store(click.get_current_context(), None, home, create=True)
    for (job, _), run_id in zip(plan, run_ids):
        name, findings = diagnose_run(store, run_id)
        click.echo(f"\n== {job.shows}")
        click.echo(render_findings(name, run_id, findings, verbose=False))
    default = resolve_home(None)
    home_flag = "" if home.resolve() == default.resolve() else f" --home {shlex.quote(str(home))}"
    click.echo("\n" + _next_steps(home_flag))
