"""`rtml graph load` (the dependency graph), `rtml agents index` (the search index's documents) and
`rtml agents explain` (the agent graph for one stored prediction). Heavy imports stay inside the commands."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from rtml.errors import RtmlError

graph_app = typer.Typer(help="The agents' dependency graph of entities (services, hosts, sensors, sites).", no_args_is_help=True)
agents_app = typer.Typer(help="The agent graph that explains anomalies.", no_args_is_help=True)


@graph_app.command("load")
def graph_load(
    file: Annotated[Optional[Path], typer.Argument(help="JSON {nodes, edges} or CSV tenant,entity,kind,depends_on.")] = None,
    tenant: Annotated[Optional[str], typer.Option(help="The tenant of rows that name none; with --from-events, the tenant to read.")] = None,
    from_events: Annotated[bool, typer.Option("--from-events", help="Take the graph from the events table's attributes (kind, depends_on, host, site).")] = False,
) -> None:
    """Merge entities and their dependencies into the graph backend (idempotent)."""
    from agents.dependencies import graph_from_attributes, load_graph_file
    from agents.workers import load_graph
    from rtml.settings import get_settings

    settings = get_settings()
    if (file is None) == (not from_events):
        raise RtmlError("give a FILE or --from-events (one of them)")
    if from_events:
        if not tenant:
            raise RtmlError("--from-events reads one tenant's events: give --tenant")
        from lakehouse import Lakehouse

        rows = Lakehouse.open(settings).read("events", tenant=tenant, columns=("tenant", "entity", "attributes")).to_pylist()
        entities, dependencies = graph_from_attributes(rows)
    else:
        entities, dependencies = load_graph_file(file, tenant)
    stored = load_graph(settings, entities, dependencies)
    typer.echo(f"merged {len(entities)} entities and {len(dependencies)} dependencies into the {settings.agents.graph_backend} graph (now {stored[0]} entities, {stored[1]} dependencies for these tenants)")


@agents_app.command("index")
def agents_index(file: Annotated[Path, typer.Argument(help="JSON list or JSON Lines of documents (doc_id, tenant, kind, title, text, entities, at).")]) -> None:
    """Index incident reports, runbooks and logs for the Search agent (re-indexing a doc_id replaces it)."""
    from agents.search import load_documents
    from agents.workers import SearchWorker
    from rtml.settings import get_settings

    settings = get_settings()
    count = SearchWorker(settings).index(load_documents(file))
    typer.echo(f"indexed {count} documents into the {settings.agents.search_backend} search index")


@agents_app.command("explain")
def agents_explain(
    prediction: Annotated[str, typer.Option(help="The prediction's id.")],
    tenant: Annotated[str, typer.Option(help="The prediction's tenant.")],
    alert: Annotated[bool, typer.Option("--alert/--no-alert", help="Also send the alert to the configured channels.")] = False,
) -> None:
    """Run the agent graph for one stored prediction; store and print its enrichment."""
    from rich.console import Console

    enrichment = explain_prediction(tenant, prediction, alert)
    print_enrichment(enrichment, Console())


def explain_prediction(tenant: str, prediction_id: str, alert: bool = False) -> dict:
    """The enrichment of one stored prediction, explained in this process (search and graph in
    threads of their own) and stored; alerts go out only with ``alert``."""
    from pyiceberg.expressions import EqualTo

    from agents.evidence import Anomaly
    from agents.incidents import IncidentBook
    from agents.workers import GraphWorker, SearchWorker, in_threads, open_explainer
    from lakehouse import Lakehouse
    from rtml.schemas import Prediction
    from rtml.settings import get_settings

    settings = get_settings()
    if not alert:  # only the log hears of it
        settings = settings.model_copy(update={"agents": settings.agents.model_copy(update={"alertmanager_url": "", "opsgenie_url": "", "webhook_url": ""})})
    rows = Lakehouse.open(settings).read("predictions", tenant=tenant, where=EqualTo("prediction_id", prediction_id), limit=1).to_pylist()
    if not rows:
        raise RtmlError(f"tenant {tenant!r} has no prediction {prediction_id!r}: check the id (`rtml query` lists predictions)")
    row = rows[0]
    row["scores"] = dict(row["scores"] or [])
    row["model_versions"] = dict(row["model_versions"] or [])
    stored = Prediction.model_validate({**row, "is_anomaly": True})
    (step,) = IncidentBook(settings.agents.incident_gap_s, settings.agents.reexplain_after_s).add([Anomaly.from_prediction(stored)], 0.0)
    search, graph = in_threads(SearchWorker(settings), GraphWorker(settings))
    explainer, close = open_explainer(settings, search, graph)
    try:
        return asyncio.run(explainer.explain_now(step.incident))
    finally:
        close()


def print_enrichment(enrichment: dict, console) -> None:
    from rich.markup import escape

    details = enrichment["details"]
    console.print(f"[bold]{escape(enrichment['summary'])}[/]", highlight=False)
    reasoning = details.get("reasoning") or {}
    for name, text in (reasoning.get("sections") or {}).items():
        console.print(f"  [bold]{name}[/]: {escape(text)}", highlight=False)
    marked = details.get("partial") or []
    console.print(
        f"[dim]enrichment {enrichment['enrichment_id']} · reasoning by {reasoning.get('provider')} "
        f"(prompt {reasoning.get('prompt_version')})" + (f" · partial: {', '.join(marked)}" if marked else "") + "[/]",
        highlight=False,
    )
    if details.get("graph"):
        console.print(f"[dim]graph evidence: {escape(json.dumps(details['graph']['root_causes'][:3], default=str))}[/]", highlight=False)
