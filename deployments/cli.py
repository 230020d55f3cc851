"""`rtml up`: a local Ray cluster with the serving app on embedded defaults. Heavy imports stay
inside the function, so that `rtml --help` stays instant."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.console import Console

console = Console()


def up(
    demo: Annotated[bool, typer.Option(help="Train and promote two small models for the 'demo' tenant if it has none.")] = True,
) -> None:
    """Start a local Ray cluster and the Serve app on embedded defaults; print the URLs."""
    # Before Ray is imported: send the token of Ray's token authentication, which `ray start`
    # turns on (a mode the user set is kept).
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from deployments import control
    from rtml.settings import get_settings

    settings = get_settings()
    settings = settings.model_copy(update={"home": settings.home_dir})
    with console.status("starting Ray"):
        cluster = control.connect_or_start_cluster(settings)
    for note in cluster.notes:
        console.print(f"[yellow]note:[/] {note}")
    if demo:
        from deployments.demo_models import DEMO_TENANT, ensure_demo_tenant
        from lakehouse import Lakehouse

        with console.status(f"making sure tenant {DEMO_TENANT!r} has trained models"):
            models = ensure_demo_tenant(Lakehouse.open(settings), settings.home_dir / "models")
        console.print(f"tenant [bold]{DEMO_TENANT}[/]: " + ", ".join(model.key for model in models))
    with console.status("deploying the serving app"):
        control.deploy(settings)
    address = control.http_address()
    prefix = settings.serving.route_prefix.rstrip("/")
    console.print(f"Ray cluster {'started' if cluster.started else 'in use'}; stop it with `ray stop`")
    console.print(f"  predict:        POST {address}{prefix}/v1/predict   (JSON, .npy or Arrow IPC)")
    console.print(f"  health:         GET  {address}{prefix}/healthz")
    for name, (status, route) in control.running_apps().items():
        if name != settings.serving.app_name:  # e.g. the GraphQL API once it is deployed
            console.print(f"  app {name:10s} {status}: {address}{route.rstrip('/')}")
    console.print(f"  Ray dashboard:  http://{cluster.dashboard_url or f'127.0.0.1:{settings.serving.dashboard_port}'}")
