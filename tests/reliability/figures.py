"""Summarise the figures the reliability tests measured into the table of docs/reliability.md.

    GRADWATCH_RELIABILITY_REPEAT=5 GRADWATCH_RELIABILITY_FIGURES=figures.jsonl \\
        python -m pytest -m reliability
    python -m tests.reliability.figures figures.jsonl [--write-docs docs/reliability.md]

Each line of the file is one measurement (`checks.record_figure`). Rows group them by test
and by their non-numeric fields and the step rate; `seconds_lost` is given as median and
maximum, `steps_lost` as maximum, every other number summed over the repetitions.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- reliability-figures:begin -->", "<!-- reliability-figures:end -->"
_KEYS = ("backend", "rate", "status")


def _cell(name: str, values: list[Any]) -> str:
    if name == "seconds_lost":
        return f"median {statistics.median(values):.2f} s, max {max(values):.2f} s"
    if name == "steps_lost":
        return f"max {max(values):,}"
    return f"{sum(values):,}"


def summarise(lines: list[dict[str, Any]]) -> list[str]:
    """Markdown rows: test, case, repetitions, then each measured number."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for line in lines:
        case = ", ".join(f"{k} {line[k]}" for k in _KEYS if k in line)
        groups[(line["test"], case)].append(line)
    out = ["| test | case | runs | measured |", "|---|---|---|---|"]
    for (test, case), rows in sorted(groups.items()):
        names = [k for k in rows[0] if k not in ("test", *_KEYS)]
        measured = "; ".join(f"{n.replace('_', ' ')} {_cell(n, [r[n] for r in rows])}" for n in names)
        out.append(f"| {test} | {case or '-'} | {len(rows)} | {measured} |")
    return out


def write_docs(path: Path, rows: list[str]) -> None:
    text = path.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(head + BEGIN + "\n" + "\n".join(rows) + "\n" + END + tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("figures", type=Path, help="the JSON-lines file the tests wrote")
    ap.add_argument("--write-docs", type=Path, default=None, help="put the table into this file")
    args = ap.parse_args()
    rows = summarise([json.loads(line) for line in args.figures.read_text().splitlines() if line.strip()])
    print("\n".join(rows))
    if args.write_docs is not None:
        write_docs(args.write_docs, rows)


if __name__ == "__main__":
    main()
