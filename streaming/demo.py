"""`rtml demo`: the bundled sensor streams through the whole pipeline, then a summary.

1. a fresh demo home (``<home>/demo``: its own lakehouse, checkpoints and dead letters);
2. per tenant, a CNN and an RNN forecaster trained on the clean first hours of its sensors,
   registered and promoted in the lakehouse registry; and per sensor the stream's detector, which
   learns on the same first hours (``detector.learning_rows``) and refits itself as it goes;
3. the Serve app (the caller's ``start_scoring`` deploys it and returns the client to its router);
4. the replay, from the file or (``kafka=True``) produced into a real broker as it goes, through
   the consumer actors, with a progress bar;
5. the summary: events, predictions, injected anomalies found (by the detector, by the tenant
   ensembles, by either: a reading is flagged when either says so), event-to-prediction latency and
   where the data lives (the caller then asks the app's GraphQL API, ``while_serving``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rtml.errors import RtmlError
from rtml.schemas import DETECTOR_MEMBER, ModelVersion
from rtml.settings import Settings
from streaming.data.generate import EVENTS_FILE, STEP_SECONDS, TRAINING_HOURS, TRUTH_FILE
from streaming.features import feature_set_version, window_spec
from streaming.pipeline import Pipeline, Progress as PipelineProgress
from streaming.scoring import AnomalyListener, EnsembleClient, warm_up
from streaming.sources.replay import ReplaySource, read_records

DEMO_KINDS = ("cnn", "rnn")
TRAINING_EPOCHS = 4
# The six hours of the bundled streams pass in about a minute.
DEFAULT_SPEED = 360.0
# An anomaly counts as found if a reading within this long after its last affected one is flagged
# (a forecaster notices the return to normal too).
FOUND_GRACE = timedelta(seconds=30)


@dataclass
class DemoResult:
    settings: Settings
    events_in_file: int
    elapsed_s: float
    predictions: int
    distinct_predicted_events: int
    flagged: int
    found: dict[str, tuple[int, int]]  # anomaly kind -> (found, injected)
    found_by: dict[str, int]  # "detector" / "ensemble" -> injected anomalies each found
    false_alarms: int
    latency_ms: dict[int, float]
    stats: list[dict]
    models: list[ModelVersion] = field(default_factory=list)

    def total(self, key: str) -> int:
        return sum(s[key] for s in self.stats)


def demo_settings(settings: Settings, kafka: bool, speed: float, run_id: str) -> Settings:
    """The demo's own home and its streaming, Kafka and serving choices on top of ``settings``."""
    home = settings.home_dir / "demo"
    streaming = settings.streaming.model_copy(
        update={"source": "kafka" if kafka else "replay", "replay_path": str(EVENTS_FILE), "replay_speed": speed, "checkpoint_dir": "", "dead_letter_dir": ""}
    )
    prefix = f"rtml-demo-{run_id}"
    kafka_settings = settings.kafka.model_copy(
        update={"topic_prefix": prefix, "dead_letter_topic": f"{prefix}.dead-letter", "consumer_group": prefix}
    )
    # The consumers write the predictions (and commit offsets after); the router need not, and the
    # app runs no stream of its own beside the demo's. A free HTTP port, so that an `rtml up`
    # cluster on the same machine is no obstacle.
    serving = settings.serving.model_copy(
        update={"persist_predictions": False, "run_stream": False, "model_kinds": DEMO_KINDS, "http_port": _free_port()}
    )
    # Each sensor's detector learns on the clean hours the tenant models are trained on.
    detector = settings.detector.model_copy(update={"enabled": True, "learning_rows": int(TRAINING_HOURS * 3600 / STEP_SECONDS)})
    return settings.model_copy(
        update={
            "home": home,
            "lakehouse": settings.lakehouse.model_copy(update={"catalog_uri": "", "warehouse": ""}),
            "streaming": streaming,
            "kafka": kafka_settings,
            "serving": serving,
            "detector": detector,
        }
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def training_series(truth: dict) -> dict[str, list[np.ndarray]]:
    """Per tenant, each sensor's clean readings before the end of the training span, in time order."""
    end = truth["training_end"]
    readings: dict[tuple[str, str], list[tuple[str, float]]] = {}
    for record in read_records(EVENTS_FILE):
        if not isinstance(record, dict) or not record.get("entity") or record.get("event_time", "~") >= end:
            continue
        try:
            value = float(record["value"])
        except (KeyError, ValueError):
            continue
        if np.isfinite(value):
            readings.setdefault((record["tenant"], record["entity"]), []).append((record["event_time"], value))
    series: dict[str, list[np.ndarray]] = {}
    for (tenant, _), points in sorted(readings.items()):
        series.setdefault(tenant, []).append(np.array([value for _, value in sorted(points)]))
    return series


def train_models(lake, settings: Settings, truth: dict, directory: Path, report: Callable[[str], None]) -> list[ModelVersion]:
    from models.scoring import fit_scorer, save_scorer

    version = feature_set_version(window_spec(settings))
    registered = []
    for tenant, series in training_series(truth).items():
        for kind in DEMO_KINDS:
            report(f"training {tenant}'s {kind} model on {sum(map(len, series))} clean readings")
            started = time.monotonic()
            scorer = fit_scorer(kind, series, window_length=settings.models.window_length, epochs=TRAINING_EPOCHS, device=settings.models.device)
            uri = save_scorer(scorer, directory / f"{tenant}-{kind}")
            model = ModelVersion(
                name=f"{tenant}-{kind}",
                version=0,
                kind=kind,
                tenant=tenant,
                artifact_uri=uri,
                metrics={"training_seconds": time.monotonic() - started, "error_scale": scorer.error_scale},
                feature_set_version=version,
            )
            model = lake.registry.register(model)
            registered.append(lake.registry.promote(model.name, model.version))
    return registered


def _produce(settings: Settings, speed: float, clock_start: float, done: threading.Event, failure: list) -> None:
    """Replay the bundled file into Kafka at the demo's pace (a thread)."""
    from streaming.sources.kafka import EventProducer

    try:
        source = ReplaySource(EVENTS_FILE, 1, [0], speed)
        source.start_clock(clock_start)
        producer = EventProducer(settings.kafka)
        while source.remaining:
            for payload in source.poll(10_000, 0.05).payloads:
                producer.send(payload)  # type: ignore[arg-type]
        producer.flush()
        producer.close()
    except Exception as error:  # reported by the main thread
        failure.append(error)
    finally:
        done.set()


def run_demo(
    settings: Settings,
    start_scoring: Callable[[Settings], EnsembleClient],
    console: Console,
    kafka: bool = False,
    speed: float = DEFAULT_SPEED,
    ray_env: dict[str, str] | None = None,
    while_serving: Callable[[Settings], None] | None = None,
    listener: Callable[[Settings], AnomalyListener | None] = lambda settings: None,
) -> DemoResult:
    """The demo (see the module docstring); ``ray_env`` goes to every process of the local Ray
    cluster it starts (Serve's throughput options, from the caller), whose processes log JSON
    lines (observability.logs, read by `rtml logs`). ``while_serving(demo
    settings)`` runs after the replay, while the app still serves (the caller's query of it);
    ``listener(demo settings)`` hears of the stream's durable anomalies (the app's agent graph)."""
    import ray

    from lakehouse import Lakehouse
    from observability.logs import ray_runtime_env

    run_id = time.strftime("%Y%m%d-%H%M%S")
    demo = demo_settings(settings, kafka, speed, run_id)
    if demo.home_dir.exists():
        console.print(f"[dim]removing the previous demo's data in {demo.home_dir}[/]")
        shutil.rmtree(demo.home_dir)
    truth = json.loads(TRUTH_FILE.read_text())
    lake = Lakehouse.open(demo)
    with console.status("training") as status:
        models = train_models(lake, demo, truth, demo.home_dir / "models", lambda message: status.update(message))
    console.print(f"trained and promoted {len(models)} models: {', '.join(model.key for model in models)}")

    if kafka:
        from streaming.sources.kafka import ensure_topics, events_topic

        tenants = sorted({model.tenant for model in models})
        ensure_topics(demo.kafka, [*(events_topic(demo.kafka, t) for t in tenants), demo.kafka.dead_letter_topic])
    ray.init(
        num_cpus=max(4, os.cpu_count() or 1),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env=ray_runtime_env(demo, ray_env),
    )
    try:
        with console.status("starting the Serve app (ingress, router, one scorer deployment per model kind)"):
            client = start_scoring(demo)
            warm_up(client, sorted({model.tenant for model in models}), demo.models.window_length)
        result = _replay(demo, client, console, truth, models, kafka, speed, lake, listener(demo))
        if while_serving is not None:
            while_serving(demo)
        return result
    finally:
        ray.shutdown()


def _replay(demo: Settings, client, console: Console, truth: dict, models, kafka: bool, speed: float, lake, listener: AnomalyListener | None) -> DemoResult:
    pipeline = Pipeline(demo, client, group=demo.kafka.consumer_group if kafka else "demo", replay_path=str(EVENTS_FILE), listener=listener)
    produced, failure = threading.Event(), []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("events durable in the lakehouse", total=truth["events"])
        pipeline.start(until_end=not kafka)
        if kafka:
            from streaming.sources.kafka import log_end_offsets

            threading.Thread(target=_produce, args=(demo, speed, pipeline.clock_start, produced, failure), daemon=True).start()

        def on_progress(progress: PipelineProgress) -> None:
            bar.update(task, completed=progress.durable)
            if kafka and produced.is_set() and not pipeline.finishing:
                if failure:
                    raise RtmlError(f"producing the demo events into Kafka failed: {failure[0]}")
                pipeline.finish_at(log_end_offsets(demo.kafka))

        try:
            stats = pipeline.wait(on_progress)
        finally:
            pipeline.shutdown()
    return summarize(lake, demo, truth, stats, models, time.time() - pipeline.clock_start)


def summarize(lake, settings: Settings, truth: dict, stats: list[dict], models, elapsed_s: float) -> DemoResult:
    tenants = sorted({sensor["tenant"] for sensor in truth["sensors"]})
    columns = ("event_id", "entity", "event_time", "is_anomaly", "scores", "ensemble_score", "latency_ms")
    rows = [lake.read("predictions", tenant=t, columns=columns) for t in tenants]
    found: dict[str, list[int]] = {}
    found_by = {"detector": 0, "ensemble": 0}
    flagged_total, matched_flags, predictions, distinct = 0, 0, 0, 0
    latencies = []
    for tenant, table in zip(tenants, rows):
        predictions += table.num_rows
        distinct += len(pc.unique(table["event_id"]))
        latencies.append(table["latency_ms"].to_numpy())
        flagged = table.filter(table["is_anomaly"])
        flagged_total += flagged.num_rows
        flags = list(zip(flagged["entity"].to_pylist(), flagged["event_time"].to_pylist()))
        member = pa.scalar(DETECTOR_MEMBER, flagged.schema.field("scores").type.key_type)
        by_detector = (pc.fill_null(pc.map_lookup(flagged["scores"], member, "first"), 0.0).to_numpy() >= settings.detector.threshold).tolist()
        by_ensemble = (flagged["ensemble_score"].to_numpy() >= settings.models.anomaly_threshold).tolist()
        explained = set()
        for anomaly in (a for a in truth["anomalies"] if a["tenant"] == tenant):
            start = datetime.fromisoformat(anomaly["start"])
            end = datetime.fromisoformat(anomaly["end"]) + FOUND_GRACE
            hits = {i for i, (entity, at) in enumerate(flags) if entity == anomaly["entity"] and start <= at <= end}
            explained |= hits
            tally = found.setdefault(anomaly["kind"], [0, 0])
            tally[0] += bool(hits)
            tally[1] += 1
            found_by["detector"] += any(by_detector[i] for i in hits)
            found_by["ensemble"] += any(by_ensemble[i] for i in hits)
        matched_flags += len(explained)
    latency = np.concatenate(latencies) if latencies else np.empty(0)
    return DemoResult(
        settings=settings,
        events_in_file=truth["events"],
        elapsed_s=elapsed_s,
        predictions=predictions,
        distinct_predicted_events=distinct,
        flagged=flagged_total,
        found={kind: (a, b) for kind, (a, b) in sorted(found.items())},
        found_by=found_by,
        false_alarms=flagged_total - matched_flags,
        latency_ms={q: float(np.percentile(latency, q)) for q in (50, 99)} if len(latency) else {},
        stats=stats,
        models=models,
    )


def print_summary(result: DemoResult, truth: dict, console: Console) -> None:
    settings = result.settings
    lateness = settings.streaming.allowed_lateness_seconds
    late_within = sum(1 for late in truth["late"] if late["seconds_late"] <= lateness)
    table = Table(title="rtml demo", show_header=False, title_style="bold")
    table.add_column(style="bold")
    table.add_column()
    found, injected = (sum(v[i] for v in result.found.values()) for i in (0, 1))
    table.add_row("events replayed", f"{result.events_in_file} in {result.elapsed_s:.0f} s ({result.events_in_file / result.elapsed_s:.0f} events/s)")
    table.add_row("predictions", f"{result.predictions} rows for {result.distinct_predicted_events} distinct events")
    table.add_row(
        "anomalies found",
        f"[bold]{found} of {injected} injected[/] ("
        + ", ".join(f"{kind} {a}/{b}" for kind, (a, b) in result.found.items())
        + f"); by the stream's per-sensor detector {result.found_by['detector']}, by the tenant ensembles {result.found_by['ensemble']}; "
        + f"{result.flagged} readings flagged, {result.false_alarms} of them outside every injected anomaly",
    )
    latency = result.latency_ms
    table.add_row("event -> prediction", f"p50 {latency.get(50, float('nan')):.0f} ms, p99 {latency.get(99, float('nan')):.0f} ms")
    table.add_row(
        "late events",
        f"{result.total('late')} counted within the {lateness:g} s allowed lateness, {result.total('dropped')} dropped beyond it "
        f"(injected: {late_within} within, {len(truth['late']) - late_within} beyond)",
    )
    table.add_row("dead letters", f"{result.total('dead_letters')} (injected malformed: {truth['malformed']}) in {result.stats[0]['dead_letter_location']}")
    table.add_row("feature windows", f"{result.total('feature_windows')} rows in the features table")
    console.print(table)
    lake_dir = settings.home_dir / "lakehouse"
    console.print(f"Data: Iceberg tables events, features, predictions (catalog {lake_dir / 'catalog.db'}, files under {lake_dir / 'warehouse'}).")
