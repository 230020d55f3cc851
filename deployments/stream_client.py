"""Stream consumers' way to the ModelRouter: ``streaming.scoring.EnsembleClient`` over a Serve
``DeploymentHandle`` (streaming cannot import deployments, so the adapter lives here).

    client = RouterEnsembleClient(serve.get_deployment_handle(ROUTER, app_name=...))
    answers = client.score(window_batches)   # one ScoredWindows or Refusal per batch

The handle is picklable, so the client travels to the consumer actors with it.
"""

from __future__ import annotations

from datetime import datetime, timezone

from ray.serve.handle import DeploymentHandle

from deployments.records import ScoreRequest, ScoreResult
from streaming.scoring import Refusal, ScoredWindows, WindowBatch


class RouterEnsembleClient:
    def __init__(self, router: DeploymentHandle, timeout_s: float = 30.0):
        self._router = router
        self._timeout_s = timeout_s

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
