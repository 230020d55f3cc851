"""The per-entity detector on the stream path, on real parts: the test broker, consumer actors on
Ray, the Serve app's ModelRouter and EntityForecaster (per-entity networks, fitted by Ray tasks and
registered in the lakehouse registry), Iceberg tables on SQLite.

- The stream scores a series exactly as the offline detector does (`rtml nab` and `--offline`).
- A run disturbed mid-way (a consumer killed with SIGKILL, the broker restarted) gives the scores
  an uninterrupted run gives, row for row.
- Causal through the stream: a run that stops half-way has decided its events as the run that read
  everything did.
- A tenant with a model ensemble is scored by the ensemble and the detector together."""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from rtml.settings import Settings

TENANT = "plant"  # no model ensemble: scored by the detector alone
ENSEMBLE_TENANT = "acme"  # a promoted CNN as well
ENTITIES = 3
READINGS = 900  # per entity, 60 s apart
LEARNING_ROWS = 200
START = datetime(2025, 3, 1, tzinfo=timezone.utc)
SPIKE_AT = 700


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def detector_stack(ray_cluster, tmp_path_factory):
    """The Serve app with the entity forecaster; one tenant with a promoted CNN, one without."""
    from ray import serve

    from deployments.stream_client import deploy_scoring
    from lakehouse import Lakehouse
    from models.scoring import fit_scorer, save_scorer
    from rtml.schemas import ModelVersion

    home = tmp_path_factory.mktemp("detector-home")
    settings = Settings(
        home=home,
        models={"window_length": 16},
        detector={"learning_rows": LEARNING_ROWS, "refit_every": 150},
        serving={"app_name": "rtml-detector-tests", "persist_predictions": False, "run_stream": False, "model_kinds": ("cnn",), "http_port": _free_port()},
        # Small batches: the replays become durable in many small steps, so that a disturbance
        # lands mid-way, and batches cut the series at many places.
        streaming={"consumers": 2, "max_poll_records": 120, "max_in_flight_events": 480, "window_seconds": 600, "slide_seconds": 600},
        lakehouse={"writer_flush_seconds": 0.2},
    )
    settings = settings.model_copy(update={"home": settings.home_dir})
    lake = Lakehouse.open(settings)
    series = [np.sin(np.arange(400) / 20) + np.random.default_rng(1).normal(0, 0.1, 400)]
    uri = save_scorer(fit_scorer("cnn", series, window_length=16, epochs=1), home / "models" / ENSEMBLE_TENANT)
    model = lake.registry.register(ModelVersion(name=f"{ENSEMBLE_TENANT}-cnn", version=0, kind="cnn", tenant=ENSEMBLE_TENANT, artifact_uri=uri))
    lake.registry.promote(model.name, model.version)
    client = deploy_scoring(settings)
    yield settings, client, lake
    serve.delete(settings.serving.app_name)


def _events(run: str) -> list[dict]:
    rng = np.random.default_rng(5)
    events = []
    for step in range(READINGS):
        for tenant in (TENANT, ENSEMBLE_TENANT):
            for entity in range(ENTITIES):
                value = np.sin(2 * np.pi * step / 48) * (1 + entity) + rng.normal(0, 0.05)
                if step == SPIKE_AT and entity == 0:
                    value += 4.0
                events.append(
                    {
                        "event_id": f"{run}.{tenant}.{entity}.{step}",
                        "tenant": tenant,
                        "entity": f"line-{entity}",
                        "event_time": (START + timedelta(seconds=60 * step)).isoformat(),
                        "value": float(value),
                    }
                )
    return events


@pytest.fixture(scope="module")
def produced(detector_stack, kafka_bootstrap):
    """A topic holding the events, and the predictions of one uninterrupted consumer group."""
    from streaming.sources.kafka import EventProducer, ensure_topics, events_topic

    settings, client, lake = detector_stack
    run = f"rtml-detector-{uuid.uuid4().hex[:8]}"
    kafka = settings.kafka.model_copy(update={"topic_prefix": run, "dead_letter_topic": f"{run}.dead-letter", "consumer_group": run})
    settings = settings.model_copy(update={"kafka": kafka, "streaming": settings.streaming.model_copy(update={"source": "kafka"})})
    ensure_topics(settings.kafka, [*(events_topic(settings.kafka, t) for t in (TENANT, ENSEMBLE_TENANT)), settings.kafka.dead_letter_topic])
    producer = EventProducer(settings.kafka)
    events = _events(run)
    for event in events:
        producer.send(event)
    producer.flush()
    producer.close()
    _consume(_group_settings(settings, f"{run}-reference"), client, f"{run}-reference")
    return settings, client, lake, run, events


def _consume(settings: Settings, client, group: str, disturb=None, targets: dict[str, int] | None = None) -> dict:
    """Consume the topic as ``group`` to its end (or to ``targets``), calling ``disturb(pipeline)``
    once 30% of it is durable; returns the progress seen when disturbed."""
    from streaming.pipeline import Pipeline
    from streaming.sources.kafka import log_end_offsets

    pipeline = Pipeline(settings, client, group=group)
    seen: dict = {}
    try:
        pipeline.start()
        pipeline.finish_at(targets or log_end_offsets(settings.kafka))
        if disturb is not None:
            deadline = time.monotonic() + 180
            while (progress := pipeline.progress()).durable < 0.3 * max(progress.total, 1) and time.monotonic() < deadline:
                time.sleep(0.05)
            seen = {"durable": progress.durable, "total": progress.total, "pids": pipeline.consumer_pids()}
            disturb(pipeline)
        pipeline.wait(timeout_s=600)
        seen["pids_after"] = pipeline.consumer_pids()
        return seen
    finally:
        pipeline.shutdown()


def _decisions(lake, run: str) -> dict[str, dict]:
    """The run's prediction rows by event id: the detector's score, the ensemble's and the decision."""
    rows = lake.read("predictions", columns=("event_id", "scores", "ensemble_score", "is_anomaly"))
    rows = rows.filter(pc.starts_with(rows["event_id"], run + "."))
    member = pa.scalar("detector", rows.schema.field("scores").type.key_type)
    detector = pc.map_lookup(rows["scores"], member, "first").to_pylist()
    found = {}
    for event_id, score, ensemble, anomaly in zip(rows["event_id"].to_pylist(), detector, rows["ensemble_score"].to_pylist(), rows["is_anomaly"].to_pylist()):
        assert event_id not in found, f"{event_id} has two prediction rows"
        found[event_id] = {"detector": score, "ensemble": ensemble, "is_anomaly": anomaly}
    return found


def _group_settings(settings: Settings, group: str) -> Settings:
    """Each consumer group writes to a lakehouse of its own (in one, the idempotent writes would
    keep the first group's row of each event)."""
    return settings.model_copy(update={"home": settings.home_dir / "groups" / group})


def _group_rows(settings: Settings, run: str, group: str) -> dict[str, dict]:
    from lakehouse import Lakehouse

    return _decisions(Lakehouse.open(_group_settings(settings, group)), run)


@pytest.fixture(scope="module")
def reference(produced):
    settings, client, lake, run, events = produced
    return _group_rows(settings, run, f"{run}-reference")


def test_the_stream_scores_a_series_as_the_offline_detector_does(detector_stack, tmp_path):
    from deployments.stream_client import deploy_scoring
    from models.nab.runner import score_file
    from streaming.detection import detector_config
    from streaming.nab import run_stream

    settings, _, _ = detector_stack
    data = tmp_path / "data"
    (data / "short").mkdir(parents=True)
    steps = np.arange(1300)
    values = 5 + np.sin(2 * np.pi * steps / 96) + np.random.default_rng(3).normal(0, 0.1, len(steps))
    values[1000:1010] += 3
    times = pd.date_range("2025-01-01", periods=len(steps), freq="5min").strftime("%Y-%m-%d %H:%M:%S")
    pd.DataFrame({"timestamp": times, "value": values}).to_csv(data / "short" / "a.csv", index=False)
    # Its clock steps back an hour at row 400, as NAB's machine_temperature_system_failure's does:
    # every row is still scored, in file order.
    stepping_back = np.concatenate([times[:400], times[388:900 - 12]])
    pd.DataFrame({"timestamp": stepping_back, "value": values[:900][::-1]}).to_csv(data / "short" / "b.csv", index=False)
    nab = settings.model_copy(update={"serving": settings.serving.model_copy(update={"app_name": "rtml-detector-nab-tests", "route_prefix": "/nab"})})

    run_stream(data, tmp_path / "stream", nab, deploy_scoring)
    for name in ("short/a.csv", "short/b.csv"):
        score_file(data, tmp_path / "offline", name, detector_config(nab))
        stream = pd.read_csv(tmp_path / "stream" / name)["anomaly_score"].to_numpy()
        offline = pd.read_csv(tmp_path / "offline" / name)["anomaly_score"].to_numpy()
        np.testing.assert_array_equal(stream, offline)
    assert stream.max() > 0  # the series are scored, not all zero


def test_a_tenant_without_an_ensemble_is_scored_by_the_detector_and_one_with_an_ensemble_by_both(produced, reference):
    settings, client, lake, run, events = produced
    assert len(reference) == len(events)
    plant = {k: v for k, v in reference.items() if f".{TENANT}." in k}
    acme = {k: v for k, v in reference.items() if f".{ENSEMBLE_TENANT}." in k}
    assert all(row["ensemble"] == 0 for row in plant.values())
    assert any(row["ensemble"] > 0 for row in acme.values())
    assert all(row["detector"] is not None for row in reference.values())
    # Nothing is decided while an entity learns; the spike after it is.
    learning = [row for k, row in reference.items() if int(k.rsplit(".", 1)[1]) < LEARNING_ROWS]
    assert not any(row["detector"] for row in learning)
    for tenant in (TENANT, ENSEMBLE_TENANT):
        spike = reference[f"{run}.{tenant}.0.{SPIKE_AT}"]
        assert spike["is_anomaly"] and spike["detector"] >= settings.detector.threshold
    for row in acme.values():
        assert row["is_anomaly"] == (row["ensemble"] >= settings.models.anomaly_threshold or row["detector"] >= settings.detector.threshold)


def _same(row: dict, expected: dict, event_id: str) -> bool:
    """Equal rows; for the ensemble's tenant the detector's score (its CPU forwards of the
    ensemble's model may round differently in other batches)."""
    return row == expected if f".{TENANT}." in event_id else row["detector"] == expected["detector"]


def _assert_same_scores(rows: dict[str, dict], reference: dict[str, dict]) -> None:
    assert rows.keys() == reference.keys()
    differing = [k for k in reference if not _same(rows[k], reference[k], k)]
    assert not differing, f"{len(differing)} rows differ, e.g. {differing[0]}: {rows[differing[0]]} != {reference[differing[0]]}"


@pytest.mark.services
def test_a_consumer_killed_mid_stream_gives_the_uninterrupted_runs_scores(produced, reference):
    settings, client, lake, run, events = produced
    group = f"{run}-killed"
    seen = _consume(_group_settings(settings, group), client, group, lambda pipeline: os.kill(pipeline.consumer_pids()[0], signal.SIGKILL))
    assert 0 < seen["durable"] < seen["total"]
    assert seen["pids_after"][0] != seen["pids"][0]
    _assert_same_scores(_group_rows(settings, run, group), reference)


@pytest.mark.services
def test_a_broker_restart_mid_stream_gives_the_uninterrupted_runs_scores(produced, reference):
    from cluster import services

    settings, client, lake, run, events = produced
    group = f"{run}-broker"
    seen = _consume(_group_settings(settings, group), client, group, lambda pipeline: services.get("kafka").restart())
    assert 0 < seen["durable"] < seen["total"]
    _assert_same_scores(_group_rows(settings, run, group), reference)


@pytest.mark.services
def test_later_events_never_change_earlier_decisions_through_the_stream(produced, reference):
    from streaming.sources.kafka import log_end_offsets

    settings, client, lake, run, events = produced
    group = f"{run}-prefix"
    halfway = {partition: end // 2 for partition, end in log_end_offsets(settings.kafka).items()}
    _consume(_group_settings(settings, group), client, group, targets=halfway)
    prefix = _group_rows(settings, run, group)
    assert 0 < len(prefix) < len(reference)
    differing = [k for k, row in prefix.items() if not _same(row, reference[k], k)]
    assert not differing, f"{len(differing)} rows differ, e.g. {differing[0]}"
