"""The lakehouse against real Iceberg catalogs: the embedded SQLite SQL catalog and a PostgreSQL-backed
SQL catalog (the `postgres_dsn` service fixture). Every test gets its own catalog name, namespace
and warehouse folder, so tests never see each other's tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from pyiceberg.expressions import And, EqualTo, NotNull

from lakehouse import Lakehouse, LakehouseError, TableMetadataError
from rtml.schemas import Event, Feedback, ModelStatus, ModelVersion, Prediction
from rtml.settings import Settings

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
WITH_SUBJECT = ("events", "features", "predictions", "feedback", "enrichments")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.services)])
def catalog_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_settings(request: pytest.FixtureRequest, catalog_kind: str, tmp_path: Path):
    """Settings of this test's lakehouse called ``name``: the same name gives the same lakehouse
    (a restart), another name a second, separate one (a replica)."""
    made: dict[str, Settings] = {}

    def make(name: str = "primary") -> Settings:
        if name not in made:
            lakehouse = {"warehouse": str(tmp_path / name / "warehouse"), "namespace": "rtml_test"}
            if catalog_kind == "postgres":
                lakehouse["catalog_uri"] = request.getfixturevalue("postgres_dsn")
                lakehouse["catalog_name"] = f"test_{name}_{uuid.uuid4().hex[:12]}"
            made[name] = Settings(home=tmp_path / name, lakehouse=lakehouse)
        return made[name]

    return make


@pytest.fixture
def lake(make_settings) -> Lakehouse:
    return Lakehouse.open(make_settings())


def events(n: int, tenant: str = "acme", subject: str | None = None, start: int = 0) -> list[Event]:
    return [
        Event(
            event_id=f"{tenant}-ev-{i}",
            tenant=tenant,
            entity=f"pump-{i % 3}",
            event_time=T0 + timedelta(seconds=i),
            value=float(i),
            subject=subject,
        )
        for i in range(start, start + n)
    ]


def rows_about(lake: Lakehouse, table: str, subject: str, snapshot_id: int | None = None) -> int:
    return lake.read(table, where=EqualTo("subject", subject), snapshot_id=snapshot_id).num_rows


# idempotent writes -------------------------------------------------------------------------------


def test_writing_the_same_events_twice_leaves_one_row_each(lake):
    batch = events(50)
    assert lake.append_idempotent("events", batch) == 50
    assert lake.append_idempotent("events", batch) == 0
    assert lake.append_idempotent("events", events(10, start=45)) == 5  # half overlap, half new
    stored = lake.read("events")
    assert stored.num_rows == 55
    assert pc.count_distinct(stored["event_id"]).as_py() == 55


def test_duplicate_keys_within_one_batch_keep_the_first(lake):
    first, second = events(1), events(1)
    second[0] = second[0].model_copy(update={"value": 99.0})
    assert lake.append_idempotent("events", first + second) == 1
    assert lake.read("events")["value"].to_pylist() == [0.0]


def test_two_ray_tasks_writing_overlapping_events_lose_and_duplicate_nothing(lake, make_settings, ray_cluster):
    settings = make_settings()

    @ray_cluster.remote
    def write(batches: list[list[Event]]) -> int:
        writer_lake = Lakehouse.open(settings)
        return sum(writer_lake.append_idempotent("events", batch) for batch in batches)

    def batches(first: int, last: int) -> list[list[Event]]:
        # Many small commits so that the two writers keep racing for the same table.
        return [events(40, start=start) for start in range(first, last, 40)]

    written = ray_cluster.get([write.remote(batches(0, 400)), write.remote(batches(200, 600))])
    stored = lake.read("events")
    assert sum(written) == 600  # every event was written by exactly one of them
    assert stored.num_rows == 600
    assert set(stored["event_id"].to_pylist()) == {f"acme-ev-{i}" for i in range(600)}


def test_batching_writer_makes_rows_durable_by_flush_and_rejects_bad_rows_at_submit(lake):
    with lake.writer("events") as writer:
        futures = [writer.submit(events(10, start=start)) for start in range(0, 100, 10)]
        futures.append(writer.submit(events(10, start=0)))  # a replay inside the same stream
        with pytest.raises(LakehouseError, match="colour"):
            writer.submit([{"event_id": "x", "colour": "red"}])
        writer.flush()
        assert all(future.done() and future.exception() is None for future in futures)
        assert lake.read("events").num_rows == 100
        writer.submit(events(5, start=100)).result(timeout=60)  # due after flush_seconds on its own
    assert lake.read("events").num_rows == 105


def test_a_long_lived_writer_keeps_the_history_bounded_but_pinned_snapshots_readable(make_settings):
    from lakehouse.api import RETENTION_EVERY_WRITES

    settings = make_settings()
    keep = 3
    lake = Lakehouse.open(settings.model_copy(update={"lakehouse": settings.lakehouse.model_copy(update={"snapshot_keep_recent": keep})}))
    with lake.writer("events") as writer:
        writer.submit(events(10)).result(timeout=60)
        pinned = lake.snapshots("events")[-1].snapshot_id
        lake.pin_snapshot("events", pinned, "rtml-training-test")
        for start in range(10, 10 * (2 * RETENTION_EVERY_WRITES + 1), 10):
            writer.submit(events(10, start=start))
            writer.flush()

    retained = [snapshot.snapshot_id for snapshot in lake.snapshots("events")]
    assert len(retained) <= keep + 1 + RETENTION_EVERY_WRITES  # what it kept, the pin, the writes since
    assert len(retained) < 2 * RETENTION_EVERY_WRITES + 1, "the writer expired nothing"
    assert pinned in retained
    assert lake.read("events", snapshot_id=pinned).num_rows == 10
    assert lake.read("events").num_rows == 10 * (2 * RETENTION_EVERY_WRITES + 1)
    lake.unpin_snapshot("events", "rtml-training-test")
    assert lake.expire_snapshots("events", retention_hours=0).expired_snapshot_ids
    assert [snapshot.snapshot_id for snapshot in lake.snapshots("events")] == [retained[-1]]


def test_large_binary_payloads_are_kept_as_blobs_and_read_back(lake):
    small, large = b"\x01" * 10, os.urandom(lake.settings.inline_payload_max_bytes + 1)
    rows = [
        {**events(1, start=i)[0].model_dump(), "payload": payload, "attributes": "{}"}
        for i, payload in enumerate((small, large))
    ]
    lake.append_idempotent("events", rows)
    stored = {row["event_id"]: row for row in lake.read("events").to_pylist()}
    assert stored["acme-ev-0"]["payload"] == small and stored["acme-ev-0"]["payload_uri"] is None
    assert stored["acme-ev-1"]["payload"] is None and stored["acme-ev-1"]["payload_uri"]
    assert [lake.payload(stored[key]) for key in ("acme-ev-0", "acme-ev-1")] == [small, large]


# keys are unique per tenant ---------------------------------------------------------------------


def tenant_event(tenant: str, event_id: str = "42", seconds: int = 0) -> Event:
    return Event(event_id=event_id, tenant=tenant, entity="pump-1", event_time=T0 + timedelta(seconds=seconds), value=1.0)


def tenant_prediction(tenant: str, event_id: str = "42", seconds: int = 0) -> Prediction:
    return Prediction(
        event_id=event_id,
        tenant=tenant,
        entity="pump-1",
        event_time=T0 + timedelta(seconds=seconds),
        scores={},
        ensemble_score=0.5,
        is_anomaly=False,
        model_versions={},
    )


def tenants_and_ids(lake: Lakehouse, table: str) -> list[tuple[str, str]]:
    stored = lake.read(table)
    return sorted(zip(stored["tenant"].to_pylist(), stored["event_id"].to_pylist(), strict=True))


@pytest.mark.parametrize("table, row", [("events", tenant_event), ("predictions", tenant_prediction)])
def test_tenants_sharing_an_event_id_each_keep_their_row(lake, table, row):
    assert lake.append_idempotent(table, [row("a")]) == 1
    assert lake.append_idempotent(table, [row("b")]) == 1
    assert lake.append_idempotent(table, [row("c"), row("d")]) == 2  # two tenants in one batch
    assert tenants_and_ids(lake, table) == [("a", "42"), ("b", "42"), ("c", "42"), ("d", "42")]
    assert lake.append_idempotent(table, [row(tenant) for tenant in "abcd"]) == 0  # a replay adds nothing
    assert lake.read(table).num_rows == 4


def test_a_mixed_tenant_batch_adds_the_tenant_whose_event_is_not_stored_yet(lake):
    assert lake.append_idempotent("events", [tenant_event("a")]) == 1
    assert lake.append_idempotent("events", [tenant_event("a"), tenant_event("b"), tenant_event("b", "43")]) == 2
    assert tenants_and_ids(lake, "events") == [("a", "42"), ("b", "42"), ("b", "43")]


def test_keys_not_bound_by_time_find_a_retry_that_arrives_at_another_time(lake):
    first, retry = tenant_prediction("a"), tenant_prediction("a", seconds=86_400)  # "now" a day later
    assert lake.append_idempotent("predictions", [first], keys_bound_by_time=False) == 1
    assert lake.append_idempotent("predictions", [retry], keys_bound_by_time=False) == 0
    with lake.writer("predictions", keys_bound_by_time=False) as writer:
        writer.submit([tenant_prediction("a", seconds=3 * 86_400), tenant_prediction("b", seconds=3 * 86_400)]).result(timeout=60)
    assert tenants_and_ids(lake, "predictions") == [("a", "42"), ("b", "42")]
    assert lake.read("predictions", tenant="a")["event_time"].to_pylist() == [first.event_time]
    # The default narrows the key check to the batch's time range, which is why the option exists.
    assert lake.append_idempotent("predictions", [retry]) == 1


def test_a_lakehouse_made_before_composite_keys_and_tombstones_is_migrated_on_open(make_settings):
    from pyiceberg.schema import Schema

    from lakehouse.catalog import open_catalog
    from lakehouse.tables import EVENTS, MODELS, TABLE_PROPERTIES, TABLES, to_arrow

    settings = make_settings()
    catalog = open_catalog(settings.lakehouse, settings.home_dir)
    namespace = settings.lakehouse.namespace
    catalog.create_namespace(namespace)
    for table in TABLES.values():
        if table.name == "erasures":
            continue  # it did not exist yet
        fields = [field for field in table.schema.fields if not (table is MODELS and field.name == "registration_token")]
        first_key = table.schema.find_field(table.keys[-1]).field_id  # the old, single key
        catalog.create_table(
            (namespace, table.name),
            schema=Schema(*fields, identifier_field_ids=[first_key]),
            partition_spec=table.partition_spec(),
            properties=TABLE_PROPERTIES,
        )
    catalog.load_table((namespace, "events")).append(to_arrow(EVENTS, [tenant_event("a")]))

    lake = Lakehouse.open(settings)

    events_table = lake.table("events")
    assert set(events_table.schema().identifier_field_names()) == {"tenant", "event_id"}
    assert "registration_token" in lake.table("models").schema().column_names
    assert lake.append_idempotent("events", [tenant_event("a"), tenant_event("b")]) == 1
    registered = lake.registry.register(model(), client_token="job-1")
    assert lake.registry.register(model(), client_token="job-1") == registered
    assert [m.key for m in lake.registry.list()] == ["acme-rnn@1"]
    lake.erase("nobody", actor="test")  # the tombstone table was created too
    assert lake.read("erasures").num_rows == 1


# reads and time travel ---------------------------------------------------------------------------


def test_reads_by_tenant_and_time_range_newest_first(lake):
    lake.append_idempotent("events", events(20) + events(5, tenant="other"))
    window = lake.read("events", tenant="acme", start=T0 + timedelta(seconds=5), end=T0 + timedelta(seconds=10))
    assert window["event_id"].to_pylist() == [f"acme-ev-{i}" for i in (9, 8, 7, 6, 5)]
    assert lake.read("events", tenant="acme", limit=2)["event_id"].to_pylist() == ["acme-ev-19", "acme-ev-18"]


def test_time_travel_returns_the_older_state(lake):
    lake.append_idempotent("events", events(10))
    before = lake.snapshots("events")[-1]
    lake.append_idempotent("events", events(10, start=10))
    assert lake.read("events").num_rows == 20
    assert lake.read("events", snapshot_id=before.snapshot_id).num_rows == 10
    as_of = datetime.fromtimestamp(before.timestamp_ms / 1000, tz=timezone.utc)
    assert lake.read("events", as_of=as_of).num_rows == 10
    assert lake.read("events", as_of=as_of - timedelta(days=1)).num_rows == 0
    with pytest.raises(LakehouseError, match="no snapshot"):
        lake.read("events", snapshot_id=12345)


# registry, feature store, lineage ----------------------------------------------------------------


def test_ray_dataset_reads_one_tenant_and_time_range_of_a_pinned_snapshot(lake, ray_cluster):
    lake.append_idempotent("events", events(10) + events(5, tenant="other"))
    pinned = lake.snapshots("events")[-1].snapshot_id
    lake.append_idempotent("events", events(10, start=10))
    start, end = T0 + timedelta(seconds=3), T0 + timedelta(seconds=13)
    current = lake.dataset("events", tenant="acme", start=start, end=end, columns=("event_id",))
    assert sorted(row["event_id"] for row in current.take_all()) == sorted(f"acme-ev-{i}" for i in range(3, 13))
    assert current.columns() == ["event_id"]
    older = lake.dataset("events", tenant="acme", start=start, end=end, snapshot_id=pinned)
    assert sorted(row["event_id"] for row in older.take_all()) == sorted(f"acme-ev-{i}" for i in range(3, 10))
    with pytest.raises(LakehouseError, match="no snapshot"):
        lake.dataset("events", snapshot_id=12345)


def model(name: str = "acme-rnn", **changes) -> ModelVersion:
    return ModelVersion(name=name, version=0, kind="rnn", tenant="acme", artifact_uri=f"file:///models/{name}", **changes)


def test_registry_versions_promotion_retirement_and_weights_survive_a_restart(lake, make_settings):
    first = lake.registry.register(model(metrics={"f1": 0.7}))
    second = lake.registry.register(model(metrics={"f1": 0.8}))
    other = lake.registry.register(model("acme-cnn"))
    assert (first.version, second.version, other.version) == (1, 2, 1)
    lake.registry.promote("acme-rnn", 1)
    lake.registry.promote("acme-cnn", 1)
    lake.registry.promote("acme-rnn", 2)
    assert {m.key for m in lake.registry.active("acme")} == {"acme-rnn@2", "acme-cnn@1"}
    assert lake.registry.get("acme-rnn", 1).status == ModelStatus.RETIRED
    assert lake.registry.get("acme-rnn", 2).metrics == {"f1": 0.8}
    lake.registry.set_weights("acme", {"acme-rnn@2": 0.75, "acme-cnn@1": 0.25})
    with pytest.raises(LakehouseError, match="acme-gru@1"):
        lake.registry.set_weights("acme", {"acme-rnn@2": 0.1, "acme-gru@1": 0.9})

    restarted = Lakehouse.open(make_settings())
    assert {m.key: m.ensemble_weight for m in restarted.registry.active("acme")} == {"acme-rnn@2": 0.75, "acme-cnn@1": 0.25}
    restarted.registry.retire("acme-cnn", 1)
    assert [m.key for m in restarted.registry.list(tenant="acme", status="retired")] == ["acme-cnn@1", "acme-rnn@1"]
    with pytest.raises(LakehouseError, match="not registered"):
        restarted.registry.get("acme-rnn", 9)


def test_concurrent_registrations_get_distinct_versions(lake):
    versions: list[int] = []

    def register_three() -> None:
        versions.extend(lake.registry.register(model()).version for _ in range(3))

    threads = [threading.Thread(target=register_three) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(versions) == [1, 2, 3, 4, 5, 6]


def test_concurrent_weight_updates_are_compare_and_swap_and_equal_sequential_ones(lake):
    lake.registry.register(model())
    lake.registry.register(model("acme-cnn"))
    lake.registry.set_weights("acme", {"acme-rnn@1": 0.5, "acme-cnn@1": 0.5})
    factors = [(0.9, 1.1), (1.2, 0.7), (0.5, 1.0), (1.3, 0.95), (0.8, 1.25), (1.05, 0.6)]

    def multiplicative(rnn: float, cnn: float):
        # As the router re-weights: multiply, then keep the total; such updates commute.
        def update(current: dict[str, float]) -> dict[str, float]:
            new = {"acme-rnn@1": current["acme-rnn@1"] * rnn, "acme-cnn@1": current["acme-cnn@1"] * cnn}
            scale = sum(current.values()) / sum(new.values())
            return {key: value * scale for key, value in new.items()}

        return update

    start = threading.Barrier(len(factors))

    def apply(rnn: float, cnn: float) -> None:
        start.wait()
        lake.registry.update_weights("acme", multiplicative(rnn, cnn))

    threads = [threading.Thread(target=apply, args=pair) for pair in factors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    expected = {"acme-rnn@1": 0.5, "acme-cnn@1": 0.5}
    for pair in factors:
        expected = multiplicative(*pair)(expected)
    stored = {m.key: m.ensemble_weight for m in lake.registry.list(tenant="acme")}
    assert stored == pytest.approx(expected, rel=1e-9)
    assert lake.registry.update_weights("acme", lambda current: {}) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(LakehouseError, match="acme-gru@1"):
        lake.registry.update_weights("acme", lambda current: {"acme-gru@1": 1.0})


class CommitsThenLosesTheConnection:
    """The models table whose first append commits and then fails as a dropped connection does:
    the caller cannot tell that its commit landed."""

    def __init__(self, table, failures: list[str]):
        self._table, self._failures = table, failures

    def __getattr__(self, name: str):
        return getattr(self._table, name)

    def append(self, *args, **kwargs) -> None:
        self._table.append(*args, **kwargs)
        if not self._failures:
            self._failures.append("lost")
            from sqlalchemy.exc import OperationalError

            raise OperationalError("COMMIT", {}, ConnectionError("server closed the connection unexpectedly"))


def test_a_registration_whose_commit_outcome_was_unknown_is_not_registered_twice(lake):
    from lakehouse import ModelRegistry

    failures: list[str] = []
    flaky = ModelRegistry(lambda: CommitsThenLosesTheConnection(lake.table("models"), failures), lake.settings.commit_retries)
    registered = flaky.register(model(), client_token="train-acme-rnn-snapshot-1")
    assert failures == ["lost"]  # the first commit really landed and was reported as failed
    assert [m.key for m in lake.registry.list()] == ["acme-rnn@1"]
    assert registered.key == "acme-rnn@1"


def test_registering_with_a_known_token_returns_the_version_it_registered(lake):
    first = lake.registry.register(model(), client_token="job-1")
    lake.registry.promote("acme-rnn", first.version)  # rewriting the row keeps its token
    again = lake.registry.register(model(metrics={"f1": 0.1}), client_token="job-1")
    assert (again.key, again.status) == ("acme-rnn@1", ModelStatus.ACTIVE)
    assert lake.registry.register(model(), client_token="job-2").version == 2
    assert lake.registry.register(model()).version == 3  # no token: always a new version
    with pytest.raises(LakehouseError, match="job-1"):
        lake.registry.register(model("acme-cnn"), client_token="job-1")
    assert [m.key for m in lake.registry.list()] == ["acme-rnn@3", "acme-rnn@2", "acme-rnn@1"]


def feature_row(entity: str, minute: int, version: str = "fs1", subject: str | None = None, tenant: str = "acme") -> dict:
    return {
        "tenant": tenant,
        "entity": entity,
        "window_start": T0 + timedelta(minutes=minute),
        "window_end": T0 + timedelta(minutes=minute + 1),
        "feature_set_version": version,
        "vector": [float(minute), 1.0],
        "subject": subject,
    }


def test_feature_store_online_latest_follows_appends_and_deletes(lake):
    lake.append_idempotent("features", [feature_row("pump-1", 0), feature_row("pump-2", 0), feature_row("pump-1", 1)])
    latest = lake.features.online_latest("acme", ["pump-2", "pump-1", "pump-9"])
    assert latest["entity"].to_pylist() == ["pump-2", "pump-1"]
    assert [vector[0] for vector in latest["vector"].to_pylist()] == [0.0, 1.0]

    lake.append_idempotent("features", [feature_row("pump-1", 5, subject="s-1")])
    assert lake.features.online_latest("acme", ["pump-1"])["vector"].to_pylist() == [[5.0, 1.0]]
    lake.erase("s-1", actor="test")
    assert lake.features.online_latest("acme", ["pump-1"])["vector"].to_pylist() == [[1.0, 1.0]]


def test_feature_store_offline_range_as_arrow_and_as_ray_dataset(lake, ray_cluster):
    lake.append_idempotent("features", [feature_row(f"pump-{e}", minute) for e in range(3) for minute in range(10)])
    lake.append_idempotent("features", [feature_row("pump-0", 3, version="fs2")])
    start, end = T0 + timedelta(minutes=3), T0 + timedelta(minutes=6)  # window ends at minutes 3, 4, 5
    rows = lake.features.offline_range("acme", start, end, feature_set_version="fs1")
    assert rows.num_rows == 9
    assert pc.min(rows["window_end"]).as_py() == start
    dataset = lake.features.offline_dataset("acme", start, end, feature_set_version="fs1")
    assert sorted(row["feature_id"] for row in dataset.take_all()) == sorted(rows["feature_id"].to_pylist())


def test_lineage_resolves_features_and_model_versions_with_training_snapshots(lake):
    lake.append_idempotent("events", events(3))
    training_snapshot = lake.snapshots("events")[-1].snapshot_id
    registered = lake.registry.register(
        model(feature_set_version="fs1", training_snapshot_ids={"events": training_snapshot})
    )
    lake.append_idempotent(
        "features", [feature_row("pump-1", 0), feature_row("pump-1", 0, version="fs0"), feature_row("pump-1", 5)]
    )
    prediction = Prediction(
        event_id="acme-ev-1",
        tenant="acme",
        entity="pump-1",
        event_time=T0 + timedelta(seconds=30),
        scores={registered.key: 0.9},
        ensemble_score=0.9,
        is_anomaly=True,
        model_versions={"acme-rnn": str(registered.version), "acme-gone": "4"},
    )
    lake.append_idempotent("predictions", [prediction])
    lineage = lake.lineage(prediction.prediction_id, "acme")
    assert lineage.prediction["event_id"] == "acme-ev-1"
    assert [m.key for m in lineage.models] == ["acme-rnn@1"]
    assert lineage.models[0].training_snapshot_ids == {"events": training_snapshot}
    assert lineage.features["feature_set_version"].to_pylist() == ["fs1"]
    assert lineage.features["window_start"].to_pylist() == [T0]
    assert lineage.unregistered_models == {"acme-gone": "4"}
    with pytest.raises(LakehouseError, match="no prediction"):
        lake.lineage("nope", "acme")
    with pytest.raises(LakehouseError, match="tenant 'other' has no prediction"):
        lake.lineage(prediction.prediction_id, "other")  # another tenant's prediction is not found


# erasure -----------------------------------------------------------------------------------------


def write_everything_about(lake: Lakehouse, subject: str, offset: int, tenant: str = "acme") -> None:
    """``tenant``'s rows about ``subject`` in every table, over several commits (so several snapshots)."""
    batch = events(6, tenant=tenant, subject=subject, start=offset)
    batch[0] = batch[0].model_copy(update={"subject": None})
    lake.append_idempotent("events", batch[:3])
    large = {**batch[3].model_dump(), "payload": os.urandom(lake.settings.inline_payload_max_bytes + 1)}
    lake.append_idempotent("events", [large, *batch[4:]])
    lake.append_idempotent("features", [feature_row("pump-1", offset, subject=subject, tenant=tenant)])
    prediction = Prediction(
        event_id=batch[1].event_id,
        tenant=tenant,
        entity="pump-1",
        event_time=batch[1].event_time,
        scores={},
        ensemble_score=0.1,
        is_anomaly=False,
        model_versions={},
        subject=subject,
    )
    lake.append_idempotent("predictions", [prediction])
    lake.append_idempotent(
        "feedback", [Feedback(prediction_id=prediction.prediction_id, tenant=tenant, is_anomaly=False, subject=subject)]
    )
    lake.append_idempotent(
        "enrichments",
        [{"enrichment_id": f"en-{offset}", "tenant": tenant, "source": "reasoning", "created_at": T0, "subject": subject}],
    )


def parquet_files_holding(folder: Path, subject: str, tenant: str | None = None) -> list[Path]:
    """The Parquet files under ``folder`` with a row about ``subject`` (of ``tenant``, if given)."""
    held = []
    for path in folder.rglob("*.parquet"):
        table = pq.read_table(path)
        if "subject" in table.column_names:
            pairs = zip(table["tenant"].to_pylist(), table["subject"].to_pylist(), strict=True)
            if any(about == subject and tenant in (None, of) for of, about in pairs):
                held.append(path)
    return held


def rows_of_tenant_about(lake: Lakehouse, table: str, tenant: str, subject: str, snapshot_id: int | None = None) -> int:
    return lake.read(table, tenant=tenant, where=EqualTo("subject", subject), snapshot_id=snapshot_id).num_rows


def blob_files(folder: Path) -> set[str]:
    return {path.name for path in folder.rglob("*") if path.is_file() and "blobs" in path.parts}


def test_erasure_leaves_no_trace_in_current_data_snapshots_or_files_and_is_audited(lake, make_settings):
    write_everything_about(lake, "alice", offset=0)
    lake.pin_snapshot("events", lake.snapshots("events")[-1].snapshot_id, "rtml-training-acme-rnn-1")  # a model trained on her data
    write_everything_about(lake, "bob", offset=100)
    [blob_uri] = lake.read("events", where=And(EqualTo("subject", "alice"), NotNull("payload_uri")))["payload_uri"].to_pylist()

    report = lake.erase("alice", actor="dpo@example.com")

    assert {t.table: t.rows_removed for t in report.tables} == {
        "events": 5,
        "features": 1,
        "predictions": 1,
        "feedback": 1,
        "enrichments": 1,
    }
    for table in WITH_SUBJECT:
        assert rows_about(lake, table, "alice") == 0
        assert rows_about(lake, table, "bob") > 0, f"bob's rows in {table} must survive"
        for snapshot in lake.snapshots(table):
            assert rows_about(lake, table, "alice", snapshot.snapshot_id) == 0, f"{table}@{snapshot.snapshot_id}"
    assert lake.read("events").num_rows == 7  # bob's 5, and the two events that named nobody
    warehouse = Path(make_settings().lakehouse.warehouse)
    assert parquet_files_holding(warehouse, "alice") == []
    assert parquet_files_holding(warehouse, "bob") != []
    assert not lake.io.new_input(blob_uri).exists()

    audit = lake.read("audit", where=EqualTo("action", "erase"))
    assert sorted(audit["table_name"].to_pylist()) == sorted(WITH_SUBJECT)
    assert set(audit["actor"].to_pylist()) == {"dpo@example.com"}
    assert set(audit["row_filter"].to_pylist()) == {f"subject {report.subject_digest}"}
    [events_erasure] = audit.filter(pc.equal(audit["table_name"], "events")).to_pylist()
    assert json.loads(events_erasure["details"])["tags_dropped"] == ["rtml-training-acme-rnn-1"]
    assert "rtml-training-acme-rnn-1" not in lake.table("events").metadata.refs
    assert "alice" not in str(lake.read("audit").to_pylist())


def test_an_erased_subject_is_not_brought_back_by_a_replay(lake, make_settings):
    write_everything_about(lake, "alice", offset=0)
    lake.erase("alice", actor="dpo")

    write_everything_about(lake, "alice", offset=0)  # a rewind replays her rows
    write_everything_about(lake, "bob", offset=100)

    for table in WITH_SUBJECT:
        assert rows_about(lake, table, "alice") == 0, table
        assert rows_about(lake, table, "bob") > 0, table
    assert lake.read("events").num_rows == 7  # bob's 5, and the two events that named nobody
    assert parquet_files_holding(Path(make_settings().lakehouse.warehouse), "alice") == []
    assert blob_files(Path(make_settings().lakehouse.warehouse)) == {"acme-ev-103"}  # bob's large payload; hers was not kept
    [tombstone] = lake.read("erasures").to_pylist()
    assert tombstone["subject_digest"] == lake.erase("alice", actor="dpo").subject_digest  # erasing again adds no tombstone
    assert lake.read("erasures").num_rows == 1
    assert "alice" not in str(lake.read("erasures").to_pylist())


def test_an_erasure_in_one_tenant_removes_its_rows_about_the_subject_and_keeps_other_tenants_rows(lake, make_settings):
    # Two tenants each know a subject "alice" (subject ids are the clients', like event ids).
    write_everything_about(lake, "alice", offset=0, tenant="beta")
    beta_only = {table: lake.snapshots(table)[-1].snapshot_id for table in WITH_SUBJECT}  # before acme wrote anything
    write_everything_about(lake, "alice", offset=100, tenant="acme")
    write_everything_about(lake, "bob", offset=200, tenant="acme")
    warehouse = Path(make_settings().lakehouse.warehouse)
    with_blob = And(EqualTo("subject", "alice"), NotNull("payload_uri"))
    [acme_blob] = lake.read("events", tenant="acme", where=with_blob)["payload_uri"].to_pylist()

    report = lake.erase("alice", actor="acme-admin", tenant="acme")

    assert report.tenant == "acme"
    assert {t.table: t.rows_removed for t in report.tables} == {
        "events": 5,
        "features": 1,
        "predictions": 1,
        "feedback": 1,
        "enrichments": 1,
    }
    for table in WITH_SUBJECT:
        assert rows_of_tenant_about(lake, table, "acme", "alice") == 0, table
        assert rows_of_tenant_about(lake, table, "beta", "alice") > 0, f"beta's alice in {table} must survive"
        assert rows_of_tenant_about(lake, table, "acme", "bob") > 0, table
        for snapshot in lake.snapshots(table):
            assert rows_of_tenant_about(lake, table, "acme", "alice", snapshot.snapshot_id) == 0, f"{table}@{snapshot.snapshot_id}"
        # A snapshot that held only beta's rows about her is not expired: time travel still finds them.
        assert rows_of_tenant_about(lake, table, "beta", "alice", beta_only[table]) > 0, table
    assert parquet_files_holding(warehouse, "alice", tenant="acme") == []
    assert parquet_files_holding(warehouse, "alice", tenant="beta") != []
    assert not lake.io.new_input(acme_blob).exists()
    assert blob_files(warehouse) == {"beta-ev-3", "acme-ev-203"}  # beta's alice, acme's bob

    [tombstone] = lake.read("erasures").to_pylist()
    assert tombstone["tenant"] == "acme" and tombstone["subject_digest"] == report.subject_digest
    audit = lake.read("audit", where=EqualTo("action", "erase"))
    assert sorted(audit["table_name"].to_pylist()) == sorted(WITH_SUBJECT)
    assert {json.loads(details)["tenant"] for details in audit["details"].to_pylist()} == {"acme"}
    assert set(audit["row_filter"].to_pylist()) == {f"tenant acme and subject {report.subject_digest}"}
    assert "alice" not in str(lake.read("audit").to_pylist()) + str(lake.read("erasures").to_pylist())


def test_after_an_erasure_in_one_tenant_only_that_tenants_rows_about_the_subject_are_withheld(lake, make_settings):
    write_everything_about(lake, "alice", offset=0, tenant="acme")
    lake.erase("alice", actor="acme-admin", tenant="acme")

    write_everything_about(lake, "alice", offset=0, tenant="acme")  # a rewind replays acme's rows about her
    write_everything_about(lake, "alice", offset=100, tenant="beta")  # beta's subject of the same id

    for table in WITH_SUBJECT:
        assert rows_of_tenant_about(lake, table, "acme", "alice") == 0, table
        assert rows_of_tenant_about(lake, table, "beta", "alice") > 0, table
    warehouse = Path(make_settings().lakehouse.warehouse)
    assert blob_files(warehouse) == {"beta-ev-103"}  # acme's withheld payload was not kept
    assert lake.erase("alice", actor="acme-admin", tenant="acme").subject_digest == lake.read("erasures")["subject_digest"][0].as_py()
    assert lake.read("erasures").num_rows == 1  # erasing again in the same tenant adds no tombstone

    # The operator's erasure in every tenant still withholds every tenant's rows, next to the scoped one.
    lake.erase("alice", actor="dpo")
    write_everything_about(lake, "alice", offset=100, tenant="beta")
    write_everything_about(lake, "alice", offset=300, tenant="gamma")
    for table in WITH_SUBJECT:
        assert rows_about(lake, table, "alice") == 0, table
    assert parquet_files_holding(warehouse, "alice") == []
    assert sorted(lake.read("erasures")["tenant"].to_pylist(), key=lambda tenant: tenant or "") == [None, "acme"]


def test_tombstones_from_before_tenant_scoped_erasure_still_hold_in_every_tenant(make_settings):
    from pyiceberg.schema import Schema

    from lakehouse.catalog import open_catalog
    from lakehouse.erasure import subject_digest
    from lakehouse.tables import ERASURES, TABLE_PROPERTIES

    settings = make_settings()
    catalog = open_catalog(settings.lakehouse, settings.home_dir)
    namespace = settings.lakehouse.namespace
    catalog.create_namespace(namespace)
    old_fields = [field for field in ERASURES.schema.fields if field.name != "tenant"]
    old = catalog.create_table(
        (namespace, "erasures"),
        schema=Schema(*old_fields, identifier_field_ids=[ERASURES.schema.find_field("subject_digest").field_id]),
        partition_spec=ERASURES.partition_spec(),
        properties=TABLE_PROPERTIES,
    )
    old_tombstone = {"subject_digest": [subject_digest("alice")], "erased_at": [T0], "actor": ["dpo"]}
    old.append(pa.table(old_tombstone, schema=old.schema().as_arrow()))

    lake = Lakehouse.open(settings)

    assert "tenant" in lake.table("erasures").schema().column_names
    rows = events(2, tenant="acme", subject="alice") + events(2, tenant="beta", subject="alice")
    assert lake.append_idempotent("events", rows) == 0  # the old tombstone is an erasure in every tenant
    assert lake.append_idempotent("events", events(2, tenant="acme", subject="bob", start=10)) == 2
    lake.erase("bob", actor="acme-admin", tenant="acme")  # a scoped tombstone goes into the migrated table
    assert lake.append_idempotent("events", events(2, tenant="acme", subject="bob", start=20)) == 0
    assert lake.append_idempotent("events", events(2, tenant="beta", subject="bob", start=20)) == 2
    assert sorted(lake.read("erasures")["tenant"].to_pylist(), key=lambda tenant: tenant or "") == [None, "acme"]


def test_an_erasure_names_a_valid_tenant_or_none(lake):
    write_everything_about(lake, "alice", offset=0)
    for tenant in ("", "acme corp"):
        with pytest.raises(LakehouseError, match="is not a tenant id.*leave it out to erase the subject in every tenant"):
            lake.erase("alice", actor="dpo", tenant=tenant)
    assert rows_about(lake, "events", "alice") == 5
    assert lake.read("erasures").num_rows == 0


def test_an_erasure_racing_with_appends_of_its_subject_leaves_none_of_its_rows(lake):
    appended: list[int] = []
    erased = threading.Event()

    def keep_appending() -> None:
        # Her rows and others' in every batch, before, during and after the erasure.
        for batch in range(24):
            rows = events(4, subject="alice", start=batch * 10) + events(4, tenant="other", subject="bob", start=batch * 10)
            lake.append_idempotent("events", rows)
            appended.append(batch)
            if batch >= 16 and not erased.is_set():
                erased.wait(timeout=120)

    appender = threading.Thread(target=keep_appending)
    appender.start()
    while len(appended) < 3:
        time.sleep(0.05)
    lake.erase("alice", actor="dpo")
    erased.set()
    appender.join()

    assert rows_about(lake, "events", "alice") == 0
    assert rows_about(lake, "events", "bob") == 24 * 4
    for snapshot in lake.snapshots("events"):
        assert rows_about(lake, "events", "alice", snapshot.snapshot_id) == 0


@pytest.mark.parametrize("scope", [None, "acme"], ids=["in-every-tenant", "in-her-tenant"])
@pytest.mark.parametrize("rows_before", [0, 2], ids=["no-rows-of-her-yet", "rows-of-her-stored"])
def test_an_append_that_read_the_tombstones_just_before_an_erasure_re_runs_and_drops_its_rows(lake, rows_before, scope):
    from lakehouse.erasure import Tombstones
    from lakehouse.tables import EVENTS, to_arrow
    from lakehouse.writer import append_idempotent

    lake.append_idempotent("events", events(rows_before, subject="alice", start=100))
    tombstones = Tombstones(lambda: lake.table("erasures"))
    seen: list[list[tuple[str, str]]] = []

    def erased_among(rows: pa.Table) -> pa.Array:
        erased = tombstones.erased_among(rows)
        if not seen:  # the whole erasure runs between this append's tombstone read and its commit
            lake.erase("alice", actor="dpo", tenant=scope)
        seen.append(sorted(set(zip(*rows.filter(erased).to_pydict().values(), strict=True))))
        return erased

    rows = to_arrow(EVENTS, events(3, subject="alice") + events(3, tenant="other", subject="bob"))
    appended = append_idempotent(lambda: lake.table("events"), EVENTS, rows, EVENTS.keys, 8, erased_among=erased_among)

    assert seen == [[], [("acme", "alice")]]  # its commit conflicted with the erasure's, and the re-run saw the tombstone
    assert appended == 3
    assert (rows_about(lake, "events", "alice"), rows_about(lake, "events", "bob")) == (0, 3)


# maintenance and replication ---------------------------------------------------------------------


def test_maintenance_compacts_small_files_and_expires_old_snapshots(lake, make_settings):
    for start in range(0, 60, 10):
        lake.append_idempotent("events", events(10, start=start))
    before = lake.read("events").sort_by("event_id")
    assert lake.table("events").inspect.files().num_rows == 6

    reports = {report.table: report for report in lake.maintain(retention_hours=0)}

    assert reports["events"].partitions_compacted == 1
    assert (reports["events"].data_files_before, reports["events"].data_files_after) == (6, 1)
    assert lake.read("events").sort_by("event_id").equals(before)
    assert len(lake.snapshots("events")) == 1
    live = {uri.rsplit("/", 1)[-1] for uri in lake.table("events").inspect.files()["file_path"].to_pylist()}
    events_folder = Path(make_settings().lakehouse.warehouse) / "rtml_test" / "events"
    on_disk = {path.name for path in events_folder.rglob("*.parquet")}
    assert on_disk == live  # the compacted-away files went with their expired snapshots


def test_replication_copies_every_table_then_only_what_is_new(lake, make_settings):
    write_everything_about(lake, "alice", offset=0)
    lake.registry.register(model())
    replica_settings = make_settings("replica")

    def assert_identical(replica: Lakehouse) -> None:
        for table in ("events", "features", "predictions", "feedback", "models", "enrichments", "audit"):
            assert replica.read(table).num_rows == lake.read(table).num_rows, table
            assert replica.table(table).schema().as_struct() == lake.table(table).schema().as_struct(), table

    first = {report.table: report for report in lake.replicate(to=replica_settings)}
    assert first["events"].mode == "full" and first["events"].rows_copied == 6
    replica = Lakehouse.open(replica_settings)
    assert_identical(replica)
    [primary_event] = lake.read("events", where=NotNull("payload_uri")).to_pylist()
    [replica_event] = replica.read("events", where=NotNull("payload_uri")).to_pylist()
    assert replica_event["payload_uri"].startswith(replica.table("events").location())
    assert replica.payload(replica_event) == lake.payload(primary_event)
    with pytest.raises(LakehouseError, match="itself"):
        lake.replicate(to=lake)

    lake.append_idempotent("events", events(4, start=50))
    second = {report.table: report for report in lake.replicate(to=replica_settings)}
    assert (second["events"].mode, second["events"].rows_copied) == ("incremental", 4)
    assert second["models"].mode == "unchanged"
    assert_identical(replica)

    lake.erase("alice", actor="test")
    lake.replicate(to=replica_settings)
    assert_identical(replica)
    for table in WITH_SUBJECT:
        for snapshot in replica.snapshots(table):
            assert rows_about(replica, table, "alice", snapshot.snapshot_id) == 0


# broken metadata ---------------------------------------------------------------------------------


def metadata_path(lake: Lakehouse, table: str) -> Path:
    return Path(lake.table(table).metadata_location.removeprefix("file://"))


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_corrupt_or_missing_metadata_is_a_clear_error_naming_the_table(lake, damage):
    lake.append_idempotent("events", events(3))
    path = metadata_path(lake, "events")
    if damage == "corrupt":
        path.write_text('{"format-version": 2, "table-uuid": "not json')
    else:
        path.unlink()
    with pytest.raises(TableMetadataError, match="rtml_test.events"):
        lake.read("events")
    with pytest.raises(TableMetadataError, match="rtml_test.events"):
        lake.append_idempotent("events", events(1, start=10))
    assert lake.read("predictions").num_rows == 0  # the other tables are unaffected


def run_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    """`rtml ...` in a fresh process, pointed at this test's embedded lakehouse."""
    env = {
        **os.environ,
        "RTML_HOME": str(settings.home),
        "RTML_LAKEHOUSE__WAREHOUSE": settings.lakehouse.warehouse,
        "RTML_LAKEHOUSE__NAMESPACE": settings.lakehouse.namespace,
    }
    return subprocess.run([sys.executable, "-m", "rtml", *args], env=env, capture_output=True, text=True, timeout=300)


def test_cli_erase_prints_what_it_removed_per_table(lake, make_settings, catalog_kind):
    if catalog_kind != "sqlite":
        pytest.skip("the CLI check needs only the embedded catalog")
    write_everything_about(lake, "carol", offset=0)
    result = run_cli(make_settings(), "erase", "--subject", "carol", "--actor", "dpo")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[1]: line.split()[3] for line in result.stdout.splitlines() if line.count("│") >= 5}
    assert lines == {"events": "5", "features": "1", "predictions": "1", "feedback": "1", "enrichments": "1"}
    assert rows_about(lake, "events", "carol") == 0


def test_cli_erase_in_one_tenant_keeps_the_other_tenants_rows_and_rejects_a_bad_tenant(lake, make_settings, catalog_kind):
    if catalog_kind != "sqlite":
        pytest.skip("the CLI check needs only the embedded catalog")
    write_everything_about(lake, "carol", offset=0, tenant="acme")
    write_everything_about(lake, "carol", offset=100, tenant="beta")

    result = run_cli(make_settings(), "erase", "--subject", "carol", "--tenant", "beta", "--actor", "dpo")

    assert result.returncode == 0, result.stderr
    assert "in tenant beta" in " ".join(result.stdout.split())  # the table's title, however rich wraps it
    lines = {line.split()[1]: line.split()[3] for line in result.stdout.splitlines() if line.count("│") >= 5}
    assert lines == {"events": "5", "features": "1", "predictions": "1", "feedback": "1", "enrichments": "1"}
    assert (rows_of_tenant_about(lake, "events", "beta", "carol"), rows_of_tenant_about(lake, "events", "acme", "carol")) == (0, 5)

    refused = run_cli(make_settings(), "erase", "--subject", "carol", "--tenant", "no such/tenant")
    assert refused.returncode == 2
    assert "'no such/tenant' is not a tenant id" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert rows_of_tenant_about(lake, "events", "acme", "carol") == 5


def test_cli_reports_broken_metadata_without_a_traceback(lake, make_settings, catalog_kind):
    if catalog_kind != "sqlite":
        pytest.skip("the CLI check needs only the embedded catalog")
    lake.append_idempotent("events", events(3))
    metadata_path(lake, "events").write_text("garbage")
    result = run_cli(make_settings(), "lakehouse", "maintain")
    assert result.returncode == 2
    assert "rtml_test.events" in result.stderr
    assert "Traceback" not in result.stderr
