"""CSV replays: CSV has no numbers, so the replay source reads the value column as one before the
kernel's validation, which refuses text where a number belongs."""

from __future__ import annotations

import numpy as np

from streaming.router import DataRouter
from streaming.sources.replay import ReplaySource, read_records


def test_csv_values_are_numbers_and_unreadable_ones_become_dead_letters(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text(
        "event_id,tenant,entity,event_time,value\n"
        "e1,acme,pump-1,2024-06-01T00:00:00Z,2.5\n"
        "e2,acme,pump-1,2024-06-01T00:00:10Z,n/a\n"
        "e3,acme,pump-1,1717200020,\n"
    )
    records = read_records(path)
    assert records[0]["value"] == 2.5 and records[1]["value"] == "n/a" and "value" not in records[2]

    batch = ReplaySource(path, 1, [0], speed=0).poll(100, 0.01)
    routed = DataRouter({"metric": "stream", "image": "stream", "record": "batch"}, True).route(batch, ["events.csv:0"])
    assert routed.metrics.event_id.tolist() == ["e1"]
    assert routed.metrics.value.tolist() == [2.5]
    reasons = dict(zip(routed.dead.offset.tolist(), routed.dead.reason))
    assert reasons[1] == "value: Input should be a valid number"
    assert reasons[2] == "a metric event needs a value"
    assert np.all(routed.metrics.event_time_us == [1717200000000000])
