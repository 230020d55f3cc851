"""Snapshot history: what changed since a snapshot, which snapshots the retention keeps, and expiring
snapshots together with the files that only they referenced.

pyiceberg's ``expire_snapshots`` removes snapshots from the table metadata but leaves their files
in storage. For retention that only wastes space; for erasure it would leave a subject's rows in
Parquet files that any reader of an old metadata file could still open. ``expire`` therefore also
deletes every manifest list, manifest and data file that no retained snapshot references any more.

Retention (``Retention``): a stream commits each of its tables every second or so, and every commit
rewrites a metadata file that lists every retained snapshot, so keeping each one for the whole
retention period (a week by default) would make every commit slower than the one before. The
retention therefore keeps, of the snapshots younger than ``snapshot_retention_hours``, the newest
``snapshot_keep_recent`` one by one and of the older ones the newest of each
``snapshot_thin_seconds`` (an hour by default); beyond the retention none. Time travel to any moment
within the retention still finds a state of the table from at most that long before it, never one
from after it. Snapshots that a tag or branch names (e.g. the data a registered model was trained
on) and the current snapshot are never expired by it; erasure alone may drop them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pyiceberg.manifest import ManifestFile
from pyiceberg.table import Table
from pyiceberg.table.refs import SnapshotRefType
from pyiceberg.table.snapshots import Operation, Snapshot, ancestors_of

from lakehouse.commits import retry_on_conflict
from rtml.settings import LakehouseSettings


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
class Retention:
    max_age_hours: float
    keep_recent: int
    thin_seconds: float

    @classmethod
    def of(cls, settings: LakehouseSettings, max_age_hours: float | None = None) -> Retention:
        """The settings' retention, optionally with another age limit."""
        hours = settings.snapshot_retention_hours if max_age_hours is None else max_age_hours
        return cls(hours, settings.snapshot_keep_recent, settings.snapshot_thin_seconds)

    def expired(self, table: Table, now_ms: int) -> list[int]:
        """The ids of the snapshots this retention lets go, oldest first."""
        ordered = sorted(table.snapshots(), key=lambda s: (s.timestamp_ms, s.sequence_number or 0))
        cutoff_ms = now_ms - self.max_age_hours * 3_600_000
        within = [snapshot for snapshot in ordered if snapshot.timestamp_ms >= cutoff_ms]
        kept = protected(table) | {snapshot.snapshot_id for snapshot in within[max(0, len(within) - self.keep_recent) :]}
        bucket_ms = max(1.0, self.thin_seconds * 1000)
        newest_per_bucket = {snapshot.timestamp_ms // bucket_ms: snapshot.snapshot_id for snapshot in within}
        kept |= set(newest_per_bucket.values())
        return [snapshot.snapshot_id for snapshot in ordered if snapshot.snapshot_id not in kept]


def protected(table: Table) -> set[int]:
    """Snapshots that a branch or tag points at (the current one among them)."""
    return {ref.snapshot_id for ref in table.metadata.refs.values()}


@dataclass(frozen=True)
class Expiry:
    expired_snapshot_ids: tuple[int, ...]
    deleted_files: int
    dropped_tags: tuple[str, ...] = ()


def expire(
    load: Callable[[], Table], table_name: str, choose: Callable[[Table], Iterable[int]], attempts: int, drop_tags: bool = False
) -> Expiry:
    """Expire the snapshots that ``choose`` picks from the freshly loaded table (never the current
    one), then delete the files that only those snapshots referenced. A tagged snapshot is only
    expired with ``drop_tags``, which removes its tags first (erasure); otherwise it is kept."""

    def expire_chosen() -> tuple[list[int], set[str], list[str]]:
        table = load()
        chosen = set(choose(table))
        refs = table.metadata.refs.items()
        tags = [name for name, ref in refs if drop_tags and ref.snapshot_ref_type == SnapshotRefType.TAG and ref.snapshot_id in chosen]
        if tags:
            with table.manage_snapshots() as managing:
                for name in tags:
                    managing.remove_tag(name)
        doomed = sorted(chosen - protected(table))
        if not doomed:
            return [], set(), tags
        doomed_files = referenced_files(table, [table.snapshot_by_id(i) for i in doomed])
        table.maintenance.expire_snapshots().by_ids(doomed).commit()
        return doomed, doomed_files, tags

    doomed, doomed_files, tags = retry_on_conflict(table_name, attempts, expire_chosen)
    if not doomed:
        return Expiry((), 0, tuple(tags))
    table = load()
    unreferenced = doomed_files - referenced_files(table, table.snapshots())
    for path in unreferenced:
        table.io.delete(path)
    return Expiry(tuple(doomed), len(unreferenced), tuple(tags))


def referenced_files(table: Table, snapshots: Iterable[Snapshot]) -> set[str]:
    """The manifest lists, manifests and live data/delete files the snapshots reference; each
    manifest is read once however many of the snapshots share it."""
    lists, manifests = set(), {}
    for snapshot in snapshots:
        lists.add(snapshot.manifest_list)
        manifests.update((manifest.manifest_path, manifest) for manifest in snapshot.manifests(table.io))
    return lists | manifests.keys() | _live_files(table, manifests.values())


def data_files_of(table: Table, snapshot: Snapshot) -> set[str]:
    return _live_files(table, snapshot.manifests(table.io))


def _live_files(table: Table, manifests: Iterable[ManifestFile]) -> set[str]:
    return {
        entry.data_file.file_path
        for manifest in manifests
        for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True)
    }
