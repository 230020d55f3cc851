"""Idempotent batch appends, and the background batching writer that serving and streaming use.

Idempotency by key
------------------
``append_idempotent`` writes a batch so that every key (an event id, a feature id, ...) ends up in
the table exactly once, however often the batch is written: a consumer that crashed after the
write but before committing its Kafka offsets replays the batch, and the replay adds nothing.

One append is one unit of work:

1. load the table's current metadata (snapshot ``S``);
2. read which of the batch's keys ``S`` already holds (only the key column, only in the batch's
   tenant/day partitions and time range, so the scan prunes to the files that can hold them;
   the keys themselves are matched in Arrow);
3. append the rest as one new snapshot whose parent must be ``S``.

Several writers at once (Ray actors, Serve replicas, processes on other nodes)
---------------------------------------------------------------------------------
Iceberg commits are optimistic: step 3 only succeeds if the table still is at ``S`` when the
catalog swaps its metadata pointer (an atomic compare-and-swap in the catalog database or REST
server). Two writers racing with overlapping keys therefore cannot both win: the loser gets
``CommitFailedException`` and re-runs the *whole* unit (``lakehouse.commits``), so its step 2 now
sees the winner's snapshot and drops the keys the winner wrote. The tables set
``commit.retry.num-retries = 0`` because pyiceberg's own retry would re-apply the stale step 3
without re-checking the keys and so let duplicates in. A writer whose commit outcome is unknown
(a connection lost mid-commit) is safe for the same reason: its retry re-reads the keys and finds
its own rows if the commit did land. Writers with disjoint keys only pay the retry, never lose rows.
Under heavy contention on one table, fewer and larger batches (``writer_batch_rows``) keep the
conflict rate down; ``commit_retries`` bounds how long a writer keeps trying before it reports an
error instead of silently dropping data.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import And, BooleanExpression, GreaterThanOrEqual, In, LessThanOrEqual
from pyiceberg.table import Table

from lakehouse.commits import retry_on_conflict, transaction
from lakehouse.errors import LakehouseError
from lakehouse.tables import TableDef, time_literal

log = logging.getLogger(__name__)


def append_idempotent(load: Callable[[], Table], table: TableDef, rows: pa.Table, key: str, attempts: int) -> int:
    """Append the rows whose ``key`` the table does not hold yet; return how many were new.

    ``rows`` must already have the table's schema (``lakehouse.tables.to_arrow``). Within the batch
    the first row of each key wins."""
    if key not in rows.column_names:
        raise LakehouseError(f"{table.name}: key column {key!r} is not one of its columns")
    if rows[key].null_count:
        raise LakehouseError(f"{table.name}: {rows[key].null_count} row(s) have no {key!r}, the idempotency key")
    rows = first_row_per_key(rows, key)
    if rows.num_rows == 0:
        return 0

    def unit() -> int:
        current = load()
        held = existing_keys(current, table, rows, key)
        fresh = rows.filter(pc.invert(pc.is_in(rows[key], value_set=held))) if len(held) else rows
        if fresh.num_rows:
            with transaction(current) as appending:
                appending.append(fresh)
        return fresh.num_rows

    return retry_on_conflict(table.name, attempts, unit)


def first_row_per_key(rows: pa.Table, key: str) -> pa.Table:
    if pc.count_distinct(rows[key]).as_py() == rows.num_rows:
        return rows
    positions = pa.array(range(rows.num_rows), type=pa.int64())
    first = rows.append_column("__position", positions).group_by(key, use_threads=False).aggregate(
        [("__position", "min")]
    )
    keep = first["__position_min"]
    return rows.take(keep.take(pc.sort_indices(keep)))


def existing_keys(current: Table, table: TableDef, rows: pa.Table, key: str) -> pa.Array:
    """The batch's keys that the table's current snapshot already holds."""
    if current.current_snapshot() is None:
        return pa.array([], type=rows.schema.field(key).type)
    scanned = current.scan(row_filter=_where_keys_can_be(table, rows), selected_fields=(key,)).to_arrow()[key]
    # Matching keys in Arrow rather than in the scan's predicate: pyiceberg binds an
    # ``In(key, {...})`` literal by literal in Python (tens of microseconds per key), while the key
    # column's file statistics of random ids would prune nothing anyway.
    return pc.unique(scanned.filter(pc.is_in(scanned, value_set=rows[key].combine_chunks())))


def _where_keys_can_be(table: TableDef, rows: pa.Table) -> BooleanExpression:
    # A key always travels with the same tenant and time, so narrowing to the batch's tenants and
    # time range is exact and lets the scan skip every other partition and file.
    time_range = pc.min_max(rows[table.time_column])
    condition: BooleanExpression = And(
        GreaterThanOrEqual(table.time_column, time_literal(time_range["min"].as_py())),
        LessThanOrEqual(table.time_column, time_literal(time_range["max"].as_py())),
    )
    if "tenant" in rows.column_names:
        condition = And(condition, In("tenant", set(pc.unique(rows["tenant"]).to_pylist())))
    return condition


_STOP = object()


class BatchingWriter:
    """Buffers rows for one table and appends them idempotently from a background thread, so that
    the caller's request or stream path never waits for a commit.

    ``submit(rows)`` converts and checks the rows at once (bad rows raise there, in the caller, and
    nothing else is affected) and returns a ``Future`` that completes when those rows are durable
    in the lakehouse, or fails with the write's error. Stream consumers commit their offsets only
    after that future (or ``flush()``) has completed. A buffer is written when it holds
    ``batch_rows`` rows or its oldest rows are ``flush_seconds`` old, whichever comes first.
    ``after_write`` (table upkeep) runs in the writer's thread once a write's futures are resolved,
    so nobody waits for it.
    """

    def __init__(
        self,
        name: str,
        convert: Callable[[object], pa.Table],
        write: Callable[[pa.Table], int],
        batch_rows: int,
        flush_seconds: float,
        after_write: Callable[[], None] | None = None,
    ):
        self.name = name
        self._convert = convert
        self._write = write
        self._after_write = after_write
        self._batch_rows = max(1, batch_rows)
        self._flush_seconds = max(0.0, flush_seconds)
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._failure_since_flush: BaseException | None = None
        self.rows_written = 0
        self._thread = threading.Thread(target=self._run, name=f"lakehouse-writer-{name}", daemon=True)
        self._thread.start()

    def submit(self, rows: object) -> Future:
        if self._closed:
            raise LakehouseError(f"the {self.name} writer is closed")
        batch = self._convert(rows)
        done: Future = Future()
        if batch.num_rows == 0:
            done.set_result(None)
            return done
        self._queue.put((batch, done))
        return done

    def flush(self, timeout: float | None = None) -> None:
        """Write everything submitted so far; raise the first write error since the last flush."""
        marker: Future = Future()
        self._queue.put((None, marker))
        marker.result(timeout)

    def close(self, timeout: float | None = None) -> None:
        if self._closed:
            return
        try:
            self.flush(timeout)
        finally:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def __enter__(self) -> BatchingWriter:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _run(self) -> None:
        pending: list[tuple[pa.Table, Future]] = []
        buffered = 0
        deadline = 0.0
        while True:
            wait = max(0.0, deadline - time.monotonic()) if pending else None
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = (None, None)  # the oldest rows are due
            if item is _STOP:
                self._write_pending(pending)
                return
            batch, future = item
            if batch is not None:
                if not pending:
                    deadline = time.monotonic() + self._flush_seconds
                pending.append((batch, future))
                buffered += batch.num_rows
                if buffered < self._batch_rows:
                    continue
            self._write_pending(pending)
            pending, buffered = [], 0
            if future is not None and batch is None:  # a flush marker
                failure, self._failure_since_flush = self._failure_since_flush, None
                if failure is None:
                    future.set_result(None)
                else:
                    future.set_exception(failure)

    def _write_pending(self, pending: list[tuple[pa.Table, Future]]) -> None:
        if not pending:
            return
        try:
            self.rows_written += self._write(pa.concat_tables([batch for batch, _ in pending]))
        except BaseException as error:  # every waiter must hear about it; the thread keeps serving
            log.exception("lakehouse writer %s: a batch of %d submission(s) failed", self.name, len(pending))
            self._failure_since_flush = self._failure_since_flush or error
            for _, future in pending:
                future.set_exception(error)
            return
        for _, future in pending:
            future.set_result(None)
        if self._after_write is not None:
            try:
                self._after_write()
            except Exception:  # upkeep only: the rows are durable, the next write tries again
                log.exception("lakehouse writer %s: the upkeep after a write failed", self.name)
