"""Kafka as the event log (kafka-python): topics, the producer side, and the consumer's source.

Topics: ``<prefix>.events`` for every tenant (``kafka.topic_layout = "shared"``) or
``<prefix>.events.<tenant>`` per tenant (``"tenant"``). Records are keyed ``tenant/entity`` so
that a series stays in one partition, in order; the value is the event as JSON.

Consumers do not join a rebalancing group: consumer ``i`` of ``n`` is assigned the partitions at
positions ``i, i + n, ...`` of the sorted partition list, so a restarted consumer gets exactly its
old partitions back and resumes them from its checkpoints. The consumer group still records their
offsets (``commit``), which is where lag tools look, and where a consumer whose checkpoint of a
partition is missing learns that the group had read it (``streaming.consumer`` then rebuilds the
partition's windows from offset 0, or refuses when retention has deleted its beginning).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from rtml.errors import RtmlError
from rtml.settings import KafkaSettings
from streaming.router import frame_headers
from streaming.sources.base import Source, SourceBatch

log = logging.getLogger(__name__)
# A call to the broker that does not answer in this long raises (the caller retries later), so a
# broker restart cannot hang a consumer.
BROKER_CALL_TIMEOUT_MS = 5000


def require_kafka(settings: KafkaSettings) -> None:
    """Fail with what to do when no broker answers at ``settings.bootstrap_servers``."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, request_timeout_ms=5000).close()
    except KafkaError as error:
        raise RtmlError(
            f"no Kafka broker answers at {settings.bootstrap_servers} ({type(error).__name__}); "
            "start one with `rtml services up kafka` or point RTML_KAFKA__BOOTSTRAP_SERVERS at yours"
        ) from None


def events_topic(settings: KafkaSettings, tenant: str) -> str:
    base = f"{settings.topic_prefix}.events"
    return f"{base}.{tenant}" if settings.topic_layout == "tenant" else base


def record_key(tenant: str, entity: str) -> bytes:
    return f"{tenant}/{entity}".encode()


def ensure_topics(settings: KafkaSettings, topics: Iterable[str], timeout_s: float = 15.0) -> None:
    """Create the missing topics with ``settings.partitions`` partitions (the dead-letter topic is
    compacted by key, which drops repeats of a letter). Each wait for the broker (reaching it, a
    request) ends after ``timeout_s`` with kafka-python's error."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    timeout_ms = int(timeout_s * 1000)
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, request_timeout_ms=timeout_ms, bootstrap_timeout_ms=timeout_ms)
    try:
        existing = set(admin.list_topics())
        wanted = [
            NewTopic(
                topic,
                num_partitions=settings.partitions,
                replication_factor=1,
                topic_configs={"cleanup.policy": "compact"} if topic == settings.dead_letter_topic else {},
            )
            for topic in dict.fromkeys(topics)
            if topic not in existing
        ]
        if wanted:
            try:
                admin.create_topics(wanted)
            except TopicAlreadyExistsError:
                pass  # another process created it meanwhile
    finally:
        admin.close()


def log_end_offsets(settings: KafkaSettings) -> dict[str, int]:
    """The current end offset of every events partition, by partition name ("topic:partition")."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers)
    try:
        topics = [t for t in consumer.topics() if is_events_topic(settings, t)]
        partitions = [TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()]
        ends = consumer.end_offsets(partitions, timeout_ms=BROKER_CALL_TIMEOUT_MS)
        return {f"{tp.topic}:{tp.partition}": offset for tp, offset in ends.items()}
    finally:
        consumer.close()


def is_events_topic(settings: KafkaSettings, topic: str) -> bool:
    base = f"{settings.topic_prefix}.events"
    return topic == base if settings.topic_layout == "shared" else topic.startswith(base + ".")


class EventProducer:
    """Writes events (mappings with Event's fields) to their tenant's topic as JSON or as binary
    frames, and records as they are (``send_record``, which the event log's writer uses)."""

    def __init__(self, settings: KafkaSettings, **producer_options: Any):
        from kafka import KafkaProducer

        self._settings = settings
        options = {"acks": "all", "linger_ms": 5, "batch_size": 256 * 1024, **producer_options}
        self._producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, **options)

    def send(self, event: Mapping[str, Any], value: bytes | None = None) -> None:
        """Send one event; ``value`` overrides its JSON text (for sending malformed records)."""
        tenant, entity = str(event.get("tenant")), str(event.get("entity"))
        payload = value if value is not None else json.dumps(event, default=str).encode()
        self.send_record(events_topic(self._settings, tenant), record_key(tenant, entity), payload)

    def send_frame(self, event: Mapping[str, Any], frame: np.ndarray) -> None:
        """Send one image event as a binary frame (``streaming.router``'s format): the raw frame
        (uint8 or float32, [height, width]) as the value, the event's fields in a header."""
        tenant, entity = str(event.get("tenant")), str(event.get("entity"))
        attributes = {**(event.get("attributes") or {}), "frame_shape": list(frame.shape), "frame_dtype": frame.dtype.name}
        fields = {**event, "data_type": "image", "attributes": attributes}
        self.send_record(events_topic(self._settings, tenant), record_key(tenant, entity), np.ascontiguousarray(frame).tobytes(), frame_headers(fields))

    def send_record(self, topic: str, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]] = ()) -> Any:
        """Send one record as it is. Returns kafka-python's future, which resolves once every
        in-sync replica holds the record (``acks="all"``) and raises the broker's error otherwise."""
        return self._producer.send(topic, key=key, value=value, headers=list(headers) or None)

    def flush(self, timeout_s: float | None = None) -> None:
        self._producer.flush(timeout=timeout_s)

    def close(self) -> None:
        self._producer.close()


class KafkaSource(Source):
    def __init__(self, settings: KafkaSettings, consumer_index: int, consumers: int, max_poll_records: int):
        from kafka import KafkaConsumer, TopicPartition

        self._consumer = KafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers,
            group_id=settings.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=max_poll_records,
            fetch_max_wait_ms=50,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        topics = sorted(t for t in self._consumer.topics() if is_events_topic(settings, t))
        every = sorted(TopicPartition(t, p) for t in topics for p in sorted(self._consumer.partitions_for_topic(t) or ()))
        if not every:
            raise RtmlError(
                f"no events topic ({events_topic(settings, '<tenant>')}) at {settings.bootstrap_servers}: produce events first"
            )
        self._owned = every[consumer_index::consumers]
        self._position_of = {tp: i for i, tp in enumerate(self._owned)}
        self.partitions = [f"{tp.topic}:{tp.partition}" for tp in self._owned]
        self._consumer.assign(self._owned)

    def seek(self, positions: Mapping[int, int]) -> None:
        for i, tp in enumerate(self._owned):
            if i in positions:
                self._consumer.seek(tp, positions[i])
            else:
                self._consumer.seek_to_beginning(tp)

    def poll(self, max_records: int, timeout_s: float) -> SourceBatch:
        fetched = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        records = [record for partition_records in fetched.values() for record in partition_records]
        if not records:
            return SourceBatch.empty()
        partitions = np.concatenate([np.full(len(rs), self._position_of[tp], np.int32) for tp, rs in fetched.items()])
        return SourceBatch(
            payloads=[record.value for record in records],
            partitions=partitions,
            offsets=np.fromiter((record.offset for record in records), np.int64, len(records)),
            available_at=np.fromiter((record.timestamp for record in records), np.float64, len(records)) / 1000.0,
            headers=[dict(record.headers) if record.headers else None for record in records],
        )

    def end_offsets(self) -> dict[int, int]:
        ends = self._consumer.end_offsets(self._owned, timeout_ms=BROKER_CALL_TIMEOUT_MS)
        return {self._position_of[tp]: offset for tp, offset in ends.items()}

    def commit(self, positions: Mapping[int, int]) -> None:
        from kafka.structs import OffsetAndMetadata

        offsets = {self._owned[i]: OffsetAndMetadata(offset, "", -1) for i, offset in positions.items()}
        self._consumer.commit(offsets, timeout_ms=BROKER_CALL_TIMEOUT_MS)

    def committed(self) -> dict[int, int]:
        found = {i: self._consumer.committed(tp, timeout_ms=BROKER_CALL_TIMEOUT_MS) for i, tp in enumerate(self._owned)}
        return {i: offset for i, offset in found.items() if offset is not None}

    def start_offsets(self) -> dict[int, int]:
        starts = self._consumer.beginning_offsets(self._owned, timeout_ms=BROKER_CALL_TIMEOUT_MS)
        return {self._position_of[tp]: offset for tp, offset in starts.items()}

    def close(self) -> None:
        self._consumer.close(autocommit=False)
