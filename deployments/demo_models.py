"""Real trained models for a tenant, made in seconds from generated data: what `rtml up --demo`,
the serving tests and `rtml bench serve` register (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.scoring import fit_scorer, save_scorer
from rtml.schemas import ModelStatus, ModelVersion, new_id

DEMO_TENANT = "demo"
DEMO_KINDS = ("rnn", "cnn")


def sensor_series(count: int = 2, length: int = 1200, seed: int = 0) -> list[np.ndarray]:
    """Noisy daily-cycle-like sensor readings, one array per sensor."""
    rng = np.random.default_rng(seed)
    steps = np.arange(length)
    return [
        10.0 + 3.0 * np.sin(steps / (12.0 + 3 * index) + rng.uniform(0, 6.3)) + rng.normal(0.0, 0.3, length)
        for index in range(count)
    ]


def windows_of(series: np.ndarray, window_length: int) -> np.ndarray:
    """Every window of ``series`` as ``float32 [n, window_length]``."""
    return np.lib.stride_tricks.sliding_window_view(np.asarray(series, dtype=np.float32), window_length).copy()


def train_and_register(
    lake,
    tenant: str,
    kind: str,
    directory: Path,
    *,
    name: str | None = None,
    window_length: int = 32,
    epochs: int = 1,
    seed: int = 0,
    promote: bool = True,
    weight: float = 1.0,
) -> ModelVersion:
    """Fit a ``kind`` scorer on generated series, save it under ``directory``, register it as the
    next version of ``name`` (default ``<tenant>-<kind>``) and, with ``promote``, make it active."""
    name = name or f"{tenant}-{kind}"
    scorer = fit_scorer(kind, sensor_series(seed=seed), window_length=window_length, epochs=epochs, seed=seed)
    target = Path(directory) / f"{name}-{new_id()[:12]}"
    uri = save_scorer(scorer, target)
    registered = lake.registry.register(
        ModelVersion(name=name, version=0, kind=kind, tenant=tenant, artifact_uri=uri, ensemble_weight=weight)
    )
    return lake.registry.promote(registered.name, registered.version) if promote else registered


def ensure_demo_tenant(
    lake, directory: Path, window_length: int, tenant: str = DEMO_TENANT, kinds: tuple[str, ...] = DEMO_KINDS
) -> list[ModelVersion]:
    """The tenant's active versions, training and promoting one per kind it lacks, on windows of
    ``window_length`` (the stream's ``models.window_length``, so that the app's stream scores the
    tenant's events too)."""
    active = {model.kind for model in lake.registry.list(tenant=tenant, status=ModelStatus.ACTIVE)}
    for kind in kinds:
        if kind not in active:
            train_and_register(lake, tenant, kind, directory, window_length=window_length)
    return lake.registry.active(tenant)
