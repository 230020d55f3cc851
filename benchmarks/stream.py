"""`rtml bench stream`: raw kafka-python consumption vs rtml's whole stream path, on one broker.

(a) raw: one kafka-python consumer polls the N events of a fresh topic and decodes each one's JSON
    (orjson, the decoder rtml uses): the limit any consumer of these events is under. Also shown
    without the decoding.
(b) rtml: the same N events through ``streaming.consumers`` consumer actors: DataRouter, windows
    and features, the ModelRouter's ensemble (an RNN and a CNN per tenant, trained first, served by
    the Serve app), and the events, features and predictions tables, offsets committed after the
    writes. Events/s from the consumers being ready to the last row being durable; afterwards the
    predictions table must hold exactly one row per event (zero loss, no duplicates).
(c) rtml at a fixed offered rate: a producer writes ``--rate`` events/s for ``--seconds`` while the
    pipeline runs; event-to-prediction latency is the predictions' ``latency_ms`` (Kafka record
    timestamp, set when the producer sent it, to the ensemble's answer), and event-to-durable comes
    from the consumers.

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

    @property
    def ratio(self) -> float:
        return self.rtml_events_per_s / self.raw_decode_events_per_s


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
            "serving": base.serving.model_copy(update={"persist_predictions": False, "model_kinds": KINDS, "app_name": "rtml-bench-stream"}),
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
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False, configure_logging=False, runtime_env={"env_vars": ray_env})
    try:
        client = deploy_scoring(settings)
        warm_up(client, list(TENANTS), settings.models.window_length)
        console.print("(b) rtml, whole path")
        rtml_rate, throughput_stats, throughput_cpu = run_pipeline(throughput, client, throughput.kafka.consumer_group)
        predictions, distinct, _ = _predictions(lake, f"{bench_id}-t")
        console.print(f"(c) rtml at {rate:g} events/s offered for {seconds:g} s")
        offered = for_run("latency")
        sent: list[int] = []
        _, stats, latency_cpu = run_pipeline(offered, client, offered.kafka.consumer_group, during=lambda: sent.append(_offer(offered, f"{bench_id}-l", rate, seconds)))
        offered_predictions, _, latency = _predictions(lake, f"{bench_id}-l")
    finally:
        ray.shutdown()
    durable = [s["event_to_durable_s"] for s in stats if s["event_to_durable_s"]]
    ensemble_rate = measure_ensemble(lake, settings.models.window_length, settings.streaming.max_poll_records)
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
    )


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


def report(figures: Figures, command: str) -> str:
    f = figures
    loss = "zero loss, no duplicates" if f.rtml_predictions == f.rtml_distinct_predictions == f.events else (
        f"LOSS/DUPLICATES: {f.rtml_predictions} rows for {f.rtml_distinct_predictions} distinct of {f.events} events"
    )
    offered_loss = "all scored" if f.offered_predictions == f.offered_events else f"{f.offered_predictions} of {f.offered_events} scored"
    return f"""## Streaming: raw kafka-python vs rtml's whole stream path

Command: `{command}` (one Kafka broker from `rtml services up kafka`; {f.machine}).

| system | events/s | notes |
|---|---:|---|
| (a) raw kafka-python, poll + orjson decode | {f.raw_decode_events_per_s:,.0f} | the limit; one consumer, {f.events:,} events of ~130 bytes |
| (a') raw kafka-python, poll only | {f.raw_poll_only_events_per_s:,.0f} | for scale |
| (b) rtml: consume -> features -> RNN+CNN ensemble -> Iceberg | {f.rtml_events_per_s:,.0f} | {f.consumers} consumer actors; {loss} |

(b) reaches **{100 * f.ratio:.1f}%** of (a) (target: at least 50%).

At a fixed offered rate of {f.offered_rate:,.0f} events/s ({f.offered_events:,} events, {offered_loss}):

| | p50 | p99 |
|---|---:|---:|
| event -> prediction (Kafka timestamp to ensemble score) | {f.p50_ms:,.0f} ms | {f.p99_ms:,.0f} ms |
| event -> durable in Iceberg (worst consumer) | {f.durable_p50_ms:,.0f} ms | {f.durable_p99_ms:,.0f} ms |

Target: p99 event -> prediction at most 250 ms at 2,000 events/s offered. Its two parts, p99 of the
worst consumer: available in Kafka -> read {f.read_delay_p99_ms:,.0f} ms; one scoring round trip
(consumer -> ModelRouter -> scorers -> consumer) {f.scoring_round_trip_p99_ms:,.0f} ms.

For scale: the ensemble's forward alone (RNN + CNN, the bench's models, in one process, one torch thread, batches of the consumers' poll size) scores {f.ensemble_windows_per_s:,.0f} windows/s.
Where the consumers' time went (seconds, summed over consumers; `score` is the scoring round trips, which overlap the other stages): (b) {_stages(f.throughput_seconds)}; (c) {_stages(f.latency_seconds)}.
Mean events per consumer batch: (b) {f.throughput_batch:,.0f}; (c) {f.latency_batch:,.0f}.
CPU seconds spent during (b) ({f.events:,} events), by process: {_stages(f.throughput_cpu_s)}.
CPU seconds spent during (c) ({f.offered_events:,} events offered over {f.offered_events / f.offered_rate:g} s), by process: {_stages(f.latency_cpu_s)}.
"""


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
