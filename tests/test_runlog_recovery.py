"""The run log recovery check of benchmarks/runlog_recovery.py, small and with fixed seeds:
a real agent log, damaged copies of it ingested one by one, every stored value compared
with the intact log's ingest."""

from __future__ import annotations

from pathlib import Path

from benchmarks.runlog_recovery import damaged_copies, recovery, reference, write_real_log


def test_damaged_copies_of_a_real_log_store_every_intact_value_and_nothing_wrong(tmp_path: Path) -> None:
    ref = reference(write_real_log(tmp_path / "agent", steps=30, seed=0), tmp_path)
    copies = damaged_copies(ref.data, n_random=6, seed=1, targets=("length", "payload"))
    tallies = recovery(ref, copies, tmp_path)
    assert sorted(tallies) == ["all", "flips", "flips+truncation", "targeted definition copy",
                               "targeted header copy", "truncation"]
    assert tallies["targeted header copy"].copies == tallies["targeted definition copy"].copies == 6
    everything = tallies["all"]
    assert everything.wrong == 0
    assert everything.expected > 0 and everything.recovered / everything.expected >= 0.99
    for kind in ("targeted header copy", "targeted definition copy"):
        assert tallies[kind].recovered == tallies[kind].expected == tallies[kind].copies * ref.keys.shape[0]
