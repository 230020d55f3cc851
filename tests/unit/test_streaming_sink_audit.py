"""The stream sink's audit entries: one per tenant and batch, kept once however often the batch is written."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pyarrow as pa

from lakehouse import Lakehouse
from rtml.settings import Settings
from streaming.sink import _audit_entries

START = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _predictions(tenants: list[str], prediction_prefix: str) -> pa.Table:
    return pa.table(
        {
            "tenant": tenants,
            "event_id": [f"e{i}" for i in range(len(tenants))],
            "prediction_id": [f"{prediction_prefix}{i}" for i in range(len(tenants))],
            "event_time": pa.array([START + timedelta(seconds=i) for i in range(len(tenants))], pa.timestamp("us", tz="UTC")),
        }
    )


def test_a_batch_is_audited_per_tenant_and_a_replay_is_recorded_once(tmp_path):
    batch = _predictions(["acme", "acme", "globex"], "p")
    entries = _audit_entries(batch)
    assert [(json.loads(entry["details"])["tenant"], entry["row_count"]) for entry in entries] == [("acme", 2), ("globex", 1)]
    assert json.loads(entries[0]["details"])["rows"] == ["p0", "p1"]
    assert entries[0]["at"] == START + timedelta(seconds=1)  # the batch's newest event time: the same on a replay

    lake = Lakehouse.open(Settings(home=tmp_path))
    with lake.writer("audit") as writer:
        writer.submit(entries).result()
        # re-scored after a failed write: new prediction ids, the same events
        writer.submit(_audit_entries(_predictions(["acme", "acme", "globex"], "q"))).result()
        writer.submit(_audit_entries(_predictions(["acme"], "r"))).result()  # another batch of acme's
    assert lake.read("audit").num_rows == 3
