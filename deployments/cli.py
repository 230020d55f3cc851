"""`rtml up`: a local Ray cluster with the serving app on embedded defaults; `rtml demo`: the main
job, the stream replayed through that app; `rtml nab`: the NAB corpus replayed through it (these
commands live here, above both streaming and deployments, because they wire one to the other). Heavy imports stay inside the functions, so that
`rtml --help` stays instant."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from models.cli import nab_offline, nab_score

console = Console()

nab_app = typer.Typer(
    help="Run the anomaly detector over a NAB corpus through the stream (`rtml nab --data D --out O`), and "
    "score results (`rtml nab score --results O --labels W.json`).",
    invoke_without_command=True,
)
nab_app.command("score")(nab_score)


@nab_app.callback()
def nab(
    ctx: typer.Context,
    data: Optional[Path] = typer.Option(None, help="NAB data directory: <category>/<name>.csv with timestamp,value."),
    out: Optional[Path] = typer.Option(None, help="Where to write <category>/<name>.csv with anomaly_score."),
    offline: bool = typer.Option(False, "--offline", help="Run the detector in this process instead of through the stream (same scores)."),
    workers: int = typer.Option(0, help="--offline: parallel series (Ray tasks); 0 = one per free core."),
    consumers: int = typer.Option(2, help="Stream consumers (actors)."),
    seed: int = typer.Option(0, help="Seed of the forecasters' training (the figures in RESULTS.md name theirs)."),
) -> None:
    """Replay every series of a NAB-layout directory as one entity's stream through the consumers,
    the Serve app and the per-entity detector, and write NAB result files from the predictions."""
    if ctx.invoked_subcommand is not None:
        return
    if data is None or out is None:
        raise typer.BadParameter("give both --data DIR and --out DIR (or a subcommand: `rtml nab score`)")
    if offline:
        nab_offline(data, out, workers, seed)
        return
    import logging
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from deployments.stream_client import deploy_scoring
    from rtml.settings import get_settings
    from streaming.nab import run_stream

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    settings = get_settings()
    settings = settings.model_copy(update={"detector": settings.detector.model_copy(update={"seed": seed})})
    started = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task("values durable in the predictions table", total=None)
        names = run_stream(
            data, out, settings, deploy_scoring, consumers=consumers,
            on_progress=lambda durable, total: bar.update(task, completed=durable, total=total or None),
        )  # fmt: skip
    console.print(f"wrote {len(names)} result files to {out} in {time.perf_counter() - started:.0f} s (through the stream)")


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
    tls = control.tls_enabled(settings)
    if tls:  # a wrong TLS setting is said now, not after minutes of start-up
        control.check_tls_settings(settings)
    with console.status("starting Ray"):
        cluster = control.connect_or_start_cluster(settings)
    for note in cluster.notes:
        console.print(f"[yellow]note:[/] {note}")
    if (registered := control.register_with_prometheus(settings, cluster)) is not None:
        console.print(f"Prometheus scrapes the cluster: {registered}")
    if demo:
        from deployments.demo_models import DEMO_TENANT, ensure_demo_tenant
        from lakehouse import Lakehouse

        with console.status(f"making sure tenant {DEMO_TENANT!r} has trained models"):
            models = ensure_demo_tenant(Lakehouse.open(settings), settings.home_dir / "models", settings.models.window_length)
        console.print(f"tenant [bold]{DEMO_TENANT}[/]: " + ", ".join(model.key for model in models))
    with console.status("deploying the serving app"):
        control.deploy(settings)
    address = control.http_address()
    if tls:
        plain = address
        with console.status("starting the TLS entry"):
            address = control.start_tls_front(settings, plain.removeprefix("http://"))
        client_auth = settings.security.tls_client_auth
        console.print(f"TLS entry {address} (client certificates: {client_auth}) in front of Serve's plain HTTP at {plain} (loopback only)")
    prefix = settings.serving.route_prefix.rstrip("/")
    if cluster.started:
        console.print("Ray cluster started; stop it with `rtml down`")
    else:
        console.print("Ray cluster in use (not started here: `rtml down` leaves it running)")
    console.print(f"  GraphQL:        {address}{prefix}/graphql   (HTTP and WebSocket; header `authorization: Bearer $(rtml token issue --tenant T)`)")
    console.print(f"  ingest:         POST {address}{prefix}/v1/events   (JSON, a JSON array or NDJSON; /v1/events/binary for frames)")
    console.print(f"  predict:        POST {address}{prefix}/v1/predict   (JSON, .npy or Arrow IPC)")
    console.print(f"  OpenAPI:        GET  {address}{prefix}/openapi.json")
    console.print(f"  health:         GET  {address}{prefix}/healthz")
    for name, (status, route) in control.running_apps().items():
        if name != settings.serving.app_name:  # other apps on the same cluster
            console.print(f"  app {name:10s} {status}: {address}{route.rstrip('/')}")
    dashboard = f"http://{cluster.dashboard_url or f'127.0.0.1:{settings.serving.dashboard_port}'}"
    console.print(f"  Ray dashboard:  {dashboard}")
    # Ray's CLI sends the token of its token authentication only when told (RAY_AUTH_MODE).
    ray = "ray" if shutil.which("ray") else str(Path(sys.executable).with_name("ray"))
    console.print(f"  retrain:        RAY_AUTH_MODE=token {ray} job submit --address {dashboard} -- rtml train --tenant T")


def down() -> None:
    """Stop what `rtml up` started from this home: the TLS entry and the Ray cluster (by pid; other
    Ray clusters on the machine are left alone)."""
    from deployments import control
    from rtml.settings import get_settings

    stopped = control.down(get_settings())
    console.print("stopped " + " and ".join(stopped) if stopped else "nothing to stop: `rtml up` started nothing from this home that still runs")


def demo(
    kafka: Annotated[bool, typer.Option("--kafka", help="Go through the real Kafka broker (`rtml services up kafka`) instead of the file replay.")] = False,
    speed: Annotated[float, typer.Option(help="Replay speed: event time passes this many times faster than wall time.")] = 360.0,
    consumers: Annotated[int, typer.Option(help="Consumer actors (default: streaming.consumers).")] = 0,
) -> None:
    """The main job: replay bundled sensor streams through the whole pipeline and summarise."""
    import json
    import logging

    from deployments.agents import AgentGraphClient
    from deployments.control import throughput_environment
    from rtml.settings import get_settings
    from streaming.data.generate import TRUTH_FILE
    from streaming.demo import print_summary, run_demo
    from streaming.sources.kafka import require_kafka

    settings = get_settings()
    if consumers:
        settings = settings.model_copy(update={"streaming": settings.streaming.model_copy(update={"consumers": consumers})})
    if kafka:
        require_kafka(settings.kafka)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the progress bar and summary say what matters
    answers: list = []
    enrichments: list = []

    def while_serving(demo_settings) -> None:
        answers.append(_ask_graphql(demo_settings))
        if demo_settings.agents.enabled:
            enrichments.extend(_explained(demo_settings))

    result = run_demo(
        settings, _scoring_with_agents, console, kafka=kafka, speed=speed, ray_env=throughput_environment(settings),
        while_serving=while_serving, listener=lambda s: AgentGraphClient(s.serving.app_name) if s.agents.enabled else None,
    )  # fmt: skip
    print_summary(result, json.loads(TRUTH_FILE.read_text()), console)
    _print_incident(enrichments)
    _print_graphql(result.settings.home_dir, settings, *answers)


def _scoring_with_agents(demo_settings):
    """The demo's knowledge loaded into its agents' embedded backends, then the app deployed."""
    from agents.data import seed_demo
    from deployments.stream_client import deploy_scoring

    if demo_settings.agents.enabled:
        seed_demo(demo_settings)
    return deploy_scoring(demo_settings)


def _explained(settings) -> list[dict]:
    """The enrichments the app's agent graph stored, once its runs under way are done."""
    from ray import serve

    from deployments.names import AGENT_GRAPH

    return serve.get_deployment_handle(AGENT_GRAPH, settings.serving.app_name).drain.remote().result(timeout_s=120)


def _print_incident(enrichments: list[dict]) -> None:
    """One explained incident: the one with the most anomalies."""
    from agents.cli import print_enrichment

    opened = [e for e in enrichments if e["details"]["incident"]["status"] == "open"]
    incidents = {e["details"]["incident"]["incident_id"] for e in enrichments}
    if not opened:
        console.print("agents: no incident was explained")
        return
    largest = max(opened, key=lambda e: e["details"]["incident"]["anomalies"])
    console.print(f"agents: {len(incidents)} incidents explained; the largest, on {largest['entity']}:")
    print_enrichment(largest, console)


# What `rtml demo` asks the app's GraphQL API at the end, and shows the user how to ask again.
DEMO_TENANT_QUERIED = "acme"
DEMO_QUERY = "{ anomalies(first: 5) { edges { node { eventTime entity ensembleScore } } } }"


def _ask_graphql(settings) -> dict:
    """The demo's query, asked of the app that scored the replay (while it still runs)."""
    import httpx

    from api.cli import issue
    from deployments.control import http_address

    url = f"{http_address()}{settings.serving.route_prefix.rstrip('/')}/graphql"
    token = issue(settings, DEMO_TENANT_QUERIED, "reader", "rtml demo", ttl_s=300)
    return httpx.post(url, json={"query": DEMO_QUERY}, headers={"authorization": f"Bearer {token}"}, timeout=30).json()


def _print_graphql(demo_home: Path, settings, answer: dict | None = None) -> None:
    """What the app answered, and the two commands that ask it again (``settings``: those `rtml
    up` will run with)."""
    import shlex

    import orjson

    from api.cli import graphql_url

    if answer is not None:
        rows = [edge["node"] for edge in ((answer.get("data") or {}).get("anomalies") or {}).get("edges", [])]
        console.print(f"GraphQL: tenant {DEMO_TENANT_QUERIED}'s newest anomalies, as the app answered /graphql:")
        for row in rows:
            console.print(f"  {row['eventTime']}  {row['entity']:12s}  score {row['ensembleScore']:.3f}", highlight=False)
        for error in answer.get("errors", []):
            console.print(f"  [red]error:[/] {error.get('message')}")
    body = orjson.dumps({"query": DEMO_QUERY}).decode()
    console.print("Ask it yourself: serve this data with the API, then query it (any GraphQL client works too):")
    console.print(f"  RTML_HOME={demo_home} rtml up --no-demo", highlight=False, soft_wrap=True)
    console.print(
        f"  curl -s {graphql_url(settings)} -H 'content-type: application/json' "
        f"-H \"authorization: Bearer $(RTML_HOME={demo_home} rtml token issue --tenant {DEMO_TENANT_QUERIED})\" -d {shlex.quote(body)}",
        highlight=False,
        soft_wrap=True,
    )
