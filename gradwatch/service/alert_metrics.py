"""The rules engine's alerts on /metrics: `gradwatch_alert_active` per firing alert and
`gradwatch_alerts_total` per rule and severity, from the engine's snapshot at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gradwatch.alerts import AlertsSnapshot
from gradwatch.service.catalog import ALERT_ACTIVE, ALERTS_TOTAL


class AlertCollector(Collector):
    """Yields the alert families from `snapshot()` (the engine's, thread-safe)."""

    def __init__(self, snapshot: Callable[[], AlertsSnapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        active = GaugeMetricFamily(ALERT_ACTIVE.name, ALERT_ACTIVE.help, labels=list(ALERT_ACTIVE.labels))
        for a in sorted(snap.firing, key=lambda a: (a.run_id, a.rule)):
            active.add_metric([a.run_id, a.run_name, a.rule, a.severity, a.layer], 1.0)
        total = CounterMetricFamily(ALERTS_TOTAL.name, ALERTS_TOTAL.help, labels=list(ALERTS_TOTAL.labels))
        for (rule, severity), count in sorted(snap.totals.items()):
            total.add_metric([rule, severity], float(count))
        yield active
        yield total
