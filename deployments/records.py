"""Prediction ids. What travels between the deployments (``ScoreRequest``, ``ScoreResult``,
``Refusal``) is the kernel's (``rtml.schemas``), shared with the stream: windows stay numpy arrays on
every hop; only the Ingress turns them into JSON for HTTP clients."""

from __future__ import annotations

import secrets

# A prediction id is its scored batch's id (26 hex digits, random) followed by the item's position
# in that batch (6 hex digits): ids stay unique, cost one random draw per batch, and lead feedback
# straight back to the batch's per-model scores.
BATCH_ID_DIGITS = 26
INDEX_DIGITS = 6
MAX_BATCH_ITEMS = 16**INDEX_DIGITS


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
