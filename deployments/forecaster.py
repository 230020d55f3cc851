"""``EntityForecaster``: the stream detector's per-entity networks (``streaming.detection``).

Each entity's forecaster is refitted every few hundred values, so there are many small networks:
the model id of a call (Serve's ``multiplexed_model_id``) is the fit's artifact URI, which
``@serve.multiplexed`` loads on first use (LRU beyond ``MAX_NETWORKS_PER_REPLICA``), and Serve
sends later calls for it to a replica that has it. A call forecasts the windows of one fit.

Forecasts run with one torch thread in fixed-size batches (``models._fit.predict``), so a window's
forecast is the same number whoever else was forecast with it and on whichever replica: the stream's
scores equal the offline detector's (``rtml nab --offline``). On a GPU replica they are CUDA's
numbers, which may round differently from the CPU's.
"""

from __future__ import annotations

import asyncio

import numpy as np
import ray
import torch
from ray import serve
from torch import nn

from models import _fit
from models.networks import load_network
from models.scoring import artifact_path

# The networks are small (a few thousand weights): a replica keeps many entities' current fits.
MAX_NETWORKS_PER_REPLICA = 512


@serve.deployment
class EntityForecaster:
    def __init__(self):
        self._device = "cuda" if ray.get_gpu_ids() else "cpu"
        torch.set_num_threads(1)

    @serve.multiplexed(max_num_models_per_replica=MAX_NETWORKS_PER_REPLICA)
    async def _network(self, model_id: str) -> nn.Module:
        return await asyncio.to_thread(load_network, artifact_path(model_id), self._device)

    async def forecast(self, windows: np.ndarray) -> np.ndarray:
        """float32 forecasts of ``windows`` by the fit named by the multiplexed model id."""
        network = await self._network(serve.get_multiplexed_model_id())
        return await asyncio.to_thread(_fit.predict, network, windows, self._device)
