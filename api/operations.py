"""What the API's data layer asks of the running app: the operations that go through the model
routers rather than straight to the lakehouse.

``api.data`` depends on this interface only; the Serve app implements it over its router handle
and ``deployments.control`` (the deployments layer), tests implement it in-process. Every method is
called for one tenant's own models: the data layer has checked that the tenant owns them.
An implementation raises ``rtml.schemas.Refusal`` for what a person can act on (4xx: the request
itself, 5xx: the app cannot do it right now and may later).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

from rtml.schemas import Feedback, ModelVersion

RolloutMode = Literal["canary", "shadow"]


class Operations(Protocol):
    async def feedback(self, items: Sequence[Feedback]) -> list[dict]:
        """Apply verdicts, all of one tenant, as ``deployments.router.ModelRouter.feedback`` does:
        per item ``{"prediction_id", "weights": {model key: weight}, "online_accuracy": {model key:
        share}}``, or ``{"prediction_id", "error"}`` for a prediction the tenant does not have."""

    async def ensemble(self, tenant: str) -> dict | None:
        """The tenant's ensemble as a running router uses it (``ModelRouter.ensemble``): ``{"members":
        {key: {"kind", "weight"}}, "rollouts": {key: {"mode", "fraction", "weight"}},
        "online_accuracy": {key: share}, "unhealthy": [key], "generation": int}``; None when the
        tenant has no active model."""

    async def promote(self, name: str, version: int) -> ModelVersion:
        """Make ``name@version`` its line's active version and hot-swap it into the routers."""

    async def set_rollout(self, model_key: str, mode: RolloutMode | None, fraction: float) -> None:
        """Start a canary or shadow trial of ``model_key`` ("name@version") on ``fraction`` of
        requests, or end its trial (``mode`` None)."""

    async def refresh(self) -> None:
        """Make the routers re-read active versions and weights from the registry now (after the
        stored weights were set)."""
