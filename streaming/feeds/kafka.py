"""The live feed over Kafka: topics ``<kafka.topic_prefix>.predictions`` and ``.enrichments``.

Records are keyed by tenant, so a tenant's items stay in one partition, in publish order (one
request in flight per connection: a retried request cannot overtake the next). The value is the
item as JSON; a header, ``rtml-datetimes``, lists the paths of the item's datetimes (as JSON lists
of keys and indices), which the reader turns back from their ISO 8601 text, so an item comes out as
it went in, datetimes included, while other consumers read plain JSON. Each record's timestamp is
its ``publish`` time, which is how a reader starts where its first subscription began
(``offsets_for_times``).

A live view needs no stronger delivery than ``acks=1``. Readers join no consumer group: each
process's one reader per topic is assigned every partition.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime

import orjson

from rtml.errors import RtmlError
from rtml.settings import KafkaSettings
from streaming.feeds import TOPICS
from streaming.feeds.memory import DropLog
from streaming.feeds.relay import Entry
from streaming.sources.kafka import BROKER_CALL_TIMEOUT_MS, ensure_topics

DATETIMES_HEADER = "rtml-datetimes"
# Records wait this long in the producer to travel in batches; well inside the feed's latency.
LINGER_MS = 5
# A broker with nothing new answers a fetch after this long, so a reader checks for close at that pace.
FETCH_WAIT_MS = 100
POLL_TIMEOUT_MS = 200
# How long a send may wait for topic metadata or buffer room before it raises (and is retried).
MAX_BLOCK_MS = 10_000


def feed_topic(settings: KafkaSettings, topic: str) -> str:
    return f"{settings.topic_prefix}.{topic}"


def encode(item: dict) -> tuple[bytes, list[tuple[str, bytes]]]:
    """An item as a record's value and headers (see the module docstring)."""
    paths: list[list] = []
    _find_datetimes(item, [], paths)
    return orjson.dumps(item, option=orjson.OPT_SERIALIZE_NUMPY), [(DATETIMES_HEADER, orjson.dumps(paths))] if paths else []


def decode(value: bytes, headers: list[tuple[str, bytes]] | None) -> dict:
    item = orjson.loads(value)
    for key, paths in headers or ():
        if key == DATETIMES_HEADER:
            for path in orjson.loads(paths):
                parent = item
                for step in path[:-1]:
                    parent = parent[step]
                parent[path[-1]] = datetime.fromisoformat(parent[path[-1]])
    return item


def _find_datetimes(container: dict | list | tuple, path: list, found: list[list]) -> None:
    """Append to ``found`` the path of every datetime within ``container``."""
    for key, value in container.items() if isinstance(container, dict) else enumerate(container):
        if isinstance(value, datetime):
            found.append([*path, key])
        elif isinstance(value, (dict, list, tuple)):
            _find_datetimes(value, [*path, key], found)


class KafkaTransport:
    def __init__(self, settings: KafkaSettings):
        self._settings = settings
        self._producer = None
        self._unsendable = DropLog("the live feed dropped %d item(s) that have no tenant or are not JSON")

    def send(self, pending: deque[Entry]) -> None:
        if self._producer is None:
            self._producer = self._connect()
        while pending:
            topic, item, stamp = pending[0]
            tenant = item.get("tenant")
            try:
                if not isinstance(tenant, str):
                    raise TypeError("no tenant")
                value, headers = encode(item)
            except TypeError:  # orjson's error for what JSON cannot hold
                self._unsendable.add(1)
            else:
                self._producer.send(
                    feed_topic(self._settings, topic), key=tenant.encode(), value=value, headers=headers, timestamp_ms=round(stamp * 1000)
                )
            pending.popleft()

    def _connect(self):
        from kafka import KafkaProducer

        ensure_topics(self._settings, [feed_topic(self._settings, topic) for topic in TOPICS])
        return KafkaProducer(
            bootstrap_servers=self._settings.bootstrap_servers,
            acks=1,
            enable_idempotence=False,  # it needs acks="all"; saying so spares kafka-python's warning
            max_in_flight_requests_per_connection=1,
            linger_ms=LINGER_MS,
            max_block_ms=MAX_BLOCK_MS,
        )

    def follow(self, topic: str, since: float) -> KafkaFollower:
        return KafkaFollower(self._settings, feed_topic(self._settings, topic), since)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)


class KafkaFollower:
    """Every partition of one feed topic from the first record stamped ``since`` or later."""

    def __init__(self, settings: KafkaSettings, name: str, since: float):
        from kafka import KafkaConsumer, TopicPartition

        ensure_topics(settings, [name])
        consumer = KafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers, group_id=None, enable_auto_commit=False, fetch_max_wait_ms=FETCH_WAIT_MS
        )
        try:
            consumer.topics()  # fetches the cluster's metadata, which partitions_for_topic reads
            partitions = [TopicPartition(name, p) for p in sorted(consumer.partitions_for_topic(name) or ())]
            if not partitions:
                raise RtmlError(f"the live feed's topic {name} has no partitions at {settings.bootstrap_servers} yet")
            # The ends first: a record appended after offsets_for_times looked lies beyond them.
            ends = consumer.end_offsets(partitions, timeout_ms=BROKER_CALL_TIMEOUT_MS)
            starts = consumer.offsets_for_times({tp: round(since * 1000) for tp in partitions}, timeout_ms=BROKER_CALL_TIMEOUT_MS)
            consumer.assign(partitions)
            for tp in partitions:
                consumer.seek(tp, starts[tp].offset if starts.get(tp) is not None else ends[tp])
        except BaseException:
            consumer.close()
            raise
        self._consumer = consumer
        self._undecodable = DropLog(f"the live feed skipped %d record(s) of {name} that are not an item as JSON")

    def fetch(self) -> list[dict]:
        items = []
        for records in self._consumer.poll(timeout_ms=POLL_TIMEOUT_MS).values():
            for record in records:
                try:
                    items.append(decode(record.value, record.headers))
                except (ValueError, TypeError, KeyError, IndexError):  # a record some other producer wrote
                    self._undecodable.add(1)
        return items

    def close(self) -> None:
        self._consumer.close()
