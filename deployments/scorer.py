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
import time

import numpy as np
import ray
import torch
from ray import serve

from deployments.calls import batch_size
from models.scoring import WindowScorer, load_scorer
from observability import metrics, tracing
from rtml.errors import RtmlError
from rtml.settings import ServingSettings, Settings

MAX_MODELS_PER_REPLICA = 16
# One forward at a time per replica; the next batch fills meanwhile.
SCORER_CONCURRENT_BATCHES = 1


@serve.deployment
class ModelScorer:
    def __init__(self, kind: str, settings: ServingSettings, app_settings: Settings | None = None):
        if app_settings is not None:  # the app's settings, for this process's tracing
            tracing.configure(app_settings, f"rtml-scorer-{kind}")
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

    async def score(self, windows: np.ndarray, traces: list[tracing.Carrier] = ()) -> np.ndarray:
        """Scores in [0, 1] of ``windows`` with the version named by the multiplexed model id;
        ``traces``: the carriers of the traced events among them (a span "rtml.model" each)."""
        with tracing.stage("rtml.model", traces, {tracing.MODEL: serve.get_multiplexed_model_id(), tracing.BATCH_SIZE: len(windows)} if traces else None):
            return await self._score_batch(windows)

    @serve.batch(max_concurrent_batches=SCORER_CONCURRENT_BATCHES)
    async def _score_batch(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        scorer = await self._scorer(serve.get_multiplexed_model_id())
        # Arrays that arrive through Ray's object store are read-only; torch wants writable memory.
        merged = np.concatenate(batches) if len(batches) > 1 or not batches[0].flags.writeable else batches[0]
        scores = await asyncio.to_thread(score_in_forwards, scorer, merged, self._forward_windows)
        return np.split(scores, np.cumsum([len(batch) for batch in batches[:-1]]))


def score_in_forwards(scorer: WindowScorer, windows: np.ndarray, forward_windows: int | None) -> np.ndarray:
    """``scorer.score(windows)``, in forwards of at most ``forward_windows`` windows (None: one).
    Each forward's seconds and windows go to ``rtml_model_inference_seconds`` and
    ``rtml_model_batch_windows``, labelled with the scorer's kind (one scorer deployment per kind)."""
    if forward_windows is None or len(windows) <= forward_windows:
        return _forward(scorer, windows)
    return np.concatenate([_forward(scorer, windows[start : start + forward_windows]) for start in range(0, len(windows), forward_windows)])


def _forward(scorer: WindowScorer, windows: np.ndarray) -> np.ndarray:
    started = time.perf_counter()
    scores = scorer.score(windows)  # numpy out: on a GPU the forward has finished by now
    metrics.MODEL_INFERENCE.labels(model=scorer.kind).observe(time.perf_counter() - started)
    metrics.MODEL_BATCH.labels(model=scorer.kind).observe(len(windows))
    return scores
