"""One stream consumer: the loop a Ray actor runs over the partitions it owns.

    poll -> route (DataRouter) -> windows and features (WindowState) -> score (EnsembleClient)
         -> hand rows to the LakehouseSink -> once durable: checkpoint, commit offsets

Neither scores nor lakehouse writes are waited for: while up to ``streaming.scoring_batches_in_flight``
batches are being scored and up to ``streaming.max_in_flight_events`` events wait for their scores or
for durability, the consumer reads on; beyond either limit it stops reading until the oldest work is
done (back-pressure: a slow lakehouse or model slows the consumer, nothing piles up). So a batch
never waits for the previous batch's scores, and while the models are busy the next batch grows
with the events that arrive meanwhile (the batch size follows the offered rate). Windows are
computed in arrival order before a batch is sent; batches become durable in order, and only then
are their partitions checkpointed.

Failure: the actor is restarted by Ray (``max_restarts``) and its ``run`` resubmitted
(``max_task_retries``); the new process loads the checkpoints and re-reads from them. A lakehouse
write that fails makes the running consumer rewind to its checkpoints the same way.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import ray
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_random_exponential

from observability import metrics
from rtml.errors import RtmlError
from rtml.settings import Settings
from streaming.arrow_ipc import to_ipc
from streaming.checkpoints import Checkpoint, CheckpointStore
from streaming.deadletters import DeadLetter, DeadLetterSink, FileDeadLetters, KafkaDeadLetters
from streaming.features import feature_rows, feature_set_version, window_spec
from streaming.router import DataRouter, EventColumns, RoutedBatch
from streaming.scoring import EnsembleClient, Refusal, ScoredWindows, WindowBatch, prediction_table
from streaming.sources.base import Source
from streaming.windowing import DROPPED, LATE, WindowState

log = logging.getLogger(__name__)
LAG_REFRESH_S = 1.0
EXPORTED_OUTCOMES = ("scored", "late", "dropped", "unscored", "landed")
LATENCY_SAMPLES = 200_000


@dataclass(frozen=True)
class ConsumerSpec:
    """Everything a consumer needs to (re)build itself; Ray keeps it for restarts."""

    settings: Settings
    group: str  # names the checkpoints and the metrics; the Kafka consumer group for Kafka sources
    index: int
    consumers: int
    replay_path: str = ""  # replay sources: the file


def open_source(spec: ConsumerSpec) -> Source:
    streaming = spec.settings.streaming
    if streaming.source == "kafka":
        from streaming.sources.kafka import KafkaSource

        kafka = spec.settings.kafka.model_copy(update={"consumer_group": spec.group})
        return KafkaSource(kafka, spec.index, spec.consumers, streaming.max_poll_records)
    from streaming.sources.replay import ReplaySource

    owned = list(range(spec.index, streaming.replay_partitions, spec.consumers))
    return ReplaySource(spec.replay_path, streaming.replay_partitions, owned, streaming.replay_speed)


def storage_dir(configured: str, settings: Settings, name: str) -> str:
    return configured or str(settings.home_dir / "streaming" / name)


def open_dead_letters(spec: ConsumerSpec) -> DeadLetterSink:
    settings = spec.settings
    if settings.streaming.source == "kafka":
        kafka = settings.kafka
        return KafkaDeadLetters(kafka.bootstrap_servers, kafka.dead_letter_topic, kafka.broker_timeout_s)
    return FileDeadLetters(Path(storage_dir(settings.streaming.dead_letter_dir, settings, "dead-letters")) / spec.group)


@dataclass
class _Scores:
    predictions: list[pa.Table]  # rows of the scored requests
    refused: list[DeadLetter]  # events of the requests refused for good
    seconds: float  # the round trip


@dataclass
class _Pending:
    """A batch being scored, then written by the sink."""

    scoring: Future  # -> _Scores
    tables: dict[str, pa.Table]  # its rows that need no scores (events, features)
    letters: list[DeadLetter]  # its records that the DataRouter refused
    records: int  # read from the source
    positions: dict[int, int]  # read positions of the touched partitions after this batch
    state: dict[int, tuple[pa.Table, pa.Table]]  # their window state after this batch
    available_at: np.ndarray  # of the events it scored
    write: ray.ObjectRef | None = None  # once handed to the sink


@dataclass
class Counts:
    read: int = 0
    batches: int = 0  # polls that returned records
    scored: int = 0
    late: int = 0
    dropped: int = 0
    dead_letters: int = 0
    unscored: int = 0
    landed: int = 0
    feature_windows: int = 0
    restarts_from_checkpoint: int = 0
    durable_latency_s: deque = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    # The two parts of event-to-prediction latency: from available to read (waiting in the log and
    # in the consumer's loop), per event; and the scoring round trip, per request.
    read_delay_s: deque = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    scoring_round_trip_s: deque = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    # Where the loop's time went: waiting for scores or writes (settle), polling, routing and
    # windowing, handing rows to the sink; and the scoring round trips (score, which overlap the rest).
    seconds: dict = field(default_factory=dict)


class StreamConsumer:
    """Run as a Ray actor with ``max_concurrency > 1``: ``run`` occupies one thread, ``stats``,
    ``progress`` and ``finish_at`` answer from the others."""

    def __init__(self, spec: ConsumerSpec, client: EnsembleClient, sink: ray.actor.ActorHandle):
        settings = spec.settings
        self.spec = spec
        self._streaming = settings.streaming
        self._client = client
        self._sink = sink
        self._window_spec = window_spec(settings)
        self._feature_set = feature_set_version(self._window_spec)
        self._router = DataRouter(self._streaming.routes, self._streaming.land_stream_events)
        self._checkpoints = CheckpointStore(
            storage_dir(self._streaming.checkpoint_dir, settings, "checkpoints"),
            spec.group,
            f"{self._feature_set}:history={self._window_spec.history}",
        )
        self._dead_letters = open_dead_letters(spec)
        self._source = open_source(spec)
        self._scoring = ThreadPoolExecutor(self._streaming.scoring_batches_in_flight, thread_name_prefix="scoring")
        self._targets: dict[int, int] | None = None
        self._counts = Counts()
        self._lag_checked = 0.0
        self._ends: dict[int, int] = {}
        self._labels = {"group": spec.group}
        if self._streaming.metrics_port:
            metrics.serve(self._streaming.metrics_port + spec.index)
        self._restore()

    # the loop ------------------------------------------------------------------------------------

    def run(self, until_end: bool = False, clock_start: float | None = None) -> dict:
        """Consume until the targets given to ``finish_at`` are reached, or (with
        ``until_end``) until the partitions' current ends are; then flush the open windows, wait
        for every write and checkpoint. ``clock_start`` starts a replay's clock. Returns ``stats()``."""
        if clock_start is not None:
            self._source.start_clock(clock_start)
        ends = self._source.end_offsets() if until_end else None
        while True:
            try:
                with self._timed("settle"):
                    self._wait_for_room()
                    self._settle()
                if self._reached(self._targets or ends):
                    self._finish()
                    break
                with self._timed("poll"):
                    batch = self._source.poll(self._streaming.max_poll_records, self._streaming.poll_timeout_s)
                if len(batch):
                    self._process(batch)
            except _WriteFailed as failure:
                log.error("consumer %s: a lakehouse write failed (%s); rewinding to the checkpoints", self.spec.index, failure)
                time.sleep(1.0)
                self._restore()
        return self.stats()

    def finish_at(self, targets: Mapping[str, int]) -> None:
        """Finish once every owned partition named in ``targets`` (partition name -> offset) is read
        up to that offset."""
        position_of = {name: i for i, name in enumerate(self._source.partitions)}
        self._targets = {position_of[name]: offset for name, offset in targets.items() if name in position_of}

    def pid(self) -> int:
        return os.getpid()

    def progress(self) -> dict[str, tuple[int, int]]:
        """Per owned partition: (checkpointed position, log end as last seen)."""
        durable = dict(self._durable)
        return {name: (durable.get(i, 0), self._ends.get(i, 0)) for i, name in enumerate(self._source.partitions)}

    def metrics_text(self) -> bytes:
        return metrics.exposition()

    def stats(self) -> dict:
        counts = self._counts
        return {
            "index": self.spec.index,
            "partitions": list(self._source.partitions),
            "positions": {self._source.partitions[i]: p for i, p in dict(self._durable).items()},
            "read": counts.read,
            "batches": counts.batches,
            "scored": counts.scored,
            "late": counts.late,
            "dropped": counts.dropped,
            "dead_letters": counts.dead_letters,
            "unscored": counts.unscored,
            "landed": counts.landed,
            "feature_windows": counts.feature_windows,
            "restarts_from_checkpoint": counts.restarts_from_checkpoint,
            "seconds": {stage: round(spent, 3) for stage, spent in dict(counts.seconds).items()},
            "event_to_durable_s": _percentiles(counts.durable_latency_s),
            "read_delay_s": _percentiles(counts.read_delay_s),
            "scoring_round_trip_s": _percentiles(counts.scoring_round_trip_s),
            "dead_letter_location": self._dead_letters.location,
            "checkpoint_location": self._checkpoints.location,
        }

    # steps ---------------------------------------------------------------------------------------

    def _restore(self) -> None:
        """Window state and read positions from the checkpoints (nothing in flight survives)."""
        parts, positions = {}, {}
        for i, name in enumerate(self._source.partitions):
            checkpoint = self._checkpoints.load(name)
            if checkpoint is not None:
                parts[i] = (checkpoint.keys, checkpoint.windows)
                positions[i] = checkpoint.offset
        self._state = WindowState.from_arrow(self._window_spec, parts)
        self._source.seek(positions)
        self._durable = dict(positions)
        self._read = dict(positions)
        self._in_flight: deque[_Pending] = deque()
        self._in_flight_events = 0
        if positions:
            self._counts.restarts_from_checkpoint += 1

    def _reached(self, targets: Mapping[int, int] | None) -> bool:
        if targets is None:
            return False
        return all(self._read.get(i, 0) >= end for i, end in targets.items())

    def _process(self, batch) -> None:
        self._counts.read_delay_s.extend((time.time() - batch.available_at).tolist())
        with self._timed("window"):
            routed = self._router.route(batch, self._source.partitions)
            metric_events = routed.metrics
            windowed = self._state.process(
                metric_events.keys, metric_events.event_time_us, metric_events.value, metric_events.partition, metric_events.subject
            )
            scored_events = metric_events.take(windowed.accepted)
            requests = _window_batches(scored_events, windowed.model_windows, "metric") + _image_batches(routed)
            scoring = self._scoring.submit(self._score, requests) if requests else _done(_Scores([], [], 0.0))
            tables = {"events": routed.landed.events_table(), "features": feature_rows(windowed.closed, self._feature_set)}
            self._submit(scoring, tables, _dead_letters(routed, self._source.partitions), len(batch), batch.next_positions(), scored_events.available_at)
        self._count(
            read=len(batch),
            batches=1,
            late=int((windowed.status == LATE).sum()),
            dropped=int((windowed.status == DROPPED).sum()),
            landed=len(routed.landed),
            feature_windows=len(windowed.closed),
        )

    def _score(self, requests: list[tuple[WindowBatch, EventColumns]]) -> _Scores:
        """Prediction rows of the scored requests, and dead letters for those refused for good.
        Refusals that may pass later (5xx) and unreachable services are retried. Runs in a scoring
        thread."""
        started = time.perf_counter()
        answers: list[ScoredWindows | Refusal | None] = [None] * len(requests)
        retrying = Retrying(
            retry=retry_if_exception_type(Exception),
            stop=stop_after_delay(self.spec.settings.kafka.broker_timeout_s),
            wait=wait_random_exponential(multiplier=0.05, max=2.0),
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                waiting = [i for i, answer in enumerate(answers) if answer is None]
                if waiting:
                    for i, answer in zip(waiting, self._client.score([requests[i][0] for i in waiting])):
                        if isinstance(answer, ScoredWindows) or answer.permanent:
                            answers[i] = answer
                    if any(answer is None for answer in answers):
                        raise _ScoringUnavailable("some batches were refused for now; retrying")
        scored_at = time.time()
        tables, refused = [], []
        histogram = metrics.EVENT_TO_PREDICTION.labels(**self._labels)
        for (request, events), answer in zip(requests, answers):
            if isinstance(answer, ScoredWindows):
                tables.append(prediction_table(request, answer, scored_at))
                for latency in (scored_at - request.available_at).tolist():
                    histogram.observe(latency)
            else:
                refused.extend(_refused_letters(events, answer, self._source.partitions))
        return _Scores(tables, refused, time.perf_counter() - started)

    def _submit(
        self, scoring: Future, tables: dict[str, pa.Table], letters: list[DeadLetter], records: int, positions: dict[int, int], available_at: np.ndarray
    ) -> None:
        self._read.update(positions)
        state = {partition: self._state.to_arrow(partition) for partition in positions}
        self._in_flight.append(_Pending(scoring, tables, letters, records, positions, state, available_at))
        self._in_flight_events += records

    def _wait_for_room(self) -> None:
        """Back-pressure: return once another batch may be read and sent for scoring."""
        scoring = [pending.scoring for pending in self._in_flight if pending.write is None]
        if len(scoring) >= self._streaming.scoring_batches_in_flight:
            wait_for_futures(scoring, return_when=FIRST_COMPLETED)
        if self._in_flight_events >= self._streaming.max_in_flight_events:
            self._wait_for_oldest()

    def _wait_for_oldest(self) -> None:
        """Wait until the oldest batch's rows are durable (or its write has failed)."""
        head = self._in_flight[0]
        if head.write is None:
            wait_for_futures([head.scoring])
            self._hand_over(head)
        ray.wait([head.write], timeout=None)

    def _hand_over(self, pending: _Pending) -> None:
        """Send a scored batch's rows to the sink (and its dead letters to theirs)."""
        with self._timed("hand_over"):
            scores: _Scores = pending.scoring.result()  # scoring that kept failing raises here, ending the run
            letters = sorted(pending.letters + scores.refused, key=lambda letter: (letter.partition, letter.offset))
            if letters:
                self._dead_letters.write(letters)
            tables = {**pending.tables, "predictions": pa.concat_tables(scores.predictions) if scores.predictions else None}
            pending.write = self._sink.write.remote({name: to_ipc(rows) for name, rows in tables.items() if rows is not None})
        self._counts.seconds["score"] = self._counts.seconds.get("score", 0.0) + scores.seconds
        if scores.predictions or scores.refused:
            self._counts.scoring_round_trip_s.append(scores.seconds)
        self._count(scored=sum(table.num_rows for table in scores.predictions), unscored=len(scores.refused), dead_letters=len(letters))

    def _settle(self) -> None:
        """Hand over every scored batch, and checkpoint behind every batch whose rows are durable,
        oldest first."""
        for pending in self._in_flight:
            if pending.write is None and pending.scoring.done():
                self._hand_over(pending)
        settled: list[_Pending] = []
        while self._in_flight and self._in_flight[0].write is not None:
            head = self._in_flight[0]
            ready, _ = ray.wait([head.write], timeout=0)
            if not ready:
                break
            try:
                ray.get(head.write)
            except Exception as error:  # the sink's or the lakehouse's failure: nothing after it is durable either
                raise _WriteFailed(str(error)) from error
            settled.append(self._in_flight.popleft())
            self._in_flight_events -= settled[-1].records
        if settled:
            self._checkpoint(settled)
        self._export_lag()

    def _checkpoint(self, settled: list[_Pending]) -> None:
        now = time.time()
        latest: dict[int, tuple[int, tuple[pa.Table, pa.Table]]] = {}
        for pending in settled:
            for partition, position in pending.positions.items():
                latest[partition] = (position, pending.state[partition])
            self._counts.durable_latency_s.extend((now - pending.available_at).tolist())
        for partition, (position, (keys, windows)) in latest.items():
            self._checkpoints.save(self._source.partitions[partition], Checkpoint(position, keys, windows))
            self._durable[partition] = position
        try:
            self._source.commit({partition: position for partition, (position, _) in latest.items()})
        except Exception as error:  # the checkpoints hold the progress; the log catches up on the next commit
            log.warning("consumer %s: committing offsets to the log failed (%s); will retry", self.spec.index, error)

    def _finish(self) -> None:
        """Write the windows still open and wait for every write (the stream has ended)."""
        closed = self._state.flush()
        self._count(feature_windows=len(closed))
        touched = {i: self._read.get(i, 0) for i in range(len(self._source.partitions))}
        self._submit(_done(_Scores([], [], 0.0)), {"features": feature_rows(closed, self._feature_set)}, [], 0, touched, np.empty(0))
        while self._in_flight:
            self._wait_for_oldest()
            self._settle()
        self._export_lag(force=True)

    def _export_lag(self, force: bool = False) -> None:
        now = time.monotonic()
        if now - self._lag_checked < LAG_REFRESH_S and not force:
            return
        self._lag_checked = now
        try:
            ends = self._source.end_offsets()
        except Exception as error:  # the broker is away; the gauge keeps its last value
            log.info("consumer %s: cannot read end offsets for the lag metric: %s", self.spec.index, error)
            return
        self._ends = ends
        for partition, end in ends.items():
            lag = max(0, end - self._durable.get(partition, 0))
            metrics.CONSUMER_LAG.labels(partition=self._source.partitions[partition], **self._labels).set(lag)

    @contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        """Add the time spent in the block to ``stats()["seconds"][stage]``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = self._counts.seconds
            seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - started

    def _count(self, **amounts: int) -> None:
        """Add to this consumer's counts (``stats``) and to the exported metrics."""
        for name, amount in amounts.items():
            setattr(self._counts, name, getattr(self._counts, name) + amount)
            if name in EXPORTED_OUTCOMES:
                metrics.STREAM_EVENTS.labels(outcome=name, **self._labels).inc(amount)
        metrics.DEAD_LETTERS.labels(**self._labels).inc(amounts.get("dead_letters", 0))
        metrics.FEATURE_WINDOWS.labels(**self._labels).inc(amounts.get("feature_windows", 0))


class _ScoringUnavailable(RtmlError):
    pass


class _WriteFailed(RtmlError):
    pass


def _percentiles(samples: deque) -> dict[int, float]:
    """p50 and p99 of latency samples in seconds; empty without samples."""
    if not samples:
        return {}
    values = np.array(samples, dtype=np.float64)
    return {q: float(np.percentile(values, q)) for q in (50, 99)}


def _done(scores: _Scores) -> Future:
    """A scoring that needed no request."""
    done: Future = Future()
    done.set_result(scores)
    return done


def _window_batches(events: EventColumns, windows: np.ndarray, data_type: str) -> list[tuple[WindowBatch, EventColumns]]:
    """One request per tenant (in arrival order within each), with the events it is made of."""
    batches = []
    for tenant in dict.fromkeys(events.tenant.tolist()):
        rows = np.flatnonzero(events.tenant == tenant)
        part = events.take(rows)
        request = WindowBatch(
            tenant=tenant,
            data_type=data_type,
            windows=windows[rows],
            event_ids=part.event_id.tolist(),
            entities=part.entity.tolist(),
            event_times_us=part.event_time_us,
            subjects=part.subject.tolist(),
            available_at=part.available_at,
        )
        batches.append((request, part))
    return batches


def _image_batches(routed: RoutedBatch) -> list[tuple[WindowBatch, EventColumns]]:
    frames = routed.frames
    if not len(frames):
        return []
    batches = []
    shapes = np.array([f"{image.shape}" for image in routed.images], dtype=object)
    for shape in dict.fromkeys(shapes.tolist()):
        same = np.flatnonzero(shapes == shape)
        stacked = np.stack([routed.images[i] for i in same])
        batches.extend(_window_batches(frames.take(same), stacked, "image"))
    return batches


def _dead_letters(routed: RoutedBatch, partitions: list[str]) -> list[DeadLetter]:
    dead = routed.dead
    return [
        DeadLetter(partitions[p], int(o), payload, reason)
        for p, o, payload, reason in zip(dead.partition, dead.offset, dead.payload, dead.reason)
    ]


def _refused_letters(events: EventColumns, refusal: Refusal, partitions: list[str]) -> list[DeadLetter]:
    """Valid events nobody can score (e.g. their tenant has no model): kept as dead letters with the
    service's reason, so that they can be replayed once it can."""
    reason = f"not scored ({refusal.status}): {refusal.reason}"
    table = events.events_table().drop_columns(["payload"]).to_pylist()
    return [
        DeadLetter(partitions[p], int(o), orjson.dumps(row, default=str), reason)
        for p, o, row in zip(events.partition, events.offset, table)
    ]
