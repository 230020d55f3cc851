"""The live feed's parts that run in one process, no Ray, no broker: ``MemoryFeed`` (tenant
filtering, order, bounded backlogs, ending), prediction rows as items, the Kafka records' JSON
round trip, the broadcaster's cursor rules, and the relay over a loop-back transport that fails
for a while."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from datetime import datetime, timedelta, timezone

import numpy as np
import orjson
import pyarrow as pa
import pytest

from rtml.errors import RtmlError
from rtml.schemas import ScoreRequest, ScoreResult, micros, prediction_table
from streaming.feed import MemoryFeed, prediction_items
from streaming.feeds.broadcast import Broadcaster
from streaming.feeds.kafka import DATETIMES_HEADER, decode, encode
from streaming.feeds.relay import Entry, Outbox, RelayFeed

WAIT_S = 30.0
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


def item(tenant: str, number: int) -> dict:
    return {"tenant": tenant, "n": number}


async def take(subscription, count: int) -> list[dict]:
    return [await asyncio.wait_for(anext(subscription), WAIT_S) for _ in range(count)]


async def nothing_more(subscription) -> bool:
    """Whether the subscription has nothing ready: its next item, asked for, has to be waited for."""
    pending = asyncio.ensure_future(anext(subscription))
    await settled()
    waits = not pending.done()
    pending.cancel()
    return waits


async def settled() -> None:
    """Let every task that can run go as far as it can without waiting on anything new."""
    for _ in range(3):
        await asyncio.sleep(0)


def test_a_subscriber_gets_its_tenants_items_published_after_it_subscribed_in_order():
    async def main():
        feed = MemoryFeed()
        feed.publish("predictions", [item("acme", -1)])  # before anybody subscribed: nobody's
        acme, globex = feed.subscribe("predictions", "acme"), feed.subscribe("predictions", "globex")
        feed.publish("predictions", [item("acme", 0), item("globex", 0), item("acme", 1)])
        feed.publish("enrichments", [item("acme", 99)])  # another topic
        feed.publish("predictions", [item("acme", 2), {"no": "tenant"}, "not a dict"])
        assert await take(acme, 3) == [item("acme", 0), item("acme", 1), item("acme", 2)]
        assert await take(globex, 1) == [item("globex", 0)]
        assert await nothing_more(acme) and await nothing_more(globex)

    asyncio.run(main())


def test_two_subscribers_of_one_tenant_each_get_every_item_and_publishers_of_other_threads_reach_them():
    async def main():
        feed = MemoryFeed()
        first, second = feed.subscribe("predictions", "acme"), feed.subscribe("predictions", "acme")
        publisher = threading.Thread(target=lambda: [feed.publish("predictions", [item("acme", n)]) for n in range(50)])
        publisher.start()
        expected = [item("acme", n) for n in range(50)]
        assert await take(first, 50) == expected
        assert await take(second, 50) == expected
        publisher.join()

    asyncio.run(main())


def test_a_slow_subscriber_skips_its_oldest_items_and_holds_up_neither_publishers_nor_others(caplog):
    async def main():
        feed = MemoryFeed(capacity=5)
        stalled, reading = feed.subscribe("predictions", "acme"), feed.subscribe("predictions", "acme")
        for n in range(12):
            feed.publish("predictions", [item("acme", n)])  # returns although `stalled` reads nothing
            assert await take(reading, 1) == [item("acme", n)]
        with caplog.at_level(logging.WARNING, logger="streaming.feeds.memory"):
            assert await take(stalled, 5) == [item("acme", n) for n in range(7, 12)]  # the newest five, in order
        assert "skipped 7 item(s)" in caplog.text
        assert await nothing_more(stalled)

    asyncio.run(main())


def test_aclose_ends_a_subscription_even_while_it_waits_and_releases_its_backlog():
    async def main():
        feed = MemoryFeed()
        subscription = feed.subscribe("predictions", "acme")
        waiting = asyncio.ensure_future(anext(subscription))
        await settled()  # it waits now
        await subscription.aclose()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(waiting, WAIT_S)
        assert [got async for got in subscription] == []
        feed.publish("predictions", [item("acme", 0)])
        assert feed._rings["predictions"] == {}  # nobody follows acme here now: nothing is kept for it

        other = feed.subscribe("predictions", "acme")
        closer = threading.Thread(target=other.close)  # from another thread too
        waiting = asyncio.ensure_future(anext(other))
        await settled()
        closer.start()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(waiting, WAIT_S)
        closer.join()

    asyncio.run(main())


def test_closing_the_feed_ends_its_subscriptions_and_refuses_new_ones():
    async def main():
        feed = MemoryFeed()
        subscription = feed.subscribe("enrichments", "acme")
        feed.close()
        assert [got async for got in subscription] == []
        with pytest.raises(RtmlError, match="closed"):
            feed.subscribe("enrichments", "acme")

    asyncio.run(main())


def test_an_unknown_topic_is_refused_naming_the_topics():
    with pytest.raises(ValueError, match="unknown feed topic 'anomalies'; the live feed has predictions, enrichments"):
        MemoryFeed().subscribe("anomalies", "acme")


def scored_rows(count: int = 3) -> pa.Table:
    request = ScoreRequest(
        tenant="acme",
        windows=np.zeros((count, 4), np.float32),
        entities=[f"pump-{n}" for n in range(count)],
        event_ids=[f"event-{n}" for n in range(count)],
        event_times_us=np.array([micros(T0 + timedelta(seconds=n, microseconds=7)) for n in range(count)]),
        subjects=["alice", None, None][:count],
        available_at=np.full(count, T0.timestamp()),
    )
    result = ScoreResult(
        prediction_ids=[f"p{n}" for n in range(count)],
        ensemble_scores=np.linspace(0.1, 0.9, count, dtype=np.float32),
        is_anomaly=np.array([False, False, True][:count]),
        scores={"acme-cnn@1": np.linspace(0.2, 0.8, count, dtype=np.float32)},
        model_versions={"acme-cnn": "1"},
    )
    return prediction_table(request, result, T0.timestamp() + 0.25).append_column("keys_bound_by_time", pa.array([True] * count))


def test_prediction_rows_become_items_with_dicts_and_utc_datetimes_and_only_the_tables_columns():
    items = prediction_items(scored_rows())
    assert [list(i) for i in items] == [
        ["prediction_id", "event_id", "tenant", "entity", "event_time", "scores", "ensemble_score", "is_anomaly", "model_versions", "latency_ms", "created_at", "subject"]
    ] * 3
    third = items[2]
    assert third["event_time"] == T0 + timedelta(seconds=2, microseconds=7) and third["event_time"].tzinfo is timezone.utc
    assert third["created_at"] == T0 + timedelta(seconds=0.25) and third["created_at"].tzinfo is timezone.utc
    assert third["scores"] == {"acme-cnn@1": pytest.approx(0.8)} and third["model_versions"] == {"acme-cnn": "1"}
    assert third["is_anomaly"] is True and third["latency_ms"] == pytest.approx(250.0)
    assert [i["subject"] for i in items] == ["alice", None, None]


def test_kafka_records_carry_items_as_plain_json_and_give_back_their_datetimes_wherever_they_are():
    enrichment = {
        "tenant": "acme",
        "created_at": T0,
        "details": {"window": [T0 - timedelta(minutes=5), T0], "note": "2025-03-01T12:00:00+00:00", "depth": {"seen": T0 + timedelta(microseconds=1)}},
        "naive": datetime(2025, 3, 1, 12, 0),
    }
    for original in [*prediction_items(scored_rows()), enrichment]:
        value, headers = encode(original)
        assert orjson.loads(value)["tenant"] == "acme"  # other consumers read plain JSON
        assert dict(headers).keys() <= {DATETIMES_HEADER}
        decoded = decode(value, headers)
        assert decoded == original
        assert decoded["created_at"].tzinfo is timezone.utc
    assert decode(value, headers)["details"]["note"] == "2025-03-01T12:00:00+00:00"  # a string that looks like a time stays one
    assert decode(*encode({"tenant": "acme", "n": 1})) == {"tenant": "acme", "n": 1}


def test_the_broadcaster_starts_a_new_reader_at_its_moment_and_a_reader_of_a_dead_incarnation_at_the_start():
    async def main():
        broadcaster = Broadcaster(capacity=100)
        await broadcaster.publish([Entry("predictions", item("acme", 0), 10.0), Entry("predictions", item("acme", 1), 20.0)])
        await broadcaster.publish([Entry("predictions", item("acme", 2), 30.0), Entry("enrichments", item("acme", 3), 30.0)])
        incarnation, items, last, missed = await broadcaster.next("predictions", None, 0, 20.0, 1.0)
        assert (items, last, missed) == ([item("acme", 1), item("acme", 2)], 3, 0)  # published at 20 or later
        waiting = asyncio.ensure_future(broadcaster.next("predictions", incarnation, last, 0.0, WAIT_S))
        await settled()
        assert not waiting.done()  # a long poll: it waits for what comes next
        await broadcaster.publish([Entry("predictions", item("acme", 4), 40.0)])
        assert (await asyncio.wait_for(waiting, WAIT_S))[1:] == ([item("acme", 4)], 4, 0)
        assert (await broadcaster.next("predictions", incarnation, 4, 0.0, 0.01))[1] == []  # timed out: nothing new

        restarted = Broadcaster(capacity=2)
        await restarted.publish([Entry("predictions", item("acme", n), 50.0) for n in range(5)])
        _, items, last, missed = await restarted.next("predictions", incarnation, 4, 0.0, 1.0)
        assert (items, last, missed) == ([item("acme", 3), item("acme", 4)], 5, 3)

    asyncio.run(main())


def test_the_outbox_keeps_the_newest_items_in_order_and_counts_what_it_drops(caplog):
    outbox = Outbox(capacity=4)
    with caplog.at_level(logging.WARNING, logger="streaming.feeds.memory"):
        outbox.put("predictions", [item("acme", n) for n in range(3)], 1.0)
        outbox.put("enrichments", [item("acme", n) for n in range(3, 6)], 2.0)
    assert [(e.topic, e.item["n"], e.stamp) for e in outbox.take()] == [("predictions", 2, 1.0), ("enrichments", 3, 2.0), ("enrichments", 4, 2.0), ("enrichments", 5, 2.0)]
    assert "dropped 2 published item(s)" in caplog.text
    outbox.close()
    assert outbox.take() is None


class LoopBack:
    """A transport that hands what is sent to its followers. Its sends wait for ``gate``, then the
    first ``failures`` of them fail."""

    def __init__(self, failures: int):
        self.gate = threading.Event()
        self.failures = failures
        self.sent: list = []
        self.ready = threading.Condition()

    def send(self, pending: deque) -> None:
        self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise ConnectionError("the broker is away")
        with self.ready:
            while pending:
                self.sent.append(pending.popleft())
            self.ready.notify_all()

    def follow(self, topic: str, since: float):
        transport = self

        class Follower:
            position = 0

            def fetch(self):
                with transport.ready:
                    transport.ready.wait_for(lambda: len(transport.sent) > self.position, timeout=0.1)
                    entries, self.position = transport.sent[self.position :], len(transport.sent)
                return [e.item for e in entries if e.topic == topic and e.stamp >= since]

            def close(self):
                pass

        return Follower()

    def close(self) -> None:
        pass


def test_the_relay_returns_at_once_while_its_transport_fails_and_delivers_in_order_once_it_passes():
    async def main():
        transport = LoopBack(failures=2)
        feed = RelayFeed(transport, capacity=100)
        subscription = feed.subscribe("predictions", "acme")
        for n in range(10):  # the sender is stuck in its first send meanwhile: publishing does not wait for it
            feed.publish("predictions", [item("acme", n), item("globex", n)])
        feed.publish("nonsense", [item("acme", 99)])  # logged and dropped, not raised
        transport.gate.set()  # the transport answers now, with two failures first
        assert await take(subscription, 10) == [item("acme", n) for n in range(10)]
        feed.close()
        assert [got async for got in subscription] == []

    asyncio.run(main())
