"""Each test service proven with its own Python client against the real server (`rtml services up`)."""

from __future__ import annotations

import subprocess
import uuid

import pytest
from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

pytestmark = pytest.mark.services


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def test_kafka_topic_is_consumed_by_a_group_that_commits_its_offsets(kafka_bootstrap):
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import NewTopic

    topic, group = unique("rtml-test-topic"), unique("rtml-test-group")
    sent = [f"event-{i}".encode() for i in range(20)]
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    try:
        with KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all") as producer:
            for value in sent:
                producer.send(topic, value)
            producer.flush()

        def consume_all() -> list[bytes]:
            consumer = KafkaConsumer(
                topic, bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False,
                auto_offset_reset="earliest", consumer_timeout_ms=10_000,
            )  # fmt: skip
            received = [record.value for record in consumer]
            consumer.commit()
            consumer.close()
            return received

        assert sorted(consume_all()) == sorted(sent)
        committed = admin.list_group_offsets(group)[group]
        assert sum(offset.offset for offset in committed.values()) == len(sent)
        assert set(committed) == {TopicPartition(topic, 0), TopicPartition(topic, 1)}
        # The group resumes from its committed offsets: nothing is delivered twice.
        assert consume_all() == []
    finally:
        admin.delete_groups([group])
        admin.delete_topics([topic])
        admin.close()


def test_kafka_restart_keeps_topics_and_committed_offsets(kafka_bootstrap):
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

    from cluster import services

    topic, group = unique("rtml-test-restart"), unique("rtml-test-group")
    with KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all") as producer:
        for value in (b"before-1", b"before-2"):
            producer.send(topic, value)
        producer.flush()

    def consume(expected: int) -> list[bytes]:
        consumer = KafkaConsumer(
            topic, bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False,
            auto_offset_reset="earliest", consumer_timeout_ms=10_000,
        )  # fmt: skip
        received = []
        for record in consumer:
            received.append(record.value)
            if len(received) == expected:
                break
        consumer.commit()
        consumer.close()
        return received

    assert consume(2) == [b"before-1", b"before-2"]
    services.get("kafka").restart()
    with KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all") as producer:
        producer.send(topic, b"after").get(timeout=30)
    # Only the record written after the restart: the group's offsets survived it.
    assert consume(1) == [b"after"]
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.delete_groups([group])
    admin.delete_topics([topic])
    admin.close()


def test_neo4j_node_and_relationship_round_trip(neo4j_uri):
    from neo4j import GraphDatabase

    run = unique("run")
    with GraphDatabase.driver(neo4j_uri, auth=None) as driver:
        driver.execute_query(
            "CREATE (:Sensor {run: $run, name: 'pump-7'})-[:FEEDS {since: 2024}]->(:Model {run: $run, name: 'rnn-a'})",
            run=run,
        )
        try:
            records, _, _ = driver.execute_query(
                "MATCH (s:Sensor {run: $run})-[f:FEEDS]->(m:Model {run: $run}) RETURN s.name, f.since, m.name",
                run=run,
            )
            assert [record.values() for record in records] == [["pump-7", 2024, "rnn-a"]]
        finally:
            driver.execute_query("MATCH (n {run: $run}) DETACH DELETE n", run=run)


def test_elasticsearch_finds_an_indexed_document_by_a_match_query(elasticsearch_url):
    from elasticsearch import Elasticsearch

    index = unique("rtml-test-index")
    with Elasticsearch(elasticsearch_url) as client:
        try:
            client.index(index=index, id="a", document={"text": "bearing temperature spike on pump 7"})
            client.index(index=index, id="b", document={"text": "routine calibration finished"}, refresh="wait_for")
            hits = client.search(index=index, query={"match": {"text": "temperature"}})["hits"]["hits"]
            assert [hit["_id"] for hit in hits] == ["a"]
            assert hits[0]["_source"]["text"] == "bearing temperature spike on pump 7"
        finally:
            client.indices.delete(index=index, ignore_unavailable=True)


def test_prometheus_sees_an_exporter_written_to_its_file_sd_targets(prometheus_url):
    import httpx
    from prometheus_client import CollectorRegistry, Counter, start_http_server

    from cluster import services
    from observability import scrape

    prometheus = services.get("prometheus")
    registry = CollectorRegistry()
    Counter("rtml_test_events", "events seen by the test exporter", registry=registry).inc(3)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    process = unique("rtml-test")
    target_file = scrape.register_process(prometheus.targets_dir, process, f"127.0.0.1:{server.server_port}")
    try:

        def scraped_sample() -> float | None:
            query = f'rtml_test_events_total{{process="{process}"}} and on(process) up{{process="{process}"}} == 1'
            result = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": query}, timeout=5).json()
            samples = result["data"]["result"]
            return float(samples[0]["value"][1]) if samples else None

        waiting = Retrying(stop=stop_after_delay(60), wait=wait_fixed(1), retry=retry_if_result(lambda v: v is None))
        assert waiting(scraped_sample) == 3.0
        targets = httpx.get(f"{prometheus_url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        assert [target["health"] for target in targets if target["labels"].get("process") == process] == ["up"]
    finally:
        target_file.unlink()
        server.shutdown()
        thread.join()


def test_generated_prometheus_config_passes_promtool(prometheus_url):
    from cluster import services

    config_file = services.get("prometheus").config_file
    result = subprocess.run(["promtool", "check", "config", str(config_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_postgres_table_round_trip(postgres_dsn):
    import sqlalchemy as sa

    engine = sa.create_engine(postgres_dsn)
    table = sa.Table(
        unique("rtml_test").replace("-", "_"),
        sa.MetaData(),
        sa.Column("event_id", sa.String, primary_key=True),
        sa.Column("score", sa.Float, nullable=False),
    )
    table.create(engine)
    try:
        with engine.begin() as connection:
            connection.execute(table.insert(), [{"event_id": "e1", "score": 0.25}, {"event_id": "e2", "score": 0.75}])
        with engine.connect() as connection:
            rows = connection.execute(sa.select(table).order_by(table.c.event_id)).all()
        assert [tuple(row) for row in rows] == [("e1", 0.25), ("e2", 0.75)]
    finally:
        table.drop(engine)
        engine.dispose()


def test_redis_counts_a_shared_rate_limit_across_clients(redis_url):
    from limits import RateLimitItemPerSecond
    from limits.storage import storage_from_string
    from limits.strategies import SlidingWindowCounterRateLimiter

    item, tenant = RateLimitItemPerSecond(10, 60), unique("tenant")
    # Two clients, as two Ingress replicas would have: the second sees what the first counted.
    first, second = (SlidingWindowCounterRateLimiter(storage_from_string(redis_url)) for _ in range(2))
    assert first.hit(item, tenant, cost=8)
    assert not second.hit(item, tenant, cost=3)
    assert second.hit(item, tenant, cost=2)
    assert second.get_window_stats(item, tenant).remaining == 0


def test_status_shows_every_service_up(
    monkeypatch, kafka_bootstrap, neo4j_uri, elasticsearch_url, prometheus_url, postgres_dsn, redis_url, alertmanager_url
):
    from typer.testing import CliRunner

    from cluster import cli, services

    monkeypatch.setattr(cli.console, "width", 200)
    result = CliRunner().invoke(cli.app, ["status"])
    assert result.exit_code == 0, result.output
    for name in services.NAMES:
        row = next(line for line in result.output.splitlines() if f" {name} " in line)
        assert " up " in row and services.get(name).address in row
