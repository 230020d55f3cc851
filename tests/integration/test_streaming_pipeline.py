"""The whole stream path on real parts: Kafka (the test broker), consumer actors on Ray, the Serve
app's ModelRouter with trained models, Iceberg tables on SQLite. Each test replays a fresh set of
events, most of them disturbing the run mid-way: kill -9 of a consumer, of a model replica or of
the lakehouse sink, a broker restart, a catalog that refuses commits for a while. Afterwards every
valid event has exactly one prediction row, and bad records are dead letters with their reasons.
Others take the paths less travelled: per-tenant topics, binary camera frames for the image model,
the embedded event log that HTTP ingestion appends to."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import time
import uuid
from contextlib import closing
from datetime import datetime, timedelta, timezone

import numpy as np
import orjson
import pyarrow.compute as pc
import pytest

from observability import metrics
from rtml.settings import Settings

TENANTS = ("acme", "globex")
ENTITIES = 4
READINGS = 400  # per entity
WINDOW_LENGTH = 16
START = datetime(2025, 3, 1, tzinfo=timezone.utc)
CAMERA_MODEL = "acme-camera"
FRAME_SHAPE = (16, 16)
MALFORMED = [b"{not json", orjson.dumps({"tenant": "acme", "entity": "pump-0", "event_time": "soon", "value": 1.0})]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def stack(ray_cluster, tmp_path_factory):
    """A lakehouse with one trained, promoted CNN per tenant, and the Serve app scoring with them."""
    from ray import serve

    from lakehouse import Lakehouse
    from models.scoring import fit_scorer, save_scorer
    from rtml.schemas import ModelVersion
    from deployments.stream_client import deploy_scoring

    home = tmp_path_factory.mktemp("streaming-home")
    settings = Settings(
        home=home,
        models={"window_length": WINDOW_LENGTH},
        serving={"app_name": "rtml-streaming-tests", "persist_predictions": False, "model_kinds": ("cnn", "image_cnn"), "http_port": _free_port()},
        # Small batches, frequent commits and a short leash: the replays become durable in many
        # small steps, so that a disturbance lands mid-way.
        streaming={
            "consumers": 2,
            "max_poll_records": 150,
            "max_in_flight_events": 300,
            "window_seconds": 60,
            "slide_seconds": 30,
            "allowed_lateness_seconds": 20,
        },
        lakehouse={"writer_flush_seconds": 0.2},
    )
    settings = settings.model_copy(update={"home": settings.home_dir})
    lake = Lakehouse.open(settings)
    rng = np.random.default_rng(1)
    for tenant in TENANTS:
        series = [np.sin(np.arange(300) / 20) + rng.normal(0, 0.1, 300)]
        uri = save_scorer(fit_scorer("cnn", series, window_length=WINDOW_LENGTH, epochs=1), home / "models" / tenant)
        model = lake.registry.register(ModelVersion(name=f"{tenant}-cnn", version=0, kind="cnn", tenant=tenant, artifact_uri=uri))
        lake.registry.promote(model.name, model.version)
    camera = fit_scorer("image_cnn", [_camera_frames(np.random.default_rng(2), 300) / np.float32(255)], epochs=8)
    model = lake.registry.register(
        ModelVersion(name=CAMERA_MODEL, version=0, kind="image_cnn", tenant="acme", artifact_uri=save_scorer(camera, home / "models" / "camera"))
    )
    lake.registry.promote(model.name, model.version)
    client = deploy_scoring(settings)
    yield settings, client, lake
    serve.delete(settings.serving.app_name)


def _camera_frames(rng: np.random.Generator, count: int) -> np.ndarray:
    """uint8 frames of a dull, evenly lit scene, as a camera would send them."""
    return (255 * (0.3 + 0.05 * rng.random((count, *FRAME_SHAPE)))).astype(np.uint8)


def _run_settings(settings: Settings, run: str, topic_layout: str = "shared") -> Settings:
    kafka = settings.kafka.model_copy(
        update={"topic_prefix": run, "dead_letter_topic": f"{run}.dead-letter", "consumer_group": run, "topic_layout": topic_layout}
    )
    return settings.model_copy(update={"kafka": kafka, "streaming": settings.streaming.model_copy(update={"source": "kafka"})})


def _events(run: str) -> list[dict]:
    rng = np.random.default_rng(abs(hash(run)) % 2**32)
    events = []
    for step in range(READINGS):
        for tenant in TENANTS:
            for entity in range(ENTITIES):
                events.append(
                    {
                        "event_id": f"{run}.{tenant}.{entity}.{step}",
                        "tenant": tenant,
                        "entity": f"sensor-{entity}",
                        "event_time": (START + timedelta(seconds=5 * step)).isoformat(),
                        "value": float(np.sin(step / 20) + rng.normal(0, 0.1)),
                    }
                )
    return events


def _produce(settings: Settings, events: list[dict]) -> None:
    from streaming.sources.kafka import EventProducer, ensure_topics, events_topic

    ensure_topics(settings.kafka, [*(events_topic(settings.kafka, tenant) for tenant in TENANTS), settings.kafka.dead_letter_topic])
    producer = EventProducer(settings.kafka)
    for i, event in enumerate(events):
        producer.send(event)
        if i in (100, 2000):
            producer.send({"tenant": "acme", "entity": "sensor-0"}, value=MALFORMED[i // 2000])
    producer.flush()
    producer.close()


@pytest.fixture
def produced(stack, kafka_bootstrap):
    """A fresh topic, consumer group and dead-letter topic, holding a fresh set of events."""
    settings, client, lake = stack
    run = f"rtml-test-{uuid.uuid4().hex[:8]}"
    settings = _run_settings(settings, run)
    events = _events(run)
    _produce(settings, events)
    return settings, client, lake, run, events


def _replay(settings: Settings, client, disturb=None, disturb_at: float = 0.3, group: str = "") -> tuple[list[dict], dict]:
    """Consume the run's topic (or the embedded event log, for ``streaming.source = "log"``) to its
    end as consumer group ``group`` (default: the Kafka consumer group), calling ``disturb(pipeline)``
    once ``disturb_at`` of it is durable; returns the consumers' stats and the progress seen when
    disturbed."""
    import ray

    from streaming.pipeline import Pipeline
    from streaming.sources import eventlog, kafka

    pipeline = Pipeline(settings, client, group=group or settings.kafka.consumer_group)
    seen: dict = {}
    try:
        pipeline.start()
        pipeline.finish_at(eventlog.log_end_offsets(settings) if settings.streaming.source == "log" else kafka.log_end_offsets(settings.kafka))
        if disturb is not None:
            deadline = time.monotonic() + 180
            while (progress := pipeline.progress()).durable < disturb_at * max(progress.total, 1) and time.monotonic() < deadline:
                time.sleep(0.05)
            seen = {"durable": progress.durable, "total": progress.total, "pids": pipeline.consumer_pids()}
            disturb(pipeline)
        stats = pipeline.wait(timeout_s=400)
        seen["metrics"] = metrics.exposition().decode()  # the lag, exported by the pipeline's owner: this process
        seen["pids_after"] = pipeline.consumer_pids()
        seen["sink_pid_after"] = ray.get(pipeline.sink.pid.remote())
        return stats, seen
    finally:
        pipeline.shutdown()


def _assert_exactly_one_prediction_per_event(lake, run: str, events: list[dict], table: str = "predictions") -> None:
    ids = lake.read(table, columns=("event_id",))["event_id"]
    mine = ids.filter(pc.starts_with(ids, run + ".")).to_pylist()
    assert len(mine) == len(set(mine)), f"an event has more than one row in {table}"
    assert set(mine) == {event["event_id"] for event in events}


def _records(settings: Settings, topic: str) -> list:
    """Every record of ``topic``."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(topic, bootstrap_servers=settings.kafka.bootstrap_servers, auto_offset_reset="earliest", consumer_timeout_ms=3000)
    try:
        return list(consumer)
    finally:
        consumer.close()


def _dead_letters(settings: Settings) -> list[tuple[bytes, dict]]:
    return [(record.value, dict(record.headers)) for record in _records(settings, settings.kafka.dead_letter_topic)]


@pytest.mark.services
def test_a_consumer_killed_mid_replay_resumes_without_loss_or_duplicates(produced):
    settings, client, lake, run, events = produced

    def kill_first_consumer(pipeline) -> None:
        os.kill(pipeline.consumer_pids()[0], signal.SIGKILL)

    stats, seen = _replay(settings, client, kill_first_consumer)

    assert 0 < seen["durable"] < seen["total"], "the consumer was not killed mid-replay"
    assert seen["pids_after"][0] != seen["pids"][0], "Ray did not restart the killed consumer"
    assert stats[0]["restarts_from_checkpoint"] >= 1
    _assert_exactly_one_prediction_per_event(lake, run, events)
    letters = _dead_letters(settings)  # at-least-once: a letter may repeat after the kill
    assert {value for value, _ in letters} == set(MALFORMED)
    reasons = {value: headers["rtml-reason"].decode() for value, headers in letters}
    assert "not valid JSON" in reasons[MALFORMED[0]] and "event_time" in reasons[MALFORMED[1]]
    # Lag is exported per partition, and is zero once everything is durable.
    lag_lines = [line for line in seen["metrics"].splitlines() if line.startswith("rtml_consumer_lag_events{") and f'group="{run}"' in line]
    assert lag_lines and all(line.endswith(" 0.0") for line in lag_lines)


@pytest.mark.services
def test_a_broker_restart_mid_replay_loses_and_duplicates_nothing(produced):
    from cluster import services

    settings, client, lake, run, events = produced

    stats, seen = _replay(settings, client, lambda pipeline: services.get("kafka").restart())

    assert 0 < seen["durable"] < seen["total"]
    _assert_exactly_one_prediction_per_event(lake, run, events)
    assert sum(s["read"] for s in stats) >= len(events)


@pytest.mark.services
def test_a_model_replica_killed_mid_replay_loses_and_duplicates_nothing(produced):
    import psutil

    settings, client, lake, run, events = produced
    replica = f"ServeReplica:{settings.serving.app_name}:ModelScorer_cnn"

    def kill_model_replica(pipeline) -> None:
        # Ray titles a replica's process "ray::ServeReplica:<app>:<deployment>". Only this session's
        # Ray cluster, which runs under the test process: another test session may run the same app.
        ours = psutil.Process().children(recursive=True)
        (pid,) = [p.pid for p in ours if any(replica in part for part in _cmdline(p))]
        os.kill(pid, signal.SIGKILL)

    _, seen = _replay(settings, client, kill_model_replica)

    assert 0 < seen["durable"] < seen["total"]
    _assert_exactly_one_prediction_per_event(lake, run, events)


@pytest.mark.services
def test_a_sink_killed_mid_replay_loses_and_duplicates_nothing(produced):
    """The sink's process dies with writes in flight (some perhaps committed, not yet answered):
    Ray restarts it and resubmits them, and the idempotent appends keep one row per key."""
    import ray

    settings, client, lake, run, events = produced
    killed = []

    def kill_sink(pipeline) -> None:
        killed.append(ray.get(pipeline.sink.pid.remote()))
        os.kill(killed[0], signal.SIGKILL)

    _, seen = _replay(settings, client, kill_sink)

    assert 0 < seen["durable"] < seen["total"]
    assert seen["sink_pid_after"] != killed[0], "Ray did not restart the killed sink"
    _assert_exactly_one_prediction_per_event(lake, run, events)
    _assert_exactly_one_prediction_per_event(lake, run, events, table="events")
    feature_ids = lake.read("features", columns=("feature_id",))["feature_id"]
    assert len(pc.unique(feature_ids)) == len(feature_ids)


@pytest.mark.services
def test_a_failed_lakehouse_write_rewinds_the_consumers_to_their_checkpoints(produced):
    """The catalog refuses commits for a while (another process holds SQLite's write lock): the
    sink's write fails, the running consumers rewind to their checkpoints and read again, and
    nothing is lost or written twice."""
    settings, client, lake, run, events = produced
    settings = settings.model_copy(update={"lakehouse": settings.lakehouse.model_copy(update={"commit_retries": 1})})
    catalog = settings.home_dir / "lakehouse" / "catalog.db"

    def lock_the_catalog(_pipeline) -> None:
        # Longer than SQLite's 5 s busy timeout, so that a waiting commit gives up.
        with closing(sqlite3.connect(catalog, timeout=30, isolation_level=None)) as db:
            db.execute("BEGIN EXCLUSIVE")
            time.sleep(8)
            db.execute("ROLLBACK")

    stats, seen = _replay(settings, client, lock_the_catalog)

    assert 0 < seen["durable"] < seen["total"]
    assert seen["pids_after"] == seen["pids"], "a consumer process died; the rewind in place was not what recovered"
    assert sum(s["restarts_from_checkpoint"] for s in stats) >= 1, "no consumer saw the failed write"
    _assert_exactly_one_prediction_per_event(lake, run, events)
    _assert_exactly_one_prediction_per_event(lake, run, events, table="events")


@pytest.mark.services
def test_per_tenant_topics_are_consumed_side_by_side(stack, kafka_bootstrap):
    """``kafka.topic_layout = "tenant"``: each tenant's events travel in its own topic, and one
    pipeline's consumers share the partitions of all of them."""
    settings, client, lake = stack
    run = f"rtml-test-{uuid.uuid4().hex[:8]}"
    settings = _run_settings(settings, run, topic_layout="tenant")
    events = _events(run)
    _produce(settings, events)

    stats, _ = _replay(settings, client)

    for tenant in TENANTS:
        keys = {record.key.decode() for record in _records(settings, f"{run}.events.{tenant}")}
        assert keys == {f"{tenant}/sensor-{e}" for e in range(ENTITIES)}
    consumed = {partition.split(":")[0] for s in stats for partition in s["partitions"]}
    assert consumed == {f"{run}.events.{tenant}" for tenant in TENANTS}
    _assert_exactly_one_prediction_per_event(lake, run, events)


@pytest.mark.services
def test_binary_frames_are_scored_by_the_image_model_on_the_stream_path(stack, kafka_bootstrap):
    """Camera frames sent as binary records among JSON metric events: the DataRouter sends them to
    the tenant's image model, whose predictions flag the damaged frames; the raw frames land in
    the events table."""
    from streaming.sources.kafka import EventProducer

    settings, client, lake = stack
    run = f"rtml-test-{uuid.uuid4().hex[:8]}"
    settings = _run_settings(settings, run)
    frames = _camera_frames(np.random.default_rng(3), 40)
    damaged = set(range(0, len(frames), 4))
    for i in damaged:
        frames[i, 4:10, 4:10] = 255
    shots = [
        {"event_id": f"{run}.frame.{i}", "tenant": "acme", "entity": f"camera-{i % 2}", "event_time": (START + timedelta(seconds=i)).isoformat()}
        for i in range(len(frames))
    ]
    metric_events = _events(run)[:800]
    _produce(settings, metric_events)
    producer = EventProducer(settings.kafka)
    for shot, frame in zip(shots, frames):
        producer.send_frame(shot, frame)
    producer.flush()
    producer.close()

    _replay(settings, client)

    _assert_exactly_one_prediction_per_event(lake, run, [*metric_events, *shots])
    predictions = lake.read("predictions", columns=("event_id", "is_anomaly", "model_versions")).to_pylist()
    scored = {row["event_id"]: row for row in predictions if row["event_id"].startswith(f"{run}.frame.")}
    assert all(dict(row["model_versions"]).keys() == {CAMERA_MODEL} for row in scored.values())
    flagged = {int(event_id.rsplit(".", 1)[1]) for event_id, row in scored.items() if row["is_anomaly"]}
    assert flagged == damaged
    landed = lake.read("events", columns=("event_id", "data_type", "payload")).to_pylist()
    frame_rows = {row["event_id"]: row for row in landed if row["event_id"].startswith(f"{run}.frame.")}
    assert {row["data_type"] for row in frame_rows.values()} == {"image"}
    assert frame_rows[f"{run}.frame.4"]["payload"] == frames[4].tobytes()
    assert [value for value, _ in _dead_letters(settings)] == [MALFORMED[0]]  # the one _produce sent among these events


def test_events_ingested_into_the_embedded_log_are_scored_once_though_a_consumer_is_killed(stack, tmp_path):
    """``streaming.source = "log"``: events taken in by the ingestion core (what POST /v1/events
    does) into the embedded event log, consumed from there by the stream with a consumer killed
    mid-way: every event has exactly one prediction row and one events row."""
    from api.ingest import Ingestor

    settings, client, lake = stack
    run = f"rtml-test-{uuid.uuid4().hex[:8]}"
    settings = settings.model_copy(update={"streaming": settings.streaming.model_copy(update={"source": "log", "event_log_dir": str(tmp_path / "log")})})
    events = _events(run)
    ingestor = Ingestor.open(settings)
    for start in range(0, len(events), 500):
        for tenant in TENANTS:
            result = ingestor.ingest_documents(tenant, [e for e in events[start : start + 500] if e["tenant"] == tenant])
            assert result.rejected == []
    ingestor.close()

    def kill_first_consumer(pipeline) -> None:
        os.kill(pipeline.consumer_pids()[0], signal.SIGKILL)

    stats, seen = _replay(settings, client, kill_first_consumer, group=run)

    assert 0 < seen["durable"] < seen["total"], "the consumer was not killed mid-way"
    assert seen["pids_after"][0] != seen["pids"][0], "Ray did not restart the killed consumer"
    assert stats[0]["restarts_from_checkpoint"] >= 1
    assert {p for s in stats for p in s["partitions"]} == {f"eventlog:{p}" for p in range(settings.streaming.event_log_partitions)}
    _assert_exactly_one_prediction_per_event(lake, run, events)
    _assert_exactly_one_prediction_per_event(lake, run, events, table="events")
    assert sum(s["dead_letters"] for s in stats) == 0


def _cmdline(process) -> list[str]:
    import psutil

    try:
        return process.cmdline()
    except psutil.Error:  # it ended meanwhile
        return []


def test_the_file_replay_survives_a_killed_consumer_and_keeps_late_and_bad_records_apart(stack, tmp_path):
    """The embedded default: the bundled-style CSV replay, one consumer killed mid-way."""
    from streaming.deadletters import FileDeadLetters
    from streaming.pipeline import Pipeline

    settings, client, lake = stack
    run = f"rtml-test-{uuid.uuid4().hex[:8]}"
    events = _events(run)
    late_ok = {**events[-1], "event_id": f"{run}.late-ok", "event_time": (START + timedelta(seconds=5 * READINGS - 20)).isoformat()}
    too_late = {**events[-1], "event_id": f"{run}.too-late", "event_time": (START + timedelta(seconds=5 * READINGS - 100)).isoformat()}
    no_model = {**events[-1], "event_id": f"{run}.no-model", "tenant": "initech"}  # a tenant without models: the detector alone
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join([*(orjson.dumps(e) for e in events), b"{oops", orjson.dumps(late_ok), orjson.dumps(too_late), orjson.dumps(no_model)]) + b"\n")
    settings = settings.model_copy(
        update={"streaming": settings.streaming.model_copy(update={"source": "replay", "replay_speed": 0.0, "dead_letter_dir": str(tmp_path / "dead")})}
    )
    pipeline = Pipeline(settings, client, group=run, replay_path=str(path))
    try:
        pipeline.start(until_end=True)
        deadline = time.monotonic() + 180
        while (progress := pipeline.progress()).durable < 0.3 * max(progress.total, 1) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert progress.durable < progress.total
        os.kill(pipeline.consumer_pids()[1], signal.SIGKILL)
        stats = pipeline.wait(timeout_s=400)
    finally:
        pipeline.shutdown()

    _assert_exactly_one_prediction_per_event(lake, run, [*events, late_ok, no_model])
    (row,) = lake.read("predictions", "initech", columns=("event_id", "ensemble_score", "scores")).to_pylist()
    assert row["event_id"] == no_model["event_id"] and row["ensemble_score"] == 0 and dict(row["scores"]).keys() == {"detector"}
    assert sum(s["late"] for s in stats) >= 1 and sum(s["dropped"] for s in stats) >= 1
    letters = {letter["payload"]: letter["reason"] for letter in FileDeadLetters(tmp_path / "dead" / run).read()}
    assert len(letters) == 1
    assert "not valid JSON" in letters["{oops"]


def test_a_consumer_stops_reading_while_the_lakehouse_is_behind(stack, tmp_path):
    """Back-pressure: with slow lakehouse commits, a consumer never holds much more than
    ``max_in_flight_events`` events that are read but not yet durable."""
    import ray

    from streaming.pipeline import Pipeline

    settings, client, lake = stack
    run = f"rtml-test-{uuid.uuid4().hex[:8]}"
    events = _events(run)[:2000]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(e) for e in events) + b"\n")
    in_flight, per_poll = 200, 100
    settings = settings.model_copy(
        update={
            "lakehouse": settings.lakehouse.model_copy(update={"writer_flush_seconds": 0.5, "writer_batch_rows": 100_000}),
            "streaming": settings.streaming.model_copy(
                update={"source": "replay", "replay_speed": 0.0, "consumers": 1, "max_in_flight_events": in_flight, "max_poll_records": per_poll}
            ),
        }
    )
    pipeline = Pipeline(settings, client, group=run, replay_path=str(path))
    ahead = []

    def sample(_progress) -> None:
        stats = ray.get(pipeline.consumers[0].stats.remote())
        ahead.append(stats["read"] - sum(stats["positions"].values()))

    try:
        pipeline.start(until_end=True)
        pipeline.wait(on_progress=sample, every_s=0.05, timeout_s=300)
    finally:
        pipeline.shutdown()

    # It stops reading once the limit is reached, so it can be one batch past it; and one more
    # batch may be read between the two counters being looked at.
    assert max(ahead) <= in_flight + 2 * per_poll
    assert max(ahead) > per_poll, "the consumer never ran ahead of the lakehouse, so nothing was tested"
    _assert_exactly_one_prediction_per_event(lake, run, events)
