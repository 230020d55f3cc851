"""The lakehouse's public face: ``Lakehouse.open(settings)`` and what hangs off it.

    lake = Lakehouse.open()                              # creates namespace and tables on first use
    lake.append_idempotent("events", events)             # replays add nothing (key: tenant, event_id)
    with lake.writer("predictions") as writer:           # background batching, off the request path
        writer.submit(predictions).result()              # done = durable
    lake.read("events", tenant="acme", start=t0, end=t1) # newest first
    lake.read("events", snapshot_id=...)                 # time travel (or as_of=datetime)
    lake.dataset("events", tenant="acme")                # a Ray Dataset (read_iceberg) for batch jobs
    lake.registry.register(model_version, client_token=t) # register/list/get/promote/retire/active/update_weights
    lake.features.online_latest("acme", ["pump-1"])      # feature store: online_latest/offline_range/offline_dataset
    lake.lineage(prediction_id, tenant)                  # feature rows + model versions (+ training snapshots)
    lake.erase("subject-42", actor="ops")                # right to erasure, audited; replays stay erased
    lake.erase("subject-42", actor="ops", tenant="acme") # ... of acme's rows about subject-42 only
    lake.maintain(); lake.replicate(to=other_settings)   # compaction + expiry; disaster-recovery copy

Keys are unique per tenant, and so is every look-up by id: two tenants' ids never meet.
Rows may be given as Arrow tables, dicts, or the kernel's records (``rtml.schemas.Event``,
``Prediction``, ``Feedback``); column names are the records' field names. Every method loads the
table's current metadata, so one ``Lakehouse`` can be shared by threads and long-lived actors and
always sees other writers' commits.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from pyiceberg.catalog import Catalog
from pyiceberg.expressions import AlwaysTrue, And, BooleanExpression, EqualTo, GreaterThanOrEqual, In, LessThan, LessThanOrEqual
from pyiceberg.io import FileIO
from pyiceberg.table import Table

from lakehouse import catalog as backend
from lakehouse import erasure, maintenance, replication
from lakehouse.datasets import iceberg_dataset
from lakehouse.blobs import offload_large_payloads, read_blob
from lakehouse.commits import retry_on_conflict
from lakehouse.erasure import ErasureReport, Tombstones
from lakehouse.errors import LakehouseError
from lakehouse.features import FeatureStore, with_feature_ids
from lakehouse.maintenance import MaintenanceReport
from lakehouse.registry import ModelRegistry
from lakehouse.replication import ReplicationReport
from lakehouse.snapshots import Expiry, Retention, SnapshotInfo, expire, history
from lakehouse.tables import AUDIT, ERASURES, EVENTS, FEATURES, PREDICTIONS, Rows, table_def, time_literal, to_arrow
from lakehouse.writer import BatchingWriter, append_idempotent
from observability import metrics
from rtml.schemas import ModelVersion, new_id, utc_now
from rtml.settings import LakehouseSettings, Settings, get_settings

if TYPE_CHECKING:
    import ray.data

# A long-lived writer applies the snapshot retention after this many of its writes (each a commit).
RETENTION_EVERY_WRITES = 20
# ... and counts its table's small files (rtml_lakehouse_small_files) after a write at most this
# often: the count reads every manifest of the current snapshot, too much for every commit.
SMALL_FILES_EVERY_S = 5.0


@dataclass
class Lineage:
    """Where a prediction came from."""

    prediction: dict[str, Any]
    features: pa.Table  # the feature rows of its entity whose window covers its event time
    models: list[ModelVersion]  # with training_snapshot_ids and feature_set_version
    unregistered_models: dict[str, str]  # name -> version the prediction names but the registry lacks


class Lakehouse:
    def __init__(self, settings: Settings, catalog: Catalog):
        self._all_settings = settings
        self.settings: LakehouseSettings = settings.lakehouse
        self.catalog = catalog
        self.namespace = settings.lakehouse.namespace

    @classmethod
    def open(cls, settings: Settings | None = None) -> Lakehouse:
        """Connect to the configured catalog, creating the namespace and any missing table."""
        settings = settings or get_settings()
        catalog = backend.open_catalog(settings.lakehouse, settings.home_dir)
        backend.ensure_tables(catalog, settings.lakehouse.namespace, settings.lakehouse.commit_retries)
        return cls(settings, catalog)

    def table(self, name: str) -> Table:
        """The pyiceberg table with its current metadata (for reads this API does not cover)."""
        return backend.load_table(self.catalog, self.namespace, table_def(name).name)

    @property
    def io(self) -> FileIO:
        return self.table(EVENTS.name).io

    # writes ------------------------------------------------------------------------------------

    def append_idempotent(
        self, table: str, rows: Rows, keys: Sequence[str] | None = None, *, keys_bound_by_time: bool = True
    ) -> int:
        """Append rows whose key the table does not hold yet and whose subject is not erased (see
        ``lakehouse.writer``); returns how many rows were new. ``keys`` default to the table's
        (``events``/``predictions``: ``(tenant, event_id)``, ``features``: ``(tenant, feature_id)``,
        ...). ``keys_bound_by_time=False`` looks for the keys at any time, not only in the batch's
        time range: for rows whose time is when they arrived, so that a retry lands at another time
        (it scans all of the batch's tenants' files)."""
        return self._append_prepared(table, self._prepare(table, rows), keys, keys_bound_by_time)

    def writer(self, table: str, keys: Sequence[str] | None = None, *, keys_bound_by_time: bool = True) -> BatchingWriter:
        """A background batching writer for one table (``keys`` and ``keys_bound_by_time`` as for
        ``append_idempotent``); ``close()`` it (or use ``with``). Every ``RETENTION_EVERY_WRITES``
        writes it also expires what the snapshot retention lets go, so that a long-lived writer (a
        stream's sink, the serving sink) keeps the table's history, and with it the cost of each
        commit, bounded. After its first write, and after any write at least ``SMALL_FILES_EVERY_S``
        after its last count, it sets ``rtml_lakehouse_small_files`` of the table (the files of the
        current snapshot smaller than ``lakehouse.compaction_small_file_bytes``)."""
        writes = itertools.count(1)
        small_files_counted_at = -math.inf

        def upkeep() -> None:
            nonlocal small_files_counted_at
            if next(writes) % RETENTION_EVERY_WRITES == 0:
                self.expire_snapshots(table)
            if time.monotonic() - small_files_counted_at >= SMALL_FILES_EVERY_S:
                small_files_counted_at = time.monotonic()
                small = maintenance.small_files(self.table(table), self.settings.compaction_small_file_bytes)
                metrics.SMALL_FILES.labels(table=table).set(small.num_rows)

        return BatchingWriter(
            name=table,
            convert=lambda rows: self._prepare(table, rows),
            write=lambda batch: self._append_prepared(table, batch, keys, keys_bound_by_time),
            batch_rows=self.settings.writer_batch_rows,
            flush_seconds=self.settings.writer_flush_seconds,
            after_write=upkeep,
        )

    def pin_snapshot(self, table: str, snapshot_id: int, tag: str) -> None:
        """Keep a snapshot readable beyond the retention, under the Iceberg tag ``tag`` (e.g. the
        data a model is trained on, for lineage); erasure still expires it if it holds an erased
        subject."""
        name = table_def(table).name

        def tag_it() -> None:
            current = self.table(name)
            _require_snapshot(name, current, snapshot_id)
            with current.manage_snapshots() as managing:
                managing.create_tag(snapshot_id, tag)

        retry_on_conflict(name, self.settings.commit_retries, tag_it)

    def unpin_snapshot(self, table: str, tag: str) -> None:
        """Let the retention have the snapshot tagged ``tag`` again (no tag of that name: nothing)."""
        name = table_def(table).name

        def untag_it() -> None:
            current = self.table(name)
            if tag in current.metadata.refs:
                with current.manage_snapshots() as managing:
                    managing.remove_tag(tag)

        retry_on_conflict(name, self.settings.commit_retries, untag_it)

    def expire_snapshots(self, table: str, retention_hours: float | None = None) -> Expiry:
        """Expire the snapshots of ``table`` that the retention (settings; another age limit if
        given) lets go, and the files only they referenced."""
        name = table_def(table).name
        kept_by = Retention.of(self.settings, retention_hours)
        return expire(lambda: self.table(name), name, lambda current: kept_by.expired(current, int(time.time() * 1000)), self.settings.commit_retries)

    def audit(
        self,
        actor: str,
        action: str,
        table_name: str,
        row_count: int,
        row_filter: str | None = None,
        snapshot_id: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        """Append one row to the append-only ``audit`` table: who did what, when, to which rows."""
        self.append_idempotent(AUDIT.name, [audit_record(actor, action, table_name, row_count, row_filter, snapshot_id, details)])

    def _prepare(self, table: str, rows: Rows) -> pa.Table:
        definition = table_def(table)
        if definition is FEATURES:
            return with_feature_ids(rows)
        prepared = to_arrow(definition, rows)
        if definition is EVENTS:
            prepared = offload_large_payloads(prepared, lambda: self.table(EVENTS.name), self.settings.inline_payload_max_bytes)
        return prepared

    def _append_prepared(self, table: str, rows: pa.Table, keys: Sequence[str] | None, keys_bound_by_time: bool) -> int:
        definition = table_def(table)
        return append_idempotent(
            lambda: self.table(table),
            definition,
            rows,
            (keys,) if isinstance(keys, str) else keys or definition.keys,
            self.settings.commit_retries,
            keys_bound_by_time=keys_bound_by_time,
            erased_among=self._tombstones.erased_among if definition.has_subject else None,
            on_withheld=self._delete_blobs if definition is EVENTS else None,
        )

    @cached_property
    def _tombstones(self) -> Tombstones:
        return Tombstones(lambda: self.table(ERASURES.name))

    def _delete_blobs(self, withheld_events: pa.Table) -> None:
        """The payload blobs ``_prepare`` wrote for events that were then withheld (an erased
        subject's): no row points to them, and they hold the subject's data."""
        for uri in withheld_events["payload_uri"].drop_null().to_pylist():
            with contextlib.suppress(FileNotFoundError):
                self.io.delete(uri)

    # reads -------------------------------------------------------------------------------------

    def read(
        self,
        table: str,
        tenant: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        *,
        snapshot_id: int | None = None,
        as_of: datetime | None = None,
        columns: tuple[str, ...] = ("*",),
        limit: int | None = None,
        where: BooleanExpression = AlwaysTrue(),
    ) -> pa.Table:
        """Rows of one tenant whose time column lies in ``[start, end)``, newest first (``limit``
        keeps the newest). Time travel: ``snapshot_id`` reads that snapshot, ``as_of`` the snapshot
        that was current at that moment (an empty table if the table had none yet)."""
        definition = table_def(table)
        current = self.table(table)
        if as_of is not None:
            if snapshot_id is not None:
                raise LakehouseError("give either snapshot_id or as_of, not both")
            then = current.snapshot_as_of_timestamp(int(as_of.timestamp() * 1000))
            if then is None:
                return current.schema().as_arrow().empty_table()
            snapshot_id = then.snapshot_id
        else:
            _require_snapshot(table, current, snapshot_id)
        condition = where
        if tenant is not None:
            condition = And(condition, EqualTo("tenant", tenant))
        if start is not None:
            condition = And(condition, GreaterThanOrEqual(definition.time_column, time_literal(start)))
        if end is not None:
            condition = And(condition, LessThan(definition.time_column, time_literal(end)))
        rows = current.scan(row_filter=condition, selected_fields=columns, snapshot_id=snapshot_id).to_arrow()
        if definition.time_column in rows.column_names:
            rows = rows.sort_by([(definition.time_column, "descending")])
        return rows if limit is None else rows.slice(0, limit)

    def dataset(
        self,
        table: str,
        tenant: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        *,
        snapshot_id: int | None = None,
        columns: tuple[str, ...] | None = None,
        num_cpus: float | None = None,
    ) -> ray.data.Dataset:
        """The rows ``read`` would return (unordered) as a Ray Dataset read by parallel Ray tasks,
        pinned to ``snapshot_id`` (the current snapshot by default) for batch jobs; each task asks
        for ``num_cpus`` logical CPUs (Ray Data's default, 1, when None)."""
        definition = table_def(table)
        current = self.table(table)
        _require_snapshot(table, current, snapshot_id)
        if snapshot_id is None:
            snapshot = current.current_snapshot()
            snapshot_id = snapshot.snapshot_id if snapshot else None
        return iceberg_dataset(
            f"{self.namespace}.{definition.name}",
            self._catalog_kwargs(),
            snapshot_id,
            equals=None if tenant is None else {"tenant": tenant},
            time_column=definition.time_column,
            start=start,
            end=end,
            columns=columns,
            num_cpus=num_cpus,
        )

    def snapshots(self, table: str) -> list[SnapshotInfo]:
        """The table's retained snapshots, oldest first (ids for time travel and lineage)."""
        return history(self.table(table))

    def payload(self, event: dict[str, Any]) -> bytes | None:
        """An event row's binary payload, inline or from its blob."""
        if event.get("payload") is not None:
            return event["payload"]
        return read_blob(self.io, event["payload_uri"]) if event.get("payload_uri") else None

    @cached_property
    def registry(self) -> ModelRegistry:
        return ModelRegistry(lambda: self.table("models"), self.settings.commit_retries)

    @cached_property
    def features(self) -> FeatureStore:
        return FeatureStore(
            lambda: self.table(FEATURES.name),
            f"{self.namespace}.{FEATURES.name}",
            self._catalog_kwargs,
        )

    def _catalog_kwargs(self) -> dict[str, Any]:
        """How a Ray task reaches this catalog (``ray.data.read_iceberg`` opens its own)."""
        return {"name": self.settings.catalog_name, **backend.catalog_properties(self.settings, self._all_settings.home_dir)}

    def lineage(self, prediction_id: str, tenant: str) -> Lineage:
        """The feature rows and model versions (with their training snapshots) behind one of
        ``tenant``'s predictions (another tenant's is not found)."""
        found = self.read(PREDICTIONS.name, tenant=tenant, where=EqualTo("prediction_id", prediction_id), limit=1).to_pylist()
        if not found:
            raise LakehouseError(f"tenant {tenant!r} has no prediction {prediction_id!r}")
        prediction = found[0]
        named = dict(prediction["model_versions"] or [])
        models, unregistered = [], {}
        for name, version in sorted(named.items()):
            try:
                models.append(self.registry.get(name, int(version)))
            except (LakehouseError, ValueError):
                unregistered[name] = version
        condition: BooleanExpression = And(
            And(EqualTo("entity", prediction["entity"]), LessThanOrEqual("window_start", time_literal(prediction["event_time"]))),
            GreaterThanOrEqual("window_end", time_literal(prediction["event_time"])),
        )
        feature_sets = {model.feature_set_version for model in models if model.feature_set_version}
        if feature_sets:
            condition = And(condition, In("feature_set_version", feature_sets))
        features = self.read(FEATURES.name, tenant=prediction["tenant"], where=condition)
        return Lineage(prediction, features, models, unregistered)

    # operations --------------------------------------------------------------------------------

    def erase(
        self,
        subject: str,
        actor: str,
        tenant: str | None = None,
        *,
        audit: bool = True,
        related: Mapping[str, Collection[tuple[str, str]]] | None = None,
    ) -> ErasureReport:
        """Delete every row about ``subject`` from every table and retained snapshot, in every
        tenant (``tenant=None``: the operator's ``rtml erase``) or only ``tenant``'s rows (a
        tenant's own request: another tenant's subject of the same id keeps its rows); audited
        (``audit=False``: by the caller, ``api.erasure``), and a tombstone keeps later appends of
        the erased rows out. ``related``: rows derived from the subject's, by key, erased with
        them (``lakehouse.erasure.erase``)."""
        return erasure.erase(self, subject, actor, tenant, audit=audit, related=related)

    def maintain(self, retention_hours: float | None = None) -> list[MaintenanceReport]:
        """Compact small files and expire snapshots older than the retention (settings by default)."""
        return maintenance.maintain(self, retention_hours)

    def replicate(self, to: Settings | LakehouseSettings | Lakehouse) -> list[ReplicationReport]:
        """Copy every table's current snapshot into a second catalog/warehouse. A bare lakehouse
        section is resolved against this lakehouse's ``home``."""
        if isinstance(to, LakehouseSettings):
            to = self._all_settings.model_copy(update={"lakehouse": to})
        target = to if isinstance(to, Lakehouse) else Lakehouse.open(to)
        if target.location == self.location:
            raise LakehouseError(f"the replica {target.location} is this lakehouse itself; name another catalog or namespace")
        return replication.replicate(self, target)

    @classmethod
    def open_replica(cls, settings: Settings, to: str, warehouse: str = "", *, create: bool = True) -> Lakehouse:
        """The replica at ``to`` of the lakehouse of ``settings`` (``replica_settings``), opened as ``open`` does."""
        return cls.open(settings.model_copy(update={"lakehouse": replica_settings(settings.lakehouse, to, warehouse, create=create)}))

    @property
    def location(self) -> str:
        """Which catalog, catalog name and namespace this is (for messages and replica checks)."""
        uri = backend.catalog_properties(self.settings, self._all_settings.home_dir)["uri"]
        return f"{uri} (catalog {self.settings.catalog_name!r}, namespace {self.namespace!r})"


def audit_record(
    actor: str,
    action: str,
    table_name: str,
    row_count: int,
    row_filter: str | None = None,
    snapshot_id: int | None = None,
    details: dict[str, Any] | None = None,
    audit_id: str | None = None,
) -> dict[str, Any]:
    """One row of the ``audit`` table, made now, for ``Lakehouse.audit`` or a batching writer of it;
    ``audit_id`` (default: a fresh one) is its key, so a replayed entry with the same id is kept once."""
    return {
        "audit_id": audit_id or new_id(),
        "at": utc_now(),
        "actor": actor,
        "action": action,
        "table_name": table_name,
        "row_filter": row_filter,
        "row_count": row_count,
        "snapshot_id": snapshot_id,
        "details": json.dumps(details or {}, sort_keys=True, default=str),
    }


def replica_settings(primary: LakehouseSettings, to: str, warehouse: str = "", *, create: bool = True) -> LakehouseSettings:
    """The settings of the replica of ``primary`` at ``to``: a folder (an embedded SQLite catalog
    and warehouse are kept in it, created when missing unless ``create`` is off, when a missing
    one is an error: an erasure must not take an unmounted backup for an empty replica), or a
    catalog URI (sqlite:///..., postgresql+psycopg2://... or http(s)://... for a REST catalog)
    with its ``warehouse``."""
    if "://" not in to:
        folder = Path(to).expanduser().resolve()
        if not create and not (folder / "catalog.db").is_file():
            raise LakehouseError(f"the replica {folder} holds no lakehouse (no catalog.db): mount it, or take it out of lakehouse.replicas")
        folder.mkdir(parents=True, exist_ok=True)
        update = {"catalog_type": "sql", "catalog_uri": f"sqlite:///{folder / 'catalog.db'}", "warehouse": str(folder / "warehouse")}
    elif not warehouse:
        raise LakehouseError(f"the replica {to} is a catalog URI: name its warehouse too (--warehouse PATH_OR_URI, or the replica's `warehouse`)")
    else:
        update = {"catalog_type": "rest" if to.startswith(("http://", "https://")) else "sql", "catalog_uri": to, "warehouse": warehouse}
    return primary.model_copy(update={**update, "replicas": []})  # a replica has no replicas of its own


def _require_snapshot(table: str, current: Table, snapshot_id: int | None) -> None:
    """Time travel to a snapshot the table no longer (or never) had is an error naming both."""
    if snapshot_id is not None and current.snapshot_by_id(snapshot_id) is None:
        raise LakehouseError(f"table {table!r} has no snapshot {snapshot_id} (it may have expired)")
