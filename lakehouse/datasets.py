"""Ray Datasets over Iceberg tables (``ray.data.read_iceberg``): batch jobs such as training read
the lakehouse in parallel Ray tasks, pinned to one snapshot so that a run sees one consistent
state and can record it as lineage."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ray.data


def iceberg_dataset(
    table_identifier: str,
    catalog_kwargs: dict[str, Any],
    snapshot_id: int | None,
    *,
    equals: dict[str, Any] | None = None,
    time_column: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    columns: Sequence[str] | None = None,
    num_cpus: float | None = None,
) -> ray.data.Dataset:
    """Rows of one snapshot whose ``equals`` columns match and whose ``time_column`` lies in
    ``[start, end)``. Ray Data pushes the predicate down into the Iceberg scan, so files of other
    tenants and days are never read. Every task of the read asks for ``num_cpus`` logical CPUs
    (Ray Data's default when None)."""
    import ray.data
    from ray.data.expressions import col

    predicate = None
    conditions = [col(name) == value for name, value in (equals or {}).items()]
    if start is not None:
        conditions.append(col(time_column) >= start)
    if end is not None:
        conditions.append(col(time_column) < end)
    for condition in conditions:
        predicate = condition if predicate is None else predicate & condition
    dataset = ray.data.read_iceberg(
        table_identifier=table_identifier, catalog_kwargs=catalog_kwargs, snapshot_id=snapshot_id, num_cpus=num_cpus
    )
    if predicate is not None:
        dataset = dataset.filter(expr=predicate, num_cpus=num_cpus)
    return dataset if columns is None else dataset.select_columns(list(columns), num_cpus=num_cpus)
