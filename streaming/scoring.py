"""What the stream asks of the scoring service, and what it keeps of the answer.

Consumers send whole batches of windows, one ``WindowBatch`` per tenant and data type, to an
``EnsembleClient`` (the ModelRouter behind a Serve handle; ``deployments.stream_client`` adapts
it) and get per-window ensemble scores, anomaly decisions and model versions back, or a refusal.
The consumer, not the router, writes the prediction rows (``prediction_table``), so that it can
commit its offsets once they are durable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa

from rtml.errors import RtmlError
from streaming.windowing import MICROS


@dataclass
class WindowBatch:
    """Windows of one tenant and data type, with what the predictions table keeps about each."""

    tenant: str
    data_type: str  # "metric": float32 [n, window_length]; "image": float32 [n, height, width]
    windows: np.ndarray
    event_ids: list[str]
    entities: list[str]
    event_times_us: np.ndarray  # int64
    subjects: list[str | None]
    available_at: np.ndarray  # float64 wall-clock seconds

    def __len__(self) -> int:
        return len(self.windows)


@dataclass
class ScoredWindows:
    prediction_ids: list[str]
    ensemble_scores: np.ndarray  # float [n] in [0, 1]
    is_anomaly: np.ndarray  # bool [n]
    scores: dict[str, np.ndarray]  # model key "name@version" -> float [n]
    model_versions: dict[str, str]  # model name -> version


@dataclass(frozen=True)
class Refusal:
    """Why a batch was not scored: 4xx means it never will be (e.g. the tenant has no model), 5xx
    that it may be later."""

    status: int
    reason: str
    retry_after_s: float | None = None

    @property
    def permanent(self) -> bool:
        return self.status < 500


class EnsembleClient(Protocol):
    def score(self, batches: list[WindowBatch]) -> list[ScoredWindows | Refusal]:
        """Score every batch; each gets its scores or a refusal. Raises when the service cannot be
        reached (the consumer retries)."""


def warm_up(client: EnsembleClient, tenants: list[str], window_length: int, timeout_s: float = 120.0) -> None:
    """Score one window per tenant, so that the models are loaded before the stream's first events
    arrive (a scorer replica loads a version on its first call), and fail early if a tenant cannot
    be scored at all."""
    deadline = time.monotonic() + timeout_s
    for tenant in tenants:
        probe = WindowBatch(tenant, "metric", np.zeros((1, window_length), np.float32), ["warm-up"], ["warm-up"], np.zeros(1, np.int64), [None], np.zeros(1))
        while True:
            (answer,) = client.score([probe])
            if isinstance(answer, ScoredWindows):
                break
            if answer.permanent or time.monotonic() > deadline:
                raise RtmlError(f"tenant {tenant!r} cannot be scored: {answer.reason}")
            time.sleep(answer.retry_after_s or 0.5)


def prediction_table(batch: WindowBatch, scored: ScoredWindows, scored_at: float) -> pa.Table:
    """The predictions-table rows of one scored batch, column by column."""
    count = len(batch)
    timestamp = pa.timestamp("us", tz="UTC")
    model_keys = list(scored.scores)
    per_model = np.stack([np.asarray(scored.scores[key], np.float64) for key in model_keys], axis=1) if model_keys else np.empty((count, 0))
    names = list(scored.model_versions)
    return pa.table(
        {
            "prediction_id": pa.array(scored.prediction_ids, pa.string()),
            "event_id": pa.array(batch.event_ids, pa.string()),
            "tenant": pa.array([batch.tenant] * count, pa.string()),
            "entity": pa.array(batch.entities, pa.string()),
            "event_time": pa.array(batch.event_times_us, timestamp),
            "scores": _same_keys_map(model_keys, per_model.ravel(), count),
            "ensemble_score": pa.array(np.asarray(scored.ensemble_scores, np.float64)),
            "is_anomaly": pa.array(np.asarray(scored.is_anomaly, bool)),
            "model_versions": _same_keys_map(names, np.tile(np.array([scored.model_versions[n] for n in names], dtype=object), count), count),
            "latency_ms": pa.array((scored_at - batch.available_at) * 1000.0, pa.float64()),
            "created_at": pa.array(np.full(count, int(scored_at * MICROS)), timestamp),
            "subject": pa.array(batch.subjects, pa.string()),
        }
    )


def _same_keys_map(keys: list[str], values: np.ndarray, rows: int) -> pa.MapArray:
    """A map column whose every row holds ``keys``, the values given row after row."""
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * len(keys))
    return pa.MapArray.from_arrays(offsets, pa.array(keys * rows, pa.string()), pa.array(values))
