"""Drift end to end (issue 15): a replayed stream whose distribution shifted from the model's
training data raises PSI and KS over their thresholds and opens one candidate training run, while
an unshifted one stays under and opens none.

Real parts: a lakehouse on SQLite under tmp_path holding each tenant's training events, a
forecaster version per tenant promoted with that events snapshot as its training data, a replay
pipeline (consumer and sink actors on the session's Ray cluster; the scoring client is a small
deterministic one, the detector is off), the cluster's drift board, `rtml train`'s
``train_candidate`` on Ray Train for the retraining, and the GraphQL app over the same lakehouse."""

from __future__ import annotations

import sys
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import orjson
import pytest
import ray

from rtml.schemas import Event, ModelStatus, ModelVersion, ScoreRequest, ScoreResult
from rtml.settings import Settings

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the client travels to the consumer actors

STEADY, DRIFTING = "steady", "drifting"  # the replay's values: as in training, and one standard deviation higher
ENTITIES = 2
TRAINING_READINGS = 600  # per entity, 60 s apart
LIVE_READINGS = 1500  # per entity, after the training range
START = datetime(2025, 3, 1, tzinfo=timezone.utc)


class WindowMeanClient:
    """Scores each window by the logistic of its mean: the stream needs answers, not good ones."""

    def score(self, batches: list[ScoreRequest]) -> list[ScoreResult]:
        answers = []
        for batch in batches:
            scores = 1.0 / (1.0 + np.exp(-batch.windows.reshape(len(batch), -1).astype(np.float64).mean(axis=1)))
            answers.append(ScoreResult([f"p-{i}" for i in batch.event_ids], scores, scores > 0.99, {"mean@1": scores}, {"mean": "1"}))
        return answers


def _values(seed: int, count: int, mean: float) -> np.ndarray:
    """A noisy daily-like cycle around ``mean``: what a sensor sends, with one standard deviation of 1."""
    rng = np.random.default_rng(seed)
    return mean + np.sqrt(2) * 0.6 * np.sin(np.arange(count) * 2 * np.pi / 48) + rng.normal(0.0, 0.8, count)


def _settings(tmp_path) -> Settings:
    """The test's settings (its lakehouse names its drift board)."""
    settings = Settings(
        home=tmp_path,
        models={"window_length": 8},
        detector={"enabled": False},
        streaming={"source": "replay", "replay_speed": 0.0, "consumers": 1, "max_poll_records": 250, "dead_letter_dir": str(tmp_path / "dead")},
        lakehouse={"writer_flush_seconds": 0.2},
        train={"epochs": 1, "num_workers": 1},
        # One check per scored batch of a tenant (250 events hold about 125 of each), from half a window on.
        observability={"drift_window_events": 1000, "drift_min_events": 500, "drift_check_every_s": 0.0, "drift_sustained_checks": 3},
    )
    return settings.model_copy(update={"home": settings.home_dir})


@pytest.fixture
def board(ray_cluster, tmp_path):
    """The drift board of this test's lakehouse, gone after the test (it is detached)."""
    from streaming.drift import NAMESPACE, board_name, drift_board

    board = drift_board(_settings(tmp_path))
    yield board
    ray.kill(ray.get_actor(board_name(_settings(tmp_path)), namespace=NAMESPACE))


def test_a_shifted_stream_drifts_over_the_thresholds_and_opens_one_candidate_run_an_unshifted_one_does_not(board, tmp_path):
    from fastapi.testclient import TestClient

    from api.data import DataAccess
    from api.graphql import graphql_app
    from lakehouse import Lakehouse
    from streaming.drift import board_view
    from streaming.feed import MemoryFeed
    from streaming.pipeline import Pipeline
    from tests.auth import auth_headers
    from tests.unit.test_api_graphql import InProcessOperations

    settings = _settings(tmp_path)
    drift = settings.observability
    lake = Lakehouse.open(settings)
    for seed, tenant in enumerate((STEADY, DRIFTING)):
        lake.append_idempotent(
            "events",
            [
                Event(tenant=tenant, entity=f"line-{entity}", event_time=START + timedelta(minutes=step), value=float(value))
                for entity in range(ENTITIES)
                for step, value in enumerate(_values(10 * seed + entity, TRAINING_READINGS, 0.0))
            ],
        )
        model = lake.registry.register(
            ModelVersion(
                name=f"{tenant}-cnn",
                version=0,
                kind="cnn",
                tenant=tenant,
                artifact_uri=f"file:///models/{tenant}-cnn",  # nothing loads it: the client scores
                training_snapshot_ids={"events": lake.snapshots("events")[-1].snapshot_id},
            )
        )
        lake.registry.promote(model.name, model.version)

    live_start = START + timedelta(minutes=TRAINING_READINGS)
    live = {
        (tenant, entity): _values(100 + 10 * seed + entity, LIVE_READINGS, mean)
        for seed, (tenant, mean) in enumerate(((STEADY, 0.0), (DRIFTING, 1.0)))
        for entity in range(ENTITIES)
    }
    replay = [
        {"event_id": f"{tenant}.{entity}.{step}", "tenant": tenant, "entity": f"line-{entity}", "event_time": (live_start + timedelta(minutes=step)).isoformat(), "value": float(values[step])}
        for step in range(LIVE_READINGS)
        for (tenant, entity), values in live.items()
    ]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(event) for event in replay) + b"\n")

    pipeline = Pipeline(settings, WindowMeanClient(), group="drift-test", replay_path=str(path))
    try:
        pipeline.start(until_end=True)
        pipeline.wait(timeout_s=300)
    finally:
        pipeline.shutdown()

    (steady,) = board_view(settings, STEADY)[0]
    assert steady["psi"] < drift.drift_psi_threshold and steady["ks"] < drift.drift_ks_threshold
    assert not steady["over"] and not steady["sustained"]
    assert steady["live_events"] == drift.drift_window_events
    (drifting,) = board_view(settings, DRIFTING)[0]
    assert drifting["psi"] > drift.drift_psi_threshold and drifting["ks"] > drift.drift_ks_threshold
    assert drifting["over"] and drifting["sustained"]
    assert drifting["reference_snapshot_id"] == lake.registry.get(f"{DRIFTING}-cnn", 1).training_snapshot_ids["events"]

    deadline = time.monotonic() + 300
    while (runs := board_view(settings, DRIFTING)[1]) and runs[0]["status"] == "running" and time.monotonic() < deadline:
        time.sleep(1.0)
    (run,) = runs  # one run, however many sustained checks followed the first
    assert run["status"] == "registered", run["error"]
    assert run["models"] == [f"{DRIFTING}-cnn@2"]
    assert board_view(settings, STEADY)[1] == []
    # The run registers a candidate and promotes nothing: the trained-on version stays the active one.
    assert lake.registry.get(f"{DRIFTING}-cnn", 2).status == ModelStatus.CANDIDATE
    assert [model.key for model in lake.registry.active(DRIFTING)] == [f"{DRIFTING}-cnn@1"]

    access = DataAccess(settings, InProcessOperations(lake, settings), MemoryFeed(), lake)
    try:
        client = TestClient(graphql_app(access, settings))
        query = "{ drift { checks { feature psi ks liveEvents referenceSnapshotId over sustained checkedAt } retrains { status models error finishedAt } } }"
        answer = client.post("/", json={"query": query}, headers=auth_headers(settings, DRIFTING, "reader")).json()
        assert "errors" not in answer, answer["errors"]
        (check,) = answer["data"]["drift"]["checks"]
        assert check["feature"] == "value" and check["psi"] == drifting["psi"] and check["ks"] == drifting["ks"]
        assert check["over"] and check["sustained"] and check["referenceSnapshotId"] == str(drifting["reference_snapshot_id"])
        (retrain,) = answer["data"]["drift"]["retrains"]
        assert retrain["status"] == "REGISTERED" and retrain["models"] == [f"{DRIFTING}-cnn@2"] and retrain["finishedAt"]
        answer = client.post("/", json={"query": query}, headers=auth_headers(settings, STEADY, "reader")).json()
        assert [check["over"] for check in answer["data"]["drift"]["checks"]] == [False] and answer["data"]["drift"]["retrains"] == []
    finally:
        access.close()
