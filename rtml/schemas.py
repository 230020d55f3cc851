"""Records shared across packages: what an event, a prediction, a piece of feedback and a model
version are. Validation of outside input happens here, once; the hot paths move these records as
columnar batches (Arrow / numpy) with the same field names.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return uuid.uuid4().hex


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class DataType(str, Enum):
    """How an event is routed: ``metric`` values are windowed and scored now (stream path),
    ``image`` frames go to the image model, ``record`` events land in the lakehouse for batch jobs."""

    METRIC = "metric"
    IMAGE = "image"
    RECORD = "record"


class Event(BaseModel):
    """One observation from a producer. ``entity`` is the series key (a sensor, a host, a card)."""

    model_config = ConfigDict(extra="forbid")

    event_id: str = Field(default_factory=new_id, min_length=1, max_length=128)
    tenant: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    entity: str = Field(min_length=1, max_length=256)
    data_type: DataType = DataType.METRIC
    event_time: datetime
    value: float | None = None
    attributes: dict[str, Any] = Field(default_factory=dict)
    # The data subject this event is about (for right-to-erasure); None when it names nobody.
    subject: str | None = Field(default=None, max_length=256)

    @field_validator("event_time")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return _as_utc(value)

    @field_validator("value")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and value != value:  # NaN
            raise ValueError("value must be a number, not NaN")
        return value


class Prediction(BaseModel):
    """The router's answer for one scored window."""

    prediction_id: str = Field(default_factory=new_id)
    event_id: str
    tenant: str
    entity: str
    event_time: datetime
    scores: dict[str, float]  # model key ("name@version") -> anomaly score in [0, 1]
    ensemble_score: float
    is_anomaly: bool
    model_versions: dict[str, str]  # model name -> version
    latency_ms: float = 0.0
    created_at: datetime = Field(default_factory=utc_now)
    subject: str | None = None


class Feedback(BaseModel):
    """A person's (or a system's) verdict on a prediction: was it really an anomaly?"""

    model_config = ConfigDict(extra="forbid")

    feedback_id: str = Field(default_factory=new_id)
    prediction_id: str = Field(min_length=1)
    tenant: str = Field(min_length=1, max_length=64)
    is_anomaly: bool
    comment: str = Field(default="", max_length=4096)
    author: str | None = None
    created_at: datetime = Field(default_factory=utc_now)
    subject: str | None = None


class ModelStatus(str, Enum):
    CANDIDATE = "candidate"
    ACTIVE = "active"
    RETIRED = "retired"


class ModelVersion(BaseModel):
    """One registered model version: what it is, how good it was, where its weights are and what it
    was trained from (lineage)."""

    name: str
    version: int
    kind: str  # "rnn" | "cnn" | "hybrid" | "image_cnn"
    tenant: str
    status: ModelStatus = ModelStatus.CANDIDATE
    metrics: dict[str, float] = Field(default_factory=dict)
    artifact_uri: str
    ensemble_weight: float = 1.0
    training_snapshot_ids: dict[str, int] = Field(default_factory=dict)  # table -> snapshot id
    feature_set_version: str = ""
    created_at: datetime = Field(default_factory=utc_now)

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"
