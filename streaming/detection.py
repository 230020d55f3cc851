"""The stream's per-entity anomaly detector (``models.detector``), kept beside the window state.

    detectors = EntityDetectors(settings, group)
    batch = detectors.advance(events)          # read time, arrival order: inputs, fits that are due
    ... the fits run as Ray tasks (``submit_fit``); the ModelRouter forecasts each row with its
        entity's network (``batch.forecast_inputs``, per request rows) ...
    scores = detectors.score(batch, forecasts) # hand-over time, in read order: detector scores

Per partition and key (``tenant/entity``) two states: the input state (``SeriesInput``), advanced
when a batch is read, and the scoring state (``SeriesScoring``), advanced when its forecasts are
back, batches in the order they were read. Both go into the partition's checkpoint (the input state
as of the batch's read position, the scoring state as of its hand-over), so a consumer restarted
from a checkpoint advances both from exactly where the rows it re-reads left them: the same scores
as a run that never stopped (``models.detector`` computes every score from fixed windows of values).

Fits. Fit ``k`` of an entity's forecaster becomes due with the first value it forecasts; it runs as
a Ray actor task on the consumer's ``EntityFitter`` (one per consumer, started with the pipeline, so
that the CPUs fits need are taken up front rather than waited for mid-stream behind the app's
replicas; an actor runs its calls in the order they were sent, so fit ``k - 1`` of an entity is
always written before fit ``k`` starts). ``write_fit`` trains from fit ``k - 1``
(warm start), writes the network
to a path made of what it is (tenant, consumer group, entity, forecaster, ``k``: ``fit_uri``), which
is also its Serve model id, and registers it in the lakehouse model registry with a client token of
the same parts, as a candidate (lineage: the per-entity networks are never a tenant ensemble's members). A
task that finds its network written already (a replay after a crash) trains nothing: a replay
reuses the weights the first run forecast with.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import ray
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_random_exponential

from models.detector import DetectorConfig, FitDue, InputRows, SeriesInput, SeriesScoring, fit_forecaster
from models.networks import load_network, save_network
from rtml.schemas import DETECTOR_MEMBER, ForecastInputs, ModelVersion
from rtml.settings import Settings
from streaming.failures import JudgedFailure, describe, passes_later

FIT_FILE = "fit.json"


def detector_config(settings: Settings) -> DetectorConfig:
    return DetectorConfig(refit_every=settings.detector.refit_every, seed=settings.detector.seed)


def detector_fingerprint(settings: Settings) -> str:
    """What a checkpointed detector state depends on: state saved under another detector is refused."""
    config = detector_config(settings)
    return f"detector={config!r}" if settings.detector.enabled else "detector=off"


def fit_uri(settings: Settings, group: str, key: str, forecaster: str, index: int) -> str:
    """Where fit ``index`` of a key's forecaster in consumer group ``group`` is written (each group
    learns from what it read); also its Serve model id."""
    tenant, entity = key.split("/", 1)
    path = settings.home_dir / "models" / tenant / "detector" / quote(group, safe="") / quote(entity, safe="") / forecaster / f"fit-{index}"
    return path.resolve().as_uri()


@dataclass
class SeriesRows:
    """One key's rows of a batch: where they are in the batch, and the detector's inputs for them."""

    partition: int
    key: str
    rows: np.ndarray  # int64 indices into the batch's events
    inputs: InputRows


@dataclass
class DueFit:
    key: str
    due: FitDue
    model_id: str
    previous_model_id: str  # "" for the first fit


@dataclass
class DetectionBatch:
    series: list[SeriesRows]
    forecast_inputs: list[ForecastInputs]  # per forecaster, row-aligned with the batch's events
    fits: list[DueFit]


class EntityDetectors:
    def __init__(self, settings: Settings, group: str):
        self._settings = settings
        self._group = group
        self._config = detector_config(settings)
        self._learning = settings.detector.learning_rows_by_entity
        self._inputs: dict[int, dict[str, SeriesInput]] = {}
        self._scoring: dict[int, dict[str, SeriesScoring]] = {}

    @property
    def config(self) -> DetectorConfig:
        return self._config

    def learning_rows(self, key: str) -> int:
        return self._learning.get(key, self._settings.detector.learning_rows)

    def advance(self, keys: np.ndarray, values: np.ndarray, partitions: np.ndarray) -> DetectionBatch:
        """Advance the input state of every key in the batch (rows in arrival order)."""
        specs = self._config.forecasters
        count = len(keys)
        model_ids = [np.full(count, "", dtype=object) for _ in specs]
        windows = [np.zeros((count, spec.context_length), np.float32) for spec in specs]
        series, fits = [], []
        unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        for which in np.argsort(first, kind="stable").tolist():
            key = str(unique[which])
            rows = np.flatnonzero(inverse == which)
            partition = int(partitions[rows[0]])
            states = self._inputs.setdefault(partition, {})
            state = states.get(key) or SeriesInput.start(self.learning_rows(key), self._config)
            inputs, due = state.advance(values[rows], self._config)
            states[key] = state
            series.append(SeriesRows(partition, key, rows, inputs))
            for j, spec in enumerate(specs):
                for index in np.unique(inputs.fits[j][inputs.fits[j] >= 0]).tolist():
                    model_ids[j][rows[inputs.fits[j] == index]] = fit_uri(self._settings, self._group, key, spec.name, index)
                windows[j][rows] = inputs.windows[j]
            for fit in due:
                name = specs[fit.forecaster].name
                previous = fit_uri(self._settings, self._group, key, name, fit.index - 1) if fit.index > 0 else ""
                fits.append(DueFit(key, fit, fit_uri(self._settings, self._group, key, name, fit.index), previous))
        return DetectionBatch(series, [ForecastInputs(ids.tolist(), w) for ids, w in zip(model_ids, windows)], fits)

    def score(self, batch: DetectionBatch, forecasts: list[np.ndarray]) -> np.ndarray:
        """The detector's scores of the batch's rows (row-aligned ``forecasts`` per forecaster;
        NaN where a row was not forecast), advancing the scoring states. Call once per batch, in
        the order the batches were read."""
        scores = np.zeros(len(forecasts[0]) if forecasts else sum(len(s.rows) for s in batch.series))
        for rows in batch.series:
            states = self._scoring.setdefault(rows.partition, {})
            state = states.get(rows.key) or SeriesScoring.start(self.learning_rows(rows.key), self._config)
            scores[rows.rows] = state.advance(rows.inputs, [forecast[rows.rows] for forecast in forecasts], self._config)
            states[rows.key] = state
        return scores

    # checkpoints -----------------------------------------------------------------------------

    def inputs_to_arrow(self, partition: int) -> pa.Table:
        return _states_table(self._inputs.get(partition, {}))

    def scoring_to_arrow(self, partition: int) -> pa.Table:
        return _states_table(self._scoring.get(partition, {}))

    def restore(self, partition: int, inputs: pa.Table | None, scoring: pa.Table | None) -> None:
        """Replace a partition's states by checkpointed ones (None: start it empty)."""
        self._inputs[partition] = {row.pop("key"): SeriesInput.from_row(row) for row in (inputs.to_pylist() if inputs is not None else [])}
        self._scoring[partition] = {row.pop("key"): SeriesScoring.from_row(row) for row in (scoring.to_pylist() if scoring is not None else [])}


def _states_table(states: dict) -> pa.Table:
    rows = [{"key": key, **state.to_row()} for key, state in states.items()]
    return pa.Table.from_pylist(rows) if rows else pa.table({"key": pa.array([], pa.string())})


class EntityFitter:
    """Runs a consumer's fits (as a Ray actor, ``start_fitter``), one at a time, in order."""

    def __init__(self):
        self._lakehouse = None  # opened on the first fit

    def ready(self) -> bool:
        return True

    def fit(self, settings: Settings, config: DetectorConfig, fit: DueFit) -> str:
        """Write fit ``fit`` (``write_fit``) and register it; its model id once both are done.

        The registry is one Iceberg table that every consumer's fitter appends to, so a
        registration may lose commit races for a while when many entities refit at once: it is
        retried while its failure may pass (``streaming.failures``), for up to
        ``streaming.give_up_after_s``; a failure that outlasts that reaches the consumer judged, as
        a ``JudgedFailure`` (the cause chain does not cross processes)."""
        from lakehouse import Lakehouse

        write_fit(config, fit)
        if self._lakehouse is None:
            self._lakehouse = Lakehouse.open(settings)
        retrying = Retrying(
            retry=retry_if_exception(passes_later),
            stop=stop_after_delay(settings.streaming.give_up_after_s),
            wait=wait_random_exponential(multiplier=0.2, max=5.0),
            reraise=True,
        )
        try:
            retrying(register_fit, self._lakehouse.registry, config, fit)
        except Exception as error:
            raise JudgedFailure(f"registering {fit.model_id} failed: {describe(error)}", transient=passes_later(error)) from None
        return fit.model_id


def start_fitter(settings: Settings) -> ray.actor.ActorHandle:
    """An ``EntityFitter`` actor that Ray restarts (and retries its calls) when its process dies."""
    options = {"num_cpus": settings.detector.fit_cpus, "max_restarts": -1, "max_task_retries": -1}
    return ray.remote(EntityFitter).options(**options).remote()


def write_fit(config: DetectorConfig, fit: DueFit) -> None:
    """Train fit ``fit`` from the previous one and write it, whole, at its model id's path; a fit
    already written (a replay) is kept as it is."""
    import torch

    from models.scoring import artifact_path

    torch.set_num_threads(1)  # the same forward and training arithmetic as every other fit
    target = artifact_path(fit.model_id)
    if (target / FIT_FILE).is_file():
        return
    due = fit.due
    previous = load_network(artifact_path(fit.previous_model_id)) if fit.previous_model_id else None
    network = fit_forecaster(config.forecasters[due.forecaster], config, due, previous)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    save_network(network, staging)
    (staging / FIT_FILE).write_text(json.dumps({"key": fit.key, "fit": due.index, "boundary": due.boundary, "center": due.center, "scale": due.scale}))
    try:
        os.rename(staging, target)  # whole or not at all; a concurrent twin may have won
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)


def register_fit(registry, config: DetectorConfig, fit: DueFit) -> None:
    """Register a written fit as a candidate version of ``<key>#<forecaster>``, once (its model id
    is its client token)."""
    spec = config.forecasters[fit.due.forecaster]
    registry.register(
        ModelVersion(
            name=f"{fit.key}#{spec.name}",
            version=0,
            kind=spec.kind,
            tenant=fit.key.split("/", 1)[0],
            artifact_uri=fit.model_id,
            metrics={"fit": float(fit.due.index), "boundary": float(fit.due.boundary), "training_values": float(len(fit.due.past))},
        ),
        client_token=f"detector:{fit.model_id}",
    )
