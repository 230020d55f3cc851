"""The live feed on its real transports, one suite over both: ``KafkaFeed`` on the test broker (a
fresh topic prefix per test) and ``BroadcastFeed`` through its actor on the session's Ray cluster (a
fresh app name per test). Publishers and subscribers are separate feeds, as they are separate
processes in the app, and the end-to-end check publishes from the stream's ``LakehouseSink``
actor. No timing: every wait is bounded by ``WAIT_S`` and fails the test beyond it."""

from __future__ import annotations

import asyncio
import socket
import uuid
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pytest

from rtml.schemas import ScoreRequest, ScoreResult, micros, prediction_table
from rtml.settings import Settings
from streaming.feed import NAMESPACE, BroadcastFeed, KafkaFeed, broadcaster_name, open_feed, prediction_items

WAIT_S = 30.0
BUFFER = 50  # streaming.feed_buffer_items: small, so that a stalled subscriber overflows its backlog
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(params=["kafka", "broadcast"])
def settings(request, tmp_path, ray_cluster):
    fresh = f"feed-{uuid.uuid4().hex[:10]}"
    common = {"home": tmp_path, "lakehouse": {"writer_flush_seconds": 0.2}}
    if request.param == "kafka":
        bootstrap = request.getfixturevalue("kafka_bootstrap")
        yield Settings(**common, streaming={"source": "kafka", "feed_buffer_items": BUFFER}, kafka={"bootstrap_servers": bootstrap, "topic_prefix": fresh})
        return
    settings = Settings(**common, streaming={"feed_buffer_items": BUFFER}, serving={"app_name": fresh})
    yield settings
    try:
        ray_cluster.kill(ray_cluster.get_actor(broadcaster_name(settings), namespace=NAMESPACE))
    except ValueError:
        pass  # the test never reached the broadcaster


def scored_rows(tenant: str, count: int, start: int = 0) -> pa.Table:
    """Prediction rows as the stream's consumers make them, every third an anomaly."""
    numbers = range(start, start + count)
    request = ScoreRequest(
        tenant=tenant,
        windows=np.zeros((count, 4), np.float32),
        entities=[f"pump-{n % 3}" for n in numbers],
        event_ids=[f"{tenant}-event-{n}" for n in numbers],
        event_times_us=np.array([micros(T0 + timedelta(seconds=n, microseconds=n)) for n in numbers]),
        available_at=np.full(count, T0.timestamp()),
    )
    result = ScoreResult(
        prediction_ids=[f"{tenant}-p{n}" for n in numbers],
        ensemble_scores=np.linspace(0.1, 0.9, count, dtype=np.float32),
        is_anomaly=np.array([n % 3 == 0 for n in numbers]),
        scores={f"{tenant}-cnn@1": np.linspace(0.2, 0.8, count, dtype=np.float32), f"{tenant}-rnn@2": np.full(count, 0.5, np.float32)},
        model_versions={f"{tenant}-cnn": "1", f"{tenant}-rnn": "2"},
    )
    return prediction_table(request, result, T0.timestamp() + 1.5)


def enrichment(tenant: str, number: int) -> dict:
    return {"tenant": tenant, "enrichment_id": f"e{number}", "created_at": T0, "details": {"window": [T0, T0 + timedelta(minutes=1)], "summary": "pump 1 ran hot"}}


async def take(subscription, count: int) -> list[dict]:
    return [await asyncio.wait_for(anext(subscription), WAIT_S) for _ in range(count)]


def test_a_subscriber_sees_its_tenants_items_published_after_it_subscribed_in_order_and_intact(settings):
    async def main():
        publisher, early, late = open_feed(settings), open_feed(settings), open_feed(settings)
        watching = early.subscribe("predictions", "acme")
        publisher.publish("predictions", prediction_items(scored_rows("acme", 2, start=100)))
        assert [got["event_id"] for got in await take(watching, 2)] == ["acme-event-100", "acme-event-101"]  # on the transport now

        acme, enrichments = late.subscribe("predictions", "acme"), late.subscribe("enrichments", "acme")
        expected = []
        for batch in range(3):
            rows = pa.concat_tables([scored_rows("acme", 4, start=4 * batch), scored_rows("globex", 4, start=4 * batch)])
            items = prediction_items(rows)
            publisher.publish("predictions", items)
            expected += [got for got in items if got["tenant"] == "acme"]
        publisher.publish("enrichments", [enrichment("globex", 0), enrichment("acme", 1)])

        received = await take(acme, len(expected))
        assert received == expected  # only acme's, none published before it subscribed, in order, equal field by field
        assert all(got["event_time"].tzinfo is timezone.utc and got["created_at"].tzinfo is timezone.utc for got in received)
        assert received[0]["scores"] == {"acme-cnn@1": pytest.approx(0.2), "acme-rnn@2": pytest.approx(0.5)}
        assert received[0]["model_versions"] == {"acme-cnn": "1", "acme-rnn": "2"}
        assert await take(enrichments, 1) == [enrichment("acme", 1)]
        for feed in (publisher, early, late):
            feed.close()

    asyncio.run(main())


def test_two_subscribers_of_one_process_both_get_every_item(settings):
    async def main():
        publisher, subscriber = open_feed(settings), open_feed(settings)
        first, second = subscriber.subscribe("predictions", "acme"), subscriber.subscribe("predictions", "acme")
        items = prediction_items(scored_rows("acme", 12))
        publisher.publish("predictions", items[:6])
        publisher.publish("predictions", items[6:])
        assert await take(first, 12) == items
        assert await take(second, 12) == items
        publisher.close()
        subscriber.close()

    asyncio.run(main())


def test_a_subscriber_that_stalls_or_goes_away_holds_up_neither_publishing_nor_the_others(settings):
    async def main():
        publisher, subscriber = open_feed(settings), open_feed(settings)
        stalled, gone, reading = (subscriber.subscribe("predictions", "acme") for _ in range(3))
        await gone.aclose()
        items = prediction_items(scored_rows("acme", 4 * BUFFER))
        for start in range(0, len(items), 10):  # four times the backlog a subscriber may keep
            publisher.publish("predictions", items[start : start + 10])
            assert await take(reading, 10) == items[start : start + 10]
        assert [got async for got in gone] == []
        kept = await take(stalled, BUFFER)  # the newest of what it did not read, in order
        assert kept == items[-BUFFER:]
        publisher.close()
        subscriber.close()
        assert [got async for got in stalled] == []  # closing the feed ends its subscriptions

    asyncio.run(main())


def test_predictions_a_lakehouse_sink_makes_durable_appear_on_the_feed(settings, ray_cluster):
    from lakehouse import Lakehouse
    from streaming.arrow_ipc import to_ipc
    from streaming.sink import LakehouseSink

    async def main():
        subscriber = open_feed(settings)
        assert isinstance(subscriber, KafkaFeed if settings.streaming.source == "kafka" else BroadcastFeed)
        live = subscriber.subscribe("predictions", "acme")
        sink = ray_cluster.remote(LakehouseSink).options(num_cpus=0).remote(settings)
        rows = pa.concat_tables([scored_rows("acme", 6), scored_rows("globex", 6)])
        assert await sink.write.remote({"predictions": to_ipc(rows)}) == {"predictions": 12}
        expected = [got for got in prediction_items(rows) if got["tenant"] == "acme"]
        assert await take(live, 6) == expected
        await sink.close.remote()
        ray_cluster.kill(sink)
        subscriber.close()
        assert Lakehouse.open(settings).table("predictions").scan().to_arrow().num_rows == 12  # and they are the durable ones

    asyncio.run(main())


def test_a_feed_whose_broker_is_away_takes_what_is_published_and_raises_into_nobody(tmp_path):
    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    feed = KafkaFeed(Settings(home=tmp_path, streaming={"source": "kafka"}, kafka={"bootstrap_servers": address, "topic_prefix": "away"}))
    for _ in range(3):
        feed.publish("predictions", prediction_items(scored_rows("acme", 5)))  # returns: the sender thread waits for the broker
    feed.close()  # gives the sender a bounded while, then leaves it to drop what it could not send
