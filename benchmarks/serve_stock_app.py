"""Benchmark (b): the ensemble as a Ray Serve user writes it from the Serve docs and their
performance guide, for `rtml bench serve` to compare rtml against.

One deployment per model, each batching its calls with ``@serve.batch``; ``max_ongoing_requests``
raised to fit the load; fractional CPUs so that everything fits on a small machine; a small FastAPI
ingress that sends each request's windows to every model concurrently through deployment handles
and combines the scores with the ensemble weights, with as many replicas as rtml's Ingress has.
Nothing rtml-specific: no router batching, no binary format, no lakehouse.
"""

import asyncio

import numpy as np
import torch
from fastapi import FastAPI
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle

from models.scoring import load_scorer

MAX_ONGOING_REQUESTS = 256
THRESHOLD = 0.5

api = FastAPI()


class PredictRequest(BaseModel):
    windows: list[list[float]]


@serve.deployment(max_ongoing_requests=MAX_ONGOING_REQUESTS, ray_actor_options={"num_cpus": 0.25})
class WindowModel:
    def __init__(self, artifact_uri: str):
        torch.set_num_threads(1)
        self.scorer = load_scorer(artifact_uri)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def score(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        scores = self.scorer.score(np.concatenate(batches))
        return np.split(scores, np.cumsum([len(batch) for batch in batches[:-1]]))


@serve.deployment(max_ongoing_requests=MAX_ONGOING_REQUESTS, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class EnsembleIngress:
    def __init__(self, models: dict[str, DeploymentHandle], weights: dict[str, float]):
        self.models = models
        self.weights = weights

    @api.post("/predict")
    async def predict(self, request: PredictRequest) -> dict:
        windows = np.asarray(request.windows, dtype=np.float32)
        names = list(self.models)
        scores = await asyncio.gather(*(self.models[name].score.remote(windows) for name in names))
        weights = np.array([self.weights[name] for name in names])
        ensemble = (weights / weights.sum()) @ np.stack(scores)
        return {
            "scores": {name: score.tolist() for name, score in zip(names, scores)},
            "ensemble_score": ensemble.tolist(),
            "is_anomaly": (ensemble >= THRESHOLD).tolist(),
        }


def build_stock_app(models: dict[str, str], weights: dict[str, float], ingress_replicas: int = 1) -> serve.Application:
    """The app for ``models`` (model key -> artifact URI) and their ensemble ``weights``, with as
    many ingress replicas as the app it is compared with."""
    handles = {
        key: WindowModel.options(name=f"WindowModel_{index}").bind(uri) for index, (key, uri) in enumerate(models.items())
    }
    return EnsembleIngress.options(num_replicas=ingress_replicas).bind(handles, weights)
