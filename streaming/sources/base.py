"""The interface every event source implements, and the batch it hands over.

A source owns a fixed list of partitions (``partitions``: stable names such as ``"rtml.events:3"``);
in batches a partition is referred to by its position in that list. Positions are "the next offset
to read", as in Kafka.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass
class SourceBatch:
    """Raw records in arrival order. A payload is JSON text (bytes), an already decoded mapping
    (file replay), or a binary frame whose event fields travel in ``headers``."""

    payloads: list[object]
    partitions: np.ndarray  # int32 position in Source.partitions
    offsets: np.ndarray  # int64
    # Wall-clock seconds at which each record became available (producer timestamp / replay schedule);
    # event-to-prediction latency is measured from here.
    available_at: np.ndarray  # float64
    headers: list[Mapping[str, bytes] | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.payloads)

    def next_positions(self) -> dict[int, int]:
        """Per partition, the offset after the last record in this batch."""
        if len(self.offsets) == 0:
            return {}
        order = np.lexsort((self.offsets, self.partitions))
        partitions, offsets = self.partitions[order], self.offsets[order]
        last = np.append(partitions[1:] != partitions[:-1], True)
        return {int(p): int(o) + 1 for p, o in zip(partitions[last], offsets[last])}

    @staticmethod
    def empty() -> SourceBatch:
        return SourceBatch([], np.empty(0, np.int32), np.empty(0, np.int64), np.empty(0, np.float64))


class Source(ABC):
    """One consumer's view of an event log: its partitions, read from chosen positions."""

    partitions: list[str]
    # Whether the log has an end (a replay file): a consumer that reads it to its end has seen the
    # whole stream and closes its open windows. A live log (Kafka) only has a current end.
    finite: bool = False

    @abstractmethod
    def seek(self, positions: Mapping[int, int]) -> None:
        """Continue each named partition at the given offset, and start every other one at the
        log's beginning."""

    @abstractmethod
    def poll(self, max_records: int, timeout_s: float) -> SourceBatch:
        """The next records (at most ``max_records``), waiting up to ``timeout_s`` for the first."""

    @abstractmethod
    def end_offsets(self) -> dict[int, int]:
        """Per partition, the offset the next appended record will get (for lag and for "done")."""

    def start_clock(self, at: float) -> None:
        """Replays: start the replay clock at wall-clock time ``at``. A live log has no clock."""

    def commit(self, positions: Mapping[int, int]) -> None:
        """Publish the consumer's progress to the log (Kafka consumer-group offsets); the
        checkpoint store stays the record a restarted consumer resumes from."""

    def committed(self) -> dict[int, int]:
        """Positions the log itself holds for this consumer, where it keeps any."""
        return {}

    def start_offsets(self) -> dict[int, int]:
        """Per partition, the oldest offset the log still holds: 0 unless retention has deleted
        the records before it."""
        return {i: 0 for i in range(len(self.partitions))}

    def close(self) -> None:
        """Release connections and files."""
