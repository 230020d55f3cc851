"""The embedded event log (a real SQLite file under tmp_path): offsets stay contiguous when several
processes append at once, a series keeps its order, an append that returned survives a SIGKILL of
its process, retention moves a partition's start, and the consumer's source reads it all back
(binary frames' headers included) the way the DataRouter reads Kafka's records."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import threading
import time
from collections import defaultdict
from contextlib import closing
from pathlib import Path

import numpy as np
import orjson
import pytest

from rtml.errors import RtmlError
from rtml.settings import Settings
from streaming.eventlog import EventLogUnavailable, LogRecord, log_file, open_event_log_writer
from streaming.router import DataRouter, frame_headers
from streaming.sources.eventlog import EventLogSource, log_end_offsets
from streaming.sources.kafka import record_key

PROCESSES = 4
THREADS = 2
APPENDS = 15
PER_APPEND = 12
KEYS = [record_key("acme", f"pump-{k}") for k in range(7)]


def _settings(home: Path, **streaming) -> Settings:
    return Settings(home=home, streaming={"event_log_partitions": 4, **streaming})


def _read_all(settings: Settings, group: str = "test") -> list[tuple[int, int, bytes, dict | None]]:
    """Every record of the log: (partition, offset, value, headers), by one consumer owning all."""
    source = EventLogSource(settings, group, 0, 1)
    try:
        source.seek({})
        records = []
        while len(batch := source.poll(1000, 0.0)):
            records.extend(zip([int(source.partitions[p].split(":")[1]) for p in batch.partitions], batch.offsets.tolist(), batch.payloads, batch.headers))
        return records
    finally:
        source.close()


def _append_from_a_process(home: str, producer: int) -> None:
    """A producer process: THREADS threads share one writer, each appending APPENDS batches."""
    writer = open_event_log_writer(_settings(Path(home)))

    def appends(thread: int) -> None:
        for step in range(APPENDS):
            batch = [
                LogRecord(KEYS[(step + i) % len(KEYS)], orjson.dumps({"producer": producer, "thread": thread, "step": step, "i": i}))
                for i in range(PER_APPEND)
            ]
            writer.append("acme", batch)

    threads = [threading.Thread(target=appends, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close()


def test_offsets_are_contiguous_per_partition_and_series_keep_their_order_under_appends_from_several_processes(tmp_path):
    context = multiprocessing.get_context("spawn")
    producers = [context.Process(target=_append_from_a_process, args=(str(tmp_path), p)) for p in range(PROCESSES)]
    for process in producers:
        process.start()
    for process in producers:
        process.join(timeout=120)
        assert process.exitcode == 0

    settings = _settings(tmp_path)
    records = _read_all(settings)
    assert len(records) == PROCESSES * THREADS * APPENDS * PER_APPEND
    by_partition = defaultdict(list)
    for partition, offset, value, _ in records:
        by_partition[partition].append(offset)
    ends = log_end_offsets(settings)
    for partition, offsets in by_partition.items():
        assert offsets == list(range(len(offsets))), f"partition {partition}'s offsets have a gap or a repeat"
        assert ends[f"eventlog:{partition}"] == len(offsets)
    assert sum(ends.values()) == len(records)
    # A series: one partition, and every producer thread's records of it in the order it appended them.
    partition_of_key: dict[bytes, set[int]] = defaultdict(set)
    order: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
    documents = {(p, o): orjson.loads(v) for p, o, v, _ in records}
    for (partition, offset), doc in sorted(documents.items()):
        key = KEYS[(doc["step"] + doc["i"]) % len(KEYS)]
        partition_of_key[key].add(partition)
        order[(key, doc["producer"], doc["thread"])].append((doc["step"], doc["i"]))
    assert all(len(partitions) == 1 for partitions in partition_of_key.values())
    assert all(sequence == sorted(sequence) for sequence in order.values())
    assert len({(d["producer"], d["thread"], d["step"], d["i"]) for d in documents.values()}) == len(records)


def _append_then_wait_to_be_killed(home: str, appended) -> None:
    writer = open_event_log_writer(_settings(Path(home)))
    writer.append("acme", [LogRecord(KEYS[0], b'{"n": 1}'), LogRecord(KEYS[1], b'{"n": 2}')])
    appended.set()
    time.sleep(600)  # killed here, without closing anything


def test_an_append_that_returned_survives_a_sigkill_of_its_process(tmp_path):
    context = multiprocessing.get_context("spawn")
    appended = context.Event()
    process = context.Process(target=_append_then_wait_to_be_killed, args=(str(tmp_path), appended))
    process.start()
    assert appended.wait(timeout=60)
    os.kill(process.pid, signal.SIGKILL)
    process.join(timeout=30)
    assert process.exitcode == -signal.SIGKILL

    assert sorted(value for _, _, value, _ in _read_all(_settings(tmp_path))) == [b'{"n": 1}', b'{"n": 2}']


def test_the_source_seeks_polls_waits_and_reports_its_ends_and_starts(tmp_path):
    settings = _settings(tmp_path)
    writer = open_event_log_writer(settings)
    writer.append("acme", [LogRecord(KEYS[0], orjson.dumps({"n": n})) for n in range(10)])
    before = time.time()
    source = EventLogSource(settings, "group-a", 0, 1)
    owner = next(i for i, end in source.end_offsets().items() if end)  # the one partition of KEYS[0]
    assert source.end_offsets()[owner] == 10 and source.start_offsets()[owner] == 0

    source.seek({owner: 7})
    batch = source.poll(100, 0.0)
    assert batch.offsets.tolist() == [7, 8, 9]
    assert [orjson.loads(v)["n"] for v in batch.payloads] == [7, 8, 9]
    assert all(at >= before - 60 for at in batch.available_at)  # the log's wall-clock append time
    source.seek({})  # every partition not named starts at the log's beginning
    assert source.poll(4, 0.0).offsets.tolist() == [0, 1, 2, 3]
    assert source.poll(100, 0.0).offsets.tolist() == [4, 5, 6, 7, 8, 9]

    # A poll waits for what another writer appends meanwhile, rather than returning empty.
    later = threading.Timer(0.2, writer.append, args=("acme", [LogRecord(KEYS[0], b'{"n": 10}')]))
    later.start()
    assert source.poll(100, 30.0).offsets.tolist() == [10]
    later.join()
    assert len(source.poll(100, 0.05)) == 0

    # Group positions are kept in the log for a consumer that lost its checkpoints.
    source.commit({owner: 11})
    assert EventLogSource(settings, "group-a", 0, 1).committed() == {owner: 11}
    assert EventLogSource(settings, "group-b", 0, 1).committed() == {}
    writer.close()
    source.close()


def test_retention_deletes_a_prefix_and_moves_the_partitions_start(tmp_path):
    settings = _settings(tmp_path, event_log_retention_hours=0.5 / 3600)  # half a second
    old = open_event_log_writer(settings)
    old.append("acme", [LogRecord(KEYS[0], orjson.dumps({"n": n})) for n in range(5)])
    time.sleep(0.6)
    new = open_event_log_writer(settings)  # a writer applies the retention on its first append
    new.append("acme", [LogRecord(KEYS[0], orjson.dumps({"n": n})) for n in range(5, 8)])

    source = EventLogSource(settings, "group", 0, 1)
    owner = next(i for i, end in source.end_offsets().items() if end)
    assert source.start_offsets()[owner] == 5 and source.end_offsets()[owner] == 8
    source.seek({})
    assert source.poll(100, 0.0).offsets.tolist() == [5, 6, 7]
    for closing_one in (old, new, source):
        closing_one.close()


def test_binary_frames_keep_their_headers_and_the_router_decodes_them(tmp_path):
    settings = _settings(tmp_path)
    frame = (np.arange(16, dtype=np.uint8) * 10).reshape(4, 4)
    fields = {
        "event_id": "shot-1",
        "tenant": "acme",
        "entity": "camera-1",
        "data_type": "image",
        "event_time": "2025-03-01T00:00:00Z",
        "attributes": {"frame_shape": [4, 4], "frame_dtype": "uint8"},
    }
    writer = open_event_log_writer(settings)
    writer.append("acme", [LogRecord(record_key("acme", "camera-1"), frame.tobytes(), frame_headers(fields)), LogRecord(KEYS[0], b'{"plain": 1}')])
    writer.close()

    source = EventLogSource(settings, "group", 0, 1)
    source.seek({})
    batch = source.poll(100, 0.0)
    headers = {payload: header for payload, header in zip(batch.payloads, batch.headers)}
    assert headers[b'{"plain": 1}'] is None
    assert dict(headers[frame.tobytes()]) == dict(frame_headers(fields))
    routed = DataRouter({"metric": "stream", "image": "stream", "record": "batch"}, land_stream_events=True).route(batch, source.partitions)
    assert routed.frames.event_id.tolist() == ["shot-1"]
    np.testing.assert_allclose(routed.images[0], frame / np.float32(255))
    source.close()


def test_a_log_opened_with_other_partitions_is_refused(tmp_path):
    open_event_log_writer(_settings(tmp_path)).close()
    with pytest.raises(RtmlError, match="has 4 partitions, but streaming.event_log_partitions is 8"):
        open_event_log_writer(Settings(home=tmp_path, streaming={"event_log_partitions": 8}))


def test_an_append_that_cannot_get_the_write_lock_is_refused_and_leaves_nothing(tmp_path):
    settings = _settings(tmp_path, event_log_timeout_s=0.2)
    writer = open_event_log_writer(settings)
    with closing(sqlite3.connect(log_file(settings), isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")  # another writer holding the lock
        with pytest.raises(EventLogUnavailable, match="held its write lock for longer than 0.2 s.*retry later"):
            writer.append("acme", [LogRecord(KEYS[0], b"{}")])
        other.execute("ROLLBACK")
    assert _read_all(settings) == []
    writer.append("acme", [LogRecord(KEYS[0], b"{}")])
    assert [(offset, value) for _, offset, value, _ in _read_all(settings)] == [(0, b"{}")]
    writer.close()
