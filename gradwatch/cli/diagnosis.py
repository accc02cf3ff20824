"""`gradwatch diagnose RUN`: findings with their evidence, likely causes and remedies."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from gradwatch.cli import _format as fmt
from gradwatch.cli._options import (CONTEXT, json_option, rank_metrics, rank_option, require_steps, resolve_run,
                                    with_store)

if TYPE_CHECKING:
    from gradwatch.diagnose import Finding
    from gradwatch.store import Store

HEALTHY = "no problems found"


def problems(findings: list[Finding]) -> list[Finding]:
    """The findings to act on: errors and warnings (an `info` finding is worth knowing, handled)."""
    return [f for f in findings if f.severity in ("error", "warning")]


def render_findings(name: str, run_id: str, findings: list[Finding], verbose: bool = True) -> str:
    """Findings as text: severity and title, evidence, and (when verbose) causes and remedies."""
    from gradwatch.diagnose.text import plural

    head = f"{fmt.printable(name)} ({run_id})"
    if not findings:
        return f"{head}: {HEALTHY}"
    if not problems(findings):
        lines = [f"{head}: {HEALTHY} ({plural(len(findings), 'note')})"]
    else:
        lines = [f"{head}: {plural(len(findings), 'finding')}"]
    for f in findings:
        lines += ["", f"[{f.severity.upper()}] {f.title}"]
        lines += [f"  - {s}" for s in f.evidence.summary]
        if verbose:
            lines.append("  likely causes:")
            lines += [f"    * {c}" for c in f.causes]
            lines.append("  remedies:")
            lines += [f"    * {r}" for r in f.remedies]
    return "\n".join(lines)


def diagnose_run(store: Store, run_id: str, rank: int = 0) -> tuple[str, list[Finding]]:
    """(run name, findings) of one rank of a stored run."""
    from gradwatch.diagnose import diagnose
    from gradwatch.diagnose.load import load_run_data

    data = load_run_data(store, run_id, rank)
    return data.name, diagnose(data)


@click.command(context_settings=CONTEXT, epilog="""\b
Example:
    gradwatch diagnose demo-rnn-high-lr
    gradwatch diagnose demo-healthy --json
    gradwatch diagnose my-run --strict   # exit 1 on errors or warnings (CI)""")
@click.argument("run")
@click.option("--brief", is_flag=True, help="Only titles and evidence, no causes and remedies.")
@click.option("--strict", is_flag=True,
              help="Exit with status 1 when any error or warning is found (info notes do not count).")
@rank_option
@json_option
@with_store
def diagnose(store: Store, run: str, brief: bool, strict: bool, rank: int | None, as_json: bool) -> None:
    """Find gradient problems in a run (non-finite values, exploding gradients, loss spikes,
    vanishing flow, saturation, dying units, clipping), each with its evidence (numbers, layers,
    steps), likely causes and remedies; `info` notes (such as the init check) are not problems.
    Prints "no problems found" when nothing is an error or warning; a run with no steps stored is
    an error (exit 1), not a healthy run. Thresholds: docs/diagnosis.md."""
    run_id = resolve_run(store, run)
    require_steps(store.run(run_id), "nothing to diagnose")
    chosen, _ = rank_metrics(store, run_id, rank)
    name, findings = diagnose_run(store, run_id, chosen)
    data: dict[str, Any] = {"run": {"id": run_id, "name": name}, "healthy": not problems(findings),
                            "findings": [f.to_json() for f in findings]}
    if rank is not None:
        data["rank"] = chosen
    fmt.emit(data, as_json, lambda d: render_findings(name if rank is None else f"{name} rank {chosen}", run_id,
                                                      findings, verbose=not brief))
    if strict and problems(findings):
        raise click.exceptions.Exit(1)
