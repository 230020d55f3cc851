"""`rtml train`: train a tenant's forecaster from the lakehouse as a Ray job and register it as a
candidate version.

1. Read the tenant's metric events with Ray Data (``ray.data.read_iceberg``) at one ``events``
   snapshot, recorded as lineage and pinned by an Iceberg tag (``rtml-training-<name>-<run>``) so
   that the snapshot retention keeps it, and cut each entity's series at one instant: the last
   ``holdout_fraction`` of the tenant's time range is held out for evaluation.
2. The training windows become a Ray Dataset that Ray Train's ``TorchTrainer`` shards over
   ``train.num_workers`` workers (GPUs when ``train.use_gpu``), each reading batches from its shard.
3. The trained network is calibrated like any scorer (``models.scoring``), evaluated on the
   held-out range (forecast error, alarm rate), saved under ``<home>/models/`` and registered in
   the lakehouse model registry with its metrics, as a candidate. The registration carries a
   client token derived from the job (``registration_token``: tenant, kind, training snapshot and
   hyper-parameters), so that a retried or resubmitted job registers its model once; a run that
   finds its job already registered hands back that version and drops its own pin and artifact.

Runs the same in-process (a local Ray is started) or under ``ray job submit -- rtml train ...``
(``ray.init()`` joins the job's cluster). Every Ray Data task of the job asks for
``train.data_task_cpus`` logical CPUs and every Ray Train worker for ``train.worker_cpus`` (Ray's
defaults, a whole CPU each, would not fit beside the serving app on a small cluster). Before it
reads anything, a job makes sure that its workers and one data task fit on the cluster at once
(``require_room``) and otherwise refuses within ``train.resources_timeout_s``, naming what it needs
and what is free, rather than queue behind the app's replicas for as long as they hold the CPUs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models import _fit
from models.networks import FORECASTER_KINDS, build_network
from models.scoring import TrainingSet, calibrated_scorer, forecaster_training_set, save_scorer
from rtml.errors import RtmlError
from rtml.schemas import DataType, ModelVersion
from rtml.settings import Settings, get_settings

FEATURE_SET_VERSION = "raw-metric-values"
WEIGHTS_FILE = "model.pt"


def read_series(
    lakehouse, tenant: str, pin_as: str, num_cpus: float | None = None
) -> tuple[dict[str, pa.Table], int]:
    """Each entity's metric events (event_time, value), oldest first, and the snapshot read. The
    rows are read by Ray Data tasks (``ray.data.read_iceberg``) of ``num_cpus`` CPUs each at that
    snapshot, which is pinned first under the tag ``pin_as``, so that the lakehouse's retention
    keeps it for lineage."""
    import ray
    from ray.data.expressions import col

    snapshots = lakehouse.snapshots("events")
    if not snapshots:
        raise RtmlError("the lakehouse has no events yet; ingest some (e.g. `rtml demo`) before training")
    snapshot_id = snapshots[-1].snapshot_id
    lakehouse.pin_snapshot("events", snapshot_id, pin_as)
    metric_values = (col("data_type") == DataType.METRIC.value) & col("value").is_not_null()
    dataset = lakehouse.dataset(
        "events", tenant=tenant, snapshot_id=snapshot_id, columns=("entity", "event_time", "value"), num_cpus=num_cpus
    ).filter(expr=metric_values, num_cpus=num_cpus)
    blocks = [block for block in ray.get(dataset.to_arrow_refs()) if block.num_rows]
    if not blocks:
        raise RtmlError(f"tenant {tenant!r} has no metric events in the lakehouse to train on")
    rows = pa.concat_tables(blocks)
    rows = rows.sort_by([("entity", "ascending"), ("event_time", "ascending")])
    entities = {name: rows.filter(pc.equal(rows["entity"], name)) for name in pc.unique(rows["entity"]).to_pylist()}
    return entities, snapshot_id


def split_by_time(
    entities: dict[str, pa.Table], holdout_fraction: float, context: int
) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """(training series, held-out series, event count), every entity cut at the same instant. A
    held-out series starts with its entity's last ``context`` training values, so that its first
    windows have context; only windows ending after the cut are evaluated."""
    times = pa.concat_arrays([t["event_time"].combine_chunks() for t in entities.values()])
    start, end = pc.min(times).as_py(), pc.max(times).as_py()
    cut = start + (end - start) * (1.0 - holdout_fraction)
    train, held_out = [], []
    for table in entities.values():
        values = table["value"].to_numpy()
        split = int(pc.sum(pc.less(table["event_time"], pa.scalar(cut, type=table["event_time"].type))).as_py() or 0)
        train.append(values[:split])
        held_out.append(values[max(0, split - context) :])
    return train, held_out, len(times)


def _train_loop(config: dict) -> None:
    """Ray Train worker: fit the network on this worker's shard of the windows."""
    import ray.train
    import ray.train.torch
    import torch

    torch.manual_seed(config["seed"])
    network = ray.train.torch.prepare_model(build_network(config["kind"], **config["hparams"]))
    optimizer = torch.optim.Adam(network.parameters(), lr=config["learning_rate"])
    loss_function = torch.nn.HuberLoss(delta=1.0)
    shard = ray.train.get_dataset_shard("train")
    device = ray.train.torch.get_device()
    for epoch in range(config["epochs"]):
        total, count = 0.0, 0
        batches = shard.iter_torch_batches(
            batch_size=config["batch_size"], dtypes=torch.float32, device=device, local_shuffle_buffer_size=4096
        )
        for batch in batches:
            windows = batch["window"]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_function(network(windows[:, :-1]), windows[:, -1])
            loss.backward()
            optimizer.step()
            total, count = total + float(loss) * len(windows), count + len(windows)
        metrics = {"epoch": epoch, "train_loss": total / max(count, 1)}
        if ray.train.get_context().get_world_rank() == 0 and epoch == config["epochs"] - 1:
            with tempfile.TemporaryDirectory() as directory:
                unwrapped = network.module if hasattr(network, "module") else network
                torch.save(unwrapped.state_dict(), Path(directory) / WEIGHTS_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)


def _fit_with_ray_train(kind: str, training: TrainingSet, settings: Settings, epochs: int, name: str):
    import ray.data
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    windows = np.concatenate([training.inputs, training.targets[:, None]], axis=1).astype(np.float32)
    dataset = ray.data.from_numpy(windows).rename_columns({"data": "window"}, num_cpus=settings.train.data_task_cpus)
    hparams = {"context_length": training.window_length - 1}
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "kind": kind,
            "hparams": hparams,
            "epochs": epochs,
            "batch_size": 64,
            "learning_rate": 3e-3,
            "seed": 0,
        },
        scaling_config=ScalingConfig(
            num_workers=settings.train.num_workers,
            use_gpu=settings.train.use_gpu,
            resources_per_worker=worker_resources(settings),
        ),
        datasets={"train": dataset},
        run_config=RunConfig(name=name, storage_path=str(settings.home_dir / "ray_results")),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RtmlError(f"training run {name} ended without a checkpoint: {result.error}")
    network = build_network(kind, **hparams)
    with result.checkpoint.as_directory() as directory:
        network.load_state_dict(torch.load(Path(directory) / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return network.eval(), result.metrics


def worker_resources(settings: Settings) -> dict[str, float]:
    """What each Ray Train worker of the job asks for."""
    return {"CPU": settings.train.worker_cpus, **({"GPU": 1.0} if settings.train.use_gpu else {})}


def job_cpus(settings: Settings) -> float:
    """Logical CPUs a training job holds at once: its workers and one Ray Data task."""
    return settings.train.num_workers * settings.train.worker_cpus + settings.train.data_task_cpus


def require_room(settings: Settings) -> None:
    """Return once the connected cluster has room for the job's workers and one Ray Data task at
    once (a placement group of that shape is reserved and released again: Ray's own scheduler
    answers, node by node); raise a ``RtmlError`` naming what is needed and what is free when it
    has not within ``train.resources_timeout_s``."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    worker, data_task = worker_resources(settings), {"CPU": settings.train.data_task_cpus}
    workers = settings.train.num_workers
    probe = placement_group([worker] * workers + [data_task], strategy="PACK")
    try:
        fits = probe.wait(timeout_seconds=settings.train.resources_timeout_s)
    finally:
        remove_placement_group(probe)
    if fits:
        return
    free, total = ray.available_resources(), ray.cluster_resources()
    kinds = sorted(worker)
    raise RtmlError(
        f"`rtml train` needs {workers} Ray Train worker{'s' if workers != 1 else ''} of {worker} and {data_task} "
        f"for its Ray Data tasks free at once, but the cluster has {_amounts(free, kinds)} free of "
        f"{_amounts(total, kinds)} (after {settings.train.resources_timeout_s:g} s; what runs there, e.g. the "
        "serving app's replicas, holds the rest). Free some, lower RTML_TRAIN__WORKER_CPUS / "
        "RTML_TRAIN__DATA_TASK_CPUS / RTML_TRAIN__NUM_WORKERS, or start the cluster with room for the job "
        "(`rtml up` adds room for one job of the settings it runs with to the machine's cores; on a cluster of "
        "your own, `ray start --num-cpus=N`)."
    )


def _amounts(resources: dict[str, float], kinds: list[str]) -> dict[str, float]:
    return {kind: round(float(resources.get(kind, 0.0)), 3) for kind in kinds}


def evaluate(scorer, held_out: list[np.ndarray], anomaly_threshold: float) -> dict[str, float]:
    """Forecast error and alarm rate of ``scorer`` on held-out windows (raw values)."""
    windows = [
        _fit.sliding_windows(series, scorer.window_length) for series in held_out if len(series) >= scorer.window_length
    ]
    if not windows:
        raise RtmlError(
            f"the held-out range has no series of {scorer.window_length} values; ingest more events or lower "
            "RTML_TRAIN__HOLDOUT_FRACTION / RTML_MODELS__WINDOW_LENGTH"
        )
    batch = np.concatenate(windows)
    errors = scorer.errors(batch).cpu().numpy()
    scores = scorer.score(batch)
    return {
        "holdout_windows": float(len(batch)),
        "holdout_mae": float(errors.mean()),
        "holdout_rmse": float(np.sqrt(np.mean(errors**2))),
        "holdout_mean_score": float(scores.mean()),
        "holdout_alarm_rate": float((scores >= anomaly_threshold).mean()),
    }


def train_candidate(
    tenant: str,
    kind: str = "rnn",
    settings: Settings | None = None,
    epochs: int | None = None,
    on_step: Callable[[str], None] = lambda step: None,
) -> ModelVersion:
    """Train, evaluate and register a candidate ``kind`` model for ``tenant`` (see the module docstring)."""
    import ray

    from lakehouse import Lakehouse

    if kind not in FORECASTER_KINDS:
        raise RtmlError(f"`rtml train` trains forecasters ({', '.join(FORECASTER_KINDS)}), not {kind!r}")
    settings = settings or get_settings()
    epochs = epochs or settings.train.epochs
    if not 0.0 < settings.train.holdout_fraction < 1.0:
        raise RtmlError("train.holdout_fraction must be between 0 and 1")
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    on_step("waiting for room on the cluster")
    require_room(settings)
    on_step("reading events")
    lakehouse = Lakehouse.open(settings)
    run_id = uuid.uuid4().hex[:12]
    name = f"{tenant}-{kind}"
    pin = f"rtml-training-{name}-{run_id}"
    try:
        return _train_and_register(lakehouse, tenant, kind, name, run_id, pin, settings, epochs, on_step)
    except BaseException:
        # A run that registers nothing keeps no snapshot; should even that fail, the run's own error
        # is the one to report (a leftover tag only keeps one snapshot).
        with contextlib.suppress(Exception):
            lakehouse.unpin_snapshot("events", pin)
        raise


def _train_and_register(
    lakehouse, tenant: str, kind: str, name: str, run_id: str, pin: str, settings: Settings, epochs: int, on_step: Callable[[str], None]
) -> ModelVersion:
    entities, snapshot_id = read_series(lakehouse, tenant, pin_as=pin, num_cpus=settings.train.data_task_cpus)
    train_series, held_out, event_count = split_by_time(
        entities, settings.train.holdout_fraction, settings.models.window_length - 1
    )
    training = forecaster_training_set(train_series, settings.models.window_length)
    on_step(f"training on {len(training.targets)} windows")
    network, train_metrics = _fit_with_ray_train(kind, training, settings, epochs, f"{name}-{run_id}")
    on_step("evaluating")
    scorer = calibrated_scorer(kind, network, training)
    metrics = {
        "train_loss": float(train_metrics.get("train_loss", float("nan"))),
        "train_windows": float(len(training.targets)),
        "events": float(event_count),
        **evaluate(scorer, held_out, settings.models.anomaly_threshold),
    }
    scorer.extra = {"tenant": tenant, "run_id": run_id, "metrics": metrics}
    artifact_dir = settings.home_dir / "models" / tenant / name / run_id
    artifact_uri = save_scorer(scorer, artifact_dir)
    on_step("registering")
    registered = lakehouse.registry.register(
        ModelVersion(
            name=name,
            version=0,
            kind=kind,
            tenant=tenant,
            metrics=metrics,
            artifact_uri=artifact_uri,
            training_snapshot_ids={"events": snapshot_id},
            feature_set_version=FEATURE_SET_VERSION,
        ),
        client_token=registration_token(tenant, kind, snapshot_id, settings, epochs),
    )
    if registered.artifact_uri != artifact_uri:  # an earlier run of this job registered it; it has its own pin
        lakehouse.unpin_snapshot("events", pin)
        shutil.rmtree(artifact_dir, ignore_errors=True)
    return registered


def registration_token(tenant: str, kind: str, snapshot_id: int, settings: Settings, epochs: int) -> str:
    """The registry's client token of a training job. It is made of what the job is (tenant, kind,
    the events snapshot it reads and the hyper-parameters), never of the run (its random run id,
    the clock), so that every retry of the job gives the same one: the snapshot is the newest when
    the run starts, and a run adds none (its pin is a tag)."""
    job = {
        "tenant": tenant,
        "kind": kind,
        "events_snapshot_id": snapshot_id,
        "epochs": epochs,
        "window_length": settings.models.window_length,
        "holdout_fraction": settings.train.holdout_fraction,
        "num_workers": settings.train.num_workers,
        "feature_set_version": FEATURE_SET_VERSION,
    }
    return "train:" + hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:32]
