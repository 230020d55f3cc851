"""What the API's data layer asks of the running app: the operations that go through the model
routers (or the agents' deployments, for an erasure) rather than straight to the lakehouse.

``api.data`` depends on this interface only; the Serve app implements it over its router handle
and ``deployments.control`` (the deployments layer), tests implement it in-process. Every method is
called for one tenant's own models: the data layer has checked that the tenant owns them.
An implementation raises ``rtml.schemas.Refusal`` for what a person can act on (4xx: the request
itself, 5xx: the app cannot do it right now and may later).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

from rtml.schemas import Feedback, ModelVersion

RolloutMode = Literal["canary", "shadow"]


class AgentStores(Protocol):
    """The agents' stores an erasure reaches (``api.erasure``): the app's own, through its
    SearchAgent, GraphAgent and AgentGraph (``Operations``), or, outside a running app, the ones
    this process opens (``api.erasure.LocalAgentStores``). Each takes its targets per tenant and
    touches no store when given none; a store that cannot be reached raises."""

    async def erase_documents(self, documents: Mapping[str, Sequence[str]]) -> int:
        """Delete search documents (per tenant, their ids); returns how many the index held."""

    async def erase_entities(self, entities: Mapping[str, Sequence[str]]) -> int:
        """Delete graph entities (per tenant) with their dependencies; returns how many the graph held."""

    async def forget_anomalies(self, predictions: Mapping[str, Sequence[str]], events: Mapping[str, Sequence[str]]) -> int | None:
        """Drop the open incidents (with their runs and recent enrichments) that name these
        predictions or events (per tenant, their ids: ``agents.explainer.Explainer.forget``);
        returns how many it dropped, or None where no incidents are held (outside a running app)."""


class Operations(AgentStores, Protocol):
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
