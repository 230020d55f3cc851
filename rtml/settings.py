"""One typed settings object for the whole product.

Values come, highest priority first, from: keyword arguments, ``RTML_*`` environment variables
(nested sections with ``__``, e.g. ``RTML_KAFKA__BOOTSTRAP_SERVERS``), the YAML file named by
``RTML_CONFIG`` (or ``./rtml.yaml`` when present), then the defaults below. Every default works
for ``make demo`` on one machine with no external server.

Each package owns one section; add a knob to its section rather than reading the environment
anywhere else.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

DEFAULT_CONFIG_FILE = "rtml.yaml"


class ServicesSettings(BaseModel):
    """Local test services started by ``rtml services up`` (all on loopback)."""

    host: str = "127.0.0.1"
    kafka_port: int = 19092
    kafka_controller_port: int = 19093
    neo4j_bolt_port: int = 17687
    elasticsearch_port: int = 19200
    elasticsearch_transport_port: int = 19300
    prometheus_port: int = 19090
    postgres_port: int = 15432
    redis_port: int = 16379
    alertmanager_port: int = 19094
    # Heap of each JVM server (Kafka, Neo4j, Elasticsearch): three of them share a small test machine.
    jvm_heap_mb: int = 512
    # How long `up` waits for a server to answer; parallel JVM start-ups on 2 cores take a while.
    start_timeout_s: float = 240.0
    # Where fetched artifacts are kept across clones, so a second run downloads nothing.
    download_cache: Path = Field(
        default_factory=lambda: Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rtml"
    )


class ReplicaSettings(BaseModel):
    """A replica lakehouse that `rtml lakehouse replicate` copies to and erasure reaches."""

    name: str  # what reports and the audit trail call it (``to`` may hold credentials)
    # A folder (an embedded SQLite catalog and warehouse are kept in it), or a catalog URI:
    # sqlite:///..., postgresql+psycopg2://... or http(s)://... for a REST catalog.
    to: str
    warehouse: str = ""  # the replica's warehouse, for a catalog URI


class LakehouseSettings(BaseModel):
    """Iceberg catalog and warehouse. Empty ``catalog_uri``/``warehouse`` mean "under ``home``"."""

    catalog_type: Literal["sql", "rest"] = "sql"
    catalog_name: str = "rtml"
    catalog_uri: str = ""
    warehouse: str = ""
    namespace: str = "rtml"
    # Snapshots younger than the retention are kept for time travel: the newest snapshot_keep_recent
    # one by one, older ones thinned to the newest per snapshot_thin_seconds (lakehouse.snapshots).
    # Long-lived writers apply it as they go; `rtml lakehouse maintain` does too.
    snapshot_retention_hours: float = 24.0 * 7
    snapshot_keep_recent: int = Field(default=100, ge=0)
    snapshot_thin_seconds: float = Field(default=3600.0, gt=0)
    writer_batch_rows: int = 5000
    writer_flush_seconds: float = 1.0
    commit_retries: int = 8
    # Passed through to pyiceberg's catalog and FileIO as they are (S3/MinIO endpoint and keys,
    # REST credentials, ...), e.g. RTML_LAKEHOUSE__CATALOG_PROPERTIES='{"s3.endpoint": "http://..."}'.
    catalog_properties: dict[str, str] = Field(default_factory=dict)
    # Binary payloads larger than this are stored as blobs beside the warehouse, the row keeps a pointer.
    inline_payload_max_bytes: int = 64 * 1024
    # `rtml lakehouse maintain` rewrites a partition once it holds this many files smaller than the size below.
    compaction_min_files: int = 4
    compaction_small_file_bytes: int = 32 * 1024 * 1024
    # Disaster-recovery copies: `rtml lakehouse replicate` without --to copies to each, and an
    # erasure (`rtml erase`, requestErasure) erases the subject in each too, e.g.
    # RTML_LAKEHOUSE__REPLICAS='[{"name": "dr", "to": "/backup/rtml"}]'. None by default.
    replicas: list[ReplicaSettings] = Field(default_factory=list)


class KafkaSettings(BaseModel):
    bootstrap_servers: str = "127.0.0.1:19092"
    topic_prefix: str = "rtml"
    # "tenant": one topic per tenant ("<prefix>.events.<tenant>"); "shared": one topic
    # ("<prefix>.events") for all. Records are keyed "tenant/entity" either way, so that a series
    # stays in one partition and in order.
    topic_layout: Literal["tenant", "shared"] = "shared"
    partitions: int = 4
    consumer_group: str = "rtml-consumers"
    dead_letter_topic: str = "rtml.dead-letter"
    # How long a consumer keeps retrying the broker (commits, dead letters) before it gives up.
    broker_timeout_s: float = 120.0


class StreamingSettings(BaseModel):
    # Where consumers read: "replay" (a file, streaming.replay_path), "kafka" (the broker's events
    # topics), or "log" (the embedded event log that POST /v1/events appends to, streaming.eventlog).
    source: Literal["replay", "kafka", "log"] = "replay"
    consumers: int = 2
    max_poll_records: int = 2000
    poll_timeout_s: float = 0.05
    window_seconds: float = 60.0
    slide_seconds: float = 60.0
    allowed_lateness_seconds: float = 30.0
    # The file the replay source reads (CSV or JSONL); empty: the demo's bundled sensor streams.
    replay_path: str = ""
    replay_partitions: int = 4
    replay_speed: float = 0.0  # 0 = as fast as possible; 1 = real time
    # Events a consumer may have read but not yet written durably before it stops reading
    # (back-pressure: a slow lakehouse or model slows the consumers instead of filling memory).
    max_in_flight_events: int = 20_000
    # Batches a consumer may have sent for scoring without their scores back: it reads on meanwhile,
    # so a batch does not wait for the previous one's scores.
    scoring_batches_in_flight: int = Field(default=2, ge=1)
    # How long a consumer keeps retrying failures that can pass later (a broker, catalog or model
    # replica away, back-pressure, 5xx refusals) with no batch becoming durable meanwhile, before it
    # stops with an error and rtml_stream_consumer_failures_total{reason="gave_up"}: long enough to
    # ride out a broker or catalog restart, bounded so that it never re-scores the same events forever.
    give_up_after_s: float = Field(default=300.0, gt=0)
    # Per data type: "stream" (window and score now) or "batch" (only land in the events table).
    routes: dict[str, Literal["stream", "batch"]] = Field(
        default_factory=lambda: {"metric": "stream", "image": "stream", "record": "batch"}
    )
    # Also land stream-path events in the events table (the raw series later training reads).
    land_stream_events: bool = True
    # Per-partition consumer checkpoints (offsets + window state); a path or a pyarrow URI (s3://...)
    # that every node of the cluster can reach. Empty: <home>/streaming/checkpoints.
    checkpoint_dir: str = ""
    # Dead letters of the replay source (Kafka sources use kafka.dead_letter_topic). Empty: <home>/streaming/dead-letters.
    dead_letter_dir: str = ""
    # The embedded event log (streaming.eventlog: one SQLite file that every Ingress replica and
    # consumer on this machine opens): its directory (empty: <home>/streaming/event-log), its
    # partitions (fixed when the log is created; a series always lands in one), and how long it
    # keeps records (a week, as Kafka's default retention; its writers delete older ones).
    event_log_dir: str = ""
    event_log_partitions: int = Field(default=4, ge=1)
    event_log_retention_hours: float = Field(default=24.0 * 7, gt=0)
    # How long an append to the event log (Kafka's acknowledgement of every record, or the embedded
    # log's write lock) may take before the ingest answers 503 with Retry-After: shorter than a
    # client's request timeout, so that the client hears "retry" rather than nothing.
    event_log_timeout_s: float = Field(default=10.0, gt=0)
    # The live feed behind GraphQL subscriptions (streaming.feed): the items each of its buffers
    # keeps (a publisher's outbox, the broadcaster's ring per topic, a subscriber's backlog) before
    # it drops the oldest. Ten thousand is seconds of the demo's stream: a live view that falls
    # further behind has lost its moment, and the lakehouse keeps every row anyway.
    feed_buffer_items: int = Field(default=10_000, ge=1)


class ModelSettings(BaseModel):
    window_length: int = 64
    device: Literal["auto", "cpu", "cuda"] = "auto"
    anomaly_threshold: float = 0.5


class DetectorSettings(BaseModel):
    """The per-series anomaly detector on the stream (``models.detector``, ``streaming.detection``).

    Each entity (``tenant/entity``) learns on its first ``learning_rows`` values (an entity named in
    ``learning_rows_by_entity`` on its own count: ``rtml nab`` gives each file NAB's probationary
    length), is refitted every ``refit_every`` values, and a value is anomalous when the detector's
    score reaches ``threshold`` (or the tenant's ensemble's reaches ``models.anomaly_threshold``)."""

    enabled: bool = True
    learning_rows: int = Field(default=600, ge=2)
    learning_rows_by_entity: dict[str, int] = Field(default_factory=dict)
    refit_every: int = Field(default=500, ge=1)
    threshold: float = Field(default=0.7, ge=0.0, le=1.0)
    seed: int = 0  # of the forecasters' training
    forecaster_replicas: int = 1
    # Logical CPUs of each consumer's fit worker (it runs beside the app's replicas on small clusters).
    fit_cpus: float = 0.25


class ServingSettings(BaseModel):
    """The Ray Serve app (``deployments``): sizes, batching, back-pressure and ensemble learning."""

    app_name: str = "rtml"
    route_prefix: str = "/"
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    # The Ray head `rtml up` starts (or finds) on this machine: its GCS port and dashboard port.
    ray_port: int = 6379
    dashboard_port: int = 8265
    # "auto": ask Serve for a GPU fraction when the cluster has GPUs, else CPU.
    use_gpu: Literal["auto", "never", "always"] = "auto"
    gpu_fraction: float = 0.25
    # Fractional, so that every replica of the app fits on a 2-core machine.
    replica_cpus: float = 0.25
    # One scorer deployment per kind; a tenant may only use models of these kinds.
    model_kinds: tuple[str, ...] = ("rnn", "cnn", "hybrid", "image_cnn")
    model_replicas: int = 1
    ingress_replicas: int = 1
    router_replicas: int = 1
    # Torch threads per model replica (Serve replicas share the machine's cores).
    torch_threads: int = 1
    # Most windows in one CPU forward of a model replica: per window, the bench's CNN costs 2.6x
    # more in a forward of 512 windows than in one of 256 (cache), so bigger batches are split.
    cpu_forward_windows: int = 256
    max_batch_size: int = 256
    # How long the Ingress waits to fill a batch of HTTP requests; later stages take what is queued.
    # 0 was tried (benchmarks/RESULTS.md, serving): better at concurrency 1, worse at 16.
    batch_wait_timeout_s: float = 0.002
    max_ongoing_requests: int = 256
    max_queued_requests: int = 1024
    # Largest number of windows one predict request may carry.
    max_request_windows: int = 65536
    # Largest predict body (HTTP 413 beyond it): room for max_request_windows windows of 32 values
    # as JSON (~20 bytes a value), read into memory whole by the Ingress.
    max_request_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    # The longest a request waits for its scores before it gets a 503 with Retry-After.
    request_timeout_s: float = 10.0
    retry_after_s: float = 1.0
    # A model whose calls fail is left out of its tenants' ensembles for this long.
    unhealthy_cooldown_s: float = 10.0
    # Router replicas re-read active versions and weights from the registry this often.
    registry_refresh_s: float = 10.0
    # Multiplicative-weights learning rate applied to each model's loss |score - label|.
    feedback_learning_rate: float = 0.5
    # Scored batches remembered per router replica so feedback finds per-model scores without a read.
    remembered_batches: int = 20000
    persist_predictions: bool = True
    # Run the app's stream (deployments.stream_runner): consumers of the event log that
    # POST /v1/events appends to. Off where something else consumes it (`rtml demo` runs its own).
    run_stream: bool = True
    # The prediction sink's write-ahead log (Arrow IPC files; a predict is answered once its rows
    # are in it). A path, or a pyarrow filesystem URI (s3://...) that every node reaches, so that a
    # sink replica restarted on another node replays what its predecessor logged.
    # Empty: <home>/serving/prediction-log.
    prediction_log_dir: str = ""
    # Serve's per-request access log lines (errors are logged either way); off for throughput.
    access_log: bool = False
    # Ray Serve's throughput options for the cluster `rtml up` starts: direct gRPC between replicas,
    # and HAProxy as the HTTP ingress (ray[serve] bundles it on Linux). Together they more than
    # doubled requests/s on 2 cores (benchmarks/RESULTS.md).
    throughput_optimized: bool = True
    haproxy: bool = True
    # How long a WebSocket (a GraphQL subscription) may stay idle behind HAProxy before it is
    # closed; clients keep theirs alive with graphql-transport-ws pings well within it.
    websocket_idle_timeout_s: int = Field(default=3600, gt=0)
    # The TLS entry `rtml up` starts when security.tls_cert_file is set: it terminates TLS here and
    # forwards to Serve's HTTP port on loopback (http_host must stay loopback, or the plain port
    # would be a way around it).
    tls_host: str = "127.0.0.1"
    tls_port: int = 8443
    # Extra options of the `ray start --head` that `rtml up` runs, e.g. '["--temp-dir=/tmp/r2",
    # "--ray-client-server-port=10011"]' for a second cluster beside another on one machine.
    ray_start_args: list[str] = Field(default_factory=list)


class RayTrainSettings(BaseModel):
    """`rtml train` (``models.training``), in-process or as a Ray job on the serving cluster."""

    num_workers: int = 1
    use_gpu: bool = False
    epochs: int = 5
    holdout_fraction: float = 0.2
    # Logical CPUs of each Ray Train worker and of each Ray Data task of the job. Half a core each:
    # a worker trains on one thread, and the job needs one worker and one data task at once (the
    # cluster `rtml up` starts declares that much room beside the app, deployments.control).
    worker_cpus: float = Field(default=0.5, gt=0)
    data_task_cpus: float = Field(default=0.5, gt=0)
    # How long a job waits for that room to be free before it refuses, naming what is missing
    # (Ray would otherwise queue its tasks silently for as long as the app holds the CPUs).
    resources_timeout_s: float = Field(default=10.0, gt=0)


class RateLimit(BaseModel):
    """A token bucket: ``events_per_second`` refill, at most ``burst`` events at once."""

    events_per_second: float = Field(gt=0)
    burst: int = Field(gt=0)


class ApiSettings(BaseModel):
    """The API the Serve app serves (``api``): ingestion at ``/v1/events`` and GraphQL at ``/graphql``."""

    # Largest ingestion body (HTTP 413 beyond it): 10,000 JSON events of ~1 KiB with room to spare.
    max_ingest_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    # Most events in one ingestion request: one request is one log transaction and one validation call.
    max_ingest_events: int = Field(default=10_000, gt=0)
    # Where the per-tenant rate limits count (a `limits` storage URI): "memory://" counts per
    # Ingress replica, which is exact with the default single replica; give "redis://host:6379"
    # for limits that hold across replicas and nodes.
    rate_limit_storage: str = "memory://"
    # Every tenant's limit unless rate_limits names it (None: unlimited). Far above what one
    # tenant of the demo sends; `rtml bench api` turns limits off to measure the server itself.
    default_rate_limit: RateLimit | None = RateLimit(events_per_second=50_000, burst=100_000)
    # Per tenant, e.g. RTML_API__RATE_LIMITS='{"acme": {"events_per_second": 100, "burst": 200}}'.
    rate_limits: dict[str, RateLimit] = Field(default_factory=dict)

    # Deepest selection nesting a GraphQL document may have (levels below an operation's top
    # field): the schema's deepest useful selection, a listing's edges -> node -> scores -> model,
    # is 4; nesting beyond it only costs.
    max_query_depth: int = Field(default=10, ge=1)
    # Most a GraphQL document may cost: every field costs 1, times the `first` of each list above
    # it (api.graphql). 25,000 lets a page of max_page_size predictions with every field through
    # (about 14,000) and refuses two such pages in one document.
    max_query_cost: int = Field(default=25_000, ge=1)
    # Largest GraphQL request body (HTTP 413 beyond it): a document and its variables. The
    # dashboard's documents are a few KiB; the rest is room for variables (a submitFeedback of
    # thousands of verdicts).
    max_graphql_bytes: int = Field(default=1024 * 1024, gt=0)
    # Most lexical tokens a GraphQL document may have (graphql-core stops parsing beyond it): parsing
    # and validation run on the Ingress's event loop and grow with the tokens (~0.2 s per 10,000 on
    # this machine), while a page query of every prediction field has about 120.
    max_query_tokens: int = Field(default=10_000, ge=1)
    # Largest page (`first`) of a paginated list: a page is read, sorted and sent whole.
    max_page_size: int = Field(default=500, ge=1)
    # Most windows one analytics query may return (its time range over its window length).
    max_analytics_windows: int = Field(default=10_000, ge=1)


class AgentsSettings(BaseModel):
    """The agent graph that explains anomalies (``agents``): Search and Graph in parallel, then
    Reasoning, then Alert. Every backend has an embedded default that needs no server."""

    enabled: bool = True
    # Search: "embedded" (tantivy BM25 + embeddings in the agent) or "elasticsearch".
    search_backend: Literal["embedded", "elasticsearch"] = "embedded"
    elasticsearch_url: str = "http://127.0.0.1:19200"
    search_index: str = "rtml-knowledge"
    search_hits: int = Field(default=5, ge=1)
    search_candidates: int = Field(default=50, ge=1)  # BM25 candidates re-ranked by embedding similarity
    # Least similarity (cosine of the embeddings, in [-1, 1]) for a document to count as similar.
    search_min_similarity: float = 0.4
    # Graph: "embedded" (kuzu) or "neo4j".
    graph_backend: Literal["embedded", "neo4j"] = "embedded"
    neo4j_uri: str = "bolt://127.0.0.1:17687"
    neo4j_user: str = ""
    neo4j_password_secret: str = "neo4j-password"  # the secret's name (security.secrets)
    graph_hops: int = Field(default=3, ge=1, le=10)
    # Reasoning: "template" (deterministic, no LLM), "openai" (any OpenAI-compatible chat
    # completions server) or "anthropic" (Messages API).
    llm_provider: Literal["template", "openai", "anthropic"] = "template"
    llm_base_url: str = ""  # e.g. https://api.openai.com/v1, http://localhost:11434/v1, https://api.anthropic.com
    llm_model: str = ""
    llm_api_key_secret: str = "llm-api-key"  # the secret's name (security.secrets)
    llm_max_tokens: int = Field(default=600, ge=1)
    prompt_version: str = "explain-v1"  # a file in agents/prompts/
    # Alerts: every channel configured here gets each incident's alert (the log always does).
    alertmanager_url: str = ""  # e.g. http://127.0.0.1:19094
    opsgenie_url: str = ""  # e.g. https://api.opsgenie.com
    opsgenie_api_key_secret: str = "opsgenie-api-key"
    webhook_url: str = ""
    # Per node: past this the node's evidence is marked partial and the graph goes on.
    search_timeout_s: float = Field(default=2.0, gt=0)
    graph_timeout_s: float = Field(default=2.0, gt=0)
    reasoning_timeout_s: float = Field(default=20.0, gt=0)
    alert_timeout_s: float = Field(default=5.0, gt=0)
    # Incidents: an entity's anomalies less than incident_gap_s apart (event time) are one incident,
    # and so are those of entities within graph_hops of it; an incident is resolved once it has had
    # no anomaly for incident_gap_s (of event time, or of wall time when the stream is quiet).
    incident_gap_s: float = Field(default=300.0, gt=0)
    # A growing incident is explained again (one more LLM chain) at most this often, and only
    # once it has at least doubled in anomalies since its last explanation.
    reexplain_after_s: float = Field(default=600.0, gt=0)
    replicas: int = Field(default=1, ge=1)  # Search and Graph agents' Serve replicas each


class SecuritySettings(BaseModel):
    """Where secrets come from (``security.secrets``): "env" reads ``RTML_SECRET_<NAME>`` (the name
    upper-cased, ``-`` and ``.`` as ``_``), "file" reads ``<secrets_dir>/<name>``, "vault" reads
    HashiCorp Vault's KV v2 (``security.vault``)."""

    secrets_provider: Literal["env", "file", "vault"] = "env"
    secrets_dir: str = ""  # default <home>/secrets
    # HashiCorp Vault (security.vault): the secret <name> is the field "value" of the KV v2 secret
    # <vault_kv_prefix>/<name> in the engine mounted at vault_kv_mount; tokenization keys live in
    # the transit engine at vault_transit_mount. The token comes from VAULT_TOKEN, else from
    # vault_token_file (which `vault login` writes).
    vault_url: str = "http://127.0.0.1:8200"
    vault_token_file: str = "~/.vault-token"
    vault_namespace: str = ""  # Vault Enterprise / HCP namespace; "" = none
    vault_timeout_s: float = Field(5.0, gt=0)  # per request: an unreachable Vault fails fast
    vault_ca_cert: str = ""  # CA bundle that signed Vault's TLS certificate; "" = the system's
    vault_kv_mount: str = "secret"
    vault_kv_prefix: str = "rtml"
    vault_transit_mount: str = "transit"
    # Values read are kept this long, at most vault_cache_size of them (0 turns the cache off): a
    # rotated secret reaches rtml within vault_cache_ttl_s.
    vault_cache_ttl_s: float = Field(300.0, ge=0)
    vault_cache_size: int = Field(1024, ge=0)
    # Keys the secrets store lacks are generated once under <home>/keys (security.keys): right for a
    # laptop and the demo; production keeps its keys in the store and turns this off.
    generate_keys: bool = True
    # TLS at the HTTP/WebSocket entry: `rtml up` starts a TLS front (HAProxy, deployments.control) on
    # serving.tls_port when a certificate and key are set (PEM files; `rtml certs dev` mints them;
    # the certificate file may hold the chain). Empty: no TLS front, plain HTTP on serving.http_port.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # Client certificates at the entry: "required" (mutual TLS: a client without a certificate
    # signed by tls_client_ca_file fails the handshake), "optional" (one presented must verify),
    # "none" (not asked for). Zero trust: required unless said otherwise.
    tls_client_auth: Literal["none", "optional", "required"] = "required"
    tls_client_ca_file: str = ""  # PEM: the CA(s) whose client certificates the entry accepts
    # API tokens (security.tokens): ES256 JWTs signed with the secret jwt-signing-key-<jwt_key_id>;
    # keys named in jwt_previous_key_ids still verify (rotation).
    jwt_issuer: str = "rtml"
    jwt_audience: str = "rtml-api"
    jwt_key_id: str = "k1"
    jwt_previous_key_ids: list[str] = []
    # Clock skew allowed between issuer and verifier; bounded, so an expired token stays expired.
    jwt_leeway_s: float = Field(30.0, ge=0, le=300)
    jwt_default_ttl_s: float = 3600.0
    jwt_max_ttl_s: float = 30 * 86400.0
    # PII tokenization (security.pii): phone numbers written without a country code are read as
    # numbers of this region (ISO 3166 code).
    pii_phone_region: str = "US"
    # Attribute names (at any depth of attributes) tokenized whole, whatever they hold, per tenant;
    # "*" applies to every tenant.
    # E.g. {"*": ["customer_name"], "acme": ["account", "address"]}.
    pii_fields: dict[str, list[str]] = {}
    # The Vault transit key that makes tokens (hmac) and seals the token vault's entries
    # (encrypt), when secrets_provider is "vault"; otherwise local keys pii-token-key and
    # pii-encryption-key (security.keys) do both.
    pii_transit_key: str = "rtml-pii"
    # Token vault (security.tokenvault), a SQLAlchemy URL: "" is sqlite:///<home>/pii/tokens.db;
    # production e.g. postgresql+psycopg2://user:pass@host/db.
    token_vault_url: str = ""
    # Entries each process remembers (values it has tokenized, tokens it has stored in the vault),
    # so that the stream's repeated values cost neither an HMAC nor a vault round trip.
    pii_cache_size: int = Field(65536, ge=1)


class ObservabilitySettings(BaseModel):
    """Metrics, drift, traces and logs (``observability``)."""

    # A Prometheus file_sd directory (its ``file_sd_configs`` glob's folder): `rtml up` and the
    # pipelines register the cluster's metrics endpoints there (observability.scrape). Empty: none.
    prometheus_sd_dir: str = ""
    # Driver-side processes (the CLI's pipelines, benchmarks) serve their prometheus-client metrics
    # here; 0: not served. Ray actors and Serve replicas export through Ray's metrics agent.
    metrics_port: int = 0
    # Off: every metric update is dropped (read from the process's environment, RTML_OBSERVABILITY__METRICS_ENABLED;
    # `rtml bench stream` compares the two).
    metrics_enabled: bool = True
    # How often the pipeline reads the log's end and committed offsets for the lag metric.
    lag_refresh_s: float = Field(default=1.0, gt=0)
    # Tracing (OpenTelemetry): the share of events traced from ingestion to enrichment, decided
    # where the event enters rtml (parent-based after that).
    trace_sample_ratio: float = Field(default=0.01, ge=0.0, le=1.0)
    # OTLP/HTTP endpoint spans are exported to (e.g. http://collector:4318/v1/traces); "" = no exporter.
    otlp_endpoint: str = ""
    otlp_headers: dict[str, str] = Field(default_factory=dict)
    # Sampled events whose spans a batch stage records (the rest of a batch's sampled events are
    # counted on the stage's span).
    max_traces_per_batch: int = Field(default=8, ge=1)
    # Logs: one JSON object per line (with trace and span ids) from every process; False: text.
    json_logs: bool = True
    log_level: str = "INFO"
    # Drift (observability.drift): per tenant and feature, PSI and KS between the model's training
    # snapshot (reference) and the last drift_window_events live values.
    drift_enabled: bool = True
    drift_bins: int = Field(default=10, ge=2)
    drift_window_events: int = Field(default=2000, ge=10)
    drift_min_events: int = Field(default=500, ge=10)
    drift_reference_rows: int = Field(default=20_000, ge=100)
    drift_psi_threshold: float = Field(default=0.2, gt=0)
    drift_ks_threshold: float = Field(default=0.2, gt=0)
    # Drift over a threshold in this many consecutive checks (one check per scored batch of the
    # tenant, at most one per drift_check_every_s) is sustained: a candidate retraining run starts.
    drift_sustained_checks: int = Field(default=3, ge=1)
    drift_check_every_s: float = Field(default=5.0, ge=0)
    drift_retrain: bool = True
    # At most one retraining run per tenant this often.
    drift_retrain_cooldown_s: float = Field(default=3600.0, ge=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RTML_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    home: Path = Path(".rtml")
    services: ServicesSettings = ServicesSettings()
    lakehouse: LakehouseSettings = LakehouseSettings()
    kafka: KafkaSettings = KafkaSettings()
    streaming: StreamingSettings = StreamingSettings()
    models: ModelSettings = ModelSettings()
    detector: DetectorSettings = DetectorSettings()
    serving: ServingSettings = ServingSettings()
    train: RayTrainSettings = RayTrainSettings()
    api: ApiSettings = ApiSettings()
    agents: AgentsSettings = AgentsSettings()
    security: SecuritySettings = SecuritySettings()
    observability: ObservabilitySettings = ObservabilitySettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = settings_file()
        if config_file:
            if not Path(config_file).is_file():
                raise FileNotFoundError(f"RTML_CONFIG names {config_file!r}, which is not a file")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()


def settings_file() -> str | None:
    """The YAML file settings are read from: ``RTML_CONFIG``, else ``./rtml.yaml`` when present."""
    return os.environ.get("RTML_CONFIG") or (DEFAULT_CONFIG_FILE if Path(DEFAULT_CONFIG_FILE).is_file() else None)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; call ``get_settings.cache_clear()`` after changing the environment."""
    return Settings()
