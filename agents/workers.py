"""The agents as the processes that run them: a Search worker, a Graph worker and the explainer.

The Serve app runs ``SearchWorker`` and ``GraphWorker`` as their own deployments (so the graph's
two branches run in two processes) and the explainer in the ``AgentGraph`` deployment
(``deployments.agents``); ``rtml agents explain`` runs them all in its own process. Each worker opens
its backend from settings: the embedded ones (tantivy, kuzu) by default, Elasticsearch and Neo4j
when ``agents.search_backend`` / ``agents.graph_backend`` say so.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from agents.alerting import Alerter
from agents.backends.alerts import open_notifiers
from agents.backends.graphstore import open_graph
from agents.backends.llm import open_llm
from agents.backends.search import open_search
from agents.dependencies import GraphAgent
from agents.embeddings import load_embedder
from agents.evidence import Dependency, Document, GraphEntity, GraphEvidence, Incident, SearchEvidence
from agents.explainer import Explainer
from agents.graph import GraphCall, Nodes, SearchCall
from agents.incidents import IncidentBook
from agents.reasoning import Reasoner
from agents.search import SearchAgent
from rtml.settings import Settings
from security.secrets import open_secrets


class SearchWorker:
    def __init__(self, settings: Settings):
        self._backend = open_search(settings)
        self._agent = SearchAgent(self._backend, load_embedder(), settings.agents)

    def similar(self, incident: Incident, context: str = "") -> SearchEvidence:
        return self._agent.similar(incident, context)

    def index(self, documents: Sequence[Document]) -> int:
        self._agent.index(documents)
        return len(documents)

    def erase(self, tenant: str, doc_ids: Sequence[str]) -> int:
        """Delete these documents of ``tenant`` (an erasure: ``api.erasure``); returns how many were stored."""
        return self._backend.erase(tenant, doc_ids)


class GraphWorker:
    def __init__(self, settings: Settings):
        self._backend = open_graph(settings)
        self._agent = GraphAgent(self._backend, settings.agents)

    def explain(self, incident: Incident, anomalous: Mapping[str, datetime]) -> GraphEvidence:
        return self._agent.explain(incident, anomalous)

    def erase(self, tenant: str, entities: Sequence[str]) -> int:
        """Delete these entities of ``tenant`` and their dependencies (an erasure: ``api.erasure``);
        returns how many the graph held."""
        return self._backend.erase(tenant, entities)


def open_explainer(
    settings: Settings,
    search: SearchCall,
    graph: GraphCall,
    publish: Callable[[list[dict[str, Any]]], None] = lambda items: None,
    index: Callable[[Document], Any] | None = None,
    on_stored: Callable[[dict[str, Any]], None] = lambda row: None,
) -> tuple[Explainer, Callable[[], None]]:
    """The explainer of ``settings`` over the given search and graph calls, storing into the
    lakehouse; returns it and the function that closes its lakehouse writer."""
    from lakehouse import Lakehouse

    agents = settings.agents
    secrets = open_secrets(settings)
    nodes = Nodes(
        search=search,
        graph=graph,
        reasoner=Reasoner(agents, open_llm(settings, secrets)),
        fallback_reasoner=Reasoner(agents, None),
        alerter=Alerter(open_notifiers(settings, secrets), agents.alert_timeout_s),
        search_timeout_s=agents.search_timeout_s,
        graph_timeout_s=agents.graph_timeout_s,
        reasoning_timeout_s=agents.reasoning_timeout_s,
    )
    writer = Lakehouse.open(settings).writer("enrichments")
    explainer = Explainer(
        nodes,
        IncidentBook(agents.incident_gap_s, agents.reexplain_after_s),
        store=lambda row: asyncio.wrap_future(writer.submit([row])),
        publish=publish,
        index=index,
        on_stored=on_stored,
    )
    return explainer, writer.close


def in_threads(search: SearchWorker, graph: GraphWorker) -> tuple[SearchCall, GraphCall]:
    """Calls of workers in this process, each in a thread of its own (so the two branches still overlap)."""

    async def search_call(incident: Incident, context: str) -> SearchEvidence:
        return await asyncio.to_thread(search.similar, incident, context)

    async def graph_call(incident: Incident, anomalous: Mapping[str, datetime]) -> GraphEvidence:
        return await asyncio.to_thread(graph.explain, incident, anomalous)

    return search_call, graph_call


def load_graph(settings: Settings, entities: Sequence[GraphEntity], dependencies: Sequence[Dependency]) -> tuple[int, int]:
    """Merge entities and dependencies into the graph backend of ``settings``."""
    backend = open_graph(settings)
    try:
        return backend.load(entities, dependencies)
    finally:
        backend.close()

