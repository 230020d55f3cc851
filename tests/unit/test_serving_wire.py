"""The HTTP formats of POST /v1/predict: every accepted form and a clear 4xx for each bad one."""

from __future__ import annotations

import io
from datetime import datetime, timezone

import numpy as np
import orjson
import pyarrow as pa
import pytest

from deployments.wire import ARROW_STREAM, JSON, NPY, encode_result, parse_predict
from rtml.schemas import Refusal, ScoreResult, micros

WINDOW = [float(i) for i in range(8)]


def parse_json(document, query=None, max_windows=100):
    return parse_predict(orjson.dumps(document), JSON, query or {}, max_windows)


def refusal(call) -> tuple[int, str]:
    with pytest.raises(Refusal) as caught:
        call()
    return caught.value.status, caught.value.reason


def test_one_json_window_with_its_metadata():
    request, shape = parse_json(
        {"tenant": "acme", "window": WINDOW, "entity": "pump-1", "event_id": "e1", "event_time": "2026-03-01T12:00:00+01:00"}
    )
    assert shape == "single"
    assert request.tenant == "acme" and request.data_type == "metric"
    assert request.windows.dtype == np.float32 and request.windows.shape == (1, 8)
    assert request.entities == ["pump-1"] and request.event_ids == ["e1"]
    assert request.event_times_us.tolist() == [micros(datetime(2026, 3, 1, 11, 0, tzinfo=timezone.utc))]


def test_a_json_batch_with_one_entity_for_all():
    request, shape = parse_json({"tenant": "acme", "windows": [WINDOW, WINDOW[::-1]], "entity": "pump-1"})
    assert shape == "rows" and request.windows.shape == (2, 8) and request.entities == ["pump-1", "pump-1"]


def test_tenant_may_come_from_the_query():
    request, _ = parse_json({"window": WINDOW}, query={"tenant": "acme"})
    assert request.tenant == "acme"


@pytest.mark.parametrize(
    ("document", "status", "words"),
    [
        ({"window": WINDOW}, 400, "'tenant'"),
        ({"tenant": "a b", "window": WINDOW}, 400, "'tenant'"),
        ({"tenant": "acme"}, 400, "either 'window'"),
        ({"tenant": "acme", "window": WINDOW, "windows": [WINDOW]}, 400, "either 'window'"),
        ({"tenant": "acme", "windows": [WINDOW, WINDOW[:3]]}, 400, "equally long"),
        ({"tenant": "acme", "windows": [["a", "b"]]}, 400, "numbers"),
        ({"tenant": "acme", "windows": [WINDOW], "colour": "red"}, 400, "unknown field"),
        ({"tenant": "acme", "windows": [WINDOW], "entities": ["a", "b"]}, 400, "'entities'"),
        ({"tenant": "acme", "window": WINDOW, "event_time": "yesterday"}, 400, "ISO 8601"),
        ({"tenant": "acme", "window": WINDOW, "data_type": "record"}, 400, "'data_type'"),
        ({"tenant": "acme", "windows": []}, 400, "equally long lists|hold windows"),
        ({"tenant": "acme", "windows": [WINDOW] * 101}, 413, "limit is 100"),
    ],
)
def test_bad_json_requests_are_refused_with_a_reason(document, status, words):
    got_status, reason = refusal(lambda: parse_json(document))
    assert got_status == status
    assert any(word in reason for word in words.split("|"))


def test_nan_is_refused():
    body = b'{"tenant": "acme", "window": [1.0, NaN]}'
    status, _ = refusal(lambda: parse_predict(body, JSON, {}, 10))
    assert status == 400
    status, reason = refusal(lambda: parse_predict(_npy(np.array([[1.0, np.nan]])), NPY, {"tenant": "acme"}, 10))
    assert status == 400 and "NaN" in reason


def test_not_json_and_unknown_media_types_are_refused():
    assert refusal(lambda: parse_predict(b"{nope", JSON, {}, 10))[0] == 400
    assert refusal(lambda: parse_predict(b"[1, 2]", JSON, {}, 10))[0] == 400
    assert refusal(lambda: parse_predict(b"x", "text/csv", {}, 10))[0] == 415


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_npy_batches():
    windows = np.random.default_rng(0).normal(size=(5, 8))
    request, shape = parse_predict(_npy(windows), NPY, {"tenant": "acme", "entity": "pump-2"}, 10)
    assert shape == "columns"
    np.testing.assert_allclose(request.windows, windows.astype(np.float32))
    assert request.entities == ["pump-2"] * 5
    assert refusal(lambda: parse_predict(b"not npy", NPY, {"tenant": "acme"}, 10))[0] == 400
    assert refusal(lambda: parse_predict(_npy(np.array(["a", "b"])), NPY, {"tenant": "acme"}, 10))[0] == 400
    assert refusal(lambda: parse_predict(_npy(windows), NPY, {}, 10))[0] == 400


def _arrow(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def test_arrow_batches_with_per_row_metadata():
    table = pa.table(
        {
            "window": pa.array([WINDOW, WINDOW], pa.list_(pa.float32())),
            "entity": ["a", "b"],
            "event_id": ["e1", "e2"],
            "event_time": pa.array([datetime(2026, 3, 1, tzinfo=timezone.utc)] * 2, pa.timestamp("us", tz="UTC")),
        }
    )
    request, shape = parse_predict(_arrow(table), ARROW_STREAM, {"tenant": "acme"}, 10)
    assert shape == "columns" and request.windows.shape == (2, 8)
    assert request.entities == ["a", "b"] and request.event_ids == ["e1", "e2"]
    assert request.event_times_us[0] == micros(datetime(2026, 3, 1, tzinfo=timezone.utc))
    ragged = pa.table({"window": pa.array([WINDOW, WINDOW[:2]], pa.list_(pa.float64()))})
    assert refusal(lambda: parse_predict(_arrow(ragged), ARROW_STREAM, {"tenant": "acme"}, 10))[0] == 400
    missing = pa.table({"values": [1.0]})
    assert "'window' column" in refusal(lambda: parse_predict(_arrow(missing), ARROW_STREAM, {"tenant": "acme"}, 10))[1]


def test_every_response_shape_carries_scores_versions_and_ids():
    request, _ = parse_json({"tenant": "acme", "windows": [WINDOW, WINDOW]})
    result = ScoreResult(
        prediction_ids=["p0", "p1"],
        ensemble_scores=np.array([0.2, 0.8], np.float32),
        is_anomaly=np.array([False, True]),
        scores={"acme-rnn@1": np.array([0.1, 0.9], np.float32), "acme-cnn@2": np.array([0.3, 0.7], np.float32)},
        model_versions={"acme-rnn": "1", "acme-cnn": "2"},
        weights={"acme-rnn@1": 1.0, "acme-cnn@2": 1.0},
    )
    single = orjson.loads(encode_result(request, result, "single"))
    assert single["prediction_id"] == "p0" and single["is_anomaly"] is False
    assert single["scores"] == pytest.approx({"acme-rnn@1": 0.1, "acme-cnn@2": 0.3})
    assert single["model_versions"] == {"acme-rnn": "1", "acme-cnn": "2"}
    rows = orjson.loads(encode_result(request, result, "rows"))
    assert [p["prediction_id"] for p in rows["predictions"]] == ["p0", "p1"]
    assert rows["predictions"][1]["ensemble_score"] == pytest.approx(0.8)
    columns = orjson.loads(encode_result(request, result, "columns"))
    assert columns["is_anomaly"] == [False, True]
    assert columns["scores"]["acme-cnn@2"] == pytest.approx([0.3, 0.7])
