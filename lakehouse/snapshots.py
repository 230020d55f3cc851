"""Snapshot history: what changed since a snapshot, and expiring snapshots together with the files
that only they referenced.

pyiceberg's ``expire_snapshots`` removes snapshots from the table metadata but leaves their files
in storage. For retention that only wastes space; for erasure it would leave a subject's rows in
Parquet files that any reader of an old metadata file could still open. ``expire`` therefore also
deletes every manifest list, manifest and data file that no retained snapshot references any more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pyiceberg.manifest import ManifestFile
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Operation, Snapshot, ancestors_of

from lakehouse.commits import retry_on_conflict


@dataclass(frozen=True)
class SnapshotInfo:
    snapshot_id: int
    parent_id: int | None
    timestamp_ms: int
    operation: str
    summary: dict[str, str]


def history(table: Table) -> list[SnapshotInfo]:
    """Every retained snapshot, oldest first."""
    return [
        SnapshotInfo(
            snapshot_id=snapshot.snapshot_id,
            parent_id=snapshot.parent_snapshot_id,
            timestamp_ms=snapshot.timestamp_ms,
            operation=snapshot.summary.operation.value if snapshot.summary else "",
            summary=dict(snapshot.summary.additional_properties) if snapshot.summary else {},
        )
        for snapshot in sorted(table.snapshots(), key=lambda s: (s.timestamp_ms, s.sequence_number or 0))
    ]


def only_appends_since(table: Table, snapshot_id: int) -> bool:
    """Whether every commit after ``snapshot_id`` up to the current snapshot was a plain append, so
    that ``table.incremental_append_scan(from_snapshot_id_exclusive=snapshot_id)`` holds all that
    changed. False after a delete, an overwrite or a compaction, or when the snapshot has expired:
    the caller must then read the table in full."""
    for snapshot in ancestors_of(table.current_snapshot(), table.metadata):
        if snapshot.snapshot_id == snapshot_id:
            return True
        if snapshot.summary is None or snapshot.summary.operation != Operation.APPEND:
            return False
    return False


@dataclass(frozen=True)
class Expiry:
    expired_snapshot_ids: tuple[int, ...]
    deleted_files: int


def expire(load: Callable[[], Table], table_name: str, choose: Callable[[Table], Iterable[int]], attempts: int) -> Expiry:
    """Expire the snapshots that ``choose`` picks from the freshly loaded table (never the current
    one), then delete the files that only those snapshots referenced."""

    def expire_chosen() -> tuple[list[int], set[str]]:
        table = load()
        current = table.current_snapshot()
        doomed = sorted(set(choose(table)) - ({current.snapshot_id} if current else set()))
        if not doomed:
            return [], set()
        doomed_files = set().union(*(files_of(table, table.snapshot_by_id(i)) for i in doomed))
        table.maintenance.expire_snapshots().by_ids(doomed).commit()
        return doomed, doomed_files

    doomed, doomed_files = retry_on_conflict(table_name, attempts, expire_chosen)
    if not doomed:
        return Expiry((), 0)
    table = load()
    kept_files = set().union(*(files_of(table, snapshot) for snapshot in table.snapshots()))
    unreferenced = doomed_files - kept_files
    for path in unreferenced:
        table.io.delete(path)
    return Expiry(tuple(doomed), len(unreferenced))


def files_of(table: Table, snapshot: Snapshot) -> set[str]:
    """The manifest list, manifests and live data/delete files a snapshot references."""
    manifests = snapshot.manifests(table.io)
    return {snapshot.manifest_list, *(manifest.manifest_path for manifest in manifests), *_live_files(table, manifests)}


def data_files_of(table: Table, snapshot: Snapshot) -> set[str]:
    return _live_files(table, snapshot.manifests(table.io))


def _live_files(table: Table, manifests: Iterable[ManifestFile]) -> set[str]:
    return {
        entry.data_file.file_path
        for manifest in manifests
        for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True)
    }
