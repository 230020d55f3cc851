"""One stream consumer: the loop a Ray actor runs over the partitions it owns.

    poll -> route (DataRouter, which tokenizes PII; the token vault keeps the originals)
         -> windows and features (WindowState) -> score (EnsembleClient)
         -> hand rows to the LakehouseSink -> once durable: checkpoint, commit offsets

Neither scores nor lakehouse writes are waited for: while up to ``streaming.scoring_batches_in_flight``
batches are being scored and up to ``streaming.max_in_flight_events`` events wait for their scores or
for durability, the consumer reads on; beyond either limit it stops reading until the oldest work is
done (back-pressure: a slow lakehouse or model slows the consumer, nothing piles up). So a batch
never waits for the previous batch's scores, and while the models are busy the next batch grows
with the events that arrive meanwhile (the batch size follows the offered rate). Windows and the
per-entity detector's inputs (``streaming.detection``) are computed in arrival order before a
batch is sent; the detector's fits that became due are Ray tasks, which the batch's scoring call
waits for. Batches are handed to the sink in the order they were read, each once its scores are
back: the detector turns the forecasts into scores there, and its scoring state must see the
rows in order. Only once a batch and every batch read before it are durable is a partition
checkpointed behind them, with the window state and the detector's input state as of the batch's
read and its scoring state as of its hand-over.

End: a consumer given targets (``finish_at``) or told to read to the current ends stops there.
Only a stream that has really ended (a finite source, such as a replay file, read to its end)
closes its open windows; a consumer of a live log (Kafka, the embedded event log) checkpoints them
open at its read position, and the next run of the group continues them, so that stopping and
going on gives the rows one uninterrupted run gives.

Start: ``run`` loads the checkpoints and reads on from them. A partition without a checkpoint
starts at the log's beginning; where the group had read it before (the log holds committed offsets
for it: the checkpoint was lost), reading it again from offset 0 rebuilds the same window state and
the idempotent writes drop what had landed, and where the log no longer starts at offset 0 the
consumer refuses with what to do rather than restart its windows empty.

Failure: the actor is restarted by Ray (``max_restarts``) and its ``run`` resubmitted
(``max_task_retries``); the new process loads the checkpoints and re-reads from them. A failure
that may pass later (``streaming.failures``) is retried: a scoring call in place, a lakehouse
write by rewinding the running consumer to its checkpoints the same way, with jittered back-off.
Once such failures have lasted ``streaming.give_up_after_s`` with no batch becoming durable, or at
once for a failure no retry cures (a bug, bad rows, a permanent refusal), the consumer stops with
``ConsumerStopped`` saying what failed, since when and what to do, and counts it in
``rtml_stream_consumer_failures_total``. Nothing is lost either way: what was not durable is read
again by the next run.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import ray
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_delay, wait_random_exponential

from observability import metrics, tracing
from rtml.errors import RtmlError
from rtml.schemas import DETECTOR_MEMBER, ForecastInputs, Refusal, ScoreRequest, ScoreResult, prediction_table
from rtml.settings import Settings
from security.pii import Tokenizer, redact_logs
from security.tokenvault import TokenVault
from streaming.arrow_ipc import to_ipc
from streaming.checkpoints import Checkpoint, CheckpointStore
from streaming.deadletters import DeadLetter, DeadLetterSink, FileDeadLetters, KafkaDeadLetters
from streaming.detection import DetectionBatch, EntityDetectors, detector_fingerprint, start_fitter
from streaming.drift import StreamDrift
from streaming.failures import JudgedFailure, describe, passes_later
from streaming.features import feature_rows, feature_set_version, window_spec
from streaming.files import storage_dir
from streaming.router import DataRouter, EventColumns, RoutedBatch
from streaming.scoring import EnsembleClient
from streaming.sources.base import Source
from streaming.windowing import DROPPED, LATE, WindowState

log = logging.getLogger(__name__)
ENDS_REFRESH_S = 1.0
EXPORTED_OUTCOMES = ("scored", "late", "dropped", "unscored", "landed")
LATENCY_SAMPLES = 200_000
# The longest wait between two rewinds after failed writes (jittered exponential back-off up to it).
REWIND_MAX_WAIT_S = 10.0


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
    if streaming.source == "log":
        from streaming.sources.eventlog import EventLogSource

        return EventLogSource(spec.settings, spec.group, spec.index, spec.consumers)
    from streaming.sources.replay import ReplaySource

    owned = list(range(spec.index, streaming.replay_partitions, spec.consumers))
    return ReplaySource(spec.replay_path, streaming.replay_partitions, owned, streaming.replay_speed)


def open_dead_letters(spec: ConsumerSpec) -> DeadLetterSink:
    settings = spec.settings
    if settings.streaming.source == "kafka":
        kafka = settings.kafka
        return KafkaDeadLetters(kafka.bootstrap_servers, kafka.dead_letter_topic, kafka.broker_timeout_s)
    return FileDeadLetters(Path(storage_dir(settings.streaming.dead_letter_dir, settings, "dead-letters")) / spec.group)


@dataclass
class _Scores:
    answered: list[tuple[ScoreRequest, np.ndarray, ScoreResult]]  # scored requests, their rows in the batch
    refused: list[DeadLetter]  # events of the requests refused for good
    seconds: float  # the round trip
    scored_at: float = 0.0


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
    detection: DetectionBatch | None = None  # the detector's inputs for its metric events
    detector_inputs: dict[int, pa.Table] = field(default_factory=dict)  # input states after this batch
    detector_scoring: dict[int, pa.Table] = field(default_factory=dict)  # scoring states after its hand-over
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

    def __init__(self, spec: ConsumerSpec, client: EnsembleClient, sink: ray.actor.ActorHandle, fitter: ray.actor.ActorHandle | None = None):
        settings = spec.settings
        tracing.configure(settings, "rtml-consumer")
        self.spec = spec
        self._streaming = settings.streaming
        self._client = client
        self._sink = sink
        self._window_spec = window_spec(settings)
        self._feature_set = feature_set_version(self._window_spec)
        # PII is tokenized as records are routed, and the token vault holds the originals before
        # any row or dead letter with their tokens is written (security.pii, security.tokenvault).
        tokenizer = Tokenizer(settings)
        redact_logs(tokenizer)
        self._router = DataRouter(self._streaming.routes, self._streaming.land_stream_events, tokenizer)
        self._vault = TokenVault.open(settings)
        self._checkpoints = CheckpointStore(
            storage_dir(self._streaming.checkpoint_dir, settings, "checkpoints"),
            spec.group,
            f"{self._feature_set}:history={self._window_spec.history}:{detector_fingerprint(settings)}",
        )
        self._detectors = EntityDetectors(settings, spec.group) if settings.detector.enabled else None
        self._detector_threshold = settings.detector.threshold
        # The detector's fits run there (``streaming.detection``; started on first use if not
        # given); their tasks by model id, while a batch may still need to wait for them.
        self._fitter = fitter
        self._fits: dict[str, ray.ObjectRef] = {}
        self._dead_letters = open_dead_letters(spec)
        self._source = open_source(spec)
        self._scoring = ThreadPoolExecutor(self._streaming.scoring_batches_in_flight, thread_name_prefix="scoring")
        self._targets: dict[int, int] | None = None
        self._counts = Counts()
        self._ends_checked = 0.0
        self._ends: dict[int, int] = {}
        self._labels = {"group": spec.group}
        # Read and durable positions, window state and work in flight: loaded by run (_restore).
        self._state = WindowState(self._window_spec)
        self._durable: dict[int, int] = {}
        self._read: dict[int, int] = {}
        self._in_flight: deque[_Pending] = deque()
        self._in_flight_events = 0
        # Wall-clock time of the first failed write since the last batch became durable.
        self._failing_since: float | None = None
        # Per tenant: the live distribution of the models' input against the training snapshot's.
        self._drift = StreamDrift(settings, spec.group) if settings.observability.drift_enabled else None

    # the loop ------------------------------------------------------------------------------------

    def run(self, until_end: bool = False, clock_start: float | None = None) -> dict:
        """Consume from the checkpoints until the targets given to ``finish_at`` are reached, or
        (with ``until_end``) until the partitions' current ends are; then wait for every write and
        checkpoint (closing the open windows if the stream has ended). ``clock_start`` starts a
        replay's clock. Returns ``stats()``; raises ``ConsumerStopped`` when scoring or writes
        fail for good (module docstring)."""
        if clock_start is not None:
            self._source.start_clock(clock_start)
        ends = self._source.end_offsets() if until_end else None
        rewinding = Retrying(
            retry=retry_if_exception(lambda error: isinstance(error, _CallFailed) and error.stage == "write" and error.transient),
            stop=self._failing_too_long,
            wait=wait_random_exponential(multiplier=0.5, max=REWIND_MAX_WAIT_S),
            before_sleep=self._rewinding,
            reraise=True,
        )
        try:
            rewinding(self._consume, ends)
        except _CallFailed as failure:
            raise self._stopped(failure) from None
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

    def _consume(self, ends: Mapping[int, int] | None) -> None:
        """From the checkpoints to the targets (one attempt of ``run``)."""
        self._restore()
        while True:
            with self._timed("settle"):
                self._wait_for_room()
                self._settle()
            if self._reached(self._targets or ends):
                self._finish()
                return
            with self._timed("poll"):
                batch = self._source.poll(self._streaming.max_poll_records, self._streaming.poll_timeout_s)
            if len(batch):
                self._process(batch)

    def _failing_too_long(self, _attempt: RetryCallState) -> bool:
        """Stop rewinding once writes have failed for give_up_after_s with no batch durable since."""
        return self._failing_since is not None and time.time() - self._failing_since >= self._streaming.give_up_after_s

    def _rewinding(self, attempt: RetryCallState) -> None:
        failure = attempt.outcome.exception() if attempt.outcome else None
        log.error(
            "consumer %s: a lakehouse write failed (%s); rewinding to the checkpoints in %.1f s", self.spec.index, failure, attempt.upcoming_sleep
        )
        metrics.CONSUMER_FAILURES.labels(stage="write", reason="retried", **self._labels).inc()

    def _stopped(self, failure: _CallFailed) -> ConsumerStopped:
        """The error that ends ``run``, counted in the failures metric."""
        metrics.CONSUMER_FAILURES.labels(stage=failure.stage, reason="gave_up" if failure.transient else "permanent", **self._labels).inc()
        writes = failure.stage == "write"
        if failure.transient:
            since = datetime.fromtimestamp(failure.since, timezone.utc).isoformat(timespec="seconds")
            what = "lakehouse writes have failed" if writes else "a scoring call has kept failing"
            cause = (
                f"{what} since {since} ({time.time() - failure.since:.0f} s, streaming.give_up_after_s = "
                f"{self._streaming.give_up_after_s:g} s){' with no batch becoming durable' if writes else ''}; the last error: {failure}"
            )
            remedy = "make the lakehouse (catalog and warehouse) reachable" if writes else "make the scoring service answer (serve status)"
        else:
            cause = f"{'a lakehouse write' if writes else 'a scoring call'} failed with an error that no retry cures: {failure}"
            remedy = "fix its cause (the sink's log has the write's details)" if writes else "fix the scoring client or service"
        return ConsumerStopped(
            f"consumer {self.spec.index} of group {self.spec.group} stopped: {cause}. Nothing is lost: what was not durable "
            f"is read again from the checkpoints ({self._checkpoints.location}) by the next run. To go on, {remedy}, "
            "then start the pipeline again."
        )

    def _restore(self) -> None:
        """Window state and read positions from the checkpoints (nothing in flight survives).
        Partitions without a checkpoint start at the log's beginning (``_beginnings``)."""
        parts, positions = {}, {}
        for i, name in enumerate(self._source.partitions):
            checkpoint = self._checkpoints.load(name)
            if checkpoint is not None:
                parts[i] = (checkpoint.keys, checkpoint.windows)
                positions[i] = checkpoint.offset
            if self._detectors is not None:
                found = checkpoint is not None
                self._detectors.restore(i, checkpoint.detector_inputs if found else None, checkpoint.detector_scoring if found else None)
        beginnings = self._beginnings([i for i in range(len(self._source.partitions)) if i not in positions])
        self._state = WindowState.from_arrow(self._window_spec, parts)
        self._source.seek(positions)
        self._durable = dict(positions)
        self._read = {**beginnings, **positions}
        self._in_flight: deque[_Pending] = deque()
        self._in_flight_events = 0
        if positions:
            self._counts.restarts_from_checkpoint += 1

    def _beginnings(self, missing: list[int]) -> dict[int, int]:
        """Where the partitions without a checkpoint start: at the log's beginning. For one the
        group never read that is a fresh start. For one it had read (the log holds committed
        offsets for it, so its checkpoint was lost), reading it again from offset 0 rebuilds exactly
        the window state that was lost, while the log still holds offset 0; otherwise this refuses."""
        if not missing:
            return {}
        starts = self._source.start_offsets()
        committed = self._source.committed()
        read_before = [i for i in missing if committed.get(i, 0) > 0]
        names = self._source.partitions
        gone = [i for i in read_before if starts.get(i, 0) > 0]
        if gone:
            which = ", ".join(f"{names[i]} (read up to offset {committed[i]}; the log now starts at {starts[i]})" for i in gone)
            raise RtmlError(
                f"consumer group {self.spec.group}: no checkpoint in {self._checkpoints.location} for partition(s) {which}, "
                "and the log no longer holds their beginning, so their window state cannot be rebuilt (going on "
                "would restart their windows empty). Restore the checkpoints into that directory "
                "(streaming.checkpoint_dir), or start a new consumer group, which reads the partitions from where "
                "the log now starts"
            )
        for i in read_before:
            log.warning(
                "consumer %s: no checkpoint of partition %s in %s, which group %s had read up to offset %d; "
                "rebuilding its window state by reading it again from offset 0",
                self.spec.index, names[i], self._checkpoints.location, self.spec.group, committed[i],
            )
        return {i: starts.get(i, 0) for i in missing}

    def _reached(self, targets: Mapping[int, int] | None) -> bool:
        if targets is None:
            return False
        return all(self._read.get(i, 0) >= end for i, end in targets.items())

    def _process(self, batch) -> None:
        started_ns = time.time_ns()  # where the traced events' "rtml.consume" spans begin
        self._counts.read_delay_s.extend((time.time() - batch.available_at).tolist())
        with self._timed("window"):
            routed = self._router.route(batch, self._source.partitions)
            self._store_tokens(routed)
            metric_events = routed.metrics
            windowed = self._state.process(
                metric_events.keys, metric_events.event_time_us, metric_events.value, metric_events.partition, metric_events.subject
            )
            scored_events = metric_events.take(windowed.accepted)
            if self._drift is not None and len(scored_events):
                self._drift.observe(scored_events.tenant, scored_events.value)
            detection = None
            if self._detectors is not None and len(scored_events):
                detection = self._detectors.advance(scored_events.keys, scored_events.value, scored_events.partition)
            fits = self._start_fits(detection)
            requests = _window_batches(scored_events, windowed.model_windows, "metric", detection) + _image_batches(routed)
            with tracing.stage("rtml.consume", routed.traces, {tracing.BATCH_SIZE: len(batch)}, started_ns) as consumed:
                if consumed:
                    _trace_requests(requests, consumed)
                scoring = self._scoring.submit(self._score, requests, fits) if requests else _done(_Scores([], [], 0.0))
            tables = {"events": routed.landed.events_table(), "features": feature_rows(windowed.closed, self._feature_set)}
            self._submit(
                scoring, tables, _dead_letters(routed, self._source.partitions), len(batch), batch.next_positions(), scored_events.available_at, detection
            )
        self._count(
            read=len(batch),
            batches=1,
            late=int((windowed.status == LATE).sum()),
            dropped=int((windowed.status == DROPPED).sum()),
            landed=len(routed.landed),
            feature_windows=len(windowed.closed),
        )

    def _store_tokens(self, routed: RoutedBatch) -> None:
        """Keep the batch's new tokens in the token vault, before anything of the batch is written.
        A vault that fails is a failed write: rewound and retried while it may pass later."""
        try:
            for tenant, entries in routed.vault_entries.items():
                self._vault.store(tenant, entries)
        except Exception as error:
            if self._failing_since is None:
                self._failing_since = time.time()
            raise _CallFailed("write", error, self._failing_since) from error

    def _start_fits(self, detection: DetectionBatch | None) -> list[ray.ObjectRef]:
        """Send the fits that became due to the fitter (which runs them in order); the fit tasks
        the batch's rows are forecast by, for its scoring call to wait for."""
        if detection is None:
            return []
        if detection.fits and self._fitter is None:
            self._fitter = start_fitter(self.spec.settings)
        for fit in detection.fits:
            self._fits[fit.model_id] = self._fitter.fit.remote(self.spec.settings, self._detectors.config, fit)
        named = {model_id for inputs in detection.forecast_inputs for model_id in dict.fromkeys(inputs.model_ids) if model_id}
        return [self._fits[model_id] for model_id in named if model_id in self._fits]

    def _score(self, requests: list[tuple[ScoreRequest, EventColumns, np.ndarray]], fits: list[ray.ObjectRef] = ()) -> _Scores:
        """The answers to the scored requests, and dead letters for those refused for good, once
        the fits their rows are forecast by are written. Failures that may pass later (refusals for
        now (5xx), a service away, timeouts, back-pressure) are retried for up to give_up_after_s;
        others raise at once (``_CallFailed``). Runs in a scoring thread."""
        started, since = time.perf_counter(), time.time()
        answers: list[ScoreResult | Refusal | None] = [None] * len(requests)
        try:
            ray.get(list(fits))
        except Exception as error:
            raise _CallFailed("scoring", error, since) from error
        retrying = Retrying(
            retry=retry_if_exception(passes_later),
            stop=stop_after_delay(self._streaming.give_up_after_s),
            wait=wait_random_exponential(multiplier=0.05, max=2.0),
            before_sleep=lambda _attempt: metrics.CONSUMER_FAILURES.labels(stage="scoring", reason="retried", **self._labels).inc(),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    waiting = [i for i, answer in enumerate(answers) if answer is None]
                    if waiting:
                        for i, answer in zip(waiting, self._client.score([requests[i][0] for i in waiting])):
                            if isinstance(answer, ScoreResult) or answer.permanent:
                                answers[i] = answer
                        if (later := sum(answer is None for answer in answers)) > 0:
                            raise JudgedFailure(f"the scoring service refused {later} batch(es) for now (5xx)", transient=True)
        except Exception as error:
            raise _CallFailed("scoring", error, since) from error
        scored_at = time.time()
        answered, refused = [], []
        for (request, events, rows), answer in zip(requests, answers):
            if isinstance(answer, ScoreResult):
                answered.append((request, rows, answer))
            else:
                refused.extend(_refused_letters(events, answer, self._source.partitions))
        return _Scores(answered, refused, time.perf_counter() - started, scored_at)

    def _submit(
        self,
        scoring: Future,
        tables: dict[str, pa.Table],
        letters: list[DeadLetter],
        records: int,
        positions: dict[int, int],
        available_at: np.ndarray,
        detection: DetectionBatch | None = None,
    ) -> None:
        self._read.update(positions)
        state = {partition: self._state.to_arrow(partition) for partition in positions}
        pending = _Pending(scoring, tables, letters, records, positions, state, available_at, detection)
        if self._detectors is not None:
            pending.detector_inputs = {partition: self._detectors.inputs_to_arrow(partition) for partition in positions}
        self._in_flight.append(pending)
        self._in_flight_events += records

    def _wait_for_room(self) -> None:
        """Back-pressure: return once another batch may be read and sent for scoring."""
        scoring = [pending.scoring for pending in self._in_flight if pending.write is None]
        if len(scoring) >= self._streaming.scoring_batches_in_flight:
            wait_for_futures(scoring[:1])  # batches are handed over in read order: the oldest first
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
        """Send a scored batch's rows to the sink (and its dead letters to theirs); batches in the
        order they were read."""
        with self._timed("hand_over"):
            scores: _Scores = pending.scoring.result()  # scoring that failed for good raises here (_CallFailed), ending the run
            letters = sorted(pending.letters + scores.refused, key=lambda letter: (letter.partition, letter.offset))
            if letters:
                self._dead_letters.write(letters)
            with tracing.stage("rtml.decision", _traces_of(scores.answered)) as decided:
                if pending.detection is not None:
                    self._add_detector_scores(pending.detection, scores.answered)
            if self._detectors is not None:
                pending.detector_scoring = {partition: self._detectors.scoring_to_arrow(partition) for partition in pending.positions}
            predictions = [prediction_table(request, result, scores.scored_at) for request, _, result in scores.answered]
            self._export_decisions(scores.answered)
            tables = {**pending.tables, "predictions": pa.concat_tables(predictions) if predictions else None}
            written = {name: to_ipc(rows) for name, rows in tables.items() if rows is not None}
            pending.write = self._sink.write.remote(written, decided) if decided else self._sink.write.remote(written)
        self._counts.seconds["score"] = self._counts.seconds.get("score", 0.0) + scores.seconds
        if scores.answered or scores.refused:
            self._counts.scoring_round_trip_s.append(scores.seconds)
        self._count(scored=sum(len(request) for request, _, _ in scores.answered), unscored=len(scores.refused), dead_letters=len(letters))
        if pending.detection is not None:
            for fit in pending.detection.fits:  # written: later fits and batches read them from disk
                self._fits.pop(fit.model_id, None)

    def _export_decisions(self, answered: list[tuple[ScoreRequest, np.ndarray, ScoreResult]]) -> None:
        """Count a handed-over batch's decisions and anomalies per tenant, and observe each
        event's time from available in the log to its decision (now: the detector has just
        scored it)."""
        decided_at = time.time()
        latency = metrics.EVENT_TO_DECISION.labels(**self._labels)
        for request, _, result in answered:
            metrics.PREDICTIONS.labels(tenant=request.tenant, path="stream").inc(len(request))
            metrics.ANOMALIES.labels(tenant=request.tenant, path="stream").inc(int(np.count_nonzero(result.is_anomaly)))
            latency.observe_many((decided_at - request.available_at).tolist())

    def _add_detector_scores(self, detection: DetectionBatch, answered: list[tuple[ScoreRequest, np.ndarray, ScoreResult]]) -> None:
        """Turn the forecasts of a batch's metric rows into the detector's scores (rows refused
        for good were not forecast: NaN), and add them to the answers: a member ``detector`` of
        each row's scores, and the decision (anomalous when either the tenant's ensemble or the
        detector says so)."""
        forecasts = [np.full(len(inputs.model_ids), np.nan, np.float32) for inputs in detection.forecast_inputs]
        metric = [(request, rows, result) for request, rows, result in answered if request.data_type == "metric"]
        for _, rows, result in metric:
            for j, forecast in enumerate(result.forecasts):
                forecasts[j][rows] = forecast
        scores = self._detectors.score(detection, forecasts)
        for _, rows, result in metric:
            detector = scores[rows]
            result.scores = {**result.scores, DETECTOR_MEMBER: detector}
            result.is_anomaly = np.asarray(result.is_anomaly, bool) | (detector >= self._detector_threshold)

    def _settle(self) -> None:
        """Hand over every scored batch, and checkpoint behind every batch whose rows are durable,
        oldest first."""
        for pending in self._in_flight:
            if pending.write is None:
                if not pending.scoring.done():
                    break  # later batches wait: they are handed over in read order
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
                if settled:  # what became durable before it is kept: the rewind starts behind it
                    self._checkpoint(settled)
                if self._failing_since is None:
                    self._failing_since = time.time()
                raise _CallFailed("write", error, self._failing_since) from error
            settled.append(self._in_flight.popleft())
            self._in_flight_events -= settled[-1].records
        if settled:
            self._checkpoint(settled)
        self._refresh_ends()

    def _checkpoint(self, settled: list[_Pending]) -> None:
        now = time.time()
        latest: dict[int, tuple[int, _Pending]] = {}
        for pending in settled:
            for partition, position in pending.positions.items():
                latest[partition] = (position, pending)
            durable_latency = (now - pending.available_at).tolist()
            self._counts.durable_latency_s.extend(durable_latency)
            metrics.EVENT_TO_DURABLE.labels(**self._labels).observe_many(durable_latency)
        for partition, (position, pending) in latest.items():
            keys, windows = pending.state[partition]
            checkpoint = Checkpoint(position, keys, windows, pending.detector_inputs.get(partition), pending.detector_scoring.get(partition))
            self._checkpoints.save(self._source.partitions[partition], checkpoint)
            self._durable[partition] = position
        self._failing_since = None
        try:
            self._source.commit({partition: position for partition, (position, _) in latest.items()})
        except Exception as error:  # the checkpoints hold the progress; the log catches up on the next commit
            log.warning("consumer %s: committing offsets to the log failed (%s); will retry", self.spec.index, error)

    def _finish(self) -> None:
        """Wait for every write, checkpointing behind it. Only a stream that has ended closes its
        open windows; on a live log they stay open in the checkpoints, for the next run to go on."""
        if self._source.finite and self._reached(self._source.end_offsets()):
            closed = self._state.flush()
            self._count(feature_windows=len(closed))
            touched = {i: self._read.get(i, 0) for i in range(len(self._source.partitions))}
            self._submit(_done(_Scores([], [], 0.0)), {"features": feature_rows(closed, self._feature_set)}, [], 0, touched, np.empty(0))
        while self._in_flight:
            self._wait_for_oldest()
            self._settle()
        self._refresh_ends(force=True)

    def _refresh_ends(self, force: bool = False) -> None:
        """The log ends as last seen, for ``progress``."""
        now = time.monotonic()
        if now - self._ends_checked < ENDS_REFRESH_S and not force:
            return
        self._ends_checked = now
        try:
            ends = self._source.end_offsets()
        except Exception as error:  # the broker is away; progress shows the ends last seen
            log.info("consumer %s: cannot read end offsets: %s", self.spec.index, error)
            return
        self._ends = ends  # the lag metrics come from the pipeline's owner (streaming.lag), which outlives a consumer

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


class ConsumerStopped(RtmlError):
    """A consumer stopped because scoring or writes failed for good: what failed, since when, and
    what to do."""


class _CallFailed(RtmlError):
    """A scoring call or a lakehouse write (``stage``) that failed; ``transient``: it may pass
    later; ``since``: wall-clock time of the first failure in the row."""

    def __init__(self, stage: str, error: BaseException, since: float):
        super().__init__(describe(error))
        self.stage = stage
        self.transient = passes_later(error)
        self.since = since


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


def _window_batches(
    events: EventColumns, windows: np.ndarray, data_type: str, detection: DetectionBatch | None = None
) -> list[tuple[ScoreRequest, EventColumns, np.ndarray]]:
    """One request per tenant (in arrival order within each), with the events it is made of and
    their rows in ``events``; with the detector's forecast inputs of those rows."""
    batches = []
    for tenant in dict.fromkeys(events.tenant.tolist()):
        rows = np.flatnonzero(events.tenant == tenant)
        part = events.take(rows)
        forecasts = [
            ForecastInputs(np.asarray(inputs.model_ids, dtype=object)[rows].tolist(), inputs.windows[rows]) for inputs in detection.forecast_inputs
        ] if detection is not None else []
        request = ScoreRequest(
            tenant=tenant,
            data_type=data_type,
            windows=windows[rows],
            event_ids=part.event_id.tolist(),
            entities=part.entity.tolist(),
            event_times_us=part.event_time_us,
            subjects=part.subject.tolist(),
            available_at=part.available_at,
            persist=False,  # the consumer writes its predictions itself, then checkpoints
            forecasts=forecasts,
        )
        batches.append((request, part, rows))
    return batches


def _trace_requests(requests: list[tuple[ScoreRequest, EventColumns, np.ndarray]], traces: dict[str, tracing.Carrier]) -> None:
    """Give each request the carriers of its traced events (``traces``, by event id), for the
    scoring service to continue their traces."""
    for request, events, _ in requests:
        request.traces = {event_id: carrier for event_id, carrier in traces.items() if (events.event_id == event_id).any()}


def _traces_of(answered: list[tuple[ScoreRequest, np.ndarray, ScoreResult]]) -> dict[str, tracing.Carrier]:
    """The carriers of the traced events among the scored requests' (by event id)."""
    return {event_id: carrier for request, _, _ in answered for event_id, carrier in request.traces.items()}


def _image_batches(routed: RoutedBatch) -> list[tuple[ScoreRequest, EventColumns, np.ndarray]]:
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
