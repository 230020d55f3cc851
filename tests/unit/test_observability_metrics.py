"""The metrics catalog and its backends, the lag exporter's stall signal, the scrape job."""

from __future__ import annotations

import uuid

import pytest
from prometheus_client import REGISTRY

from observability import metrics, scrape
from streaming.lag import LagExporter


def _value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_every_family_is_named_for_prometheus_and_counters_end_in_total():
    for name, family in metrics.CATALOG.items():
        assert name.startswith("rtml_") and name == family.spec.name
        assert name.endswith("_total") == (family.spec.kind == "counter"), name
        assert family.spec.kind != "histogram" or family.spec.buckets, name


def test_a_counter_outside_ray_counts_in_the_process_registry_under_its_full_name():
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    metrics.INGESTED.labels(tenant=tenant, path="stream").inc(3)
    metrics.INGESTED.labels(tenant=tenant, path="stream").inc(2)
    assert _value("rtml_ingested_events_total", tenant=tenant, path="stream") == 5
    assert b"rtml_ingested_events_total{" in metrics.exposition()


def test_labels_must_be_exactly_the_declared_ones():
    with pytest.raises(ValueError, match="takes the labels"):
        metrics.INGESTED.labels(tenant="a")
    with pytest.raises(ValueError, match="takes the labels"):
        metrics.INGESTED.labels(tenant="a", path="stream", entity="e-1")


def test_observe_many_observes_every_value():
    group = f"g-{uuid.uuid4().hex[:6]}"
    metrics.EVENT_TO_DECISION.labels(group=group).observe_many([0.001, 0.2, 7.0])
    assert _value("rtml_event_to_decision_seconds_count", group=group) == 3
    assert _value("rtml_event_to_decision_seconds_bucket", group=group, le="0.25") == 2


def test_the_lag_exporter_moves_the_progress_time_only_when_the_committed_offset_moves_or_lag_is_zero():
    group = f"g-{uuid.uuid4().hex[:6]}"
    now = [100.0]
    exporter = LagExporter(group, clock=lambda: now[0])

    def progress_at(partition: str) -> float | None:
        return _value("rtml_consumer_last_progress_timestamp_seconds", group=group, partition=partition)

    exporter.export({"p0": (10, 50), "p1": (5, 5)})
    assert _value("rtml_consumer_lag_events", group=group, partition="p0") == 40
    assert progress_at("p0") == 100.0 and progress_at("p1") == 100.0
    now[0] = 160.0
    exporter.export({"p0": (10, 70), "p1": (9, 9)})  # p0 stalled with lag; p1 moved and is caught up
    assert progress_at("p0") == 100.0 and progress_at("p1") == 160.0
    assert _value("rtml_consumer_lag_events", group=group, partition="p0") == 60
    assert _value("rtml_consumer_committed_offset", group=group, partition="p1") == 9
    now[0] = 200.0
    exporter.export({"p0": (30, 70), "p1": (9, 9)})  # p0 moves again; p1 idle but caught up: not stalled
    assert progress_at("p0") == 200.0 and progress_at("p1") == 200.0


def test_the_scrape_job_gives_rays_application_metrics_their_own_names(tmp_path):
    job = scrape.scrape_job(tmp_path)
    (relabel,) = job["metric_relabel_configs"]
    import re

    pattern = re.compile(f"^(?:{relabel['regex']})$")  # Prometheus anchors relabel regexes
    assert pattern.sub(relabel["replacement"].replace("$1", r"\1"), "ray_rtml_stream_events_total") == "rtml_stream_events_total"
    assert not pattern.match("ray_serve_num_http_requests_total")  # Ray's own keep their prefix
    assert job["file_sd_configs"][0]["files"] == [str(tmp_path / "*.json")]


def test_registered_targets_are_written_whole_in_file_sd_format(tmp_path):
    import json

    path = scrape.register_process(tmp_path, "driver", "127.0.0.1:9999")
    assert json.loads(path.read_text()) == [{"labels": {"source": "process", "process": "driver"}, "targets": ["127.0.0.1:9999"]}]
    assert not list(tmp_path.glob("*.tmp"))
    scrape.unregister(path)
    assert not path.exists()
