"""Right to erasure: remove every row about one data subject from every table and every snapshot.

First a tombstone of the subject (its SHA-256 digest, when and by whom; never the subject itself)
is committed to the ``erasures`` table. Every later append of rows with a subject checks it and
withholds the subject's rows, so a replay or a late writer cannot bring them back; the writers'
docstring (``lakehouse.writer``, "Appends racing with an erasure") shows why an append running
during the erasure cannot either. Then, for each table with a ``subject`` column:

1. a row-level delete (pyiceberg rewrites the data files that hold the subject without its rows:
   copy-on-write, so the current snapshot no longer references any file with the subject). A table
   without rows of the subject gets an empty commit instead: the racing append of the argument
   above must find the table moved in either case;
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

Erasing a subject again finds its tombstone in place (it is kept once) and removes whatever an
older rtml without tombstones may have written since.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyiceberg.expressions import EqualTo
from pyiceberg.table import Table

from lakehouse.commits import files_may_vanish, retry_on_conflict, transaction
from lakehouse.errors import LakehouseError
from lakehouse.snapshots import data_files_of, expire
from lakehouse.tables import ERASURES, SUBJECT, TABLES, TableDef
from rtml.schemas import utc_now

if TYPE_CHECKING:
    from lakehouse.api import Lakehouse


def subject_digest(subject: str) -> str:
    return "sha256:" + hashlib.sha256(subject.encode()).hexdigest()


class Tombstones:
    """The digests of erased subjects, as the ``erasures`` table's current snapshot holds them.

    ``erased_among`` loads the table's metadata on every call (it runs inside each append's unit
    of work); the digests themselves are re-read only when that snapshot changed."""

    def __init__(self, load: Callable[[], Table]):
        self._load = load
        self._read: tuple[int, frozenset[str]] | None = None  # (snapshot id, digests), replaced whole

    def erased_among(self, subjects: pa.Array) -> pa.Array:
        """Those of ``subjects`` (distinct, non-null) that have been erased."""
        digests = self._load_digests()
        if not digests:
            return subjects.slice(0, 0)
        erased = [subject for subject in subjects.to_pylist() if subject_digest(subject) in digests]
        return pa.array(erased, subjects.type)

    def _load_digests(self) -> frozenset[str]:
        table = self._load()
        current = table.current_snapshot()
        if current is None:
            return frozenset()
        read = self._read
        if read is None or read[0] != current.snapshot_id:
            digests = table.scan(selected_fields=("subject_digest",), snapshot_id=current.snapshot_id).to_arrow()["subject_digest"]
            read = self._read = (current.snapshot_id, frozenset(digests.to_pylist()))
        return read[1]


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
    # The tombstone before any delete: see the module docstring.
    tombstone = {"subject_digest": report.subject_digest, "erased_at": utc_now(), "actor": actor}
    lakehouse.append_idempotent(ERASURES.name, [tombstone], keys_bound_by_time=False)
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
        with files_may_vanish(load, current):  # another subject's erasure expiring this snapshot meanwhile
            found = current.scan(row_filter=about_subject, selected_fields=(*table.keys, *pointers)).to_arrow()
            marked = {"rtml.erasure": digest}
            if not found.num_rows:
                # Nothing to delete, but an append that read the tombstones before they held this
                # subject must still find the table moved (lakehouse.writer).
                with transaction(current) as moving:
                    moving.append(current.schema().as_arrow().empty_table(), snapshot_properties=marked)
                return found, None
            current.delete(about_subject, snapshot_properties=marked)
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
