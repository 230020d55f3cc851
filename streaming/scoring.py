"""What the stream asks of the scoring service.

Consumers send whole batches of windows, one ``rtml.schemas.ScoreRequest`` per tenant and data
type, to an ``EnsembleClient`` (the ModelRouter behind a Serve handle, ``deployments.stream_client``)
and get a ``ScoreResult`` (per-window ensemble scores, anomaly decisions and model versions) or a
``Refusal`` back: the same types the HTTP path uses. The consumer, not the router, writes the
prediction rows (``rtml.schemas.prediction_table``, with ``persist=False`` in its requests), so
that it can commit its offsets once they are durable.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Protocol

import numpy as np

from observability import tracing
from rtml.errors import RtmlError
from rtml.schemas import Prediction, Refusal, ScoreRequest, ScoreResult


class EnsembleClient(Protocol):
    def score(self, batches: list[ScoreRequest]) -> list[ScoreResult | Refusal]:
        """Score every batch; each gets its scores or a refusal. Raises when the service cannot be
        reached (the consumer retries)."""


class AnomalyListener(Protocol):
    """Who hears of the stream's anomalies once they are durable (the app's agent graph,
    ``deployments.agents.AgentGraphClient``). Picklable: the pipeline hands it to its sink actor."""

    def notify(self, predictions: list[Prediction], watermarks: dict[str, datetime], traces: dict[str, tracing.Carrier] | None = None) -> None:
        """Take the anomalous predictions of a durable batch and, per tenant, the newest event
        time the batch scored; ``traces``: the carriers of the traced ones among them, by event id
        (``observability.tracing``). Returns at once (called on the sink's event loop) and never raises."""


def warm_up(client: EnsembleClient, tenants: list[str], window_length: int, timeout_s: float = 120.0) -> None:
    """Score one window per tenant, so that the models are loaded before the stream's first events
    arrive (a scorer replica loads a version on its first call), and fail early if a tenant cannot
    be scored at all."""
    deadline = time.monotonic() + timeout_s
    for tenant in tenants:
        probe = ScoreRequest(tenant, np.zeros((1, window_length), np.float32), event_ids=["warm-up"], entities=["warm-up"], persist=False)
        while True:
            (answer,) = client.score([probe])
            if isinstance(answer, ScoreResult):
                break
            if answer.permanent or time.monotonic() > deadline:
                raise RtmlError(f"tenant {tenant!r} cannot be scored: {answer.reason}")
            time.sleep(answer.retry_after_s or 0.5)
