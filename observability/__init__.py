"""Observability: Prometheus metrics (``observability.metrics``); tracing, alert rules and dashboards
arrive with the observability issue."""
