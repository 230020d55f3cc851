"""`rtml lakehouse maintain | replicate`. Heavy imports stay inside the commands (`rtml erase`, which
reaches every store, is in ``api.cli``)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from lakehouse.errors import LakehouseError

app = typer.Typer(help="Lakehouse maintenance and replication.", no_args_is_help=True)
console = Console()


@app.command()
def maintain(
    retention_hours: Annotated[
        Optional[float], typer.Option(help="Expire snapshots older than this (default: lakehouse.snapshot_retention_hours).")
    ] = None,
) -> None:
    """Compact small files and expire old snapshots."""
    from lakehouse import Lakehouse

    reports = Lakehouse.open().maintain(retention_hours)
    table = Table(title="lakehouse maintenance")
    for column in ("table", "data files before", "after", "partitions compacted", "snapshots expired", "files deleted"):
        table.add_column(column, justify="left" if column == "table" else "right")
    for report in reports:
        table.add_row(
            report.table,
            str(report.data_files_before),
            str(report.data_files_after),
            str(report.partitions_compacted),
            str(report.snapshots_expired),
            str(report.files_deleted),
        )
    console.print(table)


@app.command()
def replicate(
    to: Annotated[
        Optional[str],
        typer.Option(
            "--to",
            help="A folder (an embedded SQLite catalog and warehouse are kept in it), or a catalog URI: "
            "sqlite:///..., postgresql+psycopg2://... or http(s)://... for a REST catalog; "
            "default: every replica in lakehouse.replicas.",
        ),
    ] = None,
    warehouse: Annotated[Optional[str], typer.Option(help="The replica's warehouse, for a catalog URI.")] = None,
) -> None:
    """Replicate every table's snapshot to a second catalog/warehouse (or to each configured replica)."""
    from lakehouse import Lakehouse
    from rtml.settings import get_settings

    settings = get_settings()
    lake = Lakehouse.open(settings)
    if to is not None:
        targets = [(to, to, warehouse or "")]
    else:
        targets = [(replica.name, replica.to, replica.warehouse) for replica in lake.settings.replicas]
        if not targets:
            raise LakehouseError("name the replica (--to FOLDER_OR_URI), or list the replicas in lakehouse.replicas")
    for name, where, replica_warehouse in targets:
        reports = lake.replicate(to=Lakehouse.open_replica(settings, where, replica_warehouse))
        table = Table(title=f"replicated to {name}")
        for column in ("table", "primary snapshot", "mode", "rows copied"):
            table.add_column(column, justify="right" if column == "rows copied" else "left")
        for report in reports:
            table.add_row(report.table, str(report.source_snapshot_id or "-"), report.mode, str(report.rows_copied))
        console.print(table)
