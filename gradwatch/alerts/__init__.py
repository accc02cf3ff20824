"""Live alerts: the diagnosis rules evaluated as runs are ingested, with a lifecycle, a record in
the store and delivery to the log, webhooks and Alertmanager (docs/alerts.md).

Modules by role: `rules` (the live rule set and its defaults), `config` (the `[alerts]`
settings), `lifecycle` (pending -> firing -> resolved, pure), `stalled` (the service's own
rule), `ledger` (alerts in the store), `message` (what a notification says), `delivery` (bounded
queues and retries), `notifiers` (webhook, Alertmanager), `engine` (one evaluation pass).
Used by `gradwatch serve`; nothing here is imported by `import gradwatch`.
"""

from __future__ import annotations

from gradwatch.alerts.config import AlertsConfig
from gradwatch.alerts.engine import AlertEngine, AlertsSnapshot
from gradwatch.alerts.lifecycle import Alert, Transition
from gradwatch.alerts.notifiers import build_notifiers

__all__ = ["Alert", "AlertEngine", "AlertsConfig", "AlertsSnapshot", "Transition", "build_notifiers"]
