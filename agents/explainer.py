"""The explainer: anomalies in, one explained incident at a time out — never holding up the stream.

    explainer = Explainer(nodes, book, store=..., publish=..., index=...)
    await explainer.observe(predictions, watermarks)   # returns at once; runs go on in the background
    await explainer.drain()                           # wait for the runs under way (tests, shutdown)
    explainer.forget(tenant, prediction_ids, event_ids)  # an erased subject's anomalies (api.erasure)

``observe`` files the anomalous predictions under their incidents (``agents.incidents``) and starts
a run of the agent graph (``agents.graph``) for each incident that is due an explanation, and for
each incident the stream has moved past (resolved). Runs of one incident are one at a time: a run
asked for while one is under way starts after it, with the incident as it is then (asks in
between coalesce). Each run's result is one enrichment: stored in the lakehouse ``enrichments``
table (id ``<incident>:<revision>``, idempotent), published to the live feed's ``enrichments``
topic, and indexed for the Search agent as a past enrichment, so later incidents find it.

Tracing: an incident whose anomalies include a traced one (``observe``'s ``traces``) has each run
recorded as a span "rtml.enrich" in the trace of its first traced anomaly, with a child span per
graph node ("rtml.agent.search", ".graph", ".reasoning", ".alert").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

from agents.evidence import Anomaly, Document, Incident
from agents.graph import Nodes, build_graph, partial_nodes
from agents.incidents import IncidentBook, names_any
from agents.search import document_for_enrichment
from observability import tracing
from rtml.schemas import Prediction, utc_now

log = logging.getLogger(__name__)

SOURCE = "agent-graph"  # the enrichments table's `source` of what the graph stores


class Explainer:
    def __init__(
        self,
        nodes: Nodes,
        book: IncidentBook,
        store: Callable[[dict[str, Any]], Any],  # writes one enrichment row (returns when durable, or a future)
        publish: Callable[[list[dict[str, Any]]], None] = lambda items: None,  # the live feed's enrichments
        index: Callable[[Document], Any] | None = None,  # the Search agent's index of past enrichments
        context: Callable[[Incident], str] = lambda incident: "",
        on_stored: Callable[[dict[str, Any]], None] = lambda row: None,  # each enrichment once durable (timing, counting)
    ):
        self._graph = build_graph(_TracedNodes(nodes))
        self._book = book
        self._store = store
        self._publish = publish
        self._index = index
        self._context = context
        self._on_stored = on_stored
        self._running: dict[str, asyncio.Task] = {}  # incident id -> its run under way
        self._under_way: dict[str, Incident] = {}  # incident id -> the incident its run under way explains
        self._again: dict[str, Incident] = {}  # incident id -> the incident to run next
        self._explained: dict[str, Any] = {}  # incident id -> its latest Reasoning (for the resolve)
        self._traces: dict[str, tracing.Carrier] = {}  # incident id -> its trace's carrier, while open
        self.enrichments: list[dict[str, Any]] = []  # what this process stored, newest last (bounded)

    async def observe(
        self,
        predictions: Sequence[Prediction],
        watermarks: Mapping[str, datetime] | None = None,
        wall_s: float | None = None,
        traces: Mapping[str, tracing.Carrier] | None = None,
    ) -> list[str]:
        """File the anomalous ones among ``predictions``; start the runs that became due; returns
        the ids of the incidents that will be (re-)explained or resolved. ``traces``: the carriers
        of the traced predictions, by event id."""
        wall_s = time.time() if wall_s is None else wall_s
        anomalies = [Anomaly.from_prediction(p) for p in predictions if p.is_anomaly]
        started = []
        for step in self._book.add(anomalies, wall_s, traces):
            if step.trace is not None:
                self._traces[step.incident.incident_id] = step.trace
            if step.action == "explain":
                started.append(self._start(step.incident))
        for incident in self._book.resolve_quiet(watermarks or {}, wall_s):
            started.append(self._start(incident))
        return started

    async def tick(self, wall_s: float | None = None) -> list[str]:
        """Resolve the incidents that have been quiet for ``incident_gap_s`` of wall time."""
        return await self.observe([], {}, wall_s)

    async def drain(self) -> None:
        while self._running:
            await asyncio.gather(*self._running.values(), return_exceptions=True)

    def forget(self, tenant: str, prediction_ids: Collection[str], event_ids: Collection[str]) -> int:
        """Forget what this process holds of an erased subject's anomalies (``api.erasure``): the
        open incidents that name them (``agents.incidents.names_any``) with their latest
        explanation, their runs waiting or under way (cancelled: none stores or indexes an
        enrichment of them afterwards, a resolved incident's last run included), and the recently
        stored enrichments of them. Returns how many incidents and enrichments it dropped."""
        forgotten = set(self._book.forget(tenant, prediction_ids, event_ids))
        forgotten.update(i for i, incident in self._under_way.items() if names_any(incident, tenant, prediction_ids, event_ids))
        forgotten.update(i for i, incident in self._again.items() if names_any(incident, tenant, prediction_ids, event_ids))
        for incident_id in forgotten:
            self._again.pop(incident_id, None)
            self._explained.pop(incident_id, None)
            self._traces.pop(incident_id, None)
            if incident_id in self._running:
                self._running[incident_id].cancel()
        kept = [row for row in self.enrichments if not (row["tenant"] == tenant and (row["prediction_id"] in prediction_ids or row["event_id"] in event_ids))]
        dropped = len(self.enrichments) - len(kept)
        self.enrichments = kept
        return len(forgotten) + dropped

    async def explain_now(self, incident: Incident, anomalous: Mapping[str, datetime] | None = None) -> dict[str, Any]:
        """Run the graph for one incident and wait for its enrichment (``rtml agents explain``)."""
        return await self._run(incident, dict(anomalous or {incident.entity: incident.started_at}))

    # ------------------------------------------------------------------------------------------

    def _start(self, incident: Incident) -> str:
        incident_id = incident.incident_id
        if incident_id in self._running:
            self._again[incident_id] = incident
        else:
            self._running[incident_id] = asyncio.ensure_future(self._runs_of(incident))
        return incident_id

    async def _runs_of(self, incident: Incident) -> None:
        incident_id = incident.incident_id
        try:
            while incident is not None:
                self._under_way[incident_id] = incident
                try:
                    await self._run(incident, self._book.anomalous(incident.tenant))
                except Exception:  # a store or feed failure: logged, the next run goes on
                    log.exception("agents: the run for incident %s (revision %d) failed", incident_id, incident.revision)
                incident = self._again.pop(incident_id, None)
        finally:
            del self._running[incident_id]
            self._under_way.pop(incident_id, None)

    async def _run(self, incident: Incident, anomalous: Mapping[str, datetime]) -> dict[str, Any]:
        """``_enrich``, in a span "rtml.enrich" of the incident's trace when it has one (the
        resolving run is its last)."""
        incident_id = incident.incident_id
        carrier = self._traces.pop(incident_id, None) if incident.status == "resolved" else self._traces.get(incident_id)
        attributes = {tracing.TENANT: incident.tenant, tracing.ENTITY: incident.entity, "rtml.incident": incident_id}
        with tracing.stage("rtml.enrich", [carrier] if carrier else [], attributes):
            return await self._enrich(incident, anomalous)

    async def _enrich(self, incident: Incident, anomalous: Mapping[str, datetime]) -> dict[str, Any]:
        state: dict[str, Any] = {"incident": incident, "anomalous": dict(anomalous), "context": self._context(incident)}
        if incident.status == "resolved" and incident.incident_id in self._explained:
            state["explanation"] = self._explained.pop(incident.incident_id)
        started = time.monotonic()
        final = await self._graph.ainvoke(state)
        final["node_seconds"] = {**final.get("node_seconds", {}), "graph_run": time.monotonic() - started}  # the whole graph
        if "graph_evidence" in final:
            evidence = final["graph_evidence"]
            self._book.relate(incident.incident_id, [c.entity for c in evidence.root_causes] + [n.entity for n in evidence.blast_radius])
        if "explanation" in final and incident.status == "open":
            self._explained[incident.incident_id] = final["explanation"]
        row = enrichment_row(final)
        written = self._store(row)
        if asyncio.isfuture(written) or asyncio.iscoroutine(written):
            await written
        self._on_stored(row)
        self._publish([row])
        self.enrichments = [*self.enrichments[-99:], row]
        if self._index is not None and "explanation" in final:
            try:
                indexed = self._index(document_for_enrichment(incident, final["explanation"].summary))
                if asyncio.isfuture(indexed) or asyncio.iscoroutine(indexed):
                    await indexed
            except Exception as error:  # search is context, not the record
                log.warning("agents: could not index the enrichment of incident %s: %s", incident.incident_id, error)
        return row


class _TracedNodes:
    """The graph's nodes (``agents.graph.Nodes``), each run in a span "rtml.agent.<node>", child
    of the run's current span ("rtml.enrich"; untraced runs have none, and their nodes no span)."""

    def __init__(self, nodes: Nodes):
        self.run_search = _traced_node("search", nodes.run_search)
        self.run_graph = _traced_node("graph", nodes.run_graph)
        self.run_reasoning = _traced_node("reasoning", nodes.run_reasoning)
        self.run_alert = _traced_node("alert", nodes.run_alert)


def _traced_node(node: str, run: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
    async def traced(state: Any) -> Any:
        with tracing.stage(f"rtml.agent.{node}", tracing.current()):
            return await run(state)

    return traced


def enrichment_row(state: Mapping[str, Any]) -> dict[str, Any]:
    """One run's result as an ``enrichments`` row: the summary, and every node's evidence in details."""
    incident: Incident = state["incident"]
    explanation = state.get("explanation")
    details = {
        "incident": incident.model_dump(mode="json"),
        "search": state["search_evidence"].model_dump(mode="json") if "search_evidence" in state else None,
        "graph": state["graph_evidence"].model_dump(mode="json") if "graph_evidence" in state else None,
        "reasoning": explanation.model_dump(mode="json") if explanation is not None else None,
        "alerts": [outcome.model_dump(mode="json") for outcome in state.get("alert_outcomes", [])],
        "partial": partial_nodes(state),
        "node_seconds": state.get("node_seconds", {}),
        "provider": explanation.provider if explanation is not None else None,
        "prompt_version": explanation.prompt_version if explanation is not None else None,
    }
    summary = explanation.summary if explanation is not None else ""
    if incident.status == "resolved":
        summary = f"Resolved after {incident.anomalies} anomalies ({incident.started_at:%Y-%m-%d %H:%M:%S} to {incident.last_at:%H:%M:%S} UTC). {summary}".strip()
    return {
        "enrichment_id": f"{incident.incident_id}:{incident.revision}",
        "tenant": incident.tenant,
        "prediction_id": incident.first_prediction_id,
        "event_id": incident.first_event_id or None,
        "entity": incident.entity,
        "source": SOURCE,
        "summary": summary,
        "details": details,
        "created_at": utc_now(),
    }

