"""Stream consumers' way to the ModelRouter: ``streaming.scoring.EnsembleClient`` over a Serve
``DeploymentHandle`` (streaming cannot import deployments, so the adapter lives here).

    client = RouterEnsembleClient(app_name)  # small and picklable: it travels to consumer actors
    answers = client.score(window_batches)   # one ScoredWindows or Refusal per batch

The handle is looked up where the client is used, on first use, so that a consumer actor's
constructor arguments stay a few kilobytes (Ray keeps those inline, and restarts need them).
"""

from __future__ import annotations

from datetime import datetime, timezone
from functools import cached_property

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.app import ROUTER
from deployments.records import ScoreRequest, ScoreResult
from streaming.scoring import Refusal, ScoredWindows, WindowBatch


class RouterEnsembleClient:
    def __init__(self, app_name: str, timeout_s: float = 30.0):
        self._app_name = app_name
        self._timeout_s = timeout_s

    def __getstate__(self) -> dict:
        return {"_app_name": self._app_name, "_timeout_s": self._timeout_s}

    @cached_property
    def _router(self) -> DeploymentHandle:
        return serve.get_deployment_handle(ROUTER, app_name=self._app_name)

    def score(self, batches: list[WindowBatch]) -> list[ScoredWindows | Refusal]:
        requests = [
            ScoreRequest(
                tenant=batch.tenant,
                windows=batch.windows,
                data_type=batch.data_type,
                entities=batch.entities,
                event_ids=batch.event_ids,
                event_times=[datetime.fromtimestamp(us / 1e6, tz=timezone.utc) for us in batch.event_times_us.tolist()],
                subjects=batch.subjects,
                received_at=float(batch.available_at.min()) if len(batch) else 0.0,
                persist=False,
            )
            for batch in batches
        ]
        results = self._router.score_many.remote(requests).result(timeout_s=self._timeout_s)
        return [
            ScoredWindows(r.prediction_ids, r.ensemble_scores, r.is_anomaly, r.scores, r.model_versions)
            if isinstance(r, ScoreResult)
            else Refusal(r.status, r.reason, r.retry_after_s)
            for r in results
        ]
