"""The lakehouse's one backend: an Iceberg catalog chosen by settings alone.

Embedded default: pyiceberg's SQL catalog on a SQLite file with a local warehouse folder, both under
``settings.home``. Production: the same SQL catalog on PostgreSQL (``catalog_uri =
"postgresql+psycopg2://..."``) or a REST catalog (``catalog_type = "rest"``), with an ``s3://``
warehouse whose endpoint and keys go in ``catalog_properties``. Nothing else in the package knows
which one is in use.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pydantic import ValidationError
from pyiceberg.exceptions import ValidationError as MetadataValidationError
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.exceptions import NoSuchTableError
from pyiceberg.table import Table

from lakehouse.commits import retry_on_conflict
from lakehouse.errors import LakehouseError, TableMetadataError
from lakehouse.tables import TABLE_PROPERTIES, TABLES, TableDef
from rtml.settings import LakehouseSettings

# What a missing or damaged metadata file surfaces as when pyiceberg reads it.
_METADATA_READ_ERRORS = (
    OSError,
    ValueError,
    KeyError,
    json.JSONDecodeError,
    UnicodeDecodeError,
    ValidationError,
    MetadataValidationError,
)


log = logging.getLogger(__name__)

# Table properties that only table creation can set.
_FIXED_AT_CREATION = {"format-version"}


def catalog_properties(settings: LakehouseSettings, home: Path) -> dict[str, str]:
    """pyiceberg catalog properties for these settings; empty URI/warehouse mean "under home"."""
    root = home / "lakehouse"
    uri = settings.catalog_uri
    if not uri:
        if settings.catalog_type != "sql":
            raise LakehouseError("lakehouse.catalog_uri must name the REST catalog's URL when catalog_type is 'rest'")
        root.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{root / 'catalog.db'}"
    warehouse = settings.warehouse
    if not warehouse:
        (root / "warehouse").mkdir(parents=True, exist_ok=True)
        warehouse = (root / "warehouse").as_uri()
    elif "://" not in warehouse:
        Path(warehouse).mkdir(parents=True, exist_ok=True)
        warehouse = Path(warehouse).resolve().as_uri()
    return {"type": settings.catalog_type, "uri": uri, "warehouse": warehouse, **settings.catalog_properties}


def open_catalog(settings: LakehouseSettings, home: Path) -> Catalog:
    properties = catalog_properties(settings, home)
    try:
        return load_catalog(settings.catalog_name, **properties)
    except Exception as error:  # a catalog that cannot be reached: say which one, not how it failed inside
        raise LakehouseError(
            f"cannot open the Iceberg {settings.catalog_type} catalog at {properties['uri']}: {error}"
        ) from error


def ensure_tables(catalog: Catalog, namespace: str, commit_retries: int) -> None:
    """Create the namespace and any missing table, and bring existing tables up to date: the
    current ``TABLE_PROPERTIES``, the columns added since the table was made (optional ones, at
    the end) and the current key columns as identifier fields. Safe when several processes do it
    at once."""
    catalog.create_namespace_if_not_exists(namespace)
    existing = {identifier[-1] for identifier in catalog.list_tables(namespace)}
    for table in TABLES.values():
        if table.name not in existing:
            catalog.create_table_if_not_exists(
                (namespace, table.name),
                schema=table.schema,
                partition_spec=table.partition_spec(),
                properties=TABLE_PROPERTIES,
            )
        else:
            try:
                retry_on_conflict(table.name, commit_retries, lambda table=table: _bring_up_to_date(catalog, namespace, table))
            except TableMetadataError as error:  # the tables that can be read stay usable; this one fails where it is used
                log.warning("%s", error)


def _bring_up_to_date(catalog: Catalog, namespace: str, table: TableDef) -> None:
    current = load_table(catalog, namespace, table.name)
    changed = {
        key: value
        for key, value in TABLE_PROPERTIES.items()
        if key not in _FIXED_AT_CREATION and current.properties.get(key) != value
    }
    schema = current.schema()
    missing_columns = set(table.schema.column_names) - set(schema.column_names)
    keys_differ = schema.identifier_field_names() != set(table.keys)
    if not (changed or missing_columns or keys_differ):
        return
    log.info(
        "bringing table %s.%s up to date: properties %s, new columns %s, keys %s",
        *(namespace, table.name, sorted(changed), sorted(missing_columns), table.keys),
    )
    with current.transaction() as updating:
        if changed:
            updating.set_properties(changed)
        if missing_columns or keys_differ:
            with updating.update_schema() as evolving:
                evolving.union_by_name(table.schema)
                evolving.set_identifier_fields(*table.keys)


def load_table(catalog: Catalog, namespace: str, name: str) -> Table:
    """The table with its current metadata; missing or corrupt metadata is a ``TableMetadataError``."""
    try:
        return catalog.load_table((namespace, name))
    except NoSuchTableError as error:
        raise LakehouseError(
            f"table {namespace}.{name} is not in the catalog ({error}); `Lakehouse.open` creates missing tables"
        ) from None
    except _METADATA_READ_ERRORS as error:
        raise TableMetadataError(f"{namespace}.{name}", _location_from(error), error) from error


def _location_from(error: BaseException) -> str | None:
    return getattr(error, "filename", None)
