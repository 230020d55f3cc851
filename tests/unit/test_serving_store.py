"""The serving store over a real lakehouse (embedded SQLite catalog, local warehouse); no Ray."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from pyiceberg.expressions import EqualTo

import pyarrow as pa

from deployments.records import new_batch_id, prediction_ids
from deployments.store import TIME_BOUND, LakehouseStore
from rtml.schemas import ScoreRequest, ScoreResult, micros, prediction_table
from rtml.settings import Settings

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def store(tmp_path):
    store = LakehouseStore(Settings(home=tmp_path, lakehouse={"writer_flush_seconds": 0.05}))
    yield store
    store.close()


def rows(tenant: str, event_ids: list[str], event_time: datetime, bound: bool):
    count = len(event_ids)
    request = ScoreRequest(tenant, np.zeros((count, 4), np.float32), event_ids=event_ids, event_times_us=np.full(count, micros(event_time)))
    ids = prediction_ids(new_batch_id(), 0, count)
    result = ScoreResult(ids, np.full(count, 0.25), np.zeros(count, bool), {"m@1": np.full(count, 0.25)}, {"m": "1"})
    return ids, prediction_table(request, result, event_time.timestamp()).append_column(TIME_BOUND, pa.array([bound] * count))


def write(store: LakehouseStore, table) -> None:
    for done in store.write_predictions(table):
        done.result(timeout=60)


def test_a_tenant_never_reads_another_tenants_prediction(store):
    (acme_id,), acme = rows("acme", ["e1"], T0, bound=True)
    write(store, acme)
    assert store.prediction("acme", acme_id) == ({"m@1": 0.25}, {})
    assert store.prediction("beta", acme_id) is None


def test_an_event_id_sent_without_a_time_is_one_row_whatever_its_arrival_time(store):
    # The router gives such a row its arrival time; a retry arrives at another one.
    write(store, rows("acme", ["retried"], T0, bound=False)[1])
    write(store, rows("acme", ["retried"], T0 + timedelta(hours=3), bound=False)[1])
    # Rows with the client's own times keep the time-bounded check, which finds a replay too.
    write(store, rows("acme", ["timed"], T0, bound=True)[1])
    write(store, rows("acme", ["timed"], T0, bound=True)[1])
    lake = store._lake
    assert lake.read("predictions", tenant="acme", where=EqualTo("event_id", "retried")).num_rows == 1
    assert lake.read("predictions", tenant="acme", where=EqualTo("event_id", "timed")).num_rows == 1
