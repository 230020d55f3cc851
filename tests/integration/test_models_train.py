"""`rtml train` end to end on a tiny lakehouse: Ray Data feeds Ray Train's TorchTrainer, the model
is evaluated on a held-out time range and registered as a candidate with its metrics."""

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from lakehouse import Lakehouse
from models.scoring import artifact_path, load_scorer
from models.training import train_candidate
from rtml.errors import RtmlError
from rtml.schemas import Event, ModelStatus
from rtml.settings import Settings


def metric_events(tenant: str, entity: str, count: int, seed: int) -> list[Event]:
    rng = np.random.default_rng(seed)
    start = datetime(2024, 1, 1, tzinfo=timezone.utc)
    values = 20 + 5 * np.sin(np.arange(count) / 8) + rng.normal(0, 0.2, count)
    return [
        Event(tenant=tenant, entity=entity, event_time=start + timedelta(minutes=i), value=float(v))
        for i, v in enumerate(values)
    ]


@pytest.fixture
def settings(tmp_path):
    return Settings(home=tmp_path, models={"window_length": 16}, train={"epochs": 2, "num_workers": 1})


def test_train_registers_a_candidate_with_holdout_metrics(ray_cluster, settings):
    lakehouse = Lakehouse.open(settings)
    lakehouse.append_idempotent("events", metric_events("acme", "pump-1", 300, 0) + metric_events("acme", "pump-2", 300, 1))
    lakehouse.append_idempotent("events", metric_events("other", "x", 300, 2))

    model = train_candidate("acme", "cnn", settings)

    assert model.status == ModelStatus.CANDIDATE and model.version == 1 and model.name == "acme-cnn"
    assert model.training_snapshot_ids["events"] == lakehouse.snapshots("events")[-1].snapshot_id
    # The snapshot it learnt from stays readable whatever the retention expires (lineage).
    pins = {name: ref.snapshot_id for name, ref in lakehouse.table("events").metadata.refs.items() if name.startswith("rtml-training-acme-cnn-")}
    assert list(pins.values()) == [model.training_snapshot_ids["events"]]
    # 20% of 300 minutes per entity are held out, each with 15 values of context: 2 * (60 + 15 - 16 + 1).
    assert model.metrics["holdout_windows"] == 120
    assert model.metrics["events"] == 600
    assert all(np.isfinite(v) for v in model.metrics.values())
    # A smooth sine is forecast far better than its own spread (5 * 0.707 in raw units).
    assert model.metrics["holdout_rmse"] < 0.5
    assert [m.key for m in lakehouse.registry.list(tenant="acme")] == ["acme-cnn@1"]

    scorer = load_scorer(model.artifact_uri)
    assert scorer.kind == "cnn" and scorer.window_length == 16

    # The same job again (a resubmission, or a retry after its registration's outcome was lost):
    # the same version, no second pin, and the rerun's own artifact is not left behind.
    again = train_candidate("acme", "cnn", settings)
    assert again == model
    assert [m.key for m in lakehouse.registry.list(tenant="acme")] == ["acme-cnn@1"]
    assert [name for name in lakehouse.table("events").metadata.refs if name.startswith("rtml-training-acme-cnn-")] == list(pins)
    assert [path.resolve() for path in (settings.home_dir / "models" / "acme" / "acme-cnn").iterdir()] == [artifact_path(model.artifact_uri)]


def test_train_names_a_tenant_without_events(ray_cluster, settings):
    lakehouse = Lakehouse.open(settings)
    lakehouse.append_idempotent("events", metric_events("acme", "pump-1", 50, 0))
    with pytest.raises(RtmlError, match="'nobody' has no metric events"):
        train_candidate("nobody", "rnn", settings)
    assert list(lakehouse.table("events").metadata.refs) == ["main"], "a failed run keeps no snapshot pinned"
