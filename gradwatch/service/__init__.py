"""`gradwatch serve`: ingest run logs continuously and expose the latest values to Prometheus.

Modules by role: `settings` (configuration), `lock` (one server per store), `logs`
(structured one-line events), `exporter` (the collector), `server` (HTTP /metrics),
`pushgateway` (optional push), `runner` (wires them together), `cli` (the click command).
Nothing here is imported by `import gradwatch`.
"""
