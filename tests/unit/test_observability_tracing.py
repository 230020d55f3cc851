"""Tracing (observability.tracing) with an in-memory span exporter: sampling by the ratio where an
event enters, parent-based continuation across a carrier (as over a Ray call), across Kafka headers
and through the embedded log, the DataRouter's part (a record's own trace, or one begun for the
sampled share of the others), the batch stages' limit, and nothing at all for untraced events."""

from __future__ import annotations

import asyncio
import pickle
from datetime import datetime, timezone

import orjson
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from agents.evidence import GraphEvidence, SearchEvidence
from agents.explainer import Explainer
from agents.graph import Nodes
from agents.incidents import IncidentBook
from agents.reasoning import Reasoner
from api.ingest import Ingestor
from lakehouse import Lakehouse
from observability import tracing
from rtml.schemas import Prediction
from rtml.settings import Settings
from streaming.eventlog import LogRecord, open_event_log_writer
from streaming.router import DataRouter
from streaming.sources.base import SourceBatch
from streaming.sources.eventlog import EventLogSource
from streaming.sources.kafka import record_key

ROUTES = {"metric": "stream", "image": "stream", "record": "batch"}
T = "2024-06-01T00:00:00Z"


def _settings(tmp_path, ratio: float, **observability) -> Settings:
    settings = Settings(home=tmp_path, observability={"trace_sample_ratio": ratio, **observability}, streaming={"event_log_timeout_s": 0.5})
    return settings.model_copy(update={"home": settings.home_dir})


@pytest.fixture
def spans(monkeypatch, tmp_path):
    """Configure this process's tracing afresh (for the test only) with ``ratio``; returns the
    in-memory exporter that receives every span."""

    def configured(ratio: float, **observability) -> InMemorySpanExporter:
        monkeypatch.setattr(tracing, "_state", tracing._State())
        tracing.configure(_settings(tmp_path, ratio, **observability), "test")
        exporter = InMemorySpanExporter()
        tracing.add_span_processor(SimpleSpanProcessor(exporter))
        return exporter

    return configured


def _by_name(exporter: InMemorySpanExporter) -> dict[str, list]:
    found: dict[str, list] = {}
    for span in exporter.get_finished_spans():
        found.setdefault(span.name, []).append(span)
    return found


def _event(**fields) -> dict:
    return {"tenant": "acme", "entity": "pump-1", "event_time": T, "value": 1.0, **fields}


def _batch(payloads: list[bytes], headers: list | None = None) -> SourceBatch:
    import numpy as np

    count = len(payloads)
    return SourceBatch(payloads, np.zeros(count, np.int32), np.arange(count, dtype=np.int64), np.full(count, 100.0), headers or [])


# where an event enters -----------------------------------------------------------------------------


def test_every_event_is_traced_at_ratio_one_and_none_at_ratio_zero(spans):
    exporter = spans(1.0)
    attributes = {tracing.TENANT: "acme", tracing.ENTITY: "pump-1", tracing.EVENT_ID: "e-1"}
    carrier = tracing.start_event("rtml.ingest", attributes)
    [span] = exporter.get_finished_spans()
    assert span.name == "rtml.ingest" and span.parent is None
    assert dict(span.attributes) == attributes
    assert span.resource.attributes["service.name"] == "test"
    version, trace_id, span_id, flags = carrier[tracing.TRACEPARENT].split("-")
    assert (trace_id, span_id) == (f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}")
    assert int(flags, 16) & 1  # sampled: every hop after this one records its spans

    exporter = spans(0.0)
    assert [tracing.start_event("rtml.ingest", attributes) for _ in range(1000)] == [None] * 1000
    assert tracing.start_events("rtml.ingest", [f"e-{i}" for i in range(1000)], lambda i: attributes) == {}
    assert exporter.get_finished_spans() == ()


def test_events_are_sampled_at_the_ratio_one_by_one_and_in_batches(spans):
    exporter = spans(0.25)
    one_by_one = sum(tracing.start_event("rtml.ingest", {}) is not None for _ in range(4000))
    batched = tracing.start_events("rtml.ingest", [f"e-{i}" for i in range(4000)], lambda i: {tracing.EVENT_ID: f"e-{i}"})
    # 4000 draws at 0.25: 1000 expected, with a standard deviation of 27.
    assert 800 < one_by_one < 1200 and 800 < len(batched) < 1200
    assert len(exporter.get_finished_spans()) == one_by_one + len(batched)
    # Only the sampled events' attributes were made, and each root span says which event it is.
    assert sorted(span.attributes[tracing.EVENT_ID] for span in exporter.get_finished_spans()[one_by_one:]) == sorted(f"e-{i}" for i in batched)


def test_an_event_is_sampled_alike_wherever_its_id_is_asked_so_an_unsampled_one_is_not_drawn_again(spans):
    spans(0.25)
    ids = [f"acme-{i}" for i in range(4000)]
    at_the_api = set(tracing.start_events("rtml.ingest", ids, lambda i: {}))
    at_the_router = set(tracing.start_events("rtml.ingest", ids, lambda i: {}))
    assert at_the_api == at_the_router  # so together they trace the ratio's share, not twice it
    assert at_the_api == set(tracing.sampled_positions(ids, 0.25))


def test_events_with_a_trace_of_their_own_are_not_sampled_again(spans):
    exporter = spans(1.0)
    begun = tracing.start_events("rtml.ingest", [f"e-{i}" for i in range(10)], lambda i: {}, traced={2, 5})
    assert sorted(begun) == [0, 1, 3, 4, 6, 7, 8, 9]
    assert len(exporter.get_finished_spans()) == 8


def test_nothing_is_sampled_while_no_processor_takes_spans(monkeypatch, tmp_path):
    monkeypatch.setattr(tracing, "_state", tracing._State())
    tracing.configure(_settings(tmp_path, 1.0), "test")  # no otlp_endpoint, nothing added
    assert tracing.start_event("rtml.ingest", {}) is None
    assert tracing.start_events("rtml.ingest", [f"e-{i}" for i in range(100)], lambda i: {}) == {}


def test_configure_again_with_the_same_settings_keeps_the_set_up_and_with_others_replaces_it(spans, tmp_path):
    exporter = spans(1.0)
    tracing.configure(_settings(tmp_path, 1.0), "another-service")  # the same settings: nothing changes
    tracing.start_event("rtml.ingest", {})
    tracing.configure(_settings(tmp_path, 0.0), "test")  # other settings: a new provider, the added processor kept
    assert tracing.start_event("rtml.ingest", {}) is None
    tracing.configure(_settings(tmp_path, 1.0), "test")
    tracing.start_event("rtml.ingest", {})
    assert [span.resource.attributes["service.name"] for span in exporter.get_finished_spans()] == ["test", "test"]


# hops ----------------------------------------------------------------------------------------------


def test_a_trace_continues_across_a_carrier_sent_to_another_process(spans):
    exporter = spans(1.0)
    carrier = tracing.start_event("rtml.ingest", {tracing.TENANT: "acme"})
    received = pickle.loads(pickle.dumps({"e-1": carrier}))  # what a Ray call does to its arguments
    with tracing.stage("rtml.consume", received, {tracing.BATCH_SIZE: 3}) as consumed:
        assert list(consumed) == ["e-1"]
        with tracing.stage("rtml.route", pickle.loads(pickle.dumps(list(consumed.values())))) as routed:
            assert len(routed) == 1
    found = _by_name(exporter)
    [ingest], [consume], [route] = found["rtml.ingest"], found["rtml.consume"], found["rtml.route"]
    assert consume.context.trace_id == ingest.context.trace_id == route.context.trace_id
    assert consume.parent.span_id == ingest.context.span_id and route.parent.span_id == consume.context.span_id
    assert dict(consume.attributes) == {tracing.BATCH_SIZE: 3, tracing.EVENT_ID: "e-1"}


def test_a_trace_continues_across_kafka_headers(spans):
    exporter = spans(1.0)
    carrier = tracing.start_event("rtml.ingest", {})
    headers = [("content-type", b"application/json"), *tracing.to_kafka_headers(carrier)]
    # kafka-python gives a record's headers as (name, bytes) pairs; the sources as a mapping.
    assert tracing.from_kafka_headers(headers) == tracing.from_kafka_headers(dict(headers)) == carrier
    with tracing.stage("rtml.consume", [tracing.from_kafka_headers(headers)]):
        pass
    [ingest], [consume] = _by_name(exporter)["rtml.ingest"], _by_name(exporter)["rtml.consume"]
    assert consume.parent.span_id == ingest.context.span_id
    assert tracing.from_kafka_headers([("content-type", b"application/json")]) is None
    assert tracing.from_kafka_headers(None) is None and tracing.to_kafka_headers(None) == []


def test_an_event_ingested_over_http_is_read_from_the_log_with_its_trace(spans, tmp_path):
    exporter = spans(1.0)
    settings = _settings(tmp_path, 1.0)
    lake = Lakehouse.open(settings)
    ingestor = Ingestor(settings, open_event_log_writer(settings), lambda: lake.writer("events"))
    try:
        ingested = ingestor.ingest_documents("acme", [_event(event_id="e-1"), _event(event_id="e-2", entity="pump-2")])
    finally:
        ingestor.close()
    source = EventLogSource(settings, "test", 0, 1)
    try:
        source.seek({})
        routed = DataRouter(ROUTES, land_stream_events=False).route(source.poll(100, 0.0), source.partitions)
    finally:
        source.close()

    roots = {span.attributes[tracing.EVENT_ID]: span for span in _by_name(exporter)["rtml.ingest"]}
    assert sorted(roots) == sorted(ingested.event_ids) == sorted(routed.traces)
    for event_id, root in roots.items():
        assert root.attributes[tracing.SOURCE] == "http" and root.attributes[tracing.TENANT] == "acme"
        assert routed.traces[event_id][tracing.TRACEPARENT].split("-")[1:3] == [f"{root.context.trace_id:032x}", f"{root.context.span_id:016x}"]
    assert {root.attributes[tracing.ENTITY] for root in roots.values()} == set(routed.metrics.entity.tolist())


def test_the_router_begins_a_trace_for_records_written_without_one(spans):
    exporter = spans(1.0)
    carried = tracing.start_event("rtml.ingest", {tracing.SOURCE: "http"})
    records = [orjson.dumps(_event(event_id="own")), orjson.dumps(_event(event_id="plain", entity="pump-2")), b"{not json"]
    headers = [dict(tracing.to_kafka_headers(carried)), None, None]
    routed = DataRouter(ROUTES, land_stream_events=False).route(_batch(records, headers), ["log:0"])

    assert routed.traces["own"] == carried  # its own trace goes on; no second one begins
    [begun] = [span for span in exporter.get_finished_spans() if span.attributes.get(tracing.SOURCE) == "log"]
    assert dict(begun.attributes) == {tracing.TENANT: "acme", tracing.ENTITY: "pump-2", tracing.EVENT_ID: "plain", tracing.SOURCE: "log"}
    assert sorted(routed.traces) == ["own", "plain"]  # a dead letter has no event to trace


def test_a_batch_stage_records_at_most_max_traces_per_batch_spans(spans):
    exporter = spans(1.0, max_traces_per_batch=8)
    carriers = {f"e-{i}": tracing.start_event("rtml.ingest", {}) for i in range(20)}
    with tracing.stage("rtml.consume", carriers) as consumed:
        assert len(consumed) == 8
    recorded = _by_name(exporter)["rtml.consume"]
    assert len(recorded) == 8
    assert {span.attributes[tracing.TRACES_DROPPED] for span in recorded} == {12}
    assert {span.attributes[tracing.EVENT_ID] for span in recorded} == set(consumed)


def test_untraced_batches_cost_no_span(spans):
    exporter = spans(0.0)
    with tracing.stage("rtml.consume", []) as consumed, tracing.stage("rtml.decision", {}) as decided:
        assert consumed == [] and decided == {}
        assert tracing.current() == []
    routed = DataRouter(ROUTES, land_stream_events=False).route(_batch([orjson.dumps(_event(event_id=f"e-{i}")) for i in range(500)]), ["log:0"])
    assert routed.traces == {}
    assert exporter.get_finished_spans() == ()


def test_a_stage_that_fails_marks_its_spans_and_the_error_goes_on(spans):
    exporter = spans(1.0)
    carriers = [tracing.start_event("rtml.ingest", {}) for _ in range(2)]
    with pytest.raises(ConnectionError), tracing.stage("rtml.lakehouse.write", carriers):
        raise ConnectionError("the catalog is away")
    failed = _by_name(exporter)["rtml.lakehouse.write"]
    assert len(failed) == 2
    assert all(span.status.status_code is StatusCode.ERROR and span.events[0].name == "exception" for span in failed)


# agents ------------------------------------------------------------------------------------------


def _prediction(event_id: str, entity: str = "pump-1") -> Prediction:
    return Prediction(
        prediction_id=f"p-{event_id}",
        event_id=event_id,
        tenant="acme",
        entity=entity,
        event_time=datetime(2024, 6, 1, tzinfo=timezone.utc),
        scores={},
        ensemble_score=0.9,
        is_anomaly=True,
        model_versions={},
        latency_ms=1.0,
    )


def _explainer() -> Explainer:
    async def search(incident, context):
        return SearchEvidence(backend="test")

    async def graph(incident, anomalous):
        return GraphEvidence(backend="test")

    agents = Settings().agents
    reasoner = Reasoner(agents, None)
    nodes = Nodes(search, graph, reasoner, reasoner, _NoAlerts(), search_timeout_s=5, graph_timeout_s=5, reasoning_timeout_s=5)
    return Explainer(nodes, IncidentBook(gap_s=300, reexplain_after_s=600), store=lambda row: None)


class _NoAlerts:
    async def send(self, alert):
        return []


def test_an_incident_is_explained_in_the_trace_of_its_first_traced_anomaly(spans):
    exporter = spans(1.0)
    first = tracing.start_event("rtml.lakehouse.write", {})
    explainer = _explainer()

    async def run() -> None:
        await explainer.observe([_prediction("untraced"), _prediction("traced")], traces={"traced": first})
        await explainer.drain()

    asyncio.run(run())
    found = _by_name(exporter)
    [write], [enrich] = found["rtml.lakehouse.write"], found["rtml.enrich"]
    assert enrich.parent.span_id == write.context.span_id and enrich.context.trace_id == write.context.trace_id
    assert enrich.attributes[tracing.TENANT] == "acme" and enrich.attributes[tracing.ENTITY] == "pump-1"
    nodes = {name: spans_[0] for name, spans_ in found.items() if name.startswith("rtml.agent.")}
    assert sorted(nodes) == ["rtml.agent.alert", "rtml.agent.graph", "rtml.agent.reasoning", "rtml.agent.search"]
    assert {span.parent.span_id for span in nodes.values()} == {enrich.context.span_id}


def test_an_incident_without_a_traced_anomaly_is_explained_without_spans(spans):
    exporter = spans(1.0)
    explainer = _explainer()

    async def run() -> None:
        await explainer.observe([_prediction("untraced")])
        await explainer.drain()

    asyncio.run(run())
    assert exporter.get_finished_spans() == ()
