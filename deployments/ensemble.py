"""Per-tenant ensembles as plain data: who the members are, which of them score a request, how their
scores combine, and how feedback re-weights them. No Ray here, so all of it is tested directly.

A tenant's ensemble holds its active model versions (one per model line, from the registry) with
their ensemble weights. A request is scored by a *plan*: the members whose kind fits the request's
data type and that are healthy, where a canary candidate takes its line's place for a fraction of
requests, plus shadow candidates that are scored and logged but never enter the ensemble score.

The ensemble score is the weighted mean of the members' scores. Feedback moves weight towards the
members that were right: multiplicative weights, ``w <- w * exp(-rate * |score - label|)``, rescaled
so that the members of that prediction keep their total weight (scores in [0, 1] make the loss a
bounded one, so no member drops to zero in one step; a floor keeps every member able to recover).
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from models.scoring import FORECASTER_KINDS, IMAGE_KINDS
from rtml.schemas import DataType, ModelVersion

# A member never falls below this share of its prediction's mean weight.
WEIGHT_FLOOR_SHARE = 0.01
KINDS_BY_DATA_TYPE = {DataType.METRIC.value: FORECASTER_KINDS, DataType.IMAGE.value: IMAGE_KINDS}


@dataclass(frozen=True)
class Member:
    """One model version as the router uses it."""

    name: str
    version: int
    kind: str
    artifact_uri: str
    weight: float
    # One scored item: (window_length,) for forecasters, (height, width) for image models.
    input_shape: tuple[int, ...]

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def data_type(self) -> str:
        return DataType.IMAGE.value if self.kind in IMAGE_KINDS else DataType.METRIC.value


@dataclass(frozen=True)
class Rollout:
    """A candidate version under trial: ``canary`` replaces its line's active version for
    ``fraction`` of requests; ``shadow`` is scored on ``fraction`` of requests beside the ensemble."""

    member: Member
    mode: Literal["canary", "shadow"]
    fraction: float


@dataclass(frozen=True)
class Plan:
    """Who scores one request: ensemble members and shadows (keys are unique across both)."""

    members: tuple[Member, ...]
    shadows: tuple[Member, ...] = ()

    @property
    def model_versions(self) -> dict[str, str]:
        return {member.name: str(member.version) for member in self.members}

    @property
    def weights(self) -> dict[str, float]:
        return {member.key: member.weight for member in self.members}


@dataclass
class TenantEnsemble:
    tenant: str
    members: tuple[Member, ...]
    rollouts: tuple[Rollout, ...] = ()

    def input_shape(self, data_type: str) -> tuple[int, ...] | None:
        """The item shape every member for ``data_type`` accepts (None: the tenant has none)."""
        shapes = {member.input_shape for member in self._fitting(data_type)}
        if not shapes:
            return None
        if len(shapes) > 1:
            raise ValueError(f"tenant {self.tenant!r} has {data_type} models with different input shapes {sorted(shapes)}")
        return shapes.pop()

    def plan(self, data_type: str, unhealthy: Collection[str] = (), draw: random.Random | None = None) -> Plan:
        """The plan for one request; models whose key is in ``unhealthy`` are left out, ``draw``
        decides canary and shadow traffic."""
        draw = draw or random

        def usable(member: Member) -> bool:
            return member.key not in unhealthy

        members = {member.name: member for member in self._fitting(data_type) if usable(member)}
        shadows = []
        for rollout in self.rollouts:
            candidate = rollout.member
            if candidate.data_type != data_type or not usable(candidate) or draw.random() >= rollout.fraction:
                continue
            if rollout.mode == "canary":
                members[candidate.name] = candidate
            else:
                shadows.append(candidate)
        chosen = tuple(member for _, member in sorted(members.items()))
        keys = {member.key for member in chosen}
        return Plan(chosen, tuple(shadow for shadow in shadows if shadow.key not in keys))

    def with_weights(self, weights: Mapping[str, float]) -> TenantEnsemble:
        """The same ensemble with new weights for the given keys (active members and candidates)."""

        def reweighted(member: Member) -> Member:
            return replace(member, weight=weights[member.key]) if member.key in weights else member

        return TenantEnsemble(
            self.tenant,
            tuple(reweighted(member) for member in self.members),
            tuple(replace(rollout, member=reweighted(rollout.member)) for rollout in self.rollouts),
        )

    @property
    def weights(self) -> dict[str, float]:
        """Every model's weight by key: the active members' and the candidates' under trial."""
        return {member.key: member.weight for member in (*self.members, *(rollout.member for rollout in self.rollouts))}

    def weight_of(self, key: str) -> float | None:
        return self.weights.get(key)

    def _fitting(self, data_type: str) -> list[Member]:
        return [member for member in self.members if member.data_type == data_type]


def member_from(version: ModelVersion, input_shape: tuple[int, ...]) -> Member:
    return Member(version.name, version.version, version.kind, version.artifact_uri, version.ensemble_weight, input_shape)


def combine(scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean over models: ``scores`` ``[models, items]``, ``weights`` ``[models]``; equal
    weights when they are all zero."""
    total = float(weights.sum())
    if total <= 0.0:
        return scores.mean(axis=0)
    return (weights / total) @ scores


def reweight(weights: Mapping[str, float], scores: Mapping[str, float], is_anomaly: bool, rate: float) -> dict[str, float]:
    """New weights of the models in ``scores`` after a verdict on their prediction (see the module
    docstring); the models' total weight is unchanged."""
    label = 1.0 if is_anomaly else 0.0
    keys = list(scores)
    total = sum(weights[key] for key in keys)
    if not keys or total <= 0.0:
        return {key: weights[key] for key in keys}
    updated = {key: weights[key] * math.exp(-rate * abs(scores[key] - label)) for key in keys}
    scale = total / sum(updated.values())
    floor = WEIGHT_FLOOR_SHARE * total / len(keys)
    return {key: max(value * scale, floor) for key, value in updated.items()}


@dataclass
class OnlineAccuracy:
    """How often each model's own decision (score >= threshold) matched the feedback."""

    correct: dict[str, int] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)

    def record(self, scores: Mapping[str, float], is_anomaly: bool, threshold: float) -> None:
        for key, score in scores.items():
            self.seen[key] = self.seen.get(key, 0) + 1
            self.correct[key] = self.correct.get(key, 0) + int((score >= threshold) == is_anomaly)

    def of(self, keys: Iterable[str]) -> dict[str, float]:
        return {key: self.correct.get(key, 0) / self.seen[key] for key in keys if self.seen.get(key)}
