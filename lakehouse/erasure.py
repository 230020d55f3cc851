"""Right to erasure: remove every row about one data subject from every table and every snapshot.

For each table with a ``subject`` column:

1. a row-level delete (pyiceberg rewrites the data files that hold the subject without its rows:
   copy-on-write, so the current snapshot no longer references any file with the subject);
2. large payloads those rows pointed to (``events.payload_uri``) are deleted;
3. every retained snapshot that still references a data file holding the subject is expired, and
   the files only those snapshots referenced (data files, manifests, manifest lists) are deleted,
   so time travel cannot reach the rows either, nor can a reader holding an old metadata file.
   Snapshots pinned by a tag (``Lakehouse.pin_snapshot``: a model's training data) are no
   exception: their tags are dropped first, and the audit row names them. Finding those snapshots
   reads the ``subject`` column of each distinct data file once;
4. one ``audit`` row per table records who erased what and when, naming the subject only by its
   SHA-256 digest so the audit trail itself holds no personal data.

Older metadata JSON files (at most ``write.metadata.previous-versions-max`` of them) still list
the expired snapshots' ids and summaries, but not their data: the manifest lists they point to
are deleted in step 3, so those snapshots cannot be read from them.

A writer that appends new rows about the subject after the erasure (a late replay) adds new data;
erasing again removes it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyiceberg.expressions import EqualTo
from pyiceberg.table import Table

from lakehouse.commits import retry_on_conflict
from lakehouse.errors import LakehouseError
from lakehouse.snapshots import data_files_of, expire
from lakehouse.tables import SUBJECT, TABLES, TableDef

if TYPE_CHECKING:
    from lakehouse.api import Lakehouse


def subject_digest(subject: str) -> str:
    return "sha256:" + hashlib.sha256(subject.encode()).hexdigest()


@dataclass
class TableErasure:
    table: str
    rows_removed: int
    snapshots_expired: int
    files_deleted: int
    blobs_deleted: int = 0


@dataclass
class ErasureReport:
    subject_digest: str
    tables: list[TableErasure] = field(default_factory=list)

    @property
    def rows_removed(self) -> int:
        return sum(table.rows_removed for table in self.tables)


def erase(lakehouse: Lakehouse, subject: str, actor: str) -> ErasureReport:
    if not subject or not subject.strip():
        raise LakehouseError("erasure needs the id of the data subject (--subject ID)")
    report = ErasureReport(subject_digest(subject))
    for table in TABLES.values():
        if table.has_subject:
            report.tables.append(_erase_from(lakehouse, table, subject, report.subject_digest, actor))
    return report


def _erase_from(lakehouse: Lakehouse, table: TableDef, subject: str, digest: str, actor: str) -> TableErasure:
    def load() -> Table:
        return lakehouse.table(table.name)

    about_subject = EqualTo(SUBJECT, subject)
    pointers = ("payload_uri",) if "payload_uri" in table.arrow_schema().names else ()

    def delete_rows() -> tuple[pa.Table, int | None]:
        current = load()
        found = current.scan(row_filter=about_subject, selected_fields=(table.key, *pointers)).to_arrow()
        if not found.num_rows:
            return found, None
        current.delete(about_subject, snapshot_properties={"rtml.erasure": digest})
        return found, current.current_snapshot().snapshot_id

    found, snapshot_id = retry_on_conflict(table.name, lakehouse.settings.commit_retries, delete_rows)
    removed = found.num_rows
    blobs = [uri for uri in found[pointers[0]].to_pylist() if uri] if pointers else []
    for uri in blobs:
        lakehouse.io.delete(uri)

    holds_subject: dict[str, bool] = {}

    def snapshots_holding_subject(current: Table) -> list[int]:
        return [
            snapshot.snapshot_id
            for snapshot in current.snapshots()
            if any(_file_holds(current, path, subject, holds_subject) for path in data_files_of(current, snapshot))
        ]

    expiry = expire(load, table.name, snapshots_holding_subject, lakehouse.settings.commit_retries, drop_tags=True)
    lakehouse.audit(
        actor=actor,
        action="erase",
        table_name=table.name,
        row_filter=f"{SUBJECT} {digest}",
        row_count=removed,
        snapshot_id=snapshot_id,
        details={
            "expired_snapshot_ids": list(expiry.expired_snapshot_ids),
            "files_deleted": expiry.deleted_files,
            "blobs_deleted": len(blobs),
            "tags_dropped": list(expiry.dropped_tags),
        },
    )
    return TableErasure(table.name, removed, len(expiry.expired_snapshot_ids), expiry.deleted_files, len(blobs))


def _file_holds(table: Table, path: str, subject: str, seen: dict[str, bool]) -> bool:
    if path not in seen:
        with table.io.new_input(path).open() as stream:
            subjects = pq.ParquetFile(stream).read(columns=[SUBJECT])[SUBJECT]
        seen[path] = bool(pc.any(pc.equal(subjects, subject)).as_py())
    return seen[path]
