"""The Prometheus metrics rtml's processes export, defined once so that every package updates the
same series (prometheus-client's default registry, one per process).

A Ray actor's metrics live in its own process: it serves them with ``serve(port)`` (or hands the
text of ``exposition()`` to whoever asks).
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest, start_http_server

CONSUMER_LAG = Gauge(
    "rtml_consumer_lag_events",
    "Events of a partition its consumer has not yet processed durably (log end minus checkpointed position).",
    ["group", "partition"],
)
STREAM_EVENTS = Counter(
    "rtml_stream_events_total",
    "Events stream consumers finished with, by outcome: scored, landed (batch path), late (counted, "
    "within the allowed lateness), dropped (beyond it) or unscored (the tenant has no model).",
    ["group", "outcome"],
)
DEAD_LETTERS = Counter(
    "rtml_dead_letters_total",
    "Records that could not be used and went to the dead-letter topic or files.",
    ["group"],
)
FEATURE_WINDOWS = Counter("rtml_feature_windows_total", "Final feature windows written.", ["group"])
CONSUMER_FAILURES = Counter(
    "rtml_stream_consumer_failures",
    "Failed scoring calls and lakehouse writes of stream consumers, by stage (scoring, write) and "
    "reason: retried (it may pass later; the consumer retried the call or rewound to its checkpoints), "
    "gave_up (it kept failing for streaming.give_up_after_s; the consumer stopped) or permanent (a "
    "retry cannot cure it; the consumer stopped). Alert on any reason but retried.",
    ["group", "stage", "reason"],
)
EVENT_TO_PREDICTION = Histogram(
    "rtml_event_to_prediction_seconds",
    "From the moment an event was available in the log to its ensemble score.",
    ["group"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


def serve(port: int) -> None:
    """Serve this process's metrics at http://0.0.0.0:port/metrics (a background thread)."""
    start_http_server(port)


def exposition() -> bytes:
    """This process's metrics in the Prometheus text format."""
    return generate_latest(REGISTRY)
