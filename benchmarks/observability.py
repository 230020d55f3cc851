"""What metrics and tracing cost the stream: `rtml bench stream --observability-overhead`.

The same pipeline as `rtml bench stream`'s (b) (Kafka -> consumers -> the Serve app's ensemble ->
Iceberg), run on a fresh local Ray cluster per measurement, alternately with observability off
(every metric update dropped, ``observability.metrics_enabled = false``; no tracing, no drift) and
on (metrics through Ray's metrics agent; drift; tracing at ``trace_sample_ratio`` 1%, its spans
exported over OTLP/HTTP to a collector stand-in in this process that accepts and drops them). Each
measurement has a lakehouse of its own (a growing one slows later runs) and they go off, on, on,
off, off, on, ... so that a trend in the machine's load hits both alike; the medians are compared.

The per-entity detector is off here: its refits dominate the stream's cost (benchmarks/RESULTS.md,
streaming), which would make any overhead look smaller than it is on the scoring path.
"""

from __future__ import annotations

import os
import shutil
import statistics
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from benchmarks.results import machine
from benchmarks.stream import TENANTS, _events, _producer, _send, prepare, run_pipeline
from rtml.settings import Settings, get_settings

SAMPLE_RATIO = 0.01


@dataclass
class Overhead:
    events: int
    consumers: int
    off_events_per_s: list[float]
    on_events_per_s: list[float]
    spans_received: int
    machine: str

    @property
    def ratio(self) -> float:
        """Median events/s with observability on, over off."""
        return statistics.median(self.on_events_per_s) / statistics.median(self.off_events_per_s)


class _Collector(BaseHTTPRequestHandler):
    """Accepts OTLP/HTTP exports and counts the requests (the spans are dropped)."""

    received = 0

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("content-length", 0)))
        type(self).received += 1
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def _measure(base: Settings, events: int, on: bool, endpoint: str, console) -> float:
    """Events/s of one pipeline over a fresh topic of ``events`` events, on a fresh Ray cluster,
    with a fresh lakehouse."""
    import ray

    from deployments.control import throughput_environment
    from deployments.stream_client import deploy_scoring
    from observability.logs import ray_runtime_env
    from streaming.scoring import warm_up
    from streaming.sources.kafka import ensure_topics, events_topic

    run = f"rtml-bench-obs-{uuid.uuid4().hex[:8]}"
    settings = base.model_copy(update={"home": base.home_dir / run})
    prepare(settings, console)
    kafka = settings.kafka.model_copy(update={"topic_prefix": run, "topic_layout": "shared", "dead_letter_topic": f"{run}.dead-letter", "consumer_group": run})
    observed = settings.observability.model_copy(
        update={"metrics_enabled": on, "trace_sample_ratio": SAMPLE_RATIO if on else 0.0, "otlp_endpoint": endpoint if on else "", "drift_enabled": on}
    )
    measured = settings.model_copy(update={"kafka": kafka, "observability": observed})
    ensure_topics(kafka, [events_topic(kafka, ""), kafka.dead_letter_topic])
    producer = _producer(measured)
    _send(producer, measured, _events(run, events, 1.7e9, 1.0))
    producer.flush()
    producer.close()
    # Every process of the cluster reads the metrics switch from its environment (observability.metrics).
    environment = {**throughput_environment(measured), "RTML_OBSERVABILITY__METRICS_ENABLED": "true" if on else "false"}
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False, configure_logging=False, runtime_env=ray_runtime_env(measured, environment))
    try:
        client = deploy_scoring(measured)
        warm_up(client, list(TENANTS), measured.models.window_length)
        rate, _, _ = run_pipeline(measured, client, run)
    finally:
        ray.shutdown()
    console.print(f"observability {'on ' if on else 'off'}: {rate:,.0f} events/s")
    return rate


def run(events: int, consumers: int, rounds: int, console) -> Overhead:
    base = get_settings()
    home = base.home_dir / "bench-observability"
    shutil.rmtree(home, ignore_errors=True)
    settings = base.model_copy(
        update={
            "home": home,
            "streaming": base.streaming.model_copy(update={"source": "kafka", "consumers": consumers}),
            "serving": base.serving.model_copy(update={"persist_predictions": False, "run_stream": False, "model_kinds": ("rnn", "cnn"), "app_name": "rtml-bench-obs"}),
            "detector": base.detector.model_copy(update={"enabled": False}),
        }
    )
    collector = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.server_port}/v1/traces"
    off, on = [], []
    try:
        for round_ in range(rounds):
            for on_now in (False, True) if round_ % 2 == 0 else (True, False):
                (on if on_now else off).append(_measure(settings, events, on_now, endpoint, console))
    finally:
        collector.shutdown()
    return Overhead(events, consumers, off, on, _Collector.received, machine())


def report(overhead: Overhead, command: str) -> str:
    off = ", ".join(f"{rate:,.0f}" for rate in overhead.off_events_per_s)
    on = ", ".join(f"{rate:,.0f}" for rate in overhead.on_events_per_s)
    return (
        f"Command: `{command}` ({overhead.machine}).\n\n"
        "| observability | events/s per run | median |\n|---|---|---:|\n"
        f"| off (metrics dropped, no tracing, no drift) | {off} | {statistics.median(overhead.off_events_per_s):,.0f} |\n"
        f"| on (metrics, drift, tracing at {SAMPLE_RATIO:.0%} exported over OTLP) | {on} | {statistics.median(overhead.on_events_per_s):,.0f} |\n\n"
        f"On runs at **{overhead.ratio:.1%}** of off (target: at least 95%); {overhead.spans_received} OTLP export requests received.\n"
    )


def main(events: int, consumers: int, rounds: int, console) -> Overhead:
    overhead = run(events, consumers, rounds, console)
    console.print(report(overhead, f"rtml bench stream --observability-overhead --events {events} --consumers {consumers} --rounds {rounds}"))
    return overhead
