"""The DataRouter: validation column by column, routing per data type, binary frames, dead letters;
the replay source's partitions, positions and pacing; checkpoints and dead-letter files."""

from __future__ import annotations

import json
import time

import numpy as np
import orjson
import pyarrow as pa
import pytest

from rtml.errors import RtmlError
from streaming.checkpoints import Checkpoint, CheckpointStore
from streaming.deadletters import DeadLetter, FileDeadLetters
from streaming.router import FRAME_CONTENT_TYPE, DataRouter
from streaming.sources.base import SourceBatch
from streaming.sources.replay import ReplaySource, partition_of

ROUTES = {"metric": "stream", "image": "stream", "record": "batch"}


def _batch(payloads, headers=None) -> SourceBatch:
    n = len(payloads)
    return SourceBatch(list(payloads), np.zeros(n, np.int32), np.arange(n, dtype=np.int64), np.full(n, 100.0), headers or [])


def _event(**fields):
    return {"tenant": "acme", "entity": "pump-1", "event_time": "2024-06-01T00:00:00Z", "value": 1.0, **fields}


def test_bad_records_become_dead_letters_with_reasons_and_the_rest_go_on():
    payloads = [
        orjson.dumps(_event(event_id="good-1")),
        b"{not json",
        orjson.dumps([1, 2]),
        orjson.dumps(_event(tenant="bad tenant")),
        orjson.dumps(_event(entity="")),
        orjson.dumps(_event(event_time="yesterday")),
        orjson.dumps(_event(value="n/a")),
        orjson.dumps(_event(value=None)),
        orjson.dumps(_event(colour="red")),
        orjson.dumps(_event(data_type="video")),
        orjson.dumps(_event(attributes=[1])),
        orjson.dumps(_event(data_type="image", value=None)),
        _event(event_id="good-2", value=2.5, event_time=1717200000.5),  # an already decoded record, epoch seconds
        orjson.dumps(_event(value=True)),  # a JSON boolean is not a measurement
    ]
    routed = DataRouter(ROUTES, land_stream_events=True).route(_batch(payloads), ["log:0"])

    assert routed.metrics.event_id.tolist() == ["good-1", "good-2"]
    assert routed.metrics.value.tolist() == [1.0, 2.5]
    assert routed.metrics.event_time_us.tolist() == [1717200000000000, 1717200000500000]
    reasons = dict(zip(routed.dead.offset.tolist(), routed.dead.reason))
    assert sorted(reasons) == [*range(1, 12), 13]
    for offset, expected in {
        1: "not valid JSON",
        2: "JSON list",
        3: "tenant",
        4: "entity",
        5: "event_time",
        6: "value: Input should be a valid number",
        7: "needs a value",
        8: "unknown field",
        9: "data_type",
        10: "attributes",
        11: "binary frames",
        13: "value: Input should be a valid number",
    }.items():
        assert expected in reasons[offset]
    assert routed.dead.payload[0] == b"{not json"


def test_routes_decide_the_path_and_records_without_ids_get_stable_ones():
    payloads = [_event(), _event(data_type="record", value=None, attributes={"note": "x"}), _event(entity="pump-2")]
    batch = _batch(payloads)
    stream_only = DataRouter(ROUTES, land_stream_events=False).route(batch, ["log:3"])
    assert stream_only.metrics.event_id.tolist() == ["log:3@0", "log:3@2"]
    assert stream_only.landed.data_type.tolist() == ["record"]
    assert json.loads(stream_only.landed.attributes[0]) == {"note": "x"}
    everything = DataRouter(ROUTES, land_stream_events=True).route(batch, ["log:3"])
    assert everything.landed.event_id.tolist() == ["log:3@0", "log:3@1", "log:3@2"]
    table = everything.landed.events_table()
    assert table.column("value").to_pylist() == [1.0, None, 1.0]
    metrics_as_batch = DataRouter({**ROUTES, "metric": "batch"}, land_stream_events=False).route(batch, ["log:3"])
    assert len(metrics_as_batch.metrics) == 0 and len(metrics_as_batch.landed) == 3
    with pytest.raises(RtmlError, match="record"):
        DataRouter({**ROUTES, "record": "stream"}, land_stream_events=False)


def test_binary_frames_are_decoded_for_the_image_model():
    frame = np.arange(12, dtype=np.uint8).reshape(3, 4)
    header = orjson.dumps(_event(data_type="image", value=None, attributes={"frame_shape": [3, 4]}))
    wrong = orjson.dumps(_event(data_type="image", value=None, attributes={"frame_shape": [5, 5]}))
    headers = [{"content-type": FRAME_CONTENT_TYPE, "rtml-event": h} for h in (header, wrong)] + [{"content-type": FRAME_CONTENT_TYPE}]
    routed = DataRouter(ROUTES, land_stream_events=True).route(_batch([frame.tobytes()] * 3, headers), ["log:0"])
    assert len(routed.frames) == 1
    np.testing.assert_allclose(routed.images[0], frame / 255.0)
    assert routed.landed.payload[0] == frame.tobytes()
    assert routed.dead.offset.tolist() == [1, 2]
    assert "not 5 x 5" in routed.dead.reason[0]
    assert "rtml-event" in routed.dead.reason[1]


def test_replay_partitions_positions_and_pace(tmp_path):
    path = tmp_path / "events.jsonl"
    lines = [orjson.dumps(_event(entity=f"e{i % 5}", event_time=1000.0 + i, value=float(i))) for i in range(50)]
    path.write_bytes(b"\n".join(lines[:20] + [b"garbage"] + lines[20:]) + b"\n")
    both = [ReplaySource(path, 3, [p], speed=0) for p in range(3)]
    batches = [source.poll(1000, 0.01) for source in both]
    assert sum(len(b) for b in batches) == 51
    for p, batch in enumerate(batches):
        entities = {payload["entity"] for payload in batch.payloads if isinstance(payload, dict)}
        assert all(partition_of(f"acme/{e}", 3) == p for e in entities)
        assert batch.offsets.tolist() == list(range(len(batch)))
    source = both[0]
    source.seek({0: 4})
    assert source.poll(1000, 0.01).offsets[0] == 4
    # 10 seconds of event time at speed 20: half a second of wall time.
    paced = ReplaySource(path, 1, [0], speed=20)
    paced.start_clock(time.time())
    first = paced.poll(1000, 0.01)
    assert 0 < len(first) < 51
    assert (first.available_at <= time.time()).all()


def test_checkpoints_round_trip_and_refuse_other_definitions(tmp_path):
    store = CheckpointStore(tmp_path, "group/a", fingerprint="v1")
    keys, windows = pa.table({"key": ["acme/p1"]}), pa.table({"k": [3]})
    assert store.load("rtml.events:0") is None
    store.save("rtml.events:0", Checkpoint(42, keys, windows))
    store.save("rtml.events:0", Checkpoint(43, keys, windows))
    loaded = store.load("rtml.events:0")
    assert loaded.offset == 43 and loaded.keys.equals(keys) and loaded.windows.equals(windows)
    with pytest.raises(RtmlError, match="other window or feature settings"):
        CheckpointStore(tmp_path, "group/a", fingerprint="v2").load("rtml.events:0")


def test_dead_letter_files_take_each_offset_once(tmp_path):
    letters = [DeadLetter("log:0", 3, b"{bad", "not valid JSON"), DeadLetter("log:0", 7, b"\xff\x00", "binary junk")]
    FileDeadLetters(tmp_path).write(letters)
    FileDeadLetters(tmp_path).write([*letters, DeadLetter("log:0", 9, b"x", "late")])  # a replay after a restart
    stored = FileDeadLetters(tmp_path).read()
    assert [(s["offset"], s["reason"]) for s in stored] == [(3, "not valid JSON"), (7, "binary junk"), (9, "late")]
    assert stored[1]["payload_encoding"] == "base64"
