"""Right to erasure: remove every row about one data subject from every table and every snapshot,
in every tenant (the operator's ``rtml erase``) or in one tenant only (a tenant's own request).

Subject ids come from clients and tenants do not coordinate them (the reason keys are per tenant),
so two tenants' subject ``s`` may be two people: an erasure scoped to tenant ``a`` removes only the
rows with ``tenant == a`` and ``subject == s``, and tenant ``b``'s rows about ``s`` stay.

First a tombstone is committed to the ``erasures`` table: the SHA-256 digest of the subject
(``subject_digest``) for an erasure in every tenant, or of the (tenant, subject) pair
(``tenant_subject_digest``, with the tenant also in the tombstone's ``tenant`` column) for a
scoped one; when and by whom; never the subject itself. Every later append of rows with a subject
checks both kinds for each row's (tenant, subject) and withholds the erased rows, so a replay or a
late writer cannot bring them back; the writers' docstring (``lakehouse.writer``, "Appends racing
with an erasure") shows why an append running during the erasure cannot either. Then, for each
table with a ``subject`` column:

1. a row-level delete of the erased rows (pyiceberg rewrites the data files that hold them
   without those rows: copy-on-write, so the current snapshot no longer references any file with
   them). A table without such rows gets an empty commit instead: the racing append of the
   argument above must find the table moved in either case;
2. large payloads those rows pointed to (``events.payload_uri``) are deleted;
3. every retained snapshot that still references a data file holding an erased row is expired,
   and the files only those snapshots referenced (data files, manifests, manifest lists) are
   deleted, so time travel cannot reach the rows either, nor can a reader holding an old metadata
   file. So are the delete's own snapshots (step 1 commits once more after them): their manifests
   list the dropped files with their column bounds, which hold the first characters of strings
   such as event ids. Snapshots pinned by a tag (``Lakehouse.pin_snapshot``: a model's training data) are no
   exception: their tags are dropped first, and the audit row names them. Finding those snapshots
   reads the ``subject`` column (and, when scoped, the ``tenant`` column) of each distinct data
   file once; a snapshot whose files hold only other tenants' rows about the subject is kept;
4. one ``audit`` row per table records who erased what and when, naming the subject only by the
   tombstone's digest (and the tenant, when scoped, in ``details``) so the audit trail itself holds
   no personal data; unless the caller records the erasure itself (``audit=False``: the erasure
   in every store, ``api.erasure``, writes one entry for all of them).

Older metadata JSON files (at most ``write.metadata.previous-versions-max`` of them) still list
the expired snapshots' ids and summaries, but not their data: the manifest lists they point to
are deleted in step 3, so those snapshots cannot be read from them.

Erasing a subject again (in the same scope) finds its tombstone in place (it is kept once) and
removes whatever an older rtml without tombstones may have written since.

Rows derived from the subject's that do not name it (the enrichments of its predictions) can be
erased along with them (``related``): steps 1, 3 and 4 treat them as the subject's rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import partial, reduce
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import TypeAdapter, ValidationError
from pyiceberg.expressions import And, BooleanExpression, EqualTo, In, Or
from pyiceberg.table import Table

from lakehouse.commits import files_may_vanish, retry_on_conflict, transaction
from lakehouse.errors import LakehouseError
from lakehouse.snapshots import data_files_of, expire
from lakehouse.tables import ERASURES, SUBJECT, TABLES, TableDef, table_def
from rtml.schemas import TenantId, utc_now

if TYPE_CHECKING:
    from lakehouse.api import Lakehouse

_TENANT = TypeAdapter(TenantId)


def subject_digest(subject: str) -> str:
    """The tombstone digest of an erasure of ``subject`` in every tenant."""
    return "sha256:" + hashlib.sha256(subject.encode()).hexdigest()


def tenant_subject_digest(tenant: str, subject: str) -> str:
    """The tombstone digest of an erasure of ``subject`` in ``tenant`` only. Its own prefix keeps
    it apart from every ``subject_digest``, and the pair is hashed as a JSON array so that no two
    pairs share an encoding (``("a", "bc")`` is not ``("ab", "c")``)."""
    return "sha256-tenant:" + hashlib.sha256(json.dumps([tenant, subject]).encode()).hexdigest()


@dataclass(frozen=True)
class _Read:
    snapshot_id: int
    everywhere: frozenset[str]  # digests of erasures in every tenant
    scoped: frozenset[str]  # digests of tenant-scoped erasures
    scoped_tenants: frozenset[str]  # the tenants those were in


class Tombstones:
    """The tombstones of erased subjects, as the ``erasures`` table's current snapshot holds them.

    ``erased_among`` loads the table's metadata on every call (it runs inside each append's unit
    of work); the tombstones themselves are re-read only when that snapshot changed. It hashes
    nothing while nothing is erased, and otherwise each distinct subject of the batch once per
    kind of tombstone that can match it: when some erasure was in every tenant, and when the
    subject's tenant had an erasure of its own; matching the rows is done in Arrow."""

    def __init__(self, load: Callable[[], Table]):
        self._load = load
        self._read: _Read | None = None  # replaced whole

    def erased_among(self, rows: pa.Table) -> pa.Array:
        """For each of ``rows`` (a batch's ``tenant`` and ``subject`` columns), whether it is
        erased: its subject was erased in every tenant, or in the row's tenant."""
        erased = np.zeros(rows.num_rows, dtype=bool)
        read = self._tombstones()
        if read is not None:
            tenants, subjects = rows["tenant"].combine_chunks(), rows[SUBJECT].combine_chunks()
            if read.everywhere:
                erased |= _digest_among(subjects, pc.unique(subjects), subject_digest, read.everywhere)
            for tenant in read.scoped_tenants.intersection(pc.unique(tenants).to_pylist()):
                of_tenant = pc.equal(tenants, tenant)
                in_tenant = partial(tenant_subject_digest, tenant)
                of_tenant_erased = _digest_among(subjects, pc.unique(subjects.filter(of_tenant)), in_tenant, read.scoped)
                erased |= of_tenant.to_numpy(zero_copy_only=False) & of_tenant_erased
        return pa.array(erased)

    def _tombstones(self) -> _Read | None:
        table = self._load()
        current = table.current_snapshot()
        if current is None:
            return None
        read = self._read
        if read is None or read.snapshot_id != current.snapshot_id:
            # The loaded table's current snapshot is ``current``; naming its id would project it with
            # the schema it was written with, which lacks ``tenant`` in a lakehouse made before it.
            rows = table.scan(selected_fields=("subject_digest", "tenant")).to_arrow()
            scoped = pc.is_valid(rows["tenant"])
            read = self._read = _Read(
                current.snapshot_id,
                frozenset(rows.filter(pc.invert(scoped))["subject_digest"].to_pylist()),
                frozenset(rows.filter(scoped)["subject_digest"].to_pylist()),
                frozenset(rows.filter(scoped)["tenant"].to_pylist()),
            )
        return read


def _digest_among(subjects: pa.Array, candidates: pa.Array, digest: Callable[[str], str], digests: frozenset[str]) -> np.ndarray:
    """For each of ``subjects``, whether it is one of the distinct ``candidates`` whose ``digest``
    is among ``digests`` (each candidate is hashed once)."""
    erased = [subject for subject in candidates.drop_null().to_pylist() if digest(subject) in digests]
    return pc.is_in(subjects, value_set=pa.array(erased, subjects.type)).to_numpy(zero_copy_only=False)


@dataclass
class TableErasure:
    table: str
    rows_removed: int
    snapshots_expired: int
    files_deleted: int
    blobs_deleted: int = 0
    tags_dropped: tuple[str, ...] = ()


@dataclass
class ErasureReport:
    subject_digest: str  # the tombstone's: of the subject, or of (tenant, subject) when scoped
    tenant: str | None = None  # None: every tenant
    tables: list[TableErasure] = field(default_factory=list)

    @property
    def rows_removed(self) -> int:
        return sum(table.rows_removed for table in self.tables)


def audited_filter(digest: str, tenant: str | None) -> str:
    """An erasure's rows as the audit trail names them, by the tombstone's ``digest`` (and ``tenant``, when scoped)."""
    return f"{SUBJECT} {digest}" if tenant is None else f"tenant {tenant} and {SUBJECT} {digest}"


@dataclass(frozen=True)
class _Erased:
    """The rows one erasure removes: the subject's in every tenant, or in ``tenant`` only; and the
    ``related`` rows, per table the keys ``(tenant, id)`` of rows derived from the subject's that
    do not name it (``erase``)."""

    subject: str
    tenant: str | None
    related: Mapping[str, frozenset[tuple[str, str]]] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return subject_digest(self.subject) if self.tenant is None else tenant_subject_digest(self.tenant, self.subject)

    def row_filters(self, table: TableDef) -> list[BooleanExpression]:
        """The rows of ``table``: the subject's, then the related ones of each tenant. Deleted one
        filter at a time: pyiceberg's delete keeps every row with a null in a column its filter
        names, so the related rows (whose ``subject`` is null) would survive one filter of both."""
        about_subject = EqualTo(SUBJECT, self.subject)
        return [
            about_subject if self.tenant is None else And(EqualTo("tenant", self.tenant), about_subject),
            *(And(EqualTo("tenant", tenant), In(table.keys[1], ids)) for tenant, ids in self._related(table).items()),
        ]

    def row_filter(self, table: TableDef) -> BooleanExpression:
        """``row_filters`` as one filter, for scans."""
        return reduce(Or, self.row_filters(table))

    def in_file(self, definition: TableDef, table: Table, path: str) -> bool:
        """Whether the data file at ``path`` holds one of the rows (reads only the columns it needs)."""
        related = self._related(definition)
        columns = [SUBJECT] if self.tenant is None and not related else ["tenant", SUBJECT]
        columns += [definition.keys[1]] if related else []
        with table.io.new_input(path).open() as stream:
            rows = pq.ParquetFile(stream).read(columns=columns)
        held = pc.equal(rows[SUBJECT], self.subject)
        if self.tenant is not None:
            held = pc.and_(held, pc.equal(rows["tenant"], self.tenant))
        for tenant, ids in related.items():
            of_related = pc.and_(pc.equal(rows["tenant"], tenant), pc.is_in(rows[definition.keys[1]], value_set=pa.array(sorted(ids), pa.string())))
            held = pc.or_kleene(held, of_related)  # a null subject must not hide a related row
        return bool(pc.any(held).as_py())

    def _related(self, table: TableDef) -> dict[str, set[str]]:
        """This table's related keys as tenant -> ids."""
        ids: dict[str, set[str]] = {}
        for tenant, key in self.related.get(table.name, ()):
            ids.setdefault(tenant, set()).add(key)
        return ids


def erase(
    lakehouse: Lakehouse,
    subject: str,
    actor: str,
    tenant: str | None = None,
    *,
    audit: bool = True,
    related: Mapping[str, Collection[tuple[str, str]]] | None = None,
) -> ErasureReport:
    """Erase ``subject``'s rows in every tenant (``tenant=None``) or in ``tenant`` only; see the
    module docstring. ``audit=False`` writes no audit rows: the caller records the erasure.
    ``related`` names more rows to erase the same way, from the current data and every snapshot:
    per table (one keyed by tenant and an id), the keys ``(tenant, id)`` of rows derived from the
    subject's that do not name it (e.g. the enrichments of its predictions: ``api.erasure``). No
    tombstone covers them: only rows that name the subject can be recognised in a later append."""
    if not subject or not subject.strip():
        raise LakehouseError("erasure needs the id of the data subject (--subject ID)")
    if tenant is not None:
        try:
            _TENANT.validate_python(tenant)
        except ValidationError as error:
            raise LakehouseError(
                f"{tenant!r} is not a tenant id ({error.errors()[0]['msg']}): give the tenant whose rows about the "
                "subject to erase (--tenant ID), or leave it out to erase the subject in every tenant"
            ) from None
    for name in related or {}:
        keys = table_def(name).keys
        if not (table_def(name).has_subject and len(keys) == 2 and keys[0] == "tenant"):
            raise LakehouseError(f"rows of {name!r} cannot be erased as related rows: only tables with a subject, keyed by (tenant, id), can")
    erased = _Erased(subject, tenant, {name: frozenset(keys) for name, keys in (related or {}).items()})
    report = ErasureReport(erased.digest, tenant)
    # The tombstone before any delete: see the module docstring.
    tombstone = {"subject_digest": report.subject_digest, "tenant": tenant, "erased_at": utc_now(), "actor": actor}
    lakehouse.append_idempotent(ERASURES.name, [tombstone], keys_bound_by_time=False)
    for table in TABLES.values():
        if table.has_subject:
            report.tables.append(_erase_from(lakehouse, table, erased, actor, audit))
    return report


def _erase_from(lakehouse: Lakehouse, table: TableDef, erased: _Erased, actor: str, audit: bool) -> TableErasure:
    def load() -> Table:
        return lakehouse.table(table.name)

    pointers = ("payload_uri",) if "payload_uri" in table.arrow_schema().names else ()

    def delete_rows() -> tuple[pa.Table, int | None, set[int]]:
        current = load()
        with files_may_vanish(load, current):  # another subject's erasure expiring this snapshot meanwhile
            found = current.scan(row_filter=erased.row_filter(table), selected_fields=(*table.keys, *pointers)).to_arrow()
            marked = {"rtml.erasure": erased.digest}
            if not found.num_rows:
                # Nothing to delete, but an append that read the tombstones before they held this
                # subject must still find the table moved (lakehouse.writer).
                with transaction(current) as moving:
                    moving.append(current.schema().as_arrow().empty_table(), snapshot_properties=marked)
                return found, None, set()
            before = {snapshot.snapshot_id for snapshot in current.snapshots()}
            with transaction(current) as deleting:
                for row_filter in erased.row_filters(table):
                    deleting.delete(row_filter, snapshot_properties=marked)
                # The deletes' manifests list the files they dropped with those files' column
                # bounds (the first 16 characters of strings such as event ids): a commit after them
                # leaves those manifests to the delete snapshots alone, which step 3 expires.
                deleting.append(current.schema().as_arrow().empty_table(), snapshot_properties=marked)
        latest = current.current_snapshot().snapshot_id
        return found, latest, {snapshot.snapshot_id for snapshot in current.snapshots()} - before - {latest}

    found, snapshot_id, deletes = retry_on_conflict(table.name, lakehouse.settings.commit_retries, delete_rows)
    removed = found.num_rows
    blobs = [uri for uri in found[pointers[0]].to_pylist() if uri] if pointers else []
    for uri in blobs:
        lakehouse.io.delete(uri)

    holds_rows: dict[str, bool] = {}  # data file -> whether it holds erased rows, each file read once

    def file_holds_rows(current: Table, path: str) -> bool:
        if path not in holds_rows:
            holds_rows[path] = erased.in_file(table, current, path)
        return holds_rows[path]

    def snapshots_holding_rows(current: Table) -> list[int]:
        return [
            snapshot.snapshot_id
            for snapshot in current.snapshots()
            if snapshot.snapshot_id in deletes or any(file_holds_rows(current, path) for path in data_files_of(current, snapshot))
        ]

    expiry = expire(load, table.name, snapshots_holding_rows, lakehouse.settings.commit_retries, drop_tags=True)
    if audit:
        scope = {} if erased.tenant is None else {"tenant": erased.tenant}
        lakehouse.audit(
            actor=actor,
            action="erase",
            table_name=table.name,
            row_filter=audited_filter(erased.digest, erased.tenant),
            row_count=removed,
            snapshot_id=snapshot_id,
            details={
                **scope,
                "expired_snapshot_ids": list(expiry.expired_snapshot_ids),
                "files_deleted": expiry.deleted_files,
                "blobs_deleted": len(blobs),
                "tags_dropped": list(expiry.dropped_tags),
            },
        )
    return TableErasure(table.name, removed, len(expiry.expired_snapshot_ids), expiry.deleted_files, len(blobs), tuple(expiry.dropped_tags))
