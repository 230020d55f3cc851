"""Snapshot replication of every table to a second catalog and warehouse, the basis for disaster
recovery: the replica holds its own copies of the data files, so losing the primary warehouse or
catalog loses nothing that was replicated.

Each replica snapshot records the primary snapshot it copies (snapshot property
``rtml.replicated-from``). The next run copies only the rows appended since then when the primary
has seen nothing but appends in between; after anything else (an erasure, a compaction, expiry
of that snapshot) it replaces the replica's contents with the primary's current snapshot. A full
copy also expires the replica's older snapshots and deletes their files, so the replica keeps no
history that the primary has erased. Either way one replication run is one commit on the
replica, so a reader of the replica sees a whole primary snapshot or the previous one. Rows are
streamed in bounded chunks so a large table is not held in memory at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
from pyiceberg.expressions import AlwaysTrue
from pyiceberg.table import Table

from lakehouse.blobs import relocate_blobs
from lakehouse.commits import retry_on_conflict
from lakehouse.snapshots import expire, only_appends_since
from lakehouse.tables import EVENTS, TABLES

if TYPE_CHECKING:
    from lakehouse.api import Lakehouse

REPLICATED_FROM = "rtml.replicated-from"
CHUNK_ROWS = 200_000


@dataclass
class ReplicationReport:
    table: str
    source_snapshot_id: int | None
    mode: str  # "unchanged" | "incremental" | "full"
    rows_copied: int


def replicate(source: Lakehouse, target: Lakehouse) -> list[ReplicationReport]:
    return [_replicate_table(source, target, name) for name in TABLES]


def _replicate_table(source: Lakehouse, target: Lakehouse, name: str) -> ReplicationReport:
    primary = source.table(name)
    snapshot = primary.current_snapshot()
    if snapshot is None:
        return ReplicationReport(name, None, "unchanged", 0)

    def copy() -> ReplicationReport:
        replica = target.table(name)
        _align_schema(primary, replica)
        copied_from = _replicated_from(replica)
        if copied_from == snapshot.snapshot_id:
            return ReplicationReport(name, snapshot.snapshot_id, "unchanged", 0)
        properties = {REPLICATED_FROM: str(snapshot.snapshot_id)}
        transaction = replica.transaction()
        if copied_from is not None and only_appends_since(primary, copied_from):
            mode = "incremental"
            reader = primary.incremental_append_scan(
                from_snapshot_id_exclusive=copied_from, to_snapshot_id_inclusive=snapshot.snapshot_id
            ).to_arrow_batch_reader()
        else:
            mode = "full"
            reader = primary.scan(snapshot_id=snapshot.snapshot_id).to_arrow_batch_reader()
            if replica.current_snapshot() is not None:
                transaction.delete(AlwaysTrue(), snapshot_properties=properties)
        copied = 0
        for chunk in _chunks(reader):
            if name == EVENTS.name:
                chunk = relocate_blobs(chunk, source.io, target.io, primary.location(), replica.location())
            transaction.append(chunk, snapshot_properties=properties)
            copied += chunk.num_rows
        if copied == 0:
            # Nothing to copy (e.g. the primary was emptied): still record how far the replica is.
            transaction.append(replica.schema().as_arrow().empty_table(), snapshot_properties=properties)
        transaction.commit_transaction()
        return ReplicationReport(name, snapshot.snapshot_id, mode, copied)

    report = retry_on_conflict(name, target.settings.commit_retries, copy)
    if report.mode == "full":
        # The replica mirrors the primary's current state; its own older snapshots would only keep
        # rows the primary has since removed (an erased subject among them).
        expire(
            lambda: target.table(name),
            name,
            lambda replica: [s.snapshot_id for s in replica.snapshots()],
            target.settings.commit_retries,
        )
    return report


def _replicated_from(replica: Table) -> int | None:
    current = replica.current_snapshot()
    if current is None or current.summary is None:
        return None
    value = current.summary.additional_properties.get(REPLICATED_FROM)
    return int(value) if value else None


def _align_schema(primary: Table, replica: Table) -> None:
    if primary.schema().as_struct() != replica.schema().as_struct():
        with replica.update_schema() as update:
            update.union_by_name(primary.schema())


def _chunks(reader: pa.RecordBatchReader) -> Iterator[pa.Table]:
    batches, rows = [], 0
    for batch in reader:
        batches.append(batch)
        rows += batch.num_rows
        if rows >= CHUNK_ROWS:
            yield pa.Table.from_batches(batches)
            batches, rows = [], 0
    if batches:
        yield pa.Table.from_batches(batches)
