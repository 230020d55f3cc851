"""Lakehouse pieces that need no catalog: record conversion, keys, CLI target parsing."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pytest

from lakehouse.api import replica_settings
from lakehouse.erasure import subject_digest, tenant_subject_digest
from lakehouse.errors import LakehouseError
from lakehouse.features import feature_id, with_feature_ids
from lakehouse.tables import EVENTS, PREDICTIONS, TABLES, to_arrow
from lakehouse.writer import first_row_per_key, without_keys
from rtml.schemas import Event, Prediction
from rtml.settings import LakehouseSettings

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def test_every_table_with_personal_data_has_a_subject_column_and_audit_has_none():
    with_subject = {name for name, table in TABLES.items() if table.has_subject}
    assert with_subject == {"events", "features", "predictions", "feedback", "enrichments"}
    # An erasure may be scoped to one tenant, so each of them must say whose row it is.
    assert all("tenant" in TABLES[name].schema.column_names for name in with_subject)


def test_tombstone_digests_of_the_two_scopes_and_of_distinct_pairs_never_coincide():
    everywhere = {subject_digest(subject) for subject in ("s", "a", "as", '["a", "s"]')}
    scoped = {tenant_subject_digest(tenant, subject) for tenant, subject in (("a", "s"), ("as", ""), ("", "as"), ("a", '", "s'))}
    assert len(everywhere) == 4 and len(scoped) == 4
    assert not everywhere & scoped
    assert all(digest.startswith("sha256:") for digest in everywhere)
    assert all(digest.startswith("sha256-tenant:") for digest in scoped)


def test_kernel_records_convert_with_their_field_names():
    event = Event(tenant="acme", entity="pump-1", event_time=T0, value=1.5, attributes={"unit": "bar"}, subject="s-1")
    prediction = Prediction(
        event_id=event.event_id,
        tenant="acme",
        entity="pump-1",
        event_time=T0,
        scores={"rnn@1": 0.25},
        ensemble_score=0.25,
        is_anomaly=False,
        model_versions={"rnn": "1"},
    )
    events = to_arrow(EVENTS, [event])
    predictions = to_arrow(PREDICTIONS, [prediction])
    assert events.column_names == EVENTS.arrow_schema().names
    assert events.to_pylist()[0]["attributes"] == '{"unit": "bar"}'
    assert events.to_pylist()[0]["data_type"] == "metric"
    assert dict(predictions.to_pylist()[0]["scores"]) == {"rnn@1": 0.25}


def test_unknown_column_is_named():
    with pytest.raises(LakehouseError, match="colour"):
        to_arrow(EVENTS, [{"event_id": "e", "tenant": "t", "entity": "x", "data_type": "metric", "event_time": T0, "colour": 1}])


def test_missing_required_value_is_named():
    rows = pa.table({"event_id": ["e1", None], "tenant": ["t", "t"], "entity": ["x", "x"], "data_type": ["metric"] * 2, "event_time": [T0, T0]})
    with pytest.raises(LakehouseError, match="event_id"):
        to_arrow(EVENTS, rows)


def test_nanosecond_pandas_timestamps_are_accepted():
    rows = pa.table(
        {
            "event_id": ["e1"],
            "tenant": ["t"],
            "entity": ["x"],
            "data_type": ["metric"],
            "event_time": pa.array([T0], pa.timestamp("ns", tz="UTC")),
        }
    )
    assert to_arrow(EVENTS, rows)["event_time"].type == pa.timestamp("us", tz="UTC")


def test_first_row_of_each_key_wins_within_a_batch():
    rows = pa.table({"k": ["a", "b", "a", "c", "b"], "v": [1, 2, 3, 4, 5]})
    assert first_row_per_key(rows, ("k",)).to_pydict() == {"k": ["a", "b", "c"], "v": [1, 2, 4]}


def test_a_composite_key_keeps_one_row_per_tenant_and_id():
    rows = pa.table({"tenant": ["a", "b", "a", "c", "b"], "event_id": ["42"] * 4 + ["43"], "v": [1, 2, 3, 4, 5]})
    kept = first_row_per_key(rows, ("tenant", "event_id"))
    assert kept.to_pydict() == {"tenant": ["a", "b", "c", "b"], "event_id": ["42", "42", "42", "43"], "v": [1, 2, 4, 5]}


def test_held_keys_are_matched_on_every_key_column():
    rows = pa.table({"tenant": ["a", "b", "b"], "event_id": ["42", "42", "43"], "v": [1, 2, 3]})
    held = pa.table({"tenant": ["a", "c"], "event_id": ["42", "43"]})
    assert without_keys(rows, held, ("tenant", "event_id"))["v"].to_pylist() == [2, 3]


def test_tenant_partitioned_keyed_tables_are_keyed_per_tenant_and_the_schemas_say_so():
    keys = {name: table.keys for name, table in TABLES.items()}
    assert keys == {
        "events": ("tenant", "event_id"),
        "features": ("tenant", "feature_id"),
        "predictions": ("tenant", "event_id"),
        "feedback": ("tenant", "feedback_id"),
        "models": ("model_key",),
        "enrichments": ("tenant", "enrichment_id"),
        "audit": ("audit_id",),
        "erasures": ("subject_digest",),
    }
    for table in TABLES.values():
        assert table.schema.identifier_field_names() == set(table.keys), table.name
    assert "subject" not in TABLES["erasures"].schema.column_names  # a tombstone names nobody


def test_feature_ids_are_deterministic_and_filled_in():
    row = {
        "tenant": "acme",
        "entity": "pump-1",
        "window_start": T0,
        "window_end": T0 + timedelta(minutes=1),
        "feature_set_version": "fs1",
        "vector": [1.0, 2.0],
    }
    first = with_feature_ids([row])["feature_id"][0].as_py()
    assert first == with_feature_ids(pa.Table.from_pylist([row]))["feature_id"][0].as_py()
    assert first == feature_id("acme", "pump-1", T0 + timedelta(minutes=1), "fs1")
    assert first != feature_id("acme", "pump-1", T0 + timedelta(minutes=1), "fs2")


def test_replica_target_from_a_folder_or_a_uri(tmp_path):
    primary = LakehouseSettings(replicas=[{"name": "dr", "to": str(tmp_path / "dr")}])
    folder = replica_settings(primary, str(tmp_path / "dr"))
    assert folder.catalog_uri == f"sqlite:///{tmp_path / 'dr' / 'catalog.db'}"
    assert folder.replicas == []  # a replica has no replicas of its own
    rest = replica_settings(primary, "https://catalog.example/api", "s3://bucket/dr")
    assert (rest.catalog_type, rest.warehouse) == ("rest", "s3://bucket/dr")
    with pytest.raises(LakehouseError, match="--warehouse"):
        replica_settings(primary, "postgresql+psycopg2://u@h/db")
    # An erasure opens replicas without creating them: an unmounted backup is not an empty replica.
    with pytest.raises(LakehouseError, match="holds no lakehouse"):
        replica_settings(primary, str(tmp_path / "unmounted"), create=False)
    assert not (tmp_path / "unmounted").exists()
