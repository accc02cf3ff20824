"""What one ingest pass did."""

from __future__ import annotations

from dataclasses import dataclass, field

from gradwatch.agent.runlog import Record


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


@dataclass(frozen=True)
class Batch:
    """The records one committed ingest transaction took from one log, between two byte offsets.

    Handed to `Ingester(on_batch=...)` once committed, so that a reader can follow what the
    store holds without reading it back (the rules engine's windows, docs/alerts.md).
    """

    run_id: str
    rank: int
    start: int
    end: int
    records: tuple[Record, ...]
