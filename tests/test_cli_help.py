"""Every command has help with an example and a documented section; the CLI starts light."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from gradwatch import __version__
from gradwatch.cli import COMMANDS, main
from tests.fixtures.cli_runs import REPO, invoke, ok, run_cli

DOCS = (REPO / "docs" / "cli.md").read_text()
SHARED = {"--db", "--home", "--json", "--help"}


def _section(name: str) -> str:
    """The docs/cli.md section of one command."""
    m = re.search(rf"^## `gradwatch {name}`$(.*?)(?=^## |\Z)", DOCS, re.S | re.M)
    assert m, f"docs/cli.md has no section '## `gradwatch {name}`'"
    return m.group(1)


def _command(name: str) -> click.Command:
    with click.Context(main) as ctx:
        cmd = main.get_command(ctx, name)
    assert isinstance(cmd, click.Command)
    return cmd


def test_group_lists_every_command():
    text = ok("--help")
    listed = re.findall(r"^  (\w+)  ", text.split("Commands:")[1], re.M)
    assert listed == sorted(COMMANDS)
    assert "Example" in text


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_has_help_with_an_example(name):
    cmd = _command(name)
    assert cmd.help and cmd.help.strip()
    for flag in ("-h", "--help"):
        text = ok(name, flag)
        assert "Example:" in text and f"gradwatch {name}" in text.split("Example:")[1]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_is_documented_with_every_option(name):
    section = _section(name)
    assert "Example" in section and f"gradwatch {name}" in section
    if name == "serve":  # the service's own options are documented in docs/service.md
        assert "docs/service.md" in section
        return
    for param in _command(name).params:
        longs = [o for o in param.opts if o.startswith("--")]
        if isinstance(param, click.Option) and not SHARED.intersection(longs):
            assert any(o in section for o in longs), f"{name}: {longs} not in docs/cli.md"


def test_query_commands_take_json():
    exempt = {"export", "demo", "serve", "run", "dashboards"}  # export has --format; demo and run train; serve serves;
    # dashboards is a group (its push has --json)
    for name in sorted(set(COMMANDS) - exempt):
        assert "--json" in {o for p in _command(name).params for o in p.opts}, name


def test_help_and_light_commands_do_not_import_heavy_modules():
    code = ("import sys; from gradwatch.cli import main\n"
            "for args in (['--help'], ['runs', '-h'], ['diagnose', '-h'], ['plot', '-h'], ['demo', '-h']):\n"
            "    try:\n        main(args, prog_name='gradwatch')\n    except SystemExit as e:\n"
            "        assert e.code == 0, (args, e.code)\n"
            "print(sorted(m for m in ('torch', 'matplotlib', 'sqlalchemy', 'numpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_version_and_a_query_as_a_subprocess(tmp_path):
    assert run_cli("--version").stdout.strip() == f"gradwatch, version {__version__}"
    from gradwatch.store import Store

    Store.open(home=tmp_path / "gw").close()
    proc = run_cli("runs", "--json", "--home", str(tmp_path / "gw"))
    assert proc.returncode == 0 and json.loads(proc.stdout) == []


def test_unknown_command_is_a_usage_error():
    result = invoke("nosuchcommand")
    assert result.exit_code == 2 and "No such command" in result.stderr


def test_registry_points_at_real_commands():
    for name, (path, summary) in COMMANDS.items():
        module, attr = path.split(":")
        assert Path(REPO, *module.split(".")).with_suffix(".py").exists(), path
        assert summary.endswith(".") and len(summary) < 80


def test_console_script_when_installed(tmp_path):
    script = Path(sys.executable).with_name("gradwatch")
    if not script.exists():
        pytest.skip("gradwatch is not installed in this environment (pip install -e . provides the script)")
    from gradwatch.store import Store

    Store.open(home=tmp_path / "gw").close()
    proc = subprocess.run([str(script), "runs", "--json", "--home", str(tmp_path / "gw")], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0 and json.loads(proc.stdout) == []
