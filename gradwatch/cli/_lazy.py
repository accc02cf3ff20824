"""A click group whose commands are imported only when run or asked for help.

`gradwatch --help` lists the commands from their registered one-line summaries, so it never
imports torch, matplotlib or SQLAlchemy. Errors a command raises are turned into one-line
messages here (see `_errors.translate`).
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import Any

import click

from gradwatch.cli._errors import translate, unexpected
from gradwatch.redact import redact


class LazyGroup(click.Group):
    """A group of commands given as {name: ("module:attribute", "one-line summary")}."""

    def __init__(self, *args: Any, lazy_commands: dict[str, tuple[str, str]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy_commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_commands and cmd_name not in self.commands:
            path, _ = self.lazy_commands[cmd_name]
            module, attr = path.split(":")
            command = getattr(importlib.import_module(module), attr)
            if not isinstance(command, click.Command):
                raise TypeError(f"{path} is not a click command")
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List commands with their registered summaries, without importing them."""
        rows = []
        for name in self.list_commands(ctx):
            if name in self.lazy_commands and name not in self.commands:
                rows.append((name, self.lazy_commands[name][1]))
            else:
                cmd = self.commands[name]
                if not cmd.hidden:
                    rows.append((name, cmd.get_short_help_str(formatter.width)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):  # click's own exits
            raise
        except BrokenPipeError:  # the reader went away (| head): stop quietly, as other tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise click.exceptions.Exit(1) from None
        except Exception as exc:
            translated = translate(exc)
            if translated is None:
                if os.environ.get("GRADWATCH_DEBUG"):  # the traceback, credentials masked
                    click.echo(redact("".join(traceback.format_exception(exc))), err=True)
                    raise click.exceptions.Exit(1) from None
                translated = unexpected(exc)
            raise translated from None
