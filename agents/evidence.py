"""The agents' vocabulary: what an anomaly, an incident and each node's evidence are.

Every node of the agent graph (``agents.graph``) reads and writes these types, and every backend
returns them, so that the production and embedded backends are interchangeable and the state the
graph carries between processes (Ray actors, Serve replicas) is plain pydantic data.

A node whose backend was slow or down still returns its evidence type, with ``partial=True`` and
``error`` saying what happened: the graph never waits past a node's timeout and never loses the
evidence the other nodes found.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from rtml.schemas import DETECTOR_MEMBER, Prediction, UtcDatetime


class Anomaly(BaseModel):
    """One anomalous prediction, as the agents see it."""

    tenant: str
    entity: str
    prediction_id: str
    event_id: str
    event_time: UtcDatetime
    score: float  # the strongest reason it was flagged: max(ensemble score, detector score)
    scores: dict[str, float] = Field(default_factory=dict)

    @classmethod
    def from_prediction(cls, prediction: Prediction) -> Anomaly:
        return cls(
            tenant=prediction.tenant,
            entity=prediction.entity,
            prediction_id=prediction.prediction_id,
            event_id=prediction.event_id,
            event_time=prediction.event_time,
            score=max([prediction.ensemble_score, *([prediction.scores[DETECTOR_MEMBER]] if DETECTOR_MEMBER in prediction.scores else [])]),
            scores=dict(prediction.scores),
        )


class Incident(BaseModel):
    """Consecutive anomalies of one entity (and of the entities that depend on it) that the agents
    explain once, and update as it grows."""

    incident_id: str
    tenant: str
    entity: str  # where it began
    entities: list[str]  # every entity with an anomaly in it, in order of their first anomaly
    first_anomaly_at: dict[str, UtcDatetime] = Field(default_factory=dict)  # entity -> event time of its first anomaly
    started_at: UtcDatetime  # event time of the first anomaly
    last_at: UtcDatetime  # event time of the latest anomaly
    anomalies: int
    peak_score: float
    first_prediction_id: str
    first_event_id: str = ""
    latest_prediction_id: str
    status: Literal["open", "resolved"] = "open"
    revision: int = 0  # bumped each time the incident is (re-)explained or resolved


# ---------------------------------------------------------------------------------------------- search


class Document(BaseModel):
    """What the search index holds: a past incident report, a runbook, a log excerpt or a past
    enrichment, of one tenant."""

    doc_id: str
    tenant: str
    kind: Literal["incident_report", "runbook", "log", "enrichment"]
    title: str
    text: str
    entities: list[str] = Field(default_factory=list)  # the entities it is about
    at: UtcDatetime | None = None  # when it happened or was written (None: timeless, e.g. a runbook)


class SearchHit(BaseModel):
    document: Document
    score: float  # the agent's final ranking score (higher is more similar)
    bm25: float  # the backend's lexical score of the candidate


class SearchEvidence(BaseModel):
    hits: list[SearchHit] = Field(default_factory=list)
    backend: str = ""
    partial: bool = False
    error: str | None = None


# ----------------------------------------------------------------------------------------------- graph


class GraphEntity(BaseModel):
    """A node of a tenant's dependency graph."""

    tenant: str
    entity: str
    kind: Literal["service", "host", "sensor", "site", "other"] = "other"


class Dependency(BaseModel):
    """``entity`` depends on ``depends_on`` (an edge pointing upstream, towards what it needs)."""

    tenant: str
    entity: str
    depends_on: str


class Neighbour(BaseModel):
    """An entity within k hops of another, upstream (what it depends on) or downstream (what depends on it)."""

    entity: str
    kind: str
    hops: int
    direction: Literal["upstream", "downstream"]


class RootCause(BaseModel):
    entity: str
    kind: str
    hops: int  # from the incident's entity, upstream (0: the entity itself)
    anomalous: bool
    first_anomaly_at: datetime | None
    explains: int  # how many anomalous entities are downstream of it (itself included)
    rank: int  # 1 = the likeliest


class GraphEvidence(BaseModel):
    root_causes: list[RootCause] = Field(default_factory=list)
    blast_radius: list[Neighbour] = Field(default_factory=list)  # downstream within k hops
    backend: str = ""
    partial: bool = False
    error: str | None = None


# ------------------------------------------------------------------------------------------- reasoning


class Reasoning(BaseModel):
    summary: str
    sections: dict[str, str] = Field(default_factory=dict)  # what, where, since, similar, cause, checks
    provider: str  # "template", "openai", "anthropic"
    model: str = ""
    prompt_version: str = ""
    fallback: bool = False  # the template stood in because the provider failed or timed out
    partial: bool = False
    error: str | None = None


# ---------------------------------------------------------------------------------------------- alerts


class Alert(BaseModel):
    """One alert per incident: fired when it opens, updated as it grows, resolved when it ends."""

    dedup_key: str  # per incident: every channel de-duplicates on it
    tenant: str
    incident_id: str
    entity: str
    severity: Literal["critical", "warning", "info"]
    summary: str
    description: str
    started_at: UtcDatetime
    ended_at: UtcDatetime | None = None  # set when resolved
    labels: dict[str, str] = Field(default_factory=dict)


class AlertOutcome(BaseModel):
    channel: str
    dedup_key: str
    action: Literal["fired", "resolved"]
    ok: bool
    error: str | None = None
