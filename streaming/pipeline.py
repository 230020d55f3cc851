"""A streaming pipeline: ``streaming.consumers`` consumer actors over one source, one lakehouse sink
(and, with the detector, one fitter actor per consumer, ``streaming.detection``).

    pipeline = Pipeline(settings, client, group="demo")     # client: an EnsembleClient; listener=: who hears of anomalies
    pipeline.start(until_end=True)                           # replays: stop at the file's end
    stats = pipeline.wait(on_progress=print)                 # Progress(durable, total, ...) as it goes
    pipeline.shutdown()

Consumers and the sink are Ray actors that Ray restarts when their process dies; a restarted
consumer resumes from its checkpoints and Ray resubmits its ``run``. For Kafka, which has no end,
``finish_at(targets)`` names the offsets to stop at (``sources.kafka.log_end_offsets`` gives the
current ones); the consumers keep their open windows in their checkpoints, and the next pipeline
of the same group continues them. A consumer that stops with an error (``ConsumerStopped``, or a
checkpoint it cannot use) ends ``wait`` with that error, as the consumer raised it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import ray

from observability import tracing
from rtml.errors import RtmlError
from rtml.settings import Settings
from streaming.consumer import ConsumerSpec, StreamConsumer
from streaming.detection import start_fitter
from streaming.lag import LagMonitor
from streaming.scoring import AnomalyListener, EnsembleClient
from streaming.sink import LakehouseSink

# Logical CPUs each actor asks Ray for: they wait on I/O and on the models most of the time.
CONSUMER_CPUS = 0.25
SINK_CPUS = 0.25


# How long start waits for the detector's fitters to be placed before it says there is no room.
FITTERS_PLACED_TIMEOUT_S = 60.0


def pipeline_cpus(settings: Settings) -> float:
    """The logical CPUs one pipeline's actors ask Ray for (with a detector fitter per consumer)."""
    fitters = settings.detector.fit_cpus if settings.detector.enabled else 0.0
    return settings.streaming.consumers * (CONSUMER_CPUS + fitters) + SINK_CPUS


@dataclass
class Progress:
    durable: int  # records behind the consumers' checkpoints
    total: int  # records in the log as last seen
    partitions: dict[str, tuple[int, int]]


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        client: EnsembleClient,
        group: str,
        replay_path: str = "",
        listener: AnomalyListener | None = None,
    ):
        if settings.streaming.source == "replay" and not replay_path:
            raise RtmlError("a replay pipeline needs the file to replay (streaming.replay_path)")
        tracing.configure(settings, "rtml-pipeline")  # the driver's process (the CLI's, or the app's StreamRunner)
        self.settings = settings
        self.group = group
        count = settings.streaming.consumers
        if count < 1:
            raise RtmlError("streaming.consumers must be at least 1")
        self.specs = [ConsumerSpec(settings, group, i, count, replay_path) for i in range(count)]
        self._client = client
        self._listener = listener
        self.sink = None
        self.consumers: list = []
        self.fitters: list = []
        self._runs: list = []
        self._targets: dict[str, int] | None = None
        self._lag: LagMonitor | None = None
        self.clock_start = 0.0

    def start(self, until_end: bool = False) -> None:
        """Start the actors; returns once every consumer is ready and reading. A replay's clock
        starts then (``clock_start``), so that start-up time does not count as event latency."""
        restartable = {"max_restarts": -1, "max_task_retries": -1}
        self.sink = ray.remote(LakehouseSink).options(num_cpus=SINK_CPUS, **restartable).remote(self.settings, self._listener)
        fitters = self._start_fitters()
        consumer = ray.remote(StreamConsumer).options(num_cpus=CONSUMER_CPUS, max_concurrency=4, **restartable)
        self.consumers = [consumer.remote(spec, self._client, self.sink, fitter) for spec, fitter in zip(self.specs, fitters)]
        self.consumer_pids()
        self.clock_start = time.time()
        self._runs = [c.run.remote(until_end, self.clock_start) for c in self.consumers]
        self._lag = LagMonitor(self.settings, self.group, lambda: self.progress().partitions)
        self._lag.start()

    def _start_fitters(self) -> list:
        """One detector fitter per consumer (None each without the detector), placed before the
        stream starts: fits that wait for CPUs mid-stream would stall it."""
        if not self.settings.detector.enabled:
            return [None] * len(self.specs)
        fitters = [start_fitter(self.settings) for _ in self.specs]
        ready, _ = ray.wait([fitter.ready.remote() for fitter in fitters], num_returns=len(fitters), timeout=FITTERS_PLACED_TIMEOUT_S)
        if len(ready) < len(fitters):
            for fitter in fitters:
                ray.kill(fitter)
            free = ray.available_resources().get("CPU", 0.0)
            raise RtmlError(
                f"the stream's detector needs a fit worker of detector.fit_cpus = {self.settings.detector.fit_cpus:g} CPUs per consumer "
                f"({len(fitters)}), and the cluster has {free:g} CPUs free: give the cluster more CPUs, lower detector.fit_cpus "
                "or streaming.consumers, or turn the detector off (detector.enabled = false)"
            )
        self.fitters = fitters
        return fitters

    def finish_at(self, targets: dict[str, int]) -> None:
        """Let every consumer finish once its partitions are read up to ``targets`` (name -> offset)."""
        self._targets = dict(targets)
        for c in self.consumers:
            c.finish_at.remote(self._targets)

    @property
    def finishing(self) -> bool:
        """Whether ``finish_at`` was called."""
        return self._targets is not None

    def progress(self, timeout_s: float = 5.0) -> Progress:
        partitions: dict[str, tuple[int, int]] = {}
        asked = [c.progress.remote() for c in self.consumers]
        ready, _ = ray.wait(asked, num_returns=len(asked), timeout=timeout_s)
        for answer in ray.get(ready):  # a consumer being restarted answers next time
            partitions.update(answer)
        return Progress(
            sum(d for d, _ in partitions.values()), sum(max(d, e) for d, e in partitions.values()), partitions
        )

    def consumer_pids(self) -> list[int]:
        return ray.get([c.pid.remote() for c in self.consumers])

    def wait(self, on_progress: Callable[[Progress], None] | None = None, every_s: float = 0.5, timeout_s: float | None = None) -> list[dict]:
        """Wait for every consumer's ``run`` to end; returns their stats. Raises the error of the
        first consumer that stopped with one, without waiting for the others."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            done, _ = ray.wait(self._runs, num_returns=len(self._runs), timeout=every_s)
            for run in done:
                _result(run)  # raises the error of a consumer that stopped with one
            if on_progress is not None:
                on_progress(self.progress())
            if len(done) == len(self._runs):
                if self._lag is not None:
                    self._lag.refresh()  # the final lag, once everything is durable
                return [_result(run) for run in self._runs]
            if self._targets is not None:  # a restarted consumer has forgotten them
                for c in self.consumers:
                    c.finish_at.remote(self._targets)
            if deadline is not None and time.monotonic() > deadline:
                raise RtmlError(f"the pipeline did not finish within {timeout_s:.0f}s; progress: {self.progress()}")

    def shutdown(self) -> None:
        """Stop every actor at once. Nothing is lost: whatever was not checkpointed yet is read
        again by the next pipeline of the same group."""
        if self._lag is not None:
            self._lag.stop()
            self._lag = None
        if self.sink is not None:
            ray.get(self.sink.close.remote())
        for actor in [*self.consumers, *self.fitters, self.sink]:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        self.consumers, self.fitters, self.sink, self._runs = [], [], None, []


def _result(run: ray.ObjectRef) -> dict:
    """A finished ``run``'s stats, or the error a consumer stopped with: an ``RtmlError`` as the
    consumer raised it (its message says what to do), not Ray's wrapper with the remote traceback."""
    try:
        return ray.get(run)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, RtmlError):
            raise error.cause from None
        raise
