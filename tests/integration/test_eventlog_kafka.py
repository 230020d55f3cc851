"""The event log's Kafka writer against the real test broker: records appended (from several
threads at once) are on the tenant's topic, in order per key, frames with their headers; a broker
that does not answer makes an append fail with what to do, within the append's timeout."""

from __future__ import annotations

import socket
import threading
import uuid
from collections import defaultdict

import orjson
import pytest

from rtml.settings import Settings
from streaming.eventlog import EventLogUnavailable, KafkaLogWriter, LogRecord, open_event_log_writer
from streaming.router import frame_headers
from streaming.sources.kafka import record_key

THREADS = 4
APPENDS = 10
PER_APPEND = 25


def _settings(bootstrap: str, prefix: str, **streaming) -> Settings:
    return Settings(
        kafka={"bootstrap_servers": bootstrap, "topic_prefix": prefix, "topic_layout": "tenant"},
        streaming={"source": "kafka", **streaming},
    )


def _records(bootstrap: str, topic: str) -> list:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=3000)
    try:
        return list(consumer)
    finally:
        consumer.close()


@pytest.mark.services
def test_appended_records_are_on_the_tenants_topic_in_order_per_key(kafka_bootstrap):
    prefix = f"rtml-test-{uuid.uuid4().hex[:8]}"
    writer = open_event_log_writer(_settings(kafka_bootstrap, prefix))
    assert isinstance(writer, KafkaLogWriter)
    keys = [record_key("acme", f"pump-{k}") for k in range(5)]

    def appends(thread: int) -> None:
        for step in range(APPENDS):
            writer.append(
                "acme",
                [LogRecord(keys[(thread + i) % len(keys)], orjson.dumps({"thread": thread, "step": step, "i": i})) for i in range(PER_APPEND)],
            )

    threads = [threading.Thread(target=appends, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fields = {"event_id": "shot-1", "tenant": "acme", "entity": "camera-1", "event_time": "2025-03-01T00:00:00Z", "attributes": {"frame_shape": [2, 2]}}
    writer.append("acme", [LogRecord(record_key("acme", "camera-1"), b"\x00\x01\x02\x03", frame_headers(fields))])
    writer.close()

    records = _records(kafka_bootstrap, f"{prefix}.events.acme")  # the topic was created on first use
    frames = [r for r in records if r.key == record_key("acme", "camera-1")]
    assert [(f.value, dict(f.headers)) for f in frames] == [(b"\x00\x01\x02\x03", dict(frame_headers(fields)))]
    documents = [(r.key, r.partition, r.offset, orjson.loads(r.value)) for r in records if r not in frames]
    assert len(documents) == THREADS * APPENDS * PER_APPEND
    assert len({(d["thread"], d["step"], d["i"]) for *_, d in documents}) == len(documents)
    partitions, order = defaultdict(set), defaultdict(list)
    for key, partition, offset, document in sorted(documents, key=lambda r: (r[1], r[2])):
        partitions[key].add(partition)
        order[(key, document["thread"])].append((document["step"], document["i"]))
    assert all(len(p) == 1 for p in partitions.values()), "a series was spread over partitions"
    assert all(sequence == sorted(sequence) for sequence in order.values()), "a series' records came out of order"


@pytest.mark.timeout(60)  # "bounded": an append that hung would fail here instead of blocking the run
def test_an_unreachable_broker_makes_appends_fail_with_what_to_do():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"
    writer = open_event_log_writer(_settings(closed, "rtml-unreachable", event_log_timeout_s=1.0))
    for _ in range(2):  # the writer keeps trying to connect on later appends, each bounded as well
        with pytest.raises(EventLogUnavailable, match=rf"Kafka at {closed}.*within 1 s.*Retry later"):
            writer.append("acme", [LogRecord(record_key("acme", "pump-1"), b"{}")])
    writer.close()
