"""``AppOperations``: ``api.operations.Operations`` over the running app, for the API the Ingress
serves. Feedback and ensemble state go to the ModelRouter through its handle (one router replica
answers; feedback is a compare-and-swap on the stored weights, so every replica converges on the
same weights, ``deployments.router``); promotions, rollouts and weight refreshes change the router's
``user_config`` through ``deployments.control``, which reconfigures every router replica in place.
Control calls talk to the Serve controller and wait for the app to be RUNNING again: they run in a
worker thread, off the replica's event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ray.serve.handle import DeploymentHandle

from api.operations import RolloutMode
from deployments import control
from deployments.calls import awaited, call_with_retry
from rtml.schemas import Feedback, ModelVersion
from rtml.settings import Settings


class AppOperations:
    def __init__(self, router: DeploymentHandle, settings: Settings):
        self._router = router
        self._settings = settings

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
