"""`rtml bench stream`: rtml's whole stream path, the per-entity detector on, against the input limit,
the compute limit and a stock pipeline, on one broker.

(a) raw: one kafka-python consumer polls the N events of a fresh topic and decodes each one's JSON
    (orjson, the decoder rtml uses): the limit any consumer of these events is under. Also shown
    without the decoding.
(a'') the compute limit: the forward rate, in this process with one torch thread, of the networks one
    event needs: the tenant ensemble's members on windows of ``models.window_length``
    (``measure_ensemble``) and the detector's forecaster(s) on windows of their context length
    (``measure_detector``, ``models._fit.predict``), on the consumers' poll size of windows; the
    events/s limit is 1 / (1/ensemble + 1/detector).
(b) rtml: the same N events through ``streaming.consumers`` consumer actors: DataRouter, windows
    and features, the ModelRouter's ensemble (an RNN and a CNN per tenant, trained first, served by
    the Serve app), the per-entity detector (``streaming.detection``: every entity learns, is
    forecast by the ``EntityForecaster`` and refitted within the run, ``LEARNING_ROWS``), and the
    events, features and predictions tables, offsets committed after the writes. Events/s from the
    consumers being ready to the last row being durable; afterwards the predictions table must hold
    exactly one row per event (zero loss, no duplicates).
(c) rtml at a fixed offered rate: a producer writes ``--rate`` events/s for ``--seconds`` while the
    pipeline runs; event-to-prediction latency is the predictions' ``latency_ms`` (Kafka record
    timestamp, set when the producer sent it, to the ensemble's answer), and event-to-durable comes
    from the consumers.
(d) the stock pipeline (``benchmarks.stock_stream``): a plain kafka-python consumer posting each
    polled batch to a stock Serve app over HTTP and appending the scores with pyiceberg, on the
    topic of (b).

Every figure is written with the exact command to ``benchmarks/RESULTS.md`` (``--write``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass

import numpy as np
import orjson

from benchmarks.results import machine, write_section
from rtml.settings import Settings, get_settings

TENANTS = ("bench-a", "bench-b")
ENTITIES_PER_TENANT = 50
KINDS = ("rnn", "cnn")
# Each of the bench's 100 entities gets events / 100 values (1,000 at the default 100,000): with
# 200 learning values every entity learns (fit 0 from value 100), is forecast and is refitted
# (fit 1 at value 200, then every detector.refit_every values) within the run.
LEARNING_ROWS = 200
# The stock pipeline's one model: the tenant's cheaper one (its forward costs about half the CNN's).
STOCK_KIND = "rnn"


@dataclass
class Figures:
    events: int
    raw_decode_events_per_s: float
    raw_poll_only_events_per_s: float
    rtml_events_per_s: float
    rtml_predictions: int
    rtml_distinct_predictions: int
    offered_rate: float
    offered_events: int
    offered_predictions: int
    p50_ms: float
    p99_ms: float
    durable_p50_ms: float
    durable_p99_ms: float
    read_delay_p99_ms: float  # available in Kafka -> read by a consumer (worst consumer)
    scoring_round_trip_p99_ms: float  # one scoring request (worst consumer)
    consumers: int
    machine: str
    ensemble_windows_per_s: float  # the models' forward alone, in-process
    throughput_seconds: dict  # where the consumers' time went in (b), summed over consumers
    latency_seconds: dict  # the same in (c)
    throughput_cpu_s: dict  # CPU seconds of each kind of process of the Ray cluster during (b)
    latency_cpu_s: dict  # the same during (c)
    throughput_batch: float  # mean events per consumer batch in (b)
    latency_batch: float  # the same in (c)
    detector: dict  # the detector's settings in (b) and (c)
    window_length: int  # of the ensemble's windows
    forward_batch: int  # windows per forward in (a'')
    detector_windows_per_s: float  # (a''): the detector's forecaster(s) forward alone, in-process
    detector_per_entity_windows_per_s: float  # the same, one network per entity (as served)
    fits_throughput: int  # fits written in (b) (fit-* under <home>/models/)
    fits_latency: int  # the same in (c)
    stock_events_per_s: float  # (d)
    stock_rows: int
    stock_distinct_rows: int
    stock_model: str
    stock_batches: int
    stock_seconds: dict  # where the stock loop's time went
    stock_cpu_s: dict  # CPU seconds by process during (d), the bench process included

    @property
    def ratio(self) -> float:
        return self.rtml_events_per_s / self.raw_decode_events_per_s

    @property
    def compute_limit_events_per_s(self) -> float:
        """(a''): events/s one torch thread can forward through everything one event needs."""
        return 1.0 / (1.0 / self.ensemble_windows_per_s + 1.0 / self.detector_windows_per_s)

    @property
    def limit_events_per_s(self) -> float:
        return min(self.raw_decode_events_per_s, self.compute_limit_events_per_s)

    @property
    def limit_ratio(self) -> float:
        return self.rtml_events_per_s / self.limit_events_per_s

    @property
    def stock_ratio(self) -> float:
        return self.rtml_events_per_s / self.stock_events_per_s


def _events(run: str, count: int, start_s: float, step_s: float) -> list[bytes]:
    """Small JSON sensor events, round-robin over the tenants' entities."""
    rng = np.random.default_rng(0)
    entities = [(t, f"sensor-{e}") for t in TENANTS for e in range(ENTITIES_PER_TENANT)]
    values = np.sin(np.arange(count) / 50.0) + rng.normal(0, 0.1, count)
    return [
        orjson.dumps(
            {"event_id": f"{run}-{i}", "tenant": entities[i % len(entities)][0], "entity": entities[i % len(entities)][1], "event_time": start_s + step_s * (i // len(entities)), "value": float(values[i])}
        )
        for i in range(count)
    ]


def _send(producer, settings: Settings, payloads: list[bytes]) -> None:
    from streaming.sources.kafka import events_topic, record_key

    topic = events_topic(settings.kafka, "")
    for payload in payloads:
        event = orjson.loads(payload)
        producer.send(topic, key=record_key(event["tenant"], event["entity"]), value=payload)


def _producer(settings: Settings):
    from kafka import KafkaProducer

    return KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all", linger_ms=5, batch_size=512 * 1024)


def measure_raw(settings: Settings, count: int, decode: bool) -> float:
    """Events/s of one plain kafka-python consumer reading the run's topic from the start."""
    from kafka import KafkaConsumer, TopicPartition

    from streaming.sources.kafka import events_topic

    topic = events_topic(settings.kafka, "")
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        enable_auto_commit=False,
        max_poll_records=settings.streaming.max_poll_records,
        fetch_max_wait_ms=50,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)])
    consumer.seek_to_beginning()
    seen, started = 0, time.perf_counter()
    while seen < count:
        for records in consumer.poll(timeout_ms=500).values():
            if decode:
                for record in records:
                    orjson.loads(record.value)
            seen += len(records)
    elapsed = time.perf_counter() - started
    consumer.close()
    return count / elapsed


def prepare(settings: Settings, console) -> None:
    """Models for the bench tenants (trained on generated series, registered, promoted)."""
    from deployments.demo_models import train_and_register
    from lakehouse import Lakehouse

    lake = Lakehouse.open(settings)
    for tenant in TENANTS:
        for kind in KINDS:
            console.print(f"training {tenant}'s {kind} model")
            train_and_register(lake, tenant, kind, settings.home_dir / "models", window_length=settings.models.window_length, epochs=1)


def run_pipeline(settings: Settings, client, group: str, during=None) -> tuple[float, list[dict], dict[str, float]]:
    """Consume the run's topic to its end; returns (events/s from ready to all durable, stats, CPU
    seconds by process kind meanwhile). ``during`` runs once the consumers are ready (the
    offered-rate producer)."""
    from benchmarks.serve import cpu_seconds, cpu_spent
    from streaming.pipeline import Pipeline
    from streaming.sources.kafka import log_end_offsets

    pipeline = Pipeline(settings, client, group=group)
    try:
        pipeline.start()  # returns once every consumer is ready and reading
        ready = time.perf_counter()
        cpu_before = cpu_seconds(os.getpid())
        if during is not None:
            during()
        pipeline.finish_at(log_end_offsets(settings.kafka))
        stats = pipeline.wait(timeout_s=3600)
        elapsed = time.perf_counter() - ready
        cpu = cpu_spent(cpu_before, cpu_seconds(os.getpid()))  # before shutdown: the actors are gone after it
        return sum(s["read"] for s in stats) / elapsed, stats, cpu
    finally:
        pipeline.shutdown()


def _predictions(lake, run: str) -> tuple[int, int, np.ndarray]:
    import pyarrow.compute as pc

    rows = lake.read("predictions", columns=("event_id", "latency_ms"))
    mine = rows.filter(pc.starts_with(rows["event_id"], run + "-"))
    return mine.num_rows, len(pc.unique(mine["event_id"])), mine["latency_ms"].to_numpy()


def _offer(settings: Settings, run: str, rate: float, seconds: float) -> int:
    """Produce ``rate`` events/s for ``seconds`` (each event stamped by Kafka when sent)."""
    count = int(rate * seconds)
    payloads = _events(run, count, time.time(), 1.0)
    producer = _producer(settings)
    tick = 0.01
    started = time.perf_counter()
    for first in range(0, count, int(rate * tick)):
        due = started + first / rate
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        _send(producer, settings, payloads[first : first + int(rate * tick)])
    producer.flush()
    producer.close()
    return count


def run(events: int, rate: float, seconds: float, consumers: int, console) -> Figures:
    import ray

    from deployments.control import throughput_environment
    from deployments.stream_client import deploy_scoring
    from observability.logs import ray_runtime_env
    from streaming.scoring import warm_up
    from streaming.sources.kafka import ensure_topics, events_topic

    base = get_settings()
    home = base.home_dir / "bench-stream"
    shutil.rmtree(home, ignore_errors=True)
    bench_id = uuid.uuid4().hex[:8]
    settings = base.model_copy(
        update={
            "home": home,
            "streaming": base.streaming.model_copy(update={"source": "kafka", "consumers": consumers}),
            # run_stream off: the bench runs its own pipeline (the app's stream would read the default topics)
            "serving": base.serving.model_copy(update={"persist_predictions": False, "run_stream": False, "model_kinds": KINDS, "app_name": "rtml-bench-stream"}),
            "detector": base.detector.model_copy(update={"enabled": True, "learning_rows": LEARNING_ROWS}),
        }
    )
    host = machine()

    def for_run(name: str) -> Settings:
        prefix = f"rtml-bench-{bench_id}-{name}"
        kafka = settings.kafka.model_copy(
            update={"topic_prefix": prefix, "topic_layout": "shared", "dead_letter_topic": f"{prefix}.dead-letter", "consumer_group": prefix}
        )
        ensure_topics(kafka, [events_topic(kafka, ""), kafka.dead_letter_topic])
        return settings.model_copy(update={"kafka": kafka})

    throughput = for_run("throughput")
    console.print(f"producing {events} events")
    producer = _producer(throughput)
    _send(producer, throughput, _events(f"{bench_id}-t", events, 1.7e9, 1.0))
    producer.flush()
    producer.close()
    console.print("(a) raw kafka-python")
    raw_decode = measure_raw(throughput, events, decode=True)
    raw_poll = measure_raw(throughput, events, decode=False)

    prepare(settings, console)
    from lakehouse import Lakehouse

    lake = Lakehouse.open(settings)
    ray_env = throughput_environment(settings)
    host += f", Ray Serve in its {'throughput-optimised' if ray_env else 'default'} mode"
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False, configure_logging=False, runtime_env=ray_runtime_env(settings, ray_env))
    try:
        client = deploy_scoring(settings)
        warm_up(client, list(TENANTS), settings.models.window_length)
        console.print("(b) rtml, whole path")
        rtml_rate, throughput_stats, throughput_cpu = run_pipeline(throughput, client, throughput.kafka.consumer_group)
        predictions, distinct, _ = _predictions(lake, f"{bench_id}-t")
        fits_throughput = _fits(settings, throughput.kafka.consumer_group)
        console.print(f"(c) rtml at {rate:g} events/s offered for {seconds:g} s")
        offered = for_run("latency")
        sent: list[int] = []
        _, stats, latency_cpu = run_pipeline(offered, client, offered.kafka.consumer_group, during=lambda: sent.append(_offer(offered, f"{bench_id}-l", rate, seconds)))
        offered_predictions, _, latency = _predictions(lake, f"{bench_id}-l")
        fits_latency = _fits(settings, offered.kafka.consumer_group)
        stock = _run_stock(throughput, lake, events, console)
    finally:
        ray.shutdown()
    durable = [s["event_to_durable_s"] for s in stats if s["event_to_durable_s"]]
    console.print("(a'') the networks' forward alone")
    ensemble_rate = measure_ensemble(lake, settings.models.window_length, settings.streaming.max_poll_records)
    detector_rate, detector_per_entity_rate = measure_detector(settings, settings.streaming.max_poll_records, len(TENANTS) * ENTITIES_PER_TENANT)
    return Figures(
        events=events,
        raw_decode_events_per_s=raw_decode,
        raw_poll_only_events_per_s=raw_poll,
        rtml_events_per_s=rtml_rate,
        rtml_predictions=predictions,
        rtml_distinct_predictions=distinct,
        offered_rate=rate,
        offered_events=sent[0],
        offered_predictions=offered_predictions,
        p50_ms=float(np.percentile(latency, 50)),
        p99_ms=float(np.percentile(latency, 99)),
        durable_p50_ms=1000 * max(d[50] for d in durable),
        durable_p99_ms=1000 * max(d[99] for d in durable),
        read_delay_p99_ms=_worst_p99_ms(stats, "read_delay_s"),
        scoring_round_trip_p99_ms=_worst_p99_ms(stats, "scoring_round_trip_s"),
        consumers=consumers,
        machine=host,
        ensemble_windows_per_s=ensemble_rate,
        throughput_seconds=_stage_seconds(throughput_stats),
        latency_seconds=_stage_seconds(stats),
        throughput_batch=_mean_batch(throughput_stats),
        latency_batch=_mean_batch(stats),
        throughput_cpu_s=_by_process(throughput_cpu),
        latency_cpu_s=_by_process(latency_cpu),
        detector=_detector_settings(settings),
        window_length=settings.models.window_length,
        forward_batch=settings.streaming.max_poll_records,
        detector_windows_per_s=detector_rate,
        detector_per_entity_windows_per_s=detector_per_entity_rate,
        fits_throughput=fits_throughput,
        fits_latency=fits_latency,
        stock_events_per_s=stock.events_per_s,
        stock_rows=stock.rows,
        stock_distinct_rows=stock.distinct_rows,
        stock_model=stock.model,
        stock_batches=stock.batches,
        stock_seconds=stock.seconds,
        stock_cpu_s=stock.cpu_s,
    )


def _run_stock(settings: Settings, lake, events: int, console):
    """(d) on the topic of (b), serving the bench tenant's ``STOCK_KIND`` model."""
    from benchmarks.stock_stream import run_stock
    from streaming.sources.kafka import events_topic

    model = next(m for m in lake.registry.active(TENANTS[0]) if m.kind == STOCK_KIND)
    return run_stock(settings, model.artifact_uri, f"{TENANTS[0]}'s {model.kind} {model.name}@{model.version}", events_topic(settings.kafka, ""), events, console)


def _fits(settings: Settings, group: str) -> int:
    """Fits the detector wrote for consumer group ``group`` (``streaming.detection.fit_uri``:
    ``<home>/models/<tenant>/detector/<group>/<entity>/<forecaster>/fit-<k>``)."""
    from urllib.parse import quote

    root = settings.home_dir / "models"
    return sum(1 for path in root.glob(f"*/detector/{quote(group, safe='')}/*/*/fit-*") if path.is_dir())


def _detector_settings(settings: Settings) -> dict:
    from streaming.detection import detector_config

    config = detector_config(settings)
    return {
        "learning_rows": settings.detector.learning_rows,
        "refit_every": settings.detector.refit_every,
        "threshold": settings.detector.threshold,
        "forecasters": [f"{spec.kind} context {spec.context_length} horizon {spec.horizon} {spec.hparams}" for spec in config.forecasters],
        "initial_epochs": config.initial_epochs,
        "refit_epochs": config.refit_epochs,
        "forecaster_replicas": settings.detector.forecaster_replicas,
        "fit_cpus": settings.detector.fit_cpus,
    }


def _by_process(cpu: dict[str, float]) -> dict[str, float]:
    return {name.removeprefix("ray::"): round(spent, 1) for name, spent in cpu.items() if spent >= 0.05}


def _worst_p99_ms(stats: list[dict], latency: str) -> float:
    return 1000 * max(s[latency][99] for s in stats if s[latency])


def _mean_batch(stats: list[dict]) -> float:
    return sum(s["read"] for s in stats) / max(1, sum(s["batches"] for s in stats))


def _stage_seconds(stats: list[dict]) -> dict:
    stages: dict[str, float] = {}
    for consumer in stats:
        for stage, spent in consumer["seconds"].items():
            stages[stage] = round(stages.get(stage, 0.0) + spent, 1)
    return stages


def measure_ensemble(lake, window_length: int, batch: int, rounds: int = 10) -> float:
    """Windows/s of one tenant's ensemble forward, in this process (one torch thread, no serving):
    the ceiling the models alone put on (b)."""
    import torch

    from models.scoring import load_scorer

    torch.set_num_threads(1)
    scorers = [load_scorer(model.artifact_uri) for model in lake.registry.active(TENANTS[0])]
    windows = np.random.default_rng(0).normal(size=(batch, window_length)).astype(np.float32)
    for scorer in scorers:
        scorer.score(windows)
    started = time.perf_counter()
    for _ in range(rounds):
        for scorer in scorers:
            scorer.score(windows)
    return rounds * batch / (time.perf_counter() - started)


def measure_detector(settings: Settings, batch: int, entities: int, rounds: int = 10) -> tuple[float, float]:
    """Windows/s of the detector's forecaster(s) forward (``models._fit.predict``, the
    ``EntityForecaster``'s call), in this process with one torch thread, on ``batch`` windows of
    each forecaster's context length: (1) one network forecasting all of them; (2) as the stream
    serves them, one network per entity, ``batch / entities`` windows each (each call is padded
    to ``models._fit.INFERENCE_BATCH``). With several forecasters, a window's forecasts add up."""
    import torch

    from models import _fit
    from models.networks import build_network
    from streaming.detection import detector_config

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    whole = per_entity = 0.0  # seconds per window, summed over the forecasters
    for spec in detector_config(settings).forecasters:
        networks = [
            build_network(spec.kind, context_length=spec.context_length, horizon=spec.horizon, **spec.hparams).eval() for _ in range(entities)
        ]
        windows = rng.normal(size=(batch, spec.context_length)).astype(np.float32)
        _fit.predict(networks[0], windows)
        started = time.perf_counter()
        for _ in range(rounds):
            _fit.predict(networks[0], windows)
        whole += (time.perf_counter() - started) / (rounds * batch)
        share = max(1, batch // entities)
        for network in networks:
            _fit.predict(network, windows[:share])
        started = time.perf_counter()
        for _ in range(rounds):
            for network in networks:
                _fit.predict(network, windows[:share])
        per_entity += (time.perf_counter() - started) / (rounds * share * len(networks))
    return 1.0 / whole, 1.0 / per_entity


def report(figures: Figures, command: str) -> str:
    f = figures
    loss = "zero loss, no duplicates" if f.rtml_predictions == f.rtml_distinct_predictions == f.events else (
        f"LOSS/DUPLICATES: {f.rtml_predictions} rows for {f.rtml_distinct_predictions} distinct of {f.events} events"
    )
    stock_loss = "one row per event" if f.stock_rows == f.stock_distinct_rows == f.events else (
        f"LOSS/DUPLICATES: {f.stock_rows} rows for {f.stock_distinct_rows} distinct of {f.events} events"
    )
    offered_loss = "all scored" if f.offered_predictions == f.offered_events else f"{f.offered_predictions} of {f.offered_events} scored"
    d = f.detector
    limit = "(a)" if f.raw_decode_events_per_s <= f.compute_limit_events_per_s else "(a'')"
    return f"""## Streaming: rtml's whole stream path, detector on, vs the input limit, the compute limit and a stock pipeline

Command: `{command}` (one Kafka broker from `rtml services up kafka`; {f.machine}).

Detector on: learning_rows {d["learning_rows"]} (set by the bench: each of its {len(TENANTS) * ENTITIES_PER_TENANT} entities gets {_entity_values(f.events):,} values in (b), so every entity {_detector_reach(_entity_values(f.events), d["learning_rows"])}; {_entity_values(f.offered_events):,} in (c), {_detector_reach(_entity_values(f.offered_events), d["learning_rows"])}), refit_every {d["refit_every"]}, threshold {d["threshold"]:g}, forecaster {"; ".join(d["forecasters"])}, {d["initial_epochs"]} epochs for fit 0 and {d["refit_epochs"]} per refit (warm-started), fit workers of {d["fit_cpus"]:g} CPU, {d["forecaster_replicas"]} EntityForecaster replica(s). Fits written: {f.fits_throughput:,} in (b), {f.fits_latency:,} in (c).

| system | events/s | notes |
|---|---:|---|
| (a) raw kafka-python, poll + orjson decode | {f.raw_decode_events_per_s:,.0f} | the input limit; one consumer, {f.events:,} events of ~130 bytes |
| (a') raw kafka-python, poll only | {f.raw_poll_only_events_per_s:,.0f} | for scale |
| (a'') the networks' forward alone, one torch thread | {f.compute_limit_events_per_s:,.0f} | the compute limit: 1 / (1/ensemble + 1/detector), below |
| (b) rtml: consume -> features -> RNN+CNN ensemble + detector -> Iceberg | {f.rtml_events_per_s:,.0f} | {f.consumers} consumer actors; {loss} |
| (d) stock: kafka-python -> Serve app over HTTP -> pyiceberg | {f.stock_events_per_s:,.0f} | one consumer in the bench process, one model ({f.stock_model}), no detector; {stock_loss} |

(b) reaches **{100 * f.limit_ratio:.1f}%** of min((a), (a'')) = {limit} (target: at least 70%); {100 * f.ratio:.1f}% of (a).
(b) / (d) = **{f.stock_ratio:.2f}x** (target: at least 2x).

(a''), in this process, one torch thread, batches of the consumers' poll size ({f.forward_batch:,} windows): the tenant ensemble (RNN + CNN, windows of {f.window_length} values) {f.ensemble_windows_per_s:,.0f} windows/s; the detector's forecaster (`models._fit.predict` on windows of its context length) {f.detector_windows_per_s:,.0f} windows/s on one network, {f.detector_per_entity_windows_per_s:,.0f} windows/s as served, one network per entity ({len(TENANTS) * ENTITIES_PER_TENANT} networks, each call padded to `models._fit.INFERENCE_BATCH` windows). One event needs one window of each.

At a fixed offered rate of {f.offered_rate:,.0f} events/s ({f.offered_events:,} events, {offered_loss}):

| | p50 | p99 |
|---|---:|---:|
| event -> decision (Kafka timestamp to the router's answer: ensemble scores and detector forecasts) | {f.p50_ms:,.0f} ms | {f.p99_ms:,.0f} ms |
| event -> durable in Iceberg (worst consumer) | {f.durable_p50_ms:,.0f} ms | {f.durable_p99_ms:,.0f} ms |

Target: p99 event -> decision at most 250 ms at 2,000 events/s offered. Its two parts, p99 of the
worst consumer: available in Kafka -> read {f.read_delay_p99_ms:,.0f} ms; one scoring round trip
(consumer -> ModelRouter -> scorers and EntityForecaster, after any fit the batch's rows wait for -> consumer) {f.scoring_round_trip_p99_ms:,.0f} ms.

Where the consumers' time went (seconds, summed over consumers; `score` is the scoring round trips, which overlap the other stages): (b) {_stages(f.throughput_seconds)}; (c) {_stages(f.latency_seconds)}.
Where the stock loop's time went (seconds; one thread, nothing overlaps): {_stages(f.stock_seconds)}; {f.stock_batches:,} batches.
Mean events per consumer batch: (b) {f.throughput_batch:,.0f}; (c) {f.latency_batch:,.0f}.
CPU seconds spent during (b) ({f.events:,} events), by process: {_stages(f.throughput_cpu_s)}.
CPU per event in (b), by process (us): {_per_event(f.throughput_cpu_s, f.events)}.
CPU seconds spent during (c) ({f.offered_events:,} events offered over {f.offered_events / f.offered_rate:g} s), by process: {_stages(f.latency_cpu_s)}.
CPU per event in (c), by process (us): {_per_event(f.latency_cpu_s, f.offered_events)}.
CPU per event in (d), by process (us): {_per_event(f.stock_cpu_s, f.events)}.
"""


def _entity_values(events: int) -> int:
    return events // (len(TENANTS) * ENTITIES_PER_TENANT)


def _detector_reach(values: int, learning_rows: int) -> str:
    """How far an entity with ``values`` values gets (fit 0 forecasts from learning_rows // 2 on,
    fit 1 from learning_rows on: ``models.detector.DetectorConfig.fit_boundary``)."""
    if values > learning_rows:
        return "learns, is forecast and is refitted within the run"
    if values > learning_rows // 2:
        return "learns and is forecast, but is not refitted (too few values)"
    return "is still learning at the end (too few values to be forecast)"


def _per_event(cpu_s: dict, events: int) -> str:
    total = sum(cpu_s.values())
    parts = ", ".join(f"{name} {1e6 * spent / events:,.0f}" for name, spent in cpu_s.items() if 1e6 * spent / events >= 0.5)
    return f"total {1e6 * total / events:,.0f}; {parts}"


def _stages(seconds: dict) -> str:
    return ", ".join(f"{stage} {spent:g}" for stage, spent in seconds.items())


def main(events: int, rate: float, seconds: float, consumers: int, write: bool, console) -> Figures:
    figures = run(events, rate, seconds, consumers, console)
    command = f"rtml bench stream --events {events} --rate {rate:g} --seconds {seconds:g} --consumers {consumers}"
    text = report(figures, command)
    console.print(text)
    console.print(json.dumps(asdict(figures), indent=1))
    if write:
        write_section("streaming", text)
    return figures
