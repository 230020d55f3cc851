"""Calls from one deployment to another that survive a replica dying under them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from ray.exceptions import RayActorError, WorkerCrashedError
from ray.serve.exceptions import ReplicaUnavailableError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from rtml.settings import ServingSettings

T = TypeVar("T")

# A replica that died or is being replaced: the same call succeeds on another replica.
REPLICA_GONE = (RayActorError, WorkerCrashedError, ReplicaUnavailableError)


async def awaited(response: Awaitable[T]) -> T:
    """A Serve ``DeploymentResponse`` as a coroutine (for ``asyncio.wait_for`` and tasks)."""
    return await response


async def call_with_retry(call: Callable[[], Awaitable[T]], attempts: int = 4) -> T:
    """``call()``, again on another replica if the one it reached died (Serve replaces it)."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(REPLICA_GONE),
        stop=stop_after_attempt(attempts),
        wait=wait_random_exponential(multiplier=0.05, max=1.0),
        reraise=True,
    ):
        with attempt:
            return await call()
    raise AssertionError("unreachable: AsyncRetrying re-raises the last error")


def batch_size(serving: ServingSettings, concurrent_batches: int) -> int:
    """The ``@serve.batch`` size a replica can fill: its concurrent batches share its
    ``max_ongoing_requests``."""
    return max(1, min(serving.max_batch_size, serving.max_ongoing_requests // concurrent_batches))
