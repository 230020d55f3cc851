"""Records shared across packages: what an event, a prediction, a piece of feedback and a model
version are. Validation of outside input happens here, once: the field types below (``TenantId``,
``EntityId``, ...) are the one definition of what each field may hold, ``Event`` composes them,
and ``validate_events`` checks a whole batch of raw documents in one pydantic-core call (faster
than the column-by-column checks it replaced: benchmarks/RESULTS.md, validation). The hot paths then move these records as columnar batches (Arrow / numpy)
with the same field names.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Annotated, Any

import numpy as np
import orjson
import pyarrow as pa
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return uuid.uuid4().hex


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


TENANT_PATTERN = r"^[A-Za-z0-9_.-]+$"

# What each event field may hold, defined once and used by every entry point (stream records, HTTP
# requests, the lakehouse's records). All checks but the UTC conversion run inside pydantic-core.
TenantId = Annotated[str, Field(min_length=1, max_length=64, pattern=TENANT_PATTERN)]
EntityId = Annotated[str, Field(min_length=1, max_length=256)]
EventId = Annotated[str, Field(min_length=1, max_length=128)]
SubjectId = Annotated[str, Field(max_length=256)]
# Naive times are taken as UTC; numbers are seconds since the epoch (pydantic reads values beyond
# 2e10 as milliseconds).
UtcDatetime = Annotated[datetime, AfterValidator(_as_utc)]
# A measured value: a finite number. Strict, so that JSON ``true`` or ``"12"`` is refused rather
# than guessed at; text formats (CSV) convert their cells before validation.
Value = Annotated[float, Field(strict=True, allow_inf_nan=False)]


def _storable(attributes: dict[str, Any]) -> dict[str, Any]:
    if attributes:
        try:  # as the event log and the events table write them (streaming.router)
            orjson.dumps(attributes, default=str)
        except orjson.JSONEncodeError as error:
            raise ValueError(f"cannot be stored as JSON ({error}): nest at most 254 levels and keep integers within 64 bits") from None
    return attributes


# Free-form details of an event, stored as JSON text: only what orjson can write (it refuses deeper
# nesting and larger integers than JSON readers elsewhere take), so that a writer never fails on an
# event that validated.
Attributes = Annotated[dict[str, Any], AfterValidator(_storable)]


class DataType(str, Enum):
    """How an event is routed: ``metric`` values are windowed and scored now (stream path),
    ``image`` frames go to the image model, ``record`` events land in the lakehouse for batch jobs."""

    METRIC = "metric"
    IMAGE = "image"
    RECORD = "record"


class Event(BaseModel):
    """One observation from a producer. ``entity`` is the series key (a sensor, a host, a card)."""

    model_config = ConfigDict(extra="forbid")

    event_id: EventId = Field(default_factory=new_id)
    tenant: TenantId
    entity: EntityId
    data_type: DataType = DataType.METRIC
    event_time: UtcDatetime
    value: Value | None = None
    attributes: Attributes = Field(default_factory=dict)
    # The data subject this event is about (for right-to-erasure); None when it names nobody.
    subject: SubjectId | None = None

    @model_validator(mode="after")
    def _metric_has_value(self) -> Event:
        if self.data_type is DataType.METRIC and self.value is None:
            raise ValueError("a metric event needs a value")
        return self


_EVENTS = TypeAdapter(list[Event])
_TIME = TypeAdapter(UtcDatetime)
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# Microseconds for "no (readable) time" in int64 time columns.
NO_TIME = np.iinfo(np.int64).min


def micros(moment: datetime) -> int:
    """A UTC datetime as whole microseconds since the epoch (exact, no float rounding)."""
    return (moment - EPOCH) // timedelta(microseconds=1)


def event_times_us(raw: Sequence[Any]) -> np.ndarray:
    """Event times as ``Event.event_time`` reads them, in microseconds since the epoch; ``NO_TIME``
    where missing or unreadable (for callers that must order records before validating them)."""
    result = np.full(len(raw), NO_TIME, dtype=np.int64)
    for i, value in enumerate(raw):
        if value is not None:
            try:
                result[i] = micros(_TIME.validate_python(value))
            except ValidationError:
                pass  # left NO_TIME: the record's validation names the problem
    return result


def validate_events(documents: Sequence[Any]) -> tuple[list[Event | None], list[str | None]]:
    """Every document as an ``Event``, or why it is not one (its first problems, named by field):
    ``(events, reasons)`` with exactly one of the two set at each position. One pydantic-core call
    for the batch; a batch with bad documents pays a second call for its good ones."""
    reasons: list[str | None] = [None] * len(documents)
    try:
        return list(_EVENTS.validate_python(documents)), reasons
    except ValidationError as error:
        for problem in error.errors(include_url=False):
            index, *field = problem["loc"]
            where = ".".join(str(part) for part in field)
            if problem["type"] == "extra_forbidden":
                message = f"unknown field {where!r}; an event has only {', '.join(Event.model_fields)}"
            else:
                text = problem["msg"].removeprefix("Value error, ")
                message = f"{where}: {text}" if where else text
            reasons[index] = message if reasons[index] is None else f"{reasons[index]}; {message}"  # type: ignore[index]
    good = [i for i, reason in enumerate(reasons) if reason is None]
    events: list[Event | None] = [None] * len(documents)
    for i, event in zip(good, _EVENTS.validate_python([documents[i] for i in good])):
        events[i] = event
    return events, reasons


@dataclass
class ScoreRequest:
    """Windows of one tenant and data type to score, with what the predictions table keeps about
    each: what a stream consumer sends the ModelRouter and what the Ingress makes of an HTTP
    request. Columnar, so that windows and times cross every hop as numpy arrays.

    ``windows`` is ``float32 [n, *item_shape]``; every per-window field is either None (defaults:
    a fresh event id, the arrival time as event time, an empty entity) or holds one value per
    window."""

    tenant: str
    windows: np.ndarray
    data_type: str = DataType.METRIC.value
    entities: list[str] | None = None
    event_ids: list[str] | None = None
    event_times_us: np.ndarray | None = None  # int64 microseconds since the epoch
    subjects: list[str | None] | None = None
    # Wall-clock seconds at which each window's event became available (a stream record's log time,
    # an HTTP request's arrival): event-to-prediction latency is measured from here.
    available_at: np.ndarray | None = None  # float64
    # False: the caller writes the predictions itself (stream consumers, which commit their offsets
    # only once their own write is durable), so the router does not.
    persist: bool = True
    # The stream's per-entity detector: per forecaster, which network forecasts each window and
    # from what (``ForecastInputs``); the router answers with the forecasts (``ScoreResult``).
    forecasts: list[ForecastInputs] = field(default_factory=list)
    # The traced events among the windows: event id -> the W3C trace context (``traceparent``, ...)
    # of the span the scoring continues (``observability.tracing``). Empty for untraced requests.
    traces: dict[str, dict[str, str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.windows)


@dataclass
class ForecastInputs:
    """One forecaster's inputs for a request's windows: per window the model id (the artifact URI)
    of the per-entity network that forecasts it (``""``: none yet, it is still learning) and that
    network's input, ``float32 [n, context]``."""

    model_ids: list[str]
    windows: np.ndarray


@dataclass
class ScoreResult:
    """Scores of one request's windows, in request order."""

    prediction_ids: list[str]
    ensemble_scores: np.ndarray  # float32 [n] in [0, 1]
    is_anomaly: np.ndarray  # bool [n]
    scores: dict[str, np.ndarray]  # model key "name@version" -> float32 [n]
    model_versions: dict[str, str]  # model name -> version
    weights: dict[str, float] = field(default_factory=dict)  # model key -> ensemble weight used
    # Per ForecastInputs of the request: float32 [n] forecasts (NaN where it named no model).
    forecasts: list[np.ndarray] = field(default_factory=list)


class Refusal(Exception):
    """Why a request is not scored, as an HTTP status and a reason a person can act on: returned in
    place of a ``ScoreResult`` and raised by the request parsers. 4xx means it never will be as sent
    (``permanent``), 5xx that it may be later (after ``retry_after_s``)."""

    def __init__(self, status: int, reason: str, retry_after_s: float | None = None):
        super().__init__(reason)
        self.status, self.reason, self.retry_after_s = status, reason, retry_after_s

    @property
    def permanent(self) -> bool:
        return self.status < 500

    def __reduce__(self):  # travels between processes with all of its fields
        return type(self), (self.status, self.reason, self.retry_after_s)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Refusal) and (self.status, self.reason, self.retry_after_s) == (other.status, other.reason, other.retry_after_s)

    __hash__ = None  # type: ignore[assignment]


# How the predictions table keeps a shadow model's scores: beside the ensemble's, marked as such.
SHADOW_PREFIX = "shadow:"


def prediction_table(
    request: ScoreRequest, result: ScoreResult, scored_at: float, shadow_scores: Mapping[str, np.ndarray] | None = None
) -> pa.Table:
    """The lakehouse ``predictions`` rows of a scored request, built column by column (no per-row
    Python), for the stream's consumers and the serving sink alike. Per-window fields the request
    leaves out get the ``ScoreRequest`` defaults: the prediction id as event id, ``scored_at`` as
    event time, an empty entity, no subject, no latency."""
    count = len(result.prediction_ids)
    timestamp = pa.timestamp("us", tz="UTC")
    scored_us = round(scored_at * 1e6)
    scores = {**result.scores, **{SHADOW_PREFIX + key: values for key, values in (shadow_scores or {}).items()}}
    per_model = np.stack([np.asarray(values, np.float64) for values in scores.values()], axis=1) if scores else np.empty((count, 0))
    names = list(result.model_versions)
    latency_ms = (scored_at - request.available_at) * 1000.0 if request.available_at is not None else np.zeros(count)
    return pa.table(
        {
            "prediction_id": pa.array(result.prediction_ids, pa.string()),
            "event_id": pa.array(request.event_ids or result.prediction_ids, pa.string()),
            "tenant": pa.array([request.tenant] * count, pa.string()),
            "entity": pa.array(request.entities or [""] * count, pa.string()),
            "event_time": pa.array(request.event_times_us if request.event_times_us is not None else np.full(count, scored_us), timestamp),
            "scores": _same_keys_map(list(scores), pa.array(per_model.ravel(), pa.float64()), count),
            "ensemble_score": pa.array(np.asarray(result.ensemble_scores, np.float64)),
            "is_anomaly": pa.array(np.asarray(result.is_anomaly, bool)),
            "model_versions": _same_keys_map(names, pa.array([result.model_versions[name] for name in names] * count, pa.string()), count),
            "latency_ms": pa.array(latency_ms, pa.float64()),
            "created_at": pa.array(np.full(count, scored_us), timestamp),
            "subject": pa.array(request.subjects or [None] * count, pa.string()),
        }
    )


def _same_keys_map(keys: list[str], values: pa.Array, rows: int) -> pa.MapArray:
    """A map column whose every row holds ``keys``, the values given row after row."""
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * len(keys))
    return pa.MapArray.from_arrays(offsets, pa.array(keys * rows, pa.string()), values)


# The stream's per-entity detector's key in a prediction's ``scores`` (``streaming.detection``).
DETECTOR_MEMBER = "detector"


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
    tenant: TenantId
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
