"""The rules engine benchmark runs end to end on a tiny configuration and reports what it should.

No timing is asserted: the numbers depend on the machine (docs/alerts.md records them).
"""

from __future__ import annotations

from benchmarks.alerts_bench import measure, rule_costs
from gradwatch.diagnose import RULES


def test_a_tiny_benchmark_reports_cpu_per_pass_and_each_rule() -> None:
    row = measure(n_runs=2, n_params=8, seconds=3.0, steps_per_s=2, window=40)
    assert (row["runs"], row["passes"], row["alerts"]) == (2, 6, 0)
    assert 0 < row["cpu_ms_per_pass_mean"] <= row["cpu_ms_per_pass_max"] and row["core_share"] > 0
    assert set(rule_costs(n_params=8, window=40, repeat=2)) == {r.__name__ for r in RULES}
