"""The lakehouse tables: Iceberg schemas, partitioning, keys, and the conversion of records to Arrow.

Every table but ``models`` and ``audit`` is partitioned by ``tenant`` and by the day of its time
column, because every read other packages make is "this tenant, this time range" (scoring history,
training sets, dashboards); the day transform keeps partitions few enough for small clusters while
still letting a range scan skip whole days. ``models`` is tiny and read by tenant; ``audit`` is read
by time.

Keys (``TableDef.keys``, also the Iceberg schemas' identifier fields) are unique per tenant:
``(tenant, event_id)`` for events and predictions, ``(tenant, <id>)`` for the other tenant-partitioned
tables, because ids come from clients and tenants do not coordinate them. ``models`` (names are
unique across tenants), ``audit`` and ``erasures`` keep a single key.

Every table that can hold personal data has a nullable ``subject`` column so that erasure can find
the rows (see ``lakehouse.erasure``), and a ``tenant`` column, because an erasure may be scoped to
one tenant. Column statistics of ``subject`` are switched off: Iceberg
otherwise copies each file's lowest and highest value into manifests, which would keep subject ids
in metadata files after their rows are gone.

Columns added to a table after its first release go at the end of its field list and are optional:
``catalog.ensure_tables`` adds them to existing tables, which number them after their existing
fields, while a new table numbers every top-level field before the nested ones. The field ids of
the two can therefore differ, and ``conform`` gives rows the ids of the table they go into.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from typing import Any

import pyarrow as pa
from pydantic import BaseModel
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema, assign_fresh_schema_ids
from pyiceberg.table import Table
from pyiceberg.transforms import DayTransform, IdentityTransform
from pyiceberg.types import (
    BinaryType,
    BooleanType,
    DoubleType,
    IntegerType,
    ListType,
    LongType,
    MapType,
    NestedField,
    StringType,
    TimestamptzType,
)

from lakehouse.errors import LakehouseError

SUBJECT = "subject"

# Our writers re-check keys after a conflict themselves (lakehouse.writer), so pyiceberg must not
# silently re-apply a stale batch on its own; old metadata files are dropped so that an erased
# subject's snapshots do not linger in metadata history. Appends merge the manifests once enough
# have gathered (pyiceberg's merge append; fast appends added one manifest per commit for ever, and
# every scan, the writers' key check included, reads them all). ``format-version`` is fixed at
# creation; ``catalog.ensure_tables`` brings the others up to date on existing tables.
TABLE_PROPERTIES = {
    "format-version": "2",
    "commit.retry.num-retries": "0",
    f"write.metadata.metrics.column.{SUBJECT}": "none",
    "write.metadata.delete-after-commit.enabled": "true",
    "write.metadata.previous-versions-max": "20",
    "commit.manifest-merge.enabled": "true",
}


@dataclass(frozen=True)
class TableDef:
    """What the lakehouse knows about one table: its shape, its key columns and its time column."""

    name: str
    schema: Schema
    keys: tuple[str, ...]
    time_column: str
    partition_by_tenant: bool = True
    # Columns written as JSON text (free-form dictionaries such as event attributes).
    json_columns: tuple[str, ...] = ()

    @property
    def has_subject(self) -> bool:
        return any(field.name == SUBJECT for field in self.schema.fields)

    def partition_spec(self) -> PartitionSpec:
        fields = []
        if self.partition_by_tenant:
            fields.append(PartitionField(self._field_id("tenant"), 1000, IdentityTransform(), "tenant"))
        fields.append(
            PartitionField(self._field_id(self.time_column), 1000 + len(fields), DayTransform(), f"{self.time_column}_day")
        )
        return PartitionSpec(*fields)

    def arrow_schema(self) -> pa.Schema:
        return self.schema.as_arrow()

    def _field_id(self, name: str) -> int:
        return self.schema.find_field(name).field_id


class _Fields:
    """Hands out field ids in order, so the schemas below read as plain column lists."""

    def __init__(self) -> None:
        self._next = 0

    def _id(self) -> int:
        self._next += 1
        return self._next

    def required(self, name: str, field_type: Any) -> NestedField:
        return NestedField(self._id(), name, field_type, required=True)

    def optional(self, name: str, field_type: Any) -> NestedField:
        return NestedField(self._id(), name, field_type, required=False)

    def string_map(self, name: str, value_type: Any) -> NestedField:
        field_id = self._id()
        return NestedField(field_id, name, MapType(self._id(), StringType(), self._id(), value_type, False), required=False)

    def double_list(self, name: str) -> NestedField:
        field_id = self._id()
        return NestedField(field_id, name, ListType(self._id(), DoubleType(), element_required=True), required=True)


def _schema(keys: tuple[str, ...], build: Any) -> Schema:
    fields = build(_Fields())
    key_ids = [next(field.field_id for field in fields if field.name == key) for key in keys]
    # Numbered the way the catalog renumbers a new table's fields, so that Arrow tables built from
    # this schema carry the field ids a new table really has (``conform`` covers evolved ones).
    return assign_fresh_schema_ids(Schema(*fields, identifier_field_ids=key_ids))


# A key that is unique per tenant: ids come from clients, and tenants do not coordinate them.
EVENT_KEYS = ("tenant", "event_id")


EVENTS = TableDef(
    name="events",
    keys=EVENT_KEYS,
    time_column="event_time",
    json_columns=("attributes",),
    schema=_schema(
        EVENT_KEYS,
        lambda f: [
            f.required("event_id", StringType()),
            f.required("tenant", StringType()),
            f.required("entity", StringType()),
            f.required("data_type", StringType()),
            f.required("event_time", TimestamptzType()),
            f.optional("value", DoubleType()),
            f.optional("attributes", StringType()),
            # Small binary payloads inline; larger ones as a blob that payload_uri points to.
            f.optional("payload", BinaryType()),
            f.optional("payload_uri", StringType()),
            f.optional(SUBJECT, StringType()),
        ],
    ),
)

FEATURES = TableDef(
    name="features",
    keys=("tenant", "feature_id"),
    time_column="window_end",
    schema=_schema(
        ("tenant", "feature_id"),
        lambda f: [
            f.required("feature_id", StringType()),
            f.required("tenant", StringType()),
            f.required("entity", StringType()),
            f.required("window_start", TimestamptzType()),
            f.required("window_end", TimestamptzType()),
            f.required("feature_set_version", StringType()),
            f.double_list("vector"),
            f.optional("created_at", TimestamptzType()),
            f.optional(SUBJECT, StringType()),
        ],
    ),
)

# Keyed by the event: a replay re-scores the same events under fresh prediction ids, and must not add rows.
PREDICTIONS = TableDef(
    name="predictions",
    keys=EVENT_KEYS,
    time_column="event_time",
    schema=_schema(
        EVENT_KEYS,
        lambda f: [
            f.required("prediction_id", StringType()),
            f.required("event_id", StringType()),
            f.required("tenant", StringType()),
            f.required("entity", StringType()),
            f.required("event_time", TimestamptzType()),
            f.string_map("scores", DoubleType()),
            f.required("ensemble_score", DoubleType()),
            f.required("is_anomaly", BooleanType()),
            f.string_map("model_versions", StringType()),
            f.required("latency_ms", DoubleType()),
            f.required("created_at", TimestamptzType()),
            f.optional(SUBJECT, StringType()),
        ],
    ),
)

FEEDBACK = TableDef(
    name="feedback",
    keys=("tenant", "feedback_id"),
    time_column="created_at",
    schema=_schema(
        ("tenant", "feedback_id"),
        lambda f: [
            f.required("feedback_id", StringType()),
            f.required("prediction_id", StringType()),
            f.required("tenant", StringType()),
            f.required("is_anomaly", BooleanType()),
            f.optional("comment", StringType()),
            f.optional("author", StringType()),
            f.required("created_at", TimestamptzType()),
            f.optional(SUBJECT, StringType()),
        ],
    ),
)

MODELS = TableDef(
    name="models",
    keys=("model_key",),
    time_column="created_at",
    schema=_schema(
        ("model_key",),
        lambda f: [
            f.required("model_key", StringType()),
            f.required("name", StringType()),
            f.required("version", IntegerType()),
            f.required("kind", StringType()),
            f.required("tenant", StringType()),
            f.required("status", StringType()),
            f.string_map("metrics", DoubleType()),
            f.required("artifact_uri", StringType()),
            f.required("ensemble_weight", DoubleType()),
            f.string_map("training_snapshot_ids", LongType()),
            f.optional("feature_set_version", StringType()),
            f.required("created_at", TimestamptzType()),
            # The client's token of the registration that made this version (``ModelRegistry.register``).
            f.optional("registration_token", StringType()),
        ],
    ),
)

ENRICHMENTS = TableDef(
    name="enrichments",
    keys=("tenant", "enrichment_id"),
    time_column="created_at",
    json_columns=("details",),
    schema=_schema(
        ("tenant", "enrichment_id"),
        lambda f: [
            f.required("enrichment_id", StringType()),
            f.required("tenant", StringType()),
            f.optional("prediction_id", StringType()),
            f.optional("event_id", StringType()),
            f.optional("entity", StringType()),
            f.required("source", StringType()),  # the agent node that produced it
            f.optional("summary", StringType()),
            f.optional("details", StringType()),
            f.required("created_at", TimestamptzType()),
            f.optional(SUBJECT, StringType()),
        ],
    ),
)

# Append-only. It names a data subject only by digest, so that recording an erasure keeps no trace
# of whom it was about (and erasure never has to rewrite the audit trail).
AUDIT = TableDef(
    name="audit",
    keys=("audit_id",),
    time_column="at",
    partition_by_tenant=False,
    json_columns=("details",),
    schema=_schema(
        ("audit_id",),
        lambda f: [
            f.required("audit_id", StringType()),
            f.required("at", TimestamptzType()),
            f.required("actor", StringType()),
            f.required("action", StringType()),
            f.required("table_name", StringType()),
            f.optional("row_filter", StringType()),
            f.required("row_count", LongType()),
            f.optional("snapshot_id", LongType()),
            f.optional("details", StringType()),
        ],
    ),
)

# Tombstones of erased data subjects (``lakehouse.erasure``), which every append of rows with a
# subject checks. Like the audit trail it names a subject only by digest. ``tenant`` is set on the
# tombstone of an erasure in one tenant (whose digest covers the tenant too, so the single key
# holds) and null for one in every tenant, as every tombstone from before it was added is.
ERASURES = TableDef(
    name="erasures",
    keys=("subject_digest",),
    time_column="erased_at",
    partition_by_tenant=False,
    schema=_schema(
        ("subject_digest",),
        lambda f: [
            f.required("subject_digest", StringType()),
            f.required("erased_at", TimestamptzType()),
            f.required("actor", StringType()),
            f.optional("tenant", StringType()),
        ],
    ),
)

TABLES: dict[str, TableDef] = {
    table.name: table for table in (EVENTS, FEATURES, PREDICTIONS, FEEDBACK, MODELS, ENRICHMENTS, AUDIT, ERASURES)
}


def time_literal(moment: datetime) -> str:
    """A timestamp as pyiceberg filter literal; naive datetimes are taken as UTC like the kernel does."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).isoformat()


def table_def(name: str) -> TableDef:
    try:
        return TABLES[name]
    except KeyError:
        raise LakehouseError(f"there is no lakehouse table {name!r}; the tables are: {', '.join(TABLES)}") from None


Rows = pa.Table | Iterable[Mapping[str, Any] | BaseModel]


def to_arrow(table: TableDef, rows: Rows) -> pa.Table:
    """Rows (Arrow, dicts or pydantic records such as ``rtml.schemas.Event``) as an Arrow table with
    exactly the table's schema. Missing optional columns become nulls; a missing required value or
    an unknown column is a ``LakehouseError`` that names it, and nothing is written."""
    if not isinstance(rows, pa.Table):
        rows = _records_to_arrow(table, rows)
    schema = table.arrow_schema()
    unknown = set(rows.column_names) - set(schema.names)
    if unknown:
        raise LakehouseError(
            f"{table.name}: column(s) {sorted(unknown)} are not in the table (its columns are {schema.names})"
        )
    columns = []
    for field in schema:
        if field.name not in rows.column_names:
            if not field.nullable:
                raise LakehouseError(f"{table.name}: required column {field.name!r} is missing")
            columns.append(pa.nulls(rows.num_rows, field.type))
            continue
        column = rows[field.name]
        try:
            # Timestamps may arrive in nanoseconds (pandas); Iceberg keeps microseconds.
            column = column.cast(field.type, safe=not pa.types.is_timestamp(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as error:
            raise LakehouseError(f"{table.name}: column {field.name!r} does not fit type {field.type}: {error}") from None
        if not field.nullable and column.null_count:
            raise LakehouseError(f"{table.name}: required column {field.name!r} has {column.null_count} null value(s)")
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def _records_to_arrow(table: TableDef, rows: Iterable[Mapping[str, Any] | BaseModel]) -> pa.Table:
    records = [plain_record(row) for row in rows]
    if not records:
        return table.arrow_schema().empty_table()
    for record in records:
        for column in table.json_columns:
            if record.get(column) is not None and not isinstance(record[column], str):
                record[column] = json.dumps(record[column], sort_keys=True, default=str)
    names = list(dict.fromkeys(name for record in records for name in record))
    types = {field.name: field.type for field in table.arrow_schema()}
    try:
        return pa.table({name: pa.array([r.get(name) for r in records], type=types.get(name)) for name in names})
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as error:
        raise LakehouseError(f"{table.name}: rows do not fit the table's columns: {error}") from None


def conform(rows: pa.Table, table: Table) -> pa.Table:
    """``rows`` (with the table's columns, as ``to_arrow`` makes them) carrying the field ids of the
    loaded ``table``: pyiceberg matches an Arrow table to the table schema by field id, and a table
    that gained columns numbers them differently from a new one (see the module docstring)."""
    schema = table.schema().as_arrow()
    if rows.schema.equals(schema, check_metadata=True):
        return rows
    name = ".".join(table.name())
    if missing := set(schema.names) - set(rows.column_names):
        raise LakehouseError(f"table {name} has column(s) {sorted(missing)} that this rtml does not know; upgrade rtml to write to it")
    if unknown := set(rows.column_names) - set(schema.names):
        raise LakehouseError(f"table {name} lacks column(s) {sorted(unknown)}; `Lakehouse.open` adds them to existing tables")
    return rows.select(schema.names).cast(schema)


def plain_record(row: Mapping[str, Any] | BaseModel) -> dict[str, Any]:
    record = row.model_dump() if isinstance(row, BaseModel) else dict(row)
    return {name: value.value if isinstance(value, Enum) else value for name, value in record.items()}
