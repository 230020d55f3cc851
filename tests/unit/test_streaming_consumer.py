"""One StreamConsumer over a small replay file, in this process, with a deterministic scoring
client and a small in-memory sink actor (idempotent by key, as the lakehouse is) on the session's
Ray cluster: the hand-over of batches whose scoring finishes out of order (in read order), and what the consumer
does when scoring or writes fail (retry what can pass later, for a bounded time; stop with a
clear error and a metric otherwise)."""

from __future__ import annotations

import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import orjson
import pytest
import ray

from observability import metrics
from rtml.errors import RtmlError
from rtml.settings import Settings
from streaming.arrow_ipc import from_ipc
from streaming.consumer import ConsumerSpec, StreamConsumer
from streaming.deadletters import FileDeadLetters
from rtml.schemas import Refusal, ScoreRequest, ScoreResult

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the sink actor's class lives here
# A consumer that retries forever would hang the session: fail instead, well after a correct run.
pytestmark = pytest.mark.timeout(180)

START = datetime(2025, 3, 1, tzinfo=timezone.utc)
NO_MODEL = "initech"  # a tenant the client refuses for good (404)


class DeterministicClient:
    """Scores a window by its mean; refuses tenant NO_MODEL. ``fail`` (an exception per call, or
    None) makes the first calls raise; ``hold_first`` keeps the first call waiting until set."""

    def __init__(self, fail: list[BaseException | None] | None = None, hold_first: threading.Event | None = None):
        self.calls = 0
        self.windows_scored = 0
        self._fail = list(fail or [])
        self._hold_first = hold_first
        self._lock = threading.Lock()

    def score(self, batches: list[ScoreRequest]) -> list[ScoreResult | Refusal]:
        with self._lock:
            self.calls += 1
            call = self.calls
        if call == 1 and self._hold_first is not None:
            assert self._hold_first.wait(60), "the test never released the first scoring call"
        if call <= len(self._fail) and self._fail[call - 1] is not None:
            raise self._fail[call - 1]
        answers = []
        for batch in batches:
            if batch.tenant == NO_MODEL:
                answers.append(Refusal(404, f"tenant {batch.tenant!r} has no active model"))
                continue
            with self._lock:
                self.windows_scored += len(batch)
            means = batch.windows.reshape(len(batch), -1).mean(axis=1)
            answers.append(ScoreResult([f"p-{i}" for i in batch.event_ids], means, means > 100, {"mean@1": means}, {"mean": "1"}))
        return answers


@ray.remote
class KeyedSink:
    """Keeps the first row of each key per table, as the lakehouse's idempotent appends do. The
    first ``len(failures)`` writes raise the given errors (None: that write succeeds); with
    ``always``, every write raises it."""

    KEYS = {"events": ("event_id",), "predictions": ("event_id",), "features": ("tenant", "entity", "window_start")}

    def __init__(self, failures: list[BaseException | None] | None = None, always: BaseException | None = None):
        self.rows: dict[str, dict[tuple, dict]] = {name: {} for name in self.KEYS}
        self.writes = 0
        self.prediction_writes: list[list[str]] = []  # the event ids of each write's predictions
        self._failures = list(failures or [])
        self._always = always

    def write(self, tables: dict[str, bytes]) -> dict[str, int]:
        self.writes += 1
        if self._always is not None:
            raise self._always
        if self.writes <= len(self._failures) and self._failures[self.writes - 1] is not None:
            raise self._failures[self.writes - 1]
        if "predictions" in tables:
            self.prediction_writes.append(from_ipc(tables["predictions"]).column("event_id").to_pylist())
        for name, data in tables.items():
            for row in from_ipc(data).to_pylist():
                self.rows[name].setdefault(tuple(row[k] for k in self.KEYS[name]), row)
        return {name: len(from_ipc(data)) for name, data in tables.items()}

    def keys(self, table: str) -> list[tuple]:
        return sorted(self.rows[table])

    def write_count(self) -> int:
        return self.writes

    def predictions_in_write_order(self) -> list[list[str]]:
        return self.prediction_writes


def _event(i: int, tenant: str = "acme") -> bytes:
    return orjson.dumps(
        {"event_id": f"e{i}", "tenant": tenant, "entity": "pump-0", "event_time": (START + timedelta(seconds=10 * i)).isoformat(), "value": float(i % 7)}
    )


def _consumer(tmp_path, records: list[bytes], client, sink, **streaming) -> StreamConsumer:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(records) + b"\n")
    settings = Settings(
        home=tmp_path / "home",
        models={"window_length": 4},
        streaming={
            "source": "replay",
            "consumers": 1,
            "replay_partitions": 1,
            "replay_speed": 0.0,
            "window_seconds": 60,
            "slide_seconds": 60,
            "allowed_lateness_seconds": 0,
            "dead_letter_dir": str(tmp_path / "dead"),
            **streaming,
        },
    )
    return StreamConsumer(ConsumerSpec(settings, f"test-{uuid.uuid4().hex[:8]}", 0, 1, str(path)), client, sink)


def _failures(group: str) -> dict[tuple[str, str], float]:
    """rtml_stream_consumer_failures_total of ``group``, by (stage, reason)."""
    found = {}
    for family in metrics.REGISTRY.collect():
        for sample in family.samples:
            if sample.name == "rtml_stream_consumer_failures_total" and sample.labels.get("group") == group:
                found[(sample.labels["stage"], sample.labels["reason"])] = sample.value
    return found


def test_a_batch_scored_first_is_handed_over_after_the_batch_read_before_it(ray_cluster, tmp_path):
    """Batch N's scoring is held until batch N+1 has been scored; N+1 must wait for N (the
    detector's scoring state takes batches in read order), and then each batch's rows and dead
    letters are stored once."""
    release = threading.Event()
    client = DeterministicClient(hold_first=release)
    sink = KeyedSink.remote()
    # Six records a poll: batch N holds offsets 0-5 (a malformed record at 2, an unscorable tenant's
    # event at 4), batch N+1 offsets 6-11 (a malformed record at 8).
    records = [_event(0), _event(1), b"{not json", _event(3), _event(4, NO_MODEL), _event(5)]
    records += [_event(6), _event(7), b"{nor this", _event(9), _event(10), _event(11)]
    consumer = _consumer(tmp_path, records, client, sink, max_poll_records=6, scoring_batches_in_flight=2)
    letters = FileDeadLetters(consumer.stats()["dead_letter_location"])
    outcome: list = []
    running = threading.Thread(target=lambda: outcome.append(consumer.run(until_end=True)))
    running.start()
    try:
        deadline = time.monotonic() + 60
        while client.calls < 2:
            assert time.monotonic() < deadline, "batch N+1 was never sent for scoring while batch N was being scored"
            time.sleep(0.02)
        time.sleep(0.5)  # time enough for a hand-over out of order to happen
        assert ray.get(sink.write_count.remote()) == 0 and not letters.read(), "batch N+1 was handed over before batch N"
    finally:
        release.set()
        running.join(60)

    assert outcome, "the run did not end"
    stored = sorted(letter["offset"] for letter in FileDeadLetters(letters.directory).read())
    assert stored == [2, 4, 8]
    assert outcome[0]["dead_letters"] == 3
    assert ray.get(sink.predictions_in_write_order.remote())[:2] == [["e0", "e1", "e3", "e5"], ["e6", "e7", "e9", "e10", "e11"]]
    assert ray.get(sink.keys.remote("predictions")) == sorted((f"e{i}",) for i in (0, 1, 3, 5, 6, 7, 9, 10, 11))


def test_a_write_that_always_fails_for_good_stops_the_consumer_with_a_clear_error(ray_cluster, tmp_path):
    client = DeterministicClient()
    sink = KeyedSink.remote(always=ValueError("column 'value' does not fit the table's schema"))
    records = [_event(i) for i in range(40)]
    consumer = _consumer(tmp_path, records, client, sink, max_poll_records=10, give_up_after_s=600)

    with pytest.raises(RtmlError) as raised:
        consumer.run(until_end=True)

    message = str(raised.value)
    assert "lakehouse write" in message and "ValueError" in message and "does not fit" in message
    assert "checkpoint" in message  # what happens next: it resumes from them once fixed
    batches = len(records) // 10 + 1  # and the final one, of the windows the replay's end closes
    assert ray.get(sink.write_count.remote()) <= batches, "a batch was written again after a failure that cannot pass"
    assert client.windows_scored <= len(records), "a batch was scored again after a failure that cannot pass"
    assert _failures(consumer.spec.group) == {("write", "permanent"): 1.0}


def test_a_write_that_keeps_failing_for_now_stops_the_consumer_after_give_up_after_s(ray_cluster, tmp_path):
    client = DeterministicClient()
    sink = KeyedSink.remote(always=ConnectionError("catalog at 127.0.0.1:5432 refused the connection"))
    consumer = _consumer(tmp_path, [_event(i) for i in range(20)], client, sink, max_poll_records=10, give_up_after_s=1.0)

    with pytest.raises(RtmlError) as raised:
        consumer.run(until_end=True)

    message = str(raised.value)
    assert "ConnectionError" in message and "refused the connection" in message
    assert "since" in message and "give_up_after_s" in message
    failures = _failures(consumer.spec.group)
    assert failures[("write", "gave_up")] == 1.0
    assert failures[("write", "retried")] >= 1


def test_a_bug_in_the_scoring_client_is_not_retried(ray_cluster, tmp_path):
    client = DeterministicClient(fail=[TypeError("score() got an unexpected keyword argument 'tenant'")])
    sink = KeyedSink.remote()
    # One batch, so that exactly one scoring call is made unless it is retried.
    consumer = _consumer(tmp_path, [_event(i) for i in range(10)], client, sink, max_poll_records=100, give_up_after_s=30)

    with pytest.raises(RtmlError) as raised:
        consumer.run(until_end=True)

    assert client.calls == 1
    assert "scoring" in str(raised.value) and "TypeError" in str(raised.value)
    assert _failures(consumer.spec.group) == {("scoring", "permanent"): 1.0}
    assert ray.get(sink.keys.remote("predictions")) == []


def test_failures_that_pass_leave_every_row_once(ray_cluster, tmp_path):
    """The model service times out once, the lakehouse refuses two writes for now: the consumer
    retries the scoring and rewinds to its checkpoints for the writes, and every event ends up
    with its rows."""
    client = DeterministicClient(fail=[None, TimeoutError("the ModelRouter did not answer within 30s")])
    sink = KeyedSink.remote(failures=[None, ConnectionError("catalog away"), ConnectionError("catalog still away")])
    count = 60
    consumer = _consumer(tmp_path, [_event(i) for i in range(count)], client, sink, max_poll_records=10, give_up_after_s=60)

    stats = consumer.run(until_end=True)

    expected = sorted((f"e{i}",) for i in range(count))
    assert ray.get(sink.keys.remote("predictions")) == expected
    assert ray.get(sink.keys.remote("events")) == expected
    windows = ray.get(sink.keys.remote("features"))
    assert len(windows) == len({(10 * i) // 60 for i in range(count)})  # every minute of the series, once
    assert stats["restarts_from_checkpoint"] >= 1
    failures = _failures(consumer.spec.group)
    assert failures[("write", "retried")] >= 1 and failures[("scoring", "retried")] >= 1
    assert ("write", "gave_up") not in failures and ("scoring", "permanent") not in failures
