"""Where ingested events go: the event log that the stream's consumers read.

    log = open_event_log_writer(settings)     # Kafka when streaming.source == "kafka", else the embedded log
    log.append("acme", [LogRecord(record_key("acme", "pump-1"), b'{"entity": "pump-1", ...}')])
    log.close()

``append`` returns only once every record is durable in the log, so an ingest that answers after
it has lost nothing if its process dies afterwards. When that cannot be promised it raises
``EventLogUnavailable`` (what failed, and to retry): some of the records may then be in the log
all the same, and a retry appends them again; the lakehouse's idempotent writes keep one row per
``(tenant, event id)``, so a client that names its events' ids retries safely. A record is keyed
``tenant/entity`` (``streaming.sources.kafka.record_key``): records of one key keep their order.
Writers are thread-safe; ``append`` is meant to be called from several worker threads at once.

Kafka (``KafkaLogWriter``)
    One ``acks="all"`` producer (idempotent, so that its retries neither repeat nor reorder a
    partition's records) on the tenant's events topic, created on first use. ``append`` waits for
    the broker's acknowledgement of every record, at most ``streaming.event_log_timeout_s``.

The embedded log (``EmbeddedLogWriter``; ``streaming.sources.eventlog`` reads it)
    One SQLite file, ``<streaming.event_log_dir>/events.db``, that every writer and reader on the
    machine opens (several Ingress replicas and consumers, each in its own process; SQLite's locks
    need a local disk, not a network share: across machines, use Kafka). Its concurrency argument:

    - A record's partition is ``crc32(key) % partitions``, the replay source's hash; the number
      of partitions is fixed when the log is created (``streaming.event_log_partitions``; a log
      opened with another number is refused), so a series always lands in one partition.
    - One ``append`` is one transaction begun with ``BEGIN IMMEDIATE``, which takes the database's
      write lock before the transaction reads anything. Only one append (of any thread or process)
      is inside one at a time, so each reads its partitions' next offsets, inserts its records at
      the offsets after them and moves the next offsets on without another append in between:
      every partition's offsets are 0, 1, 2, ... with no gap and no repeat, and a transaction that
      fails leaves nothing behind. A writer that waits for the lock longer than
      ``streaming.event_log_timeout_s`` gives up with ``EventLogUnavailable``.
    - The file is in WAL mode with ``synchronous=FULL``: a commit returns once the log's new pages
      are fsynced, so an ``append`` that returned survives its process being killed, or a power cut.
    - Readers never wait for writers (WAL) and see whole committed transactions only. Since the
      transactions that assign a partition's offsets commit one after another, in offset order, a
      reader never sees an offset before every smaller one of its partition: reading "from offset
      p on" never skips a record that commits later.
    - Each record keeps ``appended_at`` (wall-clock seconds, taken under the write lock), from
      which consumers measure latency. Retention: a writer deletes, at most once a minute, each
      partition's records appended more than ``streaming.event_log_retention_hours`` ago, always
      a prefix of the partition (up to its newest such record), so that the partition's start
      offset just moves up.
"""

from __future__ import annotations

import base64
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import orjson

from rtml.errors import RtmlError
from rtml.settings import Settings
from streaming.files import storage_dir
from streaming.sources.kafka import EventProducer, ensure_topics, events_topic
from streaming.sources.replay import partition_of

log = logging.getLogger(__name__)
# A writer deletes records beyond the retention at most this often (a delete scans the old records).
RETENTION_EVERY_S = 60.0
DATABASE_FILE = "events.db"


@dataclass(frozen=True)
class LogRecord:
    key: bytes  # b"tenant/entity" (streaming.sources.kafka.record_key): a series stays in one partition
    value: bytes  # the event as JSON, or a binary frame's raw bytes
    # A binary frame's: streaming.router.frame_headers (content-type and the rtml-event fields).
    headers: tuple[tuple[str, bytes], ...] = ()


class EventLogUnavailable(RtmlError):
    """The log did not take an append durably (or cannot say that it did); the message says what
    failed and what to do. Retrying later may succeed."""


class EventLogWriter(Protocol):
    def append(self, tenant: str, records: Sequence[LogRecord]) -> None:
        """Return only once every record is durable in the log; raise ``EventLogUnavailable`` if
        they may not be."""

    def close(self) -> None:
        """Release the connection; later appends are refused."""


def open_event_log_writer(settings: Settings) -> EventLogWriter:
    """Kafka's writer when ``streaming.source == "kafka"``, otherwise the embedded log's."""
    if settings.streaming.source == "kafka":
        return KafkaLogWriter(settings)
    return EmbeddedLogWriter(settings)


class KafkaLogWriter:
    """Appends to the tenant's events topic (module docstring). Connects on the first append, so
    that a broker that is away makes appends fail with what to do instead of failing the caller's
    start-up."""

    def __init__(self, settings: Settings):
        self._kafka = settings.kafka
        self._timeout_s = settings.streaming.event_log_timeout_s
        self._lock = threading.Lock()
        self._producer: EventProducer | None = None
        self._topics: set[str] = set()
        self._closed = False

    def append(self, tenant: str, records: Sequence[LogRecord]) -> None:
        from kafka.errors import KafkaError

        if not records:
            return
        topic = events_topic(self._kafka, tenant)
        deadline = time.monotonic() + self._timeout_s
        try:
            producer = self._ready(topic, deadline)
            sent = [producer.send_record(topic, record.key, record.value, record.headers) for record in records]
            for delivery in sent:
                delivery.get(timeout=max(0.0, deadline - time.monotonic()))
        except KafkaError as error:
            raise EventLogUnavailable(
                f"the event log (Kafka at {self._kafka.bootstrap_servers}, topic {topic}) did not acknowledge "
                f"{len(records)} record(s) within {self._timeout_s:g} s (streaming.event_log_timeout_s): "
                f"{type(error).__name__}: {error}. Retry later; if it persists, check that the broker runs "
                "(`rtml services status`) and that RTML_KAFKA__BOOTSTRAP_SERVERS points at it"
            ) from error

    def _ready(self, topic: str, deadline: float) -> EventProducer:
        """The producer, and ``topic`` created if missing (once per topic and writer), or
        kafka-python's error when the broker does not answer by ``deadline`` (monotonic)."""
        from kafka.errors import KafkaTimeoutError

        # Bounded too: appends that wait here for another's connecting still end by their deadline.
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise KafkaTimeoutError("another append is still connecting to the broker")
        try:
            if self._closed:
                raise EventLogUnavailable("this event log writer is closed; open a new one (open_event_log_writer)")
            if self._producer is None:
                timeout_ms = int(self._timeout_s * 1000)
                # Every wait inside the producer (reaching the broker, metadata, buffer space, a
                # request, the retries of a delivery) ends within the append's timeout: no append hangs.
                self._producer = EventProducer(
                    self._kafka,
                    bootstrap_timeout_ms=timeout_ms,
                    max_block_ms=timeout_ms,
                    request_timeout_ms=timeout_ms,
                    delivery_timeout_ms=timeout_ms + 5,
                )
            if topic not in self._topics:
                ensure_topics(self._kafka, [topic], timeout_s=max(0.1, deadline - time.monotonic()))
                self._topics.add(topic)
            return self._producer
        finally:
            self._lock.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._producer is not None:
                self._producer.close()
                self._producer = None


SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS partitions (partition INTEGER PRIMARY KEY, next_offset INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS records (
        partition INTEGER NOT NULL, offset INTEGER NOT NULL, key BLOB NOT NULL, value BLOB NOT NULL,
        headers BLOB, appended_at REAL NOT NULL, PRIMARY KEY (partition, offset)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS records_by_age ON records (appended_at)",
    """CREATE TABLE IF NOT EXISTS group_offsets (
        consumer_group TEXT NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL,
        PRIMARY KEY (consumer_group, partition)
    ) WITHOUT ROWID""",
)


def log_file(settings: Settings) -> Path:
    """The embedded log's SQLite file."""
    return Path(storage_dir(settings.streaming.event_log_dir, settings, "event-log")).expanduser().resolve() / DATABASE_FILE


def connect(settings: Settings) -> sqlite3.Connection:
    """A connection to the embedded log (created on first use, by whichever process comes first),
    after checking that it has ``streaming.event_log_partitions`` partitions. Transactions are the
    caller's (``isolation_level=None``); waits for a lock end after ``event_log_timeout_s``."""
    path = log_file(settings)
    wanted = settings.streaming.event_log_partitions
    db: sqlite3.Connection | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=settings.streaming.event_log_timeout_s, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("BEGIN IMMEDIATE")
        for statement in SCHEMA:
            db.execute(statement)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('partitions', ?)", (wanted,))
        (partitions,) = db.execute("SELECT value FROM meta WHERE name = 'partitions'").fetchone()
        db.executemany("INSERT OR IGNORE INTO partitions VALUES (?, 0)", [(p,) for p in range(partitions)])
        db.execute("COMMIT")
    except (sqlite3.Error, OSError) as error:
        if db is not None:
            db.close()
        raise EventLogUnavailable(
            f"cannot open the embedded event log {path} ({type(error).__name__}: {error}); check that the directory "
            "(streaming.event_log_dir) is on a local disk that this process may write, and has room"
        ) from error
    if partitions != wanted:
        db.close()
        raise RtmlError(
            f"the embedded event log {path} has {partitions} partitions, but streaming.event_log_partitions is {wanted}: "
            f"set it back to {partitions} (a log's partitions are fixed when it is created, so that a series stays in one), "
            "or point streaming.event_log_dir at a new directory"
        )
    return db


def encode_headers(headers: Sequence[tuple[str, bytes]]) -> bytes | None:
    return orjson.dumps([[name, base64.b64encode(value).decode()] for name, value in headers]) if headers else None


def decode_headers(stored: bytes | None) -> dict[str, bytes] | None:
    """A record's headers as ``SourceBatch.headers`` holds them (as KafkaSource gives them)."""
    return {name: base64.b64decode(value) for name, value in orjson.loads(stored)} if stored else None


class EmbeddedLogWriter:
    """Appends to the embedded SQLite log (module docstring). One connection per writer, used by
    one thread at a time; the transaction's write lock orders appends across processes."""

    def __init__(self, settings: Settings):
        self._db = connect(settings)
        self._path = log_file(settings)
        self._partitions = settings.streaming.event_log_partitions
        self._timeout_s = settings.streaming.event_log_timeout_s
        self._retention_s = settings.streaming.event_log_retention_hours * 3600.0
        self._lock = threading.Lock()
        self._retention_applied = 0.0
        self._closed = False

    def append(self, tenant: str, records: Sequence[LogRecord]) -> None:
        """``tenant`` is implied by the keys here (one log for every tenant)."""
        if not records:
            return
        by_partition: dict[int, list[LogRecord]] = {}
        for record in records:
            by_partition.setdefault(partition_of(record.key.decode(), self._partitions), []).append(record)
        with self._lock:
            if self._closed:
                raise EventLogUnavailable("this event log writer is closed; open a new one (open_event_log_writer)")
            self._in_transaction(len(records), lambda: self._insert(by_partition))
            if time.monotonic() - self._retention_applied >= RETENTION_EVERY_S:
                self._retention_applied = time.monotonic()
                try:
                    self._in_transaction(0, self._apply_retention)
                except EventLogUnavailable as error:  # the append is durable; the next writer's turn deletes them
                    log.warning("the embedded event log could not delete records beyond its retention: %s", error)

    def _insert(self, by_partition: dict[int, list[LogRecord]]) -> None:
        appended_at = time.time()  # under the write lock: never earlier than a record before it
        for partition, group in by_partition.items():
            (start,) = self._db.execute("SELECT next_offset FROM partitions WHERE partition = ?", (partition,)).fetchone()
            self._db.executemany(
                "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?)",
                [(partition, start + i, r.key, r.value, encode_headers(r.headers), appended_at) for i, r in enumerate(group)],
            )
            self._db.execute("UPDATE partitions SET next_offset = ? WHERE partition = ?", (start + len(group), partition))

    def _apply_retention(self) -> None:
        cutoff = time.time() - self._retention_s
        for partition in range(self._partitions):
            self._db.execute(
                "DELETE FROM records WHERE partition = ?1 AND offset <= "
                "(SELECT MAX(offset) FROM records WHERE partition = ?1 AND appended_at < ?2)",
                (partition, cutoff),
            )

    def _in_transaction(self, count: int, work: Callable[[], None]) -> None:
        """Run ``work`` in one write transaction (``BEGIN IMMEDIATE``), all or nothing."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                work()
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite has rolled back itself after some errors
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as error:
            locked = "locked" in str(error) or "busy" in str(error)
            why = (
                f"other writers held its write lock for longer than {self._timeout_s:g} s (streaming.event_log_timeout_s)"
                if locked
                else f"{type(error).__name__}: {error}"
            )
            raise EventLogUnavailable(
                f"the embedded event log {self._path} did not take {count} record(s): {why}. Nothing of this append is "
                "stored; retry later" + ("" if locked else ", and check the disk of streaming.event_log_dir (room, permissions)")
            ) from error
        except sqlite3.Error as error:
            raise EventLogUnavailable(
                f"the embedded event log {self._path} did not take {count} record(s) ({type(error).__name__}: {error}); "
                "nothing of this append is stored: check the disk of streaming.event_log_dir, then retry"
            ) from error

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()
