"""The feature store over the ``features`` table.

Offline reads are range scans (Arrow, or a Ray Dataset through ``ray.data.read_iceberg`` for
training). The online read, the latest vector per entity, is answered from an in-process index
that follows the table: the first read of a tenant scans its rows once, later reads only add the
rows appended since the snapshot the index last saw. Anything other than plain appends since then
(an erasure, a compaction) makes the next read rebuild the index from the table, so the index
never serves a row the table no longer holds.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import And, BooleanExpression, EqualTo, GreaterThanOrEqual, LessThan
from pyiceberg.table import Table

from lakehouse.datasets import iceberg_dataset
from lakehouse.snapshots import only_appends_since
from lakehouse.tables import FEATURES, Rows, plain_record, time_literal, to_arrow

if TYPE_CHECKING:
    import ray.data

ONLINE_COLUMNS = ("entity", "window_start", "window_end", "feature_set_version", "vector")


def feature_id(tenant: str, entity: str, window_end: datetime, feature_set_version: str) -> str:
    """The key of a feature row: the same window of the same entity under the same feature set."""
    text = "\x1f".join((tenant, entity, window_end.isoformat(), feature_set_version))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def with_feature_ids(rows: Rows) -> pa.Table:
    """Feature rows with their ``feature_id`` filled in where the caller left it out."""
    if isinstance(rows, pa.Table):
        given = rows["feature_id"] if "feature_id" in rows.column_names else pa.nulls(rows.num_rows, pa.string())
        rows = rows.drop_columns([c for c in ["feature_id"] if c in rows.column_names])
        rows = rows.append_column("feature_id", pc.fill_null(given.cast(pa.string()), ""))
    else:
        rows = [{**record, "feature_id": record.get("feature_id") or ""} for record in map(plain_record, rows)]
    table = to_arrow(FEATURES, rows)
    columns = ("feature_id", "tenant", "entity", "window_end", "feature_set_version")
    ids = [
        given or feature_id(tenant, entity, window_end, version)
        for given, tenant, entity, window_end, version in zip(*(table[c].to_pylist() for c in columns), strict=True)
    ]
    field = table.schema.field("feature_id")
    return table.set_column(table.schema.get_field_index("feature_id"), field, pa.array(ids, field.type))


@dataclass
class _LatestIndex:
    snapshot_id: int
    latest: pa.Table  # one row per entity: its newest window


class FeatureStore:
    def __init__(self, load: Callable[[], Table], table_identifier: str, catalog_kwargs: Callable[[], dict]):
        self._load = load
        self._table_identifier = table_identifier
        self._catalog_kwargs = catalog_kwargs
        self._indexes: dict[str, _LatestIndex] = {}
        self._lock = threading.Lock()

    def online_latest(self, tenant: str, entities: Sequence[str]) -> pa.Table:
        """The newest feature row of each entity that has one, in the order asked for."""
        with self._lock:
            latest = self._refreshed_index(tenant).latest
        wanted = pa.array(list(entities), type=latest.schema.field("entity").type)
        found = latest.filter(pc.is_in(latest["entity"], value_set=wanted))
        order = pc.index_in(found["entity"], value_set=wanted)
        return found.take(pc.sort_indices(order))

    def offline_range(
        self,
        tenant: str,
        start: datetime,
        end: datetime,
        feature_set_version: str | None = None,
        snapshot_id: int | None = None,
    ) -> pa.Table:
        """Feature rows of ``tenant`` whose window ends in ``[start, end)``, oldest first."""
        rows = self._load().scan(row_filter=self._range(tenant, start, end, feature_set_version), snapshot_id=snapshot_id)
        return rows.to_arrow().sort_by([("window_end", "ascending"), ("entity", "ascending")])

    def offline_dataset(
        self,
        tenant: str,
        start: datetime,
        end: datetime,
        feature_set_version: str | None = None,
        snapshot_id: int | None = None,
    ) -> ray.data.Dataset:
        """The same range as a Ray Dataset read in parallel by Ray tasks (``ray.data.read_iceberg``),
        pinned to one snapshot so that a training run reads one consistent state."""
        equals = {"tenant": tenant}
        if feature_set_version is not None:
            equals["feature_set_version"] = feature_set_version
        pinned = snapshot_id if snapshot_id is not None else _current_id(self._load())
        return iceberg_dataset(
            self._table_identifier,
            self._catalog_kwargs(),
            pinned,
            equals=equals,
            time_column=FEATURES.time_column,
            start=start,
            end=end,
        )

    def _range(self, tenant: str, start: datetime, end: datetime, version: str | None) -> BooleanExpression:
        condition: BooleanExpression = And(
            EqualTo("tenant", tenant),
            And(GreaterThanOrEqual("window_end", time_literal(start)), LessThan("window_end", time_literal(end))),
        )
        return condition if version is None else And(condition, EqualTo("feature_set_version", version))

    def _refreshed_index(self, tenant: str) -> _LatestIndex:
        table = self._load()
        current = table.current_snapshot()
        if current is None:
            return _LatestIndex(0, table.scan(selected_fields=ONLINE_COLUMNS).to_arrow())
        index = self._indexes.get(tenant)
        if index is not None and index.snapshot_id == current.snapshot_id:
            return index
        condition = EqualTo("tenant", tenant)
        if index is not None and only_appends_since(table, index.snapshot_id):
            added = table.incremental_append_scan(
                from_snapshot_id_exclusive=index.snapshot_id, row_filter=condition, selected_fields=ONLINE_COLUMNS
            )
            latest = _newest_per_entity([index.latest, added.to_arrow()])
        else:
            rows = table.scan(row_filter=condition, selected_fields=ONLINE_COLUMNS, snapshot_id=current.snapshot_id)
            latest = _newest_per_entity([rows.to_arrow()])
        self._indexes[tenant] = _LatestIndex(current.snapshot_id, latest)
        return self._indexes[tenant]


def _newest_per_entity(parts: Iterable[pa.Table]) -> pa.Table:
    rows = pa.concat_tables(parts).sort_by([("entity", "ascending"), ("window_end", "descending")])
    if rows.num_rows == 0:
        return rows
    entities = np.asarray(rows["entity"].to_pylist(), dtype=object)
    first_of_entity = np.concatenate(([True], entities[1:] != entities[:-1]))
    return rows.filter(pa.array(first_of_entity))


def _current_id(table: Table) -> int | None:
    snapshot = table.current_snapshot()
    return snapshot.snapshot_id if snapshot else None
