"""rtml's alert rules in the real Prometheus of `rtml services`, firing into the real Alertmanager.

A pipeline consumes a Kafka topic while this process (the pipeline's owner, which exports the lag
read from the log: streaming.lag) is scraped; once a consumer is killed for good, its partitions
keep their lag and their committed offsets stop, and ``RtmlConsumerStalled`` (observability/rules)
must reach Alertmanager. Waits are bounded polls, never assertions on speed.
"""

from __future__ import annotations

import shutil
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import numpy as np
import pytest
import ray

from observability import metrics, queries, scrape
from rtml.schemas import Refusal, ScoreRequest, ScoreResult
from rtml.settings import Settings

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the client travels to the consumer actors
pytestmark = [pytest.mark.services, pytest.mark.timeout(600)]
START = datetime(2026, 1, 1, tzinfo=timezone.utc)
ALERT = "RtmlConsumerStalled"
WAIT_S = 240.0


class MeanClient:
    """Scores a window by its mean (no Serve app needed: the test is about the stream's metrics)."""

    def score(self, batches: list[ScoreRequest]) -> list[ScoreResult | Refusal]:
        answers = []
        for batch in batches:
            means = batch.windows.reshape(len(batch), -1).mean(axis=1)
            answers.append(ScoreResult([f"p-{i}" for i in batch.event_ids], means, means > 100, {"mean@1": means}, {"mean": "1"}))
        return answers


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _produce(settings: Settings, run: str, first: int, count: int) -> None:
    from streaming.sources.kafka import EventProducer, ensure_topics, events_topic

    ensure_topics(settings.kafka, [events_topic(settings.kafka, "acme"), settings.kafka.dead_letter_topic])
    producer = EventProducer(settings.kafka)
    for step in range(first, first + count):
        for entity in range(4):
            producer.send(
                {
                    "event_id": f"{run}.{entity}.{step}",
                    "tenant": "acme",
                    "entity": f"sensor-{entity}",
                    "event_time": (START + timedelta(seconds=step)).isoformat(),
                    "value": float(np.sin(step / 10)),
                }
            )
    producer.flush()
    producer.close()


def _firing(alertmanager_url: str, group: str) -> list[dict]:
    answer = httpx.get(f"{alertmanager_url}/api/v2/alerts", params={"filter": [f'alertname="{ALERT}"', f'group="{group}"'], "active": "true"}, timeout=10)
    answer.raise_for_status()
    return answer.json()


@pytest.fixture
def prometheus_with_rules(prometheus_url, alertmanager_url):
    """The services' Prometheus with rtml's rule files loaded, and this process registered as a
    target; both undone afterwards."""
    from cluster import services

    prometheus = services.get("prometheus")
    installed = []
    for rules in queries.rules_files():
        target = prometheus.rules_dir / f"test-{rules.name}"
        shutil.copy(rules, target)
        installed.append(target)
    prometheus.reload()
    port = _free_port()
    metrics.serve(port)
    registered = scrape.register_process(prometheus.targets_dir, f"alerts-test-{uuid.uuid4().hex[:8]}", f"127.0.0.1:{port}")
    try:
        yield prometheus
    finally:
        scrape.unregister(registered)
        for target in installed:
            target.unlink(missing_ok=True)
        prometheus.reload()


def test_a_consumer_killed_for_good_fires_consumer_stalled_into_alertmanager(ray_cluster, kafka_bootstrap, alertmanager_url, prometheus_with_rules, tmp_path):
    from streaming.pipeline import Pipeline

    run = f"rtml-alerts-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        home=tmp_path,
        models={"window_length": 8},
        detector={"enabled": False},
        observability={"drift_enabled": False},
        kafka={"bootstrap_servers": kafka_bootstrap, "topic_prefix": run, "dead_letter_topic": f"{run}.dead-letter", "consumer_group": run, "partitions": 2},
        streaming={"source": "kafka", "consumers": 2, "max_poll_records": 200, "window_seconds": 60, "slide_seconds": 60},
        lakehouse={"writer_flush_seconds": 0.2},
    )
    settings = settings.model_copy(update={"home": settings.home_dir})
    _produce(settings, run, 0, 200)
    pipeline = Pipeline(settings, MeanClient(), group=run)
    stop_producing = threading.Event()
    try:
        pipeline.start()
        deadline = time.monotonic() + WAIT_S
        while (progress := pipeline.progress()).durable < progress.total or progress.total == 0:
            assert time.monotonic() < deadline, f"the pipeline did not catch up: {progress}"
            time.sleep(0.5)
        assert not _firing(alertmanager_url, run), "the rule fired while every consumer was healthy"

        ray.kill(pipeline.consumers[0], no_restart=True)

        def keep_producing() -> None:  # new events on every partition: the dead consumer's lag grows
            step = 200
            while not stop_producing.wait(2.0):
                _produce(settings, run, step, 10)
                step += 10

        producer = threading.Thread(target=keep_producing, daemon=True)
        producer.start()
        deadline = time.monotonic() + WAIT_S
        while not (alerts := _firing(alertmanager_url, run)):
            assert time.monotonic() < deadline, f"{ALERT} did not reach Alertmanager within {WAIT_S:.0f} s of the kill"
            time.sleep(2)
        stalled = {alert["labels"]["partition"] for alert in alerts}
        owned_by_killed = set(ray.get(pipeline.consumers[1].progress.remote())).symmetric_difference(
            {f"{run}.events:{p}" for p in range(settings.kafka.partitions)}
        )
        # Only the dead consumer's partitions stall; the living one keeps committing.
        assert stalled and stalled <= owned_by_killed, (stalled, owned_by_killed)
        assert all(alert["labels"]["severity"] == "page" and alert["labels"]["source"] == "rtml" for alert in alerts)
    finally:
        stop_producing.set()
        pipeline.consumers = pipeline.consumers[1:]  # the killed one is gone already
        pipeline.shutdown()
