"""The ingestion core on real parts: the embedded event log (SQLite under tmp_path), read back by
the consumer's source and DataRouter, and a lakehouse on a SQLite catalog for the batch path."""

from __future__ import annotations

import sqlite3
from contextlib import closing

import numpy as np
import orjson
import pytest

from api.ingest import Ingestor, PiiFirstHop, Unparsed, parse_json_body
from lakehouse import Lakehouse
from rtml.schemas import Refusal, ScoreRequest
from rtml.settings import Settings
from security.pii import Tokenizer
from security.tokenvault import TokenVault
from streaming.eventlog import log_file, open_event_log_writer
from streaming.router import DataRouter
from streaming.sources.eventlog import EventLogSource

T = "2025-03-01T00:00:00Z"


def _event(**fields):
    return {"entity": "pump-1", "event_time": T, "value": 1.0, **fields}


@pytest.fixture
def settings(tmp_path) -> Settings:
    settings = Settings(home=tmp_path, lakehouse={"writer_flush_seconds": 0.05}, streaming={"event_log_timeout_s": 0.5})
    return settings.model_copy(update={"home": settings.home_dir})


@pytest.fixture
def ingest(settings):
    """An Ingestor over the embedded log and the lakehouse's events writer (opened when first needed),
    both closed with it."""
    log = open_event_log_writer(settings)
    lake = Lakehouse.open(settings)
    ingestor = Ingestor(settings, log, lambda: lake.writer("events"))
    yield ingestor, lake
    ingestor.close()


def _routed_from_the_log(settings: Settings):
    """What a stream consumer makes of everything in the log."""
    source = EventLogSource(settings, "test", 0, 1)
    try:
        source.seek({})
        batch = source.poll(10_000, 0.0)
        return DataRouter(settings.streaming.routes, land_stream_events=True).route(batch, source.partitions)
    finally:
        source.close()


def test_json_bodies_are_one_object_an_array_or_ndjson_lines():
    assert parse_json_body(orjson.dumps(_event()), "application/json") == [_event()]
    assert parse_json_body(orjson.dumps([_event(), _event(entity="pump-2")]), "application/json; charset=utf-8") == [_event(), _event(entity="pump-2")]
    lines = parse_json_body(orjson.dumps(_event()) + b"\n\n{oops\r\n" + orjson.dumps(_event(entity="pump-2")) + b"\n", "application/x-ndjson")
    assert lines[0] == _event() and lines[2] == _event(entity="pump-2")
    assert isinstance(lines[1], Unparsed) and "not valid JSON" in lines[1].reason


@pytest.mark.parametrize(
    ("body", "content_type", "status", "reason"),
    [
        (b"{}", "text/plain", 415, "application/json or application/x-ndjson"),
        (b"{}", "", 415, "(none)"),
        (b"  ", "application/json", 400, "empty"),
        (b"{oops", "application/json", 400, "not valid JSON"),
        (b"[" * 5000 + b"]" * 5000, "application/json", 400, "not valid JSON"),  # nested beyond the parser's limit
        (b"42", "application/json", 400, "a JSON int"),
    ],
)
def test_unreadable_bodies_are_refused_with_the_status_and_what_to_send(body, content_type, status, reason):
    with pytest.raises(Refusal) as refused:
        parse_json_body(body, content_type)
    assert refused.value.status == status and reason in refused.value.reason


def test_a_batch_with_bad_events_keeps_the_good_ones_and_reports_each_bad_one(ingest, settings):
    ingestor, _ = ingest
    body = b"\n".join(
        [
            orjson.dumps(_event(event_id="good-1")),
            b"{not json",
            orjson.dumps(_event(tenant="globex")),
            orjson.dumps(_event(colour="red")),
            orjson.dumps(_event(value=None)),
            orjson.dumps([1, 2]),
            orjson.dumps(_event(entity="pump-2")),  # no tenant, no id: the caller's tenant, a fresh id
            orjson.dumps(_event(data_type="image", value=None)),
            orjson.dumps(_event(tenant="acme", event_id="good-3", value=2.5)),
        ]
    )
    result = ingestor.ingest_documents("acme", parse_json_body(body, "application/x-ndjson"))

    assert result.accepted == 3
    reasons = {rejected.index: rejected.reason for rejected in result.rejected}
    assert sorted(reasons) == [1, 2, 3, 4, 5, 7]
    assert "not valid JSON" in reasons[1]
    assert reasons[2] == "tenant 'globex' is not the caller's tenant 'acme'"
    assert "unknown field 'colour'" in reasons[3]
    assert "needs a value" in reasons[4]
    assert "JSON list" in reasons[5]
    assert "binary frames" in reasons[7]
    assert result.event_ids[0] == "good-1" and result.event_ids[8] == "good-3"
    assert [result.event_ids[i] for i in reasons] == [None] * len(reasons)
    fresh_id = result.event_ids[6]
    assert fresh_id and len(fresh_id) == 32

    # What a consumer reads from the log is exactly the accepted events, ids and tenant filled in.
    routed = _routed_from_the_log(settings)
    assert len(routed.dead) == 0
    assert sorted(routed.metrics.event_id.tolist()) == sorted(["good-1", fresh_id, "good-3"])
    assert set(routed.metrics.tenant.tolist()) == {"acme"}
    assert dict(zip(routed.metrics.event_id.tolist(), routed.metrics.value.tolist()))["good-3"] == 2.5


def test_batch_path_events_land_in_the_events_table_before_the_answer(ingest, settings):
    ingestor, lake = ingest
    documents = [
        {"event_id": "rec-1", "entity": "order-1", "data_type": "record", "event_time": T, "attributes": {"total": 12}},
        {"event_id": "rec-2", "entity": "order-2", "data_type": "record", "event_time": T, "subject": "customer-7"},
        _event(event_id="metric-1"),
    ]
    result = ingestor.ingest_documents("acme", documents)

    assert result.accepted == 3 and result.rejected == []
    landed = {row["event_id"]: row for row in lake.read("events", tenant="acme").to_pylist()}
    assert set(landed) == {"rec-1", "rec-2"}  # the metric took the stream path; its consumer lands it
    assert landed["rec-1"]["attributes"] == '{"total":12}' and landed["rec-2"]["subject"] == Tokenizer(settings).subject_token("customer-7")
    assert _routed_from_the_log(settings).metrics.event_id.tolist() == ["metric-1"]
    # The same events sent again (a client's retry) are one row each.
    ingestor.ingest_documents("acme", documents[:2])
    assert sorted(lake.read("events", tenant="acme", columns=("event_id",))["event_id"].to_pylist()) == ["rec-1", "rec-2"]


def test_frames_go_to_the_log_as_the_router_reads_them_and_bad_frames_are_rejected(ingest, settings):
    ingestor, lake = ingest
    frame = (np.arange(12, dtype=np.uint8) * 20).reshape(3, 4)
    fields = {"entity": "camera-1", "event_time": T, "event_id": "shot-1", "frame_shape": "3x4", "frame_dtype": "uint8", "attributes": '{"lens": "wide"}'}

    assert ingestor.ingest_frame("acme", fields, frame.tobytes()).event_ids == ["shot-1"]
    routed = _routed_from_the_log(settings)
    assert routed.frames.event_id.tolist() == ["shot-1"] and routed.frames.tenant.tolist() == ["acme"]
    np.testing.assert_allclose(routed.images[0], frame / np.float32(255))
    assert orjson.loads(routed.frames.attributes[0]) == {"frame_dtype": "uint8", "frame_shape": [3, 4], "lens": "wide"}

    for bad_fields, body, reason in [
        ({**fields, "frame_shape": "4x4"}, frame.tobytes(), "the frame has 12 values, not 4 x 4"),
        ({**fields, "frame_shape": "wide"}, frame.tobytes(), "frame_shape = [height, width]"),
        ({**fields, "tenant": "globex"}, frame.tobytes(), "is not the caller's tenant"),
        ({**fields, "attributes": "[1]"}, frame.tobytes(), "attributes: must be a JSON object"),
        ({**fields, "data_type": "metric"}, frame.tobytes(), "send it as JSON"),
        ({"entity": "camera-1", "frame_shape": "3x4"}, frame.tobytes(), "event_time"),
    ]:
        result = ingestor.ingest_frame("acme", bad_fields, body)
        assert result.accepted == 0 and result.event_ids == [None]
        (rejected,) = result.rejected
        assert rejected.index == 0 and reason in rejected.reason

    # A record's binary body is its row's payload, on the batch path.
    blob = b"\x00\x01 raw bytes"
    record = {"entity": "order-1", "event_time": T, "event_id": "blob-1", "data_type": "record"}
    assert ingestor.ingest_frame("acme", record, blob).accepted == 1
    (row,) = lake.read("events", tenant="acme").to_pylist()
    assert row["event_id"] == "blob-1" and lake.payload(row) == blob


def test_an_unavailable_log_refuses_with_503_and_retry_after(ingest, settings):
    ingestor, _ = ingest
    with closing(sqlite3.connect(log_file(settings), isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")  # another writer holds the log's write lock too long
        with pytest.raises(Refusal) as refused:
            ingestor.ingest_documents("acme", [_event()])
        other.execute("ROLLBACK")
    assert refused.value.status == 503 and refused.value.retry_after_s == settings.serving.retry_after_s
    assert "retry later" in refused.value.reason


def test_a_predict_requests_personal_fields_are_tokenized_and_revealable(settings):
    first_hop = PiiFirstHop(settings)
    request = ScoreRequest(
        tenant="acme",
        windows=np.zeros((3, 4), np.float32),
        entities=["card 4111 1111 1111 1111", "pump-1", "bob@example.com"],
        subjects=["alice@example.com", None, "customer-7"],
    )
    tokenized = first_hop.score_request(request)
    tokenizer = Tokenizer(settings)
    assert tokenized.entities[1] == "pump-1" and tokenized.subjects[1] is None
    assert tokenized.entities[2] == tokenizer.token("email", "bob@example.com")
    assert "4111" not in tokenized.entities[0] and tokenized.entities[0].startswith("card tok_card_")
    assert tokenized.subjects == [tokenizer.subject_token("alice@example.com"), None, tokenizer.subject_token("customer-7")]
    assert tokenized.windows is request.windows and tokenized.event_ids is None
    vault = TokenVault.open(settings)
    assert vault.reveal("acme", tokenized.entities[2]) == "bob@example.com"
    assert vault.reveal("acme", tokenized.subjects[0]) == "alice@example.com"
    first_hop.close()
    vault.close()


def test_an_ingestor_given_the_processs_first_hop_fills_that_tokenizers_caches(settings):
    """The Ingress hands its own first hop to its Ingestor, so that an erasure there (which calls
    ``forget_cached`` on it) empties the caches ingestion fills."""
    first_hop = PiiFirstHop(settings)
    lake = Lakehouse.open(settings)
    ingestor = Ingestor(settings, open_event_log_writer(settings), lambda: lake.writer("events"), first_hop)
    try:
        assert ingestor.ingest_documents("acme", [_event(event_id="pii-1", subject="bob@example.com")]).accepted == 1
        assert first_hop.tokenizer._token.cache_info().currsize > 0
        first_hop.tokenizer.forget_cached()
        assert first_hop.tokenizer._token.cache_info().currsize == 0
    finally:
        ingestor.close()
    assert first_hop.vault.reveal("acme", first_hop.tokenizer.subject_token("bob@example.com")) == "bob@example.com"  # not closed by the ingestor
    first_hop.close()
