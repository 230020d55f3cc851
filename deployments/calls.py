"""Calls from one deployment to another: ones that survive a replica dying under them, and ones
whose payload is too large for one gRPC message.

In Serve's throughput mode (``RAY_SERVE_THROUGHPUT_OPTIMIZED``) a handle call travels as one gRPC
message each way, and Serve caps those at ``RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH`` (4 MiB by
default). Raising the cap is not enough: batching merges requests into calls of any size. So a
call whose payload may come near the cap goes by reference instead (``sized``): as a Ray actor call,
whose large arguments and results travel through the object store, on the same handle and replicas.
In Serve's default mode every call already goes that way. ObjectRefs inside a gRPC call's arguments
are no way round it: Serve resolves top-level ones into the message, and nested ones are pickled
out of band, which pins their objects for the life of the process.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from ray.exceptions import RayActorError, WorkerCrashedError
# Private in Ray 2.60: the cap (set by the env var of the same name) has no public accessor. The
# per-handle ``_by_reference`` option used below is underscore-named too, but it is in
# ``DeploymentHandle.options``'s documented signature and is how Serve's performance guide chooses
# between gRPC and actor calls (gRPC between replicas came with ray-project/ray#59908).
from ray.serve._private.constants import RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from rtml.schemas import ScoreRequest
from rtml.settings import ServingSettings

T = TypeVar("T")

# A replica that died or is being replaced: the same call succeeds on another replica.
REPLICA_GONE = (RayActorError, WorkerCrashedError, ReplicaUnavailableError)
# Payloads above this go by reference: half the gRPC cap leaves room for what an estimate misses.
BY_VALUE_MAX_BYTES = RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH // 2
# Per window, what a request's pickled metadata and its result take beyond the strings' own
# characters: its event time and arrival time (8 bytes each), per-string framing, the prediction id (~37 bytes),
# the ensemble score and decision, and 4 bytes per model score.
ITEM_OVERHEAD_BYTES = 160


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


def sized(handle: DeploymentHandle, payload_bytes: int) -> DeploymentHandle:
    """``handle``, or the same handle calling by reference when ``payload_bytes`` (arguments and
    result) may not fit one gRPC message (see the module docstring)."""
    return handle.options(_by_reference=True) if payload_bytes > BY_VALUE_MAX_BYTES else handle


def payload_bytes(requests: Sequence[ScoreRequest]) -> int:
    """An upper estimate of the pickled size of ``requests`` plus their results."""
    total = 0
    for request in requests:
        total += request.windows.nbytes + len(request) * ITEM_OVERHEAD_BYTES
        for strings in (request.entities, request.event_ids, request.subjects):
            if strings is not None:
                total += sum(len(value) for value in strings if value is not None)
    return total
