"""The embedded event log: a CSV or JSONL file replayed as a partitioned stream, paced by event time.

The file is split into ``partitions`` by the hash of each record's series key (``tenant/entity``),
so a series always lands in one partition, in file order; a record's offset is its position within
its partition. Every consumer reads the file and keeps the partitions it owns.

Pacing: a record becomes available when the replay clock reaches the largest event time seen in
the file up to it (a late record is replayed where it sits in the file, as a late arrival). The
replay clock runs ``speed`` times faster than real time from ``start_clock(at)`` (wall-clock
seconds, the same for all consumers of a replay and kept across restarts, so that a restarted
consumer catches up instead of starting over); ``speed = 0`` replays as fast as the consumer reads.
"""

from __future__ import annotations

import csv
import time
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import orjson

from rtml.errors import RtmlError
from rtml.schemas import NO_TIME, event_times_us
from streaming.sources.base import Source, SourceBatch


def partition_of(key: str, partitions: int) -> int:
    """The replay partition of a series key (stable across processes and runs)."""
    return zlib.crc32(key.encode()) % partitions


def read_records(path: Path) -> list[object]:
    """The file's records: mappings (CSV rows, JSON objects) or, for a JSONL line that is not
    JSON, its raw bytes (the router turns those into dead letters)."""
    if not path.is_file():
        raise RtmlError(f"replay file {path} does not exist")
    if path.suffix == ".csv":
        with path.open(newline="") as handle:
            # An empty CSV cell means "not given", as a missing JSON field does; CSV has no
            # numbers, so the value column is read as one where it is one.
            return [{k: _csv_cell(k, v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]
    if path.suffix in (".jsonl", ".ndjson"):
        records: list[object] = []
        for line in path.read_bytes().splitlines():
            if line.strip():
                try:
                    records.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    records.append(line)
        return records
    raise RtmlError(f"replay file {path} is neither .csv nor .jsonl")


def _csv_cell(column: str, text: str) -> object:
    """A CSV cell as JSON would carry it: ``value`` as a number when it reads as one (otherwise the
    text, which validation refuses with its reason); every other column as text."""
    if column != "value":
        return text
    try:
        return float(text)
    except ValueError:
        return text


class ReplaySource(Source):
    finite = True  # the file's end is the stream's end

    def __init__(
        self,
        path: str | Path,
        partitions: int,
        owned: list[int],
        speed: float,
    ):
        self.path = Path(path)
        self.partitions = [f"{self.path.name}:{p}" for p in owned]
        self.speed = speed
        self.started_at = time.time()
        records = read_records(self.path)
        fields = [r if isinstance(r, Mapping) else {} for r in records]
        keys = [f"{f.get('tenant')}/{f.get('entity')}" for f in fields]
        partition = np.array([partition_of(key, partitions) for key in keys], dtype=np.int64)
        times = event_times_us([f.get("event_time") for f in fields])
        # Replay clock position of each record: the largest event time so far in the file.
        known = times != NO_TIME
        clock = np.maximum.accumulate(times) if len(times) else times
        self._first_time = int(clock[known.argmax()]) if known.any() else 0
        clock = np.where(clock == NO_TIME, self._first_time, clock)
        offset = np.zeros(len(records), np.int64)
        for p in np.unique(partition):
            mine = partition == p
            offset[mine] = np.arange(mine.sum())
        position_of = {p: i for i, p in enumerate(owned)}
        rows = np.flatnonzero(np.isin(partition, owned))
        self._records = [records[i] for i in rows]
        self._partition = np.array([position_of[int(p)] for p in partition[rows]], dtype=np.int32)
        self._offset = offset[rows]
        # Seconds after the clock's start at which each record is due.
        self._due_after = (clock[rows] - self._first_time) / 1e6 / speed if speed > 0 else np.zeros(len(rows))
        self._ends = {i: int((self._partition == i).sum()) for i in range(len(owned))}
        self._queue = np.arange(len(rows))
        self._cursor = 0

    def seek(self, positions: Mapping[int, int]) -> None:
        start = np.array([positions.get(i, 0) for i in range(len(self.partitions))], dtype=np.int64)
        self._queue = np.flatnonzero(self._offset >= start[self._partition])
        self._cursor = 0

    def start_clock(self, at: float) -> None:
        self.started_at = at

    def poll(self, max_records: int, timeout_s: float) -> SourceBatch:
        if self.remaining == 0:
            return SourceBatch.empty()
        now = time.time() - self.started_at
        next_due = self._due_after[self._queue[self._cursor]]
        if next_due > now:
            time.sleep(min(timeout_s, next_due - now))
            now = time.time() - self.started_at
        due = self._due_after[self._queue[self._cursor :]]
        ready = min(max_records, int(np.searchsorted(due, now, side="right")))
        rows = self._queue[self._cursor : self._cursor + ready]
        self._cursor += ready
        available = self.started_at + (self._due_after[rows] if self.speed > 0 else np.full(len(rows), now))
        return SourceBatch(
            payloads=[self._records[i] for i in rows],
            partitions=self._partition[rows],
            offsets=self._offset[rows],
            available_at=available,
        )

    def end_offsets(self) -> dict[int, int]:
        return dict(self._ends)

    @property
    def remaining(self) -> int:
        """Records not yet handed out."""
        return len(self._queue) - self._cursor
