"""The live feed: predictions and enrichments as they happen, per tenant, for GraphQL subscriptions.

    feed = open_feed(settings)                          # nothing connects until first used
    feed.publish("predictions", prediction_items(rows))  # returns at once, never raises
    async for item in feed.subscribe("predictions", "acme"):
        ...                                             # acme's items published from now on
    feed.close()

Publishers are the stream's ``LakehouseSink`` (rows once durable) and the serving
``PredictionSink`` (rows once in its write-ahead log, when the router answers); subscribers are the
API's subscriptions, in any process of the cluster. So a streamed prediction reaches subscribers
once its lakehouse commit is done, which the sink's writers batch (``lakehouse.writer_flush_seconds``);
the feed itself adds milliseconds. Which feed ``open_feed`` gives follows the event
log: over Kafka (``KafkaFeed``: topics ``<kafka.topic_prefix>.predictions`` and ``.enrichments``,
keyed by tenant) when ``streaming.source`` is ``kafka``, else through the in-cluster broadcaster
(``BroadcastFeed``: a named Ray actor per app). Both are the same relay (``streaming.feeds.relay``):
publishing queues the items in a bounded outbox that one thread per feed sends on, so the caller
never waits on the network, and a feed that is away drops (and logs a count) rather than failing
anybody: subscribers are live views, the lakehouse is the record. Subscribing reads a local
``MemoryFeed``, which one reader thread per topic and process fills from the transport, starting
at the first subscription's moment. Every buffer on the way is bounded
(``streaming.feed_buffer_items``): a slow subscriber skips its oldest items and never holds up the
publishers or the other subscribers.

Items are dicts. Prediction items have the ``predictions`` table's columns, ``scores`` and
``model_versions`` as dicts and ``event_time`` / ``created_at`` as UTC datetimes
(``prediction_items``); every feed delivers an item as it was published, datetimes included (Kafka's
JSON too). An item is delivered to the subscribers of its ``item["tenant"]`` only.

Open one feed per process and share it (e.g. one per API replica): each feed runs its own reader
per topic, whatever the number of its subscriptions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Protocol

import pyarrow as pa

from rtml.schemas import EPOCH, Prediction
from rtml.settings import Settings
from streaming.feeds import TOPICS, Topic
from streaming.feeds.broadcast import NAMESPACE, BroadcastTransport
from streaming.feeds.kafka import KafkaTransport
from streaming.feeds.memory import MemoryFeed, Subscription
from streaming.feeds.relay import RelayFeed

__all__ = ["NAMESPACE", "TOPICS", "BroadcastFeed", "Feed", "KafkaFeed", "MemoryFeed", "Subscription", "Topic", "broadcaster_name", "open_feed", "prediction_items"]

PREDICTION_COLUMNS = tuple(Prediction.model_fields)
MICROSECOND = timedelta(microseconds=1)


class Feed(Protocol):
    def publish(self, topic: Topic, items: Sequence[dict]) -> None:
        """Hand items on; never blocks the caller for long and never raises into the scoring
        path (a feed that is down logs and drops: subscribers are live views, the lakehouse is
        the record)."""

    def subscribe(self, topic: Topic, tenant: str) -> AsyncIterator[dict]:
        """Items published from now on whose item["tenant"] == tenant, in publish order per
        publisher; an async iterator that stops when the consumer stops iterating (aclose)."""

    def close(self) -> None: ...


class KafkaFeed(RelayFeed):
    """The live feed over the Kafka broker of ``settings.kafka`` (see the module docstring)."""

    def __init__(self, settings: Settings):
        super().__init__(KafkaTransport(settings.kafka), settings.streaming.feed_buffer_items)


class BroadcastFeed(RelayFeed):
    """The live feed through the app's broadcaster actor on the Ray cluster this process is
    connected to (see the module docstring)."""

    def __init__(self, settings: Settings):
        super().__init__(BroadcastTransport(broadcaster_name(settings), settings.streaming.feed_buffer_items), settings.streaming.feed_buffer_items)


def broadcaster_name(settings: Settings) -> str:
    """The broadcaster actor's name (in the Ray namespace ``streaming.feeds.broadcast.NAMESPACE``)."""
    return f"rtml-feed-{settings.serving.app_name}"


def open_feed(settings: Settings) -> Feed:
    """The live feed that ``settings`` call for: ``KafkaFeed`` when the stream reads Kafka
    (``streaming.source == "kafka"``), else ``BroadcastFeed``. Connects nothing yet."""
    return KafkaFeed(settings) if settings.streaming.source == "kafka" else BroadcastFeed(settings)


def prediction_items(rows: pa.Table) -> list[dict]:
    """Prediction rows (``rtml.schemas.prediction_table``; columns beyond the table's are left out)
    as feed items: maps as dicts, timestamps as ``datetime.timezone.utc`` datetimes. Column by
    column, since pyarrow's own conversion of timestamps and maps to Python costs several times
    more per value."""
    names = [name for name in PREDICTION_COLUMNS if name in rows.column_names]
    columns = [_python_values(rows.column(name)) for name in names]
    return [dict(zip(names, values)) for values in zip(*columns)]


def _python_values(column: pa.ChunkedArray) -> list:
    if pa.types.is_timestamp(column.type):
        micros = column.cast(pa.timestamp("us", tz=column.type.tz)).cast(pa.int64()).to_pylist()
        return [None if value is None else EPOCH + MICROSECOND * value for value in micros]
    if pa.types.is_map(column.type):
        return [None if pairs is None else dict(pairs) for pairs in column.to_pylist()]
    return column.to_pylist()
