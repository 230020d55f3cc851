"""Every metric rtml exports, defined once, so that every package updates the same series and the
alert rules and dashboards (``observability/rules``, ``observability/grafana``) name them as here.

Use: ``metrics.INGESTED.labels(tenant="acme").inc(120)``. Where the values go is decided per
process at first use (``observability.backends``): inside a Ray actor or Serve replica, Ray's
metrics API (the node's metrics agent exports them; the Ray dashboard shows them); anywhere else,
prometheus-client's registry, which the process serves with ``serve(port)``. Prometheus sees the
same names either way (``observability.scrape``).

Label values are bounded by design: tenants, partitions, models, features, pipeline stages and
fixed reason words; never event, entity or subject ids.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from prometheus_client import REGISTRY, generate_latest, start_http_server

from observability.backends import Backend, Instrument, Kind, MetricSpec

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)

_backend: Backend | None = None
_lock = threading.RLock()  # instrument() holds it while backend() is chosen
CATALOG: dict[str, "Family"] = {}


def _in_ray_actor() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


class _Discarded:
    """Metrics turned off (``observability.metrics_enabled = false``): every update is dropped."""

    name = "off"

    def instrument(self, spec: MetricSpec) -> "_Discarded":
        return self

    def inc(self, amount: float, labels: dict[str, str]) -> None:
        pass

    set = observe = inc


def backend() -> Backend:
    """This process's metrics backend: Ray's inside an actor or replica, prometheus-client
    elsewhere; none when the process's settings turn metrics off (benchmarks compare the two)."""
    global _backend
    if _backend is None:
        from rtml.settings import get_settings

        with _lock:
            if _backend is None:
                if not get_settings().observability.metrics_enabled:
                    chosen = _Discarded()
                elif _in_ray_actor():
                    from observability.backends import ray as chosen
                else:
                    from observability.backends import prometheus as chosen
                _backend = chosen
    return _backend


class Child:
    """A family with its label values fixed."""

    __slots__ = ("_family", "_labels")

    def __init__(self, family: "Family", labels: dict[str, str]):
        self._family, self._labels = family, labels

    def inc(self, amount: float = 1.0) -> None:
        self._family.instrument().inc(amount, self._labels)

    def set(self, value: float) -> None:
        self._family.instrument().set(value, self._labels)

    def observe(self, value: float) -> None:
        self._family.instrument().observe(value, self._labels)

    def observe_many(self, values: Iterable[float]) -> None:
        instrument = self._family.instrument()
        for value in values:
            instrument.observe(value, self._labels)


class Family:
    def __init__(self, spec: MetricSpec):
        self.spec = spec
        self._instrument: Instrument | None = None
        self._children: dict[tuple[str, ...], Child] = {}
        CATALOG[spec.name] = self

    def instrument(self) -> Instrument:
        if self._instrument is None:
            with _lock:
                if self._instrument is None:
                    self._instrument = backend().instrument(self.spec)
        return self._instrument

    def labels(self, **values: object) -> Child:
        if len(values) != len(self.spec.labels) or not all(label in values for label in self.spec.labels):
            raise ValueError(f"{self.spec.name} takes the labels {self.spec.labels}, not {tuple(values)}")
        key = tuple(str(values[label]) for label in self.spec.labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = Child(self, dict(zip(self.spec.labels, key)))
        return child


def _family(kind: Kind, name: str, help: str, labels: tuple[str, ...] = (), buckets: tuple[float, ...] = ()) -> Family:
    return Family(MetricSpec(kind, name, help, labels, buckets))


# ingestion (api.ingest, in the Ingress replicas) ---------------------------------------------------
INGESTED = _family("counter", "rtml_ingested_events_total", "Events accepted by the HTTP ingestion API (durable in the event log or lakehouse).", ("tenant", "path"))
INGEST_REJECTED = _family(
    "counter",
    "rtml_ingest_rejected_events_total",
    "Events the ingestion API refused, by reason: invalid, forbidden (another tenant's), too_large, rate_limited, unavailable (a 503: sent again later).",
    ("tenant", "reason"),
)
RATE_LIMITED = _family("counter", "rtml_rate_limited_requests_total", "Requests refused by a tenant's rate limit (429).", ("tenant",))
API_REQUESTS = _family("counter", "rtml_api_requests_total", "HTTP requests the Ingress answered, by route and status class (2xx, 4xx, 5xx).", ("route", "status"))

# the stream (consumer actors, the pipeline's supervisor) ------------------------------------------
STREAM_EVENTS = _family(
    "counter",
    "rtml_stream_events_total",
    "Events stream consumers finished with, by outcome: scored, landed (batch path), late (counted, within the allowed lateness), "
    "dropped (beyond it) or unscored (the tenant has no model).",
    ("group", "outcome"),
)
DEAD_LETTERS = _family("counter", "rtml_dead_letters_total", "Records that could not be used and went to the dead-letter topic or files.", ("group",))
FEATURE_WINDOWS = _family("counter", "rtml_feature_windows_total", "Final feature windows written.", ("group",))
CONSUMER_FAILURES = _family(
    "counter",
    "rtml_stream_consumer_failures_total",
    "Failed scoring calls and lakehouse writes of stream consumers, by stage (scoring, write) and reason: retried (it may pass later), "
    "gave_up (it kept failing for streaming.give_up_after_s; the consumer stopped) or permanent (no retry cures it; the consumer stopped).",
    ("group", "stage", "reason"),
)
CONSUMER_LAG = _family(
    "gauge", "rtml_consumer_lag_events", "Events of a partition its group has not yet committed (log end minus committed offset), read from the log.", ("group", "partition")
)
CONSUMER_COMMITTED = _family("gauge", "rtml_consumer_committed_offset", "The group's committed offset of a partition, read from the log.", ("group", "partition"))
CONSUMER_PROGRESS_AT = _family(
    "gauge",
    "rtml_consumer_last_progress_timestamp_seconds",
    "Unix time the group's committed offset of a partition last moved (or, with no lag, was last seen caught up).",
    ("group", "partition"),
)
EVENT_TO_DECISION = _family(
    "histogram",
    "rtml_event_to_decision_seconds",
    "From the moment an event was available in the log to its decision (ensemble and detector), per event.",
    ("group",),
    LATENCY_BUCKETS,
)
EVENT_TO_DURABLE = _family(
    "histogram", "rtml_event_to_durable_seconds", "From the moment an event was available in the log to its rows being durable in the lakehouse.", ("group",), LATENCY_BUCKETS
)
PREDICTIONS = _family("counter", "rtml_predictions_total", "Decisions made, per tenant and path (stream, http).", ("tenant", "path"))
ANOMALIES = _family("counter", "rtml_anomalies_total", "Decisions that were anomalous, per tenant and path (stream, http).", ("tenant", "path"))

# serving (ModelScorer and ModelRouter replicas) --------------------------------------------------
MODEL_INFERENCE = _family("histogram", "rtml_model_inference_seconds", "One forward pass of a model over a batch.", ("model",), FAST_BUCKETS)
MODEL_BATCH = _family("histogram", "rtml_model_batch_windows", "Windows per forward pass of a model.", ("model",), BATCH_BUCKETS)
ENSEMBLE_WEIGHT = _family("gauge", "rtml_ensemble_weight", "A model's weight in its tenant's ensemble.", ("tenant", "model"))
ONLINE_ACCURACY = _family("gauge", "rtml_model_online_accuracy", "A model's accuracy on its tenant's feedback (running).", ("tenant", "model"))
FEEDBACK = _family("counter", "rtml_feedback_total", "Feedback labels received, per tenant.", ("tenant",))

# lakehouse ---------------------------------------------------------------------------------------
LAKEHOUSE_APPEND = _family("histogram", "rtml_lakehouse_append_seconds", "One append (write and commit) to a lakehouse table.", ("table",), LATENCY_BUCKETS)
LAKEHOUSE_ROWS = _family("counter", "rtml_lakehouse_rows_total", "Rows appended to a lakehouse table.", ("table",))
COMMIT_CONFLICTS = _family("counter", "rtml_lakehouse_commit_conflicts_total", "Commits that lost a race to another writer and were retried.", ("table",))
SMALL_FILES = _family("gauge", "rtml_lakehouse_small_files", "Data files of a table's current snapshot smaller than lakehouse.compaction_small_file_bytes.", ("table",))

# agents -----------------------------------------------------------------------------------------
AGENT_NODE = _family("histogram", "rtml_agent_node_seconds", "One run of an agent graph node (search, graph, reasoning, alert).", ("node",), LATENCY_BUCKETS)
AGENT_FAILURES = _family("counter", "rtml_agent_node_failures_total", "Agent node runs that timed out or failed (the graph went on with a partial result).", ("node", "reason"))
INCIDENTS = _family("counter", "rtml_incidents_opened_total", "Incidents opened, per tenant.", ("tenant",))

# drift -------------------------------------------------------------------------------------------
DRIFT_PSI = _family("gauge", "rtml_drift_psi", "Population stability index of a feature: live window against the model's training snapshot.", ("tenant", "feature"))
DRIFT_KS = _family("gauge", "rtml_drift_ks", "Kolmogorov-Smirnov statistic of a feature: live window against the model's training snapshot.", ("tenant", "feature"))
DRIFT_RETRAINS = _family("counter", "rtml_drift_retrains_total", "Candidate retraining runs started because of sustained drift, per tenant and outcome.", ("tenant", "outcome"))


def serve(port: int) -> None:
    """Serve this process's prometheus-client metrics at http://0.0.0.0:port/metrics (a thread)."""
    start_http_server(port)


def exposition() -> bytes:
    """This process's prometheus-client metrics in the Prometheus text format."""
    return generate_latest(REGISTRY)
