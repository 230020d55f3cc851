"""Observability: what an operator needs to see whether predictions are fast, right and flowing.

- ``metrics``: every metric rtml exports, defined once (Ray's metrics API inside actors and
  replicas, prometheus-client elsewhere: ``backends/``); ``scrape``: the one scrape job and the
  registration of endpoints with a Prometheus.
- ``drift``: PSI and KS per tenant and feature, kept incrementally against a reference.
- ``tracing``: OpenTelemetry set-up and the carriers that take a sampled event's trace across
  Kafka headers and Ray calls.
- ``logs``: JSON log lines with trace and span ids; ``cli``: ``rtml logs``.
- ``rules/`` (Prometheus alert rules and their promtool tests), ``grafana/`` (dashboard and
  provisioning), ``alertmanager.yml`` (an example route); ``queries`` reads their expressions.
"""
