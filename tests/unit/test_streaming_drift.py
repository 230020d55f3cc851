"""The stream's side of drift (streaming.drift) without a Ray cluster: the reference is the
tenant's metric values at its active model's training snapshot (Iceberg time travel on a real
lakehouse under tmp_path), StreamDrift tracks tenants with such a model and follows a promotion,
the board shows the worst of its consumers' checks, and GraphQL's `drift` answers empty while no
board runs. With a Ray cluster: tests/integration/test_observability_drift_replay.py."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from lakehouse import Lakehouse
from rtml.schemas import Event, ModelVersion
from rtml.settings import Settings
from streaming.drift import FEATURE, REFERENCE_RECHECK_S, SOURCE_STALE_S, DriftBoard, StreamDrift, load_reference

START = datetime(2025, 3, 1, tzinfo=timezone.utc)


def events(tenant: str, values: np.ndarray, first_minute: int = 0) -> list[Event]:
    return [
        Event(tenant=tenant, entity=f"pump-{i % 3}", event_time=START + timedelta(minutes=first_minute + i), value=float(value))
        for i, value in enumerate(values)
    ]


def promoted_on_latest_snapshot(lake: Lakehouse, tenant: str, name: str) -> ModelVersion:
    """An active version of ``name`` that names the newest events snapshot as its training data."""
    snapshot_id = lake.snapshots("events")[-1].snapshot_id
    model = lake.registry.register(
        ModelVersion(name=name, version=0, kind="rnn", tenant=tenant, artifact_uri=f"file:///models/{name}", training_snapshot_ids={"events": snapshot_id})
    )
    return lake.registry.promote(model.name, model.version)


class Clock:
    def __init__(self):
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world(tmp_path):
    settings = Settings(
        home=tmp_path,
        observability={"drift_window_events": 200, "drift_min_events": 100, "drift_check_every_s": 0.0, "drift_reference_rows": 300},
    )
    lake = Lakehouse.open(settings)
    rng = np.random.default_rng(0)
    lake.append_idempotent("events", events("acme", rng.normal(0.0, 1.0, 400)))
    model = promoted_on_latest_snapshot(lake, "acme", "acme-rnn")
    # Written after the training snapshot: time travel leaves them out of the reference.
    lake.append_idempotent("events", events("acme", rng.normal(50.0, 1.0, 400), first_minute=400) + events("initech", rng.normal(0, 1, 100)))
    return settings, lake, model


def test_the_reference_is_the_newest_values_at_the_models_training_snapshot(world):
    settings, lake, model = world
    reference, snapshot_id = load_reference(lake, "acme", settings)
    assert snapshot_id == model.training_snapshot_ids["events"]
    assert reference.rows == 300  # drift_reference_rows of the snapshot's 400
    assert reference.ks_edges[-1] < 10, "values written after the training snapshot are not in the reference"
    assert load_reference(lake, "initech", settings) is None, "a tenant without a model that names its training data has no reference"


def test_the_stream_tracks_tenants_with_a_reference_and_follows_a_promotion(world):
    settings, lake, _ = world
    clock = Clock()
    drift = StreamDrift(settings, "demo", clock=clock)
    rng = np.random.default_rng(1)
    tenants = np.array(["acme", "initech"] * 150, dtype=object)
    checks = drift.observe(tenants, rng.normal(0.0, 1.0, 300))
    assert [(check.tenant, check.feature, check.live_events, check.over) for check in checks] == [("acme", FEATURE, 150, False)]
    (check,) = drift.observe(tenants, rng.normal(50.0, 1.0, 300))
    assert check.over and check.live_events == 200

    # A version trained on the later snapshot (which holds the values around 50) is promoted: the
    # stream takes it as the reference once it looks again, and starts its window over.
    promoted_on_latest_snapshot(lake, "acme", "acme-cnn")
    clock.now += REFERENCE_RECHECK_S
    assert drift.observe(tenants[:2], np.array([50.0, 0.0])) == []  # the new window holds one value
    (check,) = drift.observe(tenants, rng.normal(50.0, 1.0, 300))
    assert check.live_events == 151 and not check.over


def test_a_tenant_whose_reference_cannot_be_read_is_left_untracked_not_an_error(world):
    settings, lake, _ = world
    lake.registry.register(
        ModelVersion(name="initech-rnn", version=0, kind="rnn", tenant="initech", artifact_uri="file:///m", training_snapshot_ids={"events": 12345})
    )
    lake.registry.promote("initech-rnn", 1)
    drift = StreamDrift(settings, "demo", clock=Clock())
    assert drift.observe(np.array(["initech"] * 150, dtype=object), np.zeros(150)) == []


def _check(tenant: str, psi: float, ks: float, at: float, **flags) -> dict:
    return {"tenant": tenant, "feature": FEATURE, "psi": psi, "ks": ks, "live_events": 100, "at": at, "reference_snapshot_id": 7,
            "over": flags.get("over", False), "sustained": flags.get("sustained", False)}  # fmt: skip


def test_the_board_shows_the_worst_of_its_consumers_latest_checks_per_tenant():
    board = DriftBoard()

    async def scenario():
        await board.report("demo/a", _check("acme", 0.30, 0.05, 1000.0, over=True))
        await board.report("demo/b", _check("acme", 0.01, 0.25, 1001.0, over=True, sustained=True))
        await board.report("demo/a", _check("acme", 0.02, 0.02, 1002.0))  # a's latest replaces its earlier check
        await board.report("demo/a", _check("globex", 0.9, 0.9, 1002.0, over=True))
        return await board.checks("acme"), await board.retrains("acme")

    checks, retrains = asyncio.run(scenario())
    assert checks == [{**_check("acme", 0.02, 0.25, 1002.0, over=True, sustained=True)}]
    assert retrains == [], "a sustained check without the consumer's settings starts no run"

    async def later():
        await board.report("demo/c", _check("acme", 0.0, 0.0, 1002.0 + SOURCE_STALE_S + 1))
        return await board.checks("acme")

    (check,) = asyncio.run(later())
    assert (check["psi"], check["ks"], check["over"]) == (0.0, 0.0, False), "consumers silent for long are left out"


def test_graphql_drift_is_empty_and_audited_while_no_board_runs(tmp_path):
    from tests.unit.test_api_graphql import World

    world = World(tmp_path)
    try:
        data = world.ok("{ drift { checks { feature psi ks liveEvents referenceSnapshotId over sustained checkedAt } retrains { startedAt status models error } } }")
        assert data == {"drift": {"checks": [], "retrains": []}}
        world.access.flush_audit()
        audit = world.lake.read("audit", columns=("action", "table_name", "details")).to_pylist()
        assert any(row["table_name"] == "drift" and '"tenant": "acme"' in row["details"] for row in audit)
    finally:
        world.access.close()
