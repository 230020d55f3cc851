"""The router's one way to the lakehouse: active model versions and weights from the registry,
predictions and feedback into their tables through background batching writers, and a prediction's
per-model scores for feedback that arrives after the router forgot the batch.

``ServingStore`` is the interface the router depends on; ``LakehouseStore`` is its one
implementation, over ``lakehouse.Lakehouse`` (embedded SQLite catalog by default, PostgreSQL/REST
by settings). It is synchronous: the router calls it from worker threads.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from typing import Protocol

import numpy as np
import pyarrow as pa
from pyiceberg.expressions import EqualTo

from deployments.ensemble import Member, Rollout, TenantEnsemble, member_from
from models.scoring import IMAGE_KINDS, load_scorer
from rtml.errors import RtmlError
from rtml.schemas import Feedback, ModelStatus, ModelVersion
from rtml.settings import Settings

log = logging.getLogger(__name__)
# How the predictions table keeps shadow scores: beside the ensemble's scores, marked as such.
SHADOW_PREFIX = "shadow:"


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

    def set_weights(self, tenant: str, weights: Mapping[str, float]) -> None: ...

    def prediction(self, prediction_id: str) -> tuple[str, dict[str, float], dict[str, float]] | None:
        """(tenant, member scores, shadow scores) of a stored prediction, None if there is none."""

    def write_predictions(self, rows: pa.Table) -> None:
        """Queue rows for the predictions table; returns at once."""

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

    def set_weights(self, tenant: str, weights: Mapping[str, float]) -> None:
        self._lake.registry.set_weights(tenant, weights)

    def prediction(self, prediction_id: str) -> tuple[str, dict[str, float], dict[str, float]] | None:
        rows = self._lake.read("predictions", where=EqualTo("prediction_id", prediction_id), columns=("tenant", "scores"), limit=1)
        if rows.num_rows == 0:
            return None
        row = rows.to_pylist()[0]
        scores = dict(row["scores"] or [])
        members = {key: value for key, value in scores.items() if not key.startswith(SHADOW_PREFIX)}
        shadows = {key[len(SHADOW_PREFIX) :]: value for key, value in scores.items() if key.startswith(SHADOW_PREFIX)}
        return row["tenant"], members, shadows

    def write_predictions(self, rows: pa.Table) -> None:
        self._predictions.submit(rows)

    def write_feedback(self, feedback: Sequence[Feedback]) -> None:
        self._feedback.submit(list(feedback)).result()

    def close(self) -> None:
        for name in ("_predictions", "_feedback"):
            if name in self.__dict__:
                self.__dict__[name].close()


def prediction_rows(
    tenant: str,
    prediction_ids: list[str],
    batch: ScoredBatch,
    ensemble_scores: np.ndarray,
    is_anomaly: np.ndarray,
    model_versions: Mapping[str, str],
    details: PredictionDetails,
) -> pa.Table:
    """The predictions-table rows of one scored batch, built column by column (no per-row Python)."""
    count = len(prediction_ids)
    keys = list(batch.member_keys) + [SHADOW_PREFIX + key for key in batch.shadow_keys]
    timestamp = pa.timestamp("us", tz="UTC")
    return pa.table(
        {
            "prediction_id": pa.array(prediction_ids, pa.string()),
            "event_id": pa.array(details.event_ids, pa.string()),
            "tenant": pa.array([tenant] * count, pa.string()),
            "entity": pa.array(details.entities, pa.string()),
            "event_time": pa.array(details.event_times, timestamp),
            "scores": _string_map(keys, pa.array(batch.scores.T.reshape(-1), pa.float64()), count),
            "ensemble_score": pa.array(ensemble_scores, pa.float64()),
            "is_anomaly": pa.array(is_anomaly, pa.bool_()),
            "model_versions": _string_map(list(model_versions), pa.array(list(model_versions.values()) * count, pa.string()), count),
            "latency_ms": pa.array(details.latency_ms, pa.float64()),
            "created_at": pa.array([datetime.now(timezone.utc)] * count, timestamp),
            "subject": pa.array(details.subjects, pa.string()),
        }
    )


@dataclass
class PredictionDetails:
    """What the predictions table keeps about each item beyond its scores, one value per item."""

    event_ids: list[str]
    entities: list[str]
    event_times: list[datetime]
    subjects: list[str | None]
    latency_ms: list[float]


def _string_map(keys: list[str], values: pa.Array, rows: int) -> pa.MapArray:
    """A map column whose every row has ``keys``, with row-major ``values`` ``[rows * len(keys)]``."""
    offsets = pa.array(np.arange(0, rows * len(keys) + 1, len(keys), dtype=np.int32))
    return pa.MapArray.from_arrays(offsets, pa.array(keys * rows, pa.string()), values)
