"""What one ingest pass did."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class IngestReport:
    """Counts of one pass over the run logs of a home.

    `busy` lists logs skipped because another ingester held them; `crashed` and `finished`
    the runs whose status this pass decided.
    """

    logs: int = 0
    bytes: int = 0
    records: int = 0
    values: int = 0
    errors: int = 0
    busy: list[str] = field(default_factory=list)
    crashed: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)

    def add(self, other: IngestReport) -> None:
        """Accumulate another report into this one."""
        self.logs += other.logs
        self.bytes += other.bytes
        self.records += other.records
        self.values += other.values
        self.errors += other.errors
        self.busy += other.busy
        self.crashed += other.crashed
        self.finished += other.finished
