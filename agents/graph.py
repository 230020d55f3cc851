"""The agent graph, declared as data: Search ‖ Graph -> Reasoning -> Alert.

    START ──(open incident)──> search ──┐
      │                                 ├──> reasoning ──> alert ──> END
      │   ──(open incident)──> graph  ──┘                   ^
      └──(resolved incident)───────────────────────────────┘

``build_graph(nodes)`` compiles this LangGraph ``StateGraph``; the work lives in ``Nodes``, whose
search and graph calls go to other processes (the app's SearchAgent and GraphAgent Serve replicas,
or Ray actors), so the fan-out's two branches run at once on different CPUs. The join waits for
both branches (LangGraph runs "reasoning" once, after both wrote their evidence).

Every node is bounded by its timeout (``agents.*_timeout_s``) and has a fallback: a backend that is
slow or down gives evidence marked ``partial`` with the error, the reasoning node falls back to the
template reasoner, and the alert node reports a failed channel in its outcomes. So a run always
ends, with whatever the nodes found in time. Each node run is timed (``rtml_agent_node_seconds``)
and each fallback counted, by node and reason (``rtml_agent_node_failures_total``).

A resolved incident goes straight to the alert node, which resolves the incident's alert with the
summary it was last explained with (no new LLM call).
"""

from __future__ import annotations

import asyncio
import operator
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, TypedDict

from langgraph.graph import END, START, StateGraph

from agents.alerting import Alerter, alert_for
from agents.evidence import AlertOutcome, GraphEvidence, Incident, Reasoning, SearchEvidence
from agents.reasoning import Reasoner
from observability import metrics

SearchCall = Callable[[Incident, str], Awaitable[SearchEvidence]]
GraphCall = Callable[[Incident, Mapping[str, datetime]], Awaitable[GraphEvidence]]


class ExplainState(TypedDict, total=False):
    incident: Incident
    context: str  # free text about the entity for the search (its kind, attributes)
    anomalous: dict[str, datetime]  # the tenant's anomalous entities now -> their first anomaly
    search_evidence: SearchEvidence
    graph_evidence: GraphEvidence
    explanation: Reasoning  # for a resolved incident: the one it was last explained with
    alert_outcomes: list[AlertOutcome]
    node_seconds: Annotated[dict[str, float], operator.or_]  # node -> wall seconds it took (both branches add)


@dataclass
class Nodes:
    search: SearchCall
    graph: GraphCall
    reasoner: Reasoner
    fallback_reasoner: Reasoner  # the template reasoner, for a reasoning node that outran its bound
    alerter: Alerter
    search_timeout_s: float
    graph_timeout_s: float
    reasoning_timeout_s: float

    async def run_search(self, state: ExplainState) -> ExplainState:
        started = time.monotonic()
        try:
            evidence = await asyncio.wait_for(self.search(state["incident"], state.get("context", "")), self.search_timeout_s)
        except Exception as error:
            evidence = SearchEvidence(partial=True, error=_failed("search", error, self.search_timeout_s))
        return {"search_evidence": evidence, "node_seconds": _timed("search", started)}

    async def run_graph(self, state: ExplainState) -> ExplainState:
        started = time.monotonic()
        try:
            evidence = await asyncio.wait_for(self.graph(state["incident"], state.get("anomalous", {})), self.graph_timeout_s)
        except Exception as error:
            evidence = GraphEvidence(partial=True, error=_failed("graph", error, self.graph_timeout_s))
        return {"graph_evidence": evidence, "node_seconds": _timed("graph", started)}

    async def run_reasoning(self, state: ExplainState) -> ExplainState:
        started = time.monotonic()
        incident, search, graph = state["incident"], state["search_evidence"], state["graph_evidence"]
        # The reasoner keeps to reasoning_timeout_s itself and falls back to the template; this
        # bound (a little longer) only catches a reasoner that does not.
        try:
            explanation = await asyncio.wait_for(self.reasoner.explain(incident, search, graph), self.reasoning_timeout_s + 1.0)
        except Exception as error:
            explanation = (await self.fallback_reasoner.explain(incident, search, graph)).model_copy(
                update={"fallback": True, "error": _failed("reasoning", error, self.reasoning_timeout_s)}
            )
        return {"explanation": explanation, "node_seconds": _timed("reasoning", started)}

    async def run_alert(self, state: ExplainState) -> ExplainState:
        started = time.monotonic()
        explanation = state.get("explanation")
        summary = explanation.summary if explanation is not None else ""
        description = _description(explanation)
        alert = alert_for(state["incident"], summary, description, state.get("graph_evidence") or GraphEvidence())
        outcomes = await self.alerter.send(alert)
        return {"alert_outcomes": outcomes, "node_seconds": _timed("alert", started)}


def route_start(state: ExplainState) -> list[str]:
    """An open incident is explained (both evidence branches); a resolved one is only alerted."""
    return ["alert"] if state["incident"].status == "resolved" else ["search", "graph"]


def build_graph(nodes: Nodes):
    """The compiled graph; ``await graph.ainvoke({"incident": ..., "anomalous": ..., "context": ...})``."""
    graph = StateGraph(ExplainState)
    graph.add_node("search", nodes.run_search)
    graph.add_node("graph", nodes.run_graph)
    graph.add_node("reasoning", nodes.run_reasoning)
    graph.add_node("alert", nodes.run_alert)
    graph.add_conditional_edges(START, route_start, ["search", "graph", "alert"])
    graph.add_edge(["search", "graph"], "reasoning")
    graph.add_edge("reasoning", "alert")
    graph.add_edge("alert", END)
    return graph.compile()


def partial_nodes(state: Mapping) -> list[str]:
    """The nodes whose evidence is partial (their backend was slow or failed) or fell back."""
    marked = []
    for node, key in (("search", "search_evidence"), ("graph", "graph_evidence")):
        if key in state and state[key].partial:
            marked.append(node)
    explanation = state.get("explanation")
    if explanation is not None and (explanation.fallback or explanation.partial):
        marked.append("reasoning")
    if any(not outcome.ok for outcome in state.get("alert_outcomes", [])):
        marked.append("alert")
    return marked


def _description(explanation: Reasoning | None) -> str:
    if explanation is None:
        return ""
    return "\n".join(f"{name}: {text}" for name, text in explanation.sections.items() if text)


def _timed(node: str, started: float) -> dict[str, float]:
    """The node's seconds since ``started`` (``time.monotonic``), observed in ``rtml_agent_node_seconds``."""
    seconds = time.monotonic() - started
    metrics.AGENT_NODE.labels(node=node).observe(seconds)
    return {node: seconds}


def _failed(node: str, error: BaseException, timeout_s: float) -> str:
    """Count the node's fallback (reason ``timeout`` or ``error``) and say what happened."""
    timed_out = isinstance(error, TimeoutError)
    metrics.AGENT_FAILURES.labels(node=node, reason="timeout" if timed_out else "error").inc()
    if timed_out:
        return f"the {node} node timed out after {timeout_s:g}s"
    return f"the {node} node failed: {type(error).__name__}: {error}"
