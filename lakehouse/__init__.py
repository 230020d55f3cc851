"""The lakehouse: Apache Iceberg tables (via pyiceberg) as rtml's system of record.

Other packages import from here only; ``lakehouse.api`` documents the whole surface:

- ``Lakehouse.open(settings)``: the catalog chosen by settings (embedded SQLite SQL catalog, or a
  PostgreSQL SQL / REST catalog with S3), tables created on first use; ``table(name)``;
- writes: ``append_idempotent(table, rows, keys=..., keys_bound_by_time=...)``, ``writer(table,
  ...)`` (a background ``BatchingWriter``), ``audit(...)``; keys are unique per tenant;
- reads: ``read(table, tenant, start, end, snapshot_id=/as_of=)``, ``snapshots(table)``,
  ``lineage(prediction_id, tenant)``, ``payload(event_row)``;
- ``registry`` (``ModelRegistry``: idempotent ``register(model, client_token=...)``,
  compare-and-swap ``update_weights``) and ``features`` (``FeatureStore``);
- operations: ``erase(subject, actor, tenant=None)`` (with a tombstone that later appends respect),
  ``maintain()``, ``replicate(to=...)``.

Tables: ``events``, ``features``, ``predictions``, ``feedback``, ``models``, ``enrichments``,
``audit``, ``erasures`` (``lakehouse.tables`` has their columns, keys and partitioning).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# Where each public name lives; loaded on first use so that `rtml --help` (which imports the
# CLI modules) does not pay for pyiceberg and pyarrow.
_EXPORTS = {
    "Lakehouse": "lakehouse.api",
    "Lineage": "lakehouse.api",
    "BatchingWriter": "lakehouse.writer",
    "ErasureReport": "lakehouse.erasure",
    "FeatureStore": "lakehouse.features",
    "feature_id": "lakehouse.features",
    "LakehouseError": "lakehouse.errors",
    "TableMetadataError": "lakehouse.errors",
    "MaintenanceReport": "lakehouse.maintenance",
    "ModelRegistry": "lakehouse.registry",
    "ReplicationReport": "lakehouse.replication",
    "SnapshotInfo": "lakehouse.snapshots",
    "TABLES": "lakehouse.tables",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from lakehouse.api import Lakehouse, Lineage
    from lakehouse.erasure import ErasureReport
    from lakehouse.errors import LakehouseError, TableMetadataError
    from lakehouse.features import FeatureStore, feature_id
    from lakehouse.maintenance import MaintenanceReport
    from lakehouse.registry import ModelRegistry
    from lakehouse.replication import ReplicationReport
    from lakehouse.snapshots import SnapshotInfo
    from lakehouse.tables import TABLES
    from lakehouse.writer import BatchingWriter


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lakehouse' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
