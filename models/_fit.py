"""Training and batched inference for the networks (internal: the public faces are
``models.scoring`` for serving and ``models.detector`` for streams)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# Inference always runs in batches of exactly this size (the last one padded): torch's CPU kernels
# may round differently for different batch sizes (a batch of 1 or 7 does), and a window's forecast
# must not depend on how many other windows were scored with it (the detector's causality and its
# stream/offline equality rest on that). Small, because the stream forecasts each entity's few new
# windows per batch: the padding of every call is work thrown away.
INFERENCE_BATCH = 32


def resolve_device(device: str) -> str:
    """``"auto"`` becomes ``"cuda"`` when torch sees a GPU, else ``"cpu"``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def sliding_windows(values: np.ndarray, length: int) -> np.ndarray:
    """Every run of ``length`` consecutive values, ``[len(values) - length + 1, length]`` (a view)."""
    return np.lib.stride_tricks.sliding_window_view(np.asarray(values, dtype=np.float32), length)


def forecasting_pairs(values: np.ndarray, context_length: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Context windows and the value ``horizon`` steps after each window's end."""
    windows = sliding_windows(values, context_length + horizon)
    return windows[:, :context_length], windows[:, -1]


def train(
    network: nn.Module,
    inputs: np.ndarray,
    targets: np.ndarray,
    epochs: int,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    seed: int = 0,
    device: str = "cpu",
) -> nn.Module:
    """Fit ``network`` so that ``network(inputs) ≈ targets`` (Huber loss, Adam), in place.

    The Huber loss keeps a few anomalous training values from dominating the fit."""
    generator = torch.Generator().manual_seed(seed)
    network.to(device).train()
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate)
    loss_function = nn.HuberLoss(delta=1.0)
    # Copies: the inputs are often read-only sliding-window views.
    x_all = torch.tensor(np.asarray(inputs), dtype=torch.float32)
    y_all = torch.tensor(np.asarray(targets), dtype=torch.float32)
    for _ in range(epochs):
        order = torch.randperm(len(x_all), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_function(network(x_all[batch].to(device)), y_all[batch].to(device))
            loss.backward()
            optimizer.step()
    return network.eval()


def predict(network: nn.Module, inputs: np.ndarray, device: str = "cpu") -> np.ndarray:
    """``network(inputs)`` in fixed-size batches without autograd, as float32 numpy."""
    network.eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(inputs), INFERENCE_BATCH):
            chunk = np.asarray(inputs[start : start + INFERENCE_BATCH], dtype=np.float32)
            padded = np.zeros((INFERENCE_BATCH, *chunk.shape[1:]), dtype=np.float32)
            padded[: len(chunk)] = chunk
            outputs.append(network(torch.from_numpy(padded).to(device)).float().cpu().numpy()[: len(chunk)])
    if not outputs:
        return np.zeros((0,), dtype=np.float32)
    return np.concatenate(outputs)
