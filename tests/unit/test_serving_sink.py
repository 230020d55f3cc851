"""The prediction sink's write-ahead log on a real local directory, and the payload estimate that
decides when a call between deployments goes by reference; no Ray cluster."""

from __future__ import annotations

import os
import pickle
import time
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from deployments.calls import BY_VALUE_MAX_BYTES, payload_bytes
from deployments.records import new_batch_id, prediction_ids
from deployments.sink import STAGING_SUFFIX, STALE_STAGING_S, PredictionLog
from rtml.schemas import ScoreRequest, ScoreResult, micros


def rows(start: int, count: int) -> pa.Table:
    return pa.table({"event_id": [f"e{index}" for index in range(start, start + count)], "score": np.linspace(0, 1, count)})


def test_a_group_commit_is_one_complete_file_read_back_whole(tmp_path):
    log = PredictionLog(str(tmp_path / "log"))
    first = log.append(pa.concat_tables([rows(0, 3), rows(3, 2)]))
    second = log.append(rows(5, 1))
    assert log.names() == [first, second]  # oldest first
    assert log.read(first).to_pydict() == pa.concat_tables([rows(0, 3), rows(3, 2)]).to_pydict()
    assert not any(name.endswith(STAGING_SUFFIX) for name in os.listdir(tmp_path / "log"))

    log.remove(first)
    log.remove(first)  # another replica removed it first: nothing to do
    assert log.names() == [second]
    assert log.read(first) is None


def test_a_staging_file_left_by_a_dead_writer_is_never_replayed_and_goes_once_stale(tmp_path):
    log = PredictionLog(str(tmp_path))
    fresh, stale = tmp_path / f"1.arrow{STAGING_SUFFIX}", tmp_path / f"2.arrow{STAGING_SUFFIX}"
    fresh.write_bytes(b"torn")
    stale.write_bytes(b"torn")
    old = time.time() - STALE_STAGING_S - 60
    os.utime(stale, (old, old))
    assert log.names() == []
    assert fresh.exists() and not stale.exists()  # a live writer may still be renaming the fresh one


def test_the_payload_estimate_covers_a_request_and_its_result_as_pickled():
    count = 5000
    now = datetime.now(timezone.utc)
    request = ScoreRequest(
        tenant="acme",
        windows=np.random.default_rng(0).normal(size=(count, 32)).astype(np.float32),
        entities=[f"pump-{index % 7}" for index in range(count)],
        event_ids=[f"event-{index:08d}" for index in range(count)],
        event_times_us=np.full(count, micros(now)),
        subjects=[None] * count,
    )
    result = ScoreResult(
        prediction_ids=prediction_ids(new_batch_id(), 0, count),
        ensemble_scores=np.zeros(count, np.float32),
        is_anomaly=np.zeros(count, bool),
        scores={f"model-{index}@1": np.zeros(count, np.float32) for index in range(4)},
        model_versions={f"model-{index}": "1" for index in range(4)},
    )
    actual = len(pickle.dumps([request])) + len(pickle.dumps([result]))
    estimate = payload_bytes([request])
    assert actual <= estimate < 2 * actual
    assert payload_bytes([request] * 8) > BY_VALUE_MAX_BYTES  # a merged batch of them goes by reference
