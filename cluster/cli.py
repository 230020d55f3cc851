"""`rtml services up | down | status | restart`: the real servers the tests talk to, on loopback."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="Fetch, start, stop and inspect the local test services.", no_args_is_help=True)
console = Console()

ServiceNames = Annotated[
    list[str] | None,
    typer.Argument(help="Services to act on (kafka, neo4j, elasticsearch, prometheus, postgres); default all."),
]


def _with_progress(action, names: list[str] | None) -> None:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from cluster import services

    chosen = services.select(names or ())
    columns = (SpinnerColumn(finished_text="•"), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        tasks = {service.name: progress.add_task(service.name, total=1) for service in chosen}

        def report(service, message: str, finished: bool) -> None:
            progress.update(tasks[service.name], description=f"{service.name}: {message}", completed=int(finished))

        action(chosen, report)


@app.command()
def up(names: ServiceNames = None) -> None:
    """Fetch (once, then from the download cache) and start the services in parallel; wait until each answers."""
    from cluster import services

    _with_progress(services.up, names)


@app.command()
def down(names: ServiceNames = None) -> None:
    """Stop the services started from this checkout (by their pid files)."""
    from cluster import services

    _with_progress(services.down, names)


@app.command()
def restart(name: Annotated[str, typer.Argument(help="The service to restart, e.g. kafka.")]) -> None:
    """Stop one service and start it again on the same data; returns once it answers."""
    from cluster import services

    service = services.get(name)
    with console.status(f"restarting {name}"):
        service.restart()
    console.print(f"{name}: up at {service.address}")


@app.command()
def status() -> None:
    """Each service, its address, its pid and whether it answers; exits 1 when any does not."""
    from concurrent.futures import ThreadPoolExecutor

    from rich.table import Table

    from cluster import services

    chosen = services.select()
    with ThreadPoolExecutor(max_workers=len(chosen)) as pool:
        healthy = list(pool.map(lambda service: service.is_healthy(), chosen))
    table = Table("service", "pid", "state")
    table.add_column("address", overflow="fold")
    for service, answers in zip(chosen, healthy, strict=True):
        pid = service.pid()
        if answers:
            state = "[green]up[/]" if pid else "[green]up[/] (not started from this checkout)"
        else:
            state = "[yellow]running, not answering[/]" if pid else "[red]down[/]"
        table.add_row(service.name, str(pid or "-"), state, service.address)
    console.print(table)
    console.print(f"Data and logs: {chosen[0].data_dir.parent}/<service>/ (log: <service>.log)")
    if not all(healthy):
        raise typer.Exit(1)
