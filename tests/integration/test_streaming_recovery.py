"""A Kafka consumer group that stops and goes on, or loses its checkpoints, must end with the rows one
uninterrupted run gives: the same feature windows and the same scores, row for row. Real parts: the
test broker, consumer actors on the session's Ray cluster (streaming.pipeline), Iceberg tables on
SQLite; the scoring client is a small deterministic one (a window's score is a function of its
values, so a window restarted empty scores differently)."""

from __future__ import annotations

import shutil
import sys
import uuid
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import numpy as np
import pytest
import ray

from rtml.errors import RtmlError
from rtml.settings import Settings
from rtml.schemas import ScoreRequest, ScoreResult

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the client travels to the consumer actors

TENANTS = ("acme", "globex")
ENTITIES = 3
READINGS = 150  # per series, 5 s apart
START = datetime(2025, 3, 1, tzinfo=timezone.utc)


class WindowMeanClient:
    """Scores each window by the logistic of its mean: deterministic, and sensitive to every value
    of the window (a left-padded window scores differently)."""

    def score(self, batches: list[ScoreRequest]) -> list[ScoreResult]:
        answers = []
        for batch in batches:
            scores = 1.0 / (1.0 + np.exp(-batch.windows.reshape(len(batch), -1).astype(np.float64).mean(axis=1)))
            answers.append(ScoreResult([f"p-{i}" for i in batch.event_ids], scores, scores > 0.7, {"mean@1": scores}, {"mean": "1"}))
        return answers


def _settings(home, run: str, group: str) -> Settings:
    """A consumer group of its own, with its own lakehouse and checkpoints (under ``home``), over
    the run's topic."""
    return Settings(
        home=home,
        models={"window_length": 8},
        kafka={"topic_prefix": run, "dead_letter_topic": f"{run}.dead-letter", "consumer_group": group, "partitions": 2},
        streaming={
            "source": "kafka",
            "consumers": 1,
            "max_poll_records": 100,
            "window_seconds": 60,
            "slide_seconds": 30,
            "allowed_lateness_seconds": 20,
        },
        lakehouse={"writer_flush_seconds": 0.2},
    )


def _events(run: str) -> list[dict]:
    rng = np.random.default_rng(7)
    return [
        {
            "event_id": f"{run}.{tenant}.{entity}.{step}",
            "tenant": tenant,
            "entity": f"sensor-{entity}",
            "event_time": (START + timedelta(seconds=5 * step)).isoformat(),
            "value": float(np.sin(step / 10) + rng.normal(0, 0.1)),
        }
        for step in range(READINGS)
        for tenant in TENANTS
        for entity in range(ENTITIES)
    ]


def _produce(settings: Settings, events: list[dict]) -> None:
    from streaming.sources.kafka import EventProducer, ensure_topics, events_topic

    ensure_topics(settings.kafka, [events_topic(settings.kafka, tenant) for tenant in TENANTS])
    producer = EventProducer(settings.kafka)
    for event in events:
        producer.send(event)
    producer.flush()
    producer.close()


def _consume(settings: Settings, targets: dict[str, int] | None = None) -> list[dict]:
    """One pipeline of the settings' group, from its checkpoints to ``targets`` (default: the log's
    current end); returns the consumers' stats."""
    from streaming.pipeline import Pipeline
    from streaming.sources.kafka import log_end_offsets

    pipeline = Pipeline(settings, WindowMeanClient(), group=settings.kafka.consumer_group)
    try:
        pipeline.start()
        pipeline.finish_at(targets or log_end_offsets(settings.kafka))
        return pipeline.wait(timeout_s=300)
    finally:
        pipeline.shutdown()


def _halfway(settings: Settings) -> dict[str, int]:
    from streaming.sources.kafka import log_end_offsets

    return {partition: end // 2 for partition, end in log_end_offsets(settings.kafka).items()}


def _lose_checkpoints(settings: Settings) -> None:
    shutil.rmtree(settings.home_dir / "streaming" / "checkpoints" / quote(settings.kafka.consumer_group, safe=""))


def _rows(settings: Settings, table: str, order: tuple[str, ...], drop: tuple[str, ...]) -> list[dict]:
    from lakehouse import Lakehouse

    rows = Lakehouse.open(settings).read(table).drop_columns(list(drop)).to_pylist()
    return sorted(rows, key=lambda row: tuple(row[c] for c in order))


def _assert_same_rows(settings: Settings, reference: Settings) -> None:
    """Feature windows and predictions equal those of the uninterrupted run, row for row (the
    aggregates up to float rounding: partial aggregates merge in another order when batches are
    cut elsewhere)."""
    features = _rows(settings, "features", ("tenant", "entity", "window_start"), ("created_at",))
    expected = _rows(reference, "features", ("tenant", "entity", "window_start"), ("created_at",))
    assert len(features) == len(expected) > 0
    for row, want in zip(features, expected):
        assert {k: v for k, v in row.items() if k != "vector"} == {k: v for k, v in want.items() if k != "vector"}
        assert row["vector"] == pytest.approx(want["vector"], rel=1e-9, abs=1e-12), f"window {want['entity']} {want['window_start']}"
    predictions = _rows(settings, "predictions", ("event_id",), ("created_at", "latency_ms"))
    assert predictions == _rows(reference, "predictions", ("event_id",), ("created_at", "latency_ms"))


@pytest.fixture
def run(kafka_bootstrap, ray_cluster) -> str:
    """A fresh topic prefix (and so fresh topics)."""
    return f"rtml-test-{uuid.uuid4().hex[:8]}"


@pytest.mark.services
def test_a_group_stopped_mid_stream_goes_on_with_its_open_windows(run, tmp_path):
    """finish_at on Kafka: the group stops at the log's end of the moment, more events arrive, and
    the next run of the group goes on; the windows open at the stop are completed, not closed early."""
    events = _events(run)
    stopped = _settings(tmp_path / "stopped", run, f"{run}-stopped")
    _produce(stopped, events[: len(events) // 2])
    _consume(stopped)
    _produce(stopped, events[len(events) // 2 :])
    _consume(stopped)

    whole = _settings(tmp_path / "whole", run, f"{run}-whole")
    _consume(whole)

    _assert_same_rows(stopped, whole)


@pytest.mark.services
def test_a_group_whose_checkpoints_are_lost_rebuilds_its_windows_from_the_log(run, tmp_path):
    """The group has committed offsets but no checkpoints: it reads the partitions again from offset
    0, which rebuilds the windows; the idempotent writes drop what had landed."""
    events = _events(run)
    lost = _settings(tmp_path / "lost", run, f"{run}-lost")
    _produce(lost, events)
    _consume(lost, _halfway(lost))
    _lose_checkpoints(lost)

    stats = _consume(lost)

    assert sum(s["read"] for s in stats) == len(events), "the partitions were not read again from offset 0"
    whole = _settings(tmp_path / "whole", run, f"{run}-whole")
    _consume(whole)
    _assert_same_rows(lost, whole)


@pytest.mark.services
def test_a_group_whose_checkpoints_are_lost_and_whose_log_beginning_is_gone_is_refused(run, tmp_path):
    """As above, but retention has deleted the beginning of one partition: its windows cannot be
    rebuilt, and the consumer refuses, naming the partition, the checkpoint directory and what to do."""
    from kafka import KafkaAdminClient, TopicPartition

    settings = _settings(tmp_path / "gone", run, f"{run}-gone")
    _produce(settings, _events(run))
    _consume(settings, _halfway(settings))
    _lose_checkpoints(settings)
    topic = f"{run}.events"
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    try:
        admin.delete_records({TopicPartition(topic, 0): 10})
    finally:
        admin.close()

    with pytest.raises(RtmlError) as raised:
        _consume(settings)

    message = str(raised.value)
    assert f"{topic}:0" in message and f"{topic}:1" not in message
    assert str(settings.home_dir / "streaming" / "checkpoints") in message
    assert "the log now starts at 10" in message
    assert "restore the checkpoints" in message.lower() and "new consumer group" in message
