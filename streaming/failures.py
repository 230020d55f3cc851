"""Which failures of the stream's calls (scoring, lakehouse writes) can pass later, and so are worth
retrying: a Ray actor or Serve replica that died or is being restarted, a call that timed out,
back-pressure, a broker or catalog that is away or busy (a lost commit race included), a 5xx
refusal. Anything else (a programming error, bad rows, a 4xx refusal) fails the same way every
time and is not retried.

An error is judged by its type and by the errors it was raised from (``raise ... from``), and for
a Ray task's error by its cause. The chain does not cross a process boundary (Ray sends an
exception without its ``__cause__``), so a process that catches an error it cannot handle judges
it where its chain is still whole and sends a ``JudgedFailure`` that carries the verdict
(``streaming.sink`` does).
"""

from __future__ import annotations

from pyiceberg.exceptions import CommitFailedException, CommitStateUnknownException, ServerError, ServiceUnavailableError
from ray import exceptions as ray_errors
from ray.serve import exceptions as serve_errors
from sqlalchemy.exc import DisconnectionError, OperationalError

from rtml.errors import RtmlError

TRANSIENT: tuple[type[BaseException], ...] = (
    TimeoutError,
    ConnectionError,
    # Ray: the actor or worker died or is restarting, its node or object went away, the object
    # store or memory is full for now.
    ray_errors.RayActorError,
    ray_errors.WorkerCrashedError,
    ray_errors.NodeDiedError,
    ray_errors.LocalRayletDiedError,
    ray_errors.ObjectLostError,
    ray_errors.GetTimeoutError,
    ray_errors.ObjectStoreFullError,
    ray_errors.OutOfMemoryError,
    # Serve: back-pressure, or no replica to take the call right now.
    serve_errors.BackPressureError,
    serve_errors.DeploymentUnavailableError,
    serve_errors.ReplicaUnavailableError,
    # The catalog: a lost commit race, a commit whose outcome is unknown (the idempotent append
    # re-checks its keys), a REST catalog's 5xx, SQL "database is locked" or a dropped connection.
    CommitFailedException,
    CommitStateUnknownException,
    ServerError,
    ServiceUnavailableError,
    OperationalError,
    DisconnectionError,
)


class JudgedFailure(RtmlError):
    """A failure whose verdict (``transient``: it may pass later) was reached where its cause chain
    was at hand; it keeps the verdict when pickled across processes."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient

    def __reduce__(self):
        return type(self), (str(self), self.transient)


def passes_later(error: BaseException) -> bool:
    """Whether ``error`` may not happen again if the same call is retried later."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, JudgedFailure):
            return current.transient
        # kafka-python marks the errors a retry may cure (a broker away, a leader moving).
        if isinstance(current, TRANSIENT) or getattr(current, "retriable", False) is True:
            return True
        current = current.cause if isinstance(current, ray_errors.RayTaskError) else current.__cause__
    return False


def describe(error: BaseException) -> str:
    """``Type: message`` of the error a call failed with (a Ray task's own error, not Ray's
    wrapper with the remote traceback)."""
    if isinstance(error, ray_errors.RayTaskError) and error.cause is not None:
        error = error.cause
    if isinstance(error, JudgedFailure):
        return str(error)
    return f"{type(error).__name__}: {error}"
