"""`gradwatch diagnose RUN`: findings with their evidence, likely causes and remedies."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from gradwatch.cli import _format as fmt
from gradwatch.cli._options import CONTEXT, json_option, resolve_run, with_store

if TYPE_CHECKING:
    from gradwatch.diagnose import Finding
    from gradwatch.store import Store

HEALTHY = "no problems found"


def render_findings(name: str, run_id: str, findings: list[Finding], verbose: bool = True) -> str:
    """Findings as text: severity and title, evidence, and (when verbose) causes and remedies."""
    head = f"{name} ({run_id})"
    if not findings:
        return f"{head}: {HEALTHY}"
    lines = [f"{head}: {len(findings)} finding{'s' if len(findings) > 1 else ''}"]
    for f in findings:
        lines += ["", f"[{f.severity.upper()}] {f.title}"]
        lines += [f"  - {s}" for s in f.evidence.summary]
        if verbose:
            lines.append("  likely causes:")
            lines += [f"    * {c}" for c in f.causes]
            lines.append("  remedies:")
            lines += [f"    * {r}" for r in f.remedies]
    return "\n".join(lines)


def diagnose_run(store: Store, run_id: str) -> tuple[str, list[Finding]]:
    """(run name, findings) of one stored run."""
    from gradwatch.diagnose import diagnose
    from gradwatch.diagnose.load import load_run_data

    data = load_run_data(store, run_id)
    return data.name, diagnose(data)


@click.command(context_settings=CONTEXT, epilog="""\b
Example:
    gradwatch diagnose demo-rnn-high-lr
    gradwatch diagnose demo-healthy --json
    gradwatch diagnose my-run --strict   # exit 1 on errors or warnings (CI)""")
@click.argument("run")
@click.option("--brief", is_flag=True, help="Only titles and evidence, no causes and remedies.")
@click.option("--strict", is_flag=True, help="Exit with status 1 when any error or warning is found.")
@json_option
@with_store
def diagnose(store: Store, run: str, brief: bool, strict: bool, as_json: bool) -> None:
    """Find gradient problems in a run (vanishing, exploding, non-finite, saturation, dying units,
    initialisation, clipping), each with its evidence (numbers, layers, steps), likely causes and
    remedies. Prints "no problems found" for a healthy run. Thresholds: docs/diagnosis.md."""
    run_id = resolve_run(store, run)
    name, findings = diagnose_run(store, run_id)
    data: dict[str, Any] = {"run": {"id": run_id, "name": name}, "healthy": not findings,
                            "findings": [f.to_json() for f in findings]}
    fmt.emit(data, as_json, lambda d: render_findings(name, run_id, findings, verbose=not brief))
    if strict and any(f.severity in ("error", "warning") for f in findings):
        raise click.exceptions.Exit(1)
