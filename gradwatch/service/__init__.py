"""`gradwatch serve`: ingest run logs continuously, expose the latest values to Prometheus and
evaluate the live rules (`gradwatch.alerts`).

Modules by role: `settings` (configuration), `lock` (one server per store), `logs`
(structured one-line events), `exporter` (the collector), `alert_metrics` (the alerts on
/metrics), `server` (HTTP /metrics), `pushgateway` (optional push), `runner` (wires them
together), `cli` (the click command). Nothing here is imported by `import gradwatch`.
"""
