"""``ModelScorer``: one deployment per model kind; each replica holds many versions of that kind.

The version to use comes as Serve's ``multiplexed_model_id``, which is the version's artifact URI:
``@serve.multiplexed`` loads it on first use (LRU beyond ``MAX_MODELS_PER_REPLICA``) and Serve
sends later calls for it to replicas that have it loaded. ``@serve.batch`` merges concurrent calls
for the same version (Serve splits batches by model id) into one batch to score.

A replica asks for a GPU fraction when the app was built for a cluster with GPUs
(``deployments.app``) and then scores on CUDA; otherwise on CPU with ``serving.torch_threads``
threads, since the replicas of every kind share the machine's cores. On CPU a merged batch is
scored in forwards of at most ``serving.cpu_forward_windows`` windows: a forward of a few hundred
windows costs less per window than one of thousands (benchmarks/RESULTS.md); a GPU takes it whole.
"""

from __future__ import annotations

import asyncio

import numpy as np
import ray
import torch
from ray import serve

from deployments.calls import batch_size
from models.scoring import WindowScorer, load_scorer
from rtml.errors import RtmlError
from rtml.settings import ServingSettings

MAX_MODELS_PER_REPLICA = 16
# One forward at a time per replica; the next batch fills meanwhile.
SCORER_CONCURRENT_BATCHES = 1


@serve.deployment
class ModelScorer:
    def __init__(self, kind: str, settings: ServingSettings):
        self._kind = kind
        self._device = "cuda" if ray.get_gpu_ids() else "cpu"
        torch.set_num_threads(settings.torch_threads)
        self._forward_windows = settings.cpu_forward_windows if self._device == "cpu" else None
        self._score_batch.set_max_batch_size(batch_size(settings, SCORER_CONCURRENT_BATCHES))
        # Calls arrive already batched by the router: take whatever is queued, never wait.
        self._score_batch.set_batch_wait_timeout_s(0.0)

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def _scorer(self, artifact_uri: str) -> WindowScorer:
        scorer = await asyncio.to_thread(load_scorer, artifact_uri, self._device)
        if scorer.kind != self._kind:
            raise RtmlError(f"the model at {artifact_uri} is a {scorer.kind} model; this deployment serves {self._kind} models")
        return scorer

    async def score(self, windows: np.ndarray) -> np.ndarray:
        """Scores in [0, 1] of ``windows`` with the version named by the multiplexed model id."""
        return await self._score_batch(windows)

    @serve.batch(max_concurrent_batches=SCORER_CONCURRENT_BATCHES)
    async def _score_batch(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        scorer = await self._scorer(serve.get_multiplexed_model_id())
        # Arrays that arrive through Ray's object store are read-only; torch wants writable memory.
        merged = np.concatenate(batches) if len(batches) > 1 or not batches[0].flags.writeable else batches[0]
        scores = await asyncio.to_thread(score_in_forwards, scorer, merged, self._forward_windows)
        return np.split(scores, np.cumsum([len(batch) for batch in batches[:-1]]))


def score_in_forwards(scorer: WindowScorer, windows: np.ndarray, forward_windows: int | None) -> np.ndarray:
    """``scorer.score(windows)``, in forwards of at most ``forward_windows`` windows (None: one)."""
    if forward_windows is None or len(windows) <= forward_windows:
        return scorer.score(windows)
    return np.concatenate([scorer.score(windows[start : start + forward_windows]) for start in range(0, len(windows), forward_windows)])
