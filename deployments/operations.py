"""``AppOperations``: ``api.operations.Operations`` over the running app, for the API the Ingress
serves. Feedback and ensemble state go to the ModelRouter through its handle (one router replica
answers; feedback is a compare-and-swap on the stored weights, so every replica converges on the
same weights, ``deployments.router``); promotions, rollouts and weight refreshes change the router's
``user_config`` through ``deployments.control``, which reconfigures every router replica in place.
Control calls talk to the Serve controller and wait for the app to be RUNNING again: they run in a
worker thread, off the replica's event loop.

An erasure's agent stores (``api.operations.AgentStores``) are the app's SearchAgent, GraphAgent
and AgentGraph deployments (``deployments.agents``), which own the embedded search index and graph
while the app runs; an app without agents (``agents.enabled`` off) has none, so the stores are
opened in this process (``api.erasure.LocalAgentStores``) and no incidents are held.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from ray import serve
from ray.serve.handle import DeploymentHandle

from api.erasure import LocalAgentStores
from api.operations import AgentStores, RolloutMode
from deployments import control
from deployments.agents import GRAPH_AGENT, SEARCH_AGENT
from deployments.calls import awaited, call_with_retry
from deployments.names import AGENT_GRAPH
from rtml.schemas import Feedback, ModelVersion
from rtml.settings import Settings


class AppOperations:
    def __init__(self, router: DeploymentHandle, settings: Settings):
        self._router = router
        self._settings = settings
        self._local_agents: AgentStores | None = None if settings.agents.enabled else LocalAgentStores(settings)

    async def feedback(self, items: Sequence[Feedback]) -> list[dict]:
        return await call_with_retry(lambda: awaited(self._router.feedback.remote(list(items))))

    async def ensemble(self, tenant: str) -> dict | None:
        return await call_with_retry(lambda: awaited(self._router.ensemble.remote(tenant)))

    async def promote(self, name: str, version: int) -> ModelVersion:
        return await asyncio.to_thread(control.promote, self._settings, name, version)

    async def set_rollout(self, model_key: str, mode: RolloutMode | None, fraction: float) -> None:
        await asyncio.to_thread(control.set_rollout, self._settings, model_key, mode, fraction)

    async def refresh(self) -> None:
        await asyncio.to_thread(control.refresh_routers, self._settings)

    async def erase_documents(self, documents: Mapping[str, Sequence[str]]) -> int:
        if self._local_agents is not None:
            return await self._local_agents.erase_documents(documents)
        return sum([await self._agent_call(SEARCH_AGENT, "erase", tenant, list(ids)) for tenant, ids in documents.items() if ids])

    async def erase_entities(self, entities: Mapping[str, Sequence[str]]) -> int:
        if self._local_agents is not None:
            return await self._local_agents.erase_entities(entities)
        return sum([await self._agent_call(GRAPH_AGENT, "erase", tenant, list(names)) for tenant, names in entities.items() if names])

    async def forget_anomalies(self, predictions: Mapping[str, Sequence[str]], events: Mapping[str, Sequence[str]]) -> int | None:
        if self._local_agents is not None:
            return 0  # without agents the app holds no incidents
        return sum(
            [
                await self._agent_call(AGENT_GRAPH, "forget", tenant, list(predictions.get(tenant, ())), list(events.get(tenant, ())))
                for tenant in {*predictions, *events}
            ]
        )

    async def _agent_call(self, deployment: str, method: str, *args):
        """``method(*args)`` on one replica of the app's ``deployment`` (the replicas share its store)."""
        handle = serve.get_deployment_handle(deployment, self._settings.serving.app_name)
        return await call_with_retry(lambda: awaited(getattr(handle, method).remote(*args)))
