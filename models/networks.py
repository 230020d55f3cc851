"""The torch networks and their input contracts, by kind.

Forecasters (``"rnn"``, ``"cnn"``, ``"hybrid"``) read a batch of context windows of normalised
values, ``float32 [B, context_length]`` oldest first, and return ``float32 [B]``: the forecast of
the value ``horizon`` steps after the window's last value. One feature per step (a univariate
series); normalisation is the caller's job (see ``models.scoring``). Forecasters see the window
relative to its last value and forecast a change from it, so a shift in level changes nothing but
the level of the forecast.

The image network (``"image_cnn"``) is a convolutional autoencoder: it reads frames
``float32 [B, height, width]`` with values in about [0, 1] and returns their reconstructions of the
same shape; ``height`` and ``width`` must be multiples of 4. Its anomaly signal is the
reconstruction error.

Every network keeps the keyword arguments it was built with in ``hparams``, so that
``save_network``/``load_network`` (state_dict + JSON) can rebuild it; ``export_program`` writes a
``torch.export`` program (batch dimension dynamic) that ``torch.export.load`` runs without rtml.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

HPARAMS_FILE = "network.json"
WEIGHTS_FILE = "weights.pt"
FORECASTER_KINDS = ("rnn", "cnn", "hybrid")
IMAGE_KINDS = ("image_cnn",)


class RecurrentForecaster(nn.Module):
    """A GRU (or LSTM) over the window; the last hidden state forecasts the value ``horizon``
    steps ahead."""

    def __init__(self, context_length: int, hidden: int = 32, layers: int = 1, cell: str = "gru", horizon: int = 1):
        super().__init__()
        if cell not in ("gru", "lstm"):
            raise ValueError(f"cell must be 'gru' or 'lstm', not {cell!r}")
        self.hparams = dict(context_length=context_length, hidden=hidden, layers=layers, cell=cell, horizon=horizon)
        self.context_length = context_length
        recurrent = nn.GRU if cell == "gru" else nn.LSTM
        self.recurrent = recurrent(input_size=1, hidden_size=hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        last = windows[:, -1]
        outputs, _ = self.recurrent((windows - last.unsqueeze(1)).unsqueeze(-1))
        return last + self.head(outputs[:, -1]).squeeze(-1)


class CausalConvBlock(nn.Module):
    """A residual pair of dilated causal convolutions (padding on the left only, so output step t
    sees input steps <= t)."""

    def __init__(self, channels: int, kernel_size: int, dilation: int):
        super().__init__()
        self.left_padding = (kernel_size - 1) * dilation
        self.conv1 = nn.Conv1d(channels, channels, kernel_size, dilation=dilation)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size, dilation=dilation)
        self.activation = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.activation(self.conv1(nn.functional.pad(x, (self.left_padding, 0))))
        y = self.conv2(nn.functional.pad(y, (self.left_padding, 0)))
        return self.activation(x + y)


def _temporal_conv_stack(channels: int, kernel_size: int, levels: int) -> nn.Sequential:
    """Input projection and ``levels`` causal blocks with dilations 1, 2, 4, ... (a TCN)."""
    return nn.Sequential(
        nn.Conv1d(1, channels, 1),
        *[CausalConvBlock(channels, kernel_size, 2**level) for level in range(levels)],
    )


class ConvForecaster(nn.Module):
    """A temporal convolutional network: dilated causal 1-D convolutions; the last step's features
    forecast the value ``horizon`` steps ahead."""

    def __init__(self, context_length: int, channels: int = 16, kernel_size: int = 3, levels: int = 4, horizon: int = 1):
        super().__init__()
        self.hparams = dict(
            context_length=context_length, channels=channels, kernel_size=kernel_size, levels=levels, horizon=horizon
        )
        self.context_length = context_length
        self.features = _temporal_conv_stack(channels, kernel_size, levels)
        self.head = nn.Linear(channels, 1)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        last = windows[:, -1]
        features = self.features((windows - last.unsqueeze(1)).unsqueeze(1))
        return last + self.head(features[:, :, -1]).squeeze(-1)


class HybridForecaster(nn.Module):
    """A causal convolutional front-end (local shape) feeding a GRU (longer memory)."""

    def __init__(
        self, context_length: int, channels: int = 16, kernel_size: int = 3, levels: int = 2, hidden: int = 32, horizon: int = 1
    ):
        super().__init__()
        self.hparams = dict(
            context_length=context_length,
            channels=channels,
            kernel_size=kernel_size,
            levels=levels,
            hidden=hidden,
            horizon=horizon,
        )
        self.context_length = context_length
        self.features = _temporal_conv_stack(channels, kernel_size, levels)
        self.recurrent = nn.GRU(input_size=channels, hidden_size=hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        last = windows[:, -1]
        features = self.features((windows - last.unsqueeze(1)).unsqueeze(1)).transpose(1, 2)
        outputs, _ = self.recurrent(features)
        return last + self.head(outputs[:, -1]).squeeze(-1)


class ImageAutoencoder(nn.Module):
    """A small convolutional autoencoder for single-channel frames; frames unlike the training
    frames reconstruct badly."""

    def __init__(self, height: int, width: int, channels: int = 16, code_channels: int = 8):
        super().__init__()
        if height % 4 or width % 4:
            raise ValueError(f"frame height and width must be multiples of 4, not {height}x{width}")
        self.hparams = dict(height=height, width=width, channels=channels, code_channels=code_channels)
        self.encoder = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, code_channels, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(code_channels, channels, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(channels, 1, 4, stride=2, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(frames.unsqueeze(1))).squeeze(1)


NETWORKS: dict[str, type[nn.Module]] = {
    "rnn": RecurrentForecaster,
    "cnn": ConvForecaster,
    "hybrid": HybridForecaster,
    "image_cnn": ImageAutoencoder,
}


def build_network(kind: str, **hparams: Any) -> nn.Module:
    """A fresh network of ``kind`` (one of ``NETWORKS``) built from ``hparams``."""
    try:
        network_class = NETWORKS[kind]
    except KeyError:
        raise ValueError(f"unknown model kind {kind!r}; known kinds: {', '.join(NETWORKS)}") from None
    return network_class(**hparams)


def kind_of(network: nn.Module) -> str:
    for kind, network_class in NETWORKS.items():
        if type(network) is network_class:
            return kind
    raise ValueError(f"{type(network).__name__} is not a registered network")


def save_network(network: nn.Module, directory: str | Path) -> Path:
    """Write ``network`` as ``weights.pt`` (state_dict) and ``network.json`` (kind + hparams)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), directory / WEIGHTS_FILE)
    (directory / HPARAMS_FILE).write_text(json.dumps({"kind": kind_of(network), "hparams": network.hparams}))
    return directory


def load_network(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The network saved by ``save_network`` in ``directory``, in eval mode on ``device``."""
    directory = Path(directory)
    meta = json.loads((directory / HPARAMS_FILE).read_text())
    network = build_network(meta["kind"], **meta["hparams"])
    network.load_state_dict(torch.load(directory / WEIGHTS_FILE, map_location=device, weights_only=True))
    return network.to(device).eval()


def example_input(network: nn.Module, batch: int = 2) -> torch.Tensor:
    """A random batch in the shape ``network`` reads (for export and smoke checks)."""
    if kind_of(network) in IMAGE_KINDS:
        return torch.rand(batch, network.hparams["height"], network.hparams["width"])
    return torch.randn(batch, network.hparams["context_length"])


def export_program(network: nn.Module, path: str | Path) -> Path:
    """Export ``network`` with ``torch.export`` (the successor of TorchScript) to ``path``;
    ``torch.export.load(path).module()`` runs it on any batch size, without rtml installed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # nn.GRU re-assigns its flat weight list while being traced; the exported program is exact.
        warnings.filterwarnings("ignore", message="The tensor attributes self.recurrent._flat_weights")
        program = torch.export.export(
            network.eval(),
            (example_input(network),),
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        )
    torch.export.save(program, path)
    return path
