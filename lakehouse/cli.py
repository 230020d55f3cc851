"""`rtml erase` and `rtml lakehouse maintain | replicate`. Heavy imports stay inside the commands."""

from __future__ import annotations

import getpass
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from lakehouse.errors import LakehouseError
from rtml.settings import LakehouseSettings, get_settings

app = typer.Typer(help="Lakehouse maintenance and replication.", no_args_is_help=True)
console = Console()


def erase(
    subject: Annotated[str, typer.Option("--subject", help="The data subject's id, as in the tables' `subject` column.")],
    actor: Annotated[
        Optional[str], typer.Option(help="Who asks for the erasure (recorded in the audit table); default: your login.")
    ] = None,
    tenant: Annotated[
        Optional[str],
        typer.Option(
            help="Erase only this tenant's rows about the subject (another tenant's subject of that id keeps its rows); "
            "default: every tenant."
        ),
    ] = None,
) -> None:
    """Right to erasure: delete every row about a data subject, in every table and snapshot."""
    from lakehouse import Lakehouse

    report = Lakehouse.open().erase(subject, actor=actor or _login(), tenant=tenant)
    scope = "every tenant" if report.tenant is None else f"tenant {report.tenant}"
    table = Table(title=f"erased subject {report.subject_digest} in {scope}")
    for column in ("table", "rows removed", "snapshots expired", "files deleted", "blobs deleted"):
        table.add_column(column, justify="left" if column == "table" else "right")
    for erased in report.tables:
        table.add_row(
            erased.table,
            str(erased.rows_removed),
            str(erased.snapshots_expired),
            str(erased.files_deleted),
            str(erased.blobs_deleted),
        )
    console.print(table)
    console.print(
        f"{report.rows_removed} row(s) removed; the erasure is recorded in the audit table, and its tombstone "
        "keeps later appends (replays) from bringing the subject's rows back."
    )


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
        str,
        typer.Option(
            "--to",
            help="A folder (an embedded SQLite catalog and warehouse are kept in it), or a catalog URI: "
            "sqlite:///..., postgresql+psycopg2://... or http(s)://... for a REST catalog.",
        ),
    ],
    warehouse: Annotated[Optional[str], typer.Option(help="The replica's warehouse, for a catalog URI.")] = None,
) -> None:
    """Replicate every table's snapshot to a second catalog/warehouse."""
    from lakehouse import Lakehouse

    reports = Lakehouse.open().replicate(to=replica_settings(to, warehouse))
    table = Table(title=f"replicated to {to}")
    for column in ("table", "primary snapshot", "mode", "rows copied"):
        table.add_column(column, justify="right" if column == "rows copied" else "left")
    for report in reports:
        table.add_row(report.table, str(report.source_snapshot_id or "-"), report.mode, str(report.rows_copied))
    console.print(table)


def replica_settings(to: str, warehouse: str | None) -> LakehouseSettings:
    """Lakehouse settings for a replica named on the command line."""
    primary = get_settings().lakehouse
    if "://" not in to:
        folder = Path(to).expanduser().resolve()
        folder.mkdir(parents=True, exist_ok=True)
        return primary.model_copy(
            update={"catalog_type": "sql", "catalog_uri": f"sqlite:///{folder / 'catalog.db'}", "warehouse": str(folder / "warehouse")}
        )
    if not warehouse:
        raise LakehouseError(f"--to {to} is a catalog URI: name the replica's warehouse too (--warehouse PATH_OR_URI)")
    catalog_type = "rest" if to.startswith(("http://", "https://")) else "sql"
    return primary.model_copy(update={"catalog_type": catalog_type, "catalog_uri": to, "warehouse": warehouse})


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return f"uid:{os.getuid()}"

