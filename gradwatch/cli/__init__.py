"""The `gradwatch` command line: a thin shell over the store's query API, diagnosis and plots.

Commands are imported lazily (see `_lazy.LazyGroup`), so `gradwatch --help` and light
commands start without importing torch, matplotlib or SQLAlchemy.
"""

from __future__ import annotations

import click

from gradwatch import __version__
from gradwatch.cli._lazy import LazyGroup
from gradwatch.cli._options import CONTEXT

__all__ = ["COMMANDS", "main"]

#: Every command: name -> ("module:attribute", one-line summary shown by `gradwatch --help`).
COMMANDS: dict[str, tuple[str, str]] = {
    "runs": ("gradwatch.cli.runs:runs", "List runs, newest first, with status, steps and norms."),
    "show": ("gradwatch.cli.show:show", "Summarise one run: config, init check, events, layers at risk."),
    "layers": ("gradwatch.cli.layers:layers", "Every layer's measurements at a step or over a range."),
    "history": ("gradwatch.cli.history:history", "One metric over steps, with a sparkline."),
    "compare": ("gradwatch.cli.compare:compare", "Compare two runs side by side, layer by layer."),
    "export": ("gradwatch.cli.export:export", "Export every record of a run as CSV or JSON."),
    "delete": ("gradwatch.cli.retention:delete", "Delete a run from the store."),
    "gc": ("gradwatch.cli.retention:gc", "Delete runs that ended long ago."),
    "plot": ("gradwatch.cli.plot:plot", "Draw a run's gradient pictures into an image file."),
    "diagnose": ("gradwatch.cli.diagnosis:diagnose", "Find gradient problems, with evidence and remedies."),
    "alerts": ("gradwatch.cli.alerts:alerts", "Alerts raised by gradwatch serve, firing and past."),
    "dashboards": ("gradwatch.cli.dashboards:dashboards", "Regenerate the Grafana dashboards, or upload them."),
    "demo": ("gradwatch.cli.demo:demo", "Train small jobs that show each problem, then diagnose them."),
    "run": ("gradwatch.cli.run:run", "Run a training command with gradwatch attached, no code changes."),
    "serve": ("gradwatch.service.cli:serve", "Ingest run logs continuously and serve /metrics."),
}


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings=CONTEXT,
             epilog="\b\nExample:\n    gradwatch demo\n    gradwatch runs\n    gradwatch diagnose demo-rnn-high-lr")
@click.version_option(__version__, "-V", "--version", prog_name="gradwatch")
def main() -> None:
    """gradwatch: gradient diagnostics and monitoring for PyTorch.

    Runs recorded by `gradwatch.watch(model, optimizer)` are read from the store
    (--db, or GRADWATCH_HOME/gradwatch.db); run logs not yet stored are ingested first, so
    no service needs to run. RUN is a run id, a unique id prefix or a run name (its newest run).
    """
