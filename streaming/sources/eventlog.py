"""The embedded event log (``streaming.eventlog``) as a consumer's source: ``streaming.source = "log"``.

Consumer ``i`` of ``n`` owns the log's partitions ``i, i + n, ...`` (as with Kafka), named
``"eventlog:<partition>"``; a record's offset is its offset in the log. ``poll`` reads each owned
partition on from its position, and while nothing new has been committed it waits: it asks SQLite
whether any connection has committed since it last looked (``PRAGMA data_version``, no table read)
every ``POLL_INTERVAL_S``, which keeps an idle consumer's CPU low. Records come back as Kafka's do:
the value as the payload, ``appended_at`` as ``available_at``, a frame's headers as ``headers``.
The log is live (``finite = False``): it has a current end only.

The consumer group's positions (``commit``) are kept in the log's ``group_offsets`` table, so that
a consumer whose checkpoint of a partition was lost learns that its group had read it
(``streaming.consumer``); the checkpoints stay the record consumers resume from.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

import numpy as np

from rtml.settings import Settings
from streaming.eventlog import connect, decode_headers
from streaming.sources.base import Source, SourceBatch

POLL_INTERVAL_S = 0.005
PARTITION_PREFIX = "eventlog:"


def log_end_offsets(settings: Settings) -> dict[str, int]:
    """The current end offset of every partition of the embedded log, by partition name (for
    ``Pipeline.finish_at``, as ``streaming.sources.kafka.log_end_offsets`` for Kafka)."""
    db = connect(settings)
    try:
        return {f"{PARTITION_PREFIX}{p}": end for p, end in db.execute("SELECT partition, next_offset FROM partitions")}
    finally:
        db.close()


class EventLogSource(Source):
    finite = False

    def __init__(self, settings: Settings, group: str, consumer_index: int, consumers: int):
        self._db = connect(settings)
        self._lock = threading.Lock()  # the actor answers progress/stats from other threads
        self._group = group
        self._owned = list(range(consumer_index, settings.streaming.event_log_partitions, consumers))
        self.partitions = [f"{PARTITION_PREFIX}{p}" for p in self._owned]
        self._positions = self.start_offsets()
        self._seen_version: int | None = None  # data_version of the last poll that found nothing new
        self._first = 0  # the owned partition a poll reads first, turning, so that none starves

    def seek(self, positions: Mapping[int, int]) -> None:
        starts = self.start_offsets()
        self._positions = {i: positions.get(i, starts[i]) for i in range(len(self._owned))}
        self._seen_version = None

    def poll(self, max_records: int, timeout_s: float) -> SourceBatch:
        deadline = time.monotonic() + timeout_s
        while True:
            batch = self._read(max_records)
            if len(batch) or time.monotonic() >= deadline:
                return batch
            while self._version() == self._seen_version and time.monotonic() < deadline:
                time.sleep(POLL_INTERVAL_S)

    def _version(self) -> int:
        with self._lock:
            return self._db.execute("PRAGMA data_version").fetchone()[0]

    def _read(self, max_records: int) -> SourceBatch:
        """Up to ``max_records`` records after the positions, from one read transaction."""
        rows: list[tuple] = []
        with self._lock:
            self._db.execute("BEGIN")
            try:
                version = self._db.execute("PRAGMA data_version").fetchone()[0]
                count = len(self._owned)
                for step in range(count):
                    if len(rows) >= max_records:
                        break
                    i = (self._first + step) % count
                    found = self._db.execute(
                        "SELECT ?, offset, value, headers, appended_at FROM records WHERE partition = ? AND offset >= ? ORDER BY offset LIMIT ?",
                        (i, self._owned[i], self._positions[i], max_records - len(rows)),
                    ).fetchall()
                    rows.extend(found)
            finally:
                self._db.execute("COMMIT")
        self._first = (self._first + 1) % max(1, len(self._owned))
        if not rows:
            self._seen_version = version
            return SourceBatch.empty()
        partitions = np.fromiter((row[0] for row in rows), np.int32, len(rows))
        offsets = np.fromiter((row[1] for row in rows), np.int64, len(rows))
        for i, offset in zip(partitions.tolist(), offsets.tolist()):
            self._positions[i] = offset + 1
        return SourceBatch(
            payloads=[row[2] for row in rows],
            partitions=partitions,
            offsets=offsets,
            available_at=np.fromiter((row[4] for row in rows), np.float64, len(rows)),
            headers=[decode_headers(row[3]) for row in rows],
        )

    def end_offsets(self) -> dict[int, int]:
        with self._lock:
            ends = dict(self._db.execute("SELECT partition, next_offset FROM partitions").fetchall())
        return {i: ends[p] for i, p in enumerate(self._owned)}

    def start_offsets(self) -> dict[int, int]:
        """Per owned partition, its oldest record's offset (its end when retention emptied it)."""
        ends = self.end_offsets()
        with self._lock:
            firsts = {
                i: self._db.execute("SELECT MIN(offset) FROM records WHERE partition = ?", (p,)).fetchone()[0]
                for i, p in enumerate(self._owned)
            }
        return {i: ends[i] if first is None else first for i, first in firsts.items()}

    def commit(self, positions: Mapping[int, int]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO group_offsets VALUES (?, ?, ?)",
                    [(self._group, self._owned[i], offset) for i, offset in positions.items()],
                )
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def committed(self) -> dict[int, int]:
        with self._lock:
            held = dict(self._db.execute("SELECT partition, offset FROM group_offsets WHERE consumer_group = ?", (self._group,)).fetchall())
        return {i: held[p] for i, p in enumerate(self._owned) if p in held}

    def close(self) -> None:
        with self._lock:
            self._db.close()
