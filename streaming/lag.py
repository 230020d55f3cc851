"""Consumer lag as the log sees it, exported by the pipeline's owner rather than by the consumers:
a consumer that is dead or hung exports nothing, so its lag must be read from outside it (as
Kafka's own lag exporters read a group's committed offsets from the brokers).

Per partition of the group: ``rtml_consumer_lag_events`` (log end minus committed offset),
``rtml_consumer_committed_offset``, and ``rtml_consumer_last_progress_timestamp_seconds`` (when the
committed offset last moved, or was last seen caught up), from which the alert rules tell a
stalled consumer from a busy one (observability/rules).

Logs that keep committed offsets (Kafka, the embedded event log) are read directly; a replay file
keeps none, so its lag comes from what the consumers report (their checkpointed positions).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from observability import metrics
from rtml.settings import Settings

log = logging.getLogger(__name__)

# (committed or checkpointed offset, log end) per partition name
Positions = Mapping[str, tuple[int, int]]


class LagExporter:
    """Turns successive (committed, end) readings into the lag metrics of one consumer group."""

    def __init__(self, group: str, clock: Callable[[], float] = time.time):
        self.group = group
        self._clock = clock
        self._last: dict[str, int] = {}

    def export(self, positions: Positions) -> None:
        now = self._clock()
        for partition, (committed, end) in positions.items():
            labels = {"group": self.group, "partition": partition}
            lag = max(0, end - committed)
            metrics.CONSUMER_LAG.labels(**labels).set(lag)
            metrics.CONSUMER_COMMITTED.labels(**labels).set(committed)
            if self._last.get(partition) != committed or lag == 0:
                metrics.CONSUMER_PROGRESS_AT.labels(**labels).set(now)
            self._last[partition] = committed


class LogPositions:
    """Reads a group's committed offsets and the log's ends from the log itself, over every partition."""

    def __init__(self, settings: Settings, group: str):
        from streaming.consumer import ConsumerSpec, open_source

        self._source = open_source(ConsumerSpec(settings, group, 0, 1))

    def read(self) -> dict[str, tuple[int, int]]:
        ends, committed = self._source.end_offsets(), self._source.committed()
        names = self._source.partitions
        return {names[i]: (committed.get(i, 0), end) for i, end in ends.items()}

    def close(self) -> None:
        self._source.close()


class LagMonitor:
    """A thread that exports a group's lag every ``observability.lag_refresh_s`` until ``stop``.
    ``reported`` gives the consumers' own view, used where the log keeps no committed offsets."""

    def __init__(self, settings: Settings, group: str, reported: Callable[[], Positions]):
        self._every_s = settings.observability.lag_refresh_s
        self._exporter = LagExporter(group)
        self._reported = reported
        self._settings, self._group = settings, group
        self._reads_log = settings.streaming.source in ("kafka", "log")
        self._log: LogPositions | None = None  # opened on first use: the log may not exist yet
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lag-{group}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def refresh(self) -> None:
        """Export the current lag now."""
        if self._reads_log and self._log is None:
            self._log = LogPositions(self._settings, self._group)
        positions = self._log.read() if self._log is not None else self._reported()
        self._exporter.export(positions)

    def stop(self) -> None:
        """Export once more (the final state), then stop the thread."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        try:
            self.refresh()
        except Exception as error:  # a log that went away keeps its last values
            log.info("lag of %s not refreshed at stop: %s", self._exporter.group, error)
        if self._log is not None:
            self._log.close()

    def _run(self) -> None:
        while not self._stopped.wait(self._every_s):
            try:
                self.refresh()
            except Exception as error:  # the broker is away: the gauges keep their last values
                log.info("cannot read the log's offsets for the lag of %s: %s", self._exporter.group, error)
