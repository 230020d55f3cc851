"""The agent graph in the Serve app: ``AgentGraph`` (the explainer) over ``SearchAgent`` and
``GraphAgent`` (one deployment each, so the graph's two branches run in two processes).

Anomalies reach ``AgentGraph.explain`` from two places, neither of which waits for it: the stream's
lakehouse sink, once the predictions (with the consumer's final decisions, the detector's included)
are durable (``AgentGraphClient``, the pipeline's anomaly listener), and the ModelRouter, for HTTP
``/v1/predict`` anomalies once they are logged. ``explain`` files them under their incidents and
returns; the runs go on in the replica (``agents.explainer``). One replica: the incidents are its
state (a restart forgets the open ones; their enrichments are in the lakehouse).

An erasure (``api.erasure`` through ``deployments.operations``) reaches the stores these
deployments own: ``SearchAgent.erase`` and ``GraphAgent.erase`` delete documents and entities (in
the app, the only process that may open the embedded graph), ``AgentGraph.forget`` drops the
subject's open incidents and runs.

Enrichments go to the lakehouse and to the live feed's ``enrichments`` topic (GraphQL subscriptions).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from datetime import datetime

from ray import serve
from ray.serve.handle import DeploymentHandle

from agents.evidence import Document, GraphEvidence, Incident, SearchEvidence
from agents.workers import GraphWorker, SearchWorker, open_explainer
from deployments.names import AGENT_GRAPH
from observability import tracing
from rtml.schemas import Prediction
from rtml.settings import Settings
from streaming.feed import open_feed

log = logging.getLogger(__name__)

TICK_S = 5.0  # how often quiet incidents are looked for (wall time)

SEARCH_AGENT = "SearchAgent"
GRAPH_AGENT = "GraphAgent"
SearchAgent = serve.deployment(SearchWorker, name=SEARCH_AGENT)
GraphAgent = serve.deployment(GraphWorker, name=GRAPH_AGENT)


@serve.deployment(name=AGENT_GRAPH)
class AgentGraph:
    def __init__(self, settings: Settings, search: DeploymentHandle, graph: DeploymentHandle):
        tracing.configure(settings, "rtml-agents")
        self._feed = open_feed(settings)

        async def search_call(incident: Incident, context: str) -> SearchEvidence:
            return await search.similar.remote(incident, context)

        async def graph_call(incident: Incident, anomalous: Mapping[str, datetime]) -> GraphEvidence:
            return await graph.explain.remote(incident, dict(anomalous))

        async def index(document: Document) -> None:
            await search.index.remote([document])

        self._explainer, self._close_store = open_explainer(
            settings, search_call, graph_call, publish=lambda items: self._feed.publish("enrichments", items), index=index
        )
        self._ticker = asyncio.get_event_loop().create_task(self._tick_forever())

    async def explain(
        self, predictions: Sequence[Prediction], watermarks: Mapping[str, datetime] | None = None, traces: Mapping[str, tracing.Carrier] | None = None
    ) -> list[str]:
        """File the anomalous predictions under their incidents and start the runs that are due;
        returns the incidents touched, without waiting for their runs. ``traces``: the carriers of
        the traced predictions by event id; an incident's runs continue its first traced anomaly's trace."""
        return await self._explainer.observe(predictions, watermarks or {}, traces=traces)

    async def forget(self, tenant: str, prediction_ids: list[str], event_ids: list[str]) -> int:
        """Forget an erased subject's anomalies held in this replica (``Explainer.forget``); returns
        how many incidents and enrichments it dropped."""
        return self._explainer.forget(tenant, set(prediction_ids), set(event_ids))

    async def drain(self) -> list[dict]:
        """Wait for the runs under way; returns the enrichments this replica stored (newest last)."""
        await self._explainer.drain()
        return self._explainer.enrichments

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await self._explainer.tick(time.time())
            except Exception:
                log.exception("agents: resolving quiet incidents failed")

    def __del__(self):
        self._ticker.cancel()
        self._close_store()
        self._feed.close()


def bind_agents(settings: Settings, actor_options: dict) -> serve.Application:
    """The AgentGraph over its two agents, bound for the app."""
    replicas = settings.agents.replicas
    search = SearchAgent.options(num_replicas=replicas, ray_actor_options=actor_options).bind(settings)
    graph = GraphAgent.options(num_replicas=replicas, ray_actor_options=actor_options).bind(settings)
    # It waits on the other two and on I/O: no CPU of its own.
    return AgentGraph.options(num_replicas=1, ray_actor_options={"num_cpus": 0}).bind(settings, search, graph)


class AgentGraphClient:
    """The stream's anomaly listener (``streaming.scoring.AnomalyListener``): hands durable
    predictions to the app's AgentGraph without waiting for it. Picklable (it is sent to the sink
    actor); the handle is looked up where it is used."""

    def __init__(self, app_name: str):
        self._app_name = app_name
        self._handle: DeploymentHandle | None = None
        self._pending: set = set()

    def notify(self, predictions: list[Prediction], watermarks: dict[str, datetime], traces: dict[str, tracing.Carrier] | None = None) -> None:
        if self._handle is None:
            self._handle = serve.get_deployment_handle(AGENT_GRAPH, self._app_name)
        response = self._handle.explain.remote(predictions, watermarks, traces or {})
        # Kept until done so that a failure is logged rather than lost.
        future = asyncio.ensure_future(_logged(response))
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    def __getstate__(self):
        return {"_app_name": self._app_name}

    def __setstate__(self, state):
        self.__init__(state["_app_name"])


async def _logged(response) -> None:
    try:
        await response
    except Exception as error:
        log.warning("the agent graph did not take a batch of anomalies: %s: %s", type(error).__name__, error)
