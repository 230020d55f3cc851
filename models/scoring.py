"""The scoring contract for serving: a trained network plus its calibration, stateless and batched.

    scorer = fit_scorer("rnn", [series_a, series_b], window_length=64, epochs=5)
    scores = scorer.score(windows)            # float32 [B, L] -> float32 [B], each in [0, 1]
    uri = save_scorer(scorer, "some/dir")     # "file:///abs/some/dir"
    scorer = load_scorer(uri, device="cpu")

Forecaster kinds (``"rnn"``, ``"cnn"``, ``"hybrid"``): a window is ``window_length`` consecutive
raw values of one series, oldest first; the first ``window_length - 1`` are context and the last is
the value being scored. The scorer normalises with the training series' mean and scale, forecasts
the last value, and turns the forecast error into a score.

Image kind (``"image_cnn"``): ``score(frames)`` takes ``float32 [B, H, W]`` frames with values in
[0, 1]; the anomaly signal is the reconstruction error of the autoencoder.

Calibration: the error is divided by the error's spread on the training data (z), and the score is
the two-sided normal tail probability of z on a log scale, ``-log10 P(|N| > z) / 10`` clipped to
[0, 1]: an error as large as is usual in training scores about 0.05, three spreads about 0.26, and
beyond six spreads close to 1. Scores mean the same for every kind, so they can be averaged.

A scorer directory holds ``scorer.json`` (kind, window length, normalisation, calibration),
``weights.pt`` + ``network.json`` (state_dict, see ``models.networks``) and ``program.pt2``
(a ``torch.export`` program of the network for runtimes without rtml).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import torch
from torch import nn

from models import _fit
from models.networks import (
    FORECASTER_KINDS,
    IMAGE_KINDS,
    NETWORKS,
    build_network,
    export_program,
    load_network,
    save_network,
)
from rtml.errors import RtmlError

SCORER_FILE = "scorer.json"
PROGRAM_FILE = "program.pt2"
# log(1e-10): a tail probability this small scores 1.
_LOG_SMALLEST_TAIL = math.log(1e-10)


def tail_score(z: torch.Tensor) -> torch.Tensor:
    """Calibrated score in [0, 1] of standardised errors ``z`` (see the module docstring)."""
    log_tail = math.log(2.0) + torch.special.log_ndtr(-z.clamp_min(0.0))
    return (log_tail / _LOG_SMALLEST_TAIL).clamp(0.0, 1.0)


@dataclass
class WindowScorer:
    """A trained network and what it needs to score raw windows (see the module docstring)."""

    kind: str
    network: nn.Module
    window_length: int
    # Forecasters: raw value -> (value - value_center) / value_scale before the network.
    value_center: float = 0.0
    value_scale: float = 1.0
    # The error's typical size on the training data: z = (error - error_center) / error_scale.
    error_center: float = 0.0
    error_scale: float = 1.0
    device: str = "cpu"
    extra: dict = field(default_factory=dict)

    def errors(self, batch: np.ndarray) -> torch.Tensor:
        """The raw anomaly signal per item: |forecast error| (normalised units) or the frame's mean
        squared reconstruction error."""
        data = torch.as_tensor(np.ascontiguousarray(batch), dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            if self.kind in IMAGE_KINDS:
                return (self.network(data) - data).pow(2).mean(dim=(1, 2))
            normalised = (data - self.value_center) / self.value_scale
            forecast = self.network(normalised[:, :-1])
            return (normalised[:, -1] - forecast).abs()

    def score(self, batch: np.ndarray) -> np.ndarray:
        """Scores in [0, 1] for windows ``[B, window_length]`` (frames ``[B, H, W]`` for images)."""
        batch = np.asarray(batch, dtype=np.float32)
        self._check_shape(batch)
        if len(batch) == 0:
            return np.zeros((0,), dtype=np.float32)
        z = (self.errors(batch) - self.error_center) / self.error_scale
        return tail_score(z).cpu().numpy()

    def _check_shape(self, batch: np.ndarray) -> None:
        if self.kind in IMAGE_KINDS:
            expected = (self.network.hparams["height"], self.network.hparams["width"])
            if batch.ndim != 3 or batch.shape[1:] != expected:
                raise RtmlError(f"{self.kind} scorer expects frames [B, {expected[0]}, {expected[1]}], got {list(batch.shape)}")
        elif batch.ndim != 2 or batch.shape[1] != self.window_length:
            raise RtmlError(f"{self.kind} scorer expects windows [B, {self.window_length}], got {list(batch.shape)}")
        if not np.isfinite(batch).all():
            raise RtmlError("windows contain NaN or infinite values; drop or fill them before scoring")


def _robust_scale(values: np.ndarray) -> float:
    """A spread that is never zero (constant training data still gets a usable scale)."""
    spread = float(np.std(values))
    return spread if spread > 1e-6 else max(1e-3, 1e-3 * float(np.abs(values).mean()))


def fit_scorer(
    kind: str,
    series: list[np.ndarray],
    window_length: int = 64,
    epochs: int = 5,
    device: str = "cpu",
    seed: int = 0,
    **hparams,
) -> WindowScorer:
    """Train a scorer of ``kind`` on ``series`` (1-D arrays of raw values; for ``image_cnn``,
    arrays of frames ``[N, H, W]``) and calibrate it on its own training errors."""
    if kind not in NETWORKS:
        raise RtmlError(f"unknown model kind {kind!r}; known kinds: {', '.join(NETWORKS)}")
    device = _fit.resolve_device(device)
    torch.manual_seed(seed)
    if kind in IMAGE_KINDS:
        return _fit_image_scorer(kind, series, epochs, device, seed, hparams)
    training = forecaster_training_set(series, window_length)
    network = build_network(kind, context_length=window_length - 1, **hparams)
    _fit.train(network, training.inputs, training.targets, epochs=epochs, seed=seed, device=device)
    return calibrated_scorer(kind, network, training, device)


@dataclass
class TrainingSet:
    """Normalised forecasting pairs from raw series, with the normalisation that made them."""

    window_length: int
    value_center: float
    value_scale: float
    inputs: np.ndarray  # [N, window_length - 1]
    targets: np.ndarray  # [N]


def forecaster_training_set(series: list[np.ndarray], window_length: int) -> TrainingSet:
    """Every window of every usable series, normalised with the pooled mean and spread."""
    arrays = [np.asarray(s, dtype=np.float64).ravel() for s in series]
    usable = [a for a in arrays if len(a) >= window_length + 1 and np.isfinite(a).all()]
    if not usable:
        raise RtmlError(f"need at least one finite series longer than the window ({window_length} values) to train")
    pooled = np.concatenate(usable)
    center, scale = float(pooled.mean()), _robust_scale(pooled)
    pairs = [_fit.forecasting_pairs((a - center) / scale, window_length - 1, 1) for a in usable]
    return TrainingSet(
        window_length, center, scale, np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
    )


def calibrated_scorer(kind: str, network: nn.Module, training: TrainingSet, device: str = "cpu") -> WindowScorer:
    """A forecaster scorer whose error scale is the RMS forecast error on its training pairs."""
    errors = np.abs(training.targets - _fit.predict(network.to(device), training.inputs, device))
    error_scale = max(float(np.sqrt(np.mean(errors**2))), 1e-4)
    return WindowScorer(
        kind, network, training.window_length, training.value_center, training.value_scale, 0.0, error_scale, device
    )


def _fit_image_scorer(kind: str, series: list[np.ndarray], epochs: int, device: str, seed: int, hparams: dict) -> WindowScorer:
    frames = np.concatenate([np.asarray(s, dtype=np.float32).reshape(-1, *np.shape(s)[-2:]) for s in series])
    if len(frames) == 0 or not np.isfinite(frames).all():
        raise RtmlError("need at least one finite frame to train the image scorer")
    height, width = frames.shape[1:]
    network = build_network(kind, height=height, width=width, **hparams)
    _fit.train(network, frames, frames, epochs=epochs, seed=seed, device=device)
    scorer = WindowScorer(kind, network, window_length=1, device=device)
    errors = scorer.errors(frames).cpu().numpy()
    scorer.error_center = float(errors.mean())
    scorer.error_scale = _robust_scale(errors)
    return scorer


def save_scorer(scorer: WindowScorer, directory: str | Path) -> str:
    """Write ``scorer`` under ``directory``; returns its artifact URI (``file://...``)."""
    directory = Path(directory).resolve()
    save_network(scorer.network, directory)
    export_program(scorer.network.cpu(), directory / PROGRAM_FILE)
    scorer.network.to(scorer.device)
    meta = {
        "kind": scorer.kind,
        "window_length": scorer.window_length,
        "value_center": scorer.value_center,
        "value_scale": scorer.value_scale,
        "error_center": scorer.error_center,
        "error_scale": scorer.error_scale,
        "extra": scorer.extra,
    }
    (directory / SCORER_FILE).write_text(json.dumps(meta, indent=2))
    return directory.as_uri()


def artifact_path(artifact_uri: str) -> Path:
    """The local directory named by a ``file://`` URI (or a plain path)."""
    parsed = urlparse(artifact_uri)
    if parsed.scheme not in ("", "file"):
        raise RtmlError(f"cannot load model artifacts from {artifact_uri!r}: only local file:// URIs are supported")
    return Path(unquote(parsed.path) if parsed.scheme else artifact_uri)


def load_scorer(artifact_uri: str, device: str = "cpu") -> WindowScorer:
    """The scorer saved by ``save_scorer`` at ``artifact_uri``, on ``device`` (``"auto"`` allowed)."""
    directory = artifact_path(artifact_uri)
    if not (directory / SCORER_FILE).is_file():
        raise RtmlError(f"no model artifact at {artifact_uri!r} (missing {SCORER_FILE})")
    meta = json.loads((directory / SCORER_FILE).read_text())
    device = _fit.resolve_device(device)
    network = load_network(directory, device)
    return WindowScorer(network=network, device=device, **meta)


__all__ = [
    "FORECASTER_KINDS",
    "IMAGE_KINDS",
    "TrainingSet",
    "WindowScorer",
    "artifact_path",
    "calibrated_scorer",
    "forecaster_training_set",
    "fit_scorer",
    "load_scorer",
    "save_scorer",
    "tail_score",
]
