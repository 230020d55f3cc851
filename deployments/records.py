"""What travels between the deployments: a scoring request, its result, or the reason it was
refused. Windows stay numpy arrays on every hop (Ray moves them without copying them into Python
objects); only the Ingress turns them into JSON for HTTP clients."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

# A prediction id is its scored batch's id (26 hex digits, random) followed by the item's position
# in that batch (6 hex digits): ids stay unique, cost one random draw per batch, and lead feedback
# straight back to the batch's per-model scores.
BATCH_ID_DIGITS = 26
INDEX_DIGITS = 6
MAX_BATCH_ITEMS = 16**INDEX_DIGITS


@dataclass
class ScoreRequest:
    """Windows of one tenant and data type to score, with what the lakehouse keeps about each.

    ``windows`` is ``float32 [n, *item_shape]``; metadata lists are either None (defaults: a fresh
    event id, the arrival time, an empty entity) or hold one value per window."""

    tenant: str
    windows: np.ndarray
    data_type: str = "metric"
    entities: list[str] | None = None
    event_ids: list[str] | None = None
    event_times: list[datetime] | None = None
    subjects: list[str | None] | None = None
    received_at: float = 0.0
    # False: the caller writes the predictions itself (stream consumers, which commit their offsets
    # only once their own write is durable), so the router does not.
    persist: bool = True

    def __len__(self) -> int:
        return len(self.windows)


@dataclass
class ScoreResult:
    """Scores of one request's windows, in request order."""

    prediction_ids: list[str]
    ensemble_scores: np.ndarray  # float32 [n]
    is_anomaly: np.ndarray  # bool [n]
    scores: dict[str, np.ndarray]  # model key "name@version" -> float32 [n]
    model_versions: dict[str, str]  # model name -> version
    weights: dict[str, float] = field(default_factory=dict)  # model key -> ensemble weight used


@dataclass(frozen=True)
class Rejection:
    """Why a request was not scored, as an HTTP status and a reason a person can act on."""

    status: int
    reason: str
    retry_after_s: float | None = None


def new_batch_id() -> str:
    return secrets.token_hex(16)[:BATCH_ID_DIGITS]


def prediction_ids(batch_id: str, start: int, count: int) -> list[str]:
    return [f"{batch_id}{index:0{INDEX_DIGITS}x}" for index in range(start, start + count)]


def split_prediction_id(prediction_id: str) -> tuple[str, int] | None:
    """(batch id, position) of an id made by ``prediction_ids``; None for any other string."""
    if len(prediction_id) != BATCH_ID_DIGITS + INDEX_DIGITS:
        return None
    try:
        return prediction_id[:BATCH_ID_DIGITS], int(prediction_id[BATCH_ID_DIGITS:], 16)
    except ValueError:
        return None
