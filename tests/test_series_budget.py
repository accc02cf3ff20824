"""docs/metrics.md's series budget is what the exporter really costs (tests/series_budget.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradwatch.service.exporter import RunLatest
from gradwatch.service.tiers import Tiers
from gradwatch.store.models import LatestValue
from tests.series_budget import on_ranks, series

DOCS = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def test_ranks_are_counted_as_a_service_sees_them() -> None:
    run = RunLatest(id="r", name="n", project="p", status="running", param_layers={"fc.weight": "fc"},
                    layer_depths={"fc": 0},
                    values=[LatestValue("r", 0, "loss", "run", "", 3, 1.0),
                            LatestValue("r", 0, "grad_norm", "layer", "fc", 3, 2.0),
                            LatestValue("r", 0, "act_mean", "layer", "fc", 3, 0.5),
                            LatestValue("r", 0, "grad_norm", "param", "fc.weight", 3, 2.0)])
    eight = on_ranks(run, 8)
    assert sorted({v.rank for v in eight.values}) == list(range(8))
    # loss x 8 ranks, step x 8, the run's info, status x 3; grad norm and mean, the mean's max rank
    assert series(eight, Tiers()) == 8 + 8 + 1 + 3 + 2 + 1
    assert series(eight, Tiers(per_rank=True)) == 8 + 8 + 1 + 3 + 2 * 8
    assert series(eight, Tiers(per_rank=True, per_param=True)) == 8 + 8 + 1 + 3 + 2 * 8 + 8


@pytest.mark.slow
def test_the_documented_budget_is_computed_from_the_exporter() -> None:
    from tests.series_budget import compute

    tables = compute()
    assert tables in DOCS.read_text(), ("docs/metrics.md's series budget is out of date (the agent records "
                                        f"other series?); paste `python -m tests.series_budget`:\n{tables}")
