"""Stream consumers' way to the ModelRouter: ``streaming.scoring.EnsembleClient`` over a Serve
``DeploymentHandle`` (streaming cannot import deployments, so the adapter lives here).

    client = RouterEnsembleClient(app_name)  # small and picklable: it travels to consumer actors
    answers = client.score(requests)         # one ScoreResult or Refusal per ScoreRequest
    client = deploy_scoring(settings)        # deploy the app on the connected cluster, then the above

The handle is looked up where the client is used, on first use, so that a consumer actor's
constructor arguments stay a few kilobytes (Ray keeps those inline, and restarts need them).

Consumers score from plain threads, while a handle in Serve's throughput-optimised mode
(``RAY_SERVE_THROUGHPUT_OPTIMIZED``: the scoring hops took 0.49 cores instead of 0.68,
benchmarks/RESULTS.md, streaming) routes on the event loop it is used from and refuses to work
outside one. So the client keeps one event loop of its own in a daemon thread and every call goes
through it; in Serve's default mode that costs a thread hop and nothing else.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import TimeoutError as FutureTimeout

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.names import ROUTER
from rtml.schemas import Refusal, ScoreRequest, ScoreResult
from rtml.settings import Settings


def deploy_scoring(settings: Settings) -> RouterEnsembleClient:
    """Deploy the Serve app on the connected Ray cluster; the stream's client to its ModelRouter.
    (The one place the stream meets the Serve app: here, above both.)"""
    from deployments.control import deploy

    deploy(settings)
    return RouterEnsembleClient(settings.serving.app_name)


class RouterEnsembleClient:
    def __init__(self, app_name: str, timeout_s: float = 30.0):
        self._app_name = app_name
        self._timeout_s = timeout_s
        self._started = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._router: DeploymentHandle | None = None

    def __getstate__(self) -> dict:
        return {"app_name": self._app_name, "timeout_s": self._timeout_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["app_name"], state["timeout_s"])

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult | Refusal]:
        answer = asyncio.run_coroutine_threadsafe(self._score_many(requests), self._event_loop())
        try:
            results = answer.result(timeout=self._timeout_s)
        except FutureTimeout:
            answer.cancel()
            raise TimeoutError(f"the ModelRouter of app {self._app_name!r} did not answer within {self._timeout_s:g}s") from None
        return results

    async def _score_many(self, requests: list[ScoreRequest]) -> list[ScoreResult | Refusal]:
        if self._router is None:
            self._router = serve.get_deployment_handle(ROUTER, app_name=self._app_name)
        return await self._router.score_many.remote(requests)

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        with self._started:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="router-client", daemon=True).start()
            return self._loop
