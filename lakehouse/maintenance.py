"""Table upkeep: compaction of small files and expiry of old snapshots.

Streaming writers commit every second or every few thousand rows, so a busy partition collects
many small Parquet files, which slows every scan. Compaction rewrites each partition that holds
``compaction_min_files`` or more small files as one overwrite of that partition (one commit, rows
sorted by time so that range scans prune well). It re-reads the partition in the same unit of
work that commits, so a concurrent append to the partition makes the commit fail and the unit run
again instead of being overwritten (``lakehouse.commits``).

Expiry removes the snapshots the retention lets go (``lakehouse.snapshots.Retention``: all older
than ``snapshot_retention_hours``, and younger ones thinned) and the files only they referenced; the
current snapshot and tagged ones are always kept. Long-lived writers apply the same retention as
they go (``Lakehouse.writer``), so that a stream's tables do not pile up snapshots between runs of
this.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import And, BooleanExpression, EqualTo, GreaterThanOrEqual, LessThan
from pyiceberg.table import Table

from lakehouse.commits import files_may_vanish, retry_on_conflict
from lakehouse.tables import TABLES, TableDef, time_literal

if TYPE_CHECKING:
    from lakehouse.api import Lakehouse


@dataclass
class MaintenanceReport:
    table: str
    data_files_before: int
    data_files_after: int
    partitions_compacted: int
    snapshots_expired: int
    files_deleted: int


def maintain(lakehouse: Lakehouse, retention_hours: float | None = None) -> list[MaintenanceReport]:
    settings = lakehouse.settings
    reports = []
    for table in TABLES.values():

        def load(name: str = table.name) -> Table:
            return lakehouse.table(name)

        before = _data_file_count(load())
        compacted = compact(load, table, settings.compaction_min_files, settings.compaction_small_file_bytes, settings.commit_retries)
        expiry = lakehouse.expire_snapshots(table.name, retention_hours)  # after compaction, so it can expire what that replaced
        reports.append(
            MaintenanceReport(
                table.name, before, _data_file_count(load()), compacted, len(expiry.expired_snapshot_ids), expiry.deleted_files
            )
        )
    return reports


def compact(load: Callable[[], Table], table: TableDef, min_files: int, small_file_bytes: int, attempts: int) -> int:
    """Rewrite every partition with at least ``min_files`` small files; return how many."""
    current = load()
    if current.current_snapshot() is None:
        return 0
    small = small_files(current, small_file_bytes)
    per_partition = Counter(tuple(sorted(partition.items())) for partition in small["partition"].to_pylist())
    crowded = [dict(partition) for partition, count in per_partition.items() if count >= min_files]
    for partition in crowded:
        condition = _partition_filter(table, partition)

        def rewrite(condition: BooleanExpression = condition) -> None:
            current = load()
            with files_may_vanish(load, current):  # an erasure expiring the snapshot it read
                rows = current.scan(row_filter=condition).to_arrow().sort_by(table.time_column)
                current.overwrite(rows, overwrite_filter=condition, snapshot_properties={"rtml.compaction": "true"})

        retry_on_conflict(table.name, attempts, rewrite)
    return len(crowded)


def small_files(current: Table, small_file_bytes: int) -> pa.Table:
    """The files of ``current``'s snapshot smaller than ``small_file_bytes``, one row each
    (pyiceberg's ``inspect.files()`` listing, read from the manifests: no data file is opened)."""
    listing = current.inspect.files()
    return listing.filter(pc.less(listing["file_size_in_bytes"], small_file_bytes))


def _partition_filter(table: TableDef, partition: dict) -> BooleanExpression:
    day: date = partition[f"{table.time_column}_day"]
    start = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
    condition: BooleanExpression = And(
        GreaterThanOrEqual(table.time_column, time_literal(start)),
        LessThan(table.time_column, time_literal(start + timedelta(days=1))),
    )
    return And(EqualTo("tenant", partition["tenant"]), condition) if table.partition_by_tenant else condition


def _data_file_count(table: Table) -> int:
    return 0 if table.current_snapshot() is None else table.inspect.files().num_rows
