"""The serving app's one way to the lakehouse: active model versions and weights from the
registry, predictions and feedback into their tables through background batching writers, and a
prediction's per-model scores for feedback that arrives after the router forgot the batch.

Prediction rows carry one column the table does not: ``TIME_BOUND``, whether the row's idempotency
key may be checked within its event time. It is true unless the client gave an event id without an
event time; such a row got its arrival time as event time, and a retry of it arrives at another
time, so its key is checked across all of its tenant's rows (``keys_bound_by_time=False``), which
costs a scan of the tenant's key column. Every other row keeps the cheap time-bounded check.

``ServingStore`` is the interface the router depends on; ``LakehouseStore`` is its one
implementation, over ``lakehouse.Lakehouse`` (embedded SQLite catalog by default, PostgreSQL/REST
by settings). It is synchronous: the router and the sink call it from worker threads.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import EqualTo

from deployments.ensemble import Member, Rollout, TenantEnsemble, member_from
from models.scoring import IMAGE_KINDS, load_scorer
from rtml.errors import RtmlError
from rtml.schemas import SHADOW_PREFIX, Feedback, ModelStatus, ModelVersion
from rtml.settings import Settings

log = logging.getLogger(__name__)
# The column of prediction rows that says how their key is checked (see the module docstring).
TIME_BOUND = "keys_bound_by_time"


@dataclass(frozen=True)
class RolloutSpec:
    """A candidate version under trial, as the router's user_config names it."""

    model: str  # "name@version"
    mode: str  # "canary" | "shadow"
    fraction: float


@dataclass(frozen=True)
class ScoredBatch:
    """The per-model scores behind a batch of predictions."""

    tenant: str
    member_keys: tuple[str, ...]
    shadow_keys: tuple[str, ...]
    scores: np.ndarray  # [members + shadows, items]

    def of(self, position: int) -> tuple[dict[str, float], dict[str, float]]:
        """(member scores, shadow scores) of one prediction."""
        column = self.scores[:, position].tolist()
        members = dict(zip(self.member_keys, column[: len(self.member_keys)]))
        return members, dict(zip(self.shadow_keys, column[len(self.member_keys) :]))


class ServingStore(Protocol):
    def load_ensembles(self, rollouts: Sequence[RolloutSpec]) -> dict[str, TenantEnsemble]: ...

    def update_weights(self, tenant: str, update: Callable[[dict[str, float]], Mapping[str, float]]) -> dict[str, float]:
        """Apply ``update`` to the tenant's stored weights by model key as one compare-and-swap
        (re-run on the winner's weights when a concurrent update wins); the weights after it."""

    def prediction(self, tenant: str, prediction_id: str) -> tuple[dict[str, float], dict[str, float]] | None:
        """(member scores, shadow scores) of the tenant's stored prediction; None if the tenant has
        no such prediction (another tenant's is never found)."""

    def write_predictions(self, rows: pa.Table) -> list[Future]:
        """Submit prediction rows (with their ``TIME_BOUND`` column); returns at once, with futures
        that complete when the rows are durable in the table."""

    def write_feedback(self, feedback: Sequence[Feedback]) -> None:
        """Store feedback durably; returns when it is."""

    def close(self) -> None: ...


class LakehouseStore:
    def __init__(self, settings: Settings):
        self._settings = settings
        self._input_shapes: dict[str, tuple[int, ...]] = {}

    @cached_property
    def _lake(self):
        from lakehouse import Lakehouse

        return Lakehouse.open(self._settings)

    @cached_property
    def _predictions(self):
        return self._lake.writer("predictions")

    @cached_property
    def _predictions_any_time(self):
        return self._lake.writer("predictions", keys_bound_by_time=False)

    @cached_property
    def _feedback(self):
        return self._lake.writer("feedback")

    def load_ensembles(self, rollouts: Sequence[RolloutSpec]) -> dict[str, TenantEnsemble]:
        members: dict[str, list[Member]] = defaultdict(list)
        for version in self._lake.registry.list(status=ModelStatus.ACTIVE):
            member = self._member(version)
            if member is not None:
                members[version.tenant].append(member)
        trials: dict[str, list[Rollout]] = defaultdict(list)
        for spec in rollouts:
            name, _, number = spec.model.rpartition("@")
            version = self._lake.registry.get(name, int(number))
            member = self._member(version)
            if member is not None and version.status == ModelStatus.CANDIDATE:
                trials[version.tenant].append(Rollout(member, spec.mode, spec.fraction))  # type: ignore[arg-type]
        return {
            tenant: TenantEnsemble(tenant, tuple(members.get(tenant, ())), tuple(trials.get(tenant, ())))
            for tenant in members.keys() | trials.keys()
        }

    def _member(self, version: ModelVersion) -> Member | None:
        """The version as an ensemble member; None (and a log line) if its artifact cannot be used,
        so that one broken model does not take its tenant's other models down."""
        shape = self._input_shapes.get(version.artifact_uri)
        if shape is None:
            try:
                scorer = load_scorer(version.artifact_uri, device="cpu")
            except (RtmlError, OSError, RuntimeError, ValueError) as error:
                log.error("model %s is left out of tenant %s's ensemble: %s", version.key, version.tenant, error)
                return None
            if scorer.kind != version.kind:
                log.error("model %s is registered as %s but its artifact is a %s model", version.key, version.kind, scorer.kind)
                return None
            hparams = scorer.network.hparams
            shape = (hparams["height"], hparams["width"]) if scorer.kind in IMAGE_KINDS else (scorer.window_length,)
            self._input_shapes[version.artifact_uri] = shape
        return member_from(version, shape)

    def update_weights(self, tenant: str, update: Callable[[dict[str, float]], Mapping[str, float]]) -> dict[str, float]:
        return self._lake.registry.update_weights(tenant, update)

    def prediction(self, tenant: str, prediction_id: str) -> tuple[dict[str, float], dict[str, float]] | None:
        rows = self._lake.read("predictions", tenant=tenant, where=EqualTo("prediction_id", prediction_id), columns=("scores",), limit=1)
        if rows.num_rows == 0:
            return None
        scores = dict(rows["scores"][0].as_py() or [])
        members = {key: value for key, value in scores.items() if not key.startswith(SHADOW_PREFIX)}
        shadows = {key[len(SHADOW_PREFIX) :]: value for key, value in scores.items() if key.startswith(SHADOW_PREFIX)}
        return members, shadows

    def write_predictions(self, rows: pa.Table) -> list[Future]:
        bound = rows[TIME_BOUND]
        rows = rows.drop_columns([TIME_BOUND])
        if pc.all(bound).as_py():
            return [self._predictions.submit(rows)]
        if not pc.any(bound).as_py():
            return [self._predictions_any_time.submit(rows)]
        return [self._predictions.submit(rows.filter(bound)), self._predictions_any_time.submit(rows.filter(pc.invert(bound)))]

    def write_feedback(self, feedback: Sequence[Feedback]) -> None:
        self._feedback.submit(list(feedback)).result()

    def close(self) -> None:
        for name in ("_predictions", "_predictions_any_time", "_feedback"):
            if name in self.__dict__:
                self.__dict__[name].close()
