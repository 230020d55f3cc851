"""Tracing across processes: every process exports its spans over OTLP/HTTP to a receiver this test
runs (``OtlpReceiver``: the collector's trace service, decoding each request into memory).

- The app as `rtml up` runs it (its own Ray cluster; the stream over the embedded event log, whose
  records keep their trace headers as Kafka's do; agents with their embedded backends), with
  ``trace_sample_ratio = 1``: a series posted over HTTP whose last event is anomalous gives one
  connected trace rtml.ingest (Ingress) -> rtml.consume (consumer actor) -> rtml.route (router)
  -> rtml.model (scorers) and rtml.decision (consumer) -> rtml.lakehouse.write (sink actor) ->
  rtml.enrich (AgentGraph replica) -> its graph nodes, each span with its process's service name.
- HTTP ingestion and a consumer's first hop over the real Kafka broker, in this process: at ratio 1
  the records carry their trace in Kafka headers and the consumer continues it; at ratio 0 no
  record carries one and nothing is exported.

Waits are bounded polls, never assertions on speed."""

from __future__ import annotations

import gzip
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse

from deployments.demo_models import sensor_series
from observability import tracing
from rtml.settings import Settings
from rtml_up import rtml_up

pytestmark = pytest.mark.timeout(1200)
TENANT = "demo"  # `rtml up` trains and promotes its models
WINDOW_LENGTH = 16
WAIT_S = 300.0
START = datetime(2026, 3, 1, tzinfo=timezone.utc)
CHAIN = ("rtml.ingest", "rtml.consume", "rtml.decision", "rtml.lakehouse.write", "rtml.enrich")


class OtlpReceiver:
    """An OTLP/HTTP trace receiver (``POST /v1/traces``, protobuf, gzip or not) that keeps every
    span it is sent: ``spans`` (dicts: name, trace, span, parent, service, attributes)."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self._lock = threading.Lock()
        keep = self._keep

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                keep(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:  # no line per export on stderr
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _keep(self, request: ExportTraceServiceRequest) -> None:
        received = []
        for resource_spans in request.resource_spans:
            service = _attributes(resource_spans.resource.attributes).get("service.name")
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        {
                            "name": span.name,
                            "trace": span.trace_id.hex(),
                            "span": span.span_id.hex(),
                            "parent": span.parent_span_id.hex() or None,
                            "service": service,
                            "attributes": _attributes(span.attributes),
                        }
                    )
        with self._lock:
            self.spans.extend(received)

    def received(self) -> list[dict]:
        with self._lock:
            return list(self.spans)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _attributes(pairs) -> dict:
    return {pair.key: getattr(pair.value, pair.value.WhichOneof("value")) for pair in pairs}


@pytest.fixture
def receiver():
    running = OtlpReceiver()
    yield running
    running.close()


def _events(entity: str, values) -> list[dict]:
    return [
        {"event_id": f"{entity}-{uuid.uuid4().hex[:6]}-{i}", "entity": entity, "event_time": (START + timedelta(minutes=i)).isoformat(), "value": float(v)}
        for i, v in enumerate(values)
    ]


def _explained_trace(receiver: OtlpReceiver) -> list[dict] | None:
    """The spans of the first trace that reached its enrichment with every span of CHAIN, or None."""
    spans = receiver.received()
    for enrich in [span for span in spans if span["name"] == "rtml.enrich"]:
        trace = [span for span in spans if span["trace"] == enrich["trace"]]
        if {span["name"] for span in trace} >= {*CHAIN, "rtml.agent.alert"}:
            return trace
    return None


def test_a_sampled_event_is_one_connected_trace_from_ingestion_to_its_enrichment(tmp_path_factory, receiver):
    env = {
        "RTML_OBSERVABILITY__TRACE_SAMPLE_RATIO": "1.0",
        "RTML_OBSERVABILITY__OTLP_ENDPOINT": receiver.endpoint,
        # Every event of the request's batches goes on (the test looks for one among 41).
        "RTML_OBSERVABILITY__MAX_TRACES_PER_BATCH": "1000",
        "RTML_MODELS__WINDOW_LENGTH": str(WINDOW_LENGTH),
        "RTML_SERVING__MODEL_KINDS": '["rnn", "cnn"]',
        "RTML_STREAMING__CONSUMERS": "1",
    }
    with rtml_up(tmp_path_factory.mktemp("tracing"), env=env) as app:
        values = np.append(sensor_series(count=1, length=40, seed=6)[0], 500.0)  # the last one is anomalous
        headers = {"content-type": "application/json", **app.auth(TENANT, "writer")}
        answer = httpx.post(f"{app.http}/v1/events", content=orjson.dumps(_events("pump-9", values)), headers=headers, timeout=60)
        assert answer.status_code == 202, answer.text
        deadline = time.monotonic() + WAIT_S
        while (trace := _explained_trace(receiver)) is None:
            assert time.monotonic() < deadline, f"no connected trace reached its enrichment; spans received: {sorted({s['name'] for s in receiver.received()})}"
            time.sleep(2.0)

    by_name = {}
    for span in trace:
        by_name.setdefault(span["name"], []).append(span)
    by_id = {span["span"]: span for span in trace}
    [enrich] = by_name["rtml.enrich"]
    # Walk up from the enrichment: each span's parent is the previous stage's, the root is the ingestion.
    walked, span = [], enrich
    while span is not None:
        walked.append(span)
        span = by_id.get(span["parent"]) if span["parent"] else None
    assert [span["name"] for span in reversed(walked)] == list(CHAIN)
    ingest, consume, decision, write, _ = reversed(walked)
    assert ingest["parent"] is None and ingest["attributes"][tracing.SOURCE] == "http"
    assert ingest["attributes"][tracing.TENANT] == enrich["attributes"][tracing.TENANT] == TENANT
    assert ingest["attributes"][tracing.ENTITY] and ingest["attributes"][tracing.ENTITY] == enrich["attributes"][tracing.ENTITY]
    assert consume["attributes"][tracing.EVENT_ID] == ingest["attributes"][tracing.EVENT_ID] == decision["attributes"][tracing.EVENT_ID]
    assert [span["service"] for span in (ingest, consume, decision, write, enrich)] == ["rtml-ingress", "rtml-consumer", "rtml-consumer", "rtml-sink", "rtml-agents"]
    # Scoring, across the Ray calls: the router's span under the consumer's, a model's under it.
    routes = [span for span in by_name["rtml.route"] if span["parent"] == consume["span"]]
    assert len(routes) == 1 and routes[0]["service"] == "rtml-router" and routes[0]["attributes"][tracing.TENANT] == TENANT
    models = [span for span in by_name.get("rtml.model", []) if span["parent"] == routes[0]["span"]]
    assert {span["service"] for span in models} == {"rtml-scorer-rnn", "rtml-scorer-cnn"}
    assert all(span["attributes"][tracing.MODEL] for span in models)
    nodes = {span["name"] for span in trace if span["parent"] == enrich["span"]}
    assert nodes == {"rtml.agent.search", "rtml.agent.graph", "rtml.agent.reasoning", "rtml.agent.alert"}


def _ingest_and_consume(settings: Settings, count: int) -> dict[str, dict[str, str]]:
    """Ingest ``count`` events over the API's ingestion core into Kafka, read them back as a
    consumer does (its source, the DataRouter, its "rtml.consume" stage); the routed traces."""
    from api.ingest import Ingestor
    from lakehouse import Lakehouse
    from streaming.eventlog import open_event_log_writer
    from streaming.router import DataRouter
    from streaming.sources.base import SourceBatch
    from streaming.sources.kafka import KafkaSource

    lake = Lakehouse.open(settings)
    ingestor = Ingestor(settings, open_event_log_writer(settings), lambda: lake.writer("events"))
    try:
        ingested = ingestor.ingest_documents("acme", _events("pump-1", range(count)))
    finally:
        ingestor.close()
    assert ingested.accepted == count
    source = KafkaSource(settings.kafka, 0, 1, 1000)
    try:
        source.seek({})
        polled, deadline = [], time.monotonic() + 60
        while sum(map(len, polled)) < count and time.monotonic() < deadline:
            polled.append(source.poll(1000, 5.0))
        batch = SourceBatch(
            [payload for part in polled for payload in part.payloads],
            np.concatenate([part.partitions for part in polled]),
            np.concatenate([part.offsets for part in polled]),
            np.concatenate([part.available_at for part in polled]),
            [header for part in polled for header in (part.headers or [None] * len(part))],
        )
        assert len(batch) == count
        routed = DataRouter(settings.streaming.routes, land_stream_events=False).route(batch, source.partitions)
    finally:
        source.close()
    with tracing.stage("rtml.consume", routed.traces, {tracing.BATCH_SIZE: len(batch)}):
        pass
    return routed.traces


@pytest.mark.parametrize("ratio", [1.0, 0.0])
def test_kafka_records_carry_the_trace_of_a_sampled_event_and_nothing_otherwise(ratio, tmp_path, kafka_bootstrap, receiver, monkeypatch):
    prefix = f"rtml-trace-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        home=tmp_path,
        kafka={"bootstrap_servers": kafka_bootstrap, "topic_prefix": prefix, "consumer_group": prefix},
        streaming={"source": "kafka"},
        observability={"trace_sample_ratio": ratio, "otlp_endpoint": receiver.endpoint},
    )
    settings = settings.model_copy(update={"home": settings.home_dir})
    monkeypatch.setattr(tracing, "_state", tracing._State())  # this process's tracing, for this test only
    tracing.configure(settings, "test-ingest")

    traces = _ingest_and_consume(settings, 20)
    assert tracing.force_flush(30.0)

    spans = receiver.received()
    if ratio == 0.0:
        assert traces == {} and spans == []
        return
    roots = {span["span"]: span for span in spans if span["name"] == "rtml.ingest"}
    consumed = [span for span in spans if span["name"] == "rtml.consume"]
    assert len(roots) == len(traces) == 20
    # Each consumer span continues its event's trace from the Kafka record's headers.
    assert {roots[span["parent"]]["attributes"][tracing.EVENT_ID] for span in consumed} == {span["attributes"][tracing.EVENT_ID] for span in consumed}
    assert len(consumed) == settings.observability.max_traces_per_batch
    assert all(span["trace"] == roots[span["parent"]]["trace"] and span["service"] == "test-ingest" for span in consumed)
