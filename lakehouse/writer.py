"""Idempotent batch appends, and the background batching writer that serving and streaming use.

Idempotency by key
------------------
``append_idempotent`` writes a batch so that every key (``(tenant, event_id)``, ``(tenant,
feature_id)``, ...: ``TableDef.keys``) ends up in the table exactly once, however often the batch is
written: a consumer that crashed after the write but before committing its Kafka offsets replays
the batch, and the replay adds nothing. Keys are composite because tenants do not coordinate their
ids: two tenants' event ``42`` are two rows.

One append is one unit of work:

1. load the table's current metadata (snapshot ``S``);
2. read which of the batch's keys ``S`` already holds (only the key columns, only in the batch's
   tenant partitions and, unless ``keys_bound_by_time=False``, its time range, so the scan prunes
   to the files that can hold them; the keys themselves are matched in Arrow);
3. for a table with a ``subject`` column, read the erasure tombstones and drop the rows whose
   subject was erased in every tenant or in the row's tenant (``lakehouse.erasure``: it hashes
   only the batch's distinct subjects, and nothing while nothing has been erased);
4. append the rest as one new snapshot whose parent must be ``S``.

The time range narrows the key scan exactly when a key always comes with the same time, as a
replayed event does. A row whose time is given by its arrival (a serving prediction of an event
that came without an event time, stamped "now") gets another time on a retry; such rows are
written with ``keys_bound_by_time=False``, whose key scan reads the key columns of the batch's
tenants over all time: it costs a scan of every file of those tenants instead of a day's.

Several writers at once (Ray actors, Serve replicas, processes on other nodes)
---------------------------------------------------------------------------------
Iceberg commits are optimistic: step 4 only succeeds if the table still is at ``S`` when the
catalog swaps its metadata pointer (an atomic compare-and-swap in the catalog database or REST
server). Two writers racing with overlapping keys therefore cannot both win: the loser gets
``CommitFailedException`` and re-runs the *whole* unit (``lakehouse.commits``), so its step 2 now
sees the winner's snapshot and drops the keys the winner wrote. The tables set
``commit.retry.num-retries = 0`` because pyiceberg's own retry would re-apply the stale step 4
without re-checking the keys and so let duplicates in. A writer whose commit outcome is unknown
(a connection lost mid-commit) is safe for the same reason: its retry re-reads the keys and finds
its own rows if the commit did land. Writers with disjoint keys only pay the retry, never lose rows.
Under heavy contention on one table, fewer and larger batches (``writer_batch_rows``) keep the
conflict rate down; ``commit_retries`` bounds how long a writer keeps trying before it reports an
error instead of silently dropping data.

Appends racing with an erasure
------------------------------
An erasure commits its tombstone (of the subject, or of the subject in one tenant) first and only
then commits on each table (the delete of the rows it erases, or an empty commit where there were
none). Step 3 reads the tombstones after step 1 loaded ``S``. So an append that read the
tombstones before the tombstone's commit had loaded ``S`` before it too, hence before the
erasure's commit on this table: if it commits before that commit, its rows are there for the
delete (whose own commit conflicts and re-runs if it had read the table earlier); if after, the
table is no longer at ``S``, its commit conflicts (or it finds the files of ``S`` expired by the
erasure, which counts as the same lost race), and the re-run reads the tombstone and drops the
rows. Either way none of the rows it erases survive the erasure. A batch without a subject skips
step 3.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import AlwaysTrue, And, BooleanExpression, GreaterThanOrEqual, In, LessThanOrEqual
from pyiceberg.table import Table

from lakehouse.commits import files_may_vanish, retry_on_conflict, transaction
from lakehouse.errors import LakehouseError
from lakehouse.tables import SUBJECT, TableDef, conform, time_literal
from observability import metrics

log = logging.getLogger(__name__)

# Given a batch's ``tenant`` and ``subject`` columns, for each row whether it is erased (the
# tombstones read fresh on every call).
ErasedAmong = Callable[[pa.Table], pa.Array]


def append_idempotent(
    load: Callable[[], Table],
    table: TableDef,
    rows: pa.Table,
    keys: Sequence[str],
    attempts: int,
    *,
    keys_bound_by_time: bool = True,
    erased_among: ErasedAmong | None = None,
    on_withheld: Callable[[pa.Table], None] | None = None,
) -> int:
    """Append the rows whose ``keys`` the table does not hold yet and whose subject is not erased;
    return how many were appended.

    ``rows`` must already have the table's schema (``lakehouse.tables.to_arrow``). Within the batch
    the first row of each key wins. ``erased_among`` is step 3 of the module docstring (tables with
    a subject); the new rows it withheld are handed to ``on_withheld`` once the append is done (the
    events table deletes their payload blobs). Once done, a batch with rows counts its seconds
    (every attempt included) in ``rtml_lakehouse_append_seconds`` and the rows it appended in
    ``rtml_lakehouse_rows_total``."""
    keys = tuple(keys)
    unknown = [key for key in keys if key not in rows.column_names]
    if unknown or not keys:
        raise LakehouseError(f"{table.name}: key column(s) {unknown or '(none)'} are not among its columns {rows.column_names}")
    for key in keys:
        if rows[key].null_count:
            raise LakehouseError(f"{table.name}: {rows[key].null_count} row(s) have no {key!r}, part of the idempotency key")
    rows = first_row_per_key(rows, keys)
    if rows.num_rows == 0:
        return 0
    check_erasures = erased_among is not None and SUBJECT in rows.column_names and rows[SUBJECT].null_count < rows.num_rows

    def unit() -> tuple[int, pa.Table | None]:
        current = load()
        with files_may_vanish(load, current):  # an erasure expiring ``S`` meanwhile
            fresh = without_keys(rows, existing_keys(current, table, rows, keys, keys_bound_by_time), keys)
            withheld = None
            if check_erasures and fresh.num_rows:
                fresh, withheld = _split_erased(fresh, erased_among)
            if fresh.num_rows:
                with transaction(current) as appending:
                    appending.append(conform(fresh, current))
        return fresh.num_rows, withheld

    started = time.perf_counter()
    appended, withheld = retry_on_conflict(table.name, attempts, unit)
    metrics.LAKEHOUSE_APPEND.labels(table=table.name).observe(time.perf_counter() - started)
    metrics.LAKEHOUSE_ROWS.labels(table=table.name).inc(appended)
    if withheld is not None and withheld.num_rows and on_withheld is not None:
        on_withheld(withheld)
    return appended


def first_row_per_key(rows: pa.Table, keys: Sequence[str]) -> pa.Table:
    """The batch with only the first row of each key (the key being the columns ``keys``)."""
    keys = list(keys)
    first = _with_positions(rows, keys).group_by(keys, use_threads=False).aggregate([(_POSITION, "min")])
    if first.num_rows == rows.num_rows:
        return rows
    keep = first[f"{_POSITION}_min"]
    return rows.take(keep.take(pc.sort_indices(keep)))


def existing_keys(current: Table, table: TableDef, rows: pa.Table, keys: Sequence[str], keys_bound_by_time: bool = True) -> pa.Table:
    """The batch's keys (a table of the key columns) that the table's current snapshot already holds."""
    keys = list(keys)
    wanted = rows.select(keys)
    if current.current_snapshot() is None:
        return wanted.slice(0, 0)
    scanned = current.scan(row_filter=_where_keys_can_be(table, rows, keys, keys_bound_by_time), selected_fields=tuple(keys))
    # Matching keys in Arrow (a hash join on the key columns) rather than in the scan's predicate:
    # pyiceberg binds an ``In(key, {...})`` literal by literal in Python (tens of microseconds per
    # key), while the key columns' file statistics of random ids would prune nothing anyway.
    return scanned.to_arrow().select(keys).cast(wanted.schema).join(wanted, keys=keys, join_type="left semi", use_threads=False)


def without_keys(rows: pa.Table, held: pa.Table, keys: Sequence[str]) -> pa.Table:
    """``rows`` without those whose key is one of ``held``'s (a table of the key columns)."""
    if held.num_rows == 0:
        return rows
    keys = list(keys)
    positions = _with_positions(rows, keys).join(held, keys=keys, join_type="left semi", use_threads=False)[_POSITION]
    is_held = pc.is_in(pa.array(np.arange(rows.num_rows)), value_set=positions.combine_chunks())
    return rows.filter(pc.invert(is_held))


_POSITION = "__position"


def _with_positions(rows: pa.Table, keys: list[str]) -> pa.Table:
    return rows.select(keys).append_column(_POSITION, pa.array(np.arange(rows.num_rows)))


def _split_erased(rows: pa.Table, erased_among: ErasedAmong) -> tuple[pa.Table, pa.Table]:
    """(rows to keep, erased rows)."""
    of_erased = erased_among(rows.select(["tenant", SUBJECT]))
    if not pc.any(of_erased).as_py():
        return rows, rows.slice(0, 0)
    return rows.filter(pc.invert(of_erased)), rows.filter(of_erased)


def _where_keys_can_be(table: TableDef, rows: pa.Table, keys: list[str], keys_bound_by_time: bool) -> BooleanExpression:
    # Narrowing to the batch's tenants is exact when the tenant is part of the key; narrowing to
    # its time range is exact when a key always travels with the same time (``keys_bound_by_time``).
    # Together they let the scan skip every other partition and file.
    condition: BooleanExpression = AlwaysTrue()
    if keys_bound_by_time:
        time_range = pc.min_max(rows[table.time_column])
        condition = And(
            GreaterThanOrEqual(table.time_column, time_literal(time_range["min"].as_py())),
            LessThanOrEqual(table.time_column, time_literal(time_range["max"].as_py())),
        )
    if "tenant" in keys:
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
